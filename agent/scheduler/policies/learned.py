"""The learned policy (``policy = "learned"``): a distilled network decides each dispatch.

``[agent] policy_path`` names a policy directory (``policies/<board-class>/``: a card and its
weights, ``agent.learned.card``), checked at load against this agent's feature schema, action space
and lanes. At each decision the policy fills the feature vector (``agent.learned.features``) and the
feasibility mask (``agent.learned.actions``), runs the network's forward pass (``agent.learned.net``)
and takes the allowed action with the highest logit: idle, or a lane and a batch bucket. All four
are one call of the compiled core (``agent.core.PolicyDecider``, bound to the lanes at build), so no
Python runs between them.

What it leaves to the mechanism around it, as every policy does: shedding and admission (the lanes
keep their config), and the idle board's path (``alone``: a lone request on an idle board starts at
once where its lane's rule would, as the rules policy does; the network decides everything queued).

Training drives the same class: ``policy_options["learned_chooser"]`` (a callable ``(features, mask,
now) -> index``) replaces the network, so the teacher acts in the simulator through exactly the
features and decoding the board runs (``tools/train_policy.py``).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

from agent.core import PolicyDecider
from agent.learned.actions import IDLE, ActionSpace
from agent.learned.card import LoadedPolicy, load_policy
from agent.learned.features import ARRIVAL_TAU_S, GOODPUT_TAU_S, SLACK_CLIP_MS, FeatureBuilder
from agent.scheduler.policy import Action

if TYPE_CHECKING:
    import numpy as np

    from agent.scheduler.dispatcher import Dispatch, ModelLane, Scheduler
    from agent.scheduler.request import Request

#: ``(features, mask, now) -> action index``: what decides instead of the network (training).
Chooser = Callable[["np.ndarray", "np.ndarray", float], int]
#: The idle tick without a card (a chooser only).
DEFAULT_IDLE_TICK_S = 0.001
_INF = math.inf


class LearnedPolicy:
    name = "learned"

    def __init__(self, scheduler: "Scheduler", loaded: LoadedPolicy | None = None,
                 chooser: Chooser | None = None, lanes: tuple[str, ...] | None = None) -> None:
        if loaded is None and chooser is None:
            raise ValueError("policy = 'learned' needs a policy directory ([agent] policy_path) or a chooser")
        self.loaded = loaded
        lanes = loaded.lanes if loaded is not None else (lanes or tuple(scheduler.lanes))
        missing = [lane for lane in lanes if lane not in scheduler.lanes]
        if missing or len(lanes) != len(scheduler.lanes):
            raise ValueError(f"policy 'learned': trained for lanes {list(lanes)}, the scheduler has {list(scheduler.lanes)}")
        self.features = FeatureBuilder(lanes)
        self.space = ActionSpace(lanes, loaded.buckets) if loaded is not None else ActionSpace(lanes)
        self.idle_tick_s = loaded.idle_tick_s if loaded is not None else DEFAULT_IDLE_TICK_S
        self.chooser: Chooser | None = chooser
        if chooser is not None and hasattr(chooser, "bind"):
            chooser.bind(scheduler)      # a chooser that reads the scheduler itself (a rule, in training)
        self._alone = {name: Action(name, 1) for name in scheduler.lanes}
        # The lane objects in the card's order: this policy is built again when the lanes change.
        self._lanes = [scheduler.lanes[name] for name in lanes]
        # Each action index's Action (before the batch bound) and lane, for decoding.
        self._index_starts = [None] + [(action, lane) for action, lane in
                                       zip(self.space.actions[1:], (lane for lane in self._lanes for _ in self.space.buckets))]
        self._decider = None
        if loaded is not None:
            loaded.net.core.bind(self.features.buffer, self.space.mask_u8)
            if chooser is None:
                # The whole decision (mask, features, forward, masked argmax) in one call of the
                # compiled core (or its pure twin), on this policy's buffers.
                goodput, batch_ms = self.features.bound(self._lanes)
                self._decider = PolicyDecider(self._lanes, goodput, batch_ms, self.space.buckets, loaded.net.core,
                                              self.features.buffer, self.space.mask_u8, SLACK_CLIP_MS,
                                              ARRIVAL_TAU_S, GOODPUT_TAU_S)

    def choose(self, features: "np.ndarray", mask: "np.ndarray", now: float) -> int:
        if self.chooser is not None:
            return self.chooser(features, mask, now)
        return self.loaded.net.core.act_bound()        # features and mask are the bound buffers

    def decide(self, scheduler: "Scheduler", now: float) -> tuple[Action | None, float]:
        decider = self._decider
        if decider is not None:
            index = decider.decide(scheduler, now)          # -1: the mask allows no start
        else:
            space = self.space
            space.fill_mask(scheduler, self._lanes)
            index = self.choose(self.features.fill(scheduler, now, self._lanes), space.mask, now) if space.starts else -1
        if index > IDLE:
            # A batch starts: the driver polls again at once, so this wake time is not used.
            action, lane = self._index_starts[index]
            cap = lane.rule.max_batch
            return (action if action.batch_size <= cap else Action(action.model, cap)), _INF
        wake_at = now + self.idle_tick_s if index == IDLE else math.inf
        for lane in self._lanes:      # nothing starts: wake to expire what can no longer finish
            if len(lane.queue) and not lane.fifo:
                wake_at = min(wake_at, lane.queue.earliest_deadline() - lane.min_latency_s)
        return None, wake_at

    def alone(self, scheduler: "Scheduler", lane: "ModelLane", request: "Request") -> Action | None:
        if lane.starts_alone and request.deadline >= request.arrival + lane.min_latency_s:
            return self._alone[lane.name]
        return None

    def dispatched(self, action: Action, n: int, now: float) -> None:
        pass

    def observe(self, dispatch: "Dispatch", now: float) -> None:
        in_time = sum(1 for request in dispatch.requests if now <= request.deadline)
        self.features.observe(dispatch.model, in_time, now)


def build(scheduler: "Scheduler") -> LearnedPolicy:
    options = scheduler.policy_options
    chooser = options.get("learned_chooser")
    path = options.get("policy_path")
    if path is None and chooser is None:
        raise ValueError("policy = 'learned': no policy directory; set [agent] policy_path (e.g. policies/cpu-2core)")
    loaded = load_policy(path, list(scheduler.lanes)) if path is not None else None
    return LearnedPolicy(scheduler, loaded, chooser, options.get("learned_lanes"))
