"""The hand-written policy (``policy = "rules"``, the default): each model's batching rule, EDF
across models.

Per model, the rule its config names (``[models.batching] rule``: the compiled core's
``deadline_aware``, ``fixed`` and ``dynamic``, or a baseline of ``agent.scheduler.baselines``)
says how big a batch to take now, or to hold and until when (``plan(queue, now)``). Across models,
a free slot goes to the model whose head request is most urgent: higher priority first, then the
earlier queue key (the deadline, or the EDF horizon; see ``agent.scheduler.dispatcher``), among
the models whose rule says "now" and that have an idle instance.

While a request due within the tightest recent SLO waits, a batch of a model under admission
control takes at most that model's hold cap (``ModelLane.batch_cap``, kept by the scheduler since
admission predicts with it; why, and the measured effect: ``agent.scheduler.dispatcher`` and
BENCHMARKS.md).

On an idle board, a request whose lane's rule would dispatch a lone request at once
(``ModelLane.starts_alone``) and that is not to be shed starts at once, without the queue.

Every rule has the hooks ``dispatched(n, now)`` and ``observe(batch_size, duration_s, met)``
(no-ops for the stateless ones): DeepRT's DisBatcher marks its window served when its batch is
popped, Clipper's AIMD adapts its batch size to whether the batch met every deadline in it.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from agent.scheduler.policy import Action

if TYPE_CHECKING:
    from agent.scheduler.dispatcher import Dispatch, ModelLane, Scheduler
    from agent.scheduler.request import Request


class RulePolicy:
    name = "rules"

    def __init__(self, scheduler: "Scheduler") -> None:
        self._lanes = list(scheduler.lanes.values())
        self._by_name = scheduler.lanes
        # One action per lane for the idle board's batch of one (an Action is immutable).
        self._alone = {lane.name: Action(lane.name, 1) for lane in self._lanes}

    def decide(self, scheduler: "Scheduler", now: float) -> tuple[Action | None, float]:
        wake_at = math.inf
        best: ModelLane | None = None
        best_key = None
        best_take = 0
        slot_free = scheduler.in_flight < scheduler.max_concurrent
        for lane in self._lanes:
            queue = lane.queue
            if not len(queue):
                continue
            if not slot_free or not lane.free_instances:
                # Busy: a finished batch prompts a new decision; meanwhile wake to expire the overdue
                # (a fifo lane expires nothing, and its keys are arrivals: waking for them would spin).
                if not lane.fifo:
                    wake_at = min(wake_at, queue.earliest_deadline() - lane.min_latency_s)
                continue
            take, lane_wake = lane.rule.plan(queue, now)
            if take > lane.batch_cap and scheduler.urgent_waiting(now):
                take = lane.batch_cap
            if take > 0:
                key = (-queue.head_priority(), queue.head_key())
                if best is None or key < best_key:
                    best, best_key, best_take = lane, key, take
            else:
                wake_at = min(wake_at, lane_wake)
        if best is None:
            return None, wake_at
        return Action(best.name, best_take), wake_at

    def alone(self, scheduler: "Scheduler", lane: "ModelLane", request: "Request") -> Action | None:
        if lane.starts_alone and request.deadline >= request.arrival + lane.min_latency_s:
            return self._alone[lane.name]
        return None

    def dispatched(self, action: Action, n: int, now: float) -> None:
        self._by_name[action.model].rule.dispatched(n, now)

    def observe(self, dispatch: "Dispatch", now: float) -> None:
        requests = dispatch.requests
        if len(requests) == 1:
            met = now <= requests[0].deadline
        elif requests:
            met = now <= min(request.deadline for request in requests)
        else:
            return
        lane = self._by_name.get(dispatch.model)
        if lane is not None:    # None: its model was unloaded between the scheduler's look and this one
            lane.rule.observe(len(requests), now - dispatch.started, met)


def build(scheduler: "Scheduler") -> RulePolicy:
    return RulePolicy(scheduler)
