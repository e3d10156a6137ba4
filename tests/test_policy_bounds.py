"""The clairvoyant bounds the learned policy is scored against (tools/train_policy.py): each must sit
above what a real scheduler reaches on the same trace, and be the knapsack it says on a trace small
enough to work by hand."""
from __future__ import annotations

import importlib
from dataclasses import replace
from pathlib import Path

import pytest

from agent.workload.trace import TraceRow


@pytest.fixture(scope="module")
def train_policy():
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    try:
        yield importlib.import_module("train_policy")
    finally:
        sys.path.pop(0)


def _board(train_policy, profile_ms, workers=1, cores=1):
    return replace(train_policy.BOARDS["cpu-2core"], profile_ms=profile_ms, workers=workers, cores=cores)


def test_the_bounds_by_hand_a_cheap_class_is_worth_more_per_second(train_policy):
    # one slot; a 10 ms model ("a") and a 90 ms one ("b"), neither cheaper per item in a batch; 10
    # of each arriving in the first 0.2 s, SLO 100 ms: one window of 1 s, budget 1 x (1 + 0.1) s
    board = _board(train_policy, {"a": [10.0, 20.0, 40.0, 80.0], "b": [90.0, 180.0, 360.0, 720.0]})
    trace = [TraceRow(0.01 * i, f"app{i % 2}", "a" if i % 2 else "b", 100.0) for i in range(20)]
    # all 20 need 0.1 + 0.9 = 1.0 s: every request in time; goodput over the trace's span (0.19 s)
    assert train_policy.goodput_bound(board, trace) == pytest.approx(20 / 0.19)
    assert train_policy.utility_bound(board, trace) == pytest.approx(1.0)
    # windows of 0.5 s leave 0.6 s: all of a (0.1 s) first, then 0.5 s of b: 5 whole requests for
    # the goodput, 5.55 (fractional) for the utility: (10/10 + 5.55/10) / 2
    assert train_policy.goodput_bound(board, trace, window_s=0.5) == pytest.approx(15 / 0.19)
    assert train_policy.utility_bound(board, trace, window_s=0.5) == pytest.approx((1 + 0.5 / 0.09 / 10) / 2)


def test_the_utility_bound_weighs_a_rare_class_above_a_common_one_of_the_same_cost(train_policy):
    # two classes of one model, 1 and 9 requests, room for 5: the rare class's request is worth 1/2,
    # each of the common one's 1/18; the bound takes the rare one first: (1 + 4/9) / 2
    board = _board(train_policy, {"m": [100.0, 200.0, 400.0, 800.0]})
    trace = [TraceRow(0.0, "rare", "m", 400.0)] + [TraceRow(0.01 * i, "common", "m", 100.0) for i in range(1, 10)]
    # budget: 1 x (1 s window + 0.4 s largest SLO) = 1.4 s: 14 requests' worth, every one fits
    assert train_policy.utility_bound(board, trace) == pytest.approx(1.0)
    assert train_policy.utility_bound(board, trace, window_s=0.1) == pytest.approx((1 + 4 / 9) / 2)


@pytest.mark.parametrize("kind", ["poisson", "bursty"])
def test_no_scheduler_beats_the_bounds_on_a_held_out_trace(train_policy, kind):
    from edge_lab.metrics import summarize
    board = train_policy.BOARDS["cpu-2core"]
    meta, trace = next((m, t) for m, t in train_policy.held_out_traces(board, 3.0, per_kind=1) if m["kind"] == kind)
    u_bound, g_bound = train_policy.utility_bound(board, trace), train_policy.goodput_bound(board, trace)
    assert 0.0 < u_bound <= 1.0
    for lanes in ("edge", "shed"):
        result = train_policy.run(board, trace, "rules", config=train_policy.edge_config(lanes, board))
        overall = summarize(result.records, result.duration_s)["overall"]
        assert overall["utility"] <= u_bound + 1e-9
        assert overall["within_slo"] / max(r.t_s for r in trace) <= g_bound + 1e-9
