"""What the compiled core and its pure-Python twin share: result types, the rule interface, and
the argument checks.

Defined once, here, and imported by both implementations (``_core/agent/core/*.pyx`` and
``agent/core/pure/``), so both return the identical types (``PushResult``, ``BatchPlan``), every
batching rule answers to one interface (``BatchRule``), and both raise the same errors with the
same messages for the same bad argument.

The underscore names are private to ``agent.core``: shared by its two implementations, not API.
"""
from __future__ import annotations

import abc
import math
import operator
from enum import IntEnum
from typing import Any, NamedTuple

__all__ = [
    "PushResult",
    "BatchPlan",
    "BatchRule",
    "MAX_QUEUE_CAPACITY",
]

#: Largest queue the compiled core allocates (its arrays are sized at construction, ~80 bytes an
#: entry). A per-model queue of a few thousand requests is the expected scale.
MAX_QUEUE_CAPACITY = 1 << 24

_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


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


class BatchRule(abc.ABC):
    """One batching rule: ``plan(queue, now) -> BatchPlan``. Rules read the queue, never pop.

    The one interface of every rule the scheduler runs: the compiled ``FixedBatch``,
    ``DynamicBatch`` and ``DeadlineAwareBatch``, their pure twins (``agent.core.pure``) and the
    paper baselines (``agent.scheduler.baselines``). A config picks any of them, and the
    dispatcher, the simulator and the live loop call them all the same way, as Triton runs its
    schedulers behind one ``Enqueue``.

    Parameters are fixed at construction (read-only attributes); to change a policy while
    serving, swap in a new rule object. Every rule has ``max_batch``, ``describe()`` and the two
    hooks the default policy calls (``agent.scheduler.policies.rules``): ``dispatched`` and
    ``observe``, no-ops here.

    Why an abstract base and not a ``typing.Protocol``: the Python rules inherit ``max_batch``
    and its ``_max_batch`` slot from here (a protocol cannot hold a slot without making it part of
    the interface), and a Python rule that lacks ``plan`` or ``describe`` cannot be built. The
    compiled rules are Cython cdef classes, which cannot inherit from a Python class:
    ``agent.core._batch_rules`` registers its cdef base ``BatchRule`` as a virtual subclass
    (``BatchRule.register``), so ``isinstance(rule, BatchRule)`` holds for every rule, compiled or
    not; ``tests/core/test_rule_interface.py`` checks that each one has the members too.
    """

    __slots__ = ("_max_batch",)

    @property
    def max_batch(self) -> int:
        """The largest ``take`` this rule ever returns."""
        return self._max_batch

    @abc.abstractmethod
    def plan(self, queue: Any, now: float) -> BatchPlan:
        """Decide for ``queue`` at time ``now`` (seconds, the queue's clock); see ``BatchPlan``."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """The rule's name (``"name"``), ``max_batch`` and parameters, as plain values."""

    def dispatched(self, n: int, now: float) -> None:
        """A batch this rule planned left the queue with ``n`` requests at ``now`` (a rule that
        plans in windows marks its window served here); stateless rules ignore it."""

    def observe(self, batch_size: int, duration_s: float, met: bool) -> None:
        """A batch of this rule was answered, ``met``: every request in it made its deadline (an
        adaptive rule resizes its batches here); stateless rules ignore it."""


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
