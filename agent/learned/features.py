"""The learned policy's state: a versioned feature vector read from the scheduler at a decision.

The vector is what the network sees, so its layout is part of a shipped policy's contract: a policy
card names :data:`FEATURE_SCHEMA_VERSION` and the feature names it was trained on, and the agent
refuses a card whose schema differs (``agent.learned.card``). Change a feature, its order or its
units and bump the version.

Per lane (in the card's lane order), then a few board-wide features:

* ``queue``: requests queued; ``head_slack_ms``: the head's deadline (the next to pop) minus now;
  ``tight_slack_ms``: the earliest deadline queued minus now; ``oldest_wait_ms``: how long the oldest
  queued request has waited (slacks and waits clipped to ``SLACK_CLIP_MS``; an empty queue reads
  the clip and 0);
* ``rate_<band>``: admitted arrivals per second in each SLO band (``ModelLane.arrival_rates``, kept
  at admission, decayed to now);
* ``busy``, ``free``: instances running a batch, idle;
* ``batch_ms_b<k>``: the profile's predicted time of a batch of each bucket size (admission's table,
  else the rule's); ``slowdown``: admission's learned observed/profiled ratio (1 without admission);
* ``goodput``: requests answered in time per second, an EWMA the policy keeps from ``observe``.

Board-wide: ``slots_free`` (execution slots not in flight), ``urgent`` (1 while a request due
within the tightest recent SLO waits: the hold cap binds).

Everything comes from counters the queue and the scheduler keep (the queue's head and earliest
deadline, the lane's rates and instance lists): no pass over the queued requests. The vector is
written into a preallocated float32 buffer (:meth:`FeatureBuilder.fill`) by the compiled core
(``agent.core.fill_features``; its pure twin ``agent.core.pure.policy_features``).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np

from agent.core import fill_features
from agent.scheduler.dispatcher import ARRIVAL_BANDS_MS, ARRIVAL_TAU_S

if TYPE_CHECKING:
    from agent.scheduler.dispatcher import ModelLane, Scheduler

#: Bump on any change to the names, order or units below.
FEATURE_SCHEMA_VERSION = 1
#: Slack and wait features are clipped to +-this (ms): beyond it a request is as good as unhurried.
SLACK_CLIP_MS = 500.0
#: The batch sizes whose predicted time is a feature (and the action space's buckets).
BATCH_BUCKETS = (1, 2, 4, 8)
#: Time constant of the goodput EWMA (s).
GOODPUT_TAU_S = 0.5

_BANDS = (f"rate_lt{int(ARRIVAL_BANDS_MS[0])}ms",) + tuple(
    f"rate_{int(lo)}to{int(hi)}ms" for lo, hi in zip(ARRIVAL_BANDS_MS, ARRIVAL_BANDS_MS[1:])) + (
    f"rate_ge{int(ARRIVAL_BANDS_MS[-1])}ms",)
LANE_FEATURES = ("queue", "head_slack_ms", "tight_slack_ms", "oldest_wait_ms", *_BANDS, "busy", "free",
                 *(f"batch_ms_b{b}" for b in BATCH_BUCKETS), "slowdown", "goodput")
BOARD_FEATURES = ("slots_free", "urgent")


def feature_names(lanes: Sequence[str]) -> list[str]:
    """The vector's names for ``lanes`` in order: ``<lane>.<feature>``, then the board's."""
    return [f"{lane}.{name}" for lane in lanes for name in LANE_FEATURES] + list(BOARD_FEATURES)


class FeatureBuilder:
    """Writes the feature vector of a scheduler's lanes (in ``lanes`` order) into :attr:`buffer`.

    Also keeps each lane's goodput EWMA, fed by :meth:`observe` with each answered batch."""

    def __init__(self, lanes: Sequence[str]) -> None:
        self.lanes = tuple(lanes)
        self.names = feature_names(self.lanes)
        self.buffer = np.zeros(len(self.names), dtype=np.float32)
        self._goodput = {lane: [0.0, 0.0] for lane in self.lanes}     # lane -> [rate, as of]
        self._batch_ms: dict[str, tuple[float, ...]] = {}
        self._ordered: list | None = None          # the goodput entries in lane order (shared lists)
        self._batch_list: list = []

    @property
    def size(self) -> int:
        return len(self.names)

    def observe(self, lane: str, in_time: int, now: float) -> None:
        """``in_time`` requests of ``lane`` were answered within their deadline at ``now``."""
        entry = self._goodput.get(lane)
        if entry is None:
            return
        entry[0] = entry[0] * math.exp(-max(0.0, now - entry[1]) / GOODPUT_TAU_S) + in_time / GOODPUT_TAU_S
        entry[1] = now

    def _profile_ms(self, lane: "ModelLane") -> tuple[float, ...]:
        cached = self._batch_ms.get(lane.name)
        if cached is None:
            table = lane.admission.table if lane.admission is not None else getattr(lane.rule, "table", None)
            cached = tuple(1000.0 * table.predict(b) if table is not None else 0.0 for b in BATCH_BUCKETS)
            self._batch_ms[lane.name] = cached
        return cached

    def bound(self, objects: list) -> tuple[list, list]:
        """The goodput entries and the profiles' bucket times of ``objects`` (the scheduler's lanes
        in :attr:`lanes` order), as :meth:`fill` passes them: the lists ``observe`` keeps current,
        for a caller that writes the vector itself (``agent.core.PolicyDecider``)."""
        if self._ordered is None:
            self._ordered = [self._goodput[name] for name in self.lanes]
            self._batch_list = [self._profile_ms(lane) for lane in objects]
        return self._ordered, self._batch_list

    def fill(self, scheduler: "Scheduler", now: float, objects: list | None = None) -> np.ndarray:
        """The vector at ``now`` in :attr:`buffer` (returned; overwritten by the next call), written
        by ``agent.core.fill_features`` (compiled, or its pure twin); ``objects``: the scheduler's
        lanes in :attr:`lanes` order, when the caller keeps them."""
        if objects is None:
            lanes = scheduler.lanes
            objects = [lanes[name] for name in self.lanes]
        self.bound(objects)
        fill_features(objects, self._ordered, self._batch_list, scheduler, now, SLACK_CLIP_MS, ARRIVAL_TAU_S,
                      GOODPUT_TAU_S, self.buffer)
        return self.buffer


__all__ = ["FEATURE_SCHEMA_VERSION", "SLACK_CLIP_MS", "BATCH_BUCKETS", "LANE_FEATURES", "BOARD_FEATURES",
           "feature_names", "FeatureBuilder"]
