"""End to end over a real Mosquitto broker: standard MQTT clients (mosquitto_pub / mosquitto_sub,
and paho) against the agent, good requests and every kind of bad one."""
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import msgpack
import numpy as np
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import CONFIG_VERSION, parse_config
from agent.intake.msgpack_codec import decode_tensor, encode_request, encode_tensor
from agent.models.digits import frames_from_digits, load_test_set
from agent.service import Service
from agent.transport.paho_client import connect, make_client

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "e2e-board"
LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def digits():
    images, labels = load_test_set()
    return frames_from_digits(images), labels


@pytest.fixture(scope="module")
def service(broker):
    cfg = parse_config({
        "config_version": CONFIG_VERSION,
        "agent": {"device": DEVICE, "workers": 2, "max_payload_bytes": LIMIT},
        "mqtt": {"host": broker.host, "port": broker.port},
        "models": [{"name": "mobilenet_digits", "card": "demo:mobilenet_digits", "instances": 2}],
    })
    with Service(cfg) as svc:
        yield svc


class RawClient:
    """A plain paho MQTT v5 client: publishes raw bytes, collects replies by correlation data."""

    def __init__(self, broker, name):
        self.topic = f"apps/{name}/replies"
        self.replies: dict[bytes, Future] = {}
        self.client = make_client(name)
        self.client.on_message = self._on_message
        connect(self.client, broker.host, broker.port)
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe(self.topic)
        assert done.wait(5)

    def _on_message(self, client, userdata, message):
        future = self.replies.get(message.properties.CorrelationData)
        if future is not None and not future.done():
            future.set_result(msgpack.unpackb(message.payload, raw=False))

    def request(self, model, payload: bytes, correlation: bytes, response_topic=True) -> Future:
        props = Properties(PacketTypes.PUBLISH)
        if response_topic:
            props.ResponseTopic = self.topic
        props.CorrelationData = correlation
        future = Future()
        self.replies[correlation] = future
        self.client.publish(f"edge/v1/{DEVICE}/infer/{model}", payload, properties=props)
        return future

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture()
def raw(broker, service):
    client = RawClient(broker, f"raw-{time.monotonic_ns()}")
    yield client
    client.close()


def good_payload(frame, request_id="ok-1", **kw):
    return encode_request(request_id, {"frames": frame}, slo_ms=kw.pop("slo_ms", 2000), **kw)


def test_good_request_gets_a_correct_reply(raw, digits):
    frames, labels = digits
    for i in range(20):
        reply = raw.request("mobilenet_digits", good_payload(frames[i], f"r{i}"), f"c{i}".encode()).result(10)
        assert reply["status"] == "ok" and reply["id"] == f"r{i}"
        logits = decode_tensor(reply["outputs"]["logits"], "logits")
        assert logits.shape == (1, 10) and logits.dtype == np.float32
        assert set(reply["timing"]) == {"queue_ms", "compute_ms", "total_ms"}
        assert reply["served_by"]["device"] == DEVICE
    correct = [int(np.argmax(decode_tensor(raw.request("mobilenet_digits", good_payload(frames[i]), f"a{i}".encode())
                                                .result(10)["outputs"]["logits"], "l"))) == labels[i] for i in range(50)]
    assert sum(correct) >= 45


def _tensor(frame, **changes):
    return dict(encode_tensor(frame), **changes)


BAD = {
    "not_msgpack": (lambda f: b"\xc1\xc1\xc1", "mobilenet_digits", "bad_request", None),
    "not_a_map": (lambda f: msgpack.packb([1, 2]), "mobilenet_digits", "bad_request", None),
    "missing_id": (lambda f: msgpack.packb({"inputs": {"frames": encode_tensor(f)}, "slo_ms": 10}),
                   "mobilenet_digits", "bad_request", "id"),
    "unknown_model": (lambda f: good_payload(f), "no_such_model", "unknown_model", "model"),
    "wrong_dtype": (lambda f: encode_request("x", {"frames": f.astype(np.float32)}, slo_ms=100),
                    "mobilenet_digits", "invalid_input", "inputs.frames.dtype"),
    "wrong_shape": (lambda f: encode_request("x", {"frames": f[:32]}, slo_ms=100),
                    "mobilenet_digits", "invalid_input", "inputs.frames.shape"),
    "wrong_input_name": (lambda f: encode_request("x", {"image": f}, slo_ms=100),
                         "mobilenet_digits", "invalid_input", "inputs.image"),
    "short_data": (lambda f: msgpack.packb({"id": "x", "slo_ms": 10, "inputs": {"frames": _tensor(f, data=b"\0" * 10)}}),
                   "mobilenet_digits", "invalid_input", "inputs.frames.data"),
    "oversize": (lambda f: encode_request("x", {"frames": np.zeros((200, 200, 3), np.uint8)}, slo_ms=100),
                 "mobilenet_digits", "too_large", None),
    "bad_slo": (lambda f: good_payload(f, slo_ms=-1), "mobilenet_digits", "bad_request", "slo_ms"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gets_a_named_error_reply_and_serving_continues(raw, digits, case):
    frames, _ = digits
    make, model, code, field = BAD[case]
    reply = raw.request(model, make(frames[0]), f"bad-{case}".encode()).result(10)
    assert reply["status"] == "error", reply
    assert reply["error"]["code"] == code, reply
    assert reply["error"].get("field") == field, reply
    assert reply["error"]["message"]
    ok = raw.request("mobilenet_digits", good_payload(frames[1]), f"after-{case}".encode()).result(10)
    assert ok["status"] == "ok"


def test_request_without_response_topic_is_counted_not_run(raw, service, digits):
    frames, _ = digits
    before = service.mqtt.unanswerable
    future = raw.request("mobilenet_digits", good_payload(frames[0]), b"nowhere", response_topic=False)
    deadline = time.monotonic() + 5
    while service.mqtt.unanswerable == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert service.mqtt.unanswerable == before + 1
    assert not future.done()


def test_impossible_deadline_is_rejected_with_the_reason(raw, digits):
    frames, _ = digits
    reply = raw.request("mobilenet_digits", encode_request("late", {"frames": frames[0]}, deadline=time.time() - 1),
                        b"late").result(10)
    assert reply["error"]["code"] == "rejected" and reply["id"] == "late"
    assert "deadline cannot be met" in reply["error"]["message"]


def test_status_is_retained(broker, service):
    client = make_client("status-reader")
    got = Future()
    client.on_message = lambda c, u, m: got.done() or got.set_result(m)
    connect(client, broker.host, broker.port)
    client.subscribe(f"edge/v1/{DEVICE}/status")
    message = got.result(5)
    client.disconnect()
    client.loop_stop()
    assert message.retain
    assert b'"online"' in message.payload and b"mobilenet_digits" in message.payload


# --- the CLI agent in its own process, driven by the mosquitto command-line clients ----------------

@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto-clients not installed")
def test_cli_agent_with_mosquitto_pub_and_sub(broker, tmp_path, digits):
    frames, labels = digits
    config_file = tmp_path / "agent.toml"
    config_file.write_text(
        f'config_version = 1\n[agent]\ndevice = "cli-board"\nworkers = 1\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
        f'[[models]]\nname = "mobilenet_digits"\ncard = "demo:mobilenet_digits"\n')
    agent_proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config_file)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        for line in agent_proc.stdout:   # models load and are profiled first
            seen.append(line)
            if "serving" in line:
                break
        assert "serving" in seen[-1], seen
        # stdbuf: mosquitto_sub block-buffers a pipe, and the SUBACK line must arrive before we publish.
        sub = subprocess.Popen(["stdbuf", "-oL", "mosquitto_sub", "-V", "5", "-h", broker.host, "-p", str(broker.port), "-d",
                                "-t", "apps/cli/replies", "-C", "2", "-W", "20", "-F", "REPLY %D %x"],
                               stdout=subprocess.PIPE, text=True)
        while "SUBACK" not in sub.stdout.readline():
            pass
        good = tmp_path / "good.bin"
        good.write_bytes(encode_request("cli-1", {"frames": frames[3]}, slo_ms=2000))
        bad = tmp_path / "bad.bin"
        bad.write_bytes(b"this is not msgpack \xc1")
        for name, path in (("corr-good", good), ("corr-bad", bad)):
            subprocess.run(["mosquitto_pub", "-V", "5", "-h", broker.host, "-p", str(broker.port),
                            "-t", "edge/v1/cli-board/infer/mobilenet_digits", "-f", str(path),
                            "-D", "publish", "response-topic", "apps/cli/replies",
                            "-D", "publish", "correlation-data", name], check=True, timeout=10)
        replies = {}
        for line in sub.stdout:
            if line.startswith("REPLY "):
                _, correlation, payload_hex = line.split()
                replies[correlation] = msgpack.unpackb(bytes.fromhex(payload_hex), raw=False)
        sub.wait(timeout=20)
        good_reply, bad_reply = replies["corr-good"], replies["corr-bad"]
        assert good_reply["status"] == "ok" and good_reply["id"] == "cli-1"
        logits = decode_tensor(good_reply["outputs"]["logits"], "logits")
        assert int(np.argmax(logits)) == labels[3]
        assert bad_reply["status"] == "error" and bad_reply["error"]["code"] == "bad_request"
    finally:
        agent_proc.send_signal(signal.SIGTERM)
        out, _ = agent_proc.communicate(timeout=20)
    assert agent_proc.returncode == 0, out
    assert "stopping" in out


@pytest.mark.parametrize("bad_topic", ["apps/x/#", "apps/+/replies", ""])
def test_a_response_topic_that_cannot_be_published_to_does_not_stop_the_intake(raw, service, digits, bad_topic):
    """A reply to a wildcard (or empty) response topic cannot be published: the request is counted
    as unanswerable, nothing raises on paho's network thread or a worker, and the next requests
    (valid and invalid) are answered as ever."""
    frames, _ = digits
    before = service.mqtt.unanswerable
    for n, payload in enumerate((good_payload(frames[0]), b"\xc1 not msgpack")):
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = bad_topic
        props.CorrelationData = f"wild-{n}".encode()
        if bad_topic:
            raw.client.publish(f"edge/v1/{DEVICE}/infer/mobilenet_digits", payload, properties=props)
        else:      # paho will not send an empty response topic: leave the property out
            raw.request("mobilenet_digits", payload, f"wild-{n}".encode(), response_topic=False)
    deadline = time.monotonic() + 5
    while service.mqtt.unanswerable < before + 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert service.mqtt.unanswerable == before + 2
    assert raw.request("mobilenet_digits", good_payload(frames[1]), b"after-wild").result(10)["status"] == "ok"
    assert raw.request("mobilenet_digits", b"\xc1", b"after-wild-bad").result(10)["error"]["code"] == "bad_request"


def test_requests_and_replies_travel_at_qos_1(broker, service, digits):
    """The agent subscribes and replies at QoS 1, and so does the application client
    (agent.client): the reply reaches a QoS 1 subscriber as a QoS 1 message, which a broker does
    not drop silently as it does QoS 0 ones past a lagging client's queue."""
    from agent.client import InferenceClient
    frames, labels = digits
    app = InferenceClient(broker.host, broker.port, DEVICE, f"qos-{time.monotonic_ns()}")
    seen: list[int] = []
    on_message = app.client.on_message
    app.client.on_message = lambda client, userdata, message: (seen.append(message.qos),
                                                               on_message(client, userdata, message))
    try:
        reply = app.infer("mobilenet_digits", {"frames": frames[0]}, slo_ms=2000)
    finally:
        app.client.disconnect()
        app.client.loop_stop()
    assert reply["status"] == "ok" and seen == [1]


def test_an_idle_board_runs_an_mqtt_request_on_the_network_thread(raw, service, digits):
    """The idle board's path, as HTTP takes it: a lone request runs on paho's network thread that
    read it (no hand-off to a worker and back); requests sent together go to the workers."""
    frames, labels = digits
    backend = service.agent.models["mobilenet_digits"].backends[0]
    ran_on: list[str] = []
    run = backend.run
    backend.run = lambda batch: (ran_on.append(threading.current_thread().name), run(batch))[1]
    try:
        time.sleep(0.1)                                  # idle: nothing in flight or queued for a while
        reply = raw.request("mobilenet_digits", good_payload(frames[3], "idle"), b"idle-1").result(10)
        assert reply["status"] == "ok" and int(np.argmax(decode_tensor(reply["outputs"]["logits"], "l"))) == labels[3]
        assert len(ran_on) == 1 and ran_on[0].startswith("paho-mqtt-client-"), ran_on
        ran_on.clear()
        burst = [raw.request("mobilenet_digits", good_payload(frames[i], f"b{i}"), f"burst-{i}".encode())
                 for i in range(12)]
        assert all(f.result(10)["status"] == "ok" for f in burst)
        assert any(name.startswith("edge-agent-worker-") for name in ran_on), ran_on
    finally:
        backend.run = run
