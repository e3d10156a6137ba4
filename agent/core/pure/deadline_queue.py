"""Pure-Python twin of ``agent.core._deadline_queue`` (``_core/agent/core/_deadline_queue.pyx``).

The readable specification of the deadline queue; written for clarity, not speed: a ``heapq``
with lazy deletion.
"""
from __future__ import annotations

import heapq
import math
import operator
from typing import Any

import numpy as np

from agent.core.types import PushResult, _as_float, _as_int32, _as_int64, _check_capacity

__all__ = ["DeadlineQueue"]

_INF = math.inf


def _check_ids_array(array: Any, name: str) -> None:
    """The caller's preallocated id buffer: a writable 1-D C-contiguous int64 numpy array."""
    if not isinstance(array, np.ndarray):
        raise TypeError(
            f"{name} must be a writable 1-D C-contiguous int64 numpy array, "
            f"got {type(array).__name__}"
        )
    problems = []
    if array.dtype != np.int64:
        problems.append(f"dtype is {array.dtype}")
    if array.ndim != 1:
        problems.append(f"ndim is {array.ndim}")
    elif not array.flags.c_contiguous:
        problems.append("it is not C-contiguous")
    if not array.flags.writeable:
        problems.append("it is read-only")
    if problems:
        raise ValueError(
            f"{name} must be a writable 1-D C-contiguous int64 numpy array: {', '.join(problems)}"
        )


# A queued entry: (-priority, key, seq, rid, arrival, deadline). Tuple order IS the pop order: higher
# priority first, then earlier key (the deadline unless the caller gave another), then earlier
# insertion. seq is unique, so rid, arrival and deadline never take part in a comparison and the
# order is total.
_Entry = tuple


class DeadlineQueue:
    """Earliest-deadline-first queue of request ids for one model.

    The queue holds ids only; the agent keeps each request's payload in its own dict keyed by the
    id. Pop order: higher ``priority`` first, then earlier ``key``, then earlier insertion. The key
    is the deadline unless the caller gives another at ``push``: the scheduler queues a loose
    request by ``arrival + horizon`` so that it does not wait out a whole burst behind tighter
    ones (``agent.scheduler.dispatcher``), while it still expires by its own deadline. So two
    times per entry: the key orders, the deadline expires (``pop_batch``, ``drop_expired``,
    ``earliest_deadline``). Times are seconds on whatever clock the caller uses (monotonic live,
    virtual in simulation).

    This twin keeps a ``heapq`` of entry tuples plus a dict ``rid -> entry``; a cancelled or
    dropped entry stays in the heap until it surfaces (lazy deletion) and is skipped because the
    dict no longer maps its id to that very tuple.

    Not thread-safe: one owner (the model's scheduler) serialises access. (Each compiled call
    happens to be atomic under the GIL; the twin's are not, so do not rely on it.)
    """

    __slots__ = ("_capacity", "_heap", "_live", "_next_seq")

    def __init__(self, capacity: int) -> None:
        self._capacity = _check_capacity(capacity)
        self._heap: list[_Entry] = []
        self._live: dict[int, _Entry] = {}
        self._next_seq = 0

    # ---- mutation -----------------------------------------------------------------------

    def push(self, rid: int, deadline: float, arrival: float, priority: int = 0,
             key: float | None = None) -> PushResult:
        """Queue request ``rid``, ordered by ``key`` (default: its ``deadline``), expiring at its
        ``deadline``. DUPLICATE is checked before FULL; neither changes the queue.

        NaN deadline, arrival or key is refused with ValueError: NaN compares false with
        everything and would silently break the heap order.
        """
        rid = _as_int64(rid, "rid")
        deadline = _as_float(deadline, "deadline")
        arrival = _as_float(arrival, "arrival")
        priority = _as_int32(priority, "priority")
        key = deadline if key is None else _as_float(key, "key")
        if deadline != deadline:
            raise ValueError(f"deadline must be a number, got nan (request {rid})")
        if arrival != arrival:
            raise ValueError(f"arrival must be a number, got nan (request {rid})")
        if key != key:
            raise ValueError(f"key must be a number, got nan (request {rid})")
        if rid in self._live:
            return PushResult.DUPLICATE
        if len(self._live) >= self._capacity:
            return PushResult.FULL
        entry = (-priority, key, self._next_seq, rid, arrival, deadline)
        self._next_seq += 1
        self._live[rid] = entry
        heapq.heappush(self._heap, entry)
        return PushResult.OK

    def pop_batch(self, max_n: int, now: float, ready_out: np.ndarray, expired_out: np.ndarray) -> tuple[int, int]:
        """Pop in key order: ids with ``deadline < now`` into ``expired_out``, others into
        ``ready_out``; return ``(n_ready, n_expired)``.

        Stops when ``min(max_n, len(ready_out))`` ready ids were taken, the queue is empty, or an
        expired entry is at the top and ``expired_out`` is full (that entry stays queued: an id
        is never popped without being written out). Written ids are in pop order.
        """
        max_n = _as_int64(max_n, "max_n")
        if max_n < 0:
            raise ValueError(f"max_n must be >= 0, got {max_n}")
        now = _as_float(now, "now")
        _check_ids_array(ready_out, "ready_out")
        _check_ids_array(expired_out, "expired_out")
        limit = min(max_n, len(ready_out))
        expired_room = len(expired_out)
        n_ready = n_expired = 0
        while n_ready < limit:
            top = self._top()
            if top is None:
                break
            if top[5] < now:
                if n_expired >= expired_room:
                    break
                expired_out[n_expired] = top[3]
                n_expired += 1
            else:
                ready_out[n_ready] = top[3]
                n_ready += 1
            heapq.heappop(self._heap)
            del self._live[top[3]]
        return n_ready, n_expired

    def drop_expired(self, now: float, expired_out: np.ndarray) -> int:
        """Remove every entry with ``deadline < now``, wherever it sits in the heap.

        Ids are written in pop order. At most ``len(expired_out)`` entries are removed (the
        first ones in key order); the rest stay queued for the next call. Returns the count.
        """
        now = _as_float(now, "now")
        _check_ids_array(expired_out, "expired_out")
        expired = sorted(entry for entry in self._live.values() if entry[5] < now)
        taken = expired[: len(expired_out)]
        for i, entry in enumerate(taken):
            expired_out[i] = entry[3]
            del self._live[entry[3]]
        self._maybe_compact()
        return len(taken)

    def cancel(self, rid: int) -> bool:
        """Remove request ``rid``; True if it was queued."""
        rid = _as_int64(rid, "rid")
        if self._live.pop(rid, None) is None:
            return False
        self._maybe_compact()
        return True

    # ---- queries ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, rid: object) -> bool:
        try:
            key = operator.index(rid)  # type: ignore[arg-type]
        except TypeError:
            return False
        return key in self._live

    @property
    def capacity(self) -> int:
        return self._capacity

    def earliest_deadline(self) -> float:
        """Minimum deadline over ALL queued entries (+inf when empty). With priorities this is
        not necessarily the head's deadline."""
        return min((entry[5] for entry in self._live.values()), default=_INF)

    def oldest_arrival(self) -> float:
        """Minimum arrival time over all queued entries (+inf when empty)."""
        return min((entry[4] for entry in self._live.values()), default=_INF)

    def head_deadline(self) -> float:
        """Deadline of the entry that would pop next (+inf when empty)."""
        top = self._top()
        return _INF if top is None else top[5]

    def head_key(self) -> float:
        """Key of the entry that would pop next (+inf when empty): what the scheduler compares
        across models to pick the next batch."""
        top = self._top()
        return _INF if top is None else top[1]

    def head_priority(self) -> int:
        """Priority of the entry that would pop next (0 when empty)."""
        top = self._top()
        return 0 if top is None else -top[0]

    def earliest_slack(self, now: float) -> float:
        """``earliest_deadline() - now``: how long until the most urgent request misses."""
        return self.earliest_deadline() - _as_float(now, "now")

    def count_ahead(self, key: float, priority: int = 0) -> int:
        """How many queued entries would pop before a new entry with this key and priority
        (higher priority, or equal priority and a key no later: ties go to the earlier push)."""
        key = _as_float(key, "key")
        return sum(1 for neg_priority, entry_key, *_ in self._live.values()
                   if -neg_priority > priority or (-neg_priority == priority and entry_key <= key))

    def ids(self) -> list[int]:
        """Queued ids in key order (pop order). For debugging and tests: O(n log n)."""
        return [entry[3] for entry in sorted(self._live.values())]

    def __repr__(self) -> str:
        return f"DeadlineQueue(capacity={self._capacity}, len={len(self._live)})"

    def _check_invariants(self) -> None:
        """Raise AssertionError if the internal structures disagree (for tests; O(n))."""
        heap = self._heap
        for i in range(1, len(heap)):
            if heap[i] < heap[(i - 1) >> 1]:
                raise AssertionError(f"heap order broken at position {i}")
        in_heap = {id(entry) for entry in heap}
        for rid, entry in self._live.items():
            if entry[3] != rid or id(entry) not in in_heap:
                raise AssertionError(f"queued request {rid} is missing from the heap")
        if len(self._live) > self._capacity:
            raise AssertionError(f"{len(self._live)} queued > capacity {self._capacity}")

    # ---- internals ----------------------------------------------------------------------

    def _top(self) -> _Entry | None:
        """The live entry at the top of the heap, discarding stale tuples above it."""
        heap, live = self._heap, self._live
        while heap:
            top = heap[0]
            if live.get(top[3]) is top:
                return top
            heapq.heappop(heap)
        return None

    def _maybe_compact(self) -> None:
        """Rebuild the heap when stale tuples outnumber live ones, bounding memory."""
        if len(self._heap) > 2 * len(self._live) + 64:
            self._heap = list(self._live.values())
            heapq.heapify(self._heap)
