"""A fixed offload plan (``policy = "offload_fixed"``): the rules' decision, a share of the batches
sent to one peer at one split point. For tests, demos and as a baseline, not a decision policy
(the split decision, Neurosurgeon's argmin over split points, peers and queues, is its own policy).

From ``[offload]``: ``peer`` (a device id), ``split`` (a split point of the model's card, or none:
the whole input goes), ``share`` (the fraction of batches sent: the k-th batch of a model goes when
``floor(k * share)`` steps, so 0.5 sends every other batch and 1 every batch) and ``models`` (which
models; default every model). What the plan does not cover, and every batch when no peer is set,
runs here as under ``rules``. Whether the peer is alive is not this policy's concern: the offload
executor runs a batch here at once when its peer is gone (``agent.runtime.offload_executor``).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from agent.scheduler.policies.rules import RulePolicy
from agent.scheduler.policy import Action

if TYPE_CHECKING:
    from agent.scheduler.dispatcher import Dispatch, ModelLane, Scheduler
    from agent.scheduler.request import Request


class FixedOffloadPolicy(RulePolicy):
    name = "offload_fixed"

    def __init__(self, scheduler: "Scheduler") -> None:
        super().__init__(scheduler)
        plan = scheduler.policy_options.get("offload")
        self.peer = getattr(plan, "peer", None)
        self.split = getattr(plan, "split", None)
        self.share = float(getattr(plan, "share", 0.0)) if self.peer else 0.0
        models = getattr(plan, "models", None)
        self.models = set(scheduler.lanes) if models is None else set(models) & set(scheduler.lanes)
        self._count = {name: 0 for name in self.models}

    def _route(self, action: Action) -> Action:
        """``action``, sent to the peer if the plan takes this batch."""
        k = self._count.get(action.model)
        if k is None or self.share <= 0:
            return action
        self._count[action.model] = k + 1
        if math.floor((k + 1) * self.share) == math.floor(k * self.share):
            return action
        return action._replace(target=self.peer, split=self.split)

    def decide(self, scheduler: "Scheduler", now: float) -> tuple[Action | None, float]:
        action, wake_at = super().decide(scheduler, now)
        return (None if action is None else self._route(action)), wake_at

    def alone(self, scheduler: "Scheduler", lane: "ModelLane", request: "Request") -> Action | None:
        action = super().alone(scheduler, lane, request)
        return None if action is None else self._route(action)

    def observe(self, dispatch: "Dispatch", now: float) -> None:
        if dispatch.action.target == "local":
            super().observe(dispatch, now)     # the rules learn from local batches only


def build(scheduler: "Scheduler") -> FixedOffloadPolicy:
    return FixedOffloadPolicy(scheduler)
