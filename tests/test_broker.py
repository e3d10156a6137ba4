"""LocalBroker (a real mosquitto) and the paho helpers in agent.transport.paho_client, against each other."""

from __future__ import annotations

import queue
import socket
import time

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.transport.paho_client import connect, make_client
from edge_lab import broker as broker_module
from edge_lab.broker import LocalBroker, MosquittoNotFound, find_mosquitto


def _client(broker, name, **kwargs):
    client = make_client(f"{name}-{time.monotonic_ns()}", **kwargs)
    connect(client, broker.host, broker.port)
    return client


def _close(client):
    client.disconnect()
    client.loop_stop()


def _subscribe(client, topic):
    """Subscribe and wait for SUBACK, so nothing published after this returns is missed."""
    messages: queue.Queue = queue.Queue()
    subscribed: queue.Queue = queue.Queue()
    client.on_message = lambda c, u, message: messages.put(message)
    client.on_subscribe = lambda c, u, mid, reason_codes, props: subscribed.put(reason_codes)
    client.subscribe(topic, qos=1)
    reason_codes = subscribed.get(timeout=5)
    assert not reason_codes[0].is_failure, reason_codes
    return messages


def _nodelay(sock) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_broker_runs_on_a_free_loopback_port(broker):
    assert broker.running
    assert broker.host == "127.0.0.1" and 0 < broker.port < 65536
    with socket.create_connection((broker.host, broker.port), timeout=2):
        pass
    conf = (broker.log_path.parent / "mosquitto.conf").read_text()
    assert "set_tcp_nodelay true" in conf and "persistence false" in conf


def test_publish_round_trip_with_v5_response_topic_and_correlation(broker):
    requester, replier = _client(broker, "requester"), _client(broker, "replier")
    try:
        requests = _subscribe(replier, "edge/v1/test/infer/m")
        replies = _subscribe(requester, "test/replies/1")
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "test/replies/1"
        props.CorrelationData = b"\x00corr-42"
        requester.publish("edge/v1/test/infer/m", b"\x81\xa2id\xa1x", qos=1, properties=props)

        request = requests.get(timeout=5)
        assert request.payload == b"\x81\xa2id\xa1x"
        assert request.properties.ResponseTopic == "test/replies/1"
        reply_props = Properties(PacketTypes.PUBLISH)
        reply_props.CorrelationData = request.properties.CorrelationData
        replier.publish(request.properties.ResponseTopic, b"reply", qos=1, properties=reply_props)

        reply = replies.get(timeout=5)
        assert reply.payload == b"reply"
        assert reply.properties.CorrelationData == b"\x00corr-42"
    finally:
        _close(requester)
        _close(replier)


def test_client_socket_has_tcp_nodelay(broker):
    client = _client(broker, "nodelay")
    try:
        assert _nodelay(client.socket()) == 1
        # A round trip on loopback takes well under Nagle's delayed-ACK stall (~40-200 ms).
        messages = _subscribe(client, "test/nodelay")
        times = []
        for _ in range(20):
            start = time.perf_counter()
            client.publish("test/nodelay", b"x" * 100, qos=0)
            messages.get(timeout=5)
            times.append(time.perf_counter() - start)
        assert sorted(times)[len(times) // 2] < 0.02, times
    finally:
        _close(client)


def test_restart_keeps_the_port_and_clients_reconnect_with_nodelay():
    try:
        local_broker = LocalBroker()
    except MosquittoNotFound as exc:
        pytest.skip(f"mosquitto not installed: {exc}")
    with local_broker:
        port = local_broker.port
        client = make_client(f"restart-{time.monotonic_ns()}")
        client.reconnect_delay_set(min_delay=1, max_delay=1)
        connect(client, local_broker.host, local_broker.port)
        first_socket = client.socket()
        try:
            local_broker.restart()
            assert local_broker.running and local_broker.port == port
            deadline = time.monotonic() + 10
            while not (client.is_connected() and client.socket() is not first_socket):
                assert time.monotonic() < deadline, "client did not reconnect after the broker restart"
                time.sleep(0.05)
            assert _nodelay(client.socket()) == 1  # set again on the new socket
            messages = _subscribe(client, "test/after-restart")
            client.publish("test/after-restart", b"again", qos=1)
            assert messages.get(timeout=5).payload == b"again"
        finally:
            _close(client)
    assert not local_broker.running


def test_last_will_is_published_when_a_client_vanishes(broker):
    watcher = _client(broker, "watcher")
    topic = f"edge/v1/will-{time.monotonic_ns()}/status"
    try:
        messages = _subscribe(watcher, topic)
        doomed = _client(broker, "doomed", will=(topic, b"offline", False))
        doomed.loop_stop()
        doomed.socket().shutdown(socket.SHUT_RDWR)  # gone without DISCONNECT
        assert messages.get(timeout=5).payload == b"offline"
    finally:
        _close(watcher)


def test_max_packet_bytes_drops_an_oversized_publish():
    try:
        local_broker = LocalBroker(max_packet_bytes=1024)
    except MosquittoNotFound as exc:
        pytest.skip(f"mosquitto not installed: {exc}")
    with local_broker:
        assert "max_packet_size 1024" in (local_broker.log_path.parent / "mosquitto.conf").read_text()
        client = make_client(f"big-{time.monotonic_ns()}")
        connect(client, local_broker.host, local_broker.port)
        try:
            messages = _subscribe(client, "test/big")
            client.publish("test/big", b"s" * 100, qos=0)
            assert messages.get(timeout=5).payload == b"s" * 100
            client.publish("test/big", b"b" * 4096, qos=0)
            with pytest.raises(queue.Empty):
                messages.get(timeout=0.5)
        finally:
            _close(client)


def test_connect_to_a_closed_port_names_host_and_port():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = make_client("nobody-home")
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
        connect(client, "127.0.0.1", port, timeout=2)


def test_make_client_rejects_a_bad_will():
    with pytest.raises(ValueError, match="topic, payload, retain"):
        make_client("x", will=("only-topic",))


def test_missing_mosquitto_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(broker_module, "SBIN_DIRS", ())
    with pytest.raises(MosquittoNotFound, match=r"sudo apt-get install mosquitto") as info:
        find_mosquitto()
    assert "need not run as a service" in str(info.value)
    with pytest.raises(MosquittoNotFound):
        LocalBroker()


def test_mosquitto_is_found_in_sbin_when_not_on_path(tmp_path, monkeypatch):
    fake_sbin = tmp_path / "sbin"
    fake_sbin.mkdir()
    binary = fake_sbin / "mosquitto"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(broker_module, "SBIN_DIRS", (str(fake_sbin),))
    assert find_mosquitto() == str(binary)
