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

Delivery (issue 21): the session is persistent when ``session_expiry_s`` > 0 (the agent's default):
clean start off on every connect, the stable client id ``edge-agent-<device>``, and the broker keeps
the subscriptions and the QoS 1 requests for them while the agent reconnects or restarts. Incoming
messages are acknowledged (PUBACK) by this transport once their handler has returned, so a request
is the broker's until the agent has taken it; a held filter (:meth:`MqttTransport.hold`, while the
agent drains) is not acknowledged, and the broker re-sends those messages to the next session.
Outgoing QoS 1 messages (the replies) stay in paho's queue until the broker acknowledges them, and
paho re-sends the unacknowledged ones after a reconnect; the queue is bounded
(``max_queued_messages``), and what overflows it is counted and logged, never raised.

Supervision: a watchdog thread restarts paho's network thread if it ever dies, and
:meth:`MqttTransport.healthy` says whether the connection is up and served (the agent's readiness).
Disconnects soon after connecting, or the broker's "Session taken over" (0x8E), mean another client
uses this client id: each is counted, logged at most once per interval naming the likely cause, and
the reconnects back off exponentially instead of kicking the other client off every second.

Start-up order matters for the retained status: register the handlers first, then
:meth:`~MqttTransport.connect`. Every connect (the first and each reconnect) subscribes all the
registered filters, then publishes the status, so ``online`` is never visible before the board
listens.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable

from paho.mqtt.client import MQTTMessage, MQTTMessageInfo
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties

from agent.telemetry import Counters, RateLimitedLog
from agent.transport.paho_client import MqttSecurity, connect, make_client, session_args
from agent.transport.topics import status_topic, unshared

__all__ = ["MqttTransport", "Handler"]

log = logging.getLogger(__name__)

#: A topic handler: called on the network thread with each message its filter matches.
Handler = Callable[[MQTTMessage], None]

#: MQTT v5 reason code: the broker closed this connection because another one used its client id.
SESSION_TAKEN_OVER = 0x8E
#: A connection that ends sooner than this after its CONNACK counts as a flap.
SHORT_CONNECTION_S = 5.0
#: This many flaps in a row (or one "Session taken over") and the agent suspects a takeover.
FLAPS_FOR_TAKEOVER = 3
#: How often the watchdog checks paho's network thread.
WATCHDOG_INTERVAL_S = 0.5
#: What the transport counts (``MqttTransport.counters``; the retained status's ``mqtt``).
COUNTERS = ("connects", "session_resumed", "disconnects", "takeovers", "loop_restarts", "redelivered",
            "held", "publish_overflow", "publish_failed")


class MqttTransport:
    """One MQTT v5 connection per agent, shared by every topic handler.

    ``status`` is called on every (re)connect for the retained status the board publishes on
    ``edge/v1/<device>/status``; the last will, published by the broker if the board disappears
    without disconnecting, is ``{"device": <device>, "state": "offline"}`` on the same topic.
    """

    def __init__(self, device: str, host: str, port: int, *, status: Callable[[], dict] | None = None,
                 client_id: str | None = None, keepalive_s: int = 30, session_expiry_s: int = 3600,
                 max_inflight_messages: int = 1000, max_queued_messages: int = 10000, reconnect_max_delay_s: int = 60,
                 takeover_log_interval_s: float = 30.0, security: MqttSecurity | None = None,
                 will: bool = True) -> None:
        self.device = device
        self.host, self.port = host, port
        self.keepalive_s = keepalive_s      # [mqtt] keepalive_s: how soon a dead board shows offline
        self.session_expiry_s = session_expiry_s    # [mqtt] session_expiry_s: 0 = a clean session
        self.reconnect_max_delay_s = reconnect_max_delay_s
        self.client_id = client_id or f"edge-agent-{device}"
        self.status_topic = status_topic(device)
        self._status = status
        self._offline = json.dumps({"device": device, "state": "offline"}).encode()
        # [mqtt] TLS and credentials (README, "Securing the broker"); none: plain TCP, anonymous.
        self.security = security or MqttSecurity()
        # The last will: none for a second connection of the board (a pool's), whose loss does
        # not mean the board is gone.
        self._will = will
        self.client = make_client(self.client_id, will=(self.status_topic, self._offline, True) if will else None,
                                  security=security, direct=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_unrouted
        # Acknowledge each message after its handler has taken it (and never a held one).
        self.client.manual_ack_set(True)
        # Outgoing QoS 1 messages in flight at once, and in all (in flight + waiting for the
        # connection): the bound on what a long broker outage can hold in memory.
        self.client.max_inflight_messages_set(max_inflight_messages)
        self.client.max_queued_messages_set(max_queued_messages)
        self.client.reconnect_delay_set(1, reconnect_max_delay_s)
        # A callback that raises is logged by paho instead of ending its network thread.
        self.client.suppress_exceptions = True
        self.counters = Counters(*COUNTERS)
        self._overflow_log = RateLimitedLog(log)
        self._takeover_log = RateLimitedLog(log, takeover_log_interval_s)
        self._held: set[str] = set()                 # filters whose messages are left to the next session
        self._connected_at: float | None = None      # monotonic time of the last CONNACK, while connected
        self._session_present = False
        self._flaps = 0                              # connections in a row that ended within SHORT_CONNECTION_S
        self._backoff_s = 1                          # the reconnect delay paho starts from now
        self.takeover_suspected = False
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._episode = threading.Lock()     # the takeover state: the network thread and the watchdog
        # Guards the three tables below; held by the network thread in its callbacks and by callers
        # of subscribe/unsubscribe, never while waiting on the broker.
        self._cond = threading.Condition()
        self._subscriptions: dict[str, int] = {}     # filter -> qos: renewed on every connect
        self._inflight: dict[int, tuple[str, ...]] = {}   # SUBSCRIBE packet id -> its filters
        self._acked: dict[str, Any] = {}             # filter -> the broker's reason code, this connection
        self._started = False
        self._connect_handled = threading.Event()    # set once on_connect has subscribed and published
        self._on_session: list[Callable[[bool], None]] = []     # on_session listeners

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
            self._held.discard(topic_filter)
            self.client.message_callback_add(match, self._guarded(topic_filter, handler))
            if self._started:
                self._send_subscribe([topic_filter])
        if self._started:
            self._wait_acked([topic_filter], timeout)

    def on_session(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(session_present)`` on the network thread after every CONNACK (once the
        subscriptions are renewed). A reconnect means what was on its way may be gone: with
        ``session_present`` False the broker lost this client's session and every QoS 1 message
        queued for it; with True it may still have lost what came after its last autosave. Whoever
        waits for a message decides what that costs it (the offload client runs the batches out on
        peers here, the idle probe drops its probes)."""
        self._on_session.append(listener)

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

    def hold(self, topic_filter: str) -> None:
        """Stop taking the messages of ``topic_filter`` without unsubscribing: they are neither
        handled nor acknowledged, so the broker keeps them in the session and re-sends them to the
        next connection with this client id (the restarted agent). With a clean session (no
        session expiry) nothing would keep them: unsubscribe instead."""
        with self._cond:
            self._held.add(topic_filter)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                properties: Properties | None = None) -> MQTTMessageInfo:
        """Publish on the agent's connection; safe from any thread, never raises on a full queue
        or a lost connection (paho keeps a QoS 1 message until the broker acknowledges it, across
        reconnects). QoS 1 by default: a broker drops QoS 0 messages silently when their client
        lags or reconnects. A message that finds the outgoing queue full (``max_queued_messages``) is
        dropped: counted in ``publish_overflow``, logged at most every 10 s, and its info's
        ``rc`` is ``MQTT_ERR_QUEUE_SIZE``."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            total = self.counters.add("publish_overflow")
            self._overflow_log(logging.ERROR, "outgoing MQTT queue full (%d messages waiting for the broker "
                               "%s:%d): a message to %s was dropped, %d so far", self.client.max_queued_messages,
                               self.host, self.port, topic, total)
        elif info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN) and qos == 0:
            self.counters.add("publish_failed")     # QoS 0 is not kept for the next connection
        return info

    def publish_status(self, status: dict) -> MQTTMessageInfo:
        """Publish ``status`` as the board's retained status (QoS 1, JSON), with the connection's
        own state under ``mqtt``."""
        status = dict(status)
        status["mqtt"] = self.health()
        return self.publish(self.status_topic, json.dumps(status).encode(), qos=1, retain=True)

    # --- health ----------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """The connection is up (CONNACK received, not lost since)."""
        return self.client.is_connected()

    def loop_alive(self) -> bool:
        """paho's network thread runs (the watchdog restarts it if it dies)."""
        # paho 2.x keeps its loop_start thread in ``_thread`` (None once it ended); no public accessor.
        thread = getattr(self.client, "_thread", None)
        return thread is not None and thread.is_alive()

    def healthy(self) -> bool:
        """Connected, the network thread serving it, and no other client taking the session over:
        the agent's readiness on MQTT."""
        return self.connected and self.loop_alive() and not self.takeover_suspected

    def health(self) -> dict:
        """The connection's state and counters, for the retained status and operators."""
        return {"connected": self.connected, "loop_alive": self.loop_alive(),
                "session_present": self._session_present, "persistent": self.session_expiry_s > 0,
                "takeover_suspected": self.takeover_suspected, "reconnect_delay_s": self._backoff_s,
                # paho 2.x: its QoS > 0 messages not yet acknowledged by the broker (no public accessor)
                "queued_out": len(getattr(self.client, "_out_messages", ())), **self.counters.snapshot()}

    # --- life cycle ------------------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> "MqttTransport":
        """Connect, subscribe every registered filter, publish the status, and return once the
        broker has acknowledged the subscriptions. Raises ``ConnectionError`` naming ``host:port``
        when the broker cannot be reached or refuses, ``TimeoutError`` when it does not acknowledge."""
        with self._cond:
            self._started = True
        self._stopping.clear()
        self._connect_handled.clear()
        connect(self.client, self.host, self.port, keepalive=self.keepalive_s, session_expiry_s=self.session_expiry_s)
        # connect() returns on CONNACK, which may be before _on_connect has run on the network thread.
        if not self._connect_handled.wait(timeout):
            raise TimeoutError(f"broker {self.host}:{self.port}: no connect callback within {timeout} s")
        with self._cond:
            filters = list(self._subscriptions)
        self._wait_acked(filters, timeout)
        if self._watchdog is None or not self._watchdog.is_alive():
            self._watchdog = threading.Thread(target=self._watch, name=f"mqtt-watchdog-{self.client_id}", daemon=True)
            self._watchdog.start()
        return self

    def connect_in_background(self) -> None:
        """Let paho's network loop keep trying an unreachable broker (backing off up to
        ``reconnect_max_delay_s``), for a start that serves other intakes meanwhile: every connect
        subscribes and publishes the status as :meth:`connect` does, with the same session."""
        with self._cond:
            self._started = True
        self._stopping.clear()
        self.client.connect_async(self.host, self.port, keepalive=self.keepalive_s,
                                  **session_args(self.session_expiry_s))
        self.client.loop_start()
        if self._watchdog is None or not self._watchdog.is_alive():
            self._watchdog = threading.Thread(target=self._watch, name=f"mqtt-watchdog-{self.client_id}", daemon=True)
            self._watchdog.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Publish ``offline`` (retained) and disconnect: after every reply has been published.

        Waits up to ``timeout`` seconds for the broker to take the status; a broker already gone
        is no error, the last will says ``offline`` for the board then. With a persistent session
        the broker keeps the subscriptions: requests published until the agent is back wait there.
        """
        self._stopping.set()
        if self._will and self.client.is_connected():
            try:
                self.client.publish(self.status_topic, self._offline, qos=1, retain=True).wait_for_publish(timeout)
            except Exception:  # lost the broker meanwhile: the will covers it
                pass
        self.client.disconnect()
        self.client.loop_stop()
        if self._watchdog is not None:
            self._watchdog.join(2 * WATCHDOG_INTERVAL_S + 1.0)

    def _watch(self) -> None:
        """Restart paho's network thread if it ends while the transport runs (an exception that
        escaped paho itself): without it the board would hear nothing more while its retained
        status still said online."""
        while not self._stopping.wait(WATCHDOG_INTERVAL_S):
            self._settle()
            if self.loop_alive():
                continue
            if self._stopping.is_set():
                break
            restarts = self.counters.add("loop_restarts")
            log.error("the MQTT network thread of %s ended: restarting it (%d restarts so far)",
                      self.client_id, restarts)
            try:
                self.client.loop_start()
            except Exception:
                log.exception("could not restart the MQTT network thread of %s", self.client_id)

    def _settle(self) -> None:
        """A connection that has lasted SHORT_CONNECTION_S ends a takeover episode: the next
        disconnect reconnects at once again."""
        with self._episode:
            connected_at = self._connected_at
            if connected_at is None or time.monotonic() - connected_at < SHORT_CONNECTION_S or not (
                    self._flaps or self.takeover_suspected or self._backoff_s != 1):
                return
            self._flaps, self._backoff_s = 0, 1
            if self.takeover_suspected:
                log.info("MQTT connection of %s stable again", self.client_id)
            self.takeover_suspected = False
            self.client.reconnect_delay_set(1, self.reconnect_max_delay_s)

    # --- network thread --------------------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker %s:%d refused the connection: %s", self.host, self.port, reason_code)
            return
        with self._episode:
            self._connected_at = time.monotonic()
        self._session_present = bool(flags.session_present)
        self.counters.add("connects")
        if self._session_present:
            self.counters.add("session_resumed")
        # (Re)subscribe on every connect: with a session present the broker kept the subscriptions
        # (re-subscribing is harmless), without one (a clean session, a broker that lost its state)
        # the board would otherwise stay deaf while it looks connected.
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
        log.info("connected to %s://%s:%d as %s (session %s), subscribed to %s",
                 "mqtts" if self.security.tls else "mqtt", self.host, self.port, self.client_id,
                 "resumed" if self._session_present else "new", filters)
        for listener in self._on_session:
            try:
                listener(self._session_present)
            except Exception:
                log.exception("a session listener failed")
        self._connect_handled.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._episode:
            if self._connected_at is None:     # a failed connect attempt: paho's backoff covers it
                return
            lasted = time.monotonic() - self._connected_at
            self._connected_at = None
            self.counters.add("disconnects")
            if self._stopping.is_set():
                return
            taken_over = getattr(reason_code, "value", None) == SESSION_TAKEN_OVER
            self._flaps = self._flaps + 1 if lasted < SHORT_CONNECTION_S else 0
            suspected = taken_over or self._flaps >= FLAPS_FOR_TAKEOVER
            if suspected:
                self.takeover_suspected = True
                self._backoff_s = min(self._backoff_s * 2, self.reconnect_max_delay_s)
            elif lasted >= SHORT_CONNECTION_S:
                self.takeover_suspected = False
                self._backoff_s = 1
            backoff = self._backoff_s
            # paho starts its reconnect delay over from the minimum after every CONNACK, so a takeover
            # loop (connect, kicked off, reconnect) would hammer at the minimum: raise the minimum.
            self.client.reconnect_delay_set(backoff, max(backoff, self.reconnect_max_delay_s))
        if suspected:
            total = self.counters.add("takeovers")
            self._takeover_log(logging.ERROR, "MQTT connection of %s to %s:%d closed after %.1f s (%s): another "
                               "client is probably using the client id %s (a second agent with device %r, or an "
                               "application reusing it); %d takeovers so far, reconnecting in %d s",
                               self.client_id, self.host, self.port, lasted, reason_code, self.client_id,
                               self.device, total, backoff)
        else:
            log.warning("MQTT connection of %s to %s:%d lost after %.1f s: %s", self.client_id, self.host,
                        self.port, lasted, reason_code)

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
        # A subscription the session kept from an earlier run with other handlers: acknowledge it, or
        # the broker's in-flight window for this client would fill up with it.
        self._ack(message)
        log.warning("message on %s matches no handler: dropped", message.topic)

    def _guarded(self, topic_filter: str, handler: Handler) -> Callable[[Any, Any, MQTTMessage], None]:
        def deliver(client, userdata, message: MQTTMessage) -> None:
            if topic_filter in self._held:
                self.counters.add("held")    # left unacknowledged: the broker re-sends it to the next session
                return
            if message.dup:
                self.counters.add("redelivered")
            try:
                handler(message)
            except Exception:
                log.exception("handler of %s failed on a message on %s", topic_filter, message.topic)
            self._ack(message)
        return deliver

    def _ack(self, message: MQTTMessage) -> None:
        if message.qos > 0:
            try:
                self.client.ack(message.mid, message.qos)
            except Exception:  # the connection went: the broker re-sends it to the next one
                log.debug("could not acknowledge message %d on %s", message.mid, message.topic, exc_info=True)

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
