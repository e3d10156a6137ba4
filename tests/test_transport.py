"""The agent's one MQTT connection (agent.transport) against a real Mosquitto: the topic router, the
retained status and last will, and re-subscribing after a broker restart."""
from __future__ import annotations

import json
import queue
import socket
import threading
import time

import pytest

from edge_lab.broker import LocalBroker, MosquittoNotFound
from agent.transport import topics
from agent.transport.connection import MqttTransport
from agent.transport.paho_client import connect, make_client


def _device(name):
    return f"{name}-{time.monotonic_ns()}"


def _collector():
    """A handler that queues what it gets."""
    got: queue.Queue = queue.Queue()
    return got, got.put


def _app(broker, name="app"):
    client = make_client(f"{name}-{time.monotonic_ns()}")
    connect(client, broker.host, broker.port)
    return client


def _close(client):
    client.disconnect()
    client.loop_stop()


def test_each_handler_gets_only_its_messages(broker):
    device = _device("router")
    transport = MqttTransport(device, broker.host, broker.port)
    infer, on_infer = _collector()
    cmd, on_cmd = _collector()
    transport.subscribe(topics.infer_topic(device), on_infer)
    transport.subscribe(topics.cmd_topic(device), on_cmd)
    transport.connect()
    app = _app(broker)
    try:
        app.publish(topics.infer_topic(device, "m1"), b"i1").wait_for_publish(5)
        app.publish(topics.cmd_topic(device, "reload"), b"c1").wait_for_publish(5)
        app.publish(topics.infer_topic(device, "m2"), b"i2").wait_for_publish(5)
        assert [infer.get(timeout=5).payload for _ in range(2)] == [b"i1", b"i2"]
        message = cmd.get(timeout=5)
        assert (message.topic, message.payload) == (topics.cmd_topic(device, "reload"), b"c1")
        with pytest.raises(queue.Empty):
            infer.get(timeout=0.3)
        assert cmd.empty()
    finally:
        _close(app)
        transport.stop()


def test_a_handler_that_raises_does_not_stop_the_next_message(broker, caplog):
    device = _device("raises")
    transport = MqttTransport(device, broker.host, broker.port)
    got, put = _collector()

    def handler(message):
        if message.payload == b"boom":
            raise RuntimeError("handler failed")
        put(message)

    transport.subscribe(topics.infer_topic(device), handler)
    transport.connect()
    app = _app(broker)
    try:
        with caplog.at_level("ERROR", logger="agent.transport.connection"):
            app.publish(topics.infer_topic(device, "m"), b"boom").wait_for_publish(5)
            app.publish(topics.infer_topic(device, "m"), b"next").wait_for_publish(5)
            assert got.get(timeout=5).payload == b"next"
        assert "handler failed" in caplog.text
        assert transport.client.is_connected()
    finally:
        _close(app)
        transport.stop()


def test_a_shared_subscription_routes_the_plain_topic(broker):
    device = _device("pool")
    transport = MqttTransport(device, broker.host, broker.port)
    got, put = _collector()
    group = f"g{time.monotonic_ns()}"
    transport.subscribe(topics.shared(group, topics.pool_infer_topic(group)), put)
    transport.connect()
    app = _app(broker)
    try:
        app.publish(topics.pool_infer_topic(group, "m"), b"pooled").wait_for_publish(5)
        message = got.get(timeout=5)
        assert (message.topic, message.payload) == (topics.pool_infer_topic(group, "m"), b"pooled")
    finally:
        _close(app)
        transport.stop()


def test_subscribe_after_connect_waits_for_the_broker_and_unsubscribe_stops_delivery(broker):
    device = _device("late")
    transport = MqttTransport(device, broker.host, broker.port).connect()
    got, put = _collector()
    app = _app(broker)
    try:
        transport.subscribe(topics.offload_topic(device), put)   # returns after SUBACK
        app.publish(topics.offload_topic(device, "m"), b"o1").wait_for_publish(5)
        assert got.get(timeout=5).payload == b"o1"
        with pytest.raises(ValueError, match="already routes"):
            transport.subscribe(topics.offload_topic(device), put)
        with pytest.raises(ValueError, match="already routes"):
            transport.subscribe(topics.shared("g", topics.offload_topic(device)), put)
        transport.unsubscribe(topics.offload_topic(device))
        time.sleep(0.2)   # the UNSUBSCRIBE reaches the broker (same connection, in order)
        app.publish(topics.offload_topic(device, "m"), b"o2").wait_for_publish(5)
        with pytest.raises(queue.Empty):
            got.get(timeout=0.3)
    finally:
        _close(app)
        transport.stop()


def _subscribed_reader(broker, topic):
    """A client subscribed to ``topic`` (SUBACK received) and the queue its messages go to."""
    reader = _app(broker, "reader")
    messages: queue.Queue = queue.Queue()
    acked = threading.Event()
    reader.on_message = lambda c, u, m: messages.put(m)
    reader.on_subscribe = lambda *args: acked.set()
    reader.subscribe(topic, qos=1)
    assert acked.wait(5)
    return reader, messages


def test_status_retained_on_connect_offline_on_stop_and_as_last_will(broker):
    device = _device("status")
    topic = topics.status_topic(device)
    transport = MqttTransport(device, broker.host, broker.port, status=lambda: {"device": device, "state": "online"})
    assert transport.client_id == f"edge-agent-{device}"
    reader, statuses = _subscribed_reader(broker, topic)
    try:
        transport.connect()
        online = json.loads(statuses.get(timeout=5).payload)
        mqtt = online.pop("mqtt")      # the connection's own state, added by the transport
        assert online == {"device": device, "state": "online"}
        assert mqtt["connected"] and mqtt["persistent"] and mqtt["takeovers"] == 0
        late_reader, late = _subscribed_reader(broker, topic)   # after the fact: the retained copy
        retained = late.get(timeout=5)
        _close(late_reader)
        assert retained.retain and json.loads(retained.payload)["state"] == "online"

        transport.stop()
        assert json.loads(statuses.get(timeout=5).payload) == {"device": device, "state": "offline"}

        vanishing = MqttTransport(device, broker.host, broker.port, status=lambda: {"state": "online"}).connect()
        assert json.loads(statuses.get(timeout=5).payload)["state"] == "online"
        vanishing.client.loop_stop()
        vanishing.client.socket().shutdown(socket.SHUT_RDWR)   # gone without DISCONNECT: the will
        assert json.loads(statuses.get(timeout=5).payload) == {"device": device, "state": "offline"}
    finally:
        _close(reader)


def test_every_filter_is_subscribed_again_after_the_broker_restarts():
    try:
        local_broker = LocalBroker()
    except MosquittoNotFound as exc:
        pytest.skip(f"mosquitto not installed: {exc}")
    with local_broker:
        device = _device("restart")
        transport = MqttTransport(device, local_broker.host, local_broker.port)
        transport.client.reconnect_delay_set(min_delay=1, max_delay=1)
        infer, on_infer = _collector()
        cmd, on_cmd = _collector()
        transport.subscribe(topics.infer_topic(device), on_infer)
        transport.subscribe(topics.fleet_cmd_topic(), on_cmd)
        transport.connect()
        first_socket = transport.client.socket()
        try:
            local_broker.restart()   # no persistence: the broker forgets every subscription
            deadline = time.monotonic() + 10
            app = None
            while True:   # publish until both arrive: the transport re-subscribes once it is back
                assert time.monotonic() < deadline, "the transport did not re-subscribe after the restart"
                if app is None and transport.client.is_connected() and transport.client.socket() is not first_socket:
                    app = _app(local_broker)
                if app is not None:
                    app.publish(topics.infer_topic(device, "m"), b"again")
                    app.publish(topics.fleet_cmd_topic("ping"), b"fleet")
                    try:
                        assert infer.get(timeout=0.2).payload == b"again"
                        assert cmd.get(timeout=2).payload == b"fleet"
                        break
                    except queue.Empty:
                        pass
                else:
                    time.sleep(0.05)
            _close(app)
        finally:
            transport.stop()


def test_connect_to_a_closed_port_names_host_and_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    transport = MqttTransport("nobody", "127.0.0.1", port)
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
        transport.connect()
    transport.stop()   # safe after a failed connect


def test_topic_names():
    assert topics.infer_topic("b1", "m") == "edge/v1/b1/infer/m"
    assert topics.infer_topic("b1") == "edge/v1/b1/infer/+"
    assert topics.offload_topic("b1") == "edge/v1/b1/offload/+"
    assert topics.cmd_topic("b1", "reload") == "edge/v1/b1/cmd/reload"
    assert topics.fleet_cmd_topic() == "edge/v1/fleet/cmd/+"
    assert topics.status_topic("b1") == "edge/v1/b1/status"
    assert topics.telemetry_topic("b1") == "edge/v1/b1/telemetry"
    assert topics.pool_infer_topic("g", "m") == "edge/v1/pool/g/infer/m"
    assert topics.shared("g", topics.pool_infer_topic("g")) == "$share/g/edge/v1/pool/g/infer/+"
    assert topics.unshared("$share/g/edge/v1/pool/g/infer/+") == "edge/v1/pool/g/infer/+"
    assert topics.unshared("edge/v1/b1/infer/+") == "edge/v1/b1/infer/+"
    with pytest.raises(ValueError, match="group"):
        topics.shared("a/b", "x")


def test_a_topic_one_cannot_publish_to_is_named_before_the_publish():
    from agent.transport.topics import MAX_TOPIC_BYTES, publish_topic_problem
    assert publish_topic_problem("apps/me/replies") is None
    assert publish_topic_problem("a" * MAX_TOPIC_BYTES) is None
    for topic, words in (("apps/#", "wildcard"), ("apps/+/r", "wildcard"), ("", "non-empty"), (None, "non-empty"),
                         ("a\x00b", "null"), ("\ud800", "UTF-8"), ("é" * MAX_TOPIC_BYTES, "more than")):
        problem = publish_topic_problem(topic)
        assert problem is not None and words in problem, (topic, problem)


def test_a_silent_board_shows_offline_after_its_keepalive(broker):
    """[mqtt] keepalive_s reaches the broker: a transport whose network loop stops (the board hangs,
    its socket still open) is declared gone after about 1.5 keep-alives, and its will says offline
    (paho's default of 60 s would keep it "online" for 90 s)."""
    device = _device("keepalive")
    reader, statuses = _subscribed_reader(broker, topics.status_topic(device))
    try:
        silent = MqttTransport(device, broker.host, broker.port, status=lambda: {"state": "online"},
                               keepalive_s=2).connect()
        assert json.loads(statuses.get(timeout=5).payload)["state"] == "online"
        silent._stopping.set()                         # a hung board: its watchdog hangs too
        silent.client.loop_stop()                      # no more PINGREQ; the socket stays open
        started = time.monotonic()
        assert json.loads(statuses.get(timeout=30).payload)["state"] == "offline"
        assert time.monotonic() - started < 30          # about 3 s here; far from paho's default 90
        silent.client.socket().close()
    finally:
        _close(reader)
