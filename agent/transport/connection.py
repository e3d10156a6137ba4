"""The agent's one MQTT connection: a topic router, the retained status and the last will.

A board talks to its broker over one connection, whatever it serves: inference requests, offload
from peers, control commands, telemetry, a pool's shared subscription. One connection means one
client id (the broker's idea of who this board is), one last will that says ``offline`` when the
board vanishes, and one place that renews every subscription when the broker comes back. Each
topic's handler registers here with :meth:`MqttTransport.subscribe`; it never sees paho's client.

Handlers run on paho's network thread, one message at a time, in arrival order: they must return
quickly (decode, hand over, return). A handler that raises is logged and the next message is
delivered as usual; paho would otherwise let the exception end its network thread, and the
board would stop hearing anything while still looking connected to the broker.

Start-up order matters for the retained status: register the handlers first, then
:meth:`~MqttTransport.connect`. Every connect (the first and each reconnect) subscribes all the
registered filters, then publishes the status, so ``online`` is never visible before the board
listens.
"""
from __future__ import annotations

import json
import logging
import threading
from typing import Any, Callable

from paho.mqtt.client import MQTTMessage, MQTTMessageInfo
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties

from agent.transport.paho_client import connect, make_client
from agent.transport.topics import status_topic, unshared

__all__ = ["MqttTransport", "Handler"]

log = logging.getLogger(__name__)

#: A topic handler: called on the network thread with each message its filter matches.
Handler = Callable[[MQTTMessage], None]


class MqttTransport:
    """One MQTT v5 connection per agent, shared by every topic handler.

    ``status`` is called on every (re)connect for the retained status the board publishes on
    ``edge/v1/<device>/status``; the last will, published by the broker if the board disappears
    without disconnecting, is ``{"device": <device>, "state": "offline"}`` on the same topic.
    """

    def __init__(self, device: str, host: str, port: int, *, status: Callable[[], dict] | None = None,
                 client_id: str | None = None, keepalive_s: int = 30) -> None:
        self.device = device
        self.host, self.port = host, port
        self.keepalive_s = keepalive_s      # [mqtt] keepalive_s: how soon a dead board shows offline
        self.client_id = client_id or f"edge-agent-{device}"
        self.status_topic = status_topic(device)
        self._status = status
        self._offline = json.dumps({"device": device, "state": "offline"}).encode()
        self.client = make_client(self.client_id, will=(self.status_topic, self._offline, True))
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_unrouted
        # Guards the three tables below; held by the network thread in its callbacks and by callers
        # of subscribe/unsubscribe, never while waiting on the broker.
        self._cond = threading.Condition()
        self._subscriptions: dict[str, int] = {}     # filter -> qos: renewed on every connect
        self._inflight: dict[int, tuple[str, ...]] = {}   # SUBSCRIBE packet id -> its filters
        self._acked: dict[str, Any] = {}             # filter -> the broker's reason code, this connection
        self._started = False
        self._connect_handled = threading.Event()    # set once on_connect has subscribed and published

    # --- the router ------------------------------------------------------------------------------

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1, timeout: float = 10.0) -> None:
        """Route the messages that match ``topic_filter`` to ``handler`` and subscribe to it.

        Before :meth:`connect` this only registers (``connect`` subscribes and waits); on a started
        transport it returns once the broker has acknowledged the subscription, so nothing
        published after it returns is missed. A shared filter (``$share/<group>/x/+``) routes the
        messages on ``x/+``. One handler per filter (a shared and a plain filter on the same topics
        count as one). Raises ``TimeoutError`` when the broker does not acknowledge within
        ``timeout`` seconds, ``ConnectionError`` when it refuses.
        """
        match = unshared(topic_filter)
        with self._cond:
            taken = [f for f in self._subscriptions if unshared(f) == match]
            if taken:
                raise ValueError(f"topic filter {topic_filter!r}: {taken[0]!r} already routes the messages on {match!r}")
            self._subscriptions[topic_filter] = qos
            self._acked.pop(topic_filter, None)
            self.client.message_callback_add(match, self._guarded(topic_filter, handler))
            if self._started:
                self._send_subscribe([topic_filter])
        if self._started:
            self._wait_acked([topic_filter], timeout)

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop subscribing to ``topic_filter`` (now, and on later reconnects).

        Its handler stays routed: a message the broker sent before it took the UNSUBSCRIBE still
        reaches it, so a request already on its way is answered, not dropped.
        """
        with self._cond:
            self._subscriptions.pop(topic_filter, None)
            self._acked.pop(topic_filter, None)
        try:
            self.client.unsubscribe(topic_filter)
        except Exception:  # disconnected already: nothing is arriving anyway
            pass

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                properties: Properties | None = None) -> MQTTMessageInfo:
        """Publish on the agent's connection; safe from any thread (paho queues it). QoS 1 by
        default: a broker drops QoS 0 messages silently when their client lags or reconnects."""
        return self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)

    def publish_status(self, status: dict) -> MQTTMessageInfo:
        """Publish ``status`` as the board's retained status (QoS 1, JSON)."""
        return self.client.publish(self.status_topic, json.dumps(status).encode(), qos=1, retain=True)

    # --- life cycle ------------------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> "MqttTransport":
        """Connect, subscribe every registered filter, publish the status, and return once the
        broker has acknowledged the subscriptions. Raises ``ConnectionError`` naming ``host:port``
        when the broker cannot be reached or refuses, ``TimeoutError`` when it does not acknowledge."""
        with self._cond:
            self._started = True
        self._connect_handled.clear()
        connect(self.client, self.host, self.port, keepalive=self.keepalive_s)
        # connect() returns on CONNACK, which may be before _on_connect has run on the network thread.
        if not self._connect_handled.wait(timeout):
            raise TimeoutError(f"broker {self.host}:{self.port}: no connect callback within {timeout} s")
        with self._cond:
            filters = list(self._subscriptions)
        self._wait_acked(filters, timeout)
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Publish ``offline`` (retained) and disconnect: after every reply has been published.

        Waits up to ``timeout`` seconds for the broker to take the status; a broker already gone
        is no error, the last will says ``offline`` for the board then.
        """
        if self.client.is_connected():
            try:
                self.client.publish(self.status_topic, self._offline, qos=1, retain=True).wait_for_publish(timeout)
            except Exception:  # lost the broker meanwhile: the will covers it
                pass
        self.client.disconnect()
        self.client.loop_stop()

    # --- network thread --------------------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker %s:%d refused the connection: %s", self.host, self.port, reason_code)
            return
        # (Re)subscribe on every connect: the session ends with the connection (no session expiry), and a
        # restarted broker would otherwise leave the board deaf while it looks connected.
        with self._cond:
            self._inflight.clear()
            self._acked.clear()
            filters = list(self._subscriptions)
            if filters:
                self._send_subscribe(filters)
        if self._status is not None:
            try:
                self.publish_status(self._status())
            except Exception:
                log.exception("could not publish the status on %s", self.status_topic)
        log.info("connected to mqtt://%s:%d as %s, subscribed to %s", self.host, self.port, self.client_id, filters)
        self._connect_handled.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._cond:
            filters = self._inflight.pop(mid, ())
            for topic_filter, code in zip(filters, reason_codes):
                if topic_filter in self._subscriptions:
                    self._acked[topic_filter] = code
                    if code.is_failure:
                        log.error("broker %s:%d refused the subscription to %s: %s",
                                  self.host, self.port, topic_filter, code)
            self._cond.notify_all()

    def _on_unrouted(self, client, userdata, message: MQTTMessage) -> None:
        log.warning("message on %s matches no handler: dropped", message.topic)

    def _guarded(self, topic_filter: str, handler: Handler) -> Callable[[Any, Any, MQTTMessage], None]:
        def deliver(client, userdata, message: MQTTMessage) -> None:
            try:
                handler(message)
            except Exception:
                log.exception("handler of %s failed on a message on %s", topic_filter, message.topic)
        return deliver

    # --- helpers ---------------------------------------------------------------------------------

    def _send_subscribe(self, filters: list[str]) -> None:
        """One SUBSCRIBE for ``filters``; called with ``_cond`` held, so its SUBACK, handled on the
        network thread, finds the packet id recorded."""
        result, mid = self.client.subscribe([(f, self._subscriptions[f]) for f in filters])
        if result == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._inflight[mid] = tuple(filters)
        # Not connected: the next connect subscribes them.

    def _wait_acked(self, filters: list[str], timeout: float) -> None:
        with self._cond:
            acked = self._cond.wait_for(lambda: all(f in self._acked for f in filters), timeout)
            refused = {f: self._acked[f] for f in filters if f in self._acked and self._acked[f].is_failure}
        if refused:
            raise ConnectionError(f"broker {self.host}:{self.port} refused the subscription to "
                                  + ", ".join(f"{f} ({code})" for f, code in refused.items()))
        if not acked:
            raise TimeoutError(f"broker {self.host}:{self.port} did not acknowledge the subscription in {timeout} s")
