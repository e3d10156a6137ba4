"""MQTT v5 intake: ``edge/v1/<device>/infer/<model>`` in, a reply on the request's response topic.

One subscriber of the agent's transport (:class:`agent.transport.connection.MqttTransport`), which
owns the connection, the status and the last will. Thin by design (handlers run on paho's network
thread, which must never block): decode, validate, ``Agent.submit``, return. The reply is published
from the worker that finished the batch. Every request that carries a response topic gets exactly
one reply, an error reply included; one without a response topic that can be published to (none,
or a wildcard) cannot be answered, so it is counted and logged (rate-limited), not run.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future

from paho.mqtt.client import MQTTMessage
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from agent.api import Agent
from agent.errors import InferenceError
from agent.intake.msgpack_codec import decode_request, encode_reply, error_reply, result_reply
from agent.transport.connection import MqttTransport
from agent.transport.topics import infer_topic, publish_topic_problem

log = logging.getLogger(__name__)

#: An unanswerable request is logged at most once per this many seconds (with the count since).
UNANSWERABLE_LOG_INTERVAL_S = 10.0


class MqttIntake:
    """Takes the agent's inference requests from its transport and answers every one."""

    def __init__(self, agent: Agent, transport: MqttTransport) -> None:
        self.agent = agent
        self.transport = transport
        self.device = agent.config.device
        self.topic_filter = infer_topic(self.device)      # edge/v1/<device>/infer/+
        self.max_payload = agent.config.max_payload_bytes
        self.unanswerable = 0            # requests without a response topic one can publish to
        self._lock = threading.Lock()
        self._logged_at = -UNANSWERABLE_LOG_INTERVAL_S
        self._unlogged = 0

    def start(self, timeout: float = 10.0) -> "MqttIntake":
        """Subscribe to the agent's inference topics. Before the transport connects this registers
        (the transport's connect waits for the broker's acknowledgement); after, it returns once the
        broker has acknowledged: from then on no request published to them is missed."""
        self.transport.subscribe(self.topic_filter, self._on_message, qos=1, timeout=timeout)
        log.info("taking requests for %s on %s", sorted(self.agent.models), self.topic_filter)
        return self

    # --- network thread: decode, validate, submit, return --------------------------------------

    def _on_message(self, message: MQTTMessage) -> None:
        props = message.properties
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        problem = publish_topic_problem(response_topic) if response_topic else "no response topic"
        if problem is not None:
            self._unanswerable(message.topic, problem)
            return
        model = message.topic.rsplit("/", 1)[-1]
        request_id = None
        try:
            request = decode_request(message.payload, self.max_payload)
            request_id = request.id
            future = self.agent.submit(model, request.inputs, slo_ms=request.slo_ms, deadline=request.deadline,
                                       priority=request.priority, client_id=request.id)
        except InferenceError as exc:
            if request_id is None:
                request_id = getattr(exc, "request_id", None)
            self._publish(response_topic, correlation, error_reply(request_id, exc))
            return
        except Exception as exc:  # never let one request take down the network thread
            log.exception("unexpected failure on %s", message.topic)
            self._publish(response_topic, correlation,
                          error_reply(request_id, InferenceError("internal", f"{type(exc).__name__}: {exc}")))
            return
        future.add_done_callback(lambda f: self._reply(f, response_topic, correlation, request_id))

    # --- worker threads: the reply -------------------------------------------------------------

    def _reply(self, future: Future, response_topic: str, correlation: bytes | None, request_id: str) -> None:
        error = future.exception()
        if error is None:
            reply = result_reply(future.result(), request_id)
        elif isinstance(error, InferenceError):
            reply = error_reply(request_id, error)
        else:
            reply = error_reply(request_id, InferenceError("internal", f"{type(error).__name__}: {error}"))
        self._publish(response_topic, correlation, reply)

    def _publish(self, response_topic: str, correlation: bytes | None, reply: dict) -> None:
        """Publish a reply; a failure is counted and logged, never raised into the calling thread
        (paho's network thread, or the worker that finished the batch)."""
        props = Properties(PacketTypes.PUBLISH)
        try:
            if correlation is not None:
                props.CorrelationData = correlation
            self.transport.publish(response_topic, encode_reply(reply), qos=1, properties=props)
        except Exception as exc:
            self._unanswerable(response_topic, f"reply not published: {type(exc).__name__}: {exc}")

    def _unanswerable(self, where: str, why: str) -> None:
        """Count a request that gets no reply; log it, at most once per UNANSWERABLE_LOG_INTERVAL_S."""
        now = time.monotonic()
        with self._lock:
            self.unanswerable += 1
            total = self.unanswerable
            if now - self._logged_at < UNANSWERABLE_LOG_INTERVAL_S:
                self._unlogged += 1
                return
            self._logged_at, unlogged, self._unlogged = now, self._unlogged, 0
        log.warning("request on %s not answered: %s (%d unanswerable so far, %d not logged since the last)",
                    where, why, total, unlogged)

    def stop_taking(self) -> None:
        """Unsubscribe, so no new request arrives while the agent drains (replies still go out)."""
        self.transport.unsubscribe(self.topic_filter)
