"""The learned policy's discrete action space, its feasibility mask and decoding to an ``Action``.

Index 0 is ``idle``: leave the free slots idle now (a held batch; the policy is asked again after
``idle_tick_s`` or at the next arrival or completion). Then, per lane in the card's order and per
batch bucket (``agent.learned.features.BATCH_BUCKETS``), ``<lane>:b<k>``: start a batch of at most
``k`` of the lane's queued requests on any free instance of it. Starting while another batch runs
opens another concurrent instance; idling leaves it closed: the concurrency decision BCEdge learns.

Versioned (:data:`ACTION_SCHEMA_VERSION`) with its names in the policy card, so the offload
target and the early exit are added later as more indices under a new version; a card trained on
another space is refused at load.

The mask marks what may be taken now: a lane with a queued request, a free instance and a free
slot; a bucket not above the lane's ``rule.max_batch`` (its batch buffers) and, beyond the first,
one whose next-smaller bucket is below the queue's length (larger buckets would take the same batch).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from agent.core import fill_mask
from agent.learned.features import BATCH_BUCKETS
from agent.scheduler.policy import Action

if TYPE_CHECKING:
    from agent.scheduler.dispatcher import Scheduler

#: Bump on any change to the indices' meaning.
ACTION_SCHEMA_VERSION = 1
IDLE = 0


def action_names(lanes: Sequence[str], buckets: Sequence[int] = BATCH_BUCKETS) -> list[str]:
    """The names of the action indices for ``lanes``: ``idle``, then ``<lane>:b<k>``."""
    return ["idle"] + [f"{lane}:b{b}" for lane in lanes for b in buckets]


class ActionSpace:
    """Indices to actions for a scheduler's lanes (in ``lanes`` order), with a preallocated mask."""

    def __init__(self, lanes: Sequence[str], buckets: Sequence[int] = BATCH_BUCKETS) -> None:
        self.lanes = tuple(lanes)
        self.buckets = tuple(int(b) for b in buckets)
        self.names = action_names(self.lanes, self.buckets)
        self.mask = np.zeros(len(self.names), dtype=bool)
        self.mask_u8 = self.mask.view(np.uint8)       # the same memory, as the compiled forward reads it
        self.starts = 0                               # the last mask's allowed starts (all but idle)
        self._actions: list[Action | None] = [None]
        for lane in self.lanes:
            for b in self.buckets:
                self._actions.append(Action(lane, b))
        #: The ``Action`` of each index before the lane's batch bound (``None`` for idle).
        self.actions = tuple(self._actions)

    @property
    def size(self) -> int:
        return len(self.names)

    def fill_mask(self, scheduler: "Scheduler", objects: list | None = None) -> np.ndarray:
        """:attr:`mask` for the scheduler now (returned; overwritten by the next call), written by
        ``agent.core.fill_mask`` (compiled, or its pure twin). ``idle`` is always allowed; no other
        index is when no slot is free. ``objects``: the scheduler's lanes in :attr:`lanes` order,
        when the caller keeps them."""
        if objects is None:
            lanes = scheduler.lanes
            objects = [lanes[name] for name in self.lanes]
        self.starts = fill_mask(objects, self.buckets, scheduler.in_flight, scheduler.max_concurrent, self.mask_u8)
        return self.mask

    def any_start(self) -> bool:
        """Whether the last :meth:`fill_mask` allowed anything but idling."""
        return self.starts > 0

    def decode(self, index: int, scheduler: "Scheduler") -> Action | None:
        """The ``Action`` of ``index`` (``None`` for idle), its batch bounded by the lane's ``max_batch``."""
        if index == IDLE:
            return None
        action = self._actions[index]
        cap = scheduler.lanes[action.model].rule.max_batch
        if action.batch_size > cap:
            return Action(action.model, cap)
        return action


__all__ = ["ACTION_SCHEMA_VERSION", "IDLE", "action_names", "ActionSpace"]
