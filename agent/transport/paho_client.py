"""Thin helpers for paho-mqtt 2.x MQTT v5 clients: the agent's transport, the application client
(``agent.client``), the load generator and the tests use them.

Two things every client here needs and paho does not do by itself:

* ``TCP_NODELAY``. paho leaves Nagle's algorithm on; a small reply then waits for the peer's
  delayed ACK, which on loopback made a request/reply round trip far slower (BENCHMARKS.md,
  "Agent overhead per request at batch 1", and "Figures that were in docstrings"). The
  option is set in ``on_socket_open``, which paho calls for every new socket (first connect and
  each reconnect) before the CONNECT packet is written. Callers must not replace
  ``client.on_socket_open``; chain through :data:`NODELAY_SOCKET_OPEN` if they need the hook.
* the v2 callback API (``CallbackAPIVersion.VERSION2``) and MQTT v5, which the wire protocol needs
  for response topics and correlation data.

Callbacks run on paho's network thread: they must never block there (hand work to a queue).
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

__all__ = ["make_client", "connect", "session_args", "NODELAY_SOCKET_OPEN", "set_tcp_nodelay"]


def set_tcp_nodelay(sock: Any) -> None:
    """Turn Nagle's algorithm off on a TCP socket (an SSL socket passes it to the TCP one)."""
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _on_socket_open(client: paho.Client, userdata: Any, sock: Any) -> None:
    set_tcp_nodelay(sock)


#: The ``on_socket_open`` callback :func:`make_client` installs.
NODELAY_SOCKET_OPEN = _on_socket_open


def make_client(client_id: str, *, will: tuple[str, bytes | str, bool] | None = None) -> paho.Client:
    """A paho MQTT v5 client with the v2 callback API and TCP_NODELAY on every socket it opens.

    ``will`` is ``(topic, payload, retain)``, published by the broker at QoS 1 if the client
    disappears without a DISCONNECT (the agent's retained "offline" status).
    """
    if not isinstance(client_id, str) or not client_id:
        raise ValueError(f"client_id = {client_id!r}, expected a non-empty str")
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5,
    )
    client.on_socket_open = NODELAY_SOCKET_OPEN
    if will is not None:
        try:
            topic, payload, retain = will
        except (TypeError, ValueError):
            raise ValueError(f"will = {will!r}, expected (topic, payload, retain)") from None
        client.will_set(topic, payload, qos=1, retain=bool(retain))
    return client


def session_args(session_expiry_s: int) -> dict[str, Any]:
    """paho ``connect``/``connect_async`` keyword arguments for a session that lasts
    ``session_expiry_s`` after the connection drops (0: a clean session; see :func:`connect`)."""
    if not isinstance(session_expiry_s, int) or session_expiry_s < 0:
        raise ValueError(f"session_expiry_s = {session_expiry_s!r}, expected an int >= 0")
    if not session_expiry_s:
        return {}
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = session_expiry_s
    return {"clean_start": False, "properties": properties}


def connect(client: paho.Client, host: str, port: int, timeout: float = 5.0, keepalive: int = 60, *,
            session_expiry_s: int = 0) -> bool:
    """Connect, start the network loop and wait for the broker's CONNACK; returns the CONNACK's
    ``session_present`` flag.

    ``keepalive`` (seconds) is the MQTT keep-alive: the broker takes the client for gone, and
    publishes its last will, after about 1.5 times this without a packet from it.

    ``session_expiry_s`` > 0 asks for a persistent session: clean start off on every connect (the
    first one included, so a restarted process picks up the session its predecessor left) and the
    broker keeps the subscriptions and the QoS 1 messages for them that long after the connection
    drops; they are delivered on the next connect with the same client id. 0: a clean session that
    ends with the connection (paho's default).

    Raises ``ConnectionError`` naming ``host:port`` when the broker cannot be reached, refuses the
    connection, or does not answer within ``timeout`` seconds; the network loop is stopped then.
    Later disconnects are paho's to handle (it reconnects from its loop).
    """
    where = f"MQTT broker {host}:{port}"
    connack = threading.Event()
    outcome: dict[str, Any] = {}
    user_on_connect = client.on_connect

    def on_connect(client_: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        outcome["reason_code"], outcome["flags"] = reason_code, flags
        connack.set()
        if user_on_connect is not None:
            user_on_connect(client_, userdata, flags, reason_code, properties)

    client.on_connect = on_connect
    client.connect_timeout = timeout
    session = session_args(session_expiry_s)
    try:
        try:
            client.connect(host, port, keepalive=keepalive, **session)
        except (OSError, ValueError) as exc:
            raise ConnectionError(f"{where} is not reachable: {exc}") from exc
        client.loop_start()
        if not connack.wait(timeout):
            client.loop_stop()
            client.disconnect()
            raise ConnectionError(f"{where} did not answer CONNECT within {timeout:g} s")
        reason_code = outcome["reason_code"]
        if reason_code.is_failure:
            client.loop_stop()
            raise ConnectionError(f"{where} refused the connection: {reason_code}")
        return bool(outcome["flags"].session_present)
    finally:
        client.on_connect = user_on_connect
