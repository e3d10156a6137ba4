"""The discrete-event simulator: exact event timing at jitter 0, one record per trace row,
determinism, processor sharing, and that it drives the live scheduler itself (not a copy).

Latency tables here use binary fractions (0.25 s, 0.5 s...) wherever a test compares times with
``==``, so the expected finish times are exact in floating point.
"""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

import agent.scheduler.dispatcher as dispatcher
import agent.sim.engine as engine
from agent.config import Config, parse_config
from agent.core import DeadlineAwareBatch, DynamicBatch, FixedBatch, LatencyTable
from agent.sim import SimExecutor, SimModel, sim_models_from_config, simulate
from agent.workload.trace import TraceRow

STATUSES = {"ok", "deadline_missed", "rejected", "unknown_model"}


def table(*latencies_s: float, sizes=None) -> LatencyTable:
    sizes = sizes or [2 ** i for i in range(len(latencies_s))]
    return LatencyTable(np.array(sizes, dtype=np.int64), np.array(latencies_s, dtype=np.float64))


QUARTER = table(0.25, 0.375, 0.5, 0.75)      # predict(1)=0.25, predict(2)=0.375, predict(4)=0.5, predict(8)=0.75


def row(t_s: float, model: str = "m", slo_ms: float = 10_000.0, priority: int = 0, app: str = "app") -> TraceRow:
    return TraceRow(t_s, app, model, slo_ms, priority)


def model(rule, latency=QUARTER, instances=1, capacity=64, min_latency_s=0.0, jitter=0.0, name="m") -> SimModel:
    return SimModel(name, rule, instances, capacity, latency, min_latency_s, jitter)


def poisson(rate: float, duration_s: float, seed: int, model_name: str = "m", slo_ms: float = 50.0) -> list[TraceRow]:
    rng = random.Random(seed)
    rows, t = [], rng.expovariate(rate)
    while t < duration_s:
        rows.append(row(t, model_name, slo_ms))
        t += rng.expovariate(rate)
    return rows


# --- event timing ---------------------------------------------------------------------------------


def test_fixed_batch_of_two_runs_when_the_second_arrives():
    result = simulate([row(0.0), row(0.125)], [model(FixedBatch(2))], workers=1)
    first, second = result.records
    assert (first.status, second.status) == ("ok", "ok")
    assert first.finish_s == second.finish_s == 0.125 + QUARTER.predict(2)
    assert (first.batch_size, second.batch_size) == (2, 2)
    assert first.queue_ms == 125.0 and second.queue_ms == 0.0
    assert first.compute_ms == second.compute_ms == 1000 * QUARTER.predict(2)
    assert result.batches == 1 and result.batch_histogram == {"m": {2: 1}}
    assert result.duration_s == 0.5   # the last reply; the pending wake (at the deadline) never fires
    assert result.events == 3


def test_a_request_held_past_its_deadline_expires_at_the_deadline():
    # FixedBatch(2) never fills; its wake_at is the request's deadline. The queue expires only
    # deadlines strictly before now, so the engine steps one ulp past it.
    deadline = 0.25 + 0.5
    result = simulate([row(0.25, slo_ms=500.0)], [model(FixedBatch(2))], workers=1)
    (record,) = result.records
    assert record.status == "deadline_missed"
    assert record.finish_s == math.nextafter(deadline, math.inf)
    assert result.batches == 0


def test_dynamic_batch_wakes_at_oldest_arrival_plus_max_queue_delay():
    rule = DynamicBatch(8, preferred_sizes=(4,), max_queue_delay_s=0.5)
    result = simulate([row(0.25), row(0.5)], [model(rule)], workers=1)
    assert [r.finish_s for r in result.records] == [0.75 + QUARTER.predict(2)] * 2
    assert [r.queue_ms for r in result.records] == [500.0, 250.0]
    assert result.batch_histogram == {"m": {2: 1}}
    assert result.events == 4   # 2 arrivals, 1 wake, 1 completion


def test_a_batch_that_finishes_late_is_deadline_missed_at_its_finish():
    # No shedding: a request that cannot make it still runs (as live with shed_hopeless off)...
    late = simulate([row(0.0, slo_ms=100.0)], [model(DynamicBatch(4))], workers=1).records[0]
    assert (late.status, late.finish_s) == ("deadline_missed", 0.25)
    # ...with shedding it is answered at once, since its deadline is nearer than predict(1).
    shed = simulate([row(0.0, slo_ms=100.0)], [model(DynamicBatch(4), min_latency_s=0.25)], workers=1).records[0]
    assert (shed.status, shed.finish_s) == ("deadline_missed", 0.0)


def test_completion_is_applied_before_arrivals_at_the_same_instant():
    # A runs 0..0.25. B and C arrive at exactly 0.25. Completion first: the slot is free when B
    # arrives, so B starts alone (work-conserving rule) and C waits for it: three batches of 1.
    # (Arrivals first would have queued both and run them as one batch of 2.)
    rows = [row(0.0), row(0.25), row(0.25)]
    result = simulate(rows, [model(DynamicBatch(4))], workers=1)
    assert [r.finish_s for r in result.records] == [0.25, 0.5, 0.75]
    assert result.batch_histogram == {"m": {1: 3}}


def test_arrival_is_applied_before_a_wake_at_the_same_instant():
    # A waits for the queue delay (wake at 0.5); B arrives at exactly 0.5. Arrival first: both
    # go in one batch of 2. (Wake first would have sent A alone.)
    rule = DynamicBatch(8, preferred_sizes=(4,), max_queue_delay_s=0.5)
    result = simulate([row(0.0), row(0.5)], [model(rule)], workers=1)
    assert result.batch_histogram == {"m": {2: 1}}
    assert [r.finish_s for r in result.records] == [0.5 + QUARTER.predict(2)] * 2


def test_arrivals_at_one_instant_are_applied_in_trace_order_even_if_the_trace_is_unsorted():
    rows = [row(0.5, "m"), row(0.0, "m", priority=0), row(0.0, "m", priority=0)]
    result = simulate(rows, [model(DynamicBatch(4))], workers=1)
    # Rows 1 and 2 (t=0) come before row 0 (t=0.5), in trace order: row 1 starts alone, row 2
    # follows when it ends, row 0 arrives as row 2 ends and runs last.
    assert result.records[1].finish_s == 0.25
    assert result.records[2].finish_s == 0.5      # started at 0.25 when row 1 finished
    assert result.records[0].finish_s == 0.75     # arrived at 0.5 while row 2 ran
    assert [r.index for r in result.records] == [0, 1, 2]


# --- every row answered once ----------------------------------------------------------------------


def test_every_trace_row_gets_exactly_one_record(monkeypatch):
    answers: dict[int, int] = {}
    real_result, real_exception = engine._Reply.set_result, engine._Reply.set_exception

    def counted(real):
        def answer(self, value):
            answers[self.record.index] = answers.get(self.record.index, 0) + 1
            real(self, value)
        return answer

    monkeypatch.setattr(engine._Reply, "set_result", counted(real_result))
    monkeypatch.setattr(engine._Reply, "set_exception", counted(real_exception))
    rng = random.Random(7)
    rows = sorted((row(rng.uniform(0, 0.5), rng.choice(["a", "b", "nope"]), slo_ms=rng.choice([1, 5, 30, 200]),
                       priority=rng.choice([0, 0, 1]))
                   for _ in range(3000)), key=lambda r: r.t_s)
    fast = table(0.001, 0.0015, 0.0025, 0.004)
    models = [
        model(DeadlineAwareBatch(fast, 8), fast, instances=2, capacity=16, min_latency_s=0.001, name="a", jitter=0.3),
        model(FixedBatch(4), fast, instances=1, capacity=8, name="b", jitter=0.3),
    ]
    result = simulate(rows, models, workers=2, cores=1, seed=3)
    assert len(result.records) == len(rows)
    assert [r.index for r in result.records] == list(range(len(rows)))
    counts = result.status_counts()
    assert set(counts) <= STATUSES and all(counts[s] > 0 for s in STATUSES), counts
    for rec, trace_row in zip(result.records, rows):
        assert (rec.model, rec.arrival_s, rec.slo_ms, rec.priority) == (trace_row.model, trace_row.t_s,
                                                                       trace_row.slo_ms, trace_row.priority)
        assert rec.finish_s is not None and rec.finish_s >= rec.arrival_s
        if rec.status in ("rejected", "unknown_model"):
            assert rec.finish_s == rec.arrival_s
        else:  # went through the scheduler: answered through its reply sink exactly once
            assert answers.get(rec.index) == 1, rec
        if rec.status == "ok":
            assert rec.latency_ms <= rec.slo_ms + 1e-9
    assert sum(answers.values()) == counts["ok"] + counts["deadline_missed"]


def test_every_batched_request_is_answered_ok_or_late():
    rows = poisson(rate=300, duration_s=2.0, seed=1, slo_ms=20.0)
    fast = table(0.002, 0.003, 0.005, 0.009)
    result = simulate(rows, [model(DynamicBatch(8, (), 0.004), fast, instances=2)], workers=2, cores=1, seed=1)
    batched = sum(s * c for s, c in result.batch_histogram["m"].items())
    counts = result.status_counts()
    assert counts["ok"] <= batched <= counts["ok"] + counts.get("deadline_missed", 0)
    assert counts["ok"] == sum(1 for r in result.records if r.batch_size is not None)


# --- determinism ----------------------------------------------------------------------------------


def _jittered_run(seed: int):
    fast = table(0.002, 0.003, 0.005, 0.009)
    models = [model(DeadlineAwareBatch(fast, 8), fast, instances=2, min_latency_s=0.002, jitter=0.25)]
    return simulate(poisson(rate=400, duration_s=2.0, seed=11, slo_ms=15.0), models, workers=2, seed=seed).records


def test_same_seed_gives_the_same_records():
    assert _jittered_run(5) == _jittered_run(5)


def test_a_different_seed_with_jitter_gives_different_records():
    assert _jittered_run(5) != _jittered_run(6)


def test_without_jitter_the_seed_does_not_matter():
    fast = table(0.002, 0.003, 0.005, 0.009)
    models = [model(DeadlineAwareBatch(fast, 8), fast, instances=2)]
    rows = poisson(rate=400, duration_s=1.0, seed=11, slo_ms=15.0)
    assert simulate(rows, models, workers=2, seed=1).records == simulate(rows, models, workers=2, seed=2).records


def test_executor_noise_has_the_profiled_median():
    executor = SimExecutor({"m": QUARTER}, seed=0, jitter=0.3)
    draws = [executor.work_s("m", 1) for _ in range(4001)]
    assert np.median(draws) == pytest.approx(0.25, rel=0.03)
    assert SimExecutor({"m": QUARTER}, jitter=0.0).work_s("m", 4) == 0.5


# --- processor sharing ----------------------------------------------------------------------------


ONE_SECOND = table(1.0, sizes=[1])      # predict(b) = b seconds


def test_batches_beyond_the_cores_share_them():
    rows = [row(0.0), row(0.5)]
    lanes = [model(DynamicBatch(1), ONE_SECOND, instances=2)]
    # Two cores: no interference.
    assert [r.finish_s for r in simulate(rows, lanes, workers=2, cores=2).records] == [1.0, 1.5]
    # One core: A runs alone 0..0.5 (half done), then both at half speed: A's last 0.5 s of work
    # ends at 1.5; B has done 0.5 by then and finishes alone at 2.0.
    shared = simulate(rows, lanes, workers=2, cores=1)
    assert [r.finish_s for r in shared.records] == [1.5, 2.0]
    assert [r.compute_ms for r in shared.records] == [1500.0, 1500.0]
    # A's first finish (1.0) was popped and ignored; B's (2.5, at half speed) is never reached.
    assert shared.stale_events == 1


def test_default_cores_is_workers_so_nothing_slows():
    rows = [row(0.0), row(0.0), row(0.0)]
    lanes = [model(DynamicBatch(1), ONE_SECOND, instances=3)]
    assert [r.finish_s for r in simulate(rows, lanes, workers=3).records] == [1.0, 1.0, 1.0]
    assert [r.finish_s for r in simulate(rows, lanes, workers=3, cores=1).records] == [3.0, 3.0, 3.0]


# --- overload and batching behaviour --------------------------------------------------------------


def test_a_full_queue_rejects():
    rows = [row(0.0), row(0.0), row(0.0)]
    result = simulate(rows, [model(FixedBatch(4), capacity=2)], workers=1)
    assert [r.status for r in result.records] == ["deadline_missed", "deadline_missed", "rejected"]
    assert result.records[2].finish_s == 0.0


def test_unknown_model_is_recorded_not_raised():
    result = simulate([row(0.0, "ghost")], [model(FixedBatch(1))], workers=1)
    assert (result.records[0].status, result.records[0].finish_s) == ("unknown_model", 0.0)


def test_deadline_aware_batches_grow_with_load():
    latency = table(0.001, 0.0014, 0.0022, 0.0038)     # batching pays: 1 ms alone, 0.475 ms/item at 8
    lanes = [model(DeadlineAwareBatch(latency, 8, margin_s=0.0001), latency, instances=1, min_latency_s=0.001)]
    light = simulate(poisson(rate=100, duration_s=5.0, seed=2, slo_ms=20.0), lanes, workers=1)
    heavy = simulate(poisson(rate=1500, duration_s=5.0, seed=2, slo_ms=20.0), lanes, workers=1)
    assert light.mean_batch_size() < 1.2
    assert heavy.mean_batch_size() > 2.0
    assert heavy.slo_attainment() > 0.95       # 1500/s exceeds what batches of 1 could serve (1000/s)


# --- the live code path ---------------------------------------------------------------------------


def test_the_simulator_drives_the_live_scheduler_class(monkeypatch):
    assert engine.Scheduler is dispatcher.Scheduler
    calls = {"enqueue": 0, "start_alone": 0, "poll": 0, "release": 0}
    for name in calls:
        real = getattr(dispatcher.Scheduler, name)

        def spy(self, *args, _real=real, _name=name):
            calls[_name] += 1
            return _real(self, *args)

        monkeypatch.setattr(dispatcher.Scheduler, name, spy)
    simulate([row(0.0), row(0.125)], [model(FixedBatch(2))], workers=1)
    assert calls["enqueue"] == 2 and calls["release"] == 1 and calls["poll"] >= 2


def test_the_simulator_takes_the_idle_path_where_the_lane_allows_with_the_same_outcome():
    """A lane that starts a lone request at once (build_lane's ``starts_alone``) is simulated through
    Scheduler.start_alone, as the HTTP intake runs it; the decisions are those of the queue."""
    fast = table(0.002, 0.003, 0.005, 0.009)
    lane = SimModel("m", DeadlineAwareBatch(fast, 8), 2, 64, fast, min_latency_s=0.002, starts_alone=True)
    rows = poisson(rate=150, duration_s=2.0, seed=5, slo_ms=15.0)
    started = []
    real = dispatcher.Scheduler.start_alone

    def spy(self, request):
        dispatch = real(self, request)
        started.append(dispatch is not None)
        return dispatch

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dispatcher.Scheduler, "start_alone", spy)
        alone = simulate(rows, [lane], workers=2)
    queued = simulate(rows, [lane], workers=2, idle_path=False)
    assert sum(started) > len(rows) / 4                  # a light load: many requests find the board idle
    assert alone.records == queued.records


def test_models_from_config_mirror_the_live_agent():
    config = parse_config({
        "config_version": 1,
        "agent": {"workers": 2},
        "models": [
            {"name": "a", "card": "demo:mobilenet_digits", "instances": 2, "queue_capacity": 32,
             "batching": {"rule": "deadline_aware", "max_batch": 8, "margin_ms": 0.25}},
            {"name": "b", "card": "demo:resnet_digits",
             "batching": {"rule": "dynamic", "max_batch": 4, "max_queue_delay_ms": 2, "shed_hopeless": False}},
        ],
    })
    tables = {"a": QUARTER, "b": table(0.5, 1.0)}
    a, b = sim_models_from_config(config, tables)
    assert (a.name, a.instances, a.queue_capacity, a.min_latency_s, a.latency) == ("a", 2, 32, 0.25, QUARTER)
    assert isinstance(a.rule, DeadlineAwareBatch) and a.rule.margin_s == 0.00025 and a.rule.max_batch == 8
    assert isinstance(b.rule, DynamicBatch) and b.rule.max_queue_delay_s == 0.002 and b.min_latency_s == 0.0
    with pytest.raises(KeyError, match="'a'"):
        sim_models_from_config(config, {"b": QUARTER})
    assert [m.name for m in sim_models_from_config(Config.demo(), {"mobilenet_digits": QUARTER,
                                                                    "resnet_digits": QUARTER})] == \
        ["mobilenet_digits", "resnet_digits"]
