# cython: language_level=3, embedsignature=True
"""Per-batch-size latency prediction in C arrays (compiled as agent.core._latency_table).

The specification, including why the profile is flattened to its running maximum, is
``agent.core.pure.LatencyTable``. The arithmetic is written in the same order as the twin's, and
the extension is compiled with ``-ffp-contract=off`` (no fused multiply-add), so both produce
bit-identical doubles on every board.
"""
from libc.stdlib cimport malloc, free

import numpy as np

from agent.core.types import _validated_profile


cdef class LatencyTable:
    """Predicted execution time (seconds) of one model instance per batch size.

    Exact at profiled points, linear between them, the first point's latency below the first
    point, extrapolated with the last two points' slope above the last (one point:
    ``latency * b / batch_size``); never decreasing in ``b``.
    """

    def __cinit__(self, batch_sizes, latencies_s):
        sizes, raw = _validated_profile(batch_sizes, latencies_s)
        cdef int n = len(sizes)
        cdef int i
        cdef double running = 0.0
        self._sizes = <int*>malloc(n * sizeof(int))
        self._lat = <double*>malloc(n * sizeof(double))
        self._raw = <double*>malloc(n * sizeof(double))
        if self._sizes == NULL or self._lat == NULL or self._raw == NULL:
            raise MemoryError("cannot allocate a LatencyTable")
        for i in range(n):
            self._sizes[i] = sizes[i]
            self._raw[i] = raw[i]
            if self._raw[i] > running:
                running = self._raw[i]
            self._lat[i] = running
        self._n = n

    def __dealloc__(self):
        free(self._sizes)
        free(self._lat)
        free(self._raw)

    @property
    def batch_sizes(self):
        """The profiled batch sizes (a new int64 array)."""
        return np.array([self._sizes[i] for i in range(self._n)], dtype=np.int64)

    @property
    def latencies_s(self):
        """The profiled latencies as given (a new float64 array)."""
        return np.array([self._raw[i] for i in range(self._n)], dtype=np.float64)

    def __len__(self):
        return self._n

    def __repr__(self):
        return (f"LatencyTable(batch_sizes={[self._sizes[i] for i in range(self._n)]}, "
                f"latencies_s={[self._raw[i] for i in range(self._n)]})")

    def predict(self, int b):
        """Predicted seconds to run a batch of ``b`` (b >= 1)."""
        if b < 1:
            raise ValueError(f"b must be >= 1, got {b}")
        return self.predict_c(b)

    def max_batch_within(self, double budget_s, int max_b):
        """Largest b in 1..max_b with ``predict(b) <= budget_s``; 0 if none (or max_b < 1)."""
        return self.max_batch_within_c(budget_s, max_b)

    cdef double predict_c(self, int b) noexcept nogil:
        cdef int n = self._n, lo, hi, mid
        cdef double value, slope
        cdef int* sizes = self._sizes
        cdef double* lat = self._lat
        if b <= sizes[0]:
            return lat[0]
        if n == 1:
            value = lat[0] * b / sizes[0]
            return value if value > lat[0] else lat[0]
        if b >= sizes[n - 1]:
            slope = (lat[n - 1] - lat[n - 2]) / (sizes[n - 1] - sizes[n - 2])
            value = lat[n - 1] + slope * (<double>b - <double>sizes[n - 1])
            return value if value > lat[n - 1] else lat[n - 1]
        lo = 0
        hi = n - 1
        while hi - lo > 1:
            mid = (lo + hi) >> 1
            if sizes[mid] <= b:
                lo = mid
            else:
                hi = mid
        value = lat[lo] + (lat[hi] - lat[lo]) * (b - sizes[lo]) / (sizes[hi] - sizes[lo])
        if value < lat[lo]:
            return lat[lo]
        if value > lat[hi]:
            return lat[hi]
        return value

    cdef int max_batch_within_c(self, double budget_s, int max_b) noexcept nogil:
        cdef int lo, hi, mid
        if max_b < 1 or not (self._lat[0] <= budget_s):
            return 0
        if self.predict_c(max_b) <= budget_s:
            return max_b
        lo = 1
        hi = max_b
        while hi - lo > 1:
            mid = lo + ((hi - lo) >> 1)
            if self.predict_c(mid) <= budget_s:
                lo = mid
            else:
                hi = mid
        return lo
