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

Transport security (:class:`MqttSecurity`, README "Securing the broker"): TLS with a CA file (or the
system's CAs), an optional client certificate (the broker then knows the client by the
certificate's CN), and an optional username with a password read from a file only its owner may
read. Every client here (agent, application, ``edge-agent ctl``, the self-test) takes the same object,
so one set of settings reaches the broker one way.

Callbacks run on paho's network thread: they must never block there (hand work to a queue).
"""

from __future__ import annotations

import os
import socket
import ssl
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

__all__ = ["make_client", "connect", "session_args", "NODELAY_SOCKET_OPEN", "set_tcp_nodelay", "MqttSecurity",
           "read_password_file", "SecurityError"]


def set_tcp_nodelay(sock: Any) -> None:
    """Turn Nagle's algorithm off on a TCP socket (an SSL socket passes it to the TCP one)."""
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _on_socket_open(client: paho.Client, userdata: Any, sock: Any) -> None:
    set_tcp_nodelay(sock)


#: The ``on_socket_open`` callback :func:`make_client` installs.
NODELAY_SOCKET_OPEN = _on_socket_open


class SecurityError(ValueError):
    """A TLS or credential setting that cannot be used: names the setting, the value and why."""

    def __init__(self, setting: str, value: Any, expected: str) -> None:
        super().__init__(f"{setting} = {value!r}: {expected}")
        self.setting = setting
        self.value = value
        self.expected = expected


def read_password_file(path: str, setting: str = "password_file") -> str:
    """The password in ``path`` (its first line, without the line end), refused unless the file
    is a regular file that neither its group nor others may read or write (``chmod 600``, or
    systemd's ``LoadCredential=``, which gives 0400): a password other users can read is no secret.
    """
    try:
        info = os.stat(path)
    except OSError as exc:
        raise SecurityError(setting, path, f"a readable file holding the password ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise SecurityError(setting, path, "a regular file holding the password")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise SecurityError(setting, path, f"a file only its owner may read (it is mode {mode:04o}: chmod 600 it)")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SecurityError(setting, path, f"a readable UTF-8 file holding the password ({exc})") from None
    password = text.splitlines()[0] if text else ""
    if not password:
        raise SecurityError(setting, path, "a file whose first line is the password (it is empty)")
    return password


@dataclass(frozen=True)
class MqttSecurity:
    """How a client proves itself to the broker and checks the broker: TLS and credentials.

    ``tls``: wrap the connection in TLS, the broker's certificate checked against ``ca_file`` (PEM;
    ``None``: the system's CAs) and its host name or address. ``cert_file`` + ``key_file``: the
    client's certificate and key (PEM); with ``use_identity_as_username true`` the broker takes its CN
    as the client's username for its ACL. ``insecure``: accept a broker certificate whose name does
    not match the host (the chain is still checked): for a lab, never a default. ``username`` with
    ``password_file`` (see :func:`read_password_file`): the broker's password check. All off by
    default: plain TCP, anonymous.
    """

    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False
    username: str | None = None
    password_file: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise SecurityError("tls_cert" if self.cert_file is None else "tls_key",
                                self.cert_file if self.cert_file is not None else self.key_file,
                                "tls_cert and tls_key together (a client certificate needs its key)")
        if not self.tls and (self.ca_file or self.cert_file or self.insecure):
            raise SecurityError("tls", False, "true when tls_ca, tls_cert or tls_insecure is set")
        if self.password_file is not None and not self.username:
            raise SecurityError("password_file", self.password_file, "a username to go with it")

    @property
    def enabled(self) -> bool:
        """Anything other than plain, anonymous TCP."""
        return self.tls or self.username is not None

    def ssl_context(self) -> ssl.SSLContext:
        """The client's TLS context: the CA, the client certificate, hostname checks unless
        ``insecure``. Raises :class:`SecurityError` naming the file that could not be used."""
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise SecurityError("tls_ca", self.ca_file, f"a readable PEM file of CA certificates ({exc})") from None
        if self.cert_file is not None:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as exc:
                raise SecurityError("tls_cert", f"{self.cert_file} + {self.key_file}",
                                    f"a readable PEM certificate and its matching, unencrypted key ({exc})") from None
        if self.insecure:
            context.check_hostname = False   # the chain is still verified (CERT_REQUIRED)
        return context

    def check(self) -> None:
        """Load what the settings name (certificates, key, password), so a bad file is an error
        at start, naming it, rather than a refused connection later."""
        if self.tls:
            self.ssl_context()
        if self.password_file is not None:
            read_password_file(self.password_file)

    def apply(self, client: paho.Client) -> None:
        """Set TLS and credentials on a paho client, before its first connect."""
        if self.tls:
            client.tls_set_context(self.ssl_context())
            if self.insecure:
                client.tls_insecure_set(True)
        if self.username is not None:
            password = read_password_file(self.password_file) if self.password_file is not None else None
            client.username_pw_set(self.username, password)

    def describe(self) -> str:
        """A one-line summary for logs (never the password)."""
        parts = ["tls" if self.tls else "plain tcp"]
        if self.cert_file:
            parts.append(f"client cert {self.cert_file}")
        if self.insecure:
            parts.append("hostname NOT checked")
        if self.username:
            parts.append(f"user {self.username}")
        return ", ".join(parts)


#: Plain TCP, anonymous: what a client gets without settings.
PLAIN = MqttSecurity()


def make_client(client_id: str, *, will: tuple[str, bytes | str, bool] | None = None,
                security: MqttSecurity | None = None) -> paho.Client:
    """A paho MQTT v5 client with the v2 callback API and TCP_NODELAY on every socket it opens.

    ``will`` is ``(topic, payload, retain)``, published by the broker at QoS 1 if the client
    disappears without a DISCONNECT (the agent's retained "offline" status). ``security``: TLS and
    credentials (:class:`MqttSecurity`); none: plain TCP, anonymous.
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
    if security is not None:
        security.apply(client)
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
    user_on_connect, user_on_disconnect = client.on_connect, client.on_disconnect

    def on_connect(client_: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        outcome["reason_code"], outcome["flags"] = reason_code, flags
        connack.set()
        if user_on_connect is not None:
            user_on_connect(client_, userdata, flags, reason_code, properties)

    def on_disconnect(client_: paho.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        # Closed before any CONNACK: with TLS 1.3 the broker checks a client certificate after the
        # client's side of the handshake is done, so a refused certificate shows up here, not in connect().
        if not connack.is_set():
            outcome["closed"] = reason_code
            connack.set()
        if user_on_disconnect is not None:
            user_on_disconnect(client_, userdata, flags, reason_code, properties)

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.connect_timeout = timeout
    session = session_args(session_expiry_s)
    tls = getattr(client, "_ssl", False)
    try:
        try:
            client.connect(host, port, keepalive=keepalive, **session)
        except (OSError, ValueError) as exc:
            hint = " (TLS: is the broker's certificate signed by tls_ca, for this host name?)" if isinstance(
                exc, ssl.SSLError) else ""
            raise ConnectionError(f"{where} is not reachable: {exc}{hint}") from exc
        client.loop_start()
        if not connack.wait(timeout):
            client.loop_stop()
            client.disconnect()
            raise ConnectionError(f"{where} did not answer CONNECT within {timeout:g} s")
        if "closed" in outcome and "reason_code" not in outcome:
            client.disconnect()
            client.loop_stop()
            hint = (": it refused this client's certificate (none given, expired, or not signed by the CA it "
                    "trusts), or it does not speak TLS on this port") if tls else (
                    ": does it expect TLS on this port?")
            raise ConnectionError(f"{where} closed the connection before acknowledging CONNECT "
                                  f"({outcome['closed']}){hint}")
        reason_code = outcome["reason_code"]
        if reason_code.is_failure:
            client.loop_stop()
            raise ConnectionError(f"{where} refused the connection: {reason_code}")
        return bool(outcome["flags"].session_present)
    finally:
        client.on_connect = user_on_connect
        client.on_disconnect = user_on_disconnect
