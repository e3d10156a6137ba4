"""LatencyTable: prediction rules, the binary search against a linear-scan oracle, validation."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import agent.core.pure as pure


def oracle_max_batch_within(table, budget_s, max_b):
    """Largest b with predict(b) <= budget, by scanning every b."""
    best = 0
    for b in range(1, max_b + 1):
        if table.predict(b) <= budget_s:
            best = b
    return best


@st.composite
def profiles(draw):
    sizes = sorted(draw(st.sets(st.integers(1, 64), min_size=1, max_size=6)))
    lats = [draw(st.floats(1e-4, 0.5, allow_nan=False, allow_infinity=False)) for _ in sizes]
    return sizes, lats


def test_exact_at_points_and_linear_between(core):
    table = core.LatencyTable([1, 4, 8], [0.010, 0.016, 0.030])
    assert table.predict(1) == 0.010 and table.predict(4) == 0.016 and table.predict(8) == 0.030
    assert table.predict(2) == pytest.approx(0.012)
    assert table.predict(6) == pytest.approx(0.023)


def test_below_first_point_uses_first_latency(core):
    table = core.LatencyTable([4, 8], [0.02, 0.03])
    assert table.predict(1) == 0.02 and table.predict(3) == 0.02


def test_extrapolates_with_last_slope(core):
    table = core.LatencyTable([1, 4, 8], [0.010, 0.016, 0.030])
    assert table.predict(12) == pytest.approx(0.030 + 4 * (0.014 / 4))


def test_single_point_scales_linearly(core):
    table = core.LatencyTable([4], [0.02])
    assert table.predict(2) == 0.02
    assert table.predict(8) == pytest.approx(0.04)


def test_non_monotone_profile_is_flattened(core):
    """A noisy profile must not make a bigger batch look cheaper."""
    table = core.LatencyTable([1, 2, 4, 8], [0.010, 0.020, 0.015, 0.040])
    predictions = [table.predict(b) for b in range(1, 20)]
    assert predictions == sorted(predictions)
    assert table.predict(4) == 0.020  # the running maximum, not the measured 0.015
    assert table.latencies_s.tolist() == [0.010, 0.020, 0.015, 0.040]  # given profile kept
    assert table.predict(16) == pytest.approx(0.040 + 8 * (0.020 / 4))  # slope from flattened


@given(profile=profiles(), b=st.integers(1, 200))
def test_predict_is_non_decreasing_and_identical_across_implementations(profile, b):
    sizes, lats = profile
    twin = pure.LatencyTable(sizes, lats)
    assert twin.predict(b + 1) >= twin.predict(b)
    try:
        from agent.core._latency_table import LatencyTable as Compiled
    except ImportError:  # pragma: no cover - compiled half skipped elsewhere with the reason
        return
    compiled = Compiled(sizes, lats)
    assert compiled.predict(b) == twin.predict(b)  # bit-identical, not approx


@given(profile=profiles(), budget=st.floats(0, 1.0) | st.just(math.inf), max_b=st.integers(-2, 90))
def test_max_batch_within_matches_linear_scan(core, profile, budget, max_b):
    table = core.LatencyTable(*profile)
    assert table.max_batch_within(budget, max_b) == oracle_max_batch_within(table, budget, max_b)


def test_max_batch_within_edges(core):
    table = core.LatencyTable([1, 8], [0.01, 0.08])
    assert table.max_batch_within(0.005, 8) == 0  # even one does not fit
    assert table.max_batch_within(0.045, 8) == 4
    assert table.max_batch_within(1.0, 8) == 8  # capped by max_b
    assert table.max_batch_within(1.0, 0) == 0
    assert table.max_batch_within(math.nan, 8) == 0


def test_properties_are_copies(core):
    table = core.LatencyTable([1, 2], [0.1, 0.2])
    sizes, lats = table.batch_sizes, table.latencies_s
    assert sizes.dtype == np.int64 and lats.dtype == np.float64
    sizes[0], lats[0] = 99, 9.9
    assert table.batch_sizes.tolist() == [1, 2] and table.latencies_s.tolist() == [0.1, 0.2]
    assert table.predict(1) == 0.1
    assert len(table) == 2


def test_accepts_numpy_inputs(core):
    table = core.LatencyTable(np.array([1, 4]), np.array([0.01, 0.02]))
    assert table.predict(4) == 0.02


def test_predict_requires_positive_batch(core):
    table = core.LatencyTable([1], [0.1])
    with pytest.raises(ValueError, match="b must be >= 1, got 0"):
        table.predict(0)


@pytest.mark.parametrize(
    "sizes, lats, message",
    [
        ([1, 4, 2], [0.1, 0.2, 0.3], r"batch_sizes must be strictly increasing, got \[1, 4, 2\]"),
        ([1, 1], [0.1, 0.2], r"batch_sizes must be strictly increasing, got \[1, 1\]"),
        ([], [], r"batch_sizes must have at least one point"),
        ([1, 2], [0.1], r"batch_sizes and latencies_s must have the same length, got 2 and 1"),
        ([0, 2], [0.1, 0.2], r"batch_sizes must be integers in 1\.\.\d+, got \[0, 2\]"),
        ([1, 2], [0.1, 0.0], r"latencies_s must be finite and > 0, got latencies_s\[1\] = 0\.0"),
        ([1, 2], [0.1, math.inf], r"latencies_s must be finite and > 0, got latencies_s\[1\] = inf"),
        ([1, 2], [math.nan, 0.1], r"latencies_s must be finite and > 0, got latencies_s\[0\] = nan"),
        ([1], [-0.1], r"latencies_s must be finite and > 0"),
    ],
)
def test_invalid_profiles_are_refused_with_the_reason(core, sizes, lats, message):
    with pytest.raises(ValueError, match=message):
        core.LatencyTable(sizes, lats)


def test_non_integer_batch_size_is_a_type_error(core):
    with pytest.raises(TypeError, match=r"batch_sizes\[1\] must be an integer, got 2\.5"):
        core.LatencyTable([1, 2.5], [0.1, 0.2])
