"""The load generator's MQTT v5 client: a plain socket, every request's PUBLISH built before the run.

Why not paho (issue 21): the generator shares the board's two cores with the agent and the broker,
and what it burns the agent does not get. With paho the MQTT generator's two processes used half
as much CPU again as the HTTP generator's one (a hand-written client on a plain socket,
:mod:`edge_lab.bench.loadgen`) for the same replay; with this client about the same (BENCHMARKS.md,
fifteenth session). This client
speaks just what a replay needs, as the HTTP generator does for HTTP: CONNECT (clean start, no
keep-alive), one SUBSCRIBE for the reply topic, PUBLISH at QoS 0 or 1 from bytes made before the
run (only the bytes go out at the send time), PUBACK for each reply (joined per read), DISCONNECT.

Replies are stamped as :class:`edge_lab.bench.mqttload` documents: the kernel's receive time of
the read that completed each one (``SO_TIMESTAMPNS``), and when this process read it.
"""
from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Callable

from agent.transport.paho_client import set_tcp_nodelay

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)   # Linux; Python does not name it
STAMP_SPACE = socket.CMSG_SPACE(16)                      # recvmsg's ancillary room for the stamp


def receive_stamp(ancillary, read: float, clock: Callable[[], float] = time.monotonic) -> float:
    """When a read's data reached the socket, on ``clock`` (``read``: when it was read, on the same
    clock; also the answer where the kernel gave no stamp). The kernel stamps in wall-clock time
    (``SO_TIMESTAMPNS``, the last segment the read took), converted at once."""
    for level, kind, value in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
            seconds, nanoseconds = struct.unpack("qq", value[:16])
            return min(read, seconds + 1e-9 * nanoseconds - (time.time() - clock()))
    return read
READ_CHUNK = 256 * 1024

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, DISCONNECT = 1, 2, 3, 4, 8, 9, 14
#: PUBLISH properties (MQTT v5, 2.2.2.2) a reply may carry: identifier -> its value's encoding.
_FIXED = {0x01: 1, 0x02: 4, 0x23: 2}                    # payload format, message expiry, topic alias
_STR16 = {0x03, 0x08, 0x09}                              # content type, response topic, correlation data
CORRELATION_DATA, RESPONSE_TOPIC, USER_PROPERTY, SUBSCRIPTION_ID = 0x09, 0x08, 0x26, 0x0B


class MqttWireError(ConnectionError):
    """The broker refused, closed, or sent what this client cannot read."""


def vbi(value: int) -> bytes:
    """MQTT's variable byte integer."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _str16(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def packet(kind: int, flags: int, body: bytes) -> bytes:
    """One control packet: fixed header (type, flags, remaining length) and ``body``."""
    return bytes([(kind << 4) | flags]) + vbi(len(body)) + body


def publish_packet(topic: str, payload: bytes, *, qos: int, packet_id: int, response_topic: str,
                   correlation: bytes) -> bytes:
    """A PUBLISH with a response topic and correlation data (how an application asks the agent)."""
    props = bytes([RESPONSE_TOPIC]) + _str16(response_topic.encode()) + bytes([CORRELATION_DATA]) + _str16(correlation)
    head = _str16(topic.encode()) + (struct.pack("!H", packet_id) if qos else b"")
    return packet(PUBLISH, qos << 1, head + vbi(len(props)) + props + payload)


def _read_vbi(data, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            raise MqttWireError("variable byte integer over 4 bytes")


def correlation_of(props: memoryview) -> bytes | None:
    """The correlation data among a PUBLISH's properties (None if absent)."""
    pos, end, found = 0, len(props), None
    while pos < end:
        ident, pos = _read_vbi(props, pos)
        if ident in _STR16:
            size = (props[pos] << 8) | props[pos + 1]
            if ident == CORRELATION_DATA:
                found = bytes(props[pos + 2:pos + 2 + size])
            pos += 2 + size
        elif ident in _FIXED:
            pos += _FIXED[ident]
        elif ident == USER_PROPERTY:
            for _ in range(2):
                pos += 2 + ((props[pos] << 8) | props[pos + 1])
        elif ident == SUBSCRIPTION_ID:
            _, pos = _read_vbi(props, pos)
        else:
            raise MqttWireError(f"PUBLISH property 0x{ident:02x} not expected on a reply")
    return found


#: ``on_message(correlation, payload, stamp, read_at)``: a PUBLISH that came, with the monotonic
#: time its read's data reached the socket and when it was read.
OnMessage = Callable[[bytes | None, bytes, float, float], None]


class WireClient:
    """One MQTT v5 connection of a load generator: :meth:`connect`, :meth:`subscribe`, then
    :meth:`send` prebuilt PUBLISH packets from one thread while a reader thread hands each
    incoming PUBLISH to ``on_message`` (and acknowledges it), until :meth:`close`."""

    def __init__(self, host: str, port: int, client_id: str, on_message: OnMessage, *, timeout_s: float = 10.0) -> None:
        self.client_id = client_id
        self.on_message = on_message
        self._lock = threading.Lock()                 # one writer at a time: the sender or the reader's PUBACKs
        try:
            self._sock = socket.create_connection((host, port), timeout=timeout_s)
        except OSError as exc:
            raise MqttWireError(f"{client_id}: MQTT broker {host}:{port} not reachable: {exc}") from exc
        set_tcp_nodelay(self._sock)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        except OSError:                               # not Linux: replies are stamped when read
            pass
        self._buf = bytearray()
        self._acks: list[bytes] = []
        self._closed = False
        self._reader: threading.Thread | None = None
        self._suback = threading.Event()
        self._suback_codes: bytes = b""
        self.error: BaseException | None = None

    # --- set-up, on the calling thread ----------------------------------------------------------

    def connect(self) -> None:
        """CONNECT with a clean start and no keep-alive (a replay is short; the broker's own timeout
        does not apply with 0), wait for CONNACK, then start the reader."""
        body = _str16(b"MQTT") + bytes([5, 0x02]) + struct.pack("!H", 0) + vbi(0) + _str16(self.client_id.encode())
        self._sock.sendall(packet(CONNECT, 0, body))
        kind, _, data = self._read_packet_blocking()
        if kind != CONNACK or len(data) < 2:
            raise MqttWireError(f"{self.client_id}: expected CONNACK, got packet type {kind}")
        if data[1] != 0:
            raise MqttWireError(f"{self.client_id}: the broker refused the connection (reason 0x{data[1]:02x})")
        self._sock.settimeout(None)
        self._reader = threading.Thread(target=self._read_loop, name=f"{self.client_id}-reader", daemon=True)
        self._reader.start()

    def _read_packet_blocking(self) -> tuple[int, int, bytes]:
        while True:
            parsed = self._parse_one()
            if parsed is not None:
                return parsed
            data = self._sock.recv(READ_CHUNK)
            if not data:
                raise MqttWireError(f"{self.client_id}: the broker closed the connection")
            self._buf += data

    def subscribe(self, topic_filter: str, qos: int, timeout_s: float = 10.0) -> None:
        """SUBSCRIBE and wait for the broker's SUBACK granting it."""
        body = struct.pack("!H", 1) + vbi(0) + _str16(topic_filter.encode()) + bytes([qos])
        self.write(packet(SUBSCRIBE, 0x02, body))
        if not self._suback.wait(timeout_s):
            raise MqttWireError(f"{self.client_id}: no SUBACK for {topic_filter} within {timeout_s} s")
        if not self._suback_codes or self._suback_codes[0] >= 0x80:
            raise MqttWireError(f"{self.client_id}: the broker refused the subscription to {topic_filter} "
                                f"(reason {self._suback_codes.hex() or 'none'})")

    # --- sending ---------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        with self._lock:
            self._sock.sendall(data)

    def close(self) -> None:
        """DISCONNECT (normal) and close; the reader ends with the socket."""
        if self._closed:
            return
        self._closed = True
        try:
            self.write(packet(DISCONNECT, 0, b""))
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._reader is not None:
            self._reader.join(5)
        self._sock.close()

    # --- the reader thread -----------------------------------------------------------------------

    def _read_loop(self) -> None:
        sock = self._sock
        try:
            while not self._closed:
                data, ancillary, _, _ = sock.recvmsg(READ_CHUNK, STAMP_SPACE)
                read = time.monotonic()
                if not data:
                    if not self._closed:
                        raise MqttWireError(f"{self.client_id}: the broker closed the connection")
                    return
                stamp = receive_stamp(ancillary, read)
                self._buf += data
                while True:
                    parsed = self._parse_one()
                    if parsed is None:
                        break
                    self._handle(*parsed, stamp, read)
                if self._acks:
                    acks, self._acks = b"".join(self._acks), []
                    self.write(acks)
        except BaseException as exc:           # kept for the caller: a replay that lost its broker says so
            if not self._closed:
                self.error = exc
        finally:
            self._suback.set()

    def _parse_one(self) -> tuple[int, int, bytes] | None:
        """The next whole packet in the buffer (type, flags, body), taken out of it; None if partial."""
        buf = self._buf
        if len(buf) < 2:
            return None
        try:
            length, start = _read_vbi(buf, 1)
        except IndexError:
            return None
        end = start + length
        if len(buf) < end:
            return None
        kind, flags, body = buf[0] >> 4, buf[0] & 0x0F, bytes(buf[start:end])
        del buf[:end]
        return kind, flags, body

    def _handle(self, kind: int, flags: int, body: bytes, stamp: float, read: float) -> None:
        if kind == PUBLISH:
            qos = (flags >> 1) & 0x03
            view = memoryview(body)
            pos = 2 + ((body[0] << 8) | body[1])
            if qos:
                self._acks.append(b"\x40\x02" + body[pos:pos + 2])
                pos += 2
            length, pos = _read_vbi(body, pos)
            correlation = correlation_of(view[pos:pos + length])
            self.on_message(correlation, body[pos + length:], stamp, read)
        elif kind == SUBACK:
            length, pos = _read_vbi(body, 2)
            self._suback_codes = body[pos + length:]
            self._suback.set()
        elif kind == DISCONNECT:
            raise MqttWireError(f"{self.client_id}: the broker disconnected it "
                                f"(reason 0x{body[0] if body else 0:02x})")
        # PUBACK of a request, PINGRESP: nothing to do
