"""The paper baselines (fifo, Clipper's AIMD, DeepRT's DisBatcher) on a hand-driven clock and in the
simulator, their config validation, and the bench contenders that select them."""
from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edge_lab.bench.contenders import CONTENDERS, apply_contender
from agent.config import Config, ConfigError, parse_config
from agent.core import FixedBatch, LatencyTable
from agent.scheduler.admission import AdmissionControl
from agent.scheduler.baselines import AimdBatch, DisBatch
from agent.scheduler.dispatcher import Scheduler
from tests.scheduling import req
from agent.scheduler.rules import build_lane, build_rule
from agent.sim import SimModel, sim_models_from_config, simulate
from agent.workload.trace import TraceRow


def table(*latencies_s, sizes=None):
    sizes = sizes or [2 ** i for i in range(len(latencies_s))]
    return LatencyTable(np.array(sizes, dtype=np.int64), np.array(latencies_s, dtype=np.float64))


QUARTER = table(0.25, 0.375, 0.5, 0.75)       # predict(1)=0.25 ... predict(8)=0.75


def row(t_s, model="m", slo_ms=10_000.0, priority=0):
    return TraceRow(t_s, "app", model, slo_ms, priority)


def poisson(rate, duration_s, seed, models=("m",), slo_ms=(50.0, 200.0)):
    rng = random.Random(seed)
    rows, t = [], rng.expovariate(rate)
    while t < duration_s:
        rows.append(row(t, rng.choice(models), rng.uniform(*slo_ms)))
        t += rng.expovariate(rate)
    return rows


def fifo_lane(name="a", instances=1):
    return Scheduler.lane(name, FixedBatch(1), instances, 64, fifo=True)


def by_status(result):
    return {status: sorted(r.index for r in result.records if r.status == status)
            for status in {r.status for r in result.records}}


# --- fifo -------------------------------------------------------------------------------------------

def test_fifo_pops_in_arrival_order_even_when_later_arrivals_are_more_urgent():
    s = Scheduler([fifo_lane()], max_concurrent=1)
    first, second, third = req("a", 0.0, 1.0), req("a", 0.1, 0.2, priority=9), req("a", 0.2, 0.05)
    for r in (first, second, third):
        s.enqueue(r)
    order = []
    for _ in range(3):
        d = s.poll(0.3).dispatch
        order.append(d.requests[0])
        assert len(d.requests) == 1
        s.release(d)
    assert order == [first, second, third]


def test_fifo_across_models_serves_the_oldest_head_first():
    s = Scheduler([fifo_lane("a"), fifo_lane("b")], max_concurrent=1)
    old, new = req("b", 0.0, 5.0), req("a", 0.1, 0.01)
    s.enqueue(new)
    s.enqueue(old)
    assert s.poll(0.2).dispatch.requests == [old]


def test_fifo_never_expires_in_the_queue_and_does_not_spin_while_busy():
    s = Scheduler([fifo_lane()], max_concurrent=1)
    a, late = req("a", 0.0, 0.01), req("a", 0.0, 0.01)
    s.enqueue(a)
    s.enqueue(late)
    d = s.poll(5.0)                       # both long past their deadlines
    assert d.expired == [] and d.dispatch.requests == [a]
    busy = s.poll(6.0)                    # the only slot is busy: nothing to wake for
    assert busy.dispatch is None and busy.expired == [] and busy.wake_at == math.inf
    s.release(d.dispatch)
    assert s.poll(7.0).dispatch.requests == [late]


def test_fifo_lane_refuses_shedding_or_admission():
    with pytest.raises(ValueError, match="fifo"):
        Scheduler.lane("a", FixedBatch(1), 1, 64, min_latency_s=0.01, fifo=True)
    with pytest.raises(ValueError, match="fifo"):
        Scheduler.lane("a", FixedBatch(1), 1, 64, admission=AdmissionControl(QUARTER, 1), fifo=True)


def test_fifo_in_the_simulator_computes_late_requests_and_answers_them_missed_at_completion():
    # Batches of one take 0.25 s; three at t=0 with a 0.3 s SLO: the first is on time, the other
    # two run anyway (no expiry, no shedding) and are answered deadline_missed when they finish.
    config = parse_config({"config_version": 1, "agent": {"workers": 1},
                           "models": [{"name": "m", "batching": {"rule": "fifo"}}]})
    models = sim_models_from_config(config, {"m": QUARTER})
    assert models[0].fifo and models[0].min_latency_s == 0 and not models[0].admission
    trace = [row(0.0, slo_ms=300.0), row(0.0, slo_ms=300.0), row(0.0, slo_ms=300.0)]
    result = simulate(trace, models, workers=1)
    assert [r.status for r in result.records] == ["ok", "deadline_missed", "deadline_missed"]
    assert [r.finish_s for r in result.records] == pytest.approx([0.25, 0.5, 0.75])
    assert result.batch_histogram == {"m": {1: 3}}


# --- aimd -------------------------------------------------------------------------------------------

def test_aimd_grows_by_one_per_met_batch_up_to_max_batch():
    rule = AimdBatch(4)
    assert rule.batch_limit == 1
    for expected in (2, 3, 4, 4):
        rule.observe(rule.batch_limit, 0.01, True)
        assert rule.batch_limit == expected


def test_aimd_shrinks_to_floor_of_ninety_percent_and_never_below_one():
    rule = AimdBatch(64)
    rule.batch_limit = 25
    rule.observe(25, 0.1, False)
    assert rule.batch_limit == 22          # floor(22.5)
    rule.batch_limit = 5
    rule.observe(5, 0.1, False)
    assert rule.batch_limit == 4           # floor(4.5)
    rule.batch_limit = 1
    rule.observe(1, 0.1, False)
    assert rule.batch_limit == 1


def test_aimd_takes_up_to_its_limit_whenever_anything_waits():
    s = Scheduler([Scheduler.lane("a", AimdBatch(8), 1, 64)], max_concurrent=1)
    for _ in range(5):
        s.enqueue(req("a", 0.0, 10.0))
    rule = s.lanes["a"].rule
    rule.batch_limit = 3
    assert rule.plan(s.lanes["a"].queue, 0.0).take == 3
    assert len(s.poll(0.0).dispatch.requests) == 3


def test_scheduler_observe_feeds_aimd_met_or_missed():
    s = Scheduler([Scheduler.lane("a", AimdBatch(8), 1, 64)], max_concurrent=1)
    s.enqueue(req("a", 0.0, 1.0))
    d = s.poll(0.0).dispatch
    s.release(d)
    s.observe(d, 0.5)                       # met
    assert s.lanes["a"].rule.batch_limit == 2
    s.enqueue(req("a", 1.0, 1.0))
    s.enqueue(req("a", 1.0, 0.1))
    d = s.poll(1.0).dispatch
    assert len(d.requests) == 2
    s.release(d)
    s.observe(d, 1.2)                       # the 0.1 s one missed
    assert s.lanes["a"].rule.batch_limit == 1


def test_aimd_in_the_simulator_grows_then_backs_off():
    # A steady stream with a generous SLO: batches grow past 1.
    trace = [row(0.01 * i, slo_ms=5_000.0) for i in range(200)]
    result = simulate(trace, [SimModel("m", AimdBatch(8), 1, 1024, QUARTER)], workers=1)
    assert max(result.batch_histogram["m"]) > 1
    assert all(r.status in ("ok", "deadline_missed") for r in result.records)


# --- disbatcher ---------------------------------------------------------------------------------------

def test_disbatcher_holds_between_joints_and_wakes_at_the_next_joint():
    s = Scheduler([Scheduler.lane("a", DisBatch(0.1, 8), 1, 64)], max_concurrent=1)
    s.enqueue(req("a", 0.01, 10.0))
    s.enqueue(req("a", 0.05, 10.0))
    d = s.poll(0.05)
    assert d.dispatch is None and d.wake_at == pytest.approx(0.1)
    d = s.poll(0.1)
    assert len(d.dispatch.requests) == 2
    s.release(d.dispatch)


def test_disbatcher_releases_one_job_per_joint():
    s = Scheduler([Scheduler.lane("a", DisBatch(0.1, 2), 2, 64)], max_concurrent=2)
    for t in (0.01, 0.02, 0.03):
        s.enqueue(req("a", t, 10.0))
    first = s.poll(0.1)
    assert len(first.dispatch.requests) == 2          # up to max_batch
    second = s.poll(0.1)                              # a second instance is free, but the joint is served
    assert second.dispatch is None and second.wake_at == pytest.approx(0.2)
    third = s.poll(0.2)
    assert len(third.dispatch.requests) == 1


def test_disbatcher_request_after_the_joint_waits_for_the_next_one():
    s = Scheduler([Scheduler.lane("a", DisBatch(0.1, 8), 1, 64)], max_concurrent=1)
    s.enqueue(req("a", 0.13, 10.0))                   # the queue was empty at the 0.1 joint
    d = s.poll(0.13)
    assert d.dispatch is None and d.wake_at == pytest.approx(0.2)
    assert len(s.poll(0.2).dispatch.requests) == 1


def test_disbatcher_busy_at_the_joint_releases_at_the_first_poll_after_it():
    s = Scheduler([Scheduler.lane("a", DisBatch(0.1, 8), 1, 64)], max_concurrent=1)
    s.enqueue(req("a", 0.01, 10.0))
    running = s.poll(0.1).dispatch
    s.enqueue(req("a", 0.15, 10.0))
    s.enqueue(req("a", 0.16, 10.0))
    assert s.poll(0.2).dispatch is None               # busy at the 0.2 joint
    s.release(running)
    late = s.poll(0.23).dispatch
    assert late is not None and len(late.requests) == 2
    s.release(late)
    s.enqueue(req("a", 0.24, 10.0))
    assert s.poll(0.25).dispatch is None              # the 0.2 joint is served; next at 0.3


def test_disbatcher_joint_is_not_spent_when_another_model_wins_the_slot():
    s = Scheduler([Scheduler.lane("a", DisBatch(0.1, 8), 1, 64), Scheduler.lane("b", FixedBatch(1), 1, 64)],
                  max_concurrent=1)
    s.enqueue(req("a", 0.01, 10.0))
    urgent = req("b", 0.09, 0.05)
    s.enqueue(urgent)
    d = s.poll(0.1)
    assert d.dispatch.requests == [urgent]            # EDF across models
    s.release(d.dispatch)
    assert s.poll(0.11).dispatch.model == "a"         # the 0.1 joint still releases a's job


def test_disbatcher_in_the_simulator_dispatches_exactly_at_joints():
    # Window 0.5 s; two instances, so no joint finds the lane busy. Jitter 0: exact times.
    trace = [row(0.1), row(0.2), row(0.6), row(1.7), row(1.9)]
    models = [SimModel("m", DisBatch(0.5, 8), 2, 64, QUARTER)]
    result = simulate(trace, models, workers=2)
    starts = [r.arrival_s + r.queue_ms / 1000.0 for r in result.records]
    assert starts == pytest.approx([0.5, 0.5, 1.0, 2.0, 2.0])
    assert [r.finish_s for r in result.records] == [0.5 + 0.375, 0.5 + 0.375, 1.0 + 0.25, 2.0 + 0.375, 2.0 + 0.375]
    assert result.batch_histogram == {"m": {1: 1, 2: 2}}
    assert all(r.status == "ok" for r in result.records)


# --- config -------------------------------------------------------------------------------------------

def _config(batching):
    return parse_config({"config_version": 1, "models": [{"name": "m", "batching": batching}]})


def test_config_accepts_the_baseline_rules_with_their_defaults():
    fifo = _config({"rule": "fifo"}).models[0].batching
    assert (fifo.rule, fifo.shed_hopeless, fifo.admission) == ("fifo", False, False)
    aimd = _config({"rule": "aimd", "max_batch": 16}).models[0].batching
    assert (aimd.shed_hopeless, aimd.admission) == (False, False)
    dis = _config({"rule": "disbatcher", "window_ms": 25}).models[0].batching
    assert dis.window_ms == 25.0 and (dis.shed_hopeless, dis.admission) == (False, False)
    assert _config({"rule": "disbatcher", "window_ms": 25, "admission": True}).models[0].batching.admission


def test_config_rejects_disbatcher_without_a_positive_window():
    with pytest.raises(ConfigError) as exc:
        _config({"rule": "disbatcher"})
    assert exc.value.field == "models[0].batching.window_ms" and "disbatcher" in exc.value.expected
    with pytest.raises(ConfigError, match="window_ms = 0"):
        _config({"rule": "disbatcher", "window_ms": 0})
    with pytest.raises(ConfigError, match=r"window_ms = -1: expected a number >= 0"):
        _config({"rule": "aimd", "window_ms": -1})
    with pytest.raises(ConfigError, match="window_ms"):
        _config({"rule": "disbatcher", "window_ms": "10"})


@pytest.mark.parametrize("key", ["shed_hopeless", "admission"])
def test_config_rejects_shedding_or_admission_with_fifo(key):
    with pytest.raises(ConfigError) as exc:
        _config({"rule": "fifo", key: True})
    assert exc.value.field == f"models[0].batching.{key}" and exc.value.value is True
    assert "fifo" in exc.value.expected


def test_config_rejects_an_unknown_rule_listing_the_baselines():
    with pytest.raises(ConfigError, match="disbatcher"):
        _config({"rule": "round_robin"})


def test_build_rule_and_lane_for_the_baselines():
    for batching, kind in (({"rule": "fifo"}, FixedBatch), ({"rule": "aimd"}, AimdBatch),
                           ({"rule": "disbatcher", "window_ms": 40}, DisBatch)):
        model = _config(batching).models[0]
        rule = build_rule(model.batching, QUARTER)
        assert isinstance(rule, kind)
        lane = build_lane("m", rule, model, QUARTER)
        assert lane.fifo == (batching["rule"] == "fifo")
    assert build_rule(_config({"rule": "fifo"}).models[0].batching, QUARTER).max_batch == 1
    assert build_rule(_config({"rule": "disbatcher", "window_ms": 40}).models[0].batching, QUARTER).window_s == 0.04


# --- contenders ---------------------------------------------------------------------------------------

SLOS = {"mobilenet_digits": 50.0, "resnet_digits": 80.0}


def test_contenders_have_descriptions_citing_a_source():
    assert set(CONTENDERS) == {"fifo", "fixed", "triton", "clipper", "deeprt", "edge", "learned"}
    for name, spec in CONTENDERS.items():
        assert spec.name == name and spec.description and "\n" not in spec.description


@pytest.mark.parametrize("contender", sorted(CONTENDERS))
def test_apply_contender_rewrites_every_model(contender):
    base = Config.demo()
    config = apply_contender(base, contender, slo_ms_by_model=SLOS)
    assert base.models[0].batching.rule == "deadline_aware"     # the original is untouched
    expected_rule = {"fifo": "fifo", "fixed": "fixed", "triton": "dynamic", "clipper": "aimd",
                     "deeprt": "disbatcher", "edge": "deadline_aware", "learned": "deadline_aware"}[contender]
    for model in config.models:
        b = model.batching
        assert b.rule == expected_rule
        build_rule(b, QUARTER)                                   # buildable
        if contender == "fifo":
            assert model.instances == 1 and not b.shed_hopeless and not b.admission
        if contender == "fixed":
            assert b.size == 4 and not b.shed_hopeless and not b.admission
        if contender == "triton":
            assert b.preferred_sizes == (b.max_batch,) and b.max_queue_delay_ms == 2.0
            assert not b.shed_hopeless and not b.admission
        if contender == "clipper":
            assert not b.shed_hopeless and not b.admission
        if contender == "deeprt":
            assert b.window_ms == SLOS[model.name] / 2 and b.admission and not b.shed_hopeless
        if contender == "edge":
            assert b.shed_hopeless and b.admission
        if contender == "learned":   # admission as the shipped policy was trained (its card's lanes)
            off = set(json.loads((Path(config.policy_path) / "card.json").read_text())["training"]["admission_off"])
            assert b.shed_hopeless and b.admission == (model.name not in off)
            assert config.policy == "learned" and config.policy_path.endswith("cpu-2core")
        if contender != "fifo":
            assert model.instances == base.model(model.name).instances
    assert config.workers == (1 if contender == "fifo" else base.workers)
    # Our batch cap is ours: the baselines (deeprt has admission control, which it would reach) run without it.
    ours = contender in ("edge", "learned")     # the learned policy runs on our lanes' settings
    assert config.hold_fraction == (base.hold_fraction if ours else 0.0) and base.hold_fraction > 0
    assert config.admission_lookahead == ours and base.admission_lookahead
    assert config.edf_horizon_ms == (base.edf_horizon_ms if ours else 0.0) and base.edf_horizon_ms > 0
    assert (config.device, config.mqtt) == (base.device, base.mqtt)


@pytest.mark.parametrize("training, off", [
    ({"lanes": "edge"}, set()),
    ({"lanes": "shed"}, {"mobilenet_digits", "resnet_digits"}),
    ({"lanes": "shed_cheapest", "admission_off": ["mobilenet_digits"]}, {"mobilenet_digits"}),
    ({}, set()),
])
def test_learned_contender_runs_without_admission_only_where_its_card_was_trained_so(tmp_path, training, off):
    (tmp_path / "card.json").write_text(json.dumps({"training": training}))
    config = apply_contender(replace(Config.demo(), policy_path=str(tmp_path)), "learned")
    assert {m.name: m.batching.admission for m in config.models} == \
        {m.name: m.name not in off for m in Config.demo().models}
    assert all(m.batching.shed_hopeless for m in config.models)


@pytest.mark.parametrize("lanes", ["edge", "shed", "shed_cheapest"])
def test_learned_contender_runs_a_policy_on_the_lanes_the_trainer_trained_it_on(tmp_path, monkeypatch, lanes):
    """tools/train_policy.py writes the lanes without admission into the card; the bench's contender
    must rebuild exactly the lanes the simulator trained on."""
    import importlib
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "tools"))
    train_policy = importlib.import_module("train_policy")
    board = train_policy.BOARDS["cpu-2core"]
    trained = train_policy.edge_config(lanes, board)
    off = train_policy.admission_off(lanes, board)
    (tmp_path / "card.json").write_text(json.dumps({"training": {"lanes": lanes, "admission_off": off}}))
    run = apply_contender(replace(trained, policy_path=str(tmp_path)), "learned")
    assert {m.name: m.batching for m in run.models} == {m.name: m.batching for m in trained.models}
    if lanes == "shed_cheapest":     # the cheap model's lane alone goes without admission
        assert off == ["mobilenet_digits"]


def test_apply_contender_errors():
    with pytest.raises(ValueError, match="slo_ms_by_model"):
        apply_contender(Config.demo(), "deeprt")
    with pytest.raises(ValueError, match="resnet_digits"):
        apply_contender(Config.demo(), "deeprt", slo_ms_by_model={"mobilenet_digits": 50.0})
    with pytest.raises(ValueError) as exc:
        apply_contender(Config.demo(), "sjf")
    for name in CONTENDERS:
        assert name in str(exc.value)


@pytest.mark.parametrize("contender", sorted(CONTENDERS))
def test_every_contender_runs_a_poisson_trace_answering_each_row_once(contender, monkeypatch):
    import agent.sim.engine as engine
    answers = {}

    for method in ("set_result", "set_exception"):
        real = getattr(engine._Reply, method)

        def counted(self, value, _real=real):
            answers[self.record.index] = answers.get(self.record.index, 0) + 1
            _real(self, value)
        monkeypatch.setattr(engine._Reply, method, counted)

    names = ("mobilenet_digits", "resnet_digits")
    trace = poisson(rate=30.0, duration_s=4.0, seed=7, models=names, slo_ms=(300.0, 1500.0))
    tables = {"mobilenet_digits": table(0.02, 0.03, 0.04, 0.06), "resnet_digits": table(0.04, 0.06, 0.08, 0.12)}
    config = apply_contender(replace(Config.demo(), workers=2), contender,
                          slo_ms_by_model={n: min(r.slo_ms for r in trace if r.model == n) for n in names})
    result = simulate(trace, sim_models_from_config(config, tables), config.worker_count)
    rejected = [r for r in result.records if r.status == "rejected"]
    answered_by_sink = [r for r in result.records if r.status != "rejected"]
    assert all(answers.get(r.index) == 1 for r in answered_by_sink)
    assert all(r.index not in answers for r in rejected)        # refused at arrival: recorded once by the engine
    assert all(r.status in ("ok", "deadline_missed", "rejected") and r.finish_s is not None for r in result.records)
    assert sum(1 for r in result.records if r.status == "ok") > len(trace) // 2
