"""The load generator's plain-socket MQTT v5 client (lab/edge_lab/bench/mqttwire.py) against a real
Mosquitto and paho on the other side: what it publishes arrives as an application's request (topic,
payload, response topic, correlation data), and what is published to it comes back with its
correlation data, stamped, and acknowledged (the broker re-sends nothing)."""
from __future__ import annotations

import struct
import threading
import time

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.transport.paho_client import connect, make_client
from edge_lab.bench.mqttwire import MqttWireError, WireClient, _read_vbi, correlation_of, publish_packet, vbi


@pytest.mark.parametrize("value", [0, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 268_435_455])
def test_variable_byte_integers_round_trip(value):
    encoded = vbi(value)
    assert len(encoded) == 1 + (value > 127) + (value > 16_383) + (value > 2_097_151)
    assert _read_vbi(encoded, 0) == (value, len(encoded))


def test_correlation_is_found_among_other_properties():
    props = Properties(PacketTypes.PUBLISH)
    props.PayloadFormatIndicator = 1
    props.MessageExpiryInterval = 30
    props.UserProperty = ("board", "a")
    props.ResponseTopic = "r/x"
    props.CorrelationData = b"\x00\x07"
    props.ContentType = "application/msgpack"
    packed = props.pack()
    length, start = _read_vbi(packed, 0)
    assert correlation_of(memoryview(packed)[start:start + length]) == b"\x00\x07"


def test_a_request_and_its_reply_cross_a_real_broker(broker):
    tag = f"wire-{time.monotonic_ns()}"
    app_topic, reply_topic = f"req/{tag}", f"rep/{tag}"
    requests: list = []
    got: list = []
    arrived = threading.Event()

    def on_reply(correlation, payload, stamp, read_at):
        got.append((correlation, payload, stamp, read_at))
        arrived.set()

    # The agent's side: a paho client that answers each request on its response topic.
    agent = make_client(f"{tag}-agent")

    def answer(client, userdata, message):
        requests.append(message)
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = message.properties.CorrelationData
        props.UserProperty = ("served", "yes")
        client.publish(message.properties.ResponseTopic, b"reply:" + message.payload, qos=1, properties=props)

    agent.on_message = answer
    connect(agent, broker.host, broker.port)
    subscribed = threading.Event()
    agent.on_subscribe = lambda *args: subscribed.set()
    agent.subscribe(app_topic, qos=1)
    assert subscribed.wait(10)
    client = WireClient(broker.host, broker.port, f"{tag}-gen", on_reply)
    try:
        client.connect()
        client.subscribe(reply_topic, 1)
        sent = time.monotonic()
        client.write(publish_packet(app_topic, b"frame-7", qos=1, packet_id=9, response_topic=reply_topic,
                                    correlation=struct.pack("!Q", 7)))
        assert arrived.wait(10)
        time.sleep(0.3)                       # a second copy (no PUBACK taken) would come now
    finally:
        client.close()
        agent.disconnect()
        agent.loop_stop()
    assert client.error is None
    (request,) = requests
    assert (request.topic, request.payload, request.qos) == (app_topic, b"frame-7", 1)
    assert request.properties.ResponseTopic == reply_topic
    assert request.properties.CorrelationData == struct.pack("!Q", 7)
    ((correlation, payload, stamp, read_at),) = got
    assert (correlation, payload) == (struct.pack("!Q", 7), b"reply:frame-7")
    assert sent <= stamp <= read_at


def test_a_broker_that_is_not_there_is_named(broker):
    with pytest.raises(MqttWireError, match="not reachable"):
        WireClient(broker.host, 1, "nobody", lambda *args: None, timeout_s=2)
