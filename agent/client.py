"""An application's side of the MQTT wire: publish a request, get its one reply back.

Used by the demo's cameras and the loopback benchmark; any MQTT v5 client works the same way
(response topic + correlation data, msgpack payload; see the README).

With ``session_expiry_s`` > 0 the client keeps a persistent session (clean start off, its stable
client id): replies published while it reconnects, or while the broker restarts, wait for it in
the broker, and paho re-sends its requests the broker has not acknowledged. A reply that arrives
twice (QoS 1 is at-least-once) is passed on once and counted in ``duplicate_replies``. Correlation
data starts with random bytes per client object, so a restarted application never reuses one the
agent still remembers (the agent drops a request whose correlation it has seen within its window).

Behind a secured broker (README, "Securing the broker") ``security`` carries TLS and credentials
(:class:`agent.transport.paho_client.MqttSecurity`), and the reply topic must be one the broker's ACL
lets this client read: the sample ACL allows ``apps/<identity>/#``, so use the identity (the
certificate's CN, or the username) as ``client_id``, or pass ``reply_topic="apps/<identity>/..."``.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from concurrent.futures import Future
from typing import Callable, Mapping

import numpy as np
from paho.mqtt.properties import Properties

from agent.intake.msgpack_codec import decode_reply, encode_request
from agent.transport.paho_client import MqttSecurity, PublishProperties, connect, make_client
from agent.transport.topics import infer_topic, pool_infer_topic

ReplyCallback = Callable[[dict, float], None]   # (decoded reply, round trip seconds)


class InferenceClient:
    """Requests to one board (``device``), or with ``pool`` to any board of that group
    (``edge/v1/pool/<group>/infer/<model>``; ``device`` is then only a label): each reply names
    the board that answered or refused in ``served_by.device``."""

    def __init__(self, host: str, port: int, device: str, client_id: str, *, session_expiry_s: int = 0,
                 security: MqttSecurity | None = None, reply_topic: str | None = None,
                 pool: str | None = None, resend_after_s: float | None = None) -> None:
        self.device = device
        self.pool = pool
        # A pool's board that dies takes the requests it held with it (the broker gives a clean
        # session's unacknowledged messages to nobody): with resend_after_s, a request without a
        # reply that long after it was sent is published once more (same correlation data: a board
        # that saw it drops the copy, a reply that comes twice is passed on once).
        self.resend_after_s = resend_after_s
        self.resent = 0
        self._resender: threading.Thread | None = None
        self._closed = threading.Event()
        self.reply_topic = reply_topic or f"apps/{client_id}/replies"
        self._seq = itertools.count(1)
        self._prefix = os.urandom(8)
        self._lock = threading.Lock()
        self._waiting: dict[bytes, tuple[float, ReplyCallback]] = {}
        self._unanswered: dict[bytes, tuple[float, str, bytes, Properties]] = {}   # for resend_after_s
        self.duplicate_replies = 0      # replies for a request answered already (a QoS 1 re-send)
        self.client = make_client(client_id, security=security)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        suback: list = []
        self.client.on_subscribe = lambda client, userdata, mid, reason_codes, properties: (
            suback.extend(reason_codes), subscribed.set())
        # Subscribe on every connect: a broker that lost the session (or a clean one) lost the
        # subscription with it; with the session kept, subscribing again is harmless.
        self.client.on_connect = lambda client, userdata, flags, reason_code, properties: (
            reason_code.is_failure or client.subscribe(self.reply_topic, qos=1))
        connect(self.client, host, port, session_expiry_s=session_expiry_s)
        if not subscribed.wait(5.0):
            raise TimeoutError(f"broker {host}:{port} did not acknowledge the subscription to {self.reply_topic}")
        if suback and suback[0].is_failure:
            self.close()
            raise ConnectionError(f"broker {host}:{port} refused the subscription to the reply topic "
                                  f"{self.reply_topic}: {suback[0]} (its ACL: see reply_topic)")

    def send(self, model: str, inputs: Mapping[str, np.ndarray], on_reply: ReplyCallback, *,
             slo_ms: float | None = None, priority: int | None = None, request_id: str | None = None,
             min_accuracy: float | None = None) -> bytes:
        """Publish one request; ``on_reply`` runs on the network thread when its reply arrives.
        ``min_accuracy``: the wire's (a multi-exit model answers at an exit that gives it)."""
        seq = next(self._seq)
        correlation = self._prefix + seq.to_bytes(8, "big")
        payload = encode_request(request_id or f"{self.reply_topic}#{seq}", inputs, slo_ms=slo_ms, priority=priority,
                                 min_accuracy=min_accuracy)
        props = PublishProperties()
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = correlation
        with self._lock:
            self._waiting[correlation] = (time.perf_counter(), on_reply)
        topic = pool_infer_topic(self.pool, model) if self.pool else infer_topic(self.device, model)
        if self.resend_after_s is not None:
            with self._lock:
                self._unanswered[correlation] = (time.monotonic(), topic, payload, props)
                if self._resender is None:
                    self._resender = threading.Thread(target=self._resend_loop, name="resend", daemon=True)
                    self._resender.start()
        self.client.publish(topic, payload, qos=1, properties=props)
        return correlation

    def _resend_loop(self) -> None:
        while not self._closed.wait(min(0.1, self.resend_after_s / 4)):
            cutoff = time.monotonic() - self.resend_after_s
            with self._lock:
                due = [c for c, entry in self._unanswered.items() if entry[0] <= cutoff]
                again = [self._unanswered.pop(c) for c in due]
            for _, topic, payload, props in again:
                self.resent += 1
                self.client.publish(topic, payload, qos=1, properties=props)

    def infer(self, model: str, inputs: Mapping[str, np.ndarray], *, slo_ms: float | None = None,
              timeout: float = 10.0, min_accuracy: float | None = None) -> dict:
        """Blocking round trip; returns the decoded reply map."""
        future: Future = Future()
        self.send(model, inputs, lambda reply, rtt: future.set_result(reply), slo_ms=slo_ms,
                  min_accuracy=min_accuracy)
        return future.result(timeout)

    def outstanding(self) -> int:
        with self._lock:
            return len(self._waiting)

    def _on_message(self, client, userdata, message) -> None:
        correlation = getattr(message.properties, "CorrelationData", None) if message.properties else None
        with self._lock:
            entry = self._waiting.pop(correlation, None)
            self._unanswered.pop(correlation, None)
        if entry is None:
            self.duplicate_replies += 1    # answered already, or not ours
            return
        sent, callback = entry
        callback(decode_reply(message.payload), time.perf_counter() - sent)

    def close(self) -> None:
        self._closed.set()
        self.client.disconnect()
        self.client.loop_stop()
