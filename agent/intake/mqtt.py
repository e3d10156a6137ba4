"""MQTT v5 intake: ``edge/v1/<device>/infer/<model>`` in, a reply on the request's response topic.

Thin by design (paho's callbacks run on its network thread, which must never block): decode,
validate, ``Agent.submit``, return. The reply is published from the worker that finished the batch.
Every request that carries a response topic gets exactly one reply, an error reply included; one
without a response topic cannot be answered, so it is counted and logged, not run.
"""
from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import Future

from paho.mqtt.client import MQTTMessage
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from agent import wire
from agent.api import Agent
from agent.errors import InferenceError
from agent.mqtt import connect, make_client

log = logging.getLogger(__name__)


def infer_topic(device: str, model: str) -> str:
    return f"edge/v1/{device}/infer/{model}"


def status_topic(device: str) -> str:
    return f"edge/v1/{device}/status"


class MqttIntake:
    """Subscribes the agent to its inference topics on a broker and answers every request."""

    def __init__(self, agent: Agent, host: str, port: int) -> None:
        self.agent = agent
        self.device = agent.config.device
        self.host, self.port = host, port
        self.max_payload = agent.config.max_payload_bytes
        self.unanswerable = 0            # requests without a response topic
        self._lock = threading.Lock()
        offline = json.dumps({"device": self.device, "state": "offline"}).encode()
        self.client = make_client(f"edge-agent-{self.device}", will=(status_topic(self.device), offline, True))
        self._subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()

    def start(self, timeout: float = 10.0) -> "MqttIntake":
        """Connect and return once the broker has acknowledged the subscription: from then on no
        request published to the agent's topics is missed."""
        connect(self.client, self.host, self.port)
        if not self._subscribed.wait(timeout):
            raise TimeoutError(f"broker {self.host}:{self.port} did not acknowledge the subscription in {timeout} s")
        return self

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        # (Re)subscribe on every connect so a broker restart does not leave the agent deaf.
        if reason_code.is_failure:
            log.error("broker %s:%d refused the connection: %s", self.host, self.port, reason_code)
            return
        client.subscribe(f"edge/v1/{self.device}/infer/+", qos=0)
        client.publish(status_topic(self.device), json.dumps(self.agent.status()).encode(), qos=1, retain=True)
        log.info("serving %s on mqtt://%s:%d", sorted(self.agent.models), self.host, self.port)

    # --- network thread: decode, validate, submit, return --------------------------------------

    def _on_message(self, client, userdata, message: MQTTMessage) -> None:
        props = message.properties
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        if not response_topic:
            with self._lock:
                self.unanswerable += 1
            log.warning("request on %s has no response topic: not run (%d so far)", message.topic, self.unanswerable)
            return
        model = message.topic.rsplit("/", 1)[-1]
        request_id = None
        try:
            request = wire.decode_request(message.payload, self.max_payload)
            request_id = request.id
            future = self.agent.submit(model, request.inputs, slo_ms=request.slo_ms, deadline=request.deadline,
                                       priority=request.priority, client_id=request.id)
        except InferenceError as exc:
            if request_id is None:
                request_id = getattr(exc, "request_id", None)
            self._publish(response_topic, correlation, wire.error_reply(request_id, exc))
            return
        except Exception as exc:  # never let one request take down the network thread
            log.exception("unexpected failure on %s", message.topic)
            self._publish(response_topic, correlation,
                          wire.error_reply(request_id, InferenceError("internal", f"{type(exc).__name__}: {exc}")))
            return
        future.add_done_callback(lambda f: self._reply(f, response_topic, correlation, request_id))

    # --- worker threads: the reply -------------------------------------------------------------

    def _reply(self, future: Future, response_topic: str, correlation: bytes | None, request_id: str) -> None:
        error = future.exception()
        if error is None:
            reply = future.result().as_wire(request_id)
        elif isinstance(error, InferenceError):
            reply = wire.error_reply(request_id, error)
        else:
            reply = wire.error_reply(request_id, InferenceError("internal", f"{type(error).__name__}: {error}"))
        self._publish(response_topic, correlation, reply)

    def _publish(self, response_topic: str, correlation: bytes | None, reply: dict) -> None:
        props = Properties(PacketTypes.PUBLISH)
        if correlation is not None:
            props.CorrelationData = correlation
        self.client.publish(response_topic, wire.encode_reply(reply), qos=0, properties=props)

    def stop_taking(self) -> None:
        """Unsubscribe, so no new request arrives while the agent drains (replies still go out)."""
        try:
            self.client.unsubscribe(f"edge/v1/{self.device}/infer/+")
        except Exception:  # disconnected already: nothing is arriving anyway
            pass

    def stop(self) -> None:
        """Publish ``offline`` (retained) and disconnect: after ``Agent.close`` has answered everything."""
        offline = json.dumps({"device": self.device, "state": "offline"}).encode()
        try:
            self.client.publish(status_topic(self.device), offline, qos=1, retain=True).wait_for_publish(2.0)
        except Exception:  # broker already gone: the will says offline for us
            pass
        self.client.disconnect()
        self.client.loop_stop()
