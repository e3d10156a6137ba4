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

:class:`DirectClient` (the agent's own connection, ``make_client(..., direct=True)``) changes how
bytes reach the socket, not what is sent: see its docstring.
"""

from __future__ import annotations

import os
import socket
import ssl
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt import __version__ as paho_version
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MalformedPacket, Properties, readBytes, writeBytes, writeUTF

__all__ = ["make_client", "connect", "session_args", "NODELAY_SOCKET_OPEN", "set_tcp_nodelay", "MqttSecurity",
           "read_password_file", "SecurityError", "DirectClient", "PublishProperties"]


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
                security: MqttSecurity | None = None, direct: bool | type["DirectClient"] = False) -> paho.Client:
    """A paho MQTT v5 client with the v2 callback API and TCP_NODELAY on every socket it opens.

    ``will`` is ``(topic, payload, retain)``, published by the broker at QoS 1 if the client
    disappears without a DISCONNECT (the agent's retained "offline" status). ``security``: TLS and
    credentials (:class:`MqttSecurity`); none: plain TCP, anonymous. ``direct``: a
    :class:`DirectClient`, or the subclass given (on plain TCP; raises ``RuntimeError`` on a paho whose internals it does
    not know, see :func:`paho_internals_problem`).
    """
    if not isinstance(client_id, str) or not client_id:
        raise ValueError(f"client_id = {client_id!r}, expected a non-empty str")
    # TLS: one SSL object must not be read by one thread while another writes to it (OpenSSL), so
    # a TLS connection keeps paho's own single network thread for both.
    tls = security is not None and security.tls
    client_class: type[paho.Client] = paho.Client
    if direct and not tls:
        DirectClient.check()        # a paho whose internals it does not know: a clear error at start
        client_class = direct if isinstance(direct, type) else DirectClient
    client = client_class(
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


# --- the agent's own connection: joined writes and chunked reads --------------------------------------

#: Bytes asked of the socket per read: the requests and acknowledgements waiting, in one system call.
#: Under glibc's mmap threshold (128 KiB): a larger buffer is mapped, shrunk and unmapped on every
#: read, three more system calls each time.
READ_CHUNK = 64 * 1024
#: At most this many bytes of queued packets are joined into one send.
WRITE_CHUNK = 256 * 1024
#: Topics whose matching message callbacks a client remembers (DirectClient._handle_on_message).
MATCHES_KEPT = 256

_SUCCESS = MQTTErrorCode.MQTT_ERR_SUCCESS
_AGAIN = MQTTErrorCode.MQTT_ERR_AGAIN
_CONN_LOST = MQTTErrorCode.MQTT_ERR_CONN_LOST
_PUBLISH, _PUBACK = int(paho.PUBLISH), int(paho.PUBACK)
#: The paho-mqtt releases whose internals DirectClient was read against (pyproject pins it).
PAHO_VERSIONS = ("2.2.0",)
#: paho internals DirectClient overrides or calls (methods of ``paho.Client``) ...
_PAHO_METHODS = ("_handle_publish", "_handle_on_message", "message_callback_add", "message_callback_remove",
                 "_easy_log", "_send_puback", "_sock_recv", "_sock_send", "_sock_close",
                 "_packet_queue", "_packet_write", "loop_read", "loop_write", "reconnect", "_update_inflight",
                 "_handle_pubackcomp", "_do_on_publish", "_packet_read", "_packet_handle")
#: ... and the attributes it reads or changes on a client.
_PAHO_ATTRIBUTES = ("_out_packet", "_in_packet", "_out_messages", "_inflight_messages", "_out_message_mutex",
                    "_msgtime_mutex", "_last_msg_out", "_last_bytes_received", "_sock", "_manual_ack",
                    "_protocol", "_callback_mutex", "_in_callback_mutex", "_on_message_filtered", "_userdata",
                    "suppress_exceptions")


def paho_internals_problem(client_class: type = paho.Client, version: str | None = None) -> str | None:
    """Why :class:`DirectClient` cannot run on ``client_class`` of paho ``version`` (default: the
    installed paho), or ``None``: a release it was not read against, or an internal it needs that
    is missing. The agent's transport checks this at start and refuses to run on a paho it does not
    know, rather than misbehave on the wire."""
    version = paho_version if version is None else version
    if version not in PAHO_VERSIONS:
        return (f"paho-mqtt {version} is installed; the agent's MQTT client (DirectClient) relies on the internals "
                f"of paho-mqtt {' or '.join(PAHO_VERSIONS)}: install paho-mqtt=={PAHO_VERSIONS[-1]} (pyproject pins it)")
    missing = [name for name in _PAHO_METHODS if not callable(getattr(client_class, name, None))]
    try:
        probe = client_class(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    except Exception as exc:      # noqa: BLE001 (named in the message)
        return f"paho-mqtt {version}: a client could not be made to check its internals ({type(exc).__name__}: {exc})"
    missing += [name for name in _PAHO_ATTRIBUTES if not hasattr(probe, name)]
    if not missing:
        if not hasattr(probe._out_packet, "extendleft") or not isinstance(probe._in_packet, dict):
            missing.append("_out_packet as a deque, _in_packet as a dict")
    if missing:
        return (f"paho-mqtt {version} lacks internals the agent's MQTT client (DirectClient) relies on: "
                f"{', '.join(missing)}; install paho-mqtt=={PAHO_VERSIONS[-1]}")
    return None


def _plain(command: int, qos: int) -> bool:
    """A packet that needs nothing once written: a PUBLISH at QoS 1 or 2 (paho settles it on its
    acknowledgement) or a PUBACK. Every other packet (CONNECT, SUBSCRIBE, PINGREQ, DISCONNECT, a
    QoS 0 PUBLISH with its callback) is left to paho's own writer on the network thread."""
    kind = command & 0xF0
    return (kind == _PUBLISH and qos > 0) or kind == _PUBACK


def read_utf(buffer: bytes, maxlen: int) -> tuple[str, int]:
    """paho's ``readUTF`` (the same checks and errors) without its loop over every character: a
    strict UTF-8 decode already refuses the surrogates D800-DFFF, and the two code points MQTT
    forbids besides are looked for with ``in``. A response topic is read per request."""
    if maxlen < 2:
        raise MalformedPacket("Not enough data to read string length")
    length = (buffer[0] << 8) | buffer[1]
    if length > maxlen - 2:
        raise MalformedPacket("Length delimited string too long")
    text = bytes(buffer[2:2 + length]).decode("utf-8")
    if "\x00" in text:
        raise MalformedPacket("[MQTT-1.5.4-2] Null found in UTF-8 data")
    if "\ufeff" in text:
        raise MalformedPacket("[MQTT-1.5.4-3] U+FEFF in UTF-8 data")
    return text, length + 2


#: The properties :class:`PublishProperties` reads and writes itself: (identifier, attribute, reader).
_FAST_PROPERTIES = {8: ("ResponseTopic", read_utf), 9: ("CorrelationData", readBytes)}
_FAST_NAMES = frozenset(("packetType", "types", "names", "properties", "ResponseTopic", "CorrelationData"))


class PublishProperties(Properties):
    """paho's ``Properties`` of a PUBLISH, cheap to make, set and pack when they are a response
    topic and correlation data (every request and reply of the wire).

    paho builds its tables of property names and types anew for every ``Properties`` (some 15 µs),
    validates a name by rewriting each of its ~40 names, and packs by trying each one: about 45 µs a
    reply, on the thread that publishes it. Here the tables are paho's, built once and shared (paho
    only reads them), and a response topic or correlation data is set and packed directly, to the
    same bytes; anything else goes through paho's own code."""

    _shared: Properties | None = None

    def __init__(self, packetType: int = PacketTypes.PUBLISH) -> None:
        tables = PublishProperties._shared
        if tables is None:
            tables = PublishProperties._shared = Properties(PacketTypes.PUBLISH)
        set_ = object.__setattr__
        set_(self, "packetType", packetType)
        set_(self, "types", tables.types)
        set_(self, "names", tables.names)
        set_(self, "properties", tables.properties)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("ResponseTopic", "CorrelationData") and self.packetType == PacketTypes.PUBLISH:
            object.__setattr__(self, name, value)      # single, PUBLISH's own, no range to check
        else:
            super().__setattr__(name, value)

    def pack(self) -> bytes:
        fields = self.__dict__
        if not fields.keys() <= _FAST_NAMES:
            return super().pack()
        buffer = b""                                    # paho's order: 8 before 9
        if "ResponseTopic" in fields:
            buffer += b"\x08" + writeUTF(fields["ResponseTopic"])
        if "CorrelationData" in fields:
            buffer += b"\x09" + writeBytes(fields["CorrelationData"])
        return _vbi(len(buffer)) + buffer


def reply_address(message: paho.MQTTMessage) -> tuple[str | None, bytes | None]:
    """A message's MQTT v5 response topic and correlation data (each None where absent): where and
    under what its answer goes. Unchecked: the caller checks the topic (``publish_topic_problem``)."""
    props = message.properties
    if props is None:
        return None, None
    return getattr(props, "ResponseTopic", None), getattr(props, "CorrelationData", None)


def _vbi(value: int) -> bytes:
    """MQTT's variable byte integer."""
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _whole_packet(buf: bytes, pos: int) -> tuple[int, int] | None:
    """Where the body of the packet that starts at ``buf[pos]`` lies, ``(start, end)``, if all of it
    is in ``buf``; ``None`` if not, or if its length is malformed (paho's reader then says so)."""
    length, shift, at, size = 0, 0, pos + 1, len(buf)
    while at < size:
        byte = buf[at]
        at += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (at, at + length) if at + length <= size else None
        shift += 7
        if shift > 21:
            return None
    return None


def _read_publish_properties(block: bytes) -> Properties:
    """The properties of a PUBLISH from ``block`` (their bytes, after the length): a response topic
    and correlation data read here, any other property by paho's own ``unpack``."""
    properties = PublishProperties()
    pos, end = 0, len(block)
    while pos < end:
        ident = block[pos]
        known = _FAST_PROPERTIES.get(ident)
        if known is None or known[0] in properties.__dict__:
            properties = Properties(PacketTypes.PUBLISH)     # paho checks and names everything else
            properties.unpack(_vbi(end) + block)
            return properties
        name, read = known
        value, used = read(block[pos + 1:], end - pos - 1)
        object.__setattr__(properties, name, value)
        pos += 1 + used
    return properties


class DirectClient(paho.Client):
    """A paho client that reads in chunks, decodes a request directly, and joins its writes.

    Why (issue 21, BENCHMARKS.md "MQTT intake vs HTTP"): threaded paho reads every packet in three
    ``recv`` calls (type, length, rest), copies a message's bytes four times or more, and writes
    each packet with its own ``send``; under load every system call was a hand-over of the GIL to a
    busy worker and back. Here:

    * reads ask the socket for :data:`READ_CHUNK` bytes, and a packet that lies whole in that
      buffer is taken in one step (``_packet_read``);
    * an incoming QoS 0 or 1 PUBLISH is decoded with one copy of its payload (paho reads its
      properties with a per-message table), its properties as :class:`PublishProperties`;
    * what the network thread queues while it reads (the PUBACKs of the requests its handlers took,
      the replies it publishes) is written once the read is done, and every QoS 1 PUBLISH or PUBACK
      waiting is joined into one ``send`` (up to :data:`WRITE_CHUNK` bytes);
    * a worker's reply is queued and the network thread woken, as paho does: the worker never
      sends. Writing it from the worker (the eleventh to eighteenth sessions) cost the workers a
      ``send`` each, a loopback send doing the receiver's work too, and a wait for one another's
      writes; the workers are the board's capacity, and at the plain loop's capacity the MQTT
      row served a fifth less that way (BENCHMARKS.md, nineteenth session);
    * a PUBACK of a reply with no reason code and no properties (what Mosquitto sends) is settled
      without building paho's ReasonCode and Properties, and paho's scan of every unacknowledged
      message for one waiting for a window slot is skipped when none waits.

    What is sent is unchanged: the same packets in the same order (the queue is only ever taken
    from its head, under the write lock), QoS 1 messages kept until acknowledged and re-sent after
    a reconnect by paho itself. The write lock is also held while paho closes or replaces the socket,
    so no thread writes on a socket being swapped.
    """

    _checked: str | None = None

    @classmethod
    def check(cls) -> None:
        """Raise ``RuntimeError`` saying what is wrong when the installed paho lacks the internals
        this class relies on (see :func:`paho_internals_problem`); checked once per process."""
        if cls._checked is None:
            cls._checked = paho_internals_problem() or ""
        if cls._checked:
            raise RuntimeError(cls._checked)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._write_lock = threading.RLock()
        self._reader: int | None = None      # the network thread's id while it reads
        self._rsock: Any = None              # the socket _rbuf was read from
        self._rbuf = b""
        self._rpos = 0
        self._matches: dict[str, tuple] = {}  # topic -> its message callbacks (_handle_on_message)
        super().__init__(*args, **kwargs)

    # --- writes -----------------------------------------------------------------------------------

    def _packet_queue(self, command: int, packet: bytes | bytearray, mid: int, qos: int,
                      info: paho.MQTTMessageInfo | None = None) -> MQTTErrorCode:
        # Another thread's packet: paho's (queued, the network thread woken by a byte on its
        # socket pair). The network thread's own while it reads: queued without the wake-up, and
        # written with the others once the read is done (loop_read).
        if threading.get_ident() != self._reader or not _plain(command, qos):
            return super()._packet_queue(command, packet, mid, qos, info)
        self._out_packet.append({"command": command, "mid": mid, "qos": qos, "pos": 0,
                                 "to_process": len(packet), "packet": packet, "info": info})
        return _SUCCESS

    def _flush(self) -> MQTTErrorCode:
        """Write the plain packets at the head of the queue, several joined per ``send``; called with
        the write lock held. Stops at a packet paho writes itself, or when the socket is full."""
        out = self._out_packet
        while out:
            taken: list[dict] = []
            size = 0
            while out and size < WRITE_CHUNK:
                head = out[0]
                if not _plain(head["command"], head["qos"]):
                    break
                taken.append(out.popleft())
                size += head["to_process"]
            if not taken:
                return _SUCCESS
            if len(taken) == 1:
                data: Any = memoryview(taken[0]["packet"])[taken[0]["pos"]:]
            else:
                data = b"".join(memoryview(p["packet"])[p["pos"]:] for p in taken)
            try:
                sent = self._sock_send(data)
            except BlockingIOError:
                out.extendleft(reversed(taken))
                return _AGAIN
            except (AttributeError, ValueError, OSError):
                out.extendleft(reversed(taken))
                return _CONN_LOST
            for k, packet in enumerate(taken):
                left = packet["to_process"]
                if sent >= left:
                    sent -= left
                    packet["pos"] += left
                    packet["to_process"] = 0
                else:
                    packet["pos"] += sent
                    packet["to_process"] = left - sent
                    out.extendleft(reversed(taken[k:]))
                    with self._msgtime_mutex:
                        self._last_msg_out = paho.time_func()
                    return _AGAIN
            with self._msgtime_mutex:
                self._last_msg_out = paho.time_func()
        return _SUCCESS

    def _packet_write(self) -> MQTTErrorCode:
        # The network thread's writer (loop_write): the plain packets joined, then paho's own for the rest.
        with self._write_lock:
            rc = self._flush()
            if rc == _CONN_LOST:
                return rc
            if rc == _AGAIN:
                return _AGAIN
            if not self._out_packet:
                return _SUCCESS
            return super()._packet_write()

    def _sock_close(self) -> None:
        with self._write_lock:
            super()._sock_close()

    def reconnect(self) -> MQTTErrorCode:
        with self._write_lock:
            return super().reconnect()

    # --- reads ------------------------------------------------------------------------------------

    def _fill(self, size: int) -> None:
        """Have the read buffer hold this socket's unread bytes: when it is empty, one read of up to
        ``size`` bytes (``b""`` where the peer closed), raising as paho's own read raises."""
        if self._rsock is not self._sock:        # a new socket: what was read from the old one is gone
            self._rsock, self._rbuf, self._rpos = self._sock, b"", 0
        if self._rpos >= len(self._rbuf):
            self._rbuf, self._rpos = super()._sock_recv(size), 0

    def _sock_recv(self, bufsize: int) -> bytes:
        # paho's reader (a packet split across reads): its bytes out of the buffer, a chunk read when
        # it is empty (a whole chunk asked for comes back uncopied: slicing all of a bytes is itself)
        self._fill(max(bufsize, READ_CHUNK))
        buf, pos = self._rbuf, self._rpos
        self._rpos = pos + bufsize
        return buf[pos:pos + bufsize]

    def _packet_read(self) -> MQTTErrorCode:
        """paho's, with a packet that lies whole in the read buffer taken in one step (paho asks for
        its type, then its length a byte at a time, then the rest: a call each, for every request
        and acknowledgement). A packet split across reads, or one paho's reader began, is paho's."""
        if self._in_packet["command"] == 0:
            try:
                self._fill(READ_CHUNK)
            except BlockingIOError:
                return _AGAIN
            except OSError as err:
                self._easy_log(paho.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
                return _CONN_LOST
            buf, pos = self._rbuf, self._rpos
            if pos >= len(buf):                    # b"": the peer closed
                return _CONN_LOST
            body = _whole_packet(buf, pos)
            if body is not None:
                start, end = body
                self._rpos = end
                packet = self._in_packet
                packet["command"] = buf[pos]
                packet["packet"] = bytearray(memoryview(buf)[start:end])
                packet["remaining_length"] = end - start
                packet["have_remaining"] = 1
                try:
                    rc = self._packet_handle()
                except MalformedPacket as exc:
                    self._easy_log(paho.MQTT_LOG_DEBUG, "Received malformed packet: %s", exc)
                    rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
                self._in_packet = {"command": 0, "have_remaining": 0, "remaining_count": [], "remaining_mult": 1,
                                   "remaining_length": 0, "packet": bytearray(b""), "to_process": 0, "pos": 0}
                with self._msgtime_mutex:
                    self._last_bytes_received = paho.time_func()
                return rc
        return super()._packet_read()

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        self._reader = threading.get_ident()
        try:
            rc = super().loop_read(max_packets)
            # Packets already in the buffer: select() would not say so, so parse them now.
            while rc == _SUCCESS and self._sock is not None and self._rsock is self._sock \
                    and self._rpos < len(self._rbuf):
                rc = super().loop_read(max_packets)
        finally:
            self._reader = None
        if rc == _SUCCESS and self._sock is not None and self._out_packet:
            rc = self.loop_write()
        return rc

    # --- acknowledgements of what this client published ---------------------------------------------

    _PUBACK_OK = ReasonCode(PacketTypes.PUBACK)
    _NO_PROPERTIES = Properties(PacketTypes.PUBACK)

    def _handle_pubackcomp(self, cmd: str) -> MQTTErrorCode:
        packet = self._in_packet["packet"]
        if cmd == "PUBACK" and len(packet) == 2 and self.on_publish is None:
            mid = struct.unpack("!H", packet)[0]       # success, no properties: nothing else to decode
            with self._out_message_mutex:
                if mid in self._out_messages:
                    return self._do_on_publish(mid, self._PUBACK_OK, self._NO_PROPERTIES)
            return _SUCCESS
        return super()._handle_pubackcomp(cmd)

    def _update_inflight(self) -> MQTTErrorCode:
        # paho walks every unacknowledged message for ones waiting for a window slot, on every
        # acknowledgement; when every stored message is in flight there is none.
        if len(self._out_messages) <= self._inflight_messages:
            return _SUCCESS
        return super()._update_inflight()

    # --- incoming messages -----------------------------------------------------------------------------

    def _handle_publish(self) -> MQTTErrorCode:
        header = self._in_packet["command"]
        qos = (header & 0x06) >> 1
        if self._protocol != paho.MQTTv5 or qos == 2:
            return super()._handle_publish()
        try:
            message = self._decode_publish(header, self._in_packet["packet"], qos)
        except Exception:         # malformed: paho's decoder says what, and how it is handled
            return super()._handle_publish()
        message.timestamp = paho.time_func()
        self._handle_on_message(message)
        if qos == 0 or self._manual_ack:
            return _SUCCESS
        return self._send_puback(message.mid)

    def message_callback_add(self, sub: str, callback: Any) -> None:
        with self._callback_mutex:
            super().message_callback_add(sub, callback)
            self._matches.clear()

    def message_callback_remove(self, sub: str) -> None:
        with self._callback_mutex:
            super().message_callback_remove(sub)
            self._matches.clear()

    def _handle_on_message(self, message: paho.MQTTMessage) -> None:
        """paho's, with the callbacks matching a topic remembered (paho walks its topic tree for
        every message; a board's requests come on a handful of topics): at most
        :data:`MATCHES_KEPT` topics, forgotten whenever a callback is added or removed."""
        try:
            topic = message.topic
        except UnicodeDecodeError:
            super()._handle_on_message(message)
            return
        with self._callback_mutex:
            callbacks = self._matches.get(topic)
            if callbacks is None:
                callbacks = tuple(self._on_message_filtered.iter_match(topic))
                if len(self._matches) < MATCHES_KEPT:
                    self._matches[topic] = callbacks
            if not callbacks and self.on_message is not None:
                callbacks = (self.on_message,)         # no topic's callback: the default one, as paho
        for callback in callbacks:
            with self._in_callback_mutex:
                try:
                    callback(self, self._userdata, message)
                except Exception as err:
                    self._easy_log(paho.MQTT_LOG_ERR, "Caught exception in user defined callback function %s: %s",
                                   getattr(callback, "__name__", callback), err)
                    if not self.suppress_exceptions:
                        raise

    @staticmethod
    def _decode_publish(header: int, packet: bytearray, qos: int) -> paho.MQTTMessage:
        with memoryview(packet) as view:
            pos = 2 + ((packet[0] << 8) | packet[1])
            topic = bytes(view[2:pos])
            mid = 0
            if qos:
                mid = (packet[pos] << 8) | packet[pos + 1]
                pos += 2
            length, shift = 0, 0
            while True:                                  # the properties' length (variable byte integer)
                byte = packet[pos]
                pos += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
                if shift > 21:
                    raise ValueError("properties length over 4 bytes")
            end = pos + length
            if end > len(packet) or mid == 0 and qos:
                raise ValueError("properties past the packet, or no packet id")
            properties = _read_publish_properties(bytes(view[pos:end]))
            message = paho.MQTTMessage(mid=mid, topic=topic)
            message.payload = bytes(view[end:])
        message.dup = bool(header & 0x08)
        message.qos = qos
        message.retain = bool(header & 0x01)
        message.properties = properties
        return message
