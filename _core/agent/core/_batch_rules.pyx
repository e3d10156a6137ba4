# cython: language_level=3, embedsignature=True
"""Batching rules over the compiled queue (compiled as agent.core._batch_rules).

Each rule reads the queue and the latency table through their C-level methods (declared in the
.pxd files) and returns ``agent.core.types.BatchPlan``, the very NamedTuple the pure twin
returns. The exact rules, and why, are documented on the twin's classes in
``agent.core.pure.batch_rules``; the code below is the same logic, line for line, with the same
floating-point expressions. The cdef base ``BatchRule`` is registered as a virtual subclass of
``agent.core.types.BatchRule``, the interface every rule shares (a cdef class cannot inherit
from a Python class).
"""
from libc.stdlib cimport malloc, free
from libc.math cimport INFINITY

from agent.core._deadline_queue cimport DeadlineQueue
from agent.core._latency_table cimport LatencyTable

from agent.core.types import (
    BatchPlan,
    BatchRule as _BatchRuleInterface,
    _check_batch_size,
    _check_duration,
    _validated_preferred,
)

# tuple.__new__(BatchPlan, (take, wake_at)) builds the NamedTuple without running its
# Python-level __new__; the empty-queue answer is built once.
cdef object _tuple_new = tuple.__new__
cdef object _IDLE_PLAN = BatchPlan(0, INFINITY)


cdef inline object _make_plan(PlanC plan):
    if plan.take == 0 and plan.wake_at == INFINITY:
        return _IDLE_PLAN
    return _tuple_new(BatchPlan, (plan.take, plan.wake_at))


cdef inline PlanC _plan(Py_ssize_t take, double wake_at) noexcept nogil:
    cdef PlanC plan
    plan.take = take
    plan.wake_at = wake_at
    return plan


cdef class BatchRule:
    """One batching rule: ``plan(queue, now) -> BatchPlan``. Rules read the queue, never pop.

    Parameters are read-only; to change a policy while serving, swap in a new rule object.
    """

    cdef PlanC plan_c(self, DeadlineQueue queue, double now) noexcept nogil:
        return _plan(0, INFINITY)

    def plan(self, DeadlineQueue queue not None, double now):
        """Decide for ``queue`` at time ``now`` -> BatchPlan(take, wake_at)."""
        return _make_plan(self.plan_c(queue, now))

    def describe(self):
        raise NotImplementedError

    def dispatched(self, n, now):
        """A batch this rule planned left the queue: stateless, ignored (see the pure twin)."""

    def observe(self, batch_size, duration_s, met):
        """A batch of this rule was answered: stateless, ignored (see the pure twin)."""


# The one rule interface is agent.core.types.BatchRule, a Python abstract base; a cdef class
# cannot inherit from it, so the compiled base (and with it every compiled rule) is registered as
# a virtual subclass: isinstance(rule, agent.core.BatchRule) holds for compiled rules too.
_BatchRuleInterface.register(BatchRule)


cdef class FixedBatch(BatchRule):
    """Dispatch exactly ``size`` requests, and only when that many are queued; while fewer are
    queued, wake at the earliest queued deadline (see ``agent.core.pure.FixedBatch``)."""

    def __cinit__(self, size):
        self.size = _check_batch_size("size", size)
        self.max_batch = self.size

    cdef PlanC plan_c(self, DeadlineQueue queue, double now) noexcept nogil:
        cdef Py_ssize_t n = queue.size_c()
        if n == 0:
            return _plan(0, INFINITY)
        if n >= self.size:
            return _plan(self.size, INFINITY)
        return _plan(0, queue.earliest_deadline_c())

    def describe(self):
        return {"name": "FixedBatch", "max_batch": self.max_batch, "size": self.size}

    def __repr__(self):
        return f"FixedBatch(size={self.size})"


cdef class DynamicBatch(BatchRule):
    """Triton's dynamic batcher; the exact rule is documented on ``agent.core.pure.DynamicBatch``."""

    # __cinit__, not __init__: it always runs (also for cls.__new__(cls)), so plan_c never sees
    # an unset preferred-size array or table.
    def __cinit__(self, max_batch, preferred_sizes=(), max_queue_delay_s=0.0):
        cdef Py_ssize_t checked_max = _check_batch_size("max_batch", max_batch)
        preferred = _validated_preferred(preferred_sizes, checked_max)
        cdef double delay = _check_duration("max_queue_delay_s", max_queue_delay_s)
        cdef Py_ssize_t* sizes = <Py_ssize_t*>malloc(len(preferred) * sizeof(Py_ssize_t))
        cdef Py_ssize_t i
        if sizes == NULL:
            raise MemoryError("cannot allocate DynamicBatch.preferred_sizes")
        for i in range(len(preferred)):
            sizes[i] = preferred[i]
        self._preferred = sizes
        self._n_preferred = len(preferred)
        self._preferred_tuple = preferred
        self.max_batch = checked_max
        self.max_queue_delay_s = delay

    def __dealloc__(self):
        free(self._preferred)

    @property
    def preferred_sizes(self):
        return self._preferred_tuple

    cdef PlanC plan_c(self, DeadlineQueue queue, double now) noexcept nogil:
        cdef Py_ssize_t n = queue.size_c()
        cdef Py_ssize_t limit, best = 0, k
        cdef double delay = self.max_queue_delay_s
        cdef double oldest = INFINITY, earliest
        cdef bint exceeded = False
        if n == 0:
            return _plan(0, INFINITY)
        limit = n if n < self.max_batch else self.max_batch
        k = self._n_preferred - 1
        while k >= 0:
            if self._preferred[k] <= limit:
                best = self._preferred[k]
                break
            k -= 1
        if delay > 0.0:
            oldest = queue.oldest_arrival_c()
            exceeded = oldest + delay <= now
        if best != 0 and not exceeded:
            return _plan(best, INFINITY)
        if limit >= self._preferred[self._n_preferred - 1] or exceeded or delay == 0.0:
            return _plan(limit, INFINITY)
        earliest = queue.earliest_deadline_c()
        return _plan(0, oldest + delay if oldest + delay < earliest else earliest)

    def describe(self):
        return {
            "name": "DynamicBatch",
            "max_batch": self.max_batch,
            "preferred_sizes": list(self._preferred_tuple),
            "max_queue_delay_s": self.max_queue_delay_s,
        }

    def __repr__(self):
        return (f"DynamicBatch(max_batch={self.max_batch}, "
                f"preferred_sizes={self._preferred_tuple}, "
                f"max_queue_delay_s={self.max_queue_delay_s})")


cdef class DeadlineAwareBatch(BatchRule):
    """DeepRT-DisBatcher-inspired, work-conserving batching: the largest batch predicted to
    meet the head's deadline; optionally waits while a bigger batch is still safe. The exact
    rule and why the head's deadline bounds the batch: ``agent.core.pure.DeadlineAwareBatch``."""

    def __cinit__(self, table, max_batch, max_wait_s=0.0, margin_s=0.0):
        if not isinstance(table, LatencyTable):
            raise TypeError(
                f"table must be a LatencyTable (the compiled one, agent.core.LatencyTable), "
                f"got {type(table).__module__}.{type(table).__name__}")
        self.max_batch = _check_batch_size("max_batch", max_batch)
        self.max_wait_s = _check_duration("max_wait_s", max_wait_s)
        self.margin_s = _check_duration("margin_s", margin_s)
        self.table = table

    cdef PlanC plan_c(self, DeadlineQueue queue, double now) noexcept nogil:
        cdef Py_ssize_t size = queue.size_c()
        cdef Py_ssize_t n
        cdef int take
        cdef double head, oldest, next_cost, ready_by, last_safe
        cdef double margin = self.margin_s
        if size == 0:
            return _plan(0, INFINITY)
        n = size if size < self.max_batch else self.max_batch
        head = queue.head_deadline_c()
        if self.max_wait_s > 0.0 and n < self.max_batch:
            oldest = queue.oldest_arrival_c()
            next_cost = self.table.predict_c(<int>(n + 1))
            if now < oldest + self.max_wait_s and now + next_cost + margin < head:
                ready_by = oldest + self.max_wait_s
                last_safe = head - margin - next_cost
                return _plan(0, ready_by if ready_by < last_safe else last_safe)
        take = self.table.max_batch_within_c(head - now - margin, <int>n)
        return _plan(take if take > 0 else 1, INFINITY)

    def describe(self):
        return {
            "name": "DeadlineAwareBatch",
            "max_batch": self.max_batch,
            "max_wait_s": self.max_wait_s,
            "margin_s": self.margin_s,
            "latency_table": {
                "batch_sizes": [int(s) for s in self.table.batch_sizes],
                "latencies_s": [float(s) for s in self.table.latencies_s],
            },
        }

    def __repr__(self):
        return (f"DeadlineAwareBatch(table={self.table!r}, max_batch={self.max_batch}, "
                f"max_wait_s={self.max_wait_s}, margin_s={self.margin_s})")
