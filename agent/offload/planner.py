"""Where a batch runs: on this board, or split after point k with the rest on peer p.

Neurosurgeon (PAPERS.md) picks, per request, the split point that minimises end-to-end latency,
from per-layer times on both sides and the link's bandwidth: ``argmin_k head(k) + bytes(k) / bw +
tail(k)``. On a board that batches and is short of compute that is the wrong question: the batch
that runs locally also keeps every queued batch behind it waiting, and a peer or a link that every
batch is sent to builds a queue of its own. So the planner here (ours; BPS's scheduler is an RL
policy whose cost model its abstract does not give) prices each option for the batch at hand,
given what is already committed on each resource:

* **local**: the batch holds a slot for ``full(b)``; it ends at ``now + full(b)``.
* **split k on peer p** (k = ``None``: the whole input goes): the head holds the slot for
  ``head_k(b) + encode``; the tensor leaves when the head is done and the uplink to p is free (this
  board's reservations of that link, :class:`PeerState.link_free_at`) and takes
  ``b x bytes_k / bandwidth``; it reaches p half a round trip later, waits behind the work this
  board already sent it and has no answer for (``outstanding_s``) and the rest of p's advertised
  queue (the queue less what of this board's work it held when p took it: counted once, as it is
  now), runs ``tail_k(b)`` on p, and the reply takes the other half of the round trip.

Each option ends at ``finish`` and frees this board's slot after ``local_s``. The planner picks the
option with the least ``max(finish, now + local_s + backlog_s)`` among those that meet the batch's
earliest deadline (``backlog_s``: the local work queued behind this batch, per slot). With nothing
queued the second term is at most the first, and this is Neurosurgeon's argmin, latency first; with
a backlog it weighs what a choice costs the queue: an offload that frees the slot sooner wins even
if its own batch ends a little later, until the link or the peer it loads ends later than the
backlog would. When no option meets the deadline, the earliest finish is taken (the scheduler sheds
what is hopeless before a batch is formed; what is left has the best chance this way).

Reservations (:meth:`Planner.commit`) are this board's own bookkeeping, corrected by what it
measures: the peer table's round trip and bandwidth are EWMAs of this board's own offload traffic
(``agent.offload.peers``), the peer's queue is what its status advertises, and ``outstanding_s``
falls when a reply comes (:meth:`Planner.answered`).

Pure: no clock, no threads, no I/O; the split policy (``agent.scheduler.policies.split``) and the
simulator drive it, with the same numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Protocol, Sequence

from agent.offload.splits import lane_name


class Table(Protocol):
    def predict(self, batch_size: int) -> float: ...


@dataclass(frozen=True)
class SplitCost:
    """What one split point of a model costs (``split=None``: full offload, no head).

    ``head``: the head's time on this board by batch size (``None`` for full offload); ``tail``: the
    tail's time on the peer by batch size (the peer's own figures where it advertises them, else
    this board's scaled by the peer's speed); ``bytes_per_item``: on the wire after the codec;
    ``codec_s_per_item``: encoding here plus decoding there."""

    split: str | None
    head: Table | None
    tail: Table
    bytes_per_item: float
    codec_s_per_item: float = 0.0


@dataclass
class PeerState:
    """What this board knows of one peer and of what it has committed to it."""

    device: str
    rtt_s: float
    bandwidth_Bps: float
    #: The peer's advertised queue delay (seconds), per lane (``model``, or ``model@split`` for a
    #: split point's tail): how long a batch waits there now.
    queue_s: dict[str, float] = field(default_factory=dict)
    #: The split points of each model the peer serves (``None`` in the set: the full model).
    offers: dict[str, Sequence[SplitCost]] = field(default_factory=dict)
    #: When this board's uplink to the peer is free of the tensors already sent (scheduler clock).
    link_free_at: float = -math.inf
    #: Tail work this board sent the peer that is not answered yet (seconds of the peer's compute).
    outstanding_s: float = 0.0
    #: How many batches the peer runs at once (its execution slots): the work above is shared by them.
    slots: int = 1
    #: When the peer took the queue figures above (``PeerSnapshot.status_at``), and how much of this
    #: board's work was out on it then (``outstanding_s`` at that moment): the advertised queue holds
    #: part of that work already, which ``outstanding_s`` counts too.
    status_at: float | None = None
    own_at_status: float = 0.0


@dataclass(frozen=True)
class PeerSnapshot:
    """What a peer offers and how far it is, as its status and this board's measures say now (what
    :class:`OffloadView` gives the planner each decision); :class:`PeerState` adds this board's own
    reservations, kept across decisions."""

    device: str
    rtt_s: float
    bandwidth_Bps: float
    queue_s: Mapping[str, float]
    offers: Mapping[str, Sequence[SplitCost]]
    slots: int = 1
    #: When the peer's queue figures were taken (the status they came in; any clock, compared only
    #: for change). None: not known, each refresh taken as new.
    status_at: float | None = None


class OffloadView(Protocol):
    """Where the split policy (``agent.scheduler.policies.split``) reads the world: the live agent's
    is built from its peer table and loaded split points (``agent.runtime.offload_executor``), the
    simulator's from its simulated peers and links. Given to the scheduler as
    ``policy_options["offload_view"]``."""

    def local_table(self, model: str) -> Table | None:
        """The whole model's batch time on this board (``None``: it cannot run here)."""

    def peer_snapshots(self, now: float) -> Iterable[PeerSnapshot]:
        """The live peers that take offload now."""


@dataclass(frozen=True)
class Placement:
    """The planner's choice for a batch: ``target`` (``"local"`` or a peer's device), ``split``,
    when the batch is predicted to end (``finish``), how long it holds this board's slot
    (``local_s``), when its tensor is off the uplink (``sent_at``) and the tail work it gives the
    peer (``peer_s``)."""

    target: str
    split: str | None
    finish: float
    local_s: float
    sent_at: float = -math.inf
    peer_s: float = 0.0

    @property
    def local(self) -> bool:
        return self.target == LOCAL


LOCAL = "local"


def learn_slowdown(slowdown: dict, key, took_s: float, predicted_s: float, alpha: float) -> None:
    """Fold one run into ``slowdown[key]``, an EWMA (weight ``alpha``) of how much longer this
    board's runs take (``took_s``) than predicted (``predicted_s``): each run's took / predicted
    ratio is clamped to [0.25, 20]: one run stalled by a quota's period, or one that finished within
    it, says little alone. A prediction of 0 teaches nothing."""
    if predicted_s <= 0:
        return
    ratio = min(max(took_s / predicted_s, 0.25), 20.0)
    old = slowdown.get(key)
    slowdown[key] = ratio if old is None else old + alpha * (ratio - old)


class Planner:
    """Prices the options for a batch and keeps the reservations of the choices made."""

    def __init__(self, peers: dict[str, PeerState] | None = None) -> None:
        self.peers: dict[str, PeerState] = peers if peers is not None else {}

    def refresh(self, snapshots: Iterable[PeerSnapshot]) -> None:
        """Take the peers' current figures; keep this board's reservations of those still there,
        forget those gone."""
        fresh: dict[str, PeerState] = {}
        for snap in snapshots:
            state = self.peers.get(snap.device)
            if state is None:
                state = PeerState(snap.device, snap.rtt_s, snap.bandwidth_Bps)
            state.rtt_s, state.bandwidth_Bps = snap.rtt_s, snap.bandwidth_Bps
            state.queue_s, state.offers, state.slots = dict(snap.queue_s), dict(snap.offers), snap.slots
            if snap.status_at is None or snap.status_at != state.status_at:
                state.status_at, state.own_at_status = snap.status_at, state.outstanding_s
            fresh[snap.device] = state
        self.peers = fresh

    def options(self, model: str, batch_size: int, now: float, local: Table | None,
                local_scale: float = 1.0) -> list[Placement]:
        """Every way to run a batch of ``batch_size`` of ``model`` now: locally (when ``local``,
        the model's full time here, is given) and on each peer at each split point it offers.
        ``local_scale``: what this board's compute really takes against its tables (a CPU quota, a
        busy neighbour: the slowdown its own batches show), applied to the local run and heads."""
        out: list[Placement] = []
        if local is not None:
            full = local.predict(batch_size) * local_scale
            out.append(Placement(LOCAL, None, now + full, full))
        for peer in self.peers.values():
            for cost in peer.offers.get(model, ()):
                out.append(self._price(peer, model, cost, batch_size, now, local_scale))
        return out

    def _price(self, peer: PeerState, model: str, cost: SplitCost, b: int, now: float,
               local_scale: float = 1.0) -> Placement:
        head = cost.head.predict(b) * local_scale if cost.head is not None else 0.0
        local_s = head + b * cost.codec_s_per_item
        leaves = max(now + local_s, peer.link_free_at)
        sent_at = leaves + b * cost.bytes_per_item / max(peer.bandwidth_Bps, 1.0)
        arrives = sent_at + 0.5 * peer.rtt_s
        tail = cost.tail.predict(b)
        slots = max(peer.slots, 1)
        # The advertised queue, less this board's own work in it when it was taken (counted below
        # as it is now: answered batches gone, new ones in), is the other boards' and the peer's own.
        others = max(0.0, peer.queue_s.get(lane_name(model, cost.split), 0.0) - peer.own_at_status / slots)
        starts = max(arrives, now + others + peer.outstanding_s / slots)
        finish = starts + tail + 0.5 * peer.rtt_s
        return Placement(peer.device, cost.split, finish, local_s, sent_at, tail)

    def choose(self, model: str, batch_size: int, now: float, deadline: float, local: Table | None,
               backlog_s: float = 0.0, local_scale: float = 1.0) -> Placement | None:
        """The option for the batch (module docstring): the least ``max(finish, now + local_s +
        backlog_s)`` among those that end by ``deadline``, else the earliest finish; ``None`` when
        there is no option at all (no local model and no peer offering it)."""
        options = self.options(model, batch_size, now, local, local_scale)
        if not options:
            return None
        feasible = [o for o in options if o.finish <= deadline]
        if not feasible:
            return min(options, key=lambda o: (o.finish, not o.local))
        # Ties (e.g. an idle board, where both terms are the batch's own time) go to local: it
        # depends on nothing that can fail.
        return min(feasible, key=lambda o: (max(o.finish, now + o.local_s + backlog_s), not o.local))

    def commit(self, placement: Placement) -> None:
        """Reserve what ``placement`` takes: the uplink until its tensor is sent, the peer's time."""
        if placement.local:
            return
        peer = self.peers.get(placement.target)
        if peer is not None:
            peer.link_free_at = max(peer.link_free_at, placement.sent_at)
            peer.outstanding_s += placement.peer_s

    def answered(self, target: str, peer_s: float) -> None:
        """The peer ``target`` answered (or was given up on) a batch that gave it ``peer_s`` of work
        (its placement's ``peer_s``)."""
        peer = self.peers.get(target)
        if peer is not None:
            peer.outstanding_s = max(0.0, peer.outstanding_s - peer_s)


__all__ = ["LOCAL", "learn_slowdown", "OffloadView", "Placement", "PeerSnapshot", "PeerState", "Planner", "SplitCost", "Table"]
