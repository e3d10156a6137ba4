"""Commands that change a serving board: load-model, unload-model, set-batching, set-slo-default,
selftest, reload-config, rotate-key. A real Mosquitto, a real `edge-agent run` process started with
one model, signed commands from a plain MQTT v5 client (and `edge-agent ctl` for the CLI's path),
inference requests from a real client; every command and every request is answered exactly once."""
import http.client
import json
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.client import InferenceClient
from agent.models.digits import frames_from_digits, load_test_set
from agent.ops.keys import Keyring, generate_key_pair, load_signing_key
from agent.ops.signing import decode_ack, sign
from agent.transport.paho_client import connect, make_client

DEVICE = "live-board"
MODEL = "mobilenet_digits"
SECOND = "resnet_digits"


def config_text(broker, ring, models=(MODEL,), port=None) -> str:
    text = (f'config_version = 1\n[agent]\ndevice = "{DEVICE}"\nworkers = 1\n'
            f'[mqtt]\nhost = "{broker.host}"\nport = {port or broker.port}\nsubscribers = ["infer", "cmd"]\n'
            f'[control]\nkeyring = "{ring}"\n')
    for name in models:
        text += f'[[models]]\nname = "{name}"\ncard = "demo:{MODEL if name != SECOND else SECOND}"\n'
    return text


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    ops = tmp_path_factory.mktemp("ops")
    ring = tmp_path_factory.mktemp("ring")
    for name in ("alice", "carol", "bob"):
        generate_key_pair(ops, name)
    for name in ("alice", "carol"):                            # bob arrives by rotate-key
        shutil.copy(ops / f"{name}.pub", ring / f"{name}.pub")
    return {"dir": ops, "ring": ring, **{name: load_signing_key(ops / f"{name}.key") for name in ("alice", "carol", "bob")}}


@pytest.fixture(scope="module")
def board(broker, keys, tmp_path_factory):
    config = tmp_path_factory.mktemp("agent") / "agent.toml"
    config.write_text(config_text(broker, keys["ring"]))
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config), "--http-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "serving" in line:
            break
    assert seen and "serving" in seen[-1], "".join(seen)
    http_port = int(seen[-1].split("http://127.0.0.1:")[1].split()[0])
    drain = threading.Thread(target=lambda: [seen.append(line) for line in proc.stdout], daemon=True)
    drain.start()
    yield {"proc": proc, "config": config, "http_port": http_port}
    proc.terminate()
    proc.wait(timeout=30)
    drain.join(5)
    assert proc.returncode == 0, "".join(seen)


class Operator:
    """Publishes signed commands and collects every ack by correlation data."""

    def __init__(self, broker, keys) -> None:
        self.keys = keys
        self.topic = f"ops/live-{time.monotonic_ns()}/acks"
        self.acks: dict[bytes, list[dict]] = defaultdict(list)
        self.cond = threading.Condition()
        self.client = make_client(f"op-{time.monotonic_ns()}")
        self.client.on_message = self._on_message
        connect(self.client, broker.host, broker.port)
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe(self.topic, qos=1)
        assert done.wait(10)
        self._n = 0

    def _on_message(self, client, userdata, message):
        with self.cond:
            self.acks[message.properties.CorrelationData].append(decode_ack(message.payload))
            self.cond.notify_all()

    def send(self, command: str, args: dict | None = None, key: str = "alice") -> bytes:
        self._n += 1
        correlation = f"{command}-{self._n}".encode()
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.topic
        props.CorrelationData = correlation
        self.client.publish(f"edge/v1/{DEVICE}/cmd/{command}", sign(command, args or {}, DEVICE, self.keys[key]),
                            qos=1, properties=props)
        return correlation

    def ack(self, correlation: bytes, timeout: float = 60.0) -> dict:
        with self.cond:
            assert self.cond.wait_for(lambda: self.acks[correlation], timeout), f"no ack for {correlation!r}"
            return self.acks[correlation][0]

    def run(self, command: str, args: dict | None = None, key: str = "alice") -> dict:
        return self.ack(self.send(command, args, key))

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture()
def operator(broker, keys, board):
    op = Operator(broker, keys)
    yield op
    op.close()
    assert all(len(acks) == 1 for acks in op.acks.values()), dict(op.acks)    # each command answered once


@pytest.fixture(scope="module")
def frames():
    images, _ = load_test_set()
    return frames_from_digits(images)


class Replies:
    """An inference client that counts every reply per request id."""

    def __init__(self, broker) -> None:
        self.client = InferenceClient(broker.host, broker.port, DEVICE, f"app-{time.monotonic_ns()}")
        self.replies: dict[str, list[dict]] = defaultdict(list)
        self.lock = threading.Lock()

    def send(self, model, frame, rid, slo_ms=10_000):
        def on_reply(reply, rtt):
            with self.lock:
                self.replies[rid].append(reply)
        self.client.send(model, {"frames": frame}, on_reply, slo_ms=slo_ms, request_id=rid)

    def wait(self, rids, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if all(self.replies[r] for r in rids):
                    break
            time.sleep(0.02)
        time.sleep(0.3)                                        # a second reply would show up now
        with self.lock:
            missing = [r for r in rids if not self.replies[r]]
            twice = [r for r in rids if len(self.replies[r]) > 1]
        assert not missing and not twice, (missing, twice)
        return {r: self.replies[r][0] for r in rids}

    def close(self):
        self.client.close()


def http_ready(board, model: str) -> int:
    """The HTTP intake's GET /v2/models/MODEL/ready status (200 ready, 400 not)."""
    connection = http.client.HTTPConnection("127.0.0.1", board["http_port"], timeout=10)
    try:
        connection.request("GET", f"/v2/models/{model}/ready")
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def code(reply: dict) -> str:
    return "ok" if reply["status"] == "ok" else reply["error"]["code"]


def test_load_model_by_ctl_then_it_serves_and_the_status_lists_it(broker, keys, board, operator, frames):
    out = subprocess.run([sys.executable, "-m", "agent.cli", "ctl", "--device", DEVICE, "--port", str(broker.port),
                          "--key", str(keys["dir"] / "alice.key"), "--compact", "--timeout", "60", "load-model",
                          "--name", SECOND, "--card", f"demo:{SECOND}", "--batching", '{"max_batch": 4}'],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    ack = json.loads(out.stdout.splitlines()[0])
    assert ack["ok"] and ack["result"]["model"] == SECOND and ack["result"]["batching"]["max_batch"] == 4
    client = InferenceClient(broker.host, broker.port, DEVICE, f"app-{time.monotonic_ns()}")
    try:
        reply = client.infer(SECOND, {"frames": frames[0]}, slo_ms=10_000, timeout=30)
    finally:
        client.close()
    assert reply["status"] == "ok", reply
    assert http_ready(board, SECOND) == 200                      # the HTTP intake serves it too
    status = operator.run("status")["result"]
    assert set(status["models"]) >= {MODEL, SECOND}
    again = operator.run("load-model", {"name": SECOND, "card": f"demo:{SECOND}"})
    assert not again["ok"] and again["code"] == "model_loaded"


def test_bad_model_commands_are_refused_with_the_field_named(operator):
    zero = operator.run("load-model", {"name": "x", "card": f"demo:{MODEL}", "instances": 0})
    assert zero["code"] == "bad_args" and "args.instances" in zero["reason"]
    relative = operator.run("load-model", {"name": "x", "card": "models/x.json"})
    assert relative["code"] == "bad_args" and "absolute" in relative["reason"]
    missing = operator.run("load-model", {"name": "x", "card": "/nonexistent/card.json"})
    assert missing["code"] == "load_failed" and "/nonexistent/card.json" in missing["reason"]
    assert operator.run("set-batching", {"model": "nope", "max_batch": 2})["code"] == "unknown_model"
    big = operator.run("set-batching", {"model": MODEL, "max_batch": 5000})
    assert big["code"] == "bad_args" and "args.max_batch" in big["reason"]
    fifo = operator.run("set-batching", {"model": MODEL, "rule": "fifo", "shed_hopeless": False, "admission": False})
    assert fifo["code"] == "cannot_apply_live" and "fifo" in fifo["reason"]
    assert operator.run("status")["result"]["models"].keys() >= {MODEL}


def test_set_batching_changes_the_rule_while_requests_are_answered(broker, operator, frames):
    replies = Replies(broker)
    try:
        rids = [f"sb-{i}" for i in range(40)]
        for i, rid in enumerate(rids[:20]):
            replies.send(MODEL, frames[i], rid)
        ack = operator.run("set-batching", {"model": MODEL, "max_batch": 2, "max_wait_ms": 1})
        for i, rid in enumerate(rids[20:]):
            replies.send(MODEL, frames[i], rid)
        got = replies.wait(rids)
    finally:
        replies.close()
    assert ack["ok"], ack
    assert ack["result"]["batching"]["max_batch"] == 2 and ack["result"]["was"]["max_batch"] == 8
    # Each answered once: served, or refused at the door by admission (a burst of 40 is overload to
    # the cost share); none lost in the swap, none expired or failed.
    assert {code(r) for r in got.values()} <= {"ok", "rejected"}, [r.get("error") for r in got.values()]
    assert any(code(got[rid]) == "ok" for rid in rids[20:])
    batching = operator.run("status")["result"]["models"][MODEL]["batching"]
    assert batching["max_batch"] == 2 and batching["rule"] == "deadline_aware"
    whole = operator.run("set-batching", {"model": MODEL, "rule": "dynamic", "max_batch": 4, "max_queue_delay_ms": 1})
    assert whole["ok"] and operator.run("status")["result"]["models"][MODEL]["batching"]["rule"] == "dynamic"


def test_set_slo_default_for_one_model_and_for_all(operator):
    one = operator.run("set-slo-default", {"model": MODEL, "slo_ms": 1234})
    assert one["ok"] and one["result"]["was"] == {MODEL: 100.0}
    assert operator.run("status")["result"]["models"][MODEL]["default_slo_ms"] == 1234
    every = operator.run("set-slo-default", {"all": True, "slo_ms": 250})
    models = operator.run("status")["result"]["models"]
    assert every["ok"] and set(every["result"]["was"]) == set(models)
    assert all(m["default_slo_ms"] == 250 for m in models.values())
    assert operator.run("set-slo-default", {"model": MODEL, "slo_ms": -1})["code"] == "bad_args"


def test_unload_model_answers_every_accepted_request_once_and_refuses_the_rest(broker, board, operator, frames):
    victim = "victim"
    assert operator.run("load-model", {"name": victim, "card": f"demo:{SECOND}", "batching": {"max_batch": 2}})["ok"]
    replies = Replies(broker)
    try:
        before = [f"v-before-{i}" for i in range(120)]
        for i, rid in enumerate(before):
            replies.send(victim, frames[i % 50], rid)
        time.sleep(0.05)                                         # some queued, one batch running
        ack = operator.run("unload-model", {"model": victim, "timeout_s": 0})
        after = [f"v-after-{i}" for i in range(10)]
        for i, rid in enumerate(after):
            replies.send(victim, frames[i], rid)
        got = replies.wait(before + after)
    finally:
        replies.close()
    assert ack["ok"], ack
    result = ack["result"]
    unloaded = [r for r in before if code(got[r]) == "shutting_down"]
    assert len(unloaded) == result["answered_shutting_down"]
    assert all("unloaded" in got[r]["error"]["message"] for r in unloaded)
    assert result["served"] + result["answered_shutting_down"] == result["queued_at_unload"]
    # Accepted before the unload: served or answered shutting_down (admission may have refused some
    # at the door, "rejected"); arrived after it: unknown_model.
    assert {code(got[r]) for r in before} <= {"ok", "shutting_down", "unknown_model", "rejected"}
    assert any(code(got[r]) == "ok" for r in before)
    assert all(code(got[r]) == "unknown_model" for r in after), [got[r] for r in after]
    assert victim not in operator.run("status")["result"]["models"]
    assert http_ready(board, victim) != 200
    # The name is free again.
    assert operator.run("load-model", {"name": victim, "card": f"demo:{MODEL}"})["ok"]
    assert operator.run("unload-model", {"model": victim})["result"]["queued_at_unload"] == 0


def test_selftest_acks_with_the_report(operator):
    ack = operator.run("selftest", {"groups": ["core", "files", "broker", "headroom"]})
    assert ack["ok"], ack
    report = ack["result"]
    assert report["device"] == DEVICE and report["skipped_groups"] == ["models", "accelerators"]
    names = [c["check"] for c in report["checks"]]
    assert "core" in names and "broker" in names and not any(n.startswith("model ") for n in names)
    assert all(c["status"] in ("ok", "warn", "fail", "skip") for c in report["checks"])
    assert operator.run("selftest", {"groups": ["nope"]})["code"] == "bad_args"


def test_reload_config_adds_a_model_and_refuses_a_broker_change(broker, keys, board, operator, frames):
    config = board["config"]
    before = operator.run("status")["result"]["models"]
    config.write_text(config_text(broker, keys["ring"], models=(MODEL, "reloaded")))
    ack = operator.run("reload-config")
    assert ack["ok"], ack
    assert ack["result"]["added"] == ["reloaded"]
    assert set(ack["result"]["removed"]) == set(before) - {MODEL}   # what ctl loaded, not in the file
    status = operator.run("status")["result"]["models"]
    assert set(status) == {MODEL, "reloaded"}
    assert status[MODEL]["batching"]["rule"] == "deadline_aware"     # the file's batching again
    client = InferenceClient(broker.host, broker.port, DEVICE, f"app-{time.monotonic_ns()}")
    try:
        assert client.infer("reloaded", {"frames": frames[1]}, slo_ms=10_000, timeout=30)["status"] == "ok"
    finally:
        client.close()
    config.write_text(config_text(broker, keys["ring"], models=(MODEL,), port=broker.port + 1))
    refused = operator.run("reload-config")
    assert not refused["ok"] and refused["code"] == "needs_restart"
    assert "mqtt.port" in refused["reason"] and "restart" in refused["reason"]
    assert refused["result"]["needs_restart"] == [f"mqtt.port: {broker.port} -> {broker.port + 1}"]
    assert set(operator.run("status")["result"]["models"]) == {MODEL, "reloaded"}   # nothing applied
    config.write_text(config_text(broker, keys["ring"], models=(MODEL, "reloaded")))


def test_rotate_key_trusts_the_new_key_and_refuses_the_revoked_one(broker, keys, board, operator):
    out = subprocess.run([sys.executable, "-m", "agent.cli", "ctl", "--device", DEVICE, "--port", str(broker.port),
                          "--key", str(keys["dir"] / "carol.key"), "--compact", "--timeout", "30", "rotate-key",
                          "--key-id", "bob", "--public-key", f"@{keys['dir'] / 'bob.pub'}", "--revoke", "carol"],
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stdout + out.stderr
    ack = json.loads(out.stdout.splitlines()[0])
    assert ack["result"]["installed"] == "bob" and ack["result"]["revoked"] == ["carol"]
    assert operator.run("status", key="bob")["ok"]
    revoked = operator.run("status", key="carol")
    assert not revoked["ok"] and revoked["code"] == "revoked_key"
    ring = Keyring.from_dir(keys["ring"])                          # what a restart will trust
    assert ring.lookup("bob")[0] is not None and ring.lookup("carol")[1] == "revoked_key"
    clash = operator.run("rotate-key", {"key_id": "alice", "public_key": (keys["dir"] / "bob.pub").read_text()})
    assert clash["code"] == "bad_args" and "another key" in clash["reason"]


def test_fuzzed_commands_through_the_broker_are_each_refused_once_with_a_reason(broker):
    from edge_lab.bench.signing import fuzz_agent
    fuzz = fuzz_agent(300, seed=3)
    assert fuzz["first_ack"] == "ok"                             # the board does obey a good command
    assert fuzz["accepted"] == 0 and fuzz["without_reason"] == 0
    assert fuzz["unanswered"] == 0 and fuzz["answered_twice"] == 0
    assert sum(fuzz["codes"].values()) == 300 and "ok" not in fuzz["codes"]
    assert fuzz["agent_exit"] == 0


def test_set_policy_refuses_a_card_for_other_models_and_swaps_by_name(operator, tmp_path):
    import numpy as np

    from agent.learned.actions import action_names
    from agent.learned.card import write_policy
    from agent.learned.features import BATCH_BUCKETS, feature_names
    lanes = (MODEL, "not_loaded_here")
    n_in, n_out = len(feature_names(lanes)), len(action_names(lanes))
    write_policy(tmp_path, {"w1": np.zeros((n_in, 32)), "b1": np.zeros(32), "w2": np.zeros((32, 32)), "b2": np.zeros(32),
                            "w3": np.zeros((32, n_out)), "b3": np.zeros(n_out)},
                 lanes=lanes, buckets=BATCH_BUCKETS, mean=np.zeros(n_in), std=np.ones(n_in), idle_tick_ms=1.0,
                 training={})
    refused = operator.run("set-policy", {"policy": "learned", "policy_path": str(tmp_path)})
    assert refused["code"] == "cannot_apply_live" and "not_loaded_here" in refused["reason"]
    assert operator.run("set-policy", {"policy": "no_such_policy"})["code"] == "cannot_apply_live"
    assert operator.run("set-policy", {"policy": "rules", "extra": 1})["code"] == "bad_args"
    swapped = operator.run("set-policy", {"policy": "rules"})
    assert swapped["ok"] and swapped["result"] == {"policy": "rules", "policy_path": None, "was": "rules"}


def test_load_model_and_reload_config_while_requests_stream_lose_none_and_answer_none_twice(
        broker, keys, board, operator, frames):
    """Requests for the serving model arrive every 10 ms while load-model loads and profiles a
    second model on the board and reload-config then removes it again (the file does not name
    it): every request is answered exactly once, none lost or failed in either change."""
    config = board["config"]
    config.write_text(config_text(broker, keys["ring"], models=(MODEL,)))
    replies = Replies(broker)
    stop = threading.Event()
    sent: list[str] = []

    def stream():
        while not stop.is_set():
            rid = f"stream-{len(sent)}"
            replies.send(MODEL, frames[len(sent) % 50], rid)
            sent.append(rid)
            time.sleep(0.01)

    sender = threading.Thread(target=stream)
    sender.start()
    try:
        time.sleep(0.2)
        before_load = len(sent)
        loaded = operator.run("load-model", {"name": "streamed", "card": f"demo:{SECOND}"})
        during_load = len(sent)
        reloaded = operator.run("reload-config")
        time.sleep(0.2)
    finally:
        stop.set()
        sender.join()
    try:
        got = replies.wait(sent)                       # each exactly once (asserted inside)
    finally:
        replies.close()
    assert loaded["ok"] and reloaded["ok"], (loaded, reloaded)
    assert "streamed" in reloaded["result"]["removed"]
    assert set(operator.run("status")["result"]["models"]) == {MODEL}
    assert before_load < during_load < len(sent)            # requests were sent during both changes
    # Served, or refused at the door by admission while the cores loaded a model; none lost or failed.
    assert {code(r) for r in got.values()} <= {"ok", "rejected"}, [r.get("error") for r in got.values()]
    assert sum(code(r) == "ok" for r in got.values()) >= len(sent) // 2
