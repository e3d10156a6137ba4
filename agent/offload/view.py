"""The live board's view for the split policy (``agent.offload.planner.OffloadView``).

Built from the board's offload client (``agent.runtime.offload_executor``): this board's whole-model
and head tables (measured at start), and per live peer (``agent.offload.peers``) what it offers
that this board can send (a split point needs its head here), each option's tail time on the peer
(the peer's own latency table from its status; this board's, when the peer does not say), the
bytes an item puts on the wire after the codec and the codec's time (measured from this board's own
sends; before the first, the codec's nominal ratio), the peer's queue delay per lane (as its last
status said, less the time since: the peer works its queue off while its status ages) and its slots,
and the link.

Before this board has measured a link, it assumes a fast one (``ASSUMED_RTT_S``,
``ASSUMED_BANDWIDTH_BPS``): the planner then sends, the round trips measure the link, and the fit
(``agent.offload.peers.LinkFit``) corrects the estimate within a few batches; a slow one assumed
instead would keep the board from ever measuring a fast one. What the optimism costs is a few
batches sent over a slow link, each still answered in time or by the board's own fallback.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from agent.core import LatencyTable
from agent.offload.planner import PeerSnapshot, SplitCost, Table
from agent.offload.splits import lane_name

if TYPE_CHECKING:
    from agent.runtime.offload_executor import OffloadClient

#: The link assumed before the first round trip to a peer is measured (module docstring).
ASSUMED_RTT_S = 0.002
ASSUMED_BANDWIDTH_BPS = 1e9


def table_from_ms(latency_ms: dict[int, float]) -> LatencyTable | None:
    """A latency table from ``{batch size: ms}`` (a peer's status), or ``None`` when empty."""
    if not latency_ms:
        return None
    sizes = sorted(latency_ms)
    seconds = np.maximum.accumulate(np.array([latency_ms[b] / 1000.0 for b in sizes]))
    return LatencyTable(np.array(sizes, dtype=np.int64), seconds)


class LiveOffloadView:
    def __init__(self, client: "OffloadClient") -> None:
        self.client = client
        # A peer's tables are rebuilt only when its status changes (a new PeerInfo object).
        self._tables: dict[str, tuple[object, dict[str, Table]]] = {}

    def local_table(self, model: str) -> Table | None:
        loaded = self.client.models.get(model)
        return None if loaded is None else loaded.latency

    def _peer_tables(self, info) -> dict[str, Table]:
        cached = self._tables.get(info.device)
        if cached is not None and cached[0] is info:
            return cached[1]
        tables = {lane: t for lane, ms in info.latency_ms.items() if (t := table_from_ms(ms)) is not None}
        self._tables[info.device] = (info, tables)
        return tables

    def peer_snapshots(self, now: float) -> list[PeerSnapshot]:
        out = []
        splits = self.client._splits
        for info in self.client.peers.live_peers():
            tables = self._peer_tables(info)
            offers: dict[str, list[SplitCost]] = {}
            for (model, split), held in splits.items():
                if not info.offers_split(model, split):
                    continue
                lane = lane_name(model, split)
                tail = tables.get(lane) or held.local_table      # the peer's own times, else ours
                offers.setdefault(model, []).append(
                    SplitCost(split, held.head_table, tail, held.sent_bytes_per_item or float(held.bytes_per_item),
                              2.0 * held.codec_s_per_item))      # encoding here, about as long decoding there
            if not offers:
                continue
            rtt = info.rtt_s if info.rtt_s is not None else ASSUMED_RTT_S
            bandwidth = info.bandwidth_bps if info.bandwidth_bps is not None else ASSUMED_BANDWIDTH_BPS
            # The queue as the peer advertised it, drained since: it ran its queue while the status
            # aged, and a second-old queue held as it was refused work the peer had time for.
            age_s = max(0.0, now - info.seen_at)
            queue_s = {lane: max(0.0, ms / 1000.0 - age_s) for lane, ms in info.queue_ms.items()}
            out.append(PeerSnapshot(info.device, rtt, bandwidth / 8.0 if math.isfinite(bandwidth) else 1e12,
                                    queue_s, offers, info.slots, status_at=info.seen_at))
        return out


__all__ = ["ASSUMED_BANDWIDTH_BPS", "ASSUMED_RTT_S", "LiveOffloadView", "table_from_ms"]
