"""Faults on the MQTT side, against real Mosquitto brokers of the test's own: a broker restarted
under load (gracefully and killed), a request delivered twice, the agent's client id taken over by
another client, a lost connection and a dead network thread (issue 21).

The load is a plain paho client with a persistent session (edge_lab.bench.broker_restart), the
agent the demo's small model in this process; ``edge-agent bench broker-restart`` prints the same
figures for more requests.
"""
from __future__ import annotations

import functools
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future

import msgpack
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import CONFIG_VERSION, parse_config
from agent.intake.msgpack_codec import encode_request
from agent.service import Service
from agent.transport import topics
from agent.transport.paho_client import connect, make_client
from edge_lab.bench.broker_restart import run_broker_restart
from edge_lab.broker import LocalBroker, MosquittoNotFound
from tests.waiting import wait_for

_wait = functools.partial(wait_for, timeout=15.0)


@pytest.fixture()
def own_broker():
    """A broker of this test's own (it gets restarted or loses clients)."""
    try:
        broker = LocalBroker()
    except MosquittoNotFound as exc:
        pytest.skip(f"mosquitto not installed: {exc}")
    with broker:
        yield broker


def _config(broker, device, **mqtt):
    return parse_config({
        "config_version": CONFIG_VERSION,
        "agent": {"device": device, "workers": 1},
        "mqtt": {"host": broker.host, "port": broker.port, **mqtt},
        "http": {"enabled": True, "host": "127.0.0.1", "port": 0},
        "models": [{"name": "mobilenet_digits", "card": "demo:mobilenet_digits", "instances": 1}],
    })



# --- a broker restarted under load ---------------------------------------------------------------

def _skip_without_mosquitto():
    try:
        LocalBroker()
    except MosquittoNotFound as exc:
        pytest.skip(f"mosquitto not installed: {exc}")


def test_a_graceful_broker_restart_with_a_backlog_leaves_no_request_unanswered_and_none_twice():
    """The agent stops (its session stays with the broker), requests pile up for it, the broker
    restarts gracefully with them (SIGTERM, persistence on), a new agent with the same device comes
    up: every request the broker acknowledged is answered, none twice. Without the persistent
    session the backlog is dropped (no subscriber while the agent is away) or forgotten by the
    restarted broker (measured: 60 of the 240 lost with ``session_expiry_s = 0``)."""
    _skip_without_mosquitto()
    figures = run_broker_restart(True, backlog=True, requests=240)
    assert figures.sent == 240 and figures.acked == 240, figures
    assert figures.lost_unseen == 0 and figures.lost_after_seen == 0, figures
    assert figures.answered == 240 and figures.duplicates == 0, figures
    assert figures.agent["intake"]["replied"] == figures.agent["intake"]["taken"] == 240, figures


def test_a_killed_broker_loses_only_what_it_had_not_saved_and_what_reached_the_agent_is_answered_once():
    """SIGKILL mid-load, restarted from its last autosave: whatever the broker lost is counted
    apart (never seen by the agent, or seen and its reply lost); every request the agent took was
    answered by it exactly once, and no request was computed twice (a redelivered copy, from the
    broker or from the application's re-send, is dropped by the agent's de-duplication)."""
    _skip_without_mosquitto()
    figures = run_broker_restart(False, requests=240)
    intake = figures.agent["intake"]
    assert figures.sent == 240, figures
    assert intake["taken"] == figures.seen and intake["replied"] == intake["taken"], figures
    assert intake["unanswerable"] == 0 and figures.agent["transport"]["publish_overflow"] == 0, figures
    assert figures.duplicates == 0, figures
    assert figures.answered + figures.lost_after_seen == figures.seen, figures
    # whatever the application counted acknowledged is answered or counted lost, nothing else
    assert figures.acked - figures.answered <= figures.lost_unseen + figures.lost_after_seen, figures


# --- a request delivered twice -------------------------------------------------------------------

class _App:
    """A raw paho application: requests with response topic + correlation, replies by correlation."""

    def __init__(self, broker, name):
        self.topic = f"apps/{name}/replies"
        self.replies: dict[bytes, list] = {}
        self.lock = threading.Lock()
        self.client = make_client(name)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        connect(self.client, broker.host, broker.port)
        self.client.subscribe(self.topic, qos=1)
        assert subscribed.wait(10)

    def _on_message(self, client, userdata, message):
        with self.lock:
            self.replies.setdefault(message.properties.CorrelationData, []).append(
                msgpack.unpackb(message.payload, raw=False))

    def publish(self, device, payload, correlation):
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.topic
        props.CorrelationData = correlation
        self.client.publish(topics.infer_topic(device, "mobilenet_digits"), payload, qos=1,
                            properties=props).wait_for_publish(10)

    def count(self, correlation):
        with self.lock:
            return len(self.replies.get(correlation, []))

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def test_the_same_correlation_delivered_twice_is_answered_once_until_its_deadline_has_passed(own_broker, digits):
    frames, _ = digits
    device = f"dup-{time.monotonic_ns()}"
    with Service(_config(own_broker, device, dedup_grace_s=0)) as service:
        app = _App(own_broker, f"dup-app-{time.monotonic_ns()}")
        try:
            payload = encode_request("twice", {"frames": frames[0]}, slo_ms=1500)
            for _ in range(3):                      # the same request re-published: a redelivery
                app.publish(device, payload, b"same")
            app.publish(device, encode_request("other", {"frames": frames[1]}, slo_ms=1500), b"other")
            _wait(lambda: app.count(b"other") == 1, what="the other request's reply")
            _wait(lambda: service.mqtt.counters["duplicates"] == 2, what="two duplicates dropped")
            time.sleep(0.3)
            assert app.count(b"same") == 1 and app.replies[b"same"][0]["status"] == "ok"
            # Remembered until its deadline (1.5 s; no grace here): after it, the correlation is new.
            time.sleep(1.6)
            app.publish(device, encode_request("again", {"frames": frames[0]}, slo_ms=1500), b"same")
            _wait(lambda: app.count(b"same") == 2, what="the correlation answered again after its deadline")
            assert app.replies[b"same"][1]["id"] == "again"
            assert service.mqtt.counters["duplicates"] == 2
        finally:
            app.close()


# --- supervision and readiness -------------------------------------------------------------------

def _http_ready(service) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{service.http.port}/v2/health/ready", timeout=5) as reply:
            return reply.status == 200
    except urllib.error.HTTPError:
        return False


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")   # the injected death
def test_readiness_follows_the_mqtt_connection_and_a_dead_network_thread_is_restarted(own_broker, digits):
    frames, _ = digits
    device = f"ready-{time.monotonic_ns()}"
    with Service(_config(own_broker, device)) as service:
        service.transport.client.reconnect_delay_set(0.2, 0.5)
        assert service.ready() and _http_ready(service)
        own_broker.stop()
        _wait(lambda: not service.transport.connected, what="the transport to see the broker gone")
        assert not service.ready() and not _http_ready(service)
        own_broker.start()
        _wait(service.ready, what="readiness after the broker is back")
        assert _http_ready(service)

        # paho's network thread dies of an exception of its own: the watchdog starts a new one.
        client = service.transport.client
        read = client._packet_read
        failed = threading.Event()

        def fail_once():
            if not failed.is_set():
                failed.set()
                raise RuntimeError("injected: paho's network thread dies")
            return read()
        client._packet_read = fail_once
        app = _App(own_broker, f"ready-app-{time.monotonic_ns()}")
        try:
            app.publish(device, encode_request("wake", {"frames": frames[0]}, slo_ms=5000), b"wake")
            _wait(failed.is_set, what="the injected failure")
            _wait(lambda: service.transport.counters["loop_restarts"] == 1, what="the network thread restarted")
            _wait(service.ready, what="readiness after the restart")
            app.publish(device, encode_request("after", {"frames": frames[1]}, slo_ms=5000), b"after")
            _wait(lambda: app.count(b"after") == 1, what="a reply after the restart")
        finally:
            app.close()


# --- the client id taken over --------------------------------------------------------------------

def test_a_client_id_taken_over_is_logged_once_counted_and_the_reconnects_back_off(own_broker, caplog):
    device = f"takeover-{time.monotonic_ns()}"
    caplog.set_level(logging.ERROR, logger="agent.transport.connection")
    with Service(_config(own_broker, device)) as service:
        statuses: list[dict] = []
        reader = make_client(f"reader-{time.monotonic_ns()}")
        reader.on_message = lambda c, u, m: statuses.append(json.loads(m.payload))
        connect(reader, own_broker.host, own_broker.port)
        reader.subscribe(topics.status_topic(device), qos=1)
        # Another client with the agent's client id that reconnects whenever it is kicked off.
        intruder = make_client(service.transport.client_id)
        intruder.reconnect_delay_set(0.1, 0.1)
        connect(intruder, own_broker.host, own_broker.port)
        try:
            _wait(lambda: service.transport.counters["takeovers"] >= 2, timeout=20, what="two takeovers")
            health = service.transport.health()
            assert health["takeover_suspected"] and health["reconnect_delay_s"] >= 4, health
            assert not service.ready()
            logged = [r for r in caplog.records if "another client is probably using the client id" in r.getMessage()]
            assert len(logged) == 1, [r.getMessage() for r in logged]
            assert service.transport.client_id in logged[0].getMessage()
            # The agent's own status, published on a reconnect, says so.
            _wait(lambda: any(s.get("mqtt", {}).get("takeover_suspected") for s in statuses),
                  timeout=20, what="a status saying takeover_suspected")
        finally:
            intruder.disconnect()
            intruder.loop_stop()
            reader.disconnect()
            reader.loop_stop()
        _wait(lambda: service.transport.connected, timeout=20, what="the agent back once the intruder left")


# --- a command in flight across a broker restart -------------------------------------------------

def test_a_command_in_flight_when_the_broker_restarts_is_acknowledged_exactly_once(tmp_path, caplog):
    """A slow command (load-model: load and profile a second model) runs on the board while the
    broker restarts (SIGTERM, persistence on): the operator's `send_command` gets exactly one ack, ok,
    and the command ran once (a second run would answer `model_loaded`). Without the operator's
    session and its subscription renewed on reconnect, the ack published across the restart is lost
    (no ack within the timeout, or only the resend's)."""
    import shutil as _shutil
    from agent.ops.ctl import send_command
    from agent.ops.keys import generate_key_pair, load_signing_key
    from agent.ops.signing import decode_envelope, sign
    _skip_without_mosquitto()
    generate_key_pair(tmp_path / "ops", "alice")
    (tmp_path / "ring").mkdir()
    _shutil.copy(tmp_path / "ops" / "alice.pub", tmp_path / "ring" / "alice.pub")
    key = load_signing_key(tmp_path / "ops" / "alice.key")
    device = f"restart-cmd-{time.monotonic_ns()}"
    with LocalBroker(persistence=True) as broker:
        config = parse_config({
            "config_version": CONFIG_VERSION, "agent": {"device": device, "workers": 1},
            "mqtt": {"host": broker.host, "port": broker.port, "subscribers": ["infer", "cmd"]},
            "control": {"keyring": str(tmp_path / "ring")}, "telemetry": {"interval_s": 0},
            "models": [{"name": "mobilenet_digits", "card": "demo:mobilenet_digits"}]})
        with Service(config) as service, caplog.at_level(logging.INFO, logger="agent.ops.commands"):
            channel = service.subscribers["cmd"]
            envelope = sign("load-model", {"name": "resnet_digits", "card": "demo:resnet_digits"}, device, key)
            command_id = decode_envelope(envelope)[0].command_id
            result: Future = Future()
            sender = threading.Thread(target=lambda: result.set_result(send_command(
                broker.host, broker.port, device, "load-model", envelope, command_id, timeout_s=30)), daemon=True)
            sender.start()
            _wait(lambda: channel._current is not None and channel._current.command_id == command_id,
                  what="the board running the command")
            assert not result.done()                  # its ack not out yet: the restart catches it in flight
            broker.restart(graceful=True)
            acks = result.result(timeout=60)
            time.sleep(0.5)
    assert service.transport.counters.snapshot()["disconnects"] >= 1
    assert len(acks) == 1, acks
    assert acks[0]["ok"] and acks[0]["command_id"] == command_id and acks[0]["device"] == device, acks
    runs = [r for r in caplog.records if "command load-model" in r.getMessage()]
    assert len(runs) == 1, [r.getMessage() for r in runs]
