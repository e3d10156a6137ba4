"""One open-loop load generator for every server ``edge-agent bench triton`` compares.

Open loop: each request's send time is fixed by the trace before the run; a slow server never
delays a send (every request is its own task, and a new connection is opened when none is idle),
and how late each send went out (send lag) is recorded, so a run whose generator fell behind shows.

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
- :class:`MqttTarget`: edge-agent's MQTT v5 wire format (DESIGN.md), through a real broker.
"""
from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from agent import errors
from agent.workload.records import RequestRecord
from agent.workload.trace import TraceRow


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
    ``"triton"`` and only decides how the SLO is spelled."""

    def __init__(self, host: str, port: int, frames: Frames, flavor: str) -> None:
        if flavor not in ("edge-agent", "triton"):
            raise ValueError(f"flavor = {flavor!r}: expected 'edge-agent' or 'triton'")
        self.host, self.port, self.frames, self.flavor = host, port, frames, flavor
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
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

    async def _connection(self):
        if self._idle:
            return self._idle.pop()
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer

    async def request(self, row: TraceRow, frame_index: int, index: int) -> tuple[str, bytes | None, float]:
        """One request; returns (status, the binary output bytes or None, when the reply arrived)."""
        body = self.body(row, frame_index)
        reader, writer = await self._connection()
        try:
            writer.write(body)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            code = int(lines[0].split(" ", 2)[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            payload = await reader.readexactly(int(headers.get("content-length", "0")))
            received = time.perf_counter()
        except BaseException:
            writer.close()
            raise
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self._idle.append((reader, writer))
        if code == 200:
            json_length = int(headers.get("inference-header-content-length", len(payload)))
            return "ok", payload[json_length:], received
        try:
            message = json.loads(payload).get("error", "")
        except ValueError:
            message = payload.decode("utf-8", "replace")
        return error_code_of(str(message)), None, received

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


# --- edge-agent's MQTT wire format ------------------------------------------------------------------

class MqttTarget(_Target):
    """Publishes to ``edge/v1/<device>/infer/<model>`` with a response topic and the row index as
    correlation data; replies arrive on paho's network thread and complete asyncio futures."""

    def __init__(self, host: str, port: int, device: str, frames: Frames) -> None:
        self.host, self.port, self.device, self.frames = host, port, device, frames
        self._bodies = {}
        self._waiting: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._lock = threading.Lock()
        self._client = None
        self._reply_topic = ""

    def encode(self, model: str, slo_ms: float, priority: int, frame_index: int) -> bytes:
        from agent import wire
        input_name, _, frames, _ = self.frames.inputs[model]
        return wire.encode_request(f"{frame_index}", {input_name: frames[frame_index]}, slo_ms=slo_ms,
                                   priority=priority or None)

    def connect(self) -> None:
        from agent.mqtt import connect, make_client
        self._client = make_client(f"bench-loadgen-{id(self)}")
        self._reply_topic = f"bench/replies/{id(self)}"
        subscribed = threading.Event()
        self._client.on_subscribe = lambda *args: subscribed.set()
        self._client.on_message = self._on_reply
        connect(self._client, self.host, self.port)
        self._client.subscribe(self._reply_topic, qos=0)
        if not subscribed.wait(10):
            raise TimeoutError(f"broker {self.host}:{self.port} did not acknowledge the reply subscription")

    def _on_reply(self, client, userdata, message) -> None:
        from agent import wire
        received = time.perf_counter()
        index = struct.unpack("!Q", message.properties.CorrelationData)[0]
        with self._lock:
            waiting = self._waiting.pop(index, None)
        if waiting is None:
            return
        reply = wire.decode_reply(message.payload)
        if reply.get("status") == "ok":
            outputs = reply.get("outputs") or {}
            result = ("ok", next(iter(outputs.values())).tobytes() if outputs else None, received)
        else:
            result = ((reply.get("error") or {}).get("code", errors.INTERNAL), None, received)
        loop, future = waiting
        loop.call_soon_threadsafe(_set_result, future, result)

    async def request(self, row: TraceRow, frame_index: int, index: int) -> tuple[str, bytes | None, float]:
        """One request; returns (status, the output bytes or None, when the reply arrived)."""
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            self._waiting[index] = (loop, future)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self._reply_topic
        props.CorrelationData = struct.pack("!Q", index)
        self._client.publish(f"edge/v1/{self.device}/infer/{row.model}",
                             self.body(row, frame_index), qos=0, properties=props)
        return await future

    async def close(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()


def _set_result(future: asyncio.Future, result) -> None:
    if not future.done():
        future.set_result(result)


# --- the replay -------------------------------------------------------------------------------------

def replay(target: "HttpTarget | MqttTarget", trace: Sequence[TraceRow], frames: Frames, *,
           drain_s: float = 3.0) -> Replay:
    """Send every row at its time through ``target``, wait for replies until ``drain_s`` after the
    last deadline, and return one record per row (``unanswered`` where no reply came)."""
    target.prepare(trace)
    if isinstance(target, MqttTarget):
        target.connect()
    return asyncio.run(_replay(target, trace, frames, drain_s))


async def _replay(target, trace: Sequence[TraceRow], frames: Frames, drain_s: float) -> Replay:
    records = [RequestRecord(i, row.app, row.model, row.t_s, row.slo_ms, row.priority, "unanswered")
               for i, row in enumerate(trace)]
    lags: list[float] = []
    wrong = checked = 0
    tasks: list[asyncio.Task] = []
    frame_count = {m: len(v[2]) for m, v in frames.inputs.items()}

    async def one(i: int, row: TraceRow, start: float) -> None:
        nonlocal wrong, checked
        k = i % frame_count[row.model]
        try:
            status, output, received = await target.request(row, k, i)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            status, output, received = errors.INTERNAL, None, time.perf_counter()
        record = records[i]
        record.finish_s = received - start
        record.status = status
        if status == "ok" and output:
            logits = np.frombuffer(output[-40:], dtype=np.float32)
            checked += 1
            wrong += int(np.argmax(logits)) != int(frames.inputs[row.model][3][k])

    start = time.perf_counter()
    for i, row in enumerate(trace):
        delay = start + row.t_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent = time.perf_counter() - start
        lags.append(sent - row.t_s)
        records[i].arrival_s = sent
        tasks.append(asyncio.create_task(one(i, row, start)))
    last_deadline = max((row.t_s + row.slo_ms / 1000.0 for row in trace), default=0.0)
    remaining = start + last_deadline + drain_s - time.perf_counter()
    pending = [t for t in tasks if not t.done()]
    if pending:
        _, pending = await asyncio.wait(pending, timeout=max(0.0, remaining))
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    for record in records:
        if record.status == "unanswered":
            record.finish_s = None
    await target.close()
    lag_ms = 1000.0 * np.asarray(lags or [0.0])
    span = max((row.t_s for row in trace), default=0.0) or 1e-9
    return Replay(records, span,
                  {"p50": float(np.percentile(lag_ms, 50)), "p99": float(np.percentile(lag_ms, 99)),
                   "max": float(lag_ms.max())}, wrong, checked)


__all__ = ["Frames", "HttpTarget", "MqttTarget", "Replay", "error_code_of", "oip_body", "replay"]
