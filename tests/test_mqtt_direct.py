"""The agent's MQTT client joins its writes on the network thread and reads in chunks
(agent.transport.paho_client.DirectClient), against a real Mosquitto: what it sends is what paho
would send, complete, in order, and nothing is lost when the connection drops."""
from __future__ import annotations

import hashlib
import queue
import socket
import struct
import threading
import time

import pytest
from paho.mqtt import _packet
from paho.mqtt.client import MalformedPacket
from paho.mqtt.client import MQTTv5
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.transport.connection import MqttTransport
from agent.transport import paho_client
from agent.transport.paho_client import (DirectClient, MqttSecurity, PublishProperties, connect, make_client,
                                         paho_internals_problem)

WORKERS = 4
PER_WORKER = 300


def _reply_payload(worker: int, seq: int) -> bytes:
    """An 8 KB reply whose every byte depends on (worker, seq): a byte of another packet inside it,
    or one missing, shows at the subscriber."""
    head = struct.pack("!HI", worker, seq)
    return head + hashlib.sha256(head).digest() * 256


def _replier(broker, device: str):
    """The agent's transport answering every request on ``req/<device>`` from worker threads (as the
    intake does), and an application that collects the replies on ``rep/<device>/<worker>``."""
    transport = MqttTransport(device, broker.host, broker.port)
    transport.client.reconnect_delay_set(min_delay=1, max_delay=1)
    requests: queue.Queue = queue.Queue()
    transport.subscribe(f"req/{device}", requests.put)
    transport.connect()
    assert isinstance(transport.client, DirectClient)
    # A small send buffer: writes often go out in part, so a packet's rest must follow before any
    # other packet's bytes (the queue is only taken from its head), and replies often find the socket full.
    transport.client.socket().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    got: dict[int, list[int]] = {w: [] for w in range(WORKERS)}
    got["torn"] = []                        # replies whose payload or correlation data were not as sent
    lock = threading.Lock()
    arrived = threading.Condition(lock)

    def on_reply(client, userdata, message) -> None:
        worker, seq = struct.unpack("!HI", message.payload[:6])
        intact = (message.payload == _reply_payload(worker, seq)
                  and message.topic == f"rep/{device}/{worker}"
                  and getattr(message.properties, "CorrelationData", None) == message.payload[:6])
        with arrived:
            got[worker if intact else "torn"].append(seq)
            arrived.notify_all()

    app = make_client(f"app-{device}")
    app.on_message = on_reply
    app.max_inflight_messages_set(0)
    connect(app, broker.host, broker.port)
    subscribed = threading.Event()
    app.on_subscribe = lambda *args: subscribed.set()
    app.subscribe(f"rep/{device}/+", qos=1)
    assert subscribed.wait(10)
    return transport, requests, app, got, arrived


def _publish_from_workers(transport, device: str, start: int, count: int, requests: queue.Queue, app) -> None:
    """WORKERS threads each publish ``count`` numbered replies (QoS 1, 8 KB) on their own topic while
    the application keeps sending requests, so the network thread reads, acknowledges and writes
    at the same time as the workers write."""
    def work(worker: int) -> None:
        for seq in range(start, start + count):
            props = PublishProperties()
            props.CorrelationData = struct.pack("!HI", worker, seq)
            transport.publish(f"rep/{device}/{worker}", _reply_payload(worker, seq), qos=1, properties=props)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(WORKERS)]
    for thread in threads:
        thread.start()
    for k in range(count):
        app.publish(f"req/{device}", b"r%d" % k, qos=1)
    for thread in threads:
        thread.join(30)


def _wait_all(got, arrived, expected: int, timeout: float = 30.0) -> None:
    with arrived:
        assert arrived.wait_for(lambda: all(len(set(got[w])) >= expected for w in range(WORKERS)), timeout), \
            {w: len(set(s)) for w, s in got.items()}


def test_replies_written_from_worker_threads_arrive_once_and_in_order_per_topic(broker):
    device = f"direct-{time.monotonic_ns()}"
    transport, requests, app, got, arrived = _replier(broker, device)
    senders: set[int] = set()
    sock_send = transport.client._sock_send

    def watched_send(data):
        senders.add(threading.get_ident())
        return sock_send(data)

    transport.client._sock_send = watched_send
    try:
        _publish_from_workers(transport, device, 0, PER_WORKER, requests, app)
        _wait_all(got, arrived, PER_WORKER)
        time.sleep(0.3)                         # a duplicate would come right behind
        with arrived:
            assert not got["torn"], "replies arrived with bytes not as sent"
            for worker in range(WORKERS):
                assert got[worker] == list(range(PER_WORKER)), f"worker {worker}: not once each, in order"
        # No worker sent: every write was the network thread's (the workers' time is the board's).
        assert senders == {transport.client._thread.ident}
        # The requests read meanwhile were all handled and acknowledged, and no packet was ever
        # malformed (Mosquitto closes the connection on one: a torn write would show here).
        deadline = time.monotonic() + 10
        while requests.qsize() < PER_WORKER and time.monotonic() < deadline:
            time.sleep(0.05)
        assert requests.qsize() == PER_WORKER
        assert transport.counters["disconnects"] == 0 and transport.counters["redelivered"] == 0
        assert not transport.client._out_messages      # every reply acknowledged by the broker
    finally:
        app.disconnect()
        app.loop_stop()
        transport.stop()


def test_replies_published_while_the_connection_drops_all_arrive_in_order(broker):
    """A dropped connection mid-stream: replies written directly, queued behind a full socket or
    not yet acknowledged are re-sent by paho after the reconnect; every one arrives, each worker's
    in order of first arrival, and a second copy only for one re-sent unacknowledged (QoS 1)."""
    device = f"direct-drop-{time.monotonic_ns()}"
    transport, requests, app, got, arrived = _replier(broker, device)
    try:
        first = transport.client.socket()
        dropper = threading.Timer(0.05, lambda: first.shutdown(socket.SHUT_RDWR))
        dropper.start()
        _publish_from_workers(transport, device, 0, PER_WORKER, requests, app)
        dropper.join()
        _wait_all(got, arrived, PER_WORKER)
        with arrived:
            assert not got["torn"], "replies arrived with bytes not as sent"
            for worker in range(WORKERS):
                firsts = list(dict.fromkeys(got[worker]))
                assert sorted(firsts) == list(range(PER_WORKER)), f"worker {worker}: a reply lost"
        assert transport.counters["connects"] >= 2        # it did reconnect
        deadline = time.monotonic() + 10
        while transport.client._out_messages and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not transport.client._out_messages
    finally:
        app.disconnect()
        app.loop_stop()
        transport.stop()


def _publish_packet(properties: Properties | None, payload: bytes, qos: int = 1) -> tuple[int, bytearray]:
    """The header byte and body of the PUBLISH paho itself would write."""
    client = make_client(f"packer-{time.monotonic_ns()}")
    written: list = []
    client._packet_queue = lambda command, packet, mid, qos, info=None: written.append(packet) or 0
    client._sock = object()
    try:
        client._send_publish(7, b"edge/v1/b/infer/m", payload, qos, False, True, None, properties)
    finally:
        client._sock = None
    packet = written[0]
    k = 1
    while packet[k] & 0x80:
        k += 1
    return packet[0], bytearray(packet[k + 1:])


def test_publish_properties_pack_and_read_as_paho_does():
    plain, fast = Properties(PacketTypes.PUBLISH), PublishProperties()
    for props in (plain, fast):
        props.ResponseTopic = "bench/replies/gen-0"
        props.CorrelationData = struct.pack("!Q", 123)
    assert fast.pack() == plain.pack()
    for props in (plain, fast):       # anything else: paho's own code, same bytes
        props.UserProperty = ("a", "b")
        props.MessageExpiryInterval = 5
    assert fast.pack() == plain.pack()
    for props in (None, plain, fast, PublishProperties()):
        header, body = _publish_packet(props, b"x" * 5000)
        ours = DirectClient._decode_publish(header, body, 1)
        theirs = _packet.decode_publish(header, bytearray(body), MQTTv5)
        assert (ours.topic.encode(), ours.mid, ours.payload, ours.dup, ours.qos) == \
               (theirs.topic, theirs.mid, theirs.payload, theirs.dup, theirs.qos)
        assert ours.properties.json() == theirs.properties.json()


def test_a_malformed_publish_is_left_to_paho_which_names_it():
    header, body = _publish_packet(PublishProperties(), b"payload")
    body[2 + len(b"edge/v1/b/infer/m") + 2] = 0x30      # properties length past the packet's end
    with pytest.raises((ValueError, IndexError)):
        DirectClient._decode_publish(header, body, 1)
    client = make_client(f"reader-{time.monotonic_ns()}", direct=True)
    client._in_packet["command"], client._in_packet["packet"] = header, body
    with pytest.raises(MalformedPacket):     # paho's own decoder: _packet_read answers MQTT_ERR_PROTOCOL
        client._handle_publish()


def test_the_agent_refuses_a_paho_whose_internals_it_does_not_know(monkeypatch):
    """DirectClient overrides paho internals: on another paho release, or one that lacks one of
    them, the agent's transport fails at start naming what is wrong, not later on the wire."""
    assert paho_internals_problem() is None             # the pinned paho
    problem = paho_internals_problem(version="9.9.9")
    assert "paho-mqtt 9.9.9" in problem and "paho-mqtt==2.2.0" in problem

    class WithoutChunkedReads(paho_client.paho.Client):
        _sock_recv = None
    assert "_sock_recv" in paho_internals_problem(WithoutChunkedReads)

    monkeypatch.setattr(DirectClient, "_checked", problem)
    with pytest.raises(RuntimeError, match="paho-mqtt 9.9.9"):
        MqttTransport("unknown-paho", "127.0.0.1", 1883)
    # A client that needs no internals (the application's, or the agent's over TLS) is unaffected.
    assert type(make_client("app-unknown-paho")) is paho_client.paho.Client
    assert type(make_client("tls-unknown-paho", direct=True, security=MqttSecurity(tls=True))) is paho_client.paho.Client


def test_whole_packet_finds_a_body_only_when_all_of_it_is_buffered():
    body = b"x" * 300                                   # length 300: two bytes (0xAC 0x02)
    packet = bytes([0x32, 0xAC, 0x02]) + body
    assert paho_client._whole_packet(packet, 0) == (3, 303)
    assert paho_client._whole_packet(b"ab" + packet + b"\x40", 2) == (5, 305)   # one after it
    for cut in (1, 2, 3, 302):                          # the length, or the body, cut short
        assert paho_client._whole_packet(packet[:cut], 0) is None
    assert paho_client._whole_packet(bytes([0x30, 0x80, 0x80, 0x80, 0x80, 0x01]), 0) is None   # over 4 bytes


def test_requests_of_every_size_arrive_whole_and_in_order(broker):
    """Requests that fit many to a read, one that spans several reads (over READ_CHUNK), and small
    ones behind it: each handed over once, intact, in the order sent (a packet whole in the
    buffer is read in one step, one split across reads by paho's own reader)."""
    device = f"sizes-{time.monotonic_ns()}"
    transport = MqttTransport(device, broker.host, broker.port)
    got: queue.Queue = queue.Queue()
    transport.subscribe(f"req/{device}", got.put)
    transport.connect()
    app = make_client(f"app-{device}")
    connect(app, broker.host, broker.port)
    sizes = [10, 900, 3 * paho_client.READ_CHUNK + 17, 5, 70_000, 1] + [1_000] * 200
    payloads = [bytes([k % 251]) * size for k, size in enumerate(sizes)]
    try:
        for payload in payloads:
            app.publish(f"req/{device}", payload, qos=1)
        received = [got.get(timeout=20).payload for _ in payloads]
        assert [len(p) for p in received] == sizes
        assert received == payloads
        assert got.empty()
    finally:
        app.disconnect()
        app.loop_stop()
        transport.stop()
