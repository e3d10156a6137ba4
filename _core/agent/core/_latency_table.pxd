# C-level declaration of the latency table (see _deadline_queue.pxd for why this path).
#
# cimport it as:  from agent.core._latency_table cimport LatencyTable

cimport cython


@cython.final
cdef class LatencyTable:
    cdef int _n
    cdef int* _sizes        # profiled batch sizes, strictly increasing
    cdef double* _lat       # running maximum of the profile: what predict uses
    cdef double* _raw       # the profile as given (returned by latencies_s)

    # Predicted seconds for a batch of b; b < 1 is treated as 1 (no error path in C).
    cdef double predict_c(self, int b) noexcept nogil
    # Largest b in 1..max_b with predict_c(b) <= budget_s, 0 if none.
    cdef int max_batch_within_c(self, double budget_s, int max_b) noexcept nogil
