"""Metrics on hand-built outcome records with answers worked out by hand (lab/edge_lab/metrics.py)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import errors
from agent.workload.records import RequestRecord
from edge_lab.metrics import class_key, format_table, summarize, utility

A, B = "mobilenet_digits", "resnet_digits"


def rec(model: str, slo_ms: float, status: str, latency_ms: float | None = None, batch: int | None = None,
        index: int = 0, arrival_s: float = 1.0) -> RequestRecord:
    """A record; ``latency_ms`` sets the reply time (required for ok, optional for an error reply)."""
    finish = None if latency_ms is None else arrival_s + latency_ms / 1000.0
    return RequestRecord(index, f"{model}-{slo_ms:g}", model, arrival_s, slo_ms, 0, status, finish, batch)


def scenario() -> list[RequestRecord]:
    """Three SLO classes over a 10 s run, every outcome kind present."""
    a10 = [rec(A, 10, "ok", 2, 2), rec(A, 10, "ok", 4, 2), rec(A, 10, "ok", 6, 4), rec(A, 10, "ok", 8, 4),
           rec(A, 10, "ok", 12, 8),                                   # answered, but late
           rec(A, 10, errors.REJECTED, 0.1), rec(A, 10, errors.DEADLINE_MISSED, 11), rec(A, 10, "unanswered")]
    a50 = [rec(A, 50, "ok", 20, 1), rec(A, 50, "ok", 30, 1),
           rec(A, 50, errors.BAD_REQUEST, 0.1), rec(A, 50, errors.INVALID_INPUT, 0.1)]
    b30 = [rec(B, 30, errors.INTERNAL, 5), rec(B, 30, errors.SHUTTING_DOWN, 1), rec(B, 30, errors.DEADLINE_MISSED, 31),
           rec(B, 30, errors.UNKNOWN_MODEL, 0.1), rec(B, 30, errors.TOO_LARGE)]
    records = a10 + a50 + b30
    for i, r in enumerate(records):
        r.index = i
    return records


# class utilities worked by hand: p99 of [2, 4, 6, 8, 12] (linear) = 8 + 0.96 x 4 = 11.84
U_A10 = 4 / 8 * (10 / 11.84)
U_A50 = 2 / 4 * 1.0
U_B30 = 0.0


def test_class_figures():
    s = summarize(scenario(), 10.0)
    assert set(s["classes"]) == {"mobilenet_digits@10ms", "mobilenet_digits@50ms", "resnet_digits@30ms"}
    a10 = s["classes"][class_key(A, 10)]
    assert {k: a10[k] for k in ("sent", "ok", "within_slo", "late", "accepted", "refused", "rejected",
                                "deadline_missed", "unanswered", "failed")} == {
        "sent": 8, "ok": 5, "within_slo": 4, "late": 1, "accepted": 7, "refused": 1, "rejected": 1,
        "deadline_missed": 1, "unanswered": 1, "failed": 0}
    assert a10["goodput_per_s"] == pytest.approx(0.4)
    assert a10["throughput_per_s"] == pytest.approx(0.5)
    assert a10["slo_attainment"] == pytest.approx(0.5)
    assert a10["deadline_miss_rate"] == pytest.approx(3 / 7)          # missed + late + unanswered / accepted
    assert a10["p50_ms"] == pytest.approx(6.0)
    assert a10["p99_ms"] == pytest.approx(11.84)
    assert a10["mean_batch"] == pytest.approx(4.0)
    assert a10["utility"] == pytest.approx(U_A10)
    assert (a10["model"], a10["slo_ms"]) == (A, 10)

    a50 = s["classes"][class_key(A, 50)]
    assert (a50["sent"], a50["ok"], a50["within_slo"], a50["refused"], a50["accepted"]) == (4, 2, 2, 2, 2)
    assert a50["deadline_miss_rate"] == 0.0
    assert a50["p50_ms"] == pytest.approx(25.0)
    assert a50["p99_ms"] == pytest.approx(29.9)
    assert a50["utility"] == pytest.approx(U_A50)

    b30 = s["classes"][class_key(B, 30)]
    assert (b30["sent"], b30["ok"], b30["refused"], b30["accepted"], b30["failed"], b30["deadline_missed"]) \
        == (5, 0, 2, 3, 2, 1)
    assert b30["deadline_miss_rate"] == pytest.approx(1 / 3)
    assert b30["slo_attainment"] == 0.0
    assert (b30["p50_ms"], b30["p99_ms"], b30["mean_batch"]) == (None, None, None)
    assert b30["goodput_per_s"] == 0.0 and b30["utility"] == 0.0


def test_model_and_overall_figures():
    s = summarize(scenario(), 10.0)
    a = s["models"][A]
    assert (a["sent"], a["ok"], a["within_slo"], a["late"], a["refused"], a["accepted"]) == (12, 7, 6, 1, 3, 9)
    assert a["deadline_miss_rate"] == pytest.approx(3 / 9)
    assert a["p50_ms"] == pytest.approx(8.0)                       # median of [2, 4, 6, 8, 12, 20, 30]
    assert a["p99_ms"] == pytest.approx(29.4)                      # 20 + 0.94 x 10
    assert a["mean_batch"] == pytest.approx(22 / 7)
    assert a["utility"] == pytest.approx((U_A10 + U_A50) / 2)
    assert s["models"][B]["utility"] == 0.0

    o = s["overall"]
    assert (o["sent"], o["ok"], o["within_slo"], o["accepted"], o["rejected"], o["unanswered"], o["failed"]) \
        == (17, 7, 6, 12, 1, 1, 2)
    assert o["goodput_per_s"] == pytest.approx(0.6)
    assert o["throughput_per_s"] == pytest.approx(0.7)
    assert o["offered_per_s"] == pytest.approx(1.7)
    assert o["slo_attainment"] == pytest.approx(6 / 17)
    assert o["deadline_miss_rate"] == pytest.approx(4 / 12)
    assert o["errors"] == {"bad_request": 1, "deadline_missed": 2, "internal": 1, "invalid_input": 1, "rejected": 1,
                           "shutting_down": 1, "too_large": 1, "unanswered": 1, "unknown_model": 1}
    assert o["utility"] == pytest.approx((U_A10 + U_A50 + U_B30) / 3)
    assert utility(scenario(), 10.0) == pytest.approx(o["utility"])
    assert s["duration_s"] == 10.0


def test_rates_scale_with_duration_utility_does_not():
    short, long = summarize(scenario(), 5.0), summarize(scenario(), 20.0)
    assert short["overall"]["goodput_per_s"] == pytest.approx(4 * long["overall"]["goodput_per_s"])
    assert short["overall"]["utility"] == pytest.approx(long["overall"]["utility"])


def test_empty_run():
    s = summarize([], 3.0)
    o = s["overall"]
    assert (o["sent"], o["goodput_per_s"], o["slo_attainment"], o["deadline_miss_rate"], o["p99_ms"]) \
        == (0, 0.0, None, None, None)
    assert utility([], 3.0) == 0.0


# --- utility: the properties its docstring promises ------------------------------------------

def _served(n_ok: int, n_refused: int, latency_ms: float, slo_ms: float = 10.0) -> list[RequestRecord]:
    return [rec(A, slo_ms, "ok", latency_ms, 1)] * n_ok + [rec(A, slo_ms, errors.REJECTED, 0.1)] * n_refused


def test_utility_more_goodput_at_equal_latency_is_higher():
    assert utility(_served(8, 2, 5.0), 10.0) > utility(_served(5, 5, 5.0), 10.0)
    assert utility(_served(8, 2, 5.0), 10.0) == pytest.approx(0.8)


def test_utility_higher_latency_at_equal_goodput_is_lower_or_equal():
    # within the SLO latency earns nothing more: equal
    assert utility(_served(10, 0, 9.0), 10.0) == utility(_served(10, 0, 5.0), 10.0) == 1.0
    # same 90 in time; the other 10 answered late (p99 40 ms > 10 ms SLO) instead of refused in time: lower
    in_time = [rec(A, 10, "ok", 5, 1)] * 90
    refused_tail = in_time + [rec(A, 10, errors.DEADLINE_MISSED, 10.5)] * 10
    late_tail = in_time + [rec(A, 10, "ok", 40, 1)] * 10
    assert summarize(late_tail, 10)["overall"]["goodput_per_s"] == summarize(refused_tail, 10)["overall"]["goodput_per_s"]
    assert utility(late_tail, 10.0) < utility(refused_tail, 10.0) == pytest.approx(0.9)
    assert utility(late_tail, 10.0) == pytest.approx(0.9 * 10 / 40)   # p99 of 90 x 5 ms + 10 x 40 ms = 40 ms


def test_utility_zero_when_nothing_is_in_time():
    records = [rec(A, 10, "ok", 15, 4), rec(A, 10, errors.DEADLINE_MISSED, 12), rec(A, 10, errors.REJECTED, 0.1),
               rec(B, 30, "unanswered"), rec(B, 30, "ok", 31, 1)]
    assert utility(records, 10.0) == 0.0


def test_utility_is_scale_free_across_models():
    # a cheap model at 100x the rate does not drown an expensive one: each class weighs the same
    busy = [rec(A, 10, "ok", 5, 8)] * 1000
    starved = [rec(B, 30, "ok", 10, 1)] * 5 + [rec(B, 30, errors.REJECTED, 0.1)] * 5
    assert utility(busy + starved, 10.0) == pytest.approx((1.0 + 0.5) / 2)


_outcome = st.one_of(
    st.tuples(st.just("ok"), st.floats(0.1, 100.0)),
    st.tuples(st.sampled_from([errors.REJECTED, errors.DEADLINE_MISSED, errors.INTERNAL, errors.BAD_REQUEST]),
              st.just(1.0)),
    st.tuples(st.just("unanswered"), st.none()),
)


@given(outcomes=st.lists(st.tuples(st.sampled_from([(A, 10.0), (A, 50.0), (B, 30.0)]), _outcome), max_size=60))
@settings(max_examples=200, deadline=None)
def test_utility_bounded_and_a_late_reply_never_helps(outcomes):
    records = [rec(model, slo, status, latency, 1) for (model, slo), (status, latency) in outcomes]
    u = utility(records, 10.0)
    assert 0.0 <= u <= 1.0
    # answering one more request of a class later than every other reply (and past its SLO),
    # instead of it being missed, leaves goodput unchanged and the tail no shorter: U must not rise
    worse = records + [rec(A, 10.0, "ok", 1000.0, 1)]
    better = records + [rec(A, 10.0, errors.DEADLINE_MISSED, 11.0)]
    assert utility(worse, 10.0) <= utility(better, 10.0) + 1e-12


# --- errors and the table --------------------------------------------------------------------

@pytest.mark.parametrize("records, duration, text", [
    ([], 0, "duration_s = 0: expected seconds > 0"),
    ([], float("nan"), "duration_s = nan"),
    ([rec(A, 10, "lost")], 1, "status = 'lost'"),
    ([rec(A, 10, "ok")], 1, "status 'ok' with finish_s = None"),
    ([rec(A, 10, "unanswered", 3)], 1, "status 'unanswered' with finish_s"),
])
def test_bad_input_is_named(records, duration, text):
    with pytest.raises(ValueError) as info:
        summarize(records, duration)
    assert text in str(info.value)


def test_format_table_one_row_per_policy():
    table = format_table({"deadline_aware": summarize(scenario(), 10.0),
                          "idle": summarize([], 10.0)["overall"]})
    lines = table.splitlines()
    assert len(lines) == 3
    for header in ("policy", "goodput/s", "thruput/s", "SLO att %", "miss %", "p50 ms", "p99 ms", "utility",
                   "rejected", "unanswered"):
        assert header in lines[0]
    assert lines[1].split() == ["deadline_aware", "0.6", "0.7", "35.3", "33.3", "8.0", "29.4",
                                f"{(U_A10 + U_A50) / 3:.3f}", "1", "1"]
    assert lines[2].split() == ["idle", "0.0", "0.0", "-", "-", "-", "-", "0.000", "0", "0"]
    # columns line up: every line is as wide as the header
    assert len({len(line) for line in lines}) == 1
