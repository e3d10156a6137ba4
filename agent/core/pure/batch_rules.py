"""Pure-Python twin of ``agent.core._batch_rules`` (``_core/agent/core/_batch_rules.pyx``).

The exact rules, and why, are documented here; the compiled classes are the same logic with the
same floating-point expressions. Their interface, ``BatchRule``, is in ``agent.core.types``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from agent.core.types import (
    BatchPlan,
    BatchRule,
    _check_batch_size,
    _check_duration,
    _validated_preferred,
)

__all__ = ["FixedBatch", "DynamicBatch", "DeadlineAwareBatch"]

_INF = math.inf
_IDLE = BatchPlan(0, _INF)


class FixedBatch(BatchRule):
    """Dispatch exactly ``size`` requests, and only when that many are queued.

    Triton's plain fixed batching and DeepRT's "BATCH" baseline. While fewer are queued it
    waits, but not past ``queue.earliest_deadline()``, so the scheduler wakes in time to answer
    expired requests instead of holding them until the batch fills.
    """

    __slots__ = ("_size",)

    def __init__(self, size: int) -> None:
        self._size = _check_batch_size("size", size)
        self._max_batch = self._size

    @property
    def size(self) -> int:
        return self._size

    def plan(self, queue: Any, now: float) -> BatchPlan:
        n = len(queue)
        if n == 0:
            return _IDLE
        if n >= self._size:
            return BatchPlan(self._size, _INF)
        return BatchPlan(0, queue.earliest_deadline())

    def describe(self) -> dict:
        return {"name": "FixedBatch", "max_batch": self._max_batch, "size": self._size}

    def __repr__(self) -> str:
        return f"FixedBatch(size={self._size})"


class DynamicBatch(BatchRule):
    """Triton's dynamic batcher (``dynamic_batch_scheduler.cc``, ``GetDynamicBatch``).

    With ``n = len(queue)``, ``limit = min(n, max_batch)``, ``best`` = the largest preferred
    size ``<= limit`` (0 if none) and ``exceeded = max_queue_delay_s > 0 and
    oldest_arrival + max_queue_delay_s <= now``:

    1. ``best > 0`` and not ``exceeded``: take ``best``. A preferred size is formed: Triton
       dispatches it at once, even when more requests are queued.
    2. ``limit >= max(preferred)`` (the batch cannot grow into a larger preferred size), or
       ``exceeded``, or ``max_queue_delay_s == 0``: take ``limit``, whatever is pending.
    3. otherwise wait: take 0, ``wake_at = min(oldest_arrival + max_queue_delay_s,
       earliest_deadline)``; Triton likewise wakes at the queue delay or the closest request
       timeout, whichever is first.

    ``preferred_sizes`` are sorted and deduplicated (Triton keeps a std::set) and default to
    ``(max_batch,)`` (Triton's config normalisation), so ``max_queue_delay_s = 0`` with no
    preferred sizes is the bare ``dynamic_batching {}``: the largest batch available now, no
    waiting. Triton's own test is ``now - oldest >= delay``; the algebraically equal
    ``oldest + delay <= now`` is used so that planning again exactly at ``wake_at`` dispatches
    (no floating-point rounding can make it wait a second time for nothing).
    """

    __slots__ = ("_preferred", "_delay")

    def __init__(self, max_batch: int, preferred_sizes: Sequence[int] = (), max_queue_delay_s: float = 0.0) -> None:
        self._max_batch = _check_batch_size("max_batch", max_batch)
        self._preferred = _validated_preferred(preferred_sizes, self._max_batch)
        self._delay = _check_duration("max_queue_delay_s", max_queue_delay_s)

    @property
    def preferred_sizes(self) -> tuple[int, ...]:
        return self._preferred

    @property
    def max_queue_delay_s(self) -> float:
        return self._delay

    def plan(self, queue: Any, now: float) -> BatchPlan:
        n = len(queue)
        if n == 0:
            return _IDLE
        limit = min(n, self._max_batch)
        best = 0
        for size in reversed(self._preferred):
            if size <= limit:
                best = size
                break
        delay = self._delay
        exceeded = False
        oldest = _INF
        if delay > 0.0:
            oldest = queue.oldest_arrival()
            exceeded = oldest + delay <= now
        if best != 0 and not exceeded:
            return BatchPlan(best, _INF)
        if limit >= self._preferred[-1] or exceeded or delay == 0.0:
            return BatchPlan(limit, _INF)
        return BatchPlan(0, min(oldest + delay, queue.earliest_deadline()))

    def describe(self) -> dict:
        return {
            "name": "DynamicBatch",
            "max_batch": self._max_batch,
            "preferred_sizes": list(self._preferred),
            "max_queue_delay_s": self._delay,
        }

    def __repr__(self) -> str:
        return (
            f"DynamicBatch(max_batch={self._max_batch}, preferred_sizes={self._preferred}, "
            f"max_queue_delay_s={self._delay})"
        )


class DeadlineAwareBatch(BatchRule):
    """Deadline-aware batching inspired by DeepRT's DisBatcher; work-conserving by default.

    With ``n = min(len(queue), max_batch)`` and the head's deadline ``D`` (the entry that pops
    first):

    * Dispatch: ``take = table.max_batch_within(D - now - margin_s, n)``: the largest batch
      predicted to finish before ``D``. If even a batch of 1 cannot (``take == 0``), take 1
      anyway: the request still runs and its reply says whether it made the deadline; dropping
      it here would turn a possible near-miss into a certain one.
    * Wait (only when ``max_wait_s > 0`` and ``n < max_batch``): if the oldest request has waited
      less than ``max_wait_s`` and a batch one bigger would still meet the head's deadline
      (``now + predict(n + 1) + margin_s < D``), take 0 and wake at
      ``min(oldest_arrival + max_wait_s, D - margin_s - predict(n + 1))``: the later of the two
      is the last moment waiting is still safe.

    Why the head's deadline bounds the batch: ``pop_batch`` pops in key order, so the head is
    popped first and the batch is the first ``take`` entries in key order. Within one priority
    level the key is the deadline, so the head has the earliest deadline of its level and every
    other member of that level in the batch has a later one: if the head makes it, they do. A
    member of a LOWER priority level may carry an earlier deadline than the head; it rides along
    on the head's budget (priority means the higher level is served first), and
    ``queue.earliest_deadline()`` tells the scheduler when such a request is at risk.
    """

    __slots__ = ("_table", "_max_wait", "_margin")

    def __init__(self, table: Any, max_batch: int, max_wait_s: float = 0.0, margin_s: float = 0.0) -> None:
        if not (callable(getattr(table, "predict", None)) and callable(getattr(table, "max_batch_within", None))):
            raise TypeError(f"table must be a LatencyTable, got {type(table).__name__}")
        self._table = table
        self._max_batch = _check_batch_size("max_batch", max_batch)
        self._max_wait = _check_duration("max_wait_s", max_wait_s)
        self._margin = _check_duration("margin_s", margin_s)

    @property
    def table(self) -> Any:
        return self._table

    @property
    def max_wait_s(self) -> float:
        return self._max_wait

    @property
    def margin_s(self) -> float:
        return self._margin

    def plan(self, queue: Any, now: float) -> BatchPlan:
        size = len(queue)
        if size == 0:
            return _IDLE
        n = min(size, self._max_batch)
        head = queue.head_deadline()
        table, margin = self._table, self._margin
        if self._max_wait > 0.0 and n < self._max_batch:
            oldest = queue.oldest_arrival()
            next_cost = table.predict(n + 1)
            if now < oldest + self._max_wait and now + next_cost + margin < head:
                return BatchPlan(0, min(oldest + self._max_wait, head - margin - next_cost))
        take = table.max_batch_within(head - now - margin, n)
        return BatchPlan(take if take > 0 else 1, _INF)

    def describe(self) -> dict:
        return {
            "name": "DeadlineAwareBatch",
            "max_batch": self._max_batch,
            "max_wait_s": self._max_wait,
            "margin_s": self._margin,
            "latency_table": {
                "batch_sizes": [int(s) for s in self._table.batch_sizes],
                "latencies_s": [float(s) for s in self._table.latencies_s],
            },
        }

    def __repr__(self) -> str:
        return (
            f"DeadlineAwareBatch(table={self._table!r}, max_batch={self._max_batch}, "
            f"max_wait_s={self._max_wait}, margin_s={self._margin})"
        )
