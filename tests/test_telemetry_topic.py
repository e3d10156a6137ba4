"""What a board reports over MQTT and to journald, with a real Mosquitto and real agents: the
periodic sample on edge/v1/<device>/telemetry, the retained status after the broker restarts,
and `edge-agent run --log-format json` writing nothing but JSON lines."""
import json
import queue
import subprocess
import sys
import threading
import time

import pytest

from agent.client import InferenceClient
from agent.config import CONFIG_VERSION, parse_config
from agent.service import Service
from agent.transport import topics
from agent.transport.paho_client import connect, make_client
from edge_lab.broker import LocalBroker, MosquittoNotFound

MODEL = "mobilenet_digits"


def _config(device: str, host: str, port: int, **telemetry) -> object:
    return parse_config({
        "config_version": CONFIG_VERSION, "agent": {"device": device, "workers": 1},
        "mqtt": {"host": host, "port": port}, "telemetry": telemetry,
        "models": [{"name": MODEL, "card": f"demo:{MODEL}"}]})


def _listener(host: str, port: int, topic: str, name: str):
    """A plain client subscribed to ``topic``; its messages (payloads, decoded JSON) in a queue."""
    messages: queue.Queue = queue.Queue()
    client = make_client(name)
    client.on_message = lambda c, u, m: messages.put(json.loads(m.payload))
    connect(client, host, port)
    subscribed = threading.Event()
    client.on_subscribe = lambda *a: subscribed.set()
    client.subscribe(topic, qos=1)
    assert subscribed.wait(10)
    return client, messages


def _close(client) -> None:
    client.disconnect()
    client.loop_stop()


def test_a_sample_arrives_every_interval_with_the_counters(broker, digits):
    device = "telemetry-board"
    frames, _ = digits
    listener, samples = _listener(broker.host, broker.port, topics.telemetry_topic(device), "telemetry-reader")
    try:
        with Service(_config(device, broker.host, broker.port, interval_s=0.5)) as service:
            results = [service.agent.submit(MODEL, {"frames": frames[i]}, slo_ms=5000) for i in range(7)]
            for future in results:
                future.result(timeout=30)
            sent_after = time.time()
            deadline = time.monotonic() + 20
            while True:   # the first sample taken after the replies carries all seven
                sample = samples.get(timeout=max(0.1, deadline - time.monotonic()))
                if sample["models"][MODEL]["ok"] == 7:
                    break
            snapshot = service.agent.telemetry.snapshot()[MODEL]
    finally:
        _close(listener)
    assert sample["v"] == 1 and sample["device"] == device and sample["state"] == "online"
    assert sample["interval_s"] == 0.5 and sample["uptime_s"] > 0
    assert sent_after - 30 < sample["ts"] < time.time() + 1
    figures = sample["models"][MODEL]
    assert figures["accepted"] == 7 and figures["errors"] == {} and figures["refusals"] == {}
    assert figures["inference_count"] == 7 and 1 <= figures["exec_count"] <= 7
    assert figures["request_us"] == pytest.approx(snapshot["request_us"])
    assert figures["queue_us"] + figures["compute_us"] <= figures["request_us"] * (1 + 1e-9)
    assert figures["classes"] == {"5000": {"requests": 7, "met": 7, "attainment": 1.0}}
    assert figures["queued"] == 0 and figures["slowdown"] > 0 and figures["p50_ms"] > 0


def test_the_retained_status_is_published_again_after_the_broker_restarts():
    """A broker without persistence forgets retained messages when it restarts: the board must say
    ``online`` again on reconnect, or a dashboard that subscribes afterwards sees no status at all."""
    try:
        local_broker = LocalBroker()
    except MosquittoNotFound as exc:
        pytest.skip(f"mosquitto not installed: {exc}")
    device = "restarted-board"
    with local_broker, Service(_config(device, local_broker.host, local_broker.port, interval_s=0)) as service:
        service.transport.client.reconnect_delay_set(min_delay=1, max_delay=1)
        first_socket = service.transport.client.socket()
        local_broker.restart()
        deadline = time.monotonic() + 20
        while not (service.transport.client.is_connected() and service.transport.client.socket() is not first_socket):
            assert time.monotonic() < deadline, "the agent did not reconnect after the broker restarted"
            time.sleep(0.05)
        status = None
        while status is None:   # a late subscriber: it sees only what is retained
            assert time.monotonic() < deadline, "no retained status after the restart"
            reader, statuses = _listener(local_broker.host, local_broker.port, topics.status_topic(device), "late-reader")
            try:
                status = statuses.get(timeout=1)
            except queue.Empty:
                pass
            finally:
                _close(reader)
    assert status["device"] == device and status["state"] == "online" and MODEL in status["models"]


def test_json_logs_every_line_is_a_json_object(broker, digits, tmp_path):
    device = "json-log-board"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'config_version = 1\n[agent]\ndevice = "{device}"\nworkers = 1\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
        f'[[models]]\nname = "{MODEL}"\ncard = "demo:{MODEL}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "-v", "run", "--config", str(config),
                             "--log-format", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "serving" in line:
                break
        assert lines and "serving" in lines[-1], "".join(lines) + proc.stderr.read() if proc.poll() is not None else ""
        frames, _ = digits
        client = InferenceClient(broker.host, broker.port, device, "json-log-app")
        try:
            replies = [client.infer(MODEL, {"frames": frames[i]}, slo_ms=5000, timeout=30) for i in range(3)]
            bad = client.infer(MODEL, {"frames": frames[0][:3]}, slo_ms=5000, timeout=30)
        finally:
            client.close()
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert all(r["status"] == "ok" for r in replies) and bad["status"] == "error"
    lines += out.splitlines(keepends=True)
    records = [json.loads(line) for line in lines if line.strip()]
    records += [json.loads(line) for line in err.splitlines() if line.strip()]   # anything on stderr too
    assert len(records) >= 4
    for record in records:
        assert {"ts", "level", "logger", "msg"} <= set(record), record
        assert record["ts"].endswith("Z") and record["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    messages = [r["msg"] for r in records]
    assert any("serving" in m for m in messages) and any("stopping" in m for m in messages)
    assert any(r["logger"].startswith("agent.") and r["logger"] != "agent.cli" for r in records)   # the agent's own logs


def test_a_sample_goes_at_qos_1_and_none_is_queued_while_the_broker_is_away():
    """Telemetry at QoS 1 (the broker queues it for a lagging subscriber instead of dropping it),
    and nothing published while the connection is down: no samples pile up where replies wait."""
    from agent.ops.telemetry_publisher import TelemetryPublisher
    try:
        local_broker = LocalBroker()
    except MosquittoNotFound as exc:
        pytest.skip(f"mosquitto not installed: {exc}")
    device = "qos-board"
    with local_broker, Service(_config(device, local_broker.host, local_broker.port, interval_s=0)) as service:
        publisher = TelemetryPublisher(service.agent, service.transport, 60.0)
        received: queue.Queue = queue.Queue()
        reader = make_client("qos-reader")
        reader.on_message = lambda c, u, m: received.put(m.qos)
        connect(reader, local_broker.host, local_broker.port)
        subscribed = threading.Event()
        reader.on_subscribe = lambda *a: subscribed.set()
        reader.subscribe(topics.telemetry_topic(device), qos=1)
        assert subscribed.wait(10)
        try:
            assert publisher.publish_once()
            assert received.get(timeout=10) == 1
        finally:
            _close(reader)
        local_broker.stop()
        deadline = time.monotonic() + 20
        while service.transport.connected:
            assert time.monotonic() < deadline, "the agent did not notice the broker stopped"
            time.sleep(0.05)
        queued = len(service.transport.client._out_messages)
        assert publisher.publish_once() is False
        assert len(service.transport.client._out_messages) == queued
