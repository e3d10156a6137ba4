"""Pure-Python twin of the compiled core: the readable specification.

Every name here has a compiled counterpart in ``_core/*.pyx`` with the same signature and the
same observable behaviour (returned ids, their order, errors and their types). The twin exists
for three reasons, as msgpack's ``fallback.py`` does:

* it is the spec a reader checks first; the Cython code is the same algorithm in C structs;
* the property tests run both against a tiny oracle, so the two cannot drift apart;
* it is what runs on a board without a C compiler (``EDGE_AGENT_CORE=python``).

It is written for clarity, not speed: the queue is a ``heapq`` with lazy deletion.

``PushResult`` and ``BatchPlan`` are defined only here; the compiled modules import them, so both
implementations return the identical types. The argument validators are shared the same way, so
both raise the same messages.
"""
from __future__ import annotations

import heapq
import math
import operator
from enum import IntEnum
from typing import Any, NamedTuple, Sequence

import numpy as np

__all__ = [
    "DeadlineQueue",
    "PushResult",
    "LatencyTable",
    "BatchRule",
    "FixedBatch",
    "DynamicBatch",
    "DeadlineAwareBatch",
    "BatchPlan",
    "gather_into",
    "scatter_rows",
    "MAX_QUEUE_CAPACITY",
]

#: Largest queue the compiled core allocates (its arrays are sized at construction, ~80 bytes an
#: entry). A per-model queue of a few thousand requests is the expected scale.
MAX_QUEUE_CAPACITY = 1 << 24

_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_INF = math.inf


# --------------------------------------------------------------------------------------------
# Shared types
# --------------------------------------------------------------------------------------------


class PushResult(IntEnum):
    """Outcome of :meth:`DeadlineQueue.push`. Only ``OK`` means the request was queued."""

    OK = 0
    FULL = 1  #: the queue holds ``capacity`` requests; the request was NOT queued
    DUPLICATE = 2  #: a request with this id is already queued; nothing changed


class BatchPlan(NamedTuple):
    """A batching rule's decision.

    ``take > 0``: dispatch a batch of ``take`` requests now (``take <= len(queue)``; the caller
    pops them with ``pop_batch``); ``wake_at`` is then ``+inf``. ``take == 0``: do not dispatch;
    plan again at ``wake_at`` (seconds, the queue's clock) or earlier when a request arrives.
    ``wake_at == +inf`` means there is nothing to wait for. A ``wake_at`` at or before ``now``
    means some queued deadline has already passed: drop the expired requests, then plan again.
    """

    take: int
    wake_at: float


# --------------------------------------------------------------------------------------------
# Argument validation (shared with the compiled modules, so both raise the same messages)
# --------------------------------------------------------------------------------------------


def _as_int(value: Any, name: str, low: int, high: int) -> int:
    """An integer in [low, high]; TypeError for a non-integer, OverflowError out of C range.

    Mirrors Cython's conversion of an argument typed ``int64_t`` / ``int32_t``, so the pure twin
    raises what the compiled core raises.
    """
    try:
        result = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if not low <= result <= high:
        raise OverflowError(f"{name} must be in {low}..{high}, got {result}")
    return result


def _as_int64(value: Any, name: str) -> int:
    return _as_int(value, name, _INT64_MIN, _INT64_MAX)


def _as_int32(value: Any, name: str) -> int:
    return _as_int(value, name, _INT32_MIN, _INT32_MAX)


def _as_float(value: Any, name: str) -> float:
    """A float, refusing strings (``float("1")`` works, a C ``double`` argument does not)."""
    if isinstance(value, (str, bytes, bytearray)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None


def _check_capacity(capacity: Any) -> int:
    capacity = _as_int(capacity, "capacity", _INT64_MIN, _INT64_MAX)
    if not 1 <= capacity <= MAX_QUEUE_CAPACITY:
        raise ValueError(f"capacity must be in 1..{MAX_QUEUE_CAPACITY}, got {capacity}")
    return capacity


def _check_batch_size(name: str, value: Any) -> int:
    """A batch size: an integer >= 1 that fits a C int (the latency table indexes with int)."""
    value = _as_int(value, name, _INT64_MIN, _INT64_MAX)
    if not 1 <= value <= _INT32_MAX:
        raise ValueError(f"{name} must be an integer in 1..{_INT32_MAX}, got {value}")
    return value


def _check_duration(name: str, value: Any) -> float:
    """A duration in seconds: finite and >= 0."""
    value = _as_float(value, name)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return value


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


def _validated_profile(batch_sizes: Any, latencies_s: Any) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Check a latency profile; return (batch sizes, latencies) as tuples of int and float."""
    sizes_in = list(batch_sizes)
    lats_in = list(latencies_s)
    sizes: list[int] = []
    for i, size in enumerate(sizes_in):
        try:
            sizes.append(operator.index(size))
        except TypeError:
            raise TypeError(f"batch_sizes[{i}] must be an integer, got {size!r}") from None
    lats: list[float] = []
    for i, lat in enumerate(lats_in):
        lats.append(_as_float(lat, f"latencies_s[{i}]"))
    if not sizes:
        raise ValueError("batch_sizes must have at least one point, got []")
    if len(sizes) != len(lats):
        raise ValueError(
            f"batch_sizes and latencies_s must have the same length, got {len(sizes)} and {len(lats)}"
        )
    if any(not 1 <= s <= _INT32_MAX for s in sizes):
        raise ValueError(f"batch_sizes must be integers in 1..{_INT32_MAX}, got {sizes}")
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"batch_sizes must be strictly increasing, got {sizes}")
    for i, lat in enumerate(lats):
        if not (math.isfinite(lat) and lat > 0.0):
            raise ValueError(f"latencies_s must be finite and > 0, got latencies_s[{i}] = {lat!r}")
    return tuple(sizes), tuple(lats)


def _validated_preferred(preferred_sizes: Any, max_batch: int) -> tuple[int, ...]:
    """Triton's preferred batch sizes: each in 1..max_batch; sorted, deduplicated (a std::set).

    Empty means ``(max_batch,)``, as Triton's model-config normalisation does.
    """
    if isinstance(preferred_sizes, (str, bytes)):
        raise TypeError(f"preferred_sizes must be a sequence of integers, got {preferred_sizes!r}")
    sizes = []
    for i, size in enumerate(preferred_sizes):
        try:
            size = operator.index(size)
        except TypeError:
            raise TypeError(f"preferred_sizes[{i}] must be an integer, got {size!r}") from None
        if not 1 <= size <= max_batch:
            raise ValueError(
                f"preferred_sizes[{i}] must be in 1..max_batch ({max_batch}), got {size}"
            )
        sizes.append(size)
    return tuple(sorted(set(sizes))) if sizes else (max_batch,)


# --------------------------------------------------------------------------------------------
# DeadlineQueue
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# LatencyTable
# --------------------------------------------------------------------------------------------


class LatencyTable:
    """Predicted execution time (seconds) of one model instance per batch size, from a profile.

    ``predict(b)`` is exact at profiled points and linear between them; below the first point it
    is the first point's latency (a smaller batch is not cheaper than the smallest profiled one:
    fixed per-call costs dominate there); above the last point it extrapolates with the last two
    points' slope (one point: ``latency * b / batch_size``).

    The profile is flattened to its running maximum before use, so ``predict`` never decreases
    with ``b`` (a noisy profile where batch 8 measured faster than batch 6 must not make the
    scheduler believe a bigger batch is cheaper); ``max_batch_within`` relies on that to
    binary-search. ``latencies_s`` still returns the profile as given.
    """

    __slots__ = ("_sizes", "_raw", "_lat")

    def __init__(self, batch_sizes: Sequence[int], latencies_s: Sequence[float]) -> None:
        sizes, raw = _validated_profile(batch_sizes, latencies_s)
        self._sizes = sizes
        self._raw = raw
        running, flat = 0.0, []
        for lat in raw:
            running = lat if lat > running else running
            flat.append(running)
        self._lat = tuple(flat)

    @property
    def batch_sizes(self) -> np.ndarray:
        """The profiled batch sizes (a new int64 array)."""
        return np.array(self._sizes, dtype=np.int64)

    @property
    def latencies_s(self) -> np.ndarray:
        """The profiled latencies as given (a new float64 array)."""
        return np.array(self._raw, dtype=np.float64)

    def __len__(self) -> int:
        return len(self._sizes)

    def __repr__(self) -> str:
        return f"LatencyTable(batch_sizes={list(self._sizes)}, latencies_s={list(self._raw)})"

    def predict(self, b: int) -> float:
        """Predicted seconds to run a batch of ``b`` (b >= 1)."""
        b = _as_int32(b, "b")
        if b < 1:
            raise ValueError(f"b must be >= 1, got {b}")
        return self._predict(b)

    def _predict(self, b: int) -> float:
        # The arithmetic below is written in the same order as the C version so both produce
        # bit-identical doubles (the extension is compiled with -ffp-contract=off: no FMA).
        sizes, lat = self._sizes, self._lat
        n = len(sizes)
        if b <= sizes[0]:
            return lat[0]
        if n == 1:
            value = lat[0] * b / sizes[0]
            return value if value > lat[0] else lat[0]
        if b >= sizes[n - 1]:
            slope = (lat[n - 1] - lat[n - 2]) / (sizes[n - 1] - sizes[n - 2])
            value = lat[n - 1] + slope * (b - sizes[n - 1])
            return value if value > lat[n - 1] else lat[n - 1]
        lo, hi = 0, n - 1  # sizes[lo] <= b < sizes[hi]
        while hi - lo > 1:
            mid = (lo + hi) >> 1
            if sizes[mid] <= b:
                lo = mid
            else:
                hi = mid
        value = lat[lo] + (lat[hi] - lat[lo]) * (b - sizes[lo]) / (sizes[hi] - sizes[lo])
        # Clamp to the segment so rounding can never make predict decrease across a point.
        if value < lat[lo]:
            return lat[lo]
        if value > lat[hi]:
            return lat[hi]
        return value

    def max_batch_within(self, budget_s: float, max_b: int) -> int:
        """Largest b in 1..max_b with ``predict(b) <= budget_s``; 0 if none (or max_b < 1)."""
        budget_s = _as_float(budget_s, "budget_s")
        max_b = _as_int32(max_b, "max_b")
        if max_b < 1 or not self._lat[0] <= budget_s:
            return 0
        if self._predict(max_b) <= budget_s:
            return max_b
        lo, hi = 1, max_b  # predict(lo) <= budget < predict(hi)
        while hi - lo > 1:
            mid = lo + ((hi - lo) >> 1)
            if self._predict(mid) <= budget_s:
                lo = mid
            else:
                hi = mid
        return lo


# --------------------------------------------------------------------------------------------
# Batch rules
# --------------------------------------------------------------------------------------------

_IDLE = BatchPlan(0, _INF)


class BatchRule:
    """One batching rule: ``plan(queue, now) -> BatchPlan``. Rules read the queue, never pop.

    Parameters are fixed at construction (read-only attributes); to change a policy while
    serving, swap in a new rule object. Every rule has ``max_batch`` and ``describe()``.
    """

    __slots__ = ("_max_batch",)

    @property
    def max_batch(self) -> int:
        """The largest ``take`` this rule ever returns."""
        return self._max_batch

    def plan(self, queue: Any, now: float) -> BatchPlan:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def dispatched(self, n: int, now: float) -> None:
        """A batch this rule planned left the queue with ``n`` requests at ``now`` (a rule that
        plans in windows marks its window served here); stateless rules ignore it."""

    def observe(self, batch_size: int, duration_s: float, met: bool) -> None:
        """A batch of this rule was answered, ``met``: every request in it made its deadline (an
        adaptive rule resizes its batches here); stateless rules ignore it."""


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


# --------------------------------------------------------------------------------------------
# Batch assembly
# --------------------------------------------------------------------------------------------


def _check_dst(dst: Any) -> None:
    if not isinstance(dst, np.ndarray):
        raise TypeError(f"dst must be a numpy array, got {type(dst).__name__}")
    if dst.ndim < 1 or not dst.flags.c_contiguous or not dst.flags.writeable:
        raise ValueError(
            "dst must be a writable C-contiguous array with a batch axis, "
            f"got shape {dst.shape}, C-contiguous={dst.flags.c_contiguous}, "
            f"writable={dst.flags.writeable}"
        )


def gather_into(dst: np.ndarray, srcs: Sequence[np.ndarray]) -> int:
    """Copy ``srcs[i]`` into ``dst[i]``; return ``len(srcs)``. Rows past it are left untouched.

    ``dst`` is the preallocated batch buffer, shape ``(B, *item_shape)``, C-contiguous. Each
    source is a C-contiguous array of dst's dtype with shape ``item_shape`` or
    ``(1, *item_shape)`` (a request's tensor with or without its own batch axis). A mismatch is
    a ValueError naming the index and what differs; nothing is copied unless all sources pass.
    """
    _check_dst(dst)
    srcs = list(srcs)
    rows = dst.shape[0]
    if len(srcs) > rows:
        raise ValueError(f"srcs has {len(srcs)} arrays but dst holds only {rows} rows")
    item_shape = dst.shape[1:]
    for i, src in enumerate(srcs):
        if isinstance(src, np.generic):  # a numpy scalar exposes a buffer too: a 0-d array
            src = srcs[i] = np.asarray(src)
        if not isinstance(src, np.ndarray):
            raise TypeError(f"srcs[{i}] must be a numpy array, got {type(src).__name__}")
        if not src.flags.c_contiguous:
            raise ValueError(f"srcs[{i}] must be C-contiguous")
        if src.dtype != dst.dtype:
            raise ValueError(f"srcs[{i}] has dtype {src.dtype} but dst has dtype {dst.dtype}")
        if src.shape != item_shape and src.shape != (1, *item_shape):
            raise ValueError(
                f"srcs[{i}] has shape {src.shape} but a row of dst has shape {item_shape} "
                f"(or {(1, *item_shape)})"
            )
    for i, src in enumerate(srcs):
        np.copyto(dst[i : i + 1], src.reshape((1, *item_shape)))
    return len(srcs)


def scatter_rows(src: np.ndarray, n: int) -> list[np.ndarray]:
    """Split the first ``n`` rows of a backend's output into one array per request.

    Row ``i`` has shape ``(1, *src.shape[1:])``. The rows are views into ONE fresh copy of
    ``src[:n]``: one allocation per batch instead of one per request, and independent of
    ``src``, because a backend may reuse its output buffer for the next batch while replies are
    still being encoded. The copy is freed when the last row is dropped.
    """
    if not isinstance(src, np.ndarray):
        raise TypeError(f"src must be a numpy array, got {type(src).__name__}")
    if src.ndim < 1:
        raise ValueError(f"src must have a batch axis, got shape {src.shape}")
    n = operator.index(n)
    rows = src.shape[0]
    if not 0 <= n <= rows:
        raise ValueError(f"n must be in 0..{rows} (rows of src), got {n}")
    block = np.array(src[:n], order="C", copy=True)
    return [block[i : i + 1] for i in range(n)]
