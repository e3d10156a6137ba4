"""Workload generators and the v1 trace format: reproducibility, statistics, errors, CLI."""
from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.workload.cli import add_trace_parser, parse_apps
from agent.workload.generators import (
    DEMO_APPS, AppSpec, WorkloadError, bursty, diurnal, generate, mmpp_rates, poisson,
)
from agent.workload.trace import TraceError, TraceRow, read_trace, write_trace

RATE, LONG = 200.0, 600.0          # 120 000 expected arrivals: tight enough for 4-sigma bounds
KIND_PARAMS = {"poisson": {}, "bursty": {"burst_factor": 10.0, "mean_on_s": 1.0, "mean_off_s": 4.0},
               "diurnal": {"peak_to_trough": 4.0}}


def _gen(kind: str, seed: int, duration_s: float = LONG, rate: float = RATE) -> list[TraceRow]:
    return generate(kind, rate_per_s=rate, duration_s=duration_s, apps=DEMO_APPS, seed=seed, **KIND_PARAMS[kind])


def _counts(rows: list[TraceRow], duration_s: float, window_s: float = 1.0) -> np.ndarray:
    times = np.array([r.t_s for r in rows])
    return np.histogram(times, bins=int(duration_s / window_s), range=(0.0, duration_s))[0]


def _dispersion(counts: np.ndarray) -> float:
    return float(counts.var(ddof=1) / counts.mean())


@pytest.mark.parametrize("kind", sorted(KIND_PARAMS))
def test_same_seed_same_trace_other_seed_other_trace(kind):
    a, b, c = _gen(kind, 7, 30.0), _gen(kind, 7, 30.0), _gen(kind, 8, 30.0)
    assert a == b
    assert a != c
    assert len(a) > 100


@pytest.mark.parametrize("kind", sorted(KIND_PARAMS))
def test_rows_sorted_in_range_and_from_the_specs(kind):
    rows = _gen(kind, 3, 20.0)
    times = [r.t_s for r in rows]
    assert times == sorted(times)
    assert 0.0 <= times[0] and times[-1] <= 20.0
    specs = {a.app: a for a in DEMO_APPS}
    for r in rows:
        spec = specs[r.app]
        assert (r.model, r.slo_ms, r.priority) == (spec.model, spec.slo_ms, spec.priority)


def test_dispatcher_is_the_named_generator():
    assert generate("poisson", rate_per_s=50, duration_s=10, apps=DEMO_APPS, seed=1) == poisson(50, 10, DEMO_APPS, 1)
    assert generate("bursty", rate_per_s=50, duration_s=10, apps=DEMO_APPS, seed=1, mean_on_s=0.5) \
        == bursty(50, 10, DEMO_APPS, 1, mean_on_s=0.5)
    assert generate("diurnal", rate_per_s=50, duration_s=10, apps=DEMO_APPS, seed=1, period_s=5) \
        == diurnal(50, 10, DEMO_APPS, 1, period_s=5)


def test_poisson_rate_within_four_sigma():
    expected = RATE * LONG
    n = len(_gen("poisson", 11))
    assert abs(n - expected) <= 4 * math.sqrt(expected), (n, expected)


def test_bursty_mean_rate_within_four_sigma_of_the_mmpp_variance():
    # Var N(T) ~ rate T + 2 (high - low)^2 r_on r_off T / (r_on + r_off)^3 for a two-state MMPP
    # with leaving rates r_on = 1/mean_on, r_off = 1/mean_off (its long-run count variance).
    high, low = mmpp_rates(RATE, burst_factor=10.0, mean_on_s=1.0, mean_off_s=4.0)
    r_on, r_off = 1.0, 0.25
    variance = RATE * LONG + 2 * (high - low) ** 2 * r_on * r_off * LONG / (r_on + r_off) ** 3
    n = len(_gen("bursty", 12))
    assert abs(n - RATE * LONG) <= 4 * math.sqrt(variance), (n, RATE * LONG, math.sqrt(variance))


def test_mmpp_rates_give_the_requested_mean():
    high, low = mmpp_rates(100.0, burst_factor=5.0, mean_on_s=2.0, mean_off_s=6.0)
    assert high == pytest.approx(5 * low)
    assert 0.25 * high + 0.75 * low == pytest.approx(100.0)


def test_diurnal_mean_rate_over_whole_periods():
    # A thinned Poisson process: the count is Poisson with mean = integral of the rate = RATE x LONG.
    expected = RATE * LONG
    n = len(_gen("diurnal", 13))
    assert abs(n - expected) <= 4 * math.sqrt(expected), (n, expected)


def test_poisson_counts_are_not_over_dispersed_but_bursty_counts_are():
    poisson_index = _dispersion(_counts(_gen("poisson", 21), LONG))
    bursty_index = _dispersion(_counts(_gen("bursty", 21), LONG))
    # 600 windows: the sample index of a Poisson process has a standard error of ~sqrt(2/599) = 0.058
    assert 0.75 < poisson_index < 1.25, poisson_index
    assert bursty_index > 1.5, bursty_index


def test_bursty_with_factor_one_is_poisson_like():
    rows = generate("bursty", rate_per_s=RATE, duration_s=LONG, apps=DEMO_APPS, seed=4, burst_factor=1.0)
    assert 0.75 < _dispersion(_counts(rows, LONG)) < 1.25


def test_diurnal_peak_window_busier_than_trough_window():
    rows = _gen("diurnal", 31, 100.0)
    counts = _counts(rows, 100.0, window_s=10.0)      # trough at t = 0, peak at the middle
    trough, peak = counts[0], counts[4] + counts[5]
    # rates: trough 80/s rising, peak 320/s: expected ~1 000 vs ~6 200 arrivals
    assert peak / 2 > 3 * trough, (peak, trough)


@pytest.mark.parametrize("kind", sorted(KIND_PARAMS))
def test_app_shares_within_four_sigma(kind):
    rows = _gen(kind, 41, 200.0)
    n = len(rows)
    total_share = sum(a.share for a in DEMO_APPS)
    for spec in DEMO_APPS:
        p = spec.share / total_share
        got = sum(1 for r in rows if r.app == spec.app)
        assert abs(got - n * p) <= 4 * math.sqrt(n * p * (1 - p)), (spec.app, got, n * p)


def test_unnormalised_shares_and_priority_carried():
    apps = [AppSpec("a", "m1", 10, share=3, priority=2), AppSpec("b", "m2", 20, share=1)]
    rows = poisson(100, 100, apps, seed=5)
    share_a = sum(r.app == "a" for r in rows) / len(rows)
    assert abs(share_a - 0.75) < 4 * math.sqrt(0.75 * 0.25 / len(rows))
    assert {r.priority for r in rows if r.app == "a"} == {2}


@pytest.mark.parametrize("kind", sorted(KIND_PARAMS))
def test_write_read_round_trip(kind, tmp_path):
    rows = _gen(kind, 51, 10.0)
    path = tmp_path / f"{kind}.csv"
    assert write_trace(path, rows) == len(rows)
    assert read_trace(path) == rows


def test_round_trip_with_min_accuracy(tmp_path):
    apps = [AppSpec("a", "m", 10, 1, min_accuracy=0.9), AppSpec("b", "m", 20, 1)]
    rows = poisson(50, 5, apps, seed=1)
    write_trace(tmp_path / "t.csv", rows)
    back = read_trace(tmp_path / "t.csv")
    assert back == rows
    assert {r.min_accuracy for r in back} == {0.9, None}


@given(seed=st.integers(0, 2**32), rate=st.floats(0.1, 500), duration=st.floats(0.01, 5))
@settings(max_examples=40, deadline=None)
def test_any_parameters_give_a_valid_trace(seed, rate, duration):
    for kind in KIND_PARAMS:
        rows = generate(kind, rate_per_s=rate, duration_s=duration, apps=DEMO_APPS, seed=seed)
        times = [r.t_s for r in rows]
        assert times == sorted(times)
        assert all(0.0 <= t <= duration for t in times)


@pytest.mark.parametrize("call, names", [
    (lambda: generate("zipf", rate_per_s=1, duration_s=1, apps=DEMO_APPS, seed=0), ["kind", "'zipf'", "poisson"]),
    (lambda: generate("poisson", rate_per_s=1, duration_s=1, apps=DEMO_APPS, seed=0, period_s=3), ["period_s"]),
    (lambda: generate("bursty", rate_per_s=1, duration_s=1, apps=DEMO_APPS, seed=0, peak_to_trough=2),
     ["peak_to_trough", "burst_factor"]),
    (lambda: generate("bursty", rate_per_s=1, duration_s=1, apps=DEMO_APPS, seed=0, burst_factor=0.5),
     ["burst_factor", "0.5", ">= 1"]),
    (lambda: generate("bursty", rate_per_s=1, duration_s=1, apps=DEMO_APPS, seed=0, mean_off_s=0), ["mean_off_s", "0"]),
    (lambda: generate("diurnal", rate_per_s=1, duration_s=1, apps=DEMO_APPS, seed=0, period_s=-2), ["period_s", "-2"]),
    (lambda: generate("diurnal", rate_per_s=1, duration_s=1, apps=DEMO_APPS, seed=0, peak_to_trough=0.5),
     ["peak_to_trough", "0.5"]),
    (lambda: poisson(-1, 1, DEMO_APPS, 0), ["rate_per_s", "-1"]),
    (lambda: poisson(1, 0, DEMO_APPS, 0), ["duration_s", "0"]),
    (lambda: poisson(1, math.inf, DEMO_APPS, 0), ["duration_s", "inf"]),
    (lambda: poisson(1, 1, DEMO_APPS, -3), ["seed", "-3"]),
    (lambda: poisson(1, 1, DEMO_APPS, 1.5), ["seed", "1.5"]),
    (lambda: poisson(1, 1, [], 0), ["apps"]),
    (lambda: poisson(1, 1, [DEMO_APPS[0], DEMO_APPS[0]], 0), ["apps", "mobilenet_tight"]),
    (lambda: AppSpec("a", "m", slo_ms=0, share=1), ["slo_ms", "0"]),
    (lambda: AppSpec("a", "m", slo_ms=10, share=math.nan), ["share", "nan"]),
    (lambda: AppSpec("", "m", slo_ms=10, share=1), ["app"]),
    (lambda: AppSpec("a", "m", slo_ms=10, share=1, priority=1.5), ["priority", "1.5"]),
    (lambda: AppSpec("a", "m", slo_ms=10, share=1, min_accuracy=2), ["min_accuracy", "2"]),
])
def test_bad_parameters_are_named(call, names):
    with pytest.raises(WorkloadError) as info:
        call()
    for name in names:
        assert name in str(info.value), (name, str(info.value))


def _write(tmp_path, text: str):
    path = tmp_path / "trace.csv"
    path.write_text(text)
    return path


def test_read_trace_bad_header(tmp_path):
    path = _write(tmp_path, "time,app,model,slo_ms,priority\n0.1,a,m,10,0\n")
    with pytest.raises(TraceError, match="header 'time,app,model,slo_ms,priority'.*expected t_s,app"):
        read_trace(path)


def test_read_trace_bad_number_names_line_and_column(tmp_path):
    path = _write(tmp_path, "t_s,app,model,slo_ms,priority\n0.1,a,m,10,0\nsoon,a,m,10,0\n")
    with pytest.raises(TraceError, match=r"trace\.csv:3: t_s = 'soon': expected seconds >= 0"):
        read_trace(path)


def test_read_trace_negative_slo_names_line(tmp_path):
    path = _write(tmp_path, "t_s,app,model,slo_ms,priority\n0.1,a,m,10,0\n0.2,a,m,10,0\n0.3,a,m,-5,0\n")
    with pytest.raises(TraceError, match=r"trace\.csv:4: slo_ms = '-5': expected milliseconds > 0"):
        read_trace(path)


def test_read_trace_bad_priority_names_line(tmp_path):
    path = _write(tmp_path, "t_s,app,model,slo_ms,priority\n0.1,a,m,10,high\n")
    with pytest.raises(TraceError, match=r"trace\.csv:2: priority = 'high'"):
        read_trace(path)


# --- CLI -------------------------------------------------------------------------------------

def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="edge-agent")
    add_trace_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_generate_writes_the_trace_and_summarises(tmp_path, capsys):
    out = tmp_path / "trace.csv"
    args = _cli(["trace", "generate", "--kind", "bursty", "--rate", "200", "--duration", "20", "--seed", "1",
                 "--out", str(out), "--apps", "demo", "--mean-on", "0.5"])
    assert args.func(args) == 0
    rows = read_trace(out)
    assert rows == bursty(200, 20, DEMO_APPS, 1, mean_on_s=0.5)
    line = capsys.readouterr().out.strip()
    assert "\n" not in line
    assert f"{len(rows)} rows" in line
    assert f"realised {len(rows) / 20:.1f}/s" in line
    for spec in DEMO_APPS:
        assert f"{spec.app}={sum(r.app == spec.app for r in rows)}" in line


def test_cli_custom_apps_and_bad_parameter(tmp_path, capsys):
    out = tmp_path / "t.csv"
    args = _cli(["trace", "generate", "--kind", "poisson", "--rate", "50", "--duration", "4", "--seed", "2",
                 "--out", str(out), "--apps", "cam=resnet_digits:30:1:2,door=mobilenet_digits:10:3"])
    assert args.func(args) == 0
    assert {(r.app, r.model, r.slo_ms, r.priority) for r in read_trace(out)} == {
        ("cam", "resnet_digits", 30.0, 2), ("door", "mobilenet_digits", 10.0, 0)}
    capsys.readouterr()
    args = _cli(["trace", "generate", "--kind", "bursty", "--rate", "50", "--duration", "4", "--seed", "2",
                 "--out", str(tmp_path / "bad.csv"), "--period", "3"])
    assert args.func(args) == 2
    assert "--period not a parameter of --kind bursty: it takes --burst-factor, --mean-on, --mean-off" \
        in capsys.readouterr().err
    assert not (tmp_path / "bad.csv").exists()


def test_parse_apps_errors_name_the_item():
    with pytest.raises(WorkloadError, match="'cam=resnet_digits:fast:1'"):
        parse_apps("cam=resnet_digits:fast:1")
    with pytest.raises(WorkloadError, match="'oops'"):
        parse_apps("oops")
