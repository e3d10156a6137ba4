"""The learned policy's board side: the policy card's checks (schema, action space, lanes, weights'
hash), the numpy forward pass against an independent reference, the features and mask read from a
real scheduler, and the policy driving the simulator end to end with every request answered once.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.config import parse_config
from agent.core import DeadlineAwareBatch, LatencyTable
from agent.learned.actions import ACTION_SCHEMA_VERSION, IDLE, ActionSpace, action_names
from agent.learned.card import PolicyCardError, load_policy, write_policy
from agent.learned.features import BATCH_BUCKETS, FEATURE_SCHEMA_VERSION, FeatureBuilder, feature_names
from agent.learned.net import MLP
from agent.scheduler.dispatcher import Scheduler
from agent.scheduler.request import Request
from agent.sim import SimModel, simulate
from agent.workload.trace import TraceRow

LANES = ("fast", "slow")
REPO = Path(__file__).resolve().parents[1]


def random_weights(n_in: int, n_out: int, seed: int = 0, hidden: int = 32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w1": rng.normal(0, 0.5, (n_in, hidden)), "b1": rng.normal(0, 0.1, hidden),
            "w2": rng.normal(0, 0.5, (hidden, hidden)), "b2": rng.normal(0, 0.1, hidden),
            "w3": rng.normal(0, 0.5, (hidden, n_out)), "b3": rng.normal(0, 0.1, n_out)}


def make_policy(directory: Path, lanes=LANES, seed: int = 0) -> Path:
    n_in, n_out = len(feature_names(lanes)), len(action_names(lanes))
    rng = np.random.default_rng(seed + 1)
    write_policy(directory, random_weights(n_in, n_out, seed), lanes=lanes, buckets=BATCH_BUCKETS,
                 mean=rng.normal(0, 1, n_in), std=rng.uniform(0.5, 2.0, n_in), idle_tick_ms=1.0,
                 training={"test": True})
    return directory


# --- the card --------------------------------------------------------------------------------------

def test_card_round_trip(tmp_path):
    loaded = load_policy(make_policy(tmp_path), ["slow", "fast"])
    assert loaded.lanes == LANES
    assert loaded.net.n_in == len(feature_names(LANES))
    assert loaded.net.n_out == len(action_names(LANES))


def test_card_refuses_weights_with_another_hash(tmp_path):
    directory = make_policy(tmp_path)
    weights = directory / "policy.npz"
    np.savez_compressed(weights, **random_weights(len(feature_names(LANES)), len(action_names(LANES)), seed=7))
    with pytest.raises(PolicyCardError, match="sha256"):
        load_policy(directory)


def _edit_card(directory: Path, edit) -> None:
    path = directory / "card.json"
    card = json.loads(path.read_text())
    edit(card)
    path.write_text(json.dumps(card))


def test_card_refuses_another_feature_schema_version(tmp_path):
    directory = make_policy(tmp_path)
    _edit_card(directory, lambda c: c["feature_schema"].update(version=FEATURE_SCHEMA_VERSION + 1))
    with pytest.raises(PolicyCardError, match=f"feature schema version {FEATURE_SCHEMA_VERSION + 1}"):
        load_policy(directory)


def test_card_refuses_other_feature_names_naming_them(tmp_path):
    directory = make_policy(tmp_path)

    def rename(card):
        card["feature_schema"]["names"][1] = "fast.something_else"
    _edit_card(directory, rename)
    with pytest.raises(PolicyCardError, match="something_else") as info:
        load_policy(directory)
    assert "fast.head_slack_ms" in str(info.value)


def test_card_refuses_another_action_space(tmp_path):
    directory = make_policy(tmp_path)
    _edit_card(directory, lambda c: c["action_space"].update(version=ACTION_SCHEMA_VERSION + 1))
    with pytest.raises(PolicyCardError, match="action space version"):
        load_policy(directory)
    directory = make_policy(tmp_path / "b")
    _edit_card(directory, lambda c: c["action_space"]["names"].__setitem__(0, "offload"))
    with pytest.raises(PolicyCardError, match="offload"):
        load_policy(directory)


def test_card_refuses_lanes_the_agent_does_not_serve_naming_them(tmp_path):
    directory = make_policy(tmp_path)
    with pytest.raises(PolicyCardError, match="other_model") as info:
        load_policy(directory, ["fast", "other_model"])
    assert "slow" in str(info.value)


# --- the forward pass --------------------------------------------------------------------------------

def test_forward_matches_an_independent_reference(tmp_path):
    loaded = load_policy(make_policy(tmp_path, seed=3))
    card = loaded.card
    with np.load(tmp_path / "policy.npz") as data:
        w = {k: data[k].astype(np.float64) for k in data.files}
    mean = np.array(card["normalisation"]["mean"])
    std = np.array(card["normalisation"]["std"])
    rng = np.random.default_rng(11)
    for _ in range(20):
        x = rng.normal(0, 3, loaded.net.n_in)
        # The reference: plain float64 matrix products, a layer at a time.
        z = (x - mean) / std
        h = np.where(z @ w["w1"] + w["b1"] > 0, z @ w["w1"] + w["b1"], 0)
        h = np.where(h @ w["w2"] + w["b2"] > 0, h @ w["w2"] + w["b2"], 0)
        expected = h @ w["w3"] + w["b3"]
        got = loaded.net.forward(x.astype(np.float32)).astype(np.float64)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        mask = rng.random(loaded.net.n_out) < 0.5
        mask[0] = True
        chosen = loaded.net.act(x.astype(np.float32), mask)
        assert mask[chosen] and expected[chosen] >= np.max(expected[mask]) - 1e-4


def test_network_shape_checked():
    with pytest.raises(ValueError, match="w2 has shape"):
        MLP({"w1": np.zeros((4, 8)), "b1": np.zeros(8), "w2": np.zeros((9, 8)), "b2": np.zeros(8),
             "w3": np.zeros((8, 3)), "b3": np.zeros(3)}, np.zeros(4), np.ones(4))


# --- features and mask from a real scheduler -------------------------------------------------------

def table(*ms: float) -> LatencyTable:
    return LatencyTable(np.array([1, 2, 4, 8], dtype=np.int64), np.array(ms, dtype=np.float64) / 1000.0)


FAST = table(1.0, 2.0, 4.0, 8.0)
SLOW = table(4.0, 8.0, 16.0, 32.0)


def sim_models(max_batch: int = 8) -> list[SimModel]:
    return [SimModel("fast", DeadlineAwareBatch(FAST, max_batch), 2, 256, FAST, min_latency_s=0.001,
                     admission=True, starts_alone=True),
            SimModel("slow", DeadlineAwareBatch(SLOW, max_batch), 1, 256, SLOW, min_latency_s=0.004,
                     admission=True, starts_alone=True)]


def test_features_and_mask_read_the_queue():
    scheduler = Scheduler([m.lane() for m in sim_models(max_batch=4)], max_concurrent=2)
    for rid, (slo_ms, at) in enumerate([(50.0, 0.0), (10.0, 0.001), (200.0, 0.002)], start=1):
        scheduler.enqueue(Request(rid, "fast", {}, at, at + slo_ms / 1000, 0, None))
    builder = FeatureBuilder(LANES)
    x = dict(zip(builder.names, builder.fill(scheduler, 0.003).tolist()))
    assert x["fast.queue"] == 3 and x["slow.queue"] == 0
    assert x["fast.tight_slack_ms"] == pytest.approx(8.0, abs=1e-3)       # the 10 ms request, 2 ms after its arrival
    assert x["fast.oldest_wait_ms"] == pytest.approx(3.0, abs=1e-3)
    assert x["fast.rate_lt25ms"] > 0 and x["fast.rate_25to100ms"] > 0 and x["fast.rate_ge100ms"] > 0
    assert x["fast.free"] == 2 and x["fast.busy"] == 0
    assert x["slow.batch_ms_b4"] == pytest.approx(16.0)
    assert x["slots_free"] == 2
    space = ActionSpace(LANES)
    mask = space.fill_mask(scheduler)
    allowed = {space.names[i] for i in np.flatnonzero(mask)}
    # b8 would take what b4 takes (max_batch 4), and nothing of "slow" is queued.
    assert allowed == {"idle", "fast:b1", "fast:b2", "fast:b4"}
    assert space.decode(space.names.index("fast:b4"), scheduler).batch_size == 4
    assert space.decode(IDLE, scheduler) is None


# --- end to end in the simulator ------------------------------------------------------------------

def trace(n: int = 600, seed: int = 5) -> list[TraceRow]:
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1 / 400.0, n))
    rows = []
    for i, at in enumerate(t):
        model = "fast" if rng.random() < 0.6 else "slow"
        slo = float(rng.choice([10.0, 50.0])) if model == "fast" else float(rng.choice([30.0, 150.0]))
        rows.append(TraceRow(float(at), f"{model}_{slo:g}", model, slo, 0))
    return rows


def test_learned_policy_drives_the_simulator_every_request_answered_once(tmp_path):
    directory = make_policy(tmp_path)
    rows = trace()
    result = simulate(rows, sim_models(), workers=2, policy="learned",
                      policy_options={"policy_path": str(directory)})
    assert len(result.records) == len(rows)
    statuses = {r.status for r in result.records}
    assert "unanswered" not in statuses and statuses <= {"ok", "deadline_missed", "rejected"}
    assert all(r.finish_s is not None and r.finish_s >= r.arrival_s for r in result.records)
    # Each computed request was answered once: ok, or deadline_missed when its batch ended late.
    computed = sum(b * n for hist in result.batch_histogram.values() for b, n in hist.items())
    counts = result.status_counts()
    assert counts["ok"] <= computed <= counts["ok"] + counts.get("deadline_missed", 0)
    assert sum(1 for r in result.records if r.status == "ok") > len(rows) // 2


def test_learned_policy_chooser_sees_only_allowed_actions():
    seen = []

    def chooser(features, mask, now):
        seen.append(mask.copy())
        return int(np.flatnonzero(mask)[-1])
    rows = trace(300)
    result = simulate(rows, sim_models(), workers=2, policy="learned",
                      policy_options={"learned_chooser": chooser, "learned_lanes": LANES})
    assert seen and all(m[0] and m[1:].any() for m in seen)
    assert all(r.status != "unanswered" for r in result.records)


def test_config_needs_a_policy_path_for_learned():
    from agent.config import ConfigError
    base = {"config_version": 1, "agent": {"policy": "learned"},
            "models": [{"name": "m", "card": "demo:mobilenet_digits", "backend": "onnxruntime", "file": "onnx"}]}
    with pytest.raises(ConfigError, match="policy_path"):
        parse_config(base)
    config = parse_config({**base, "agent": {"policy": "learned", "policy_path": "policies/cpu-2core"}}, REPO)
    assert config.policy_path == str(REPO / "policies" / "cpu-2core")


# --- the shipped policy, live -------------------------------------------------------------------------

DEMO_MODELS = ["mobilenet_digits", "resnet_digits"]


def test_shipped_cpu_policy_loads_for_the_demo_models_and_is_small():
    directory = REPO / "policies" / "cpu-2core"
    loaded = load_policy(directory, DEMO_MODELS)
    assert (directory / "policy.npz").stat().st_size + (directory / "card.json").stat().st_size < 100_000
    assert loaded.card["net"]["hidden"] == [32, 32]
    assert loaded.card["training"]["teacher_agreement"]["agreement"] >= 0.95


def test_live_agent_under_the_shipped_policy_answers_every_request_once(digits):
    from agent.api import Agent
    from agent.config import CONFIG_VERSION
    frames, labels = digits
    models = [{"name": name, "card": f"demo:{name}", "instances": 2 if name.startswith("mobilenet") else 1,
               "batching": {"rule": "deadline_aware", "max_batch": 8}} for name in DEMO_MODELS]
    config = parse_config({"config_version": CONFIG_VERSION,
                           "agent": {"device": "test", "workers": 2, "policy": "learned",
                                     "policy_path": str(REPO / "policies" / "cpu-2core")},
                           "mqtt": {"enabled": False}, "models": models})
    with Agent(config) as agent:
        assert agent.scheduler.policy.name == "learned"
        futures = [agent.submit(DEMO_MODELS[i % 2], {"frames": frames[i]}, slo_ms=5000) for i in range(60)]
        replies = [f.result(timeout=60) for f in futures]
    assert len(replies) == 60
    predicted = [int(np.argmax(next(iter(r.outputs.values())))) for r in replies]
    assert np.mean(np.array(predicted) == np.asarray(labels[:60])) > 0.9


def test_compiled_and_pure_forward_agree(tmp_path):
    from agent.core import IMPLEMENTATION
    from agent.core.pure.policy_net import PolicyNet as PurePolicyNet
    if IMPLEMENTATION != "compiled":
        pytest.skip("the compiled core is not loaded (EDGE_AGENT_CORE=python)")
    from agent.core._policy_net import PolicyNet as CompiledPolicyNet
    net = load_policy(make_policy(tmp_path, seed=5)).net
    weights = (net.mean, net.inv_std, net.w1, net.b1, net.w2, net.b2, net.w3, net.b3)
    pure, compiled = PurePolicyNet(*weights), CompiledPolicyNet(*weights)
    rng = np.random.default_rng(2)
    for _ in range(200):
        x = rng.normal(0, 3, net.n_in).astype(np.float32)
        mask = (rng.random(net.n_out) < 0.6).astype(np.uint8)
        chosen = pure.act(x, mask), compiled.act(x, mask)
        np.testing.assert_allclose(pure.logits, compiled.logits, rtol=1e-4, atol=1e-4)
        allowed = np.sort(compiled.logits[mask > 0])
        if len(allowed) < 2 or allowed[-1] - allowed[-2] > 1e-3:    # no near tie for the top
            assert chosen[0] == chosen[1]
        expected = net.forward(x)
        np.testing.assert_allclose(compiled.logits, expected, rtol=1e-4, atol=1e-4)
        if mask.any():   # the action is the allowed one with the largest logit (up to float rounding)
            assert mask[chosen[0]] and expected[chosen[0]] >= np.max(expected[mask > 0]) - 1e-4
        else:
            assert chosen[0] == -1


def test_policy_swapped_under_load_every_request_answered_once(digits, tmp_path):
    """Rules -> learned -> a refused card -> rules while a thread keeps submitting: every request gets
    exactly one reply (a result: the SLO is loose), and a refused card leaves the old policy deciding."""
    import threading

    from agent.api import Agent
    from agent.config import CONFIG_VERSION
    frames, _ = digits
    models = [{"name": name, "card": f"demo:{name}", "instances": 1,
               "batching": {"rule": "deadline_aware", "max_batch": 8}} for name in DEMO_MODELS]
    config = parse_config({"config_version": CONFIG_VERSION, "agent": {"device": "test", "workers": 2},
                           "mqtt": {"enabled": False}, "models": models})
    bad = make_policy(tmp_path / "bad", lanes=("mobilenet_digits", "other"))
    futures, stop = [], threading.Event()
    with Agent(config) as agent:
        def submit():
            i = 0
            while not stop.is_set() or i < 40:
                futures.append(agent.submit(DEMO_MODELS[i % 2], {"frames": frames[i % len(frames)]}, slo_ms=20_000))
                i += 1
                if i % 8 == 0:
                    stop.wait(0.005)
        thread = threading.Thread(target=submit)
        thread.start()
        try:
            swaps = [agent.set_policy("learned", str(REPO / "policies" / "cpu-2core"))]
            assert agent.scheduler.policy.name == "learned"
            with pytest.raises(ValueError, match="other"):
                agent.set_policy("learned", str(bad))
            assert agent.scheduler.policy.name == "learned" and agent.config.policy == "learned"
            swaps.append(agent.set_policy("rules"))
            assert agent.scheduler.policy.name == "rules"
        finally:
            stop.set()
            thread.join(timeout=60)
        results = [f.result(timeout=60) for f in futures]
    assert [s["was"] for s in swaps] == ["rules", "learned"]
    assert len(results) == len(futures) >= 40
    assert all(f.done() and f.exception() is None for f in futures)


def test_transition_log_credits_each_outcome_once(tmp_path):
    from agent.learned.transitions import TransitionLog, outcome_values
    rows = trace(400)
    log = TransitionLog(lambda features, mask, now: int(np.flatnonzero(mask)[-1]),
                        len(feature_names(LANES)), len(action_names(LANES)), capacity=8)   # grows
    result = simulate(rows, sim_models(), workers=2, policy="learned",
                      policy_options={"learned_chooser": log, "learned_lanes": LANES})
    data = log.transitions(result.records)
    assert log.n == len(data["action"]) > 8
    assert np.all(np.diff(data["time"]) >= 0)
    np.testing.assert_array_equal(data["next_state"][:-1], data["state"][1:])
    assert data["done"][-1] and not data["done"][:-1].any()
    # Every answered outcome lands in exactly one step: the rewards sum to the outcomes' values.
    _, values = outcome_values(result.records)
    assert float(data["reward"].sum()) == pytest.approx(float(values.sum()), abs=1e-4)
    in_time = sum(1 for r in result.records if r.status == "ok" and r.latency_ms <= r.slo_ms)
    assert (values > 0).sum() == in_time
    path = log.save(tmp_path / "t.npz", result.records, {"features": feature_names(LANES)})
    with np.load(path) as saved:
        assert json.loads(str(saved["header"]))["features"] == feature_names(LANES)
        assert saved["state"].shape == data["state"].shape


def test_compiled_and_pure_features_and_mask_agree_along_a_simulated_run():
    from agent.core import IMPLEMENTATION
    from agent.core.pure.policy_features import fill_features as pure_fill
    from agent.core.pure.policy_features import fill_mask as pure_mask
    from agent.learned.features import ARRIVAL_TAU_S, GOODPUT_TAU_S, SLACK_CLIP_MS
    if IMPLEMENTATION != "compiled":
        pytest.skip("the compiled core is not loaded (EDGE_AGENT_CORE=python)")
    checked = []

    class Checking:
        def bind(self, scheduler):
            self.scheduler = scheduler

        def __call__(self, features, mask, now):
            builder = self.scheduler.policy.features      # the learned policy asking
            lanes = [self.scheduler.lanes[name] for name in builder.lanes]
            twin = np.empty_like(features)
            pure_fill(lanes, builder._ordered, builder._batch_list, self.scheduler, now, SLACK_CLIP_MS,
                      ARRIVAL_TAU_S, GOODPUT_TAU_S, twin)
            np.testing.assert_allclose(features, twin, rtol=1e-6, atol=1e-4)
            twin_mask = np.empty(len(mask), dtype=np.uint8)
            pure_mask(lanes, BATCH_BUCKETS, self.scheduler.in_flight, self.scheduler.max_concurrent, twin_mask)
            np.testing.assert_array_equal(mask, twin_mask.astype(bool))
            checked.append(features[0])
            return int(np.flatnonzero(mask)[-1])

    result = simulate(trace(400), sim_models(), workers=2, policy="learned",
                      policy_options={"learned_chooser": Checking(), "learned_lanes": LANES})
    assert len(checked) > 50 and max(checked) > 1          # decisions with a backlog were compared
    assert all(r.status != "unanswered" for r in result.records)


def test_compiled_and_pure_decisions_agree_along_a_simulated_run(tmp_path, monkeypatch):
    """The fused decision (mask, features, forward and argmax in one compiled call) against its
    pure twin at every decision of a simulated run under a loaded policy: the same mask and starts,
    the same features, the same action wherever the top allowed logits are not a float tie."""
    from agent.core import IMPLEMENTATION
    if IMPLEMENTATION != "compiled":
        pytest.skip("the compiled core is not loaded (EDGE_AGENT_CORE=python)")
    import agent.scheduler.policies.learned as learned_module
    from agent.core._policy_decide import PolicyDecider as CompiledDecider
    from agent.core.pure.policy_decide import PolicyDecider as PureDecider
    from agent.core.pure.policy_net import PolicyNet as PurePolicyNet
    directory = make_policy(tmp_path, seed=3)
    mlp = load_policy(directory).net
    weights = (mlp.mean, mlp.inv_std, mlp.w1, mlp.b1, mlp.w2, mlp.b2, mlp.w3, mlp.b3)
    outcomes = []

    class Checking:
        def __init__(self, lanes, goodput, batch_ms, buckets, net, features, mask, *constants):
            self.compiled = CompiledDecider(lanes, goodput, batch_ms, buckets, net, features, mask, *constants)
            self.features, self.mask = features, mask
            self.pure_net = PurePolicyNet(*weights)
            self.pure = PureDecider(lanes, goodput, batch_ms, buckets, self.pure_net, np.empty_like(features),
                                    np.empty_like(mask), *constants)

        def decide(self, scheduler, now):
            index = self.compiled.decide(scheduler, now)
            twin = self.pure.decide(scheduler, now)
            np.testing.assert_array_equal(self.mask, self.pure.mask)
            assert self.compiled.starts == self.pure.starts
            if index >= 0:
                np.testing.assert_allclose(self.features, self.pure.features, rtol=1e-6, atol=1e-4)
                allowed = np.sort(self.pure_net.logits[self.mask > 0])
                if len(allowed) < 2 or allowed[-1] - allowed[-2] > 1e-3:
                    assert index == twin
            else:
                assert twin == -1
            outcomes.append(index)
            return index

    monkeypatch.setattr(learned_module, "PolicyDecider", Checking)
    result = simulate(trace(400), sim_models(), workers=2, policy="learned",
                      policy_options={"policy_path": str(directory)})
    assert all(r.status != "unanswered" for r in result.records)
    assert sum(1 for i in outcomes if i > 0) > 50 and -1 in outcomes     # starts, and decisions with none allowed


def test_gymnasium_env_steps_through_a_simulated_trace():
    pytest.importorskip("gymnasium")
    import sys
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from policy_env import DispatchEnv
    finally:
        sys.path.remove(str(REPO / "tools"))
    rows = trace(300)

    def run(trace_rows, on_reply=None, **options):
        return simulate(trace_rows, sim_models(), workers=2, policy="learned", policy_options=options,
                        on_reply=on_reply)
    env = DispatchEnv(run, lambda rng: rows, LANES)
    obs, info = env.reset(seed=0)
    assert obs.shape == env.observation_space.shape and info["action_mask"][0]
    steps, total, done = 0, 0.0, False
    while not done:
        obs, reward, done, truncated, info = env.step(int(np.flatnonzero(info["action_mask"])[-1]))
        steps, total = steps + 1, total + reward
    assert steps > 10 and 0 < total <= len(rows) + 1e-6     # about 1 per answer in time
    env.reset(seed=1)
    env.step(0)
    env.close()                                              # a simulation stopped half-way
