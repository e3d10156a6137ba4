"""A broker restarted under load: what reaches the agent, what is answered, what is lost.

``edge-agent bench broker-restart`` and the fault tests (tests/test_mqtt_faults.py) use this. The
load is a plain paho MQTT v5 client with a persistent session (clean start off, a session expiry):
it publishes QoS 1 requests with a response topic and correlation data to the agent's infer topic
and subscribes to its reply topic at QoS 1. Midway the broker is restarted on the same port,
gracefully (SIGTERM: a persistent Mosquitto saves its sessions and queued messages) or killed
(SIGKILL: it comes back with its last autosave), while the agent runs in this process.

What is counted, per correlation data:

* ``sent``: published by the application (paho keeps what the broker has not acknowledged and
  re-sends it after the reconnect);
* ``acked``: the broker acknowledged it (PUBACK) to the application;
* ``seen``: the agent took it (its intake remembers every request it took, by response topic and
  correlation (a digest of the two), for its de-duplication);
* ``answered``: a reply reached the application;
* ``duplicates``: a correlation answered with two different replies (two computations: what the
  de-duplication prevents), apart from ``redelivered``, the same reply received twice (QoS 1 on
  the reply's way; the application drops it by correlation);
* ``lost_unseen``: acknowledged but never seen by the agent (the broker lost the request);
* ``lost_after_seen``: seen by the agent, never answered (the broker lost the reply, or the agent
  dropped it: ``reply_overflow`` says which).
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from dataclasses import asdict, dataclass, field

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.intake.mqtt import request_key
from agent.intake.msgpack_codec import encode_request
from agent.transport.paho_client import connect, make_client
from agent.transport.topics import infer_topic

__all__ = ["PersistentLoad", "RestartFigures", "run_broker_restart", "format_restart"]

#: The run has settled when nothing new was answered or seen for this long (queues empty).
QUIET_S = 3.0


class PersistentLoad:
    """An application as a plain paho client with a persistent session: QoS 1 requests with a
    response topic and correlation data, replies collected by correlation."""

    def __init__(self, host: str, port: int, device: str, client_id: str, *, session_expiry_s: int = 600) -> None:
        self.device = device
        self.reply_topic = f"apps/{client_id}/replies"
        self._prefix = os.urandom(4)
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self.sent: dict[int, bytes] = {}            # mid -> correlation
        self._acked_mids: set[int] = set()
        self.replies: dict[bytes, list[bytes]] = {}   # correlation -> reply payloads, in arrival order
        self.client = make_client(client_id)
        self.client.max_inflight_messages_set(1000)
        self.client.reconnect_delay_set(0.2, 1)
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_connect = self._on_connect
        connect(self.client, host, port, session_expiry_s=session_expiry_s)
        if not subscribed.wait(10):
            raise TimeoutError(f"broker {host}:{port} did not acknowledge the subscription to {self.reply_topic}")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        # A broker that lost the session (killed before its autosave) lost the subscription too.
        if not reason_code.is_failure:
            client.subscribe(self.reply_topic, qos=1)

    def publish(self, model: str, payload: bytes) -> bytes:
        correlation = self._prefix + next(self._seq).to_bytes(4, "big")
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = correlation
        # Not under self._lock: paho calls on_publish holding its own lock, which publish takes too.
        info = self.client.publish(infer_topic(self.device, model), payload, qos=1, properties=props)
        with self._lock:
            self.sent[info.mid] = correlation
        return correlation

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if not reason_code.is_failure:
            with self._lock:
                self._acked_mids.add(mid)

    def acknowledged(self) -> set[bytes]:
        """The correlations of the requests the broker acknowledged (packet ids are not reused
        below 65,535 requests)."""
        with self._lock:
            return {self.sent[mid] for mid in self._acked_mids if mid in self.sent}

    def _on_message(self, client, userdata, message) -> None:
        correlation = getattr(message.properties, "CorrelationData", None)
        with self._lock:
            self.replies.setdefault(correlation, []).append(message.payload)

    def correlations(self) -> set[bytes]:
        with self._lock:
            return set(self.sent.values())

    def answered(self) -> set[bytes]:
        with self._lock:
            return set(self.replies)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class RestartFigures:
    mode: str                 # graceful | killed
    sent: int = 0
    acked: int = 0
    seen: int = 0
    answered: int = 0
    duplicates: int = 0
    redelivered: int = 0
    lost_unseen: int = 0
    lost_after_seen: int = 0
    unacked_unanswered: int = 0     # never acknowledged by the broker nor answered: the client's to retry
    agent: dict = field(default_factory=dict)       # the intake's and the transport's counters
    seconds: float = 0.0


def run_broker_restart(graceful: bool, *, backlog: bool = False, requests: int = 300, rate_hz: float = 150.0,
                       restart_at: float = 0.4, settle_s: float = 20.0, device: str | None = None,
                       slo_ms: float = 30000.0, session_expiry_s: int = 3600) -> RestartFigures:
    """Send ``requests`` at ``rate_hz`` to an agent (the demo's small model) over a persistent
    Mosquitto and restart the broker after ``restart_at`` of them, then wait up to ``settle_s`` for
    every request to be answered. With ``backlog`` the agent is away when the broker restarts: it
    stops (a restart of the agent), the next quarter of the requests queue up in the broker for its
    session, the broker restarts with them, and a new agent with the same device takes them. The
    agent's reconnect delay is 1 s, the application's 0.2 s, so requests also queue for the agent
    while it reconnects. ``slo_ms`` is generous: the figures are about delivery, not latency (a
    request late after the outage would be answered ``rejected``, still once). ``session_expiry_s``
    is the agent's ``[mqtt] session_expiry_s`` (0: the clean session agents had before issue 21)."""
    from edge_lab.broker import LocalBroker
    from agent.config import CONFIG_VERSION, parse_config
    from agent.models.digits import frames_from_digits, load_test_set
    from agent.service import Service

    if not 1 <= requests < 65000:
        raise ValueError(f"requests = {requests!r}: expected 1..64999 (MQTT packet ids are not reused below that)")
    device = device or f"restart-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    frames = frames_from_digits(load_test_set()[0][:64])
    payloads = [encode_request(f"r{i}", {"frames": frames[i % len(frames)]}, slo_ms=slo_ms) for i in range(requests)]
    figures = RestartFigures(("graceful" if graceful else "killed") + (" +backlog" if backlog else "")
                             + ("" if session_expiry_s else " clean"))
    restart_index = int(requests * restart_at)
    backlog_end = restart_index + (requests // 4 if backlog else 0)
    started = time.perf_counter()
    services: list[Service] = []
    seen: set = set()
    counters: dict[str, dict[str, int]] = {"intake": {}, "transport": {}}

    def retire(service: Service) -> None:
        service.close()
        seen.update(service.mqtt.seen_keys())
        for part, snapshot in (("intake", service.mqtt.counters.snapshot()),
                               ("transport", service.transport.counters.snapshot())):
            for name, n in snapshot.items():
                counters[part][name] = counters[part].get(name, 0) + n

    with LocalBroker(persistence=True) as broker:
        config = parse_config({
            "config_version": CONFIG_VERSION,
            "agent": {"device": device, "workers": 2},
            "mqtt": {"host": broker.host, "port": broker.port, "keepalive_s": 5, "session_expiry_s": session_expiry_s},
            "models": [{"name": "mobilenet_digits", "card": "demo:mobilenet_digits", "instances": 1}],
        })
        services.append(Service(config, grace_s=2.0))
        load = PersistentLoad(broker.host, broker.port, device, f"load-{device}")
        try:
            # Both sessions saved by an autosave before the load starts (a broker killed before its
            # first autosave forgets them, and with them everything queued).
            time.sleep(broker.autosave_interval_s + 0.5)
            period = 1.0 / rate_hz
            next_at = time.perf_counter()
            for i, payload in enumerate(payloads):
                if i == restart_index:
                    if backlog:
                        retire(services.pop())       # the agent restarts: its session stays
                    else:
                        broker.restart(graceful=graceful)
                if backlog and i == backlog_end:
                    broker.restart(graceful=graceful)
                    services.append(Service(config, grace_s=2.0))
                load.publish("mobilenet_digits", payload)
                next_at += period
                pause = next_at - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
            if not services:
                broker.restart(graceful=graceful)
                services.append(Service(config, grace_s=2.0))
            service = services[-1]
            sent = load.correlations()
            # Settled: everything answered, or nothing new for QUIET_S with both clients' outgoing
            # queues empty (every request and reply acknowledged by the broker).
            deadline, last, quiet_since = time.monotonic() + settle_s, None, time.monotonic()
            while time.monotonic() < deadline and not sent <= load.answered():
                state = (len(load.answered()), service.mqtt.remembered)
                if state != last:
                    last, quiet_since = state, time.monotonic()
                elif (time.monotonic() - quiet_since > QUIET_S and not load.client._out_messages
                      and not service.transport.client._out_messages):
                    break
                time.sleep(0.1)
            time.sleep(0.3)      # a late re-sent copy would show up as a duplicate now
            retire(services.pop())
            seen = {c for c in sent if request_key(load.reply_topic, c) in seen}
            answered = load.answered()
            acked = load.acknowledged()
            with load._lock:
                replies = {c: list(r) for c, r in load.replies.items()}
            figures.sent, figures.acked, figures.seen, figures.answered = len(sent), len(acked), len(seen), len(answered)
            figures.duplicates = sum(len(set(r)) > 1 for r in replies.values())
            figures.redelivered = sum(len(r) - len(set(r)) for r in replies.values())
            figures.lost_unseen = len((acked - seen) - answered)
            figures.lost_after_seen = len(seen - answered)
            figures.unacked_unanswered = len(sent - acked - answered)
            figures.agent = counters
        finally:
            load.close()
            for service in services:
                service.close()
    figures.seconds = round(time.perf_counter() - started, 2)
    return figures


def format_restart(rows: list[RestartFigures]) -> str:
    keys = ["sent", "acked", "seen", "answered", "duplicates", "redelivered", "lost_unseen", "lost_after_seen",
            "unacked_unanswered"]
    lines = [f"{'broker':<18}" + "".join(f"{k:>{max(6, len(k)) + 2}}" for k in keys)]
    for row in rows:
        values = asdict(row)
        lines.append(f"{row.mode:<18}" + "".join(f"{values[k]:>{max(6, len(k)) + 2}}" for k in keys))
    for row in rows:
        lines.append(f"{row.mode}: agent {row.agent}, {row.seconds} s")
    return "\n".join(lines)
