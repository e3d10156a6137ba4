"""The live peer table: which boards take offload now, what each offers, and how far away it is.

Fed by the retained statuses on ``edge/v1/+/status`` (:meth:`PeerTable.on_status`): an agent that
serves offload says so under ``offload.serve`` (models, split points, queue delay per lane, free
slots, codecs; ``Agent.offload_status``) and refreshes it every ``status_interval_s``. A peer is
forgotten when its last will fires (``state: offline``), when it says it no longer serves, or when
its status goes stale (no refresh for ``stale_s``): the offload executor does not send to a peer
that is not in the table, it runs the batch here at once.

The link is measured from this board's own offload traffic (:meth:`PeerTable.observe`): each round
trip's time on the network (the reply's arrival less the send, less the time the peer says it held
the message) against the bytes it carried both ways. One sample cannot tell latency from bandwidth
(64 KiB in 20 ms is a 26 Mbit/s link with no delay, or a 100 Mbit/s link with 15 ms of it), so the
table fits ``network_s = rtt + bytes / bandwidth`` by least squares over exponentially weighted
samples (:class:`LinkFit`, ours): batches of different sizes and split points give the spread a
fit needs. Until the spread is there, the round trip is the smallest recent sample and the
bandwidth what the rest of each sample implies. The split decision (``agent.offload.planner``)
reads both; the executor uses the round trip to leave the reply's way back out of the deadlines it
gives the peer.

When this board sends a peer nothing for a while (a policy that chose to run here because the link
looked slow, a peer just discovered), its idle probe (``agent.offload.probe``) measures the link
instead: each answered probe is one more sample of the same fit (``observe(..., source="probe")``),
so the estimate keeps up with the link, and the status says per peer which fed it last (``source``:
``traffic`` or ``probe``) and when the last probe was answered.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)

#: Weight of a new sample in the round-trip and bandwidth EWMAs.
EWMA_ALPHA = 0.2
#: Where a link sample came from: a batch's round trip, or an idle probe's.
SOURCES = ("traffic", "probe")


class LinkFit:
    """``network_s = rtt + bytes / bandwidth``, fitted over exponentially weighted samples (weight
    ``EWMA_ALPHA`` for the newest): the weighted means of x (bytes), y (seconds), x^2 and xy."""

    #: The bytes must spread by this share of their mean before the slope is trusted.
    MIN_SPREAD = 0.1
    #: Samples the fallback's smallest round trip looks back over.
    WINDOW = 32

    def __init__(self) -> None:
        self.n = 0
        self.mx = self.my = self.mxx = self.mxy = 0.0
        self._recent: list[tuple[float, float]] = []

    def add(self, nbytes: float, seconds: float) -> None:
        a = EWMA_ALPHA if self.n else 1.0
        self.mx += a * (nbytes - self.mx)
        self.my += a * (seconds - self.my)
        self.mxx += a * (nbytes * nbytes - self.mxx)
        self.mxy += a * (nbytes * seconds - self.mxy)
        self.n += 1
        self._recent.append((nbytes, seconds))
        del self._recent[:-self.WINDOW]

    def estimate(self) -> tuple[float, float] | None:
        """(round trip s, bandwidth bytes/s), or ``None`` before the first sample."""
        if not self.n:
            return None
        var = self.mxx - self.mx * self.mx
        if var > (self.MIN_SPREAD * self.mx) ** 2:
            slope = (self.mxy - self.mx * self.my) / var
            rtt = self.my - slope * self.mx
            if slope > 0 and rtt >= 0:
                return rtt, 1.0 / slope
        rtt = min(y for _, y in self._recent)
        excess = max(self.my - rtt, 1e-6)
        return rtt, max(self.mx, 1.0) / excess if self.my > rtt else math.inf


@dataclass
class PeerInfo:
    device: str
    offers: dict[str, dict]             # model -> {"full": bool, "splits": [names]}
    queue_ms: dict[str, float]          # lane -> queue delay
    free_slots: int
    codecs: list[str]
    seen_at: float                      # this board's monotonic clock, when the status arrived
    rtt_s: float | None = None          # the link's round trip (LinkFit)
    bandwidth_bps: float | None = None  # bits per second (LinkFit)
    samples: int = 0
    #: Each lane's batch time on the peer, as its status says: lane -> {batch size: ms}.
    latency_ms: dict[str, dict[int, float]] = field(default_factory=dict)
    #: How many batches the peer runs at once.
    slots: int = 1
    #: What fed the link's fit last ("traffic" or "probe"; None before any sample), how many of its
    #: samples were probes, and when (this board's monotonic clock) the last probe was answered.
    source: str | None = None
    probe_samples: int = 0
    last_probe_at: float | None = None
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
                "samples": self.samples, "source": self.source, "probe_samples": self.probe_samples,
                "last_probe_age_s": None if self.last_probe_at is None else round(now - self.last_probe_at, 3)}


@dataclass
class _Seen:
    """When a peer's link was last used or measured, and by what."""

    traffic_at: float | None = None      # a batch sent to it, or its reply
    probe_at: float | None = None        # a probe answered
    source: str | None = None
    probe_samples: int = 0


class PeerTable:
    """Peers by device id; safe from any thread (the network thread writes, workers read)."""

    def __init__(self, device: str, stale_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.device = device
        self.stale_s = stale_s
        self.clock = clock
        self._lock = threading.Lock()
        self._peers: dict[str, PeerInfo] = {}
        # The link measures outlive a status refresh (a new PeerInfo) and a short absence.
        self._links: dict[str, LinkFit] = {}
        self._seen: dict[str, _Seen] = {}

    def on_status(self, topic: str, payload: bytes, retained: bool = False) -> str | None:
        """A status on ``edge/v1/<device>/status``: keep, refresh or forget that device. A malformed
        one forgets it too (a peer that cannot say what it offers is not sent to). Returns the
        device when the status says it is offline (its last will, or its shutdown's last word):
        whatever it was sent and has not answered, it will not answer."""
        parts = topic.split("/")
        if len(parts) != 4 or parts[3] != "status":
            return None
        device = parts[2]
        if device == self.device:
            return None
        try:
            status = json.loads(payload) if payload else {}
        except ValueError:
            status = {}
        serve = status.get("offload", {}).get("serve") if isinstance(status, dict) and isinstance(
            status.get("offload"), dict) else None
        if not isinstance(status, dict) or status.get("state") != "online" or not isinstance(serve, dict):
            self.forget(device)
            return device if isinstance(status, dict) and status.get("state") == "offline" else None
        at = serve.get("at")
        if retained and isinstance(at, (int, float)) and time.time() - at > self.stale_s:
            self.forget(device)      # a retained status from a peer that has not refreshed it since
            return None
        try:
            info = PeerInfo(device=device, offers=dict(serve.get("models") or {}),
                            queue_ms={str(k): float(v) for k, v in (serve.get("queue_ms") or {}).items()},
                            free_slots=int(serve.get("free_slots") or 0), codecs=list(serve.get("codecs") or ["raw"]),
                            seen_at=self.clock(),
                            latency_ms={str(lane): {int(b): float(ms) for b, ms in table.items()}
                                        for lane, table in (serve.get("latency_ms") or {}).items()},
                            slots=max(1, int(serve.get("slots") or 1)))
        except (TypeError, ValueError, AttributeError):
            log.warning("peer %s: offload status not understood: %r", device, serve)
            self.forget(device)
            return None
        with self._lock:
            self._fill_link(info)
            if device not in self._peers:
                log.info("offload peer %s online: %s", device, info.offers)
            self._peers[device] = info
        return None

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

    def observe(self, device: str, network_s: float, wire_bytes: int, source: str = "traffic") -> None:
        """One round trip to ``device``: ``network_s`` on the wire (round trip less the peer's own
        time), ``wire_bytes`` both ways; ``source``: a batch's (``traffic``) or a probe's."""
        if source not in SOURCES:
            raise ValueError(f"source = {source!r}: expected one of {SOURCES}")
        with self._lock:
            self._links.setdefault(device, LinkFit()).add(float(wire_bytes), max(network_s, 1e-6))
            seen = self._seen.setdefault(device, _Seen())
            seen.source = source
            if source == "probe":
                seen.probe_at = self.clock()
                seen.probe_samples += 1
            else:
                seen.traffic_at = self.clock()
            info = self._peers.get(device)
            if info is not None:
                self._fill_link(info)

    def _fill_link(self, info: PeerInfo) -> None:
        """Copy the link's fit into ``info`` (the lock held)."""
        fit = self._links.get(info.device)
        estimate = fit.estimate() if fit is not None else None
        if estimate is None:
            info.rtt_s, info.bandwidth_bps, info.samples = None, None, 0
        else:
            info.rtt_s, info.bandwidth_bps, info.samples = estimate[0], 8.0 * estimate[1], fit.n
        seen = self._seen.get(info.device)
        if seen is not None:
            info.source, info.probe_samples, info.last_probe_at = seen.source, seen.probe_samples, seen.probe_at

    def sent(self, device: str) -> None:
        """A batch went to ``device`` (its link is in use: no probe needed)."""
        with self._lock:
            self._seen.setdefault(device, _Seen()).traffic_at = self.clock()

    def idle_s(self, device: str) -> float:
        """Seconds since this board last sent ``device`` a batch or had its reply (inf: never)."""
        with self._lock:
            seen = self._seen.get(device)
            at = seen.traffic_at if seen is not None else None
        return math.inf if at is None else self.clock() - at

    def rtt_s(self, device: str) -> float | None:
        with self._lock:
            fit = self._links.get(device)
            estimate = fit.estimate() if fit is not None else None
        return None if estimate is None else estimate[0]

    def live_peers(self) -> list[PeerInfo]:
        """Every peer whose status is fresh."""
        now = self.clock()
        with self._lock:
            return [info for info in self._peers.values() if now - info.seen_at <= self.stale_s]

    def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        with self._lock:
            peers = list(self._peers.values())
        return {info.device: info.summary(now) for info in peers if now - info.seen_at <= self.stale_s}


__all__ = ["LinkFit", "PeerTable", "PeerInfo", "SOURCES"]
