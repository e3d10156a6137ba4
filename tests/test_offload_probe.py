"""The idle link probe (``agent.offload.probe``), with real parts: a real Mosquitto, the peer as a real
second process (``edge-agent run`` with ``[offload] serve = true``), the board in this process.

What they prove: a board that sends a peer no batch still gets (and keeps refreshing) a round trip
and bandwidth estimate for it, from probes of two sizes, and the status says it came from probes;
probes and batches share the link without a probe's answer ever counting as a batch's reply; a
killed peer is forgotten and no longer probed; malformed probes get error answers naming the field
(or are counted and dropped) and the peer's intake goes on serving probes and batches.
"""
from __future__ import annotations

import json
import math
import signal
import threading
import time

import msgpack
import numpy as np
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import CONFIG_VERSION, parse_config
from agent.errors import InferenceError
from agent.offload import probe, wire
from agent.offload.peers import PeerTable
from agent.service import Service
from agent.transport.paho_client import connect, make_client
from agent.transport.topics import offload_topic, probe_topic, status_topic
from tests.test_offload import MODEL, PeerProcess, Replies
from tests.waiting import wait_for

PROBE_BYTES = 65536


def _board(broker, peer: str, idle_s: float = 0.2) -> Service:
    """A board that may offload to ``peer`` and sends it every batch it gets (none, unless a test
    sends requests), probing its link after ``idle_s`` without a batch."""
    return Service(parse_config({
        "config_version": CONFIG_VERSION,
        "agent": {"device": f"prober-for-{peer}", "workers": 1, "policy": "offload_fixed"},
        "mqtt": {"host": broker.host, "port": broker.port, "session_expiry_s": 0},
        "telemetry": {"interval_s": 0},
        "offload": {"peer": peer, "split": "none", "share": 1.0, "probe_idle_s": idle_s,
                    "probe_bytes": PROBE_BYTES},
        "models": [{"name": MODEL, "default_slo_ms": 1000, "batching": {"max_batch": 4}}],
    }))


@pytest.fixture(scope="module")
def peer(broker, tmp_path_factory):
    process = PeerProcess(tmp_path_factory.mktemp("probe-peer"), broker, "board-pp")
    try:
        yield process
    finally:
        process.close()


def test_an_idle_board_measures_its_peer_by_probes_and_keeps_refreshing_it(peer, broker, digits):
    board = _board(broker, peer.device)
    app = None
    try:
        client = board.agent.offload
        wait_for(lambda: client.peers.live(peer.device) is not None, 60.0, "the peer's status")

        def probed(n):
            info = client.peers.live(peer.device)
            return info is not None and info.probe_samples >= n
        wait_for(lambda: probed(2), 15.0, "a round of probes (small, then big)")
        info = client.peers.live(peer.device)
        assert info.source == "probe" and info.rtt_s is not None and info.rtt_s > 0 and info.bandwidth_bps
        assert client.counters["sent"] == 0                   # no batch went: the probes alone measured it
        # Both sizes went into the link's fit: a small probe for the round trip, a big one for the bytes.
        sizes = [x for x, _ in client.peers._links[peer.device]._recent]
        assert min(sizes) < 1000 and max(sizes) > PROBE_BYTES
        # Idle, it keeps probing: the estimate is refreshed, and the status says by what and when.
        before = info.probe_samples
        wait_for(lambda: probed(before + 2), 15.0, "the next round of probes")
        shown = json.loads(json.dumps(board.agent.status()))["offload"]["client"]
        entry = shown["peers"][peer.device]
        assert entry["source"] == "probe" and entry["probe_samples"] >= before + 2 and entry["rtt_ms"] > 0
        assert entry["last_probe_age_s"] is not None and entry["last_probe_age_s"] < 5.0
        probes = shown["probes"]
        assert probes["answered"] >= 4 and probes["late"] == probes["bad_answers"] == probes["refused"] == 0
        assert probes["peers"][peer.device]["sent"] >= 4

        # Batches and probes on the same link: every request answered once, by the peer, and no
        # probe's answer ever counted as a batch's (late or duplicate) reply.
        frames, _ = digits
        app = Replies(broker, board.config.device, "app-probe")
        for i in range(12):
            app.send(frames[i], slo_ms=3000)
            time.sleep(0.05 if i % 4 else 0.3)               # gaps past probe_idle_s: probes in between
        replies = app.check_exactly_once()
        assert all(r["status"] == "ok" for r in replies)
        assert client.counters["answered_by_peer"] >= 1
        assert client.counters["late_replies"] == client.counters["duplicate_replies"] == 0
        assert client.counters["bad_replies"] == 0 and client.prober.counters["late"] == 0
        info = client.peers.live(peer.device)
        assert info.samples > info.probe_samples               # traffic fed the same fit
    finally:
        if app is not None:
            app.close()
        board.close()


def test_a_killed_peer_is_forgotten_and_no_longer_probed(broker, tmp_path):
    peer = PeerProcess(tmp_path, broker, "board-pk")
    board = None
    try:
        board = _board(broker, peer.device)
        client = board.agent.offload
        wait_for(lambda: (client.peers.live(peer.device) or None) is not None
                 and client.peers.live(peer.device).probe_samples >= 1, 60.0, "a probed peer")
        peer.signal(signal.SIGKILL)
        # Its last will fires (its socket closed): forgotten, and its probe state with it.
        wait_for(lambda: client.peers.live(peer.device) is None, 15.0, "the peer forgotten")
        wait_for(lambda: peer.device not in client.prober.status()["peers"], 5.0, "its probes dropped")
        sent = client.prober.counters["sent"]
        time.sleep(1.0)                                         # five probe periods
        assert client.prober.counters["sent"] == sent
        assert peer.device not in client.prober.status()["peers"]
    finally:
        if board is not None:
            board.close()
        peer.close()


class _Raw:
    """A plain MQTT v5 client: publishes probes, collects answers and the peer's statuses."""

    def __init__(self, broker, name: str, peer: str) -> None:
        self.topic = f"tests/{name}"
        self.answers: list = []
        self.statuses: list[dict] = []
        self.client = make_client(name)
        self.client.on_message = self._got
        connect(self.client, broker.host, broker.port)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.subscribe([(self.topic, 1), (status_topic(peer), 1)])
        assert subscribed.wait(5)

    def _got(self, client, userdata, message) -> None:
        if message.topic == self.topic:
            self.answers.append(message)
        else:
            self.statuses.append(json.loads(message.payload))

    def publish(self, topic: str, payload: bytes, correlation: bytes | None, response: bool = True) -> None:
        props = Properties(PacketTypes.PUBLISH)
        if response:
            props.ResponseTopic = self.topic
        if correlation is not None:
            props.CorrelationData = correlation
        self.client.publish(topic, payload, qos=1, properties=props)

    def answer(self, correlation: bytes):
        found = [m for m in self.answers if m.properties.CorrelationData == correlation]
        return found[0] if found else None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_malformed_probes_get_named_errors_and_the_peer_goes_on_serving(peer, broker):
    raw = _Raw(broker, "bad-probes", peer.device)
    try:
        wait_for(lambda: raw.statuses, 60.0, "the peer's status")
        to = probe_topic(peer.device)
        cases = [
            (b"\xc1 not msgpack", None),
            (msgpack.packb([1, 2]), None),
            (msgpack.packb({"v": 2, "origin": "t", "probe": "p2"}), "v"),
            (msgpack.packb({"v": 1, "origin": "", "probe": "p3"}), "origin"),
            (msgpack.packb({"v": 1, "origin": "t", "probe": "p4", "pad": "not bytes"}), "pad"),
        ]
        for i, (payload, _) in enumerate(cases):
            raw.publish(to, payload, f"bad-{i}".encode())
        raw.publish(to, probe.encode_probe("t", "nowhere"), b"nowhere", response=False)    # no answer possible
        good = probe.encode_probe("t", "good", b"x" * 1000)
        raw.publish(to, good, b"good")
        wait_for(lambda: raw.answer(b"good") is not None and all(raw.answer(f"bad-{i}".encode())
                                                                   for i in range(len(cases))),
                 15.0, "the answers")
        for i, (_, field) in enumerate(cases):
            answer = probe.decode_probe_answer(raw.answer(f"bad-{i}".encode()).payload)
            assert answer.error is not None and answer.error.code == "bad_request" and answer.error.field == field
        ok = probe.decode_probe_answer(raw.answer(b"good").payload)
        assert ok.error is None and ok.probe == "good" and ok.received_bytes == len(good) and ok.held_ms >= 0
        assert raw.answer(b"nowhere") is None
        # The peer's intake goes on: a batch is still answered...
        x = np.zeros((1, 64, 64, 3), np.uint8)
        raw.publish(offload_topic(peer.device, MODEL),
                    wire.encode_request(wire.OffloadRequest("t", "after", None, {"frames": x}, [time.time() + 5])),
                    b"after")
        wait_for(lambda: raw.answer(b"after") is not None, 15.0, "the batch's reply")
        assert wire.decode_reply(raw.answer(b"after").payload, 1).errors == [None]
        # ...and its status counts what it refused and what it could not answer.
        counted = lambda: [s for s in raw.statuses
                           if s.get("offload", {}).get("serve", {}).get("counters", {}).get("bad_probes", 0) >= 5]
        wait_for(counted, 10.0, "the counters in the peer's status")
        counters = counted()[-1]["offload"]["serve"]["counters"]
        assert counters["unanswerable_probes"] >= 1 and counters["probes"] >= 1
        assert peer.process.poll() is None
    finally:
        raw.close()


# --- the parts, without a broker -------------------------------------------------------------------

def test_the_probe_wire_names_what_is_wrong():
    p = probe.decode_probe(probe.encode_probe("board-a", "p1", b"\0" * 10), 1024)
    assert (p.origin, p.probe, p.pad_bytes) == ("board-a", "p1", 10)
    with pytest.raises(InferenceError) as big:
        probe.decode_probe(probe.encode_probe("board-a", "p1", b"\0" * 2000), 1024)
    assert big.value.code == "too_large"
    with pytest.raises(InferenceError) as bad:
        probe.decode_probe(msgpack.packb({"v": 1, "origin": "a", "probe": 7}), 1024)
    assert bad.value.field == "probe" and bad.value.probe is None
    answer = probe.decode_probe_answer(probe.encode_probe_answer("p1", held_ms=0.5, received_bytes=40))
    assert (answer.probe, answer.error, answer.held_ms, answer.received_bytes) == ("p1", None, 0.5, 40)
    for message, field in [({"v": 1, "probe": "p", "status": "ok", "held_ms": -1, "bytes": 1}, "held_ms"),
                           ({"v": 1, "probe": "p", "status": "ok", "held_ms": 1, "bytes": "1"}, "bytes"),
                           ({"v": 1, "probe": "p", "status": "maybe"}, "status"),
                           ({"v": 1, "probe": "p", "status": "error", "error": {"code": "nope"}}, "error")]:
        with pytest.raises(InferenceError) as refused:
            probe.decode_probe_answer(msgpack.packb(message))
        assert refused.value.field == field


def test_the_peer_table_says_what_measured_a_link_and_when_it_was_last_used():
    now = [100.0]
    table = PeerTable("me", stale_s=5.0, clock=lambda: now[0])
    serve = {"models": {"m": {"full": True}}, "free_slots": 1}
    table.on_status("edge/v1/b/status", json.dumps({"state": "online", "offload": {"serve": serve}}).encode())
    assert table.idle_s("b") == math.inf and table.snapshot()["b"]["source"] is None
    table.observe("b", 0.002, 200, source="probe")
    now[0] += 1.0
    entry = table.snapshot()["b"]
    assert (entry["source"], entry["probe_samples"], entry["last_probe_age_s"]) == ("probe", 1, 1.0)
    assert table.idle_s("b") == math.inf                      # a probe is not traffic
    table.sent("b")
    now[0] += 0.5
    assert table.idle_s("b") == 0.5
    table.observe("b", 0.003, 5000)
    assert table.snapshot()["b"]["source"] == "traffic" and table.idle_s("b") == 0.0
    assert table.live("b").samples == 2 and table.live("b").probe_samples == 1
    with pytest.raises(ValueError, match="source"):
        table.observe("b", 0.003, 5000, source="guess")


def test_the_default_probe_is_one_item_on_the_wire_within_bounds():
    assert probe.default_probe_bytes([12288.0, 49152.0]) == 49152
    assert probe.default_probe_bytes([]) == probe.DEFAULT_PROBE_BYTES_RANGE[0]
    assert probe.default_probe_bytes([1e9]) == probe.DEFAULT_PROBE_BYTES_RANGE[1]


def test_probe_idle_s_0_turns_the_probe_off():
    prober = probe.Prober(PeerTable("me", 5.0), "me", ["b"], idle_s=0, probe_bytes=1024)
    assert not prober.enabled
    prober.attach(None)          # off: it neither subscribes nor starts a thread (None would fail if it did)
    assert prober._thread is None and prober.status()["sent"] == 0
    assert not probe.Prober(PeerTable("me", 5.0), "me", [], idle_s=2, probe_bytes=0).enabled    # no peers


def test_the_probe_bench_board_config_parses_and_probes():
    """``edge-agent bench probe``'s board: a valid config that names the peer, probes, and
    refreshes its status (the bench reads the estimates off it)."""
    import tomllib

    from edge_lab.bench.probe import board_probe_toml
    config = parse_config(tomllib.loads(board_probe_toml(model=MODEL, broker=("10.0.0.1", 1883), idle_s=0.25,
                                                         probe_bytes=65536)))
    assert config.offload.targets == ("peer",) and config.offload.serve and config.offload.status_interval_s == 1
    assert (config.offload.probe_idle_s, config.offload.probe_bytes) == (0.25, 65536)


def test_boards_probe_each_other_under_the_shipped_acl(tmp_path):
    """The sample ACL (firmware_configs/mosquitto/acl) with two boards logged in as themselves: the
    board's probe reaches the peer and the peer's answer comes back (the ACL grants both ways), and
    so does a batch and its reply (``offload-reply``), each agent its own identity."""
    import os
    import shutil
    import subprocess

    from edge_lab.broker import LocalBroker, MosquittoNotFound
    from tests.test_mqtt_tls import SAMPLE_ACL
    found = shutil.which("mosquitto_passwd")
    if not found:
        pytest.skip("mosquitto_passwd not installed (it comes with the mosquitto package)")
    passwd = tmp_path / "passwd"
    for i, name in enumerate(("board-1", "board-2")):
        subprocess.run([found, *(["-c"] if i == 0 else []), "-b", str(passwd), name, f"pw {name}"], check=True,
                       capture_output=True)
        secret = tmp_path / f"{name}.password"
        secret.write_text(f"pw {name}\n")
        os.chmod(secret, 0o600)
    try:
        broker = LocalBroker(password_file=str(passwd), acl_file=str(SAMPLE_ACL))
    except MosquittoNotFound as exc:
        pytest.skip(f"mosquitto not installed: {exc}")

    def agent(device: str, offload: dict) -> Service:
        return Service(parse_config({
            "config_version": CONFIG_VERSION,
            "agent": {"device": device, "workers": 1, "policy": "offload_fixed"},
            "mqtt": {"host": broker.host, "port": broker.port, "session_expiry_s": 0, "username": device,
                     "password_file": f"{device}.password"},
            "telemetry": {"interval_s": 0}, "offload": offload,
            "models": [{"name": MODEL, "default_slo_ms": 1000, "batching": {"max_batch": 4}}],
        }, base_dir=tmp_path))

    with broker:
        peer = agent("board-2", {"serve": True, "status_interval_s": 0.5})
        board = None
        try:
            board = agent("board-1", {"peer": "board-2", "split": "none", "share": 1.0, "probe_idle_s": 0.2})
            client = board.agent.offload
            wait_for(lambda: (client.peers.live("board-2") or None) is not None
                     and client.peers.live("board-2").probe_samples >= 2, 30.0, "the peer probed under the ACL")
            x = np.zeros((64, 64, 3), np.uint8)
            result = board.agent.submit(MODEL, {"frames": x[None]}, slo_ms=3000).result(10)
            assert result.served_by["device"] == "board-2"         # the batch's reply came back too
        finally:
            if board is not None:
                board.close()
            peer.close()


def test_a_reconnect_drops_the_probes_out_so_an_answer_after_it_never_times_the_outage():
    """Probes go at QoS 1, so the broker may hand an answer over after an outage: the board drops
    what it had out when it reconnects, and such an answer counts ``late``, no sample."""
    from types import SimpleNamespace
    table = PeerTable("me", 5.0)
    prober = probe.Prober(table, "me", ["b"], idle_s=1, probe_bytes=0)
    state = prober._state.setdefault("b", probe._PeerProbes())
    state.outstanding = probe._Out("p-1", 0.0, 100, False, True)
    prober._by_id["p-1"] = "b"
    prober.on_session(True)
    assert state.outstanding is None and prober.counters["dropped"] == 1
    answer = SimpleNamespace(properties=SimpleNamespace(CorrelationData=probe.CORRELATION_PREFIX + b"p-1"),
                             payload=probe.encode_probe_answer("p-1", held_ms=0.0, received_bytes=100))
    prober._on_answer(answer)
    assert prober.counters["late"] == 1 and prober.counters["answered"] == 0
    assert table.snapshot().get("b") is None or table.snapshot()["b"].get("probe_samples", 0) == 0
