# C-level declaration of the batching rules (see _deadline_queue.pxd for why this path).
#
# A compiled scheduler can call rule.plan_c(queue, now) without touching Python objects.
#
# cimport it as:  from agent.core._batch_rules cimport BatchRule, PlanC

from agent.core._deadline_queue cimport DeadlineQueue
from agent.core._latency_table cimport LatencyTable


ctypedef struct PlanC:
    Py_ssize_t take
    double wake_at


cdef class BatchRule:
    cdef readonly Py_ssize_t max_batch
    cdef PlanC plan_c(self, DeadlineQueue queue, double now) noexcept nogil


cdef class FixedBatch(BatchRule):
    cdef readonly Py_ssize_t size


cdef class DynamicBatch(BatchRule):
    cdef Py_ssize_t* _preferred     # sorted ascending
    cdef Py_ssize_t _n_preferred
    cdef object _preferred_tuple
    cdef readonly double max_queue_delay_s


cdef class DeadlineAwareBatch(BatchRule):
    cdef readonly LatencyTable table
    cdef readonly double max_wait_s
    cdef readonly double margin_s
