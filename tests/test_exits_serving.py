"""Early exit in serving (issue 24 items 2 and 3): ``min_accuracy`` on both wires, the exit rule of
each mode, stage-by-stage batches that answer items at their exit, and admission priced by the stages.

The agent runs the shipped multi-exit model ``camera_exits`` (its stage graphs, on onnxruntime) on the
card's own labelled test frames; the MQTT and HTTP tests go through a real broker and a real socket.
"""
from __future__ import annotations

import json
import threading
import time
import urllib.request
from concurrent.futures import Future

import msgpack
import numpy as np
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.backends import load_backend
from agent.config import CONFIG_VERSION, ConfigError, parse_config
from agent.core import LatencyTable
from agent.errors import BAD_REQUEST, REJECTED, InferenceError
from agent.intake.msgpack_codec import decode_reply, decode_request, encode_request
from agent.intake.oip import parse_infer_request
from agent.models.card import load_card
from agent.models.digits import camera_frames, card_test_set, load_test_set
from agent.scheduler.admission import AdmissionControl
from agent.scheduler.dispatcher import Scheduler
from agent.scheduler.exit_rule import choose_exit, exit_plan
from agent.scheduler.request import Request
from agent.service import Service
from agent.transport.paho_client import connect, make_client
from tests.scheduling import Sink

DEVICE = "exits-board"
FIXED, CONFIDENCE = "exits_fixed", "exits_confidence"
SLO_MS = 30000      # loose: these tests are about which exit answers, not about time
FEW = 96


@pytest.fixture(scope="module")
def card():
    return load_card("demo:camera_exits")


@pytest.fixture(scope="module")
def test_set(card):
    """The card's whole labelled test set (the per-class accuracy is over all of it)."""
    return card_test_set(card.raw["dataset"], card.source.parent)


@pytest.fixture(scope="module")
def few(card):
    """The first frames of the same test set (frame i depends only on the seed and i): what the tests
    that compare answers need, without drawing all 360 (seconds on this machine)."""
    dataset = card.raw["dataset"]
    images, labels = load_test_set(card.source.parent / dataset["test_file"])
    return camera_frames(images[:FEW], dataset["seed"], int(dataset["frame_size"])), labels[:FEW]


@pytest.fixture(scope="module")
def whole(card, few):
    """Every exit's logits on the first test frames from the whole-graph file (not the stages)."""
    frames, _ = few
    backend = load_backend("onnxruntime", card.verify_file("onnx"), threads=1, providers=["CPUExecutionProvider"])
    try:
        parts = [backend.run({"frames": np.ascontiguousarray(frames[i:i + 32])}) for i in range(0, len(frames), 32)]
    finally:
        backend.close()
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def model(name: str, mode: str) -> dict:
    return {"name": name, "card": "demo:camera_exits", "instances": 1, "exit_mode": mode,
            "batching": {"rule": "deadline_aware", "max_batch": 4}}


@pytest.fixture(scope="module")
def service(broker):
    cfg = parse_config({
        "config_version": CONFIG_VERSION,
        "agent": {"device": DEVICE, "workers": 2},
        "mqtt": {"host": broker.host, "port": broker.port},
        "http": {"enabled": True, "port": 0},
        "models": [model(FIXED, "fixed"), model(CONFIDENCE, "confidence")],
    })
    with Service(cfg) as svc:
        yield svc


def submit_all(agent, name, frames, targets, window=256):
    """Every frame with its target, at most ``window`` in the queue at once (it holds 1024)."""
    futures = []
    for i, t in enumerate(targets):
        if i >= window:
            futures[i - window].result(timeout=120)
        # priority 1: two models share the board, and the cost share must not refuse a test's request
        futures.append(agent.submit(name, {"frames": frames[i:i + 1]}, slo_ms=SLO_MS, min_accuracy=t, priority=1))
    return [f.result(timeout=120) for f in futures]


# --- the rule ------------------------------------------------------------------------------------

def test_fixed_mode_takes_the_earliest_exit_accurate_enough(card):
    plan = exit_plan(card, "fixed")
    accuracy = [p.accuracy for p in card.exits]
    assert accuracy[0] < accuracy[1] < accuracy[2]
    assert choose_exit(plan, "m", accuracy[0]).fixed == 0
    assert choose_exit(plan, "m", accuracy[0] + 1e-6).fixed == 1
    assert choose_exit(plan, "m", accuracy[1]).fixed == 1
    assert choose_exit(plan, "m", accuracy[2]).fixed == 2
    assert choose_exit(plan, "m", None).fixed == 2          # no requirement: the model's best
    with pytest.raises(InferenceError) as refused:
        choose_exit(plan, "m", accuracy[2] + 1e-6)
    assert refused.value.code == REJECTED and refused.value.field == "min_accuracy"
    assert "no exit" in refused.value.message and "final" in refused.value.message


def test_confidence_mode_rounds_the_target_up_to_a_calibrated_one(card):
    plan = exit_plan(card, "confidence")
    calibration = card.exits[0].calibration
    targets, thresholds = calibration.targets, calibration.threshold
    between = (targets[1] + targets[2]) / 2                # rounds up to targets[2]
    choice = choose_exit(plan, "m", between)
    assert choice.fixed is None and choice.deepest == 2
    assert choice.thresholds[0] == thresholds[2]
    assert choice.thresholds[1] == card.exits[1].calibration.threshold[2]
    assert choice.thresholds[2] is None                    # the last exit answers whatever its confidence


def test_exit_mode_is_checked_in_the_config():
    with pytest.raises(ConfigError) as bad:
        parse_config({"config_version": CONFIG_VERSION, "mqtt": {"enabled": False},
                      "models": [model("m", "sometimes")]})
    assert "exit_mode" in str(bad.value) and "confidence" in str(bad.value)


def test_exit_mode_needs_a_card_with_exits():
    from agent.api import Agent
    cfg = parse_config({"config_version": CONFIG_VERSION, "mqtt": {"enabled": False},
                        "models": [{"name": "m", "card": "demo:mobilenet_digits", "exit_mode": "fixed"}]})
    with pytest.raises(ValueError, match="two or more exits"):
        Agent(cfg)


# --- stage by stage ------------------------------------------------------------------------------

def test_stages_continue_to_the_whole_models_last_exit(service, few, whole):
    frames, _ = few
    results = submit_all(service.agent, FIXED, frames, [None] * len(frames))
    assert {r.served_by["exit"] for r in results} == {"final"}
    assert max(r.batch_size for r in results) > 1          # batched, and still the same answers
    logits = np.concatenate([r.outputs["logits"] for r in results])
    np.testing.assert_allclose(logits, whole["logits"], atol=1e-4, rtol=0)


def test_a_low_target_leaves_at_exit1_with_exit1s_answer(service, few, whole):
    frames, _ = few
    n = 64
    results = submit_all(service.agent, FIXED, frames[:n], [0.8] * n)
    assert {r.served_by["exit"] for r in results} == {"exit1"}
    assert all(set(r.outputs) == {"logits"} for r in results)
    logits = np.concatenate([r.outputs["logits"] for r in results])
    np.testing.assert_allclose(logits, whole["exit1_logits"][:n], atol=1e-4, rtol=0)


class _Logged:
    """A real stage session whose runs are written to a shared log (what ran before each answer)."""

    def __init__(self, backend, name, log):
        self.backend, self.name, self.log = backend, name, log

    def run(self, batch):
        self.log.append(("run", self.name, len(next(iter(batch.values())))))
        return self.backend.run(batch)


def test_items_that_leave_early_are_answered_before_the_batch_goes_on(card, few, whole):
    """A batch of 6 (three for exit1, one for exit2, two for the last exit): the exit1 items are
    answered after stage 1 and before stage 2 runs, on their rows of stage 1; the survivors' rows go
    on, and the items answered are each answered once, with their exit's logits."""
    from agent.runtime.staged import run_staged
    frames, _ = few
    plan = exit_plan(card, "fixed")
    targets = [0.8, None, 0.8, 0.9, None, 0.8]
    requests = [Request(i, "m", {}, 0.0, 1.0, 0, Sink(), None, t, choose_exit(plan, "m", t))
                for i, t in enumerate(targets)]
    log: list = []
    stages = [_Logged(load_backend("onnxruntime", p.verify_stage(), providers=["CPUExecutionProvider"]), p.name, log)
              for p in card.exits]
    answered: dict[int, tuple[str, np.ndarray]] = {}

    def answer(items, compute_s, extra):
        log.append(("answer", extra["exit"], sorted(i for i, _ in items)))
        for i, outputs in items:
            assert i not in answered
            answered[i] = (extra["exit"], outputs["logits"])
    sizes = run_staged(requests, {"frames": np.ascontiguousarray(frames[:6])}, stages, plan,
                       [p.stage_input.name for p in card.exits],
                       [None if p.stage_output is None else p.stage_output.name for p in card.exits],
                       answer, time.perf_counter, [{"exit": p.name} for p in card.exits])
    assert log == [("run", "exit1", 6), ("answer", "exit1", [0, 2, 5]), ("run", "exit2", 3),
                   ("answer", "exit2", [3]), ("run", "final", 2), ("answer", "final", [1, 4])]
    assert sizes == [6, 3, 2]
    output_of = {p.name: p.output for p in card.exits}
    for i in range(6):
        name, logits = answered[i]
        np.testing.assert_allclose(logits[0], whole[output_of[name]][i], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", [FIXED, CONFIDENCE])
def test_delivered_accuracy_per_class_meets_what_it_asked(service, test_set, name):
    """Each class asks for every test frame (the card's accuracies are over the whole test set), the
    classes interleaved so that they share batches."""
    frames, labels = test_set
    classes = (0.85, 0.95, 0.97)
    order = [(target, i) for i in range(len(frames)) for target in classes]
    results = submit_all(service.agent, name, np.stack([frames[i] for _, i in order]), [t for t, _ in order])
    correct = np.array([int(np.argmax(r.outputs["logits"])) == labels[i] for r, (_, i) in zip(results, order)])
    exits = [r.served_by["exit"] for r in results]
    for target in classes:
        mine = np.array([t == target for t, _ in order])
        assert correct[mine].mean() >= target, (name, target, correct[mine].mean())
    assert exits.count("exit1") > len(frames) // 2        # the exits were used, not the last one for all


# --- admission priced by the stages --------------------------------------------------------------

def _exit_request(rid, plan, min_accuracy, arrival, slo_s):
    return Request(rid, "m", {}, arrival, arrival + slo_s, 0, Sink(), None, min_accuracy,
                   choose_exit(plan, "m", min_accuracy))


def test_admission_prices_a_request_by_the_stages_up_to_its_exit(card):
    """A deadline that stage 1 makes and the whole model does not: exit1's class is admitted, the
    last exit's refused with a reason naming the exit it needs."""
    from agent.core import DeadlineAwareBatch
    plan = exit_plan(card, "fixed")
    table = LatencyTable(np.array([1, 8]), np.array([0.010, 0.080]))      # 10 ms a whole batch of one
    fraction1 = plan.fraction(0, 1)
    slo_s = 0.010 * (fraction1 + 1.0) / 2                                 # between stage 1 and the whole
    lane = Scheduler.lane("m", DeadlineAwareBatch(table, 8), 1, 64, admission=AdmissionControl(table, 8))
    lane.exits = plan
    scheduler = Scheduler([lane], max_concurrent=1)
    scheduler.enqueue(_exit_request(1, plan, 0.8, 0.0, slo_s))            # exit1: admitted
    with pytest.raises(InferenceError) as refused:
        scheduler.enqueue(_exit_request(2, plan, 0.97, 0.0, slo_s))
    assert refused.value.code == REJECTED
    assert "needs exit 'final'" in refused.value.message and "cannot be met in time" in refused.value.message


# --- on the wires --------------------------------------------------------------------------------

def test_min_accuracy_round_trips_on_the_msgpack_wire():
    frame = np.zeros((160, 160, 3), np.uint8)
    decoded = decode_request(encode_request("r", {"frames": frame}, slo_ms=10, min_accuracy=0.9), 1 << 20)
    assert decoded.min_accuracy == 0.9


@pytest.mark.parametrize("value", [-0.1, 1.5, "0.9", True, None.__class__])
def test_bad_min_accuracy_in_oip_parameters_is_refused_naming_the_field(card, value):
    if value is None.__class__:
        value = [0.5]
    body = json.dumps({"inputs": [{"name": "frames", "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [0, 0, 0]}],
                       "parameters": {"min_accuracy": value}}).encode()
    with pytest.raises(InferenceError) as bad:
        parse_infer_request("m", body, None, card.inputs, card.outputs)
    assert bad.value.code == BAD_REQUEST and bad.value.field == "parameters.min_accuracy"


class _Replies:
    def __init__(self, broker):
        self.topic = "apps/exits/replies"
        self.futures: dict[bytes, Future] = {}
        self.client = make_client("exits-test-app")
        self.client.on_message = self._on_message
        connect(self.client, broker.host, broker.port)
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe(self.topic, qos=1)
        assert done.wait(10)

    def _on_message(self, client, userdata, message):
        future = self.futures.get(message.properties.CorrelationData)
        if future is not None and not future.done():
            future.set_result(decode_reply(message.payload))

    def ask(self, name: str, payload: bytes, correlation: bytes) -> dict:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.topic
        props.CorrelationData = correlation
        future = self.futures[correlation] = Future()
        self.client.publish(f"edge/v1/{DEVICE}/infer/{name}", payload, qos=1, properties=props)
        return future.result(timeout=30)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def test_mqtt_reply_names_the_exit_and_bad_min_accuracy_is_refused(service, broker, few):
    frames, _ = few
    app = _Replies(broker)
    try:
        ok = app.ask(FIXED, encode_request("a", {"frames": frames[0]}, slo_ms=SLO_MS, min_accuracy=0.8), b"1")
        assert ok["status"] == "ok" and ok["served_by"]["exit"] == "exit1"
        assert ok["served_by"]["device"] == DEVICE and set(ok["outputs"]) == {"logits"}
        best = app.ask(FIXED, encode_request("b", {"frames": frames[0]}, slo_ms=SLO_MS), b"2")
        assert best["status"] == "ok" and best["served_by"]["exit"] == "final"
        too_high = app.ask(FIXED, encode_request("c", {"frames": frames[0]}, slo_ms=SLO_MS, min_accuracy=0.999), b"3")
        assert too_high["status"] == "error" and too_high["error"]["code"] == REJECTED
        assert too_high["error"]["field"] == "min_accuracy" and "no exit" in too_high["error"]["message"]
        raw = msgpack.unpackb(encode_request("d", {"frames": frames[0]}, slo_ms=SLO_MS), raw=False)
        raw["min_accuracy"] = 1.5
        bad = app.ask(FIXED, msgpack.packb(raw, use_bin_type=True), b"4")
        assert bad["status"] == "error" and bad["error"]["code"] == BAD_REQUEST
        assert bad["error"]["field"] == "min_accuracy" and bad["id"] == "d"
    finally:
        app.close()


def _post(port: int, name: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{name}/infer", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_http_reply_names_the_exit_and_bad_min_accuracy_is_refused(service, few, whole):
    frames, _ = few
    port = service.http.port
    tensor = {"name": "frames", "datatype": "UINT8", "shape": [2, 160, 160, 3], "data": frames[:2].ravel().tolist()}
    status, body = _post(port, FIXED, {"inputs": [tensor], "parameters": {"min_accuracy": 0.8, "slo_ms": SLO_MS}})
    assert status == 200, body
    assert body["parameters"]["exit"] == ["exit1", "exit1"]
    (out,) = body["outputs"]
    assert out["name"] == "logits" and out["shape"] == [2, 10]
    np.testing.assert_allclose(np.array(out["data"]).reshape(2, 10), whole["exit1_logits"][:2], atol=1e-4)
    one = dict(tensor, shape=[1, 160, 160, 3], data=frames[0].ravel().tolist())
    status, body = _post(port, FIXED, {"inputs": [one], "parameters": {"slo_ms": SLO_MS}})
    assert status == 200 and body["parameters"]["exit"] == "final"
    status, body = _post(port, FIXED, {"inputs": [one], "parameters": {"min_accuracy": 2}})
    assert status == 400 and "parameters.min_accuracy" in body["error"] and body["error"].startswith("bad_request")
    status, body = _post(port, FIXED, {"inputs": [one], "parameters": {"min_accuracy": 0.999}})
    assert status >= 400 and body["error"].startswith("rejected") and "no exit" in body["error"]


# --- the same in the simulator -------------------------------------------------------------------

def test_the_simulator_runs_exits_stage_by_stage(card):
    """The simulator's executor answers an exit1 item once stage 1 is done (its compute is stage 1's
    share of the batch's time), a last-exit item after the whole batch, refuses a target no exit
    reaches, and answers every accepted row once."""
    from agent.sim.engine import sim_models_from_config, simulate
    from agent.workload.trace import TraceRow
    cfg = parse_config({"config_version": CONFIG_VERSION, "agent": {"workers": 2}, "mqtt": {"enabled": False},
                        "models": [model("m", "fixed")]})
    table = LatencyTable(np.array([1, 4]), np.array([0.004, 0.012]))
    plan = exit_plan(card, "fixed")
    targets = [0.8, None, 0.8, 0.9, None, 0.999] * 40
    trace = [TraceRow(0.002 * i, "app", "m", 500.0, 0, t) for i, t in enumerate(targets)]
    result = simulate(trace, sim_models_from_config(cfg, {"m": table}, cards={"m": card}), workers=2)
    expected = {0.8: "exit1", None: "final", 0.9: "exit2"}
    for row, record in zip(trace, result.records):
        if row.min_accuracy == 0.999:
            assert record.status == REJECTED
            continue
        assert record.status == "ok" and record.exit == expected[row.min_accuracy]
        if record.exit == "exit1":
            assert record.compute_ms == pytest.approx(
                1000 * table.predict(record.batch_size) * plan.fraction(0, record.batch_size), rel=1e-9)
        if record.exit == "final":
            assert record.compute_ms > 1000 * table.predict(1) * plan.fraction(1, 1) - 1e-9


def test_confidence_mode_in_the_simulator_leaves_early_by_the_calibration(card):
    from agent.sim.engine import sim_models_from_config, simulate
    from agent.workload.trace import TraceRow
    cfg = parse_config({"config_version": CONFIG_VERSION, "agent": {"workers": 2}, "mqtt": {"enabled": False},
                        "models": [model("m", "confidence")]})
    table = LatencyTable(np.array([1, 4]), np.array([0.004, 0.012]))
    trace = [TraceRow(0.003 * i, "app", "m", 500.0, 0, 0.8 if i % 2 else 0.97) for i in range(400)]
    result = simulate(trace, sim_models_from_config(cfg, {"m": table}, cards={"m": card}), workers=2)
    assert all(r.status == "ok" for r in result.records)
    low = [r.exit for r, row in zip(result.records, trace) if row.min_accuracy == 0.8]
    high = [r.exit for r, row in zip(result.records, trace) if row.min_accuracy == 0.97]
    # 0.8's exit1 threshold covers (nearly) every calibration item; 0.97's about half of them
    assert low.count("exit1") > 0.85 * len(low)
    assert 0.2 * len(high) < high.count("exit1") < 0.8 * len(high)
