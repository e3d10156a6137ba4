"""The command channel end to end: a real Mosquitto, a real agent process (`edge-agent run`) with
`[mqtt] subscribers = ["infer", "cmd"]`, and `edge-agent ctl` or a plain MQTT v5 client sending
signed commands. Every command message is answered exactly once, on its response topic."""
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import Future

import msgpack
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.client import InferenceClient
from agent.config import ConfigError, parse_config
from agent.models.digits import frames_from_digits, load_test_set
from agent.ops.keys import generate_key_pair, load_signing_key
from agent.ops.signing import FLEET, decode_ack, sign
from agent.transport.paho_client import connect, make_client

DEVICE = "cmd-board"
MODEL = "mobilenet_digits"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    ops = tmp_path_factory.mktemp("ops")
    ring = tmp_path_factory.mktemp("ring")
    for name in ("alice", "stranger"):
        generate_key_pair(ops, name)
    shutil.copy(ops / "alice.pub", ring / "alice.pub")        # the board trusts alice only
    return {"dir": ops, "ring": ring, "alice": load_signing_key(ops / "alice.key"),
            "stranger": load_signing_key(ops / "stranger.key")}


@pytest.fixture(scope="module")
def agent_process(broker, keys, tmp_path_factory):
    config = tmp_path_factory.mktemp("agent") / "agent.toml"
    config.write_text(
        f'config_version = 1\n[agent]\ndevice = "{DEVICE}"\nworkers = 1\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nsubscribers = ["infer", "cmd"]\n'
        f'[control]\nkeyring = "{keys["ring"]}"\n'
        f'[[models]]\nname = "{MODEL}"\ncard = "demo:{MODEL}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "serving" in line:
            break
    assert seen and "serving" in seen[-1], "".join(seen)
    yield proc
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


class Operator:
    """A plain MQTT v5 client that publishes raw envelopes and collects every ack by correlation."""

    def __init__(self, broker, name: str) -> None:
        self.topic = f"ops/{name}/acks"
        self.acks: dict[bytes, list[dict]] = defaultdict(list)
        self.cond = threading.Condition()
        self.client = make_client(name)
        self.client.on_message = self._on_message
        connect(self.client, broker.host, broker.port)
        done = threading.Event()
        self.client.on_subscribe = lambda *a: done.set()
        self.client.subscribe(self.topic, qos=1)
        assert done.wait(10)

    def _on_message(self, client, userdata, message):
        with self.cond:
            self.acks[message.properties.CorrelationData].append(decode_ack(message.payload))
            self.cond.notify_all()

    def send(self, envelope: bytes, command: str, correlation: bytes, device: str = DEVICE) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.topic
        props.CorrelationData = correlation
        self.client.publish(f"edge/v1/{device}/cmd/{command}", envelope, qos=1, properties=props)

    def ack(self, correlation: bytes, timeout: float = 20.0) -> dict:
        with self.cond:
            assert self.cond.wait_for(lambda: self.acks[correlation], timeout), f"no ack for {correlation!r}"
            return self.acks[correlation][0]

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture()
def operator(broker, agent_process):
    client = Operator(broker, f"op-{time.monotonic_ns()}")
    yield client
    client.close()


def ctl(broker, keys, *args, key="alice", timeout=20):
    return subprocess.run([sys.executable, "-m", "agent.cli", "ctl", "--device", DEVICE, "--port", str(broker.port),
                           "--key", str(keys["dir"] / f"{key}.key"), "--compact", "--timeout", "15", *args],
                          capture_output=True, text=True, timeout=timeout + 30)


def test_ctl_status_reports_the_board(broker, keys, agent_process):
    out = ctl(broker, keys, "status")
    assert out.returncode == 0, out.stdout + out.stderr
    ack = json.loads(out.stdout.splitlines()[0])
    assert ack["ok"] and ack["code"] == "ok" and ack["device"] == DEVICE
    assert ack["result"]["state"] == "online" and MODEL in ack["result"]["models"]


def test_drain_refuses_new_requests_answers_every_accepted_one_and_resume_serves_again(broker, keys, operator):
    images, _ = load_test_set()
    frames = frames_from_digits(images)
    client = InferenceClient(broker.host, broker.port, DEVICE, f"app-{time.monotonic_ns()}")
    replies: dict[str, list[dict]] = defaultdict(list)
    lock = threading.Lock()

    def keep(request_id):
        def on_reply(reply, rtt):
            with lock:
                replies[request_id].append(reply)
        return on_reply

    try:
        before = [f"before-{i}" for i in range(30)]
        for i, rid in enumerate(before):      # in flight while the drain arrives
            client.send(MODEL, {"frames": frames[i]}, keep(rid), slo_ms=10_000, request_id=rid)
        operator.send(sign("drain", {"timeout_s": 20}, DEVICE, keys["alice"]), "drain", b"drain")
        drained = operator.ack(b"drain")
        assert drained["ok"], drained
        assert drained["result"]["draining"] and drained["result"]["empty"]
        after = [f"after-{i}" for i in range(5)]
        for i, rid in enumerate(after):
            client.send(MODEL, {"frames": frames[i]}, keep(rid), slo_ms=10_000, request_id=rid)
        status = json.loads(ctl(broker, keys, "status").stdout)["result"]
        assert status["state"] == "draining" and status["draining"]
        assert ctl(broker, keys, "resume").returncode == 0
        resumed = client.infer(MODEL, {"frames": frames[0]}, slo_ms=10_000, timeout=20)
        assert resumed["status"] == "ok"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(replies) < len(before) + len(after):
            time.sleep(0.05)
        time.sleep(0.3)                                           # any second reply would show up now
    finally:
        client.close()
    for rid in before:                                            # accepted before: served, or refused at
        assert len(replies[rid]) == 1, rid                        # the door if it arrived after the drain
        reply = replies[rid][0]
        assert reply["status"] == "ok" or reply["error"]["code"] == "shutting_down", reply
    for rid in after:
        assert len(replies[rid]) == 1, rid
        assert replies[rid][0]["status"] == "error" and replies[rid][0]["error"]["code"] == "shutting_down"
        assert "draining" in replies[rid][0]["error"]["message"]


def test_refused_commands_are_answered_once_with_the_reason(broker, keys, operator):
    alice, stranger = keys["alice"], keys["stranger"]
    cases = {
        b"garbage": (b"\xc1 not an envelope", "status", "malformed"),
        b"stranger": (sign("drain", {}, DEVICE, stranger), "drain", "unknown_key"),
        b"other-board": (sign("drain", {}, "other-board", alice), "drain", "wrong_device"),
        b"topic": (sign("status", {}, DEVICE, alice), "drain", "topic_mismatch"),
        b"expired": (sign("drain", {}, DEVICE, alice, issued_at_ms=int(time.time() * 1000) - 600_000), "drain",
                     "expired"),
    }
    forged = bytearray(sign("drain", {}, DEVICE, alice))
    forged[10] ^= 1
    cases[b"forged"] = (bytes(forged), "drain", "bad_signature")
    for correlation, (envelope, command, _) in cases.items():
        operator.send(envelope, command, correlation)
    for correlation, (_, _, code) in cases.items():
        ack = operator.ack(correlation)
        assert not ack["ok"] and ack["code"] == code and ack["reason"], (correlation, ack)
    status = json.loads(ctl(broker, keys, "status").stdout)["result"]
    assert not status["draining"]                                 # none of the refused drains ran
    # A captured command's nonce under a new command id: a replay, refused (the first ran once).
    nonce = os.urandom(16)
    operator.send(sign("drain", {"timeout_s": 0}, DEVICE, alice, nonce=nonce), "drain", b"nonce-first")
    operator.send(sign("drain", {"timeout_s": 0}, DEVICE, alice, nonce=nonce), "drain", b"nonce-again")
    assert operator.ack(b"nonce-first")["ok"]
    replayed = operator.ack(b"nonce-again")
    assert not replayed["ok"] and replayed["code"] == "replayed" and "nonce" in replayed["reason"], replayed
    assert ctl(broker, keys, "resume").returncode == 0
    time.sleep(0.3)
    assert all(len(operator.acks[c]) == 1 for c in [*cases, b"nonce-first", b"nonce-again"])


def test_a_repeated_command_gets_its_first_ack_and_does_not_run_twice(broker, keys, operator):
    envelope = sign("status", {}, DEVICE, keys["alice"])
    operator.send(envelope, "status", b"first")
    first = operator.ack(b"first")
    operator.send(envelope, "status", b"again")                  # resent as is (a QoS 1 redelivery, a retry)
    again = operator.ack(b"again")
    assert first["ok"] and again == first                         # the same ack: the status of the first run
    operator.send(sign("status", {}, DEVICE, keys["alice"]), "status", b"fresh")
    assert operator.ack(b"fresh")["result"]["commands"]["answered"] > first["result"]["commands"]["answered"]


def test_a_fleet_command_is_answered_by_the_board(broker, keys, operator):
    operator.send(sign("status", {}, FLEET, keys["alice"]), "status", b"fleet", device="fleet")
    ack = operator.ack(b"fleet")
    assert ack["ok"] and ack["device"] == DEVICE


def test_a_fleet_command_by_ctl_is_answered_once_by_every_board(broker, keys, agent_process):
    """Two boards on one broker, each trusting alice: `ctl --device fleet` collects one ack from
    each (edge/v1/fleet/cmd/<command>), each naming its board; a command for one board runs on it alone."""
    from agent.service import Service
    second = Service(parse_config({
        "config_version": 1, "agent": {"device": "cmd-board-2", "workers": 1},
        "mqtt": {"host": broker.host, "port": broker.port, "subscribers": ["cmd"]},
        "control": {"keyring": str(keys["ring"])}, "telemetry": {"interval_s": 0},
        "models": [{"name": MODEL, "card": f"demo:{MODEL}", "instances": 1}]}))
    try:
        out = subprocess.run([sys.executable, "-m", "agent.cli", "ctl", "--device", "fleet", "--port", str(broker.port),
                              "--key", str(keys["dir"] / "alice.key"), "--compact", "--timeout", "4",
                              "set-slo-default", "--all", "--slo-ms", "250"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        acks = [json.loads(line) for line in out.stdout.splitlines()]
        assert sorted(a["device"] for a in acks) == [DEVICE, "cmd-board-2"], acks
        assert all(a["ok"] and a["result"]["default_slo_ms"] == 250 for a in acks)
        assert second.agent.models[MODEL].config.default_slo_ms == 250
        assert second.subscribers["cmd"].answered == 1
        status = json.loads(ctl(broker, keys, "status").stdout)       # to cmd-board alone
        assert status["device"] == DEVICE and second.subscribers["cmd"].answered == 1
    finally:
        second.close()


def test_ctl_exit_codes_say_refused_and_unanswered(broker, keys, agent_process):
    refused = ctl(broker, keys, "status", key="stranger")
    assert refused.returncode == 1 and json.loads(refused.stdout)["code"] == "unknown_key"
    nobody = subprocess.run([sys.executable, "-m", "agent.cli", "ctl", "--device", "no-such-board", "--port",
                             str(broker.port), "--key", str(keys["dir"] / "alice.key"), "--timeout", "1", "status"],
                            capture_output=True, text=True, timeout=60)
    assert nobody.returncode == 3 and "no acknowledgement" in nobody.stderr


def test_the_command_channel_needs_a_keyring():
    with pytest.raises(ConfigError, match="control.keyring"):
        parse_config({"config_version": 1, "mqtt": {"subscribers": ["infer", "cmd"]},
                      "models": [{"name": MODEL, "card": f"demo:{MODEL}"}]})
