"""Pure-Python twin of ``agent.core._latency_table`` (``_core/agent/core/_latency_table.pyx``)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from agent.core.types import _as_float, _as_int32, _validated_profile

__all__ = ["LatencyTable"]


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
