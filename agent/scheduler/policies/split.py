"""The split decision (``policy = "split"``): each batch runs here, or split at a point on a peer.

The batch itself (which model, how many) is the rules' decision (``agent.scheduler.policies.rules``);
where it runs is the planner's (``agent.offload.planner``), asked per batch with what the board
knows now (``policy_options["offload_view"]``: its own tables and the live peers, live from the
peer table, in the simulator from the simulated peers and links):

* ``[offload] planner = "queue"`` (ours, the default): the option with the least ``max(finish, now +
  local part + backlog)``, the backlog being the work queued on this board behind the batch, per
  execution slot, among those that meet the batch's earliest deadline;
* ``planner = "latency"``: Neurosurgeon, each batch's own earliest finish (the backlog ignored).

A batch sent to a peer reserves the uplink and the peer's time in the planner; its reservation is
returned when it is answered (:meth:`SplitPolicy.observe`). Where the view offers no peer (none
configured, none alive) every batch runs here, as under ``rules``.

Admission counts what offload frees: a batch released early (its head done and sent) teaches
admission the time it held its slot, not its round trip (``Scheduler.observe``), so the queue model
drains as fast as the slots really do while batches leave, and the per-class slack learns what the
peers' side adds to a request's latency.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from agent.offload.planner import LOCAL, Planner
from agent.scheduler.policies.rules import RulePolicy
from agent.scheduler.policy import Action

if TYPE_CHECKING:
    from agent.scheduler.dispatcher import Dispatch, ModelLane, Scheduler
    from agent.scheduler.request import Request


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

    # --- deciding ------------------------------------------------------------------------------

    def decide(self, scheduler: "Scheduler", now: float) -> tuple[Action | None, float]:
        action, wake_at = super().decide(scheduler, now)
        if action is None:
            return None, wake_at
        return self._place(action, scheduler.lanes[action.model], now), wake_at

    def alone(self, scheduler: "Scheduler", lane: "ModelLane", request: "Request") -> Action | None:
        action = super().alone(scheduler, lane, request)
        if action is None or self.view is None or lane.name not in self.models:
            return action
        return self._routed(action, self._choose(lane.name, 1, request.arrival, request.deadline, 0.0))

    def _place(self, action: Action, lane: "ModelLane", now: float) -> Action:
        if self.view is None or lane.name not in self.models:
            return action
        n = min(action.batch_size, len(lane.queue))
        if n < 1:
            return action
        return self._routed(action, self._choose(lane.name, n, now, lane.queue.earliest_deadline(),
                                                 self._backlog_s(lane, n)))

    @staticmethod
    def _routed(action: Action, placement) -> Action:
        if placement is None or placement.local:
            return action
        return action._replace(target=placement.target, split=placement.split)

    def _choose(self, model: str, n: int, now: float, deadline: float, backlog_s: float):
        """The planner's placement for a batch of ``n`` (committed when it goes to a peer), or
        ``None`` with no peer to weigh."""
        view, planner = self.view, self.planner
        planner.refresh(view.peer_snapshots(now))
        if not planner.peers:
            return None
        placement = planner.choose(model, n, now, deadline, view.local_table(model),
                                   backlog_s if self.mode == "queue" else 0.0)
        if placement is None:
            return None
        key = (placement.target, placement.split)
        self.placed[key] = self.placed.get(key, 0) + 1
        planner.commit(placement)
        return placement

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
            return
        peer = self.planner.peers.get(action.target)
        if peer is None:
            return
        for cost in peer.offers.get(action.model, ()):
            if cost.split == action.split:
                self.planner.answered(action.target, cost.tail.predict(len(dispatch.requests)))
                return


def build(scheduler: "Scheduler") -> SplitPolicy:
    return SplitPolicy(scheduler)


__all__ = ["SplitPolicy", "build"]
