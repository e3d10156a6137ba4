"""One open-loop load generator for every server ``edge-agent bench triton`` compares.

Open loop: each request's send time is fixed by the trace before the run; a slow server never
delays a send (the loop writes each request at its time and reads replies in callbacks; a new
connection is opened when none is idle), and how late each send went out (send lag) is recorded, so
a run whose generator fell behind shows.

A request's latency runs from its send to its reply reaching this process: over HTTP, the kernel's
receive stamp on the reply's last segment (``SO_TIMESTAMPNS``). The HTTP generator plays every
application of the board from one Python process on the same cores as the server, and its loop can
be busy for milliseconds when a burst of replies comes in; an application of its own would not queue
behind the others' replies. How long replies waited for the loop is reported too (read lag), and
``Replay.read_s`` keeps when each was read. The MQTT side is played from several processes, each
a plain-socket client (:mod:`edge_lab.bench.mqttload`), since one could not keep up, and is stamped
the same way (the kernel's receive stamp of the read that completed the reply). Every replay
reports how hard each generator process worked (``Replay.generators``: send lag and CPU use), so a
row the generator limited shows.

The generator has to be cheap, because on a 2-core board it shares the CPU with the server under
test: request bodies are built once per (model, SLO, frame) before the run and sent as bytes; HTTP
bodies use the binary tensor extension and ask for uncompressed binary outputs (the stock
``tritonclient`` aio client rebuilds each body on the event loop and asks for gzip, which makes
Triton compress every reply). Each reply is checked: the predicted digit is compared with the
frame's label, so a server that answers fast but wrong cannot look good.

Two transports, one record per trace row (:class:`~agent.workload.records.RequestRecord`):

- :class:`HttpTarget`: the Open Inference Protocol (KServe v2) over HTTP/1.1 keep-alive, spoken by
  Triton and by edge-agent's HTTP intake. The SLO travels as ``parameters.slo_ms`` to edge-agent
  and as Triton's per-request queue ``timeout`` (microseconds) to Triton.
- :class:`MqttTarget`: edge-agent's MQTT v5 wire format (DESIGN.md), through a real broker, at QoS 1.
"""
from __future__ import annotations

import asyncio
import errno
import functools
import json
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from agent import errors
from agent.workload.records import RequestRecord
from agent.workload.trace import TraceRow
from edge_lab.bench.mqttload import CpuSampler, GeneratorLoad, spread_ms
from edge_lab.bench.mqttwire import SO_TIMESTAMPNS, STAMP_SPACE, receive_stamp


@dataclass(frozen=True)
class Frames:
    """The inputs every server gets: per model, its input name and real frames with their labels."""

    inputs: dict[str, tuple[str, str, list[np.ndarray], np.ndarray]]   # model -> (input, output, frames, labels)

    @staticmethod
    def digits(models: Sequence[str], count: int = 64) -> "Frames":
        """Real digit frames (the demo models' uint8 ``frames`` input, ``logits`` output)."""
        from agent.models.digits import frames_from_digits, load_test_set
        images, labels = load_test_set()
        frames = frames_from_digits(images[:count])
        return Frames({m: ("frames", "logits", [f[None] for f in frames], np.asarray(labels[:count]))
                       for m in models})


@dataclass
class Replay:
    records: list[RequestRecord]
    duration_s: float               # from the first send time to the last one (the trace's span)
    send_lag_ms: dict[str, float]   # p50 / p99 / max of how late sends went out
    wrong: int                      # ok replies whose predicted class was not the frame's label
    checked: int                    # ok replies whose prediction was checked
    # p50 / p99 / max of how long a reply waited in this process's socket before the generator's
    # loop read it (HTTP: from the kernel's receive stamp; MQTT: 0, stamped when paho read it)
    read_lag_ms: dict[str, float]
    # per record, when the generator's loop read the reply (seconds from the start; None: no reply)
    read_s: list[float | None]
    # per generator process, how hard it worked (edge_lab.bench.mqttload.GeneratorLoad.as_dict):
    # its rows, send lag, CPU seconds and share over the sending window, busiest window's CPU
    generators: list[dict] = field(default_factory=list)
    # per record, the server's own time for the request as its reply states it (edge-agent's
    # ``total_ms``: from taking the request to its result; None: no such figure): the rest of the
    # latency was spent outside the server's accounting (sockets, broker, generator)
    server_ms: list[float | None] = field(default_factory=list)
    # replies by the board that sent them (``served_by.device``): a pool's spread
    served_by: dict[str, int] = field(default_factory=dict)
    # per record, where its reply says it was computed, ``[device, split]`` (``split`` None when the
    # board ran it whole; HTTP only, from ``parameters.served_by`` and ``parameters.split``)
    where: list[list | None] = field(default_factory=list)


# --- Open Inference Protocol over HTTP -----------------------------------------------------------

def oip_body(input_name: str, frame: np.ndarray, output_name: str, parameters: dict) -> tuple[bytes, bytes]:
    """(JSON header, binary tail) of an OIP infer request with the binary tensor extension."""
    header = json.dumps({
        "inputs": [{"name": input_name, "shape": list(frame.shape), "datatype": "UINT8",
                    "parameters": {"binary_data_size": frame.nbytes}}],
        "outputs": [{"name": output_name, "parameters": {"binary_data": True}}],
        "parameters": parameters,
    }, separators=(",", ":")).encode()
    return header, frame.tobytes()


def _triton_code(message: str) -> str:
    """Triton's error text to the agent's code: its queue policy's timeout is a request that expired
    waiting (our ``deadline_missed``); a full queue is a refusal (our ``rejected``)."""
    text = message.lower()
    if "timeout" in text or "timed out" in text:
        return errors.DEADLINE_MISSED
    if "exceeds maximum queue size" in text or "queue is full" in text:
        return errors.REJECTED
    return errors.INTERNAL


def error_code_of(message: str) -> str:
    """The agent's error code from an OIP error message: edge-agent starts it with ``<code>:``;
    anything else is read as Triton's text."""
    head = message.split(":", 1)[0].strip()
    return head if head in errors.ERROR_CODES else _triton_code(message)


# done(status, the binary output or None, when the reply reached this process, when the loop read it,
# the server's own time as the reply states it or None)
Done = Callable[[str, "bytes | None", float, float, "float | None"], None]


class _Target:
    """What both transports share: every distinct request's bytes, built before the run."""

    frames: Frames
    _bodies: dict[tuple[str, float, int, int], bytes]

    def encode(self, model: str, slo_ms: float, priority: int, frame_index: int) -> bytes:
        raise NotImplementedError

    def prepare(self, trace: Sequence[TraceRow]) -> None:
        for key in {(row.model, row.slo_ms, row.priority) for row in trace}:
            for k in range(len(self.frames.inputs[key[0]][2])):
                self._bodies[(*key, k)] = self.encode(*key, k)

    def body(self, row: TraceRow, frame_index: int) -> bytes:
        return self._bodies[(row.model, row.slo_ms, row.priority, frame_index)]


class HttpTarget(_Target):
    """Sends OIP requests to ``host:port`` over a pool of keep-alive connections, one request per
    connection at a time (HTTP/1.1 without pipelining); ``flavor`` is ``"edge-agent"`` or
    ``"triton"`` and only decides how the SLO is spelled.

    Sockets are driven straight from the event loop (no stream objects, no task per request): a
    request is written at its send time by the loop's own call, and each connection's reply is
    read by a reader callback. A reply is stamped with the kernel's receive time
    (``SO_TIMESTAMPNS``): when it reached this process's socket, not when this generator's loop,
    busy with other sends and replies on the same cores as the server, got round to reading it.
    Both times are kept: ``Replay.read_lag_ms`` says how far the loop fell behind."""

    def __init__(self, host: str, port: int, frames: Frames, flavor: str) -> None:
        if flavor not in ("edge-agent", "triton"):
            raise ValueError(f"flavor = {flavor!r}: expected 'edge-agent' or 'triton'")
        self.host, self.port, self.frames, self.flavor = host, port, frames, flavor
        self._idle: list[_HttpConnection] = []
        self._open: set[_HttpConnection] = set()
        self._address = None
        self._bodies = {}

    def encode(self, model: str, slo_ms: float, priority: int, frame_index: int) -> bytes:
        input_name, output_name, frames, _ = self.frames.inputs[model]
        params = ({"slo_ms": slo_ms} if self.flavor == "edge-agent" else {"timeout": int(round(slo_ms * 1000))})
        if priority and self.flavor == "edge-agent":
            params["priority"] = priority
        header, tail = oip_body(input_name, frames[frame_index], output_name, params)
        return (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(header)}\r\n"
                f"Content-Length: {len(header) + len(tail)}\r\n\r\n").encode() + header + tail

    def send(self, row: TraceRow, frame_index: int, done: Done) -> None:
        """Write one request now, on the loop's thread; ``done(status, binary output or None, kernel
        receive time, loop read time)`` is called on the loop when its reply is read (perf_counter
        seconds). Raises ``OSError`` when no connection can be opened."""
        connection = self._idle.pop() if self._idle else self._connect()
        connection.send(self.body(row, frame_index), done)

    def _connect(self) -> "_HttpConnection":
        """A new connection, connecting without blocking: a server slow to accept (a full backlog
        retries the handshake after a second) must delay its own request, not every send after it."""
        if self._address is None:
            family, kind, proto, _, address = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0]
            self._address = (family, kind, proto, address)
        family, kind, proto, address = self._address
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        error = sock.connect_ex(address)
        if error not in (0, errno.EINPROGRESS, errno.EAGAIN):
            sock.close()
            raise OSError(error, f"connect to {self.host}:{self.port}: {os.strerror(error)}")
        connection = _HttpConnection(self, sock, asyncio.get_running_loop(), connecting=error != 0)
        self._open.add(connection)
        return connection

    def _reusable(self, connection: "_HttpConnection") -> None:
        self._idle.append(connection)

    def _gone(self, connection: "_HttpConnection") -> None:
        self._open.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)

    async def close(self) -> None:
        for connection in list(self._open):
            connection.close()


class _HttpConnection:
    """One keep-alive connection of :class:`HttpTarget`, with at most one request in flight."""

    __slots__ = ("target", "sock", "loop", "buffer", "done", "unsent", "connecting")

    def __init__(self, target: HttpTarget, sock: socket.socket, loop: asyncio.AbstractEventLoop,
                 connecting: bool = False) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        except OSError:                      # not Linux: replies are stamped when read
            pass
        self.target, self.sock, self.loop = target, sock, loop
        self.buffer = bytearray()
        self.done = None
        self.unsent = b""
        self.connecting = connecting
        loop.add_reader(sock.fileno(), self._readable)

    def send(self, data: bytes, done) -> None:
        self.done = done
        self.buffer.clear()
        try:
            sent = self.sock.send(data)      # on loopback the handshake is usually done by now
            self.connecting = False
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            if not (self.connecting and exc.errno == errno.ENOTCONN):
                self._fail()
                return
            sent = 0                         # the handshake is not done: the loop writes once it is
        if sent < len(data):                 # a full send buffer: the loop writes the rest
            self.unsent = data[sent:]
            self.loop.add_writer(self.sock.fileno(), self._writable)

    def _writable(self) -> None:
        if self.connecting:
            error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                self._fail()
                return
            self.connecting = False
        try:
            sent = self.sock.send(self.unsent)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._fail()
            return
        self.unsent = self.unsent[sent:]
        if not self.unsent:
            self.loop.remove_writer(self.sock.fileno())

    def _readable(self) -> None:
        try:
            data, ancillary, _, _ = self.sock.recvmsg(65536, STAMP_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, ancillary = b"", []
        read = time.perf_counter()
        if not data:                         # the server closed the connection
            self._fail()
            return
        self.buffer += data
        reply = _complete_reply(self.buffer)
        if reply is None:
            return
        received = receive_stamp(ancillary, read, time.perf_counter)
        status, output, close, server_ms, where = reply
        done, self.done = self.done, None
        if close:
            self.close()
        else:
            self.target._reusable(self)
        if done is not None:
            done(status, output, received, read, server_ms, where)

    def _fail(self) -> None:
        done, self.done = self.done, None
        self.close()
        if done is not None:
            now = time.perf_counter()
            done(errors.INTERNAL, None, now, now)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            if self.unsent:
                self.loop.remove_writer(self.sock.fileno())
            self.sock.close()
        self.target._gone(self)


def _complete_reply(buffer: bytearray) -> "tuple[str, bytes | None, bool, float | None, list | None] | None":
    """(status, binary output or None, server closes, the server's own ms or None, ``[device, split]``
    it was computed on or None) once ``buffer`` holds a whole OIP reply."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    length = int(headers.get("content-length", "0"))
    if len(buffer) < end + 4 + length:
        return None
    payload = bytes(buffer[end + 4:end + 4 + length])
    code = int(lines[0].split(" ", 2)[1])
    close = headers.get("connection", "").lower() == "close"
    if code == 200:
        json_length = int(headers.get("inference-header-content-length", len(payload)))
        device = _header_string(payload, _SERVED_BY, json_length)
        where = None if device is None else [device, _header_string(payload, _SPLIT, json_length)]
        return "ok", payload[json_length:], close, _total_ms(payload, json_length), where
    try:
        message = json.loads(payload).get("error", "")
    except ValueError:
        message = payload.decode("utf-8", "replace")
    return error_code_of(str(message)), None, close, None, None


_TOTAL_MS = b'"total_ms":'
_SERVED_BY = b'"served_by":"'
_SPLIT = b'"split":"'


def _header_string(payload: bytes, key: bytes, end: int) -> str | None:
    """edge-agent's string ``parameters`` field ``key`` (as ``b'"name":"'``) from a reply's JSON
    header, found as :func:`_total_ms` finds its number (a device or split name: nothing escaped);
    None when it is not there, or not one string (several rows: a list)."""
    at = payload.find(key, 0, end)
    if at < 0:
        return None
    at += len(key)
    stop = payload.find(b'"', at, end)
    return None if stop < 0 else payload[at:stop].decode("ascii", "replace")


def _total_ms(payload: bytes, end: int) -> float | None:
    """edge-agent's ``parameters.total_ms`` from a reply's JSON header, found without parsing the
    whole header (the generator shares the cores with the server); None when it is not there."""
    at = payload.find(_TOTAL_MS, 0, end)
    if at < 0:
        return None
    at += len(_TOTAL_MS)
    stop = at
    while stop < end and payload[stop] not in b",}":
        stop += 1
    try:
        return float(payload[at:stop])
    except ValueError:
        return None


# --- edge-agent's MQTT wire format ------------------------------------------------------------------

class MqttTarget(_Target):
    """Where and how to play edge-agent's MQTT wire format: requests to
    ``edge/v1/<device>/infer/<model>`` with a response topic and the row index as correlation
    data, QoS ``qos`` both ways, from ``procs`` generator processes (None: as many as
    :data:`edge_lab.bench.mqttload.DEFAULT_PROCS` says). The replay itself is
    :func:`edge_lab.bench.mqttload.replay_mqtt`."""

    def __init__(self, host: str, port: int, device: str, frames: Frames, *, procs: int | None = None,
                 qos: int = 1, pool: str | None = None) -> None:
        self.host, self.port, self.device, self.frames = host, port, device, frames
        self.procs, self.qos = procs, qos
        self.pool = pool        # requests to edge/v1/pool/<pool>/infer/<model>: any board of the group
        self._bodies = {}

    def encode(self, model: str, slo_ms: float, priority: int, frame_index: int) -> bytes:
        from agent.intake import msgpack_codec as wire
        input_name, _, frames, _ = self.frames.inputs[model]
        return wire.encode_request(f"{frame_index}", {input_name: frames[frame_index]}, slo_ms=slo_ms,
                                   priority=priority or None)


# --- the replay -------------------------------------------------------------------------------------

def replay(target: "HttpTarget | MqttTarget", trace: Sequence[TraceRow], frames: Frames, *,
           drain_s: float = 3.0) -> Replay:
    """Send every row at its time through ``target``, wait for replies until ``drain_s`` after the
    last deadline, and return one record per row (``unanswered`` where no reply came)."""
    if isinstance(target, MqttTarget):
        from edge_lab.bench.mqttload import replay_mqtt
        return replay_mqtt(target, trace, frames, drain_s=drain_s)
    target.prepare(trace)
    return asyncio.run(_replay(target, trace, frames, drain_s))


async def _replay(target, trace: Sequence[TraceRow], frames: Frames, drain_s: float) -> Replay:
    records = [RequestRecord(i, row.app, row.model, row.t_s, row.slo_ms, row.priority, "unanswered")
               for i, row in enumerate(trace)]
    read_s: list[float | None] = [None] * len(trace)
    server_ms: list[float | None] = [None] * len(trace)
    where: list[list | None] = [None] * len(trace)
    served_by: dict[str, int] = {}
    lags: list[float] = []
    read_lags: list[float] = []
    frame_count = {m: len(v[2]) for m, v in frames.inputs.items()}
    labels = {m: v[3] for m, v in frames.inputs.items()}
    loop = asyncio.get_running_loop()
    all_answered = loop.create_future()
    counts = {"waiting": len(trace), "wrong": 0, "checked": 0}
    sampler = CpuSampler().start()
    cpu0 = time.process_time()
    start = time.perf_counter()

    def answered(i: int, k: int, status: str, output: bytes | None, received: float, read: float,
                 own_ms: float | None = None, computed: list | None = None) -> None:
        record = records[i]
        if record.status != "unanswered" or all_answered.done():
            return                        # a late second call, or after the drain: not counted
        record.finish_s = received - start
        record.status = status
        read_s[i] = read - start
        server_ms[i] = own_ms
        where[i] = computed
        if computed is not None:
            served_by[computed[0]] = served_by.get(computed[0], 0) + 1
        read_lags.append(read - received)
        if status == "ok" and output:
            logits = np.frombuffer(output[-40:], dtype=np.float32)
            counts["checked"] += 1
            counts["wrong"] += int(np.argmax(logits)) != int(labels[record.model][k])
        counts["waiting"] -= 1
        if not counts["waiting"]:
            all_answered.set_result(None)

    for i, row in enumerate(trace):
        delay = start + row.t_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent = time.perf_counter() - start
        lags.append(sent - row.t_s)
        records[i].arrival_s = sent
        k = i % frame_count[row.model]
        try:
            target.send(row, k, functools.partial(answered, i, k))
        except (OSError, ValueError):
            now = time.perf_counter()
            answered(i, k, errors.INTERNAL, None, now, now)
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - start
    last_deadline = max((row.t_s + row.slo_ms / 1000.0 for row in trace), default=0.0)
    remaining = start + last_deadline + drain_s - time.perf_counter()
    if trace and not all_answered.done():
        try:
            await asyncio.wait_for(asyncio.shield(all_answered), timeout=max(0.0, remaining))
        except asyncio.TimeoutError:
            all_answered.cancel()         # what is still out stays unanswered
    for record in records:
        if record.status == "unanswered":
            record.finish_s = None
    await target.close()
    peak = sampler.stop()
    lag_ms = [1000.0 * lag for lag in lags]
    span = max((row.t_s for row in trace), default=0.0) or 1e-9
    load = GeneratorLoad(len(trace), spread_ms(lag_ms), cpu_s, wall_s,
                         max(peak, cpu_s / wall_s if wall_s > 0 else 0.0))
    return Replay(records, span, spread_ms(lag_ms), counts["wrong"], counts["checked"],
                  spread_ms([1000.0 * lag for lag in read_lags]), read_s, [load.as_dict()], server_ms,
                  served_by, where)


__all__ = ["Frames", "HttpTarget", "MqttTarget", "Replay", "error_code_of", "oip_body", "replay"]
