"""The live peer table: which boards take offload now, what each offers, and how far away it is.

Fed by the retained statuses on ``edge/v1/+/status`` (:meth:`PeerTable.on_status`): an agent that
serves offload says so under ``offload.serve`` (models, split points, queue delay per lane, free
slots, codecs; ``Agent.offload_status``) and refreshes it every ``status_interval_s``. A peer is
forgotten when its last will fires (``state: offline``), when it says it no longer serves, or when
its status goes stale (no refresh for ``stale_s``): the offload executor does not send to a peer
that is not in the table, it runs the batch here at once.

The link is measured from this board's own offload traffic (:meth:`PeerTable.observe`): per peer, an
EWMA of the network round trip (the reply's arrival less the send, less the time the peer says it
held the message) and of the bandwidth that round trip implies for the bytes both ways. A split
decision (the lead's policy) reads them; the executor uses the round trip to leave the reply's way
back out of the deadlines it gives the peer. Not yet: a probe when no traffic has measured a peer.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)

#: Weight of a new sample in the round-trip and bandwidth EWMAs.
EWMA_ALPHA = 0.2


@dataclass
class PeerInfo:
    device: str
    offers: dict[str, dict]             # model -> {"full": bool, "splits": [names]}
    queue_ms: dict[str, float]          # lane -> queue delay
    free_slots: int
    codecs: list[str]
    seen_at: float                      # this board's monotonic clock, when the status arrived
    rtt_s: float | None = None          # EWMA of the network round trip
    bandwidth_bps: float | None = None  # EWMA, bits per second
    samples: int = 0
    extra: dict = field(default_factory=dict)

    def offers_split(self, model: str, split: str | None) -> bool:
        entry = self.offers.get(model)
        if not isinstance(entry, dict):
            return False
        return bool(entry.get("full")) if split is None else split in (entry.get("splits") or ())

    def summary(self, now: float) -> dict:
        return {"age_s": round(now - self.seen_at, 3), "offers": self.offers, "queue_ms": self.queue_ms,
                "free_slots": self.free_slots, "codecs": self.codecs,
                "rtt_ms": None if self.rtt_s is None else round(1000 * self.rtt_s, 3),
                "bandwidth_mbps": None if self.bandwidth_bps is None else round(self.bandwidth_bps / 1e6, 3),
                "samples": self.samples}


class PeerTable:
    """Peers by device id; safe from any thread (the network thread writes, workers read)."""

    def __init__(self, device: str, stale_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.device = device
        self.stale_s = stale_s
        self.clock = clock
        self._lock = threading.Lock()
        self._peers: dict[str, PeerInfo] = {}
        # The link measures outlive a status refresh (a new PeerInfo) and a short absence.
        self._links: dict[str, tuple[float | None, float | None, int]] = {}

    def on_status(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """A status on ``edge/v1/<device>/status``: keep, refresh or forget that device. A malformed
        one forgets it too (a peer that cannot say what it offers is not sent to)."""
        parts = topic.split("/")
        if len(parts) != 4 or parts[3] != "status":
            return
        device = parts[2]
        if device == self.device:
            return
        try:
            status = json.loads(payload) if payload else {}
        except ValueError:
            status = {}
        serve = status.get("offload", {}).get("serve") if isinstance(status, dict) and isinstance(
            status.get("offload"), dict) else None
        if not isinstance(status, dict) or status.get("state") != "online" or not isinstance(serve, dict):
            self.forget(device)
            return
        at = serve.get("at")
        if retained and isinstance(at, (int, float)) and time.time() - at > self.stale_s:
            self.forget(device)      # a retained status from a peer that has not refreshed it since
            return
        try:
            info = PeerInfo(device=device, offers=dict(serve.get("models") or {}),
                            queue_ms={str(k): float(v) for k, v in (serve.get("queue_ms") or {}).items()},
                            free_slots=int(serve.get("free_slots") or 0), codecs=list(serve.get("codecs") or ["raw"]),
                            seen_at=self.clock())
        except (TypeError, ValueError, AttributeError):
            log.warning("peer %s: offload status not understood: %r", device, serve)
            self.forget(device)
            return
        with self._lock:
            rtt, bandwidth, samples = self._links.get(device, (None, None, 0))
            info.rtt_s, info.bandwidth_bps, info.samples = rtt, bandwidth, samples
            if device not in self._peers:
                log.info("offload peer %s online: %s", device, info.offers)
            self._peers[device] = info

    def forget(self, device: str) -> None:
        with self._lock:
            if self._peers.pop(device, None) is not None:
                log.info("offload peer %s forgotten", device)

    def live(self, device: str) -> PeerInfo | None:
        """The peer, if it serves offload and its status is fresh; a stale one is forgotten here."""
        with self._lock:
            info = self._peers.get(device)
            if info is None:
                return None
            if self.clock() - info.seen_at > self.stale_s:
                del self._peers[device]
                log.info("offload peer %s forgotten: no status for %.1f s", device, self.clock() - info.seen_at)
                return None
            return info

    def observe(self, device: str, network_s: float, wire_bytes: int) -> None:
        """One offload round trip to ``device``: ``network_s`` on the wire (round trip less the
        peer's own time), ``wire_bytes`` both ways."""
        network_s = max(network_s, 1e-6)
        bandwidth = 8.0 * wire_bytes / network_s
        with self._lock:
            rtt, bw, samples = self._links.get(device, (None, None, 0))
            rtt = network_s if rtt is None else (1 - EWMA_ALPHA) * rtt + EWMA_ALPHA * network_s
            bw = bandwidth if bw is None else (1 - EWMA_ALPHA) * bw + EWMA_ALPHA * bandwidth
            self._links[device] = (rtt, bw, samples + 1)
            info = self._peers.get(device)
            if info is not None:
                info.rtt_s, info.bandwidth_bps, info.samples = rtt, bw, samples + 1

    def rtt_s(self, device: str) -> float | None:
        with self._lock:
            link = self._links.get(device)
        return None if link is None else link[0]

    def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        with self._lock:
            peers = list(self._peers.values())
        return {info.device: info.summary(now) for info in peers if now - info.seen_at <= self.stale_s}


__all__ = ["PeerTable", "PeerInfo"]
