"""The split decision (``policy = "split"``): each batch runs here, or split at a point on a peer.

The batch itself (which model, how many) is the rules' decision (``agent.scheduler.policies.rules``);
where it runs is the planner's (``agent.offload.planner``), asked per batch with what the board
knows now (``policy_options["offload_view"]``: its own tables and the live peers, live from the
peer table, in the simulator from the simulated peers and links):

* ``[offload] planner = "queue"`` (ours, the default): the option with the least ``max(finish, now +
  local part + backlog)``, the backlog being the work queued on this board behind the batch, per
  execution slot, among those that meet the batch's earliest deadline;
* ``planner = "latency"``: Neurosurgeon, each batch's own earliest finish (the backlog ignored).

Under a backlog (more queued than the batch) the batch is cut to the size that costs least per
request here: what the rules size for a deadline can cost more per request on a board where
batching does not pay, and with work to spare that is throughput lost. And when the batch's most
urgent requests cannot afford a peer's round trip, the requests with the most time left
(``Scheduler.latest``, named in ``Action.requests``) are weighed for a peer instead, while the urgent
ones take this board's next slot: the board serves what must be served soon, the peer what can wait for the round trip.

A batch sent to a peer reserves the uplink and the peer's time in the planner; its reservation is
returned when it is answered (:meth:`SplitPolicy.observe`). Where the view offers no peer (none
configured, none alive) every batch runs here, as under ``rules``.

Admission counts the peers (DESIGN.md: "whether the deadline can be met locally or on a known
peer"): a request this board's own test refuses is admitted when a peer could still finish it, the
whole input sent, by its deadline (:meth:`SplitPolicy.admit_elsewhere`: each peer is a virtual queue
of the work admitted for it, draining at its speed over its slots behind its advertised queue), and
it is noted for that peer and sent to it whole at once, whatever this board's slots are doing (taken
as it is queued, ``Scheduler.take_away``, ``Action.requests``; the live loop's sender thread sends
it): it needs no compute here. Deciding where at admission, not at dispatch, is what makes it hold: admitted for a peer but placed again when popped, such
requests went into batches here and missed (tried live); without it, admission fills the queue to
what this board alone can finish, the planner sees no backlog, and the peers idle while requests
are refused (BENCHMARKS.md, twelfth session).

Admission also counts what offload frees: a batch released early (its head done and sent) teaches
admission the time it held its slot, not its round trip (``Scheduler.observe``), so the queue model
drains as fast as the slots really do while batches leave, and the per-class slack learns what the
peers' side adds to a request's latency.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from agent.offload.planner import LOCAL, Planner, learn_slowdown
from agent.scheduler.policies.rules import RulePolicy
from agent.scheduler.policy import Action

if TYPE_CHECKING:
    from agent.scheduler.dispatcher import Dispatch, ModelLane, Scheduler
    from agent.scheduler.request import Request


#: Weight of a new local batch in the slowdown this policy prices local work with.
SLOWDOWN_ALPHA = 0.1
#: Requests admitted for a peer: the share of them allowed to miss, and the slack's step (a share
#: of the request's SLO) per request answered (:meth:`SplitPolicy._calibrate_away`).
AWAY_MISS = 0.02
AWAY_STEP = 0.01
#: The peer's slack fades toward 0 with this time constant (seconds) between lessons: a slack
#: raised by a spell of misses would otherwise shut the peer out for good, since only requests
#: admitted for it (none, once the slack is high) bring it down (:meth:`SplitPolicy._away_slack`).
AWAY_DECAY_S = 2.0


class SplitPolicy(RulePolicy):
    name = "split"

    def __init__(self, scheduler: "Scheduler") -> None:
        super().__init__(scheduler)
        self._scheduler = scheduler
        options = scheduler.policy_options
        self.view = options.get("offload_view")
        settings = options.get("offload")
        self.mode = getattr(settings, "planner", "queue")
        if self.mode not in ("queue", "latency"):
            raise ValueError(f"[offload] planner = {self.mode!r}: expected 'queue' or 'latency'")
        models = getattr(settings, "models", None)
        self.models = set(scheduler.lanes) if models is None else set(models) & set(scheduler.lanes)
        # Kept across lane changes (a policy is rebuilt then): the reservations of batches in flight.
        self.planner: Planner = options.setdefault("_split_planner", Planner())
        #: Where this policy's batches went: (target, split) -> batches, for operators and benchmarks.
        self.placed: dict[tuple[str, str | None], int] = options.setdefault("_split_placed", {})
        #: Per model, this board's batches' time over its table's (:meth:`_learn_slowdown`).
        self.slowdown: dict[str, float] = options.setdefault("_split_slowdown", {})
        #: Per peer, when the work admitted for it would be done (:meth:`admit_elsewhere`), and per
        #: model, the queued requests admitted for a peer: request id -> peer.
        self.virtual_free: dict[str, float] = options.setdefault("_split_virtual_free", {})
        self._item_cost: dict[int, tuple] = {}          # id(table) -> (table, least time per request)
        self.admitted_away: dict[str, dict[int, str]] = options.setdefault("_split_away", {})
        #: Per peer, the share of a request's SLO added to what the virtual queue predicts, and when
        #: it was last learned (it fades from there: :meth:`_away_slack`).
        self.away_slack: dict[str, float] = options.setdefault("_split_away_slack", {})
        self.away_slack_at: dict[str, float] = options.setdefault("_split_away_slack_at", {})


    # --- deciding ------------------------------------------------------------------------------

    def decide(self, scheduler: "Scheduler", now: float) -> tuple[Action | None, float]:
        action, wake_at = super().decide(scheduler, now)
        if action is None:
            return None, wake_at
        return self._place(action, scheduler.lanes[action.model], now), wake_at

    def away(self, scheduler: "Scheduler") -> Action | None:
        """A batch of the requests admitted for a peer (:meth:`admit_elsewhere`) still queued, to
        send to it whole now, whatever this board's slots are doing (``Scheduler.take_away``: the
        live loop and the simulator take it as the request is queued)."""
        if not self.admitted_away:
            return None
        for model, by_rid in list(self.admitted_away.items()):
            lane = scheduler.lanes.get(model)
            if lane is None:
                del self.admitted_away[model]
                continue
            for rid in [rid for rid in by_rid if rid not in lane.pending]:
                del by_rid[rid]                      # taken by a batch here, or expired
            if not by_rid:
                del self.admitted_away[model]
                continue
            peer = next(iter(by_rid.values()))
            rids = tuple(rid for rid, p in by_rid.items() if p == peer)[:lane.rule.max_batch]
            for rid in rids:
                del by_rid[rid]
            key = (peer, None)
            self.placed[key] = self.placed.get(key, 0) + 1
            return Action(model, len(rids), target=peer, requests=rids)
        return None

    # --- admission ----------------------------------------------------------------------------

    def admit_elsewhere(self, lane: "ModelLane", request: "Request") -> bool:
        """Whether a peer could finish ``request``, which this board's admission refuses, by its
        deadline, the whole input sent (module docstring); if so it is noted for that peer, and its
        work added to the peer's virtual queue."""
        if self.view is None or lane.name not in self.models or self.mode != "queue":
            return False                               # Neurosurgeon ("latency") places at dispatch only
        now = request.arrival
        planner = self.planner
        planner.refresh(self.view.peer_snapshots(now))
        best = None
        for peer in planner.peers.values():
            for cost in peer.offers.get(lane.name, ()):
                if cost.split is not None:
                    continue                           # no compute here for what this board cannot take
                work = self._per_item_s(cost.tail) / max(peer.slots, 1)
                starts = max(self.virtual_free.get(peer.device, now), now + peer.queue_s.get(lane.name, 0.0),
                             peer.link_free_at)
                finish = starts + work + cost.bytes_per_item / max(peer.bandwidth_Bps, 1.0) + peer.rtt_s
                finish += self._away_slack(peer.device, now) * (request.deadline - request.arrival)
                if finish <= request.deadline and (best is None or finish < best[0]):
                    best = (finish, peer.device, starts + work)
        if best is None:
            return False
        self.virtual_free[best[1]] = best[2]
        self.admitted_away.setdefault(lane.name, {})[request.rid] = best[1]
        return True

    def _per_item_s(self, table) -> float:
        """A peer's work per request in its virtual queue: its profile's least time per request over
        the batch sizes it profiled. The queue matters only under load, and a loaded peer batches;
        charging each request a batch of one's time made the board refuse about half of what the
        peer could take (bench offload: ours admitted less than full offload on the same trace).
        The per-peer slack, calibrated on misses, corrects what this leaves optimistic."""
        key = id(table)
        cached = self._item_cost.get(key)
        if cached is None or cached[0] is not table:
            sizes = [int(b) for b in table.batch_sizes] or [1]
            cached = self._item_cost[key] = (table, min(table.predict(b) / b for b in range(1, max(sizes) + 1)))
        return cached[1]

    def alone(self, scheduler: "Scheduler", lane: "ModelLane", request: "Request") -> Action | None:
        action = super().alone(scheduler, lane, request)
        if action is None or self.view is None or lane.name not in self.models:
            return action
        self.planner.refresh(self.view.peer_snapshots(request.arrival))
        return self._routed(action, self._choose(lane.name, 1, request.arrival, request.deadline, 0.0))

    def _place(self, action: Action, lane: "ModelLane", now: float) -> Action:
        if self.view is None or lane.name not in self.models:
            return action
        queued = len(lane.queue)
        n = min(action.batch_size, queued)
        if n < 1:
            return action
        if self.mode == "queue" and queued > n:
            # A backlog: throughput is what counts, so the batch is the size that costs least per
            # request (the rules may size it for a deadline, on a board where batching costs more
            # per request than it saves); requests beyond it wait for the next slot or peer.
            efficient = self._efficient_size(lane.name, n)
            if efficient < n:
                n = efficient
                action = action._replace(batch_size=n)
        backlog_s = self._backlog_s(lane, n)
        self.planner.refresh(self.view.peer_snapshots(now))
        placement = self._choose(lane.name, n, now, lane.queue.earliest_deadline(), backlog_s)
        if (placement is not None and placement.local and self.mode == "queue" and queued >= 2 * n):
            # The most urgent requests cannot afford the round trip, but the queue holds more than
            # this batch: the requests with the most time left may go while the urgent ones take
            # this board's next free slot (module docstring).
            latest = self._scheduler.latest(lane, n)
            away = self._choose(lane.name, n, now, min(r.deadline for r in latest), backlog_s)
            if away is not None and not away.local:
                return self._routed(action, away)._replace(requests=tuple(r.rid for r in latest))
        return self._routed(action, placement)

    def _routed(self, action: Action, placement) -> Action:
        """``action`` placed as ``placement`` says (``None``: no peer weighed, as it is); counted,
        and a peer's share of the work reserved in the planner."""
        if placement is None:
            return action
        key = (placement.target, placement.split)
        self.placed[key] = self.placed.get(key, 0) + 1
        if placement.local:
            return action
        self.planner.commit(placement)
        return action._replace(target=placement.target, split=placement.split)

    def _efficient_size(self, model: str, n: int) -> int:
        """The batch size up to ``n`` with the least predicted time per request here (the largest
        of equals)."""
        table = self.view.local_table(model)
        if table is None:
            return n
        return min(range(1, n + 1), key=lambda b: (table.predict(b) / b, -b))

    def _choose(self, model: str, n: int, now: float, deadline: float, backlog_s: float):
        """The planner's placement for a batch of ``n`` (not yet committed; the planner refreshed by
        the caller, once a decision), or ``None`` with no peer to weigh."""
        view, planner = self.view, self.planner
        if not planner.peers:
            return None
        return planner.choose(model, n, now, deadline, view.local_table(model),
                              backlog_s if self.mode == "queue" else 0.0, self.slowdown.get(model, 1.0))

    def _backlog_s(self, lane: "ModelLane", n: int) -> float:
        """The work queued here behind a batch of ``n`` from ``lane``, per execution slot, as
        admission prices it (the profile where a lane has no admission)."""
        scheduler = self._scheduler
        work = 0.0
        for other in scheduler.lanes.values():
            queued = len(other.queue) - (n if other is lane else 0)
            if queued <= 0:
                continue
            if other.admission is not None:
                work += other.admission.work_s(queued)
            else:
                table = self.view.local_table(other.name) if self.view is not None else None
                if table is not None:
                    work += queued * table.predict(1)
        return work / max(1, scheduler.max_concurrent)

    # --- learning ------------------------------------------------------------------------------

    def observe(self, dispatch: "Dispatch", now: float) -> None:
        action = dispatch.action
        if action.target == LOCAL:
            super().observe(dispatch, now)     # the rules learn from local batches only
            self._learn_slowdown(dispatch, now)
            return
        if action.requests:
            self._calibrate_away(action.target, dispatch, now)
        peer = self.planner.peers.get(action.target)
        if peer is None:
            return
        for cost in peer.offers.get(action.model, ()):
            if cost.split == action.split:
                self.planner.answered(action.target, cost.tail.predict(len(dispatch.requests)))
                return


    def _calibrate_away(self, peer: str, dispatch: "Dispatch", now: float) -> None:
        """Requests admitted for ``peer`` were answered: each one late raises the peer's slack (a
        share of the request's SLO added to every prediction for it), each one in time lowers it, so
        that about ``AWAY_MISS`` of them miss, whatever the virtual queue leaves out (the peer's own
        load, its CPU share, the broker). As admission's slack does for this board (admission.py)."""
        slack = self._away_slack(peer, now)
        for request in dispatch.requests:
            if now > request.deadline:
                slack = min(slack + (1.0 - AWAY_MISS) * AWAY_STEP, 1.0)
            else:
                slack = max(slack - AWAY_MISS * AWAY_STEP, 0.0)
        self.away_slack[peer], self.away_slack_at[peer] = slack, now

    def _away_slack(self, peer: str, now: float) -> float:
        """``peer``'s slack now: as last learned, faded by ``exp(-elapsed / AWAY_DECAY_S)``. Why it
        fades: it falls only as requests admitted for the peer come back in time, and a slack
        raised high admits none, so without it one bad spell (a burst that queued on the peer while
        the board's view of it was stale) kept a live peer idle for the rest of the run (seen in
        ``bench offload``: the slack at 0.7 of the SLO after the first 3 s, nothing sent after).
        Faded, the board tries the peer again within seconds, and misses raise it again if the
        peer is still short."""
        slack = self.away_slack.get(peer, 0.0)
        if slack <= 0.0:
            return 0.0
        elapsed = now - self.away_slack_at.get(peer, now)
        return slack * math.exp(-max(elapsed, 0.0) / AWAY_DECAY_S)

    def _learn_slowdown(self, dispatch: "Dispatch", now: float) -> None:
        """How much longer this board's batches take than its table says (an EWMA of the ratio,
        local batches only: an offloaded batch's hold of the slot says nothing of it). Measured at
        start, a table misses what the board meets later, a CPU quota above all: a short run fits
        inside the quota's period, a steady load does not."""
        table = self.view.local_table(dispatch.model) if self.view is not None else None
        if table is None:
            return
        learn_slowdown(self.slowdown, dispatch.model, now - dispatch.started, table.predict(len(dispatch.requests)),
                       SLOWDOWN_ALPHA)


def build(scheduler: "Scheduler") -> SplitPolicy:
    return SplitPolicy(scheduler)


__all__ = ["SplitPolicy", "build"]
