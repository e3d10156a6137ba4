"""The MQTT side of ``bench triton``'s load generator, played from one process or several.

Why several may be needed: a paho client in one Python process could not keep up with the agent's
MQTT intake (issue 21): in a burst the replies waited in the generator's socket and were stamped
late, and the row measured the generator. The plain-socket client below keeps up from one process
(:data:`DEFAULT_PROCS`) at the loads the benches play; ``procs`` spawned processes each take every
``procs``-th row of the trace (round robin, so each gets an even share of every burst), each with
its own connection, its own reply topic and the row's index as correlation data. All send on one
schedule: the parent fixes a start time on the system-wide monotonic clock once every process is
connected and subscribed, and each row goes out at ``start + t_s`` as in
:mod:`edge_lab.bench.loadgen`.

Each process's client is :class:`edge_lab.bench.mqttwire.WireClient`, a plain socket speaking the
few MQTT v5 packets a replay needs, every request's PUBLISH built before the run: with paho the
generator's processes used half as much CPU again as the HTTP generator, on the cores the agent and
the broker share (BENCHMARKS.md, fifteenth session). QoS 1 both ways, as the agent and its
application client (``agent.client``) speak it: requests are published at QoS 1 (no window of the
client's own: a burst goes out at its time, not after earlier acknowledgements) and replies
subscribed at QoS 1, each acknowledged.

How busy each generator process was is measured and returned with the replay
(:class:`GeneratorLoad`): its send lag (how late rows went out against the schedule) and its CPU
use (process CPU seconds over the sending window, and the busiest half-second), so a row the
generator limited is told from one the agent limited.

Measured as the HTTP generator measures (:class:`edge_lab.bench.loadgen.HttpTarget`): a request is
written by the sending thread at its send time, and a reply is stamped with the kernel's receive
time of the read that completed it (``SO_TIMESTAMPNS``), not when the process's reader got round to
it on cores shared with the server; how far the reads lagged those stamps is reported as the read
lag. A reply that has not come when the replay ends (``drain_s`` after the last deadline) stays
``unanswered``: lost, and counted.
"""
from __future__ import annotations

import multiprocessing
import os
import struct
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from agent import errors
from agent.transport.topics import infer_topic, pool_infer_topic
from agent.workload.records import RequestRecord
from agent.workload.trace import TraceRow

#: How often a generator process samples its own CPU time, for its busiest window (seconds).
CPU_WINDOW_S = 0.5


@dataclass(frozen=True)
class GeneratorLoad:
    """How hard one generator process worked over a replay."""

    rows: int                       # rows this process sent
    send_lag_ms: dict[str, float]   # p50 / p99 / max of how late its sends went out
    cpu_s: float                    # its CPU seconds (every thread) from the start to its last send
    wall_s: float                   # wall seconds of the same window
    cpu_peak: float                 # its busiest CPU_WINDOW_S window, in cores (1.0: one core flat out)

    @property
    def cpu_share(self) -> float:
        """Mean CPU use over the sending window, in cores."""
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "cpu_share": self.cpu_share}


class CpuSampler:
    """The busiest :data:`CPU_WINDOW_S` window of this process's CPU use, sampled on a thread."""

    def __init__(self, window_s: float = CPU_WINDOW_S) -> None:
        self.window_s = window_s
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def start(self) -> "CpuSampler":
        self._thread.start()
        return self

    def _run(self) -> None:
        cpu, wall = time.process_time(), time.monotonic()
        while not self._stop.wait(self.window_s):
            cpu2, wall2 = time.process_time(), time.monotonic()
            if wall2 > wall:
                self.peak = max(self.peak, (cpu2 - cpu) / (wall2 - wall))
            cpu, wall = cpu2, wall2

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def spread_ms(values_ms: Sequence[float]) -> dict[str, float]:
    """p50 / p99 / max of some milliseconds (zeros when there are none)."""
    values = np.asarray(values_ms if len(values_ms) else [0.0], dtype=float)
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)),
            "max": float(values.max())}


#: Generator processes when none is asked for: one, as the HTTP generator has. The client is a plain
#: socket (:mod:`edge_lab.bench.mqttwire`) that costs a process what the HTTP generator costs; a
#: second process only added its wake-ups, at a higher priority than the agent's workers, to the
#: cores the server shares (BENCHMARKS.md, nineteenth session). A load one process cannot play
#: shows in its send lag and CPU (:class:`GeneratorLoad`): then ask for more.
DEFAULT_PROCS = 1


# --- one generator process --------------------------------------------------------------------------

@dataclass(frozen=True)
class _Share:
    """What one generator process needs: its rows and every request body it may send."""

    host: str
    port: int
    device: str
    name: str                                   # its client id and reply topic
    rows: list[tuple[int, float, str, int]]     # (trace index, send time, model, body key)
    bodies: list[bytes]                         # body key -> the request's bytes
    labels: dict[str, list[int]]                # model -> label of each frame
    frame_of: list[int]                         # body key -> frame index
    deadline_s: float                           # when to stop waiting for replies, from the start
    qos: int
    pool: str | None = None                     # requests to the group's pool topic, not the device's


def _generator_main(share: _Share, pipe) -> None:
    """A spawned generator process: connect, say ready, wait for the start time, send every row
    at its time, collect replies until all came or the deadline, send back what happened."""
    try:
        result = _generate(share, pipe)
    except BaseException:
        pipe.send(("error", traceback.format_exc()))
        return
    pipe.send(("done", result))


def _generate(share: _Share, pipe) -> dict:
    from agent.intake import msgpack_codec as wire
    from edge_lab.bench.mqttwire import WireClient, publish_packet

    count = len(share.rows)
    slot = {index: k for k, (index, _, _, _) in enumerate(share.rows)}
    status: list[str] = ["unanswered"] * count
    finish: list[float | None] = [None] * count
    read: list[float | None] = [None] * count
    own_ms: list[float | None] = [None] * count
    sent_at = [0.0] * count
    tally = {"waiting": count, "wrong": 0, "checked": 0}
    served_by: dict[str, int] = {}               # replies by the board that sent them (served_by.device)
    lock = threading.Lock()
    all_answered = threading.Event()
    state = {"start": None, "over": False}

    def on_reply(correlation: bytes | None, payload: bytes, received: float, read_at: float) -> None:
        try:
            k = slot.get(struct.unpack("!Q", correlation)[0])
        except (TypeError, struct.error):
            return                               # not one of ours
        if k is None or state["start"] is None:
            return
        try:
            reply = wire.decode_reply(payload)
            code = "ok" if reply.get("status") == "ok" else (reply.get("error") or {}).get("code", errors.INTERNAL)
            outputs = reply.get("outputs") or {}
            total = (reply.get("timing") or {}).get("total_ms")
            board = str((reply.get("served_by") or {}).get("device"))
        except Exception:                        # an undecodable reply is the server's error
            code, outputs, total, board = errors.INTERNAL, {}, None, "None"
        with lock:
            if state["over"] or status[k] != "unanswered":
                return                           # after the replay, or a second reply: not counted
            status[k] = code
            finish[k] = received - state["start"]
            read[k] = read_at - state["start"]
            own_ms[k] = float(total) if isinstance(total, (int, float)) else None
            served_by[board] = served_by.get(board, 0) + 1
            if code == "ok" and outputs:
                _, model, key = share.rows[k][1:]
                logits = np.asarray(next(iter(outputs.values()))).reshape(-1)
                tally["checked"] += 1
                tally["wrong"] += int(np.argmax(logits)) != share.labels[model][share.frame_of[key]]
            tally["waiting"] -= 1
            if not tally["waiting"]:
                all_answered.set()

    reply_topic = f"bench/replies/{share.name}"
    topics = {model: pool_infer_topic(share.pool, model) if share.pool else infer_topic(share.device, model)
              for _, _, model, _ in share.rows}
    # Every request's bytes before the run, as the HTTP generator builds its bodies: at its send
    # time a row costs one write.
    packets = [publish_packet(topics[model], share.bodies[key], qos=share.qos, packet_id=k % 65535 + 1,
                              response_topic=reply_topic, correlation=struct.pack("!Q", index))
               for k, (index, _, model, key) in enumerate(share.rows)]
    client = WireClient(share.host, share.port, share.name, on_reply)
    try:
        client.connect()
        client.subscribe(reply_topic, share.qos)
        pipe.send(("ready", None))
        start = pipe.recv()
        sampler = CpuSampler()
        delay = start - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        state["start"] = start
        sampler.start()
        cpu0, wall0 = time.process_time(), time.monotonic()
        for k, (_, t_s, _, _) in enumerate(share.rows):
            delay = start + t_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sent_at[k] = time.monotonic() - start
            client.write(packets[k])
        cpu_s, wall_s = time.process_time() - cpu0, time.monotonic() - wall0
        all_answered.wait(max(0.0, start + share.deadline_s - time.monotonic()))
        with lock:
            state["over"] = True
        peak = sampler.stop()
        if client.error is not None:
            raise client.error
    finally:
        client.close()
    lags = [1000.0 * (sent_at[k] - share.rows[k][1]) for k in range(count)]
    load = GeneratorLoad(count, spread_ms(lags), cpu_s, wall_s, max(peak, cpu_s / wall_s if wall_s > 0 else 0.0))
    return {"index": [r[0] for r in share.rows], "sent": sent_at, "status": status, "finish": finish, "read": read,
            "own_ms": own_ms, "wrong": tally["wrong"], "checked": tally["checked"], "lags_ms": lags, "load": load.as_dict(),
            "served_by": served_by}


# --- the replay across processes --------------------------------------------------------------------

def replay_mqtt(target, trace: Sequence[TraceRow], frames, *, drain_s: float = 3.0,
                start_timeout_s: float = 60.0):
    """Play ``trace`` through ``target`` (a :class:`~edge_lab.bench.loadgen.MqttTarget`: the
    broker, the device, QoS, how many generator processes) and wait for replies until ``drain_s``
    after the last deadline. Returns a :class:`~edge_lab.bench.loadgen.Replay` whose
    ``generators`` holds each process's :class:`GeneratorLoad` (as a dict). Replies are timed by
    the kernel's receive stamp; ``read_s`` is when the generator read each one, and the read lag
    how much later that was."""
    from edge_lab.bench.loadgen import Replay
    host, port, device, qos = target.host, target.port, target.device, target.qos
    procs = DEFAULT_PROCS if target.procs is None else int(target.procs)
    if procs < 1:
        raise ValueError(f"procs = {procs!r}: expected 1 or more generator processes")
    if qos not in (0, 1):
        raise ValueError(f"qos = {qos!r}: expected 0 or 1")
    procs = max(1, min(procs, len(trace))) if trace else 1
    encoder = target
    keys: dict[tuple[str, float, int, int], int] = {}
    bodies: list[bytes] = []
    frame_of: list[int] = []
    frame_count = {m: len(v[2]) for m, v in frames.inputs.items()}
    rows = []
    for i, row in enumerate(trace):
        k = i % frame_count[row.model]           # the frame loadgen.replay would send
        key = (row.model, row.slo_ms, row.priority, k)
        if key not in keys:
            keys[key] = len(bodies)
            bodies.append(encoder.encode(*key))
            frame_of.append(k)
        rows.append((i, row.t_s, row.model, keys[key]))
    labels = {m: [int(x) for x in v[3]] for m, v in frames.inputs.items()}
    last_deadline = max((row.t_s + row.slo_ms / 1000.0 for row in trace), default=0.0)
    tag = f"bench-mqtt-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    context = multiprocessing.get_context("spawn")
    workers = []
    try:
        for p in range(procs):
            mine = rows[p::procs]
            used = sorted({key for *_, key in mine})
            remap = {key: j for j, key in enumerate(used)}
            share = _Share(host, port, device, f"{tag}-{p}", [(i, t, m, remap[key]) for i, t, m, key in mine],
                           [bodies[key] for key in used], labels, [frame_of[key] for key in used],
                           last_deadline + drain_s, qos, getattr(target, "pool", None))
            parent_end, child_end = context.Pipe()
            process = context.Process(target=_generator_main, args=(share, child_end), name=f"{tag}-{p}", daemon=True)
            process.start()
            child_end.close()
            workers.append((process, parent_end))
        for p, (process, pipe) in enumerate(workers):
            _expect(pipe, process, "ready", start_timeout_s, p)
        start = time.monotonic() + 0.2           # every process asleep until then, on one clock
        for _, pipe in workers:
            pipe.send(start)
        wait_s = last_deadline + drain_s + start_timeout_s
        results = [_expect(pipe, process, "done", wait_s, p) for p, (process, pipe) in enumerate(workers)]
    finally:
        for process, pipe in workers:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)
            pipe.close()
    records = [RequestRecord(i, row.app, row.model, row.t_s, row.slo_ms, row.priority, "unanswered")
               for i, row in enumerate(trace)]
    lags: list[float] = []
    server_ms: list[float | None] = [None] * len(trace)
    read_s: list[float | None] = [None] * len(trace)
    read_lags: list[float] = []
    wrong = checked = 0
    for result in results:
        for index, sent, status, finish, read, own in zip(result["index"], result["sent"], result["status"],
                                                          result["finish"], result["read"], result["own_ms"]):
            records[index].arrival_s = sent
            records[index].status = status
            records[index].finish_s = finish
            read_s[index] = read
            server_ms[index] = own
            if finish is not None and read is not None:
                read_lags.append(1000.0 * (read - finish))
        lags += result["lags_ms"]
        wrong += result["wrong"]
        checked += result["checked"]
    span = max((row.t_s for row in trace), default=0.0) or 1e-9
    served_by: dict[str, int] = {}
    for result in results:
        for board, n in result["served_by"].items():
            served_by[board] = served_by.get(board, 0) + n
    return Replay(records, span, spread_ms(lags), wrong, checked, spread_ms(read_lags),
                  read_s, [r["load"] for r in results], server_ms, served_by)


def _expect(pipe, process, what: str, timeout_s: float, p: int):
    """The next message of generator ``p``, which must be ``what``; its error, or its silence,
    raised as a RuntimeError naming it."""
    deadline = time.monotonic() + timeout_s
    while not pipe.poll(0.5):
        if not process.is_alive():
            raise RuntimeError(f"MQTT generator process {p} exited with code {process.exitcode} "
                               f"before '{what}'")
        if time.monotonic() > deadline:
            raise RuntimeError(f"MQTT generator process {p} sent no '{what}' within {timeout_s:.0f} s")
    kind, value = pipe.recv()
    if kind == "error":
        raise RuntimeError(f"MQTT generator process {p} failed:\n{value}")
    if kind != what:
        raise RuntimeError(f"MQTT generator process {p}: expected '{what}', got '{kind}'")
    return value


__all__ = ["CPU_WINDOW_S", "CpuSampler", "GeneratorLoad", "DEFAULT_PROCS", "replay_mqtt", "spread_ms"]
