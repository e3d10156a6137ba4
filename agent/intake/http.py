"""HTTP/1.1 intake: the Open Inference Protocol (KServe v2 REST, Triton's HTTP API) on an asyncio server.

An application written against ``tritonclient.http`` (or any KServe v2 client) talks to edge-agent
unchanged; its requests go through :meth:`agent.api.Agent.submit`, into the same queues, scheduler
and admission control as MQTT ones. The protocol itself (bodies in, bodies out) is
:mod:`agent.intake.oip`; this module is the transport: parsing HTTP/1.1, routing, replying.

One event loop on its own thread serves every connection (no thread per request). Under load the
loop never blocks: an inference request is decoded, submitted and left; the worker that finishes
its batch encodes the reply and sends it on the connection's socket itself (the loop would make it
wait behind a burst of arrivals), handing the loop only what the socket did not take. On an idle
board (no batch in flight, nothing queued, no other request for 2 ms) the
loop runs the request itself and writes the reply at once, from inside the future's ``set_result``
(before the scheduler's bookkeeping for the batch): two thread hand-offs fewer, each a cross-vCPU
wake-up (``LiveLoop.submit``'s ``alone``). Requests whose JSON header repeats (every request a
client sends to one model, but for the tensor bytes) are parsed once (``oip.LayoutCache``).
Connections are keep-alive; requests on one connection are answered in order (a pipelined request
waits until the one before it is answered). Every request that was read gets exactly one reply; a
client that disconnects first simply gets none, and nothing else notices.

Limits, checked before the body is read: ``Content-Length`` over ``max_payload_bytes`` is answered
413 at once and the connection closed (the body is never read); a POST without ``Content-Length``
(chunked bodies included) 411; a malformed request line or header 400; a request line and headers
over ``[http] max_header_bytes`` 431, however the bytes arrive (one read or many: the terminator is
searched for within the limit only). Those close the connection, since the next request's start can
no longer be found.

No client can hold the server: every connection waits under a deadline (``[http]`` keys). A new
connection's first request head, and any head once its first byte came, must be complete within
``header_timeout_s`` (else 408 and close; a connection that sent nothing is just closed); a body
within ``body_timeout_s`` of its head (else 408 and close: a truncated body held open is answered);
between requests a keep-alive connection may sit ``idle_timeout_s``, and a client that reads none of
its replies for as long is dropped. While a request runs on the agent there is no deadline: its
reply is owed. The deadlines are checked by one sweep over the connections a few times per shortest
timeout and at least every ``SWEEP_MAX_S``, so a request costs two attribute writes, not a timer.
A head's deadline is drawn between ``1 - HEAD_JITTER`` and all of ``header_timeout_s`` (ours):
connections opened together (a client pool, a flood of idle ones) would otherwise reach their
deadlines in one sweep, their clients reconnect as one wave, and a new client's connection wait
behind the whole wave in the accept queue (``edge-agent bench http-limits``: BENCHMARKS.md).
Spread, and swept often, the wave is a trickle.

Descriptors: one per connection (a worker writes a reply on the connection's own socket, under a
lock that ``connection_lost`` takes before the transport closes it). At most ``max_connections`` are
open (clipped to what the process's descriptor limit leaves); one beyond is answered 503 and closed,
so a flood of idle connections costs new clients a refusal, never a hang. The server accepts on its
own listening socket: out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM), it stops
accepting for ``ACCEPT_BACKOFF_S`` and logs one line per ``LOG_INTERVAL_S`` with a count, where
asyncio's accept loop logs a traceback per pending connection on every pass (issue 21: 34.6 MB of
them in 26 s).
"""
from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import os
import random
import resource
import socket
import threading
import time
import zlib
from concurrent.futures import Future
from http import HTTPStatus
from typing import Callable
from urllib.parse import unquote

import numpy as np

from agent import __version__
from agent.api import Agent
from agent.errors import BAD_REQUEST, INTERNAL, REJECTED, SHUTTING_DOWN, TOO_LARGE, UNKNOWN_MODEL, InferenceError
from agent.intake import oip

log = logging.getLogger(__name__)

#: What ``GET /v2`` lists: the protocol extensions this server implements.
EXTENSIONS = ("binary_tensor_data", "model_configuration")
MAX_HEAD_BYTES = 64 * 1024            # request line + headers, unless [http] max_header_bytes says
LINGER_S = 2.0                        # after an error that closes: drain what the client still sends
REFUSAL_LINGER_S = 0.25               # the same after a 503 beyond max_connections: a flood must not pile them up
ACCEPT_BATCH = 64                     # connections accepted per readiness of the listening socket
ACCEPT_BACKOFF_S = 0.25               # out of descriptors or memory: stop accepting this long
LOG_INTERVAL_S = 10.0                 # at most one line per interval for each kind of refusal
SWEEP_MAX_S = 0.1                     # the deadline sweep's period at most: spread deadlines close a few at a time
HEAD_JITTER = 0.25                    # a head's deadline: 75-100% of header_timeout_s (module docstring)
RESERVED_FDS = 64                     # descriptors kept for the rest of the agent (models, MQTT, logs)
                                      # and, a sixteenth of the limit more, for refusals lingering
_RESOURCE_ERRNOS = {errno.EMFILE: "EMFILE", errno.ENFILE: "ENFILE", errno.ENOBUFS: "ENOBUFS",
                    errno.ENOMEM: "ENOMEM"}
# What a connection waits for, under its deadline (none while a request runs on the agent).
_HEAD, _BODY, _IDLE, _WRITE = 1, 2, 3, 4
_JSON = b"application/json"
_BINARY = b"application/octet-stream"
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
_ROUTES_HINT = ("GET /v2, /v2/health/live, /v2/health/ready, /v2/models/{name}[/versions/1][/ready|/config]; "
                "POST /v2/models/{name}[/versions/1]/infer")


def _json(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class _HttpError(Exception):
    """A request the server answers without the agent: status, message, and whether to close."""

    def __init__(self, status: int, message: str, close: bool = False, allow: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.close, self.allow = status, message, close, allow


def _no_endpoint(head: "_Head") -> _HttpError:
    return _HttpError(404, f"{BAD_REQUEST}: no endpoint {head.method} {head.path}; this server serves {_ROUTES_HINT}")


class _Head:
    """A parsed request line and the headers this server reads."""

    __slots__ = ("method", "path", "keep_alive", "content_length", "header_length", "content_encoding", "expect",
                 "infer_route")

    def __init__(self, raw: bytes) -> None:
        self.infer_route: tuple | None = None   # (model name, _ModelView) once routed to an infer endpoint
        lines = raw.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[1]:
            raise _HttpError(400, f"{BAD_REQUEST}: malformed request line {lines[0][:100]!r}", close=True)
        method, target, version = parts
        self.method = method.decode("latin-1")
        self.path = target.split(b"?", 1)[0].decode("latin-1")
        connection = b""
        self.content_length: int | None = None
        self.header_length: int | None = None
        self.content_encoding = b""
        self.expect = b""
        chunked = False
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name[-1:] in (b" ", b"\t"):
                raise _HttpError(400, f"{BAD_REQUEST}: malformed header line {line[:100]!r}", close=True)
            name = name.lower()
            value = value.strip()
            if name == b"content-length":
                if not value.isdigit():
                    raise _HttpError(400, f"{BAD_REQUEST}: Content-Length = {value[:40]!r}: expected a byte count",
                                     close=True)
                length = int(value)
                if self.content_length is not None and self.content_length != length:
                    raise _HttpError(400, f"{BAD_REQUEST}: two different Content-Length headers", close=True)
                self.content_length = length
            elif name == b"inference-header-content-length":
                if not value.isdigit():
                    raise _HttpError(400, f"{BAD_REQUEST}: Inference-Header-Content-Length = {value[:40]!r}: "
                                          f"expected a byte count", close=True)
                self.header_length = int(value)
            elif name == b"connection":
                connection = value.lower()
            elif name == b"content-encoding":
                self.content_encoding = value.lower()
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"expect":
                self.expect = value.lower()
        tokens = {t.strip() for t in connection.split(b",")}
        self.keep_alive = b"close" not in tokens if version == b"HTTP/1.1" else b"keep-alive" in tokens
        if chunked:
            raise _HttpError(411, f"{BAD_REQUEST}: Transfer-Encoding is not accepted: send the body with a "
                                  f"Content-Length", close=True)
        if self.content_length is None:
            if self.method == "POST":
                raise _HttpError(411, f"{BAD_REQUEST}: a POST needs a Content-Length", close=True)
            self.content_length = 0


class _Every:
    """Logs one line per interval for a recurring condition, with how often it occurred since the last line."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.last = -float("inf")
        self.count = 0

    def hit(self, message: str, *args) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            log.warning(message + " (%d time(s) in the last %.0f s)", *args, self.count, self.interval_s)
            self.last, self.count = now, 0


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (a process may, unprivileged), so idle or
    slow connections do not run the agent out of descriptors at the common soft limit of 1,024.
    Returns the (soft, hard) limits in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:      # e.g. an unlimited hard limit the kernel caps lower
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft, hard


class _HeadCache(dict):
    """Parsed request heads, keyed by their raw bytes. A client repeats the same head for every
    request to a model (the same path, headers and, for fixed-size tensors, Content-Length), so a
    head is parsed and routed once. On an idle board, where that Python runs on caches gone cold in
    the wait, parsing the head anew took more than half of the time from reading a request to
    parsing its body (BENCHMARKS.md, "Figures that were in docstrings"). Bounded like
    ``oip.LayoutCache``: cleared when full, so a client whose heads all differ costs one insert each."""

    SIZE = 256

    def remember(self, raw: bytes, head: _Head) -> None:
        if len(self) >= self.SIZE:
            self.clear()
        self[raw] = head


class _Connection(asyncio.Protocol):
    """One client connection: parse requests in order, one in flight at a time, reply in order."""

    def __init__(self, intake: "HttpIntake") -> None:
        self.intake = intake
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.scanned = 0                  # bytes of the buffer searched for the end of the head
        self.head: _Head | None = None
        self.busy = False                 # a request is being answered: later ones wait in the buffer
        self.keep_alive = True            # of the request being answered
        self.head_only = False            # the request being answered is a HEAD: no body in the reply
        self.closing = False
        self.reading_paused = False
        self.writing_paused = False
        # What the connection waits for (_HEAD, _BODY, _IDLE, _WRITE; 0 while a request runs) and
        # until when (time.monotonic(), the loop's clock): HttpIntake._sweep closes it past that.
        self.waiting = 0
        self.deadline = 0.0
        # The connection's socket descriptor, for the answering thread to write replies on (``finish``):
        # no second descriptor per connection. ``connection_lost`` runs before the transport closes
        # the socket and sets it to -1 under the lock, so a worker never writes to a closed (or
        # reused) number.
        self._fd = -1
        self._direct_lock = threading.Lock()

    # --- asyncio callbacks ---------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        intake = self.intake
        if len(intake._connections) >= intake.max_connections:
            # Over the bound: refused with a reply, and this connection never counts.
            intake._refusals.hit("HTTP: %d connections open (the [http] max_connections bound): new ones are "
                                 "answered 503", len(intake._connections))
            self.transport.write(self._response(503, [_json({"error": f"{REJECTED}: too many connections "
                                                              f"({intake.max_connections} open); try again later"})],
                                                _JSON, None, close=True))
            self._close(linger=REFUSAL_LINGER_S)
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:   # not TCP (a Unix socket in someone's test): nothing to tune
                pass
            self._fd = sock.fileno()
        self.waiting, self.deadline = _HEAD, intake.head_deadline(time.monotonic())
        intake._connections.add(self)

    def connection_lost(self, exc) -> None:
        self.transport = None
        self.closing = True
        self.waiting = 0
        with self._direct_lock:
            self._fd = -1
        self.buffer = bytearray()
        self.intake._connections.discard(self)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return                        # lingering after an error reply: drain and drop
        self.buffer += data
        if self.busy or self.writing_paused:
            if len(self.buffer) > self.intake.max_payload + self.intake.max_head and not self.reading_paused:
                self.transport.pause_reading()
                self.reading_paused = True
            return
        self._process()

    def expire(self, now: float) -> None:
        """On the loop, from the sweep: the connection waited past its deadline."""
        waiting = self.waiting
        if self.closing or self.transport is None or self.busy or not waiting:
            return
        if waiting == _WRITE:
            self.transport.abort()        # a client that reads none of its replies: nothing left to say
        elif waiting == _BODY or (waiting == _HEAD and self.buffer):
            what = "body" if waiting == _BODY else "request line and headers"
            limit = self.intake.body_timeout_s if waiting == _BODY else self.intake.header_timeout_s
            self.keep_alive = False
            self.head_only = False
            self._error(408, f"{BAD_REQUEST}: the {what} did not arrive within {limit:g} s", close=True)
        else:                             # idle, or a new connection that sent nothing: close, as servers do
            self._close()

    def pause_writing(self) -> None:
        self.writing_paused = True        # a client not reading its replies: read no more requests
        if not self.busy:
            self.waiting, self.deadline = _WRITE, time.monotonic() + self.intake.idle_timeout_s

    def resume_writing(self) -> None:
        self.writing_paused = False
        if not self.busy:
            self.waiting, self.deadline = _IDLE, time.monotonic() + self.intake.idle_timeout_s
        self._next()

    # --- requests ------------------------------------------------------------------------------

    def _process(self) -> None:
        """Take every complete request from the buffer while none is in flight."""
        buffer = self.buffer
        intake = self.intake
        while not self.busy and not self.closing and not self.writing_paused:
            head = self.head
            if head is None:
                self.head_only = False
                limit = intake.max_head
                # Searched within the limit only, from where the last read's search stopped: a head
                # over the limit is refused however it arrives, and a head sent a byte at a time
                # costs a search of each byte once.
                end = buffer.find(b"\r\n\r\n", self.scanned, limit + 4)
                if end < 0:
                    if len(buffer) >= limit + 4:
                        self._error(431, f"{BAD_REQUEST}: request line and headers exceed {limit} bytes", close=True)
                    elif buffer:
                        self.scanned = max(0, len(buffer) - 3)
                        if self.waiting != _HEAD:     # the head's clock starts at its first byte
                            self.waiting, self.deadline = _HEAD, intake.head_deadline(time.monotonic())
                    return
                self.scanned = 0
                raw = bytes(buffer[:end])
                head = intake._heads.get(raw)
                if head is None:
                    try:
                        head = _Head(raw)
                    except _HttpError as exc:
                        self._error(exc.status, exc.message, close=True)
                        return
                    intake._heads.remember(raw, head)
                del buffer[:end + 4]
                if head.content_length > intake.max_payload:
                    # Answered from the header alone: the body is never read, so the connection cannot go on.
                    self._error(413, f"{TOO_LARGE}: Content-Length of {head.content_length} bytes exceeds the "
                                     f"limit of {intake.max_payload} bytes", close=True)
                    return
                if head.expect == b"100-continue" and len(buffer) < head.content_length:
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                self.head = head
            length = head.content_length
            if len(buffer) < length:
                if self.waiting != _BODY:
                    self.waiting, self.deadline = _BODY, time.monotonic() + intake.body_timeout_s
                return
            if len(buffer) == length:
                body = bytes(buffer)
                buffer.clear()
            else:
                body = bytes(buffer[:length])
                del buffer[:length]
            self.head = None
            self.busy = True
            self.waiting = 0
            self.keep_alive = head.keep_alive
            self.head_only = head.method == "HEAD"
            try:
                intake._handle(self, head, body)
            except Exception as exc:      # a bug must not cost the client its reply, nor the loop its life
                log.exception("HTTP intake failed on %s %s", head.method, head.path)
                if self.busy:
                    self._error(500, f"{INTERNAL}: {type(exc).__name__}: {exc}")

    def _next(self) -> None:
        """After an asynchronous reply: resume reading, and serve what was pipelined meanwhile."""
        if self.closing:
            return
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()
        if not self.busy and self.buffer:
            self._process()

    # --- replies -------------------------------------------------------------------------------

    def _response(self, status: int, chunks: list[bytes], content_type: bytes, header_length: int | None,
                  close: bool, allow: str | None = None) -> bytes:
        """One response's bytes: status line, headers, body."""
        size = 0
        for chunk in chunks:
            size += len(chunk)
        head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n" % (
            status, _REASONS.get(status, b"Unknown"), content_type, size)
        if header_length is not None:
            head += b"Inference-Header-Content-Length: %d\r\n" % header_length
        if allow is not None:
            head += b"Allow: %s\r\n" % allow.encode()
        if close:
            head += b"Connection: close\r\n"
        return head + b"\r\n" if self.head_only else b"".join((head, b"\r\n", *chunks))

    def respond(self, status: int, chunks: list[bytes], content_type: bytes = _JSON,
                header_length: int | None = None, close: bool = False, allow: str | None = None) -> None:
        """On the loop: write one response; the connection is free for the next request."""
        close = close or not self.keep_alive
        self._write(self._response(status, chunks, content_type, header_length, close, allow), close, status)

    def _write(self, data: bytes, close: bool, status: int) -> bool:
        """On the loop: write response bytes, then close if asked; False if the client has left."""
        self.waiting, self.deadline = _IDLE, time.monotonic() + self.intake.idle_timeout_s
        self.busy = False
        transport = self.transport
        if transport is None or self.closing:
            return False                  # the client left: nobody to answer
        transport.write(data)
        if close:
            self._close(linger=LINGER_S if status >= 400 else 0.0)
        return True

    def _error(self, status: int, message: str, close: bool = False, allow: str | None = None) -> None:
        self.respond(status, [_json({"error": message})], close=close, allow=allow)

    def respond_error(self, error: InferenceError) -> None:
        self.respond(oip.error_status(error), [oip.error_body(error)])

    @staticmethod
    def _infer_reply(request: oip.InferRequest, futures: list[Future]) -> tuple[int, list[bytes], bytes, int | None]:
        """The reply to an answered inference request: status, body chunks, content type, JSON length."""
        try:
            try:
                results = [future.result() for future in futures]   # done: never blocks
            except InferenceError as exc:
                return oip.error_status(exc), [oip.error_body(exc)], _JSON, None
            exits = [r.served_by.get("exit") for r in results]
            if exits[0] is not None and any(name not in results[0].outputs for name, _ in request.outputs):
                # A multi-exit model answered at an exit: its reply holds that exit's answer only
                # (agent.runtime.staged); the outputs asked for are those it has.
                have = set.intersection(*(set(r.outputs) for r in results))
                request = dataclasses.replace(request, outputs=[o for o in request.outputs if o[0] in have])
            if len(results) == 1:
                outputs = results[0].outputs
            else:
                outputs = {name: np.concatenate([r.outputs[name] for r in results]) for name, _ in request.outputs}
            slowest = max(results, key=lambda r: r.total_ms)
            timing = {"queue_ms": round(slowest.queue_ms, 3), "compute_ms": round(slowest.compute_ms, 3),
                      "total_ms": round(slowest.total_ms, 3), "batch_size": slowest.batch_size}
            if exits[0] is not None:
                timing["exit"] = exits[0] if len(exits) == 1 else exits
            # Where it was computed, as an MQTT reply's served_by says: the board, and the split
            # point when a peer ran its tail (agent.offload); a row by row list for several rows.
            devices = [r.served_by.get("device") for r in results]
            if devices[0] is not None:
                timing["served_by"] = devices[0] if len(devices) == 1 else devices
            splits = [r.served_by.get("split") for r in results]
            if any(split is not None for split in splits):
                timing["split"] = splits[0] if len(splits) == 1 else splits
            chunks, header_length = oip.infer_response(request, outputs, timing)
            return 200, chunks, _JSON if header_length is None else _BINARY, header_length
        except Exception as exc:
            log.exception("HTTP intake failed to encode the reply to %s", request.model)
            return 500, [_json({"error": f"{INTERNAL}: {type(exc).__name__}: {exc}"})], _JSON, None

    def finish(self, request: oip.InferRequest, futures: list[Future]) -> None:
        """On the thread that answered the last row: encode the reply and send it on the socket now.

        That thread is a worker, or on an idle board the loop itself (``agent.runtime.live.LiveLoop.run_alone``),
        called from inside the future's ``set_result``: before the scheduler frees the batch's slot
        and learns its time, which the client need not wait for. Under a burst the loop's thread is
        busy reading and admitting arrivals, and a reply handed to it waits its turn behind them (the
        replies that came back late at 1x load in ``bench triton`` had waited there for milliseconds:
        BENCHMARKS.md, "Figures that were in docstrings"). The
        connection has this one request in flight, so nothing else writes to it meanwhile: the
        answering thread sends on its own descriptor when the transport has nothing buffered, and
        hands the loop only what the socket did not take, a close, or pipelined input.
        """
        status, chunks, content_type, header_length = self._infer_reply(request, futures)
        loop = self.intake._loop
        close = not self.keep_alive
        data = self._response(status, chunks, content_type, header_length, close)
        sent = 0
        with self._direct_lock:
            fd, transport = self._fd, self.transport
            if fd >= 0 and transport is not None and not self.closing and not transport.get_write_buffer_size():
                try:
                    sent = os.write(fd, data)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:             # the client is gone: nobody to answer
                    return
        try:
            if sent == len(data) and not close:
                self.waiting, self.deadline = _IDLE, time.monotonic() + self.intake.idle_timeout_s
                self.busy = False           # first: what the loop reads from now on, it serves itself
                if self.buffer or self.reading_paused:
                    loop.call_soon_threadsafe(self._next)
            else:
                loop.call_soon_threadsafe(self._write_rest, data[sent:] if sent else data, close, status)
        except RuntimeError:                # the loop is closed: the server is gone, and the client with it
            pass

    def _write_rest(self, data: bytes, close: bool, status: int) -> None:
        """On the loop: what a worker's send left (or all of the reply), then close or go on."""
        if self._write(data, close, status) and not close:
            self._next()

    def _close(self, linger: float = 0.0) -> None:
        """Close after the replies written so far are sent. ``linger``: half-close and read (and drop)
        what the client still sends for a while, so an unread body does not reset the connection
        before the client has read our error reply."""
        if self.closing or self.transport is None:
            return
        self.closing = True
        self.waiting = 0
        transport = self.transport
        if linger and transport.can_write_eof():
            transport.write_eof()
            self.intake._loop.call_later(linger, transport.close)
        else:
            transport.close()


def _listen(host: str, port: int, backlog: int = 1024) -> list[socket.socket]:
    """Non-blocking listening sockets on every address ``host`` resolves to (as asyncio's
    ``create_server`` binds them), all on one port: the first bound one's when ``port`` is 0."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class _Gather:
    """Counts a multi-row request's rows down; the thread that answers the last one writes the reply."""

    __slots__ = ("remaining", "lock", "callback")

    def __init__(self, rows: int, callback) -> None:
        self.remaining = rows
        self.lock = threading.Lock()
        self.callback = callback

    def row_done(self, _future: Future) -> None:
        with self.lock:
            self.remaining -= 1
            last = self.remaining == 0
        if last:
            self.callback()


class _ModelView:
    """What the intake needs of a loaded model, computed once: its tensors and metadata bodies."""

    def __init__(self, name: str, loaded) -> None:
        card = loaded.card
        self.inputs, self.outputs = card.inputs, card.outputs
        backend = loaded.config.backend
        self.metadata = _json(oip.model_metadata(name, backend, card.inputs, card.outputs))
        self.config = _json(oip.model_config(name, backend, loaded.rule.max_batch, card.inputs, card.outputs))
        self.layouts = oip.LayoutCache()      # only the loop's thread parses: no lock


class HttpIntake:
    """Serves the agent's models over the Open Inference Protocol on ``host:port`` (0 = a free port;
    :attr:`port` is the bound one after :meth:`start`). Timeouts and bounds come from ``[http]``
    (:class:`agent.config.HttpConfig`) unless given here."""

    def __init__(self, agent: Agent, host: str, port: int, *, header_timeout_s: float | None = None,
                 body_timeout_s: float | None = None, idle_timeout_s: float | None = None,
                 max_connections: int | None = None, max_header_bytes: int | None = None) -> None:
        http = agent.config.http
        self.agent = agent
        self.host, self.port = host, port
        self.max_payload = agent.config.max_payload_bytes
        self.header_timeout_s = http.header_timeout_s if header_timeout_s is None else header_timeout_s
        self.body_timeout_s = http.body_timeout_s if body_timeout_s is None else body_timeout_s
        self.idle_timeout_s = http.idle_timeout_s if idle_timeout_s is None else idle_timeout_s
        self.max_connections = http.max_connections if max_connections is None else max_connections
        self.max_head = http.max_header_bytes if max_header_bytes is None else max_header_bytes
        self.taking = False
        # What else the agent's readiness needs (the service sets it: MQTT connected), or None.
        self.also_ready: Callable[[], bool] | None = None
        self._models = {name: _ModelView(name, loaded) for name, loaded in agent.models.items()}
        self._server_metadata = _json(oip.server_metadata(__version__, EXTENSIONS))
        self._connections: set[_Connection] = set()
        self._heads = _HeadCache()            # only the loop's thread parses: no lock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners: list[socket.socket] = []
        self._accepting = False
        self._refusals = _Every()             # 503s past max_connections
        self._accept_failures = _Every()      # EMFILE and kin in accept
        self._thread: threading.Thread | None = None

    # --- life cycle ----------------------------------------------------------------------------

    def refresh_models(self) -> None:
        """The agent loaded, unloaded or re-batched a model while serving: rebuild the per-model
        views (metadata, config, readiness). The dict is replaced whole, so the event loop reads
        the old one or the new one, never a half-built one."""
        self._models = {name: _ModelView(name, loaded) for name, loaded in self.agent.models.items()}

    def start(self) -> "HttpIntake":
        """Bind and listen; returns once connections are accepted (a bind error raises here)."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and self.max_connections > soft - RESERVED_FDS - soft // 16:
            bound = max(1, soft - RESERVED_FDS - soft // 16)
            log.warning("[http] max_connections %d is more than the open-file limit %d leaves; serving at most %d",
                        self.max_connections, soft, bound)
            self.max_connections = bound
        self._listeners = _listen(self.host, self.port)
        loop = asyncio.new_event_loop()
        self._loop = loop
        self.port = self._listeners[0].getsockname()[1]
        self._accepting = True
        for sock in self._listeners:
            loop.add_reader(sock.fileno(), self._accept, sock)
        loop.call_soon(self._sweep)
        self.taking = True
        self._thread = threading.Thread(target=loop.run_forever, name="edge-agent-http", daemon=True)
        self._thread.start()
        log.info("serving %s on http://%s:%d (Open Inference Protocol; at most %d connections)",
                 sorted(self._models), self.host, self.port, self.max_connections)
        return self

    def _accept(self, sock: socket.socket) -> None:
        """On the loop: take the connections waiting on a listening socket, a batch at a time."""
        loop = self._loop
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _address = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                name = _RESOURCE_ERRNOS.get(exc.errno)
                if name is None:
                    self._accept_failures.hit("HTTP accept failed: %s", exc)
                    return
                # The listening socket stays readable while the resource is short: stop watching it
                # for a while, rather than spin (or log) on every pass of the loop.
                loop.remove_reader(sock.fileno())
                loop.call_later(ACCEPT_BACKOFF_S, self._resume_accepting, sock)
                self._accept_failures.hit("HTTP accept: %s (%s) with %d connections open; not accepting for "
                                          "%.2f s at a time", name, os.strerror(exc.errno), len(self._connections),
                                          ACCEPT_BACKOFF_S)
                return
            conn.setblocking(False)
            loop.create_task(self._connect(conn))

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(lambda: _Connection(self), conn)
        except OSError as exc:               # e.g. the client reset before the transport was made
            conn.close()
            self._accept_failures.hit("HTTP: could not set up a connection: %s", exc)

    def _resume_accepting(self, sock: socket.socket) -> None:
        if self._accepting:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _sweep(self) -> None:
        """On the loop, a few times per shortest timeout: close the connections past their deadline."""
        now = time.monotonic()
        for connection in [c for c in self._connections if c.waiting and c.deadline <= now]:
            connection.expire(now)
        if self._accepting:
            period = min(self.header_timeout_s, self.body_timeout_s, self.idle_timeout_s) / 4
            self._loop.call_later(min(SWEEP_MAX_S, max(0.02, period)), self._sweep)

    def head_deadline(self, now: float) -> float:
        """When a request head that starts waiting at ``now`` times out (module docstring: spread)."""
        return now + self.header_timeout_s * (1.0 - HEAD_JITTER * random.random())

    def stop_taking(self) -> None:
        """From now on, new inference requests are answered 503 (``shutting_down``) and readiness is
        false, while requests already submitted are answered when the agent finishes them."""
        self.taking = False

    def stop(self, timeout: float = 5.0) -> None:
        """After ``Agent.close`` has answered everything: write the last replies, close every
        connection and the listening socket, end the loop's thread."""
        loop = self._loop
        if loop is None:
            return
        self.taking = False
        try:
            # Queued behind the replies the workers handed to the loop: those are written first.
            asyncio.run_coroutine_threadsafe(self._shutdown(timeout), loop).result(timeout + 1.0)
        except Exception:  # a loop that cannot finish cleanly still has to stop
            log.exception("HTTP intake did not shut down cleanly")
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            loop.close()
        self._loop = None

    async def _shutdown(self, timeout: float) -> None:
        self._accepting = False
        for sock in self._listeners:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        for connection in list(self._connections):
            connection.closing = True
            if connection.transport is not None:
                connection.transport.close()     # after what is buffered, the last replies, is sent
        deadline = self._loop.time() + timeout
        while self._connections and self._loop.time() < deadline:   # let the transports flush and close
            await asyncio.sleep(0.01)
        for connection in list(self._connections):
            if connection.transport is not None:
                connection.transport.abort()

    # --- routing (on the loop) -----------------------------------------------------------------

    def _handle(self, connection: _Connection, head: _Head, body: bytes) -> None:
        route = head.infer_route
        if route is not None:         # a head seen before, already routed: straight to the model
            try:
                self._infer(connection, head, route[0], route[1], body)
            except _HttpError as exc:
                connection._error(exc.status, exc.message, close=exc.close, allow=exc.allow)
            except InferenceError as exc:
                connection.respond_error(exc)
            return
        path = head.path
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        parts = path.split("/")
        try:
            if len(parts) < 2 or parts[0] != "" or parts[1] != "v2":
                raise _no_endpoint(head)
            self._route(connection, head, parts[2:], body)
        except _HttpError as exc:
            connection._error(exc.status, exc.message, close=exc.close, allow=exc.allow)
        except InferenceError as exc:
            connection.respond_error(exc)

    @staticmethod
    def _method(head: _Head, allowed: str) -> None:
        if head.method != allowed and not (head.method == "HEAD" and allowed == "GET"):
            raise _HttpError(405, f"{BAD_REQUEST}: method {head.method} is not allowed on {head.path} "
                                  f"(allowed: {allowed})", allow=allowed)

    def _route(self, connection: _Connection, head: _Head, parts: list[str], body: bytes) -> None:
        if not parts:                                         # /v2
            self._method(head, "GET")
            connection.respond(200, [self._server_metadata])
            return
        if parts[0] == "health" and len(parts) == 2 and parts[1] in ("live", "ready"):
            self._method(head, "GET")
            if parts[1] == "live" or self.ready():
                connection.respond(200, [])
            else:
                connection._error(400, f"{SHUTTING_DOWN}: the agent is not taking requests")
            return
        if parts[0] == "models" and len(parts) >= 2:
            name = unquote(parts[1])
            rest = parts[2:]
            if rest[:1] == ["versions"]:
                if len(rest) < 2:
                    raise _no_endpoint(head)
                version, rest = unquote(rest[1]), rest[2:]
            else:
                version = None
            if len(rest) <= 1 and (not rest or rest[0] in ("ready", "infer", "config")):
                model = self._models.get(name)
                if model is None:
                    raise InferenceError(UNKNOWN_MODEL, f"no model {name!r} is loaded; loaded: {sorted(self._models)}",
                                         "model")
                if version is not None and version != oip.MODEL_VERSION:
                    raise InferenceError(UNKNOWN_MODEL, f"model {name!r} has no version {version!r}; its versions: "
                                                        f"[{oip.MODEL_VERSION!r}]", "model")
                action = rest[0] if rest else None
                if action == "infer":
                    self._method(head, "POST")
                    head.infer_route = (name, model)
                    self._infer(connection, head, name, model, body)
                elif action == "ready":
                    self._method(head, "GET")
                    if self.ready():
                        connection.respond(200, [])
                    else:
                        connection._error(400, f"{SHUTTING_DOWN}: model {name!r} is not taking requests")
                elif action == "config":
                    self._method(head, "GET")
                    connection.respond(200, [model.config])
                else:
                    self._method(head, "GET")
                    connection.respond(200, [model.metadata])
                return
        raise _no_endpoint(head)

    def ready(self) -> bool:
        """Models loaded (the intake starts after them), requests taken, and ``also_ready``."""
        return self.taking and (self.also_ready is None or self.also_ready())

    # --- inference -----------------------------------------------------------------------------

    def _infer(self, connection: _Connection, head: _Head, name: str, model: _ModelView, body: bytes) -> None:
        if not self.taking:
            raise InferenceError(SHUTTING_DOWN, "the agent is shutting down: not taking new requests")
        if head.content_encoding not in (b"", b"identity"):
            body = self._decompress(head.content_encoding, body)
        request = oip.parse_infer_request(name, body, head.header_length, model.inputs, model.outputs, model.layouts)
        if request.rows == 1:
            # The reply leaves from whichever thread answers (Connection.finish); on an idle board
            # that is this one, inside submit_inline.
            self.agent.submit_inline(name, request.inputs, lambda future: connection.finish(request, [future]),
                                     slo_ms=request.slo_ms, priority=request.priority, client_id=request.id,
                                     min_accuracy=request.min_accuracy)
            return
        submit = self.agent.submit
        # The agent queues single items: each row is its own request (same SLO), gathered in order.
        futures = [submit(name, {k: v[row:row + 1] for k, v in request.inputs.items()}, slo_ms=request.slo_ms,
                          priority=request.priority, client_id=request.id, min_accuracy=request.min_accuracy)
                   for row in range(request.rows)]
        gather = _Gather(len(futures), lambda: connection.finish(request, futures))
        for future in futures:
            future.add_done_callback(gather.row_done)

    def _decompress(self, encoding: bytes, body: bytes) -> bytes:
        """A gzip or deflate body (``tritonclient``'s ``request_compression_algorithm``), bounded by the
        payload limit after decompression too."""
        if encoding == b"gzip":
            decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        elif encoding == b"deflate":
            decoder = zlib.decompressobj()
        else:
            raise _HttpError(415, f"{BAD_REQUEST}: Content-Encoding {encoding.decode('latin-1')!r} is not "
                                  f"supported (identity, gzip, deflate)")
        try:
            data = decoder.decompress(body, self.max_payload + 1)
        except zlib.error as exc:
            raise InferenceError(BAD_REQUEST, f"the {encoding.decode()} body does not decompress ({exc})") from None
        if len(data) > self.max_payload:
            raise InferenceError(TOO_LARGE, f"the decompressed body exceeds the limit of {self.max_payload} bytes")
        return data
