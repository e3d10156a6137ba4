"""``edge-agent demo``: the embedded default, end to end on this machine.

A real Mosquitto broker on a free loopback port, the agent serving both demo models over it, and
groups of simulated cameras that publish real digit frames (the shipped test set) at their own
rates with tight and loose SLOs. The cameras run in a process of their own, as applications would:
their MQTT clients do not share the agent's interpreter. Every second a table shows, per camera
group, what it sent, what came back within its SLO, latency percentiles, the batch sizes the agent
formed and the share of frames classified correctly; below it, the agent's own figures per model.
"""
from __future__ import annotations

import dataclasses
import math
import multiprocessing
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from agent.client import InferenceClient
from agent.config import Config
from agent.models.digits import frames_from_digits, load_test_set
from agent.service import Service
from edge_lab.broker import LocalBroker, MosquittoNotFound


@dataclass
class Camera:
    name: str
    model: str
    fps: float
    slo_ms: float


#: How often the display loop looks at ``stop`` between camera snapshots (seconds).
STOP_POLL_S = 0.2

# Each row is a group of cameras multiplexed on one MQTT client. The rates are the groups' shares of
# the demo's traffic, not fixed frame rates: at start the demo scales them to what this board
# measured (size_cameras), so a board slower than the development machine is not overloaded at
# --load 1 and a faster one is not left idle.
DEFAULT_CAMERAS = (
    Camera("door", "mobilenet_digits", fps=300, slo_ms=25),
    Camera("lobby", "mobilenet_digits", fps=150, slo_ms=10),
    Camera("yard", "resnet_digits", fps=200, slo_ms=100),
    Camera("gate", "resnet_digits", fps=100, slo_ms=30),
)

#: The share of the measured capacity that ``--load 1`` offers. The rest is for what shares the cores
#: with the models and the capacity leaves out: the broker, the cameras' own process, the intake.
LOAD_SHARE = 0.5
#: A camera group's SLO is raised to at least this many times its model's batch-1 time, plus the
#: slowest model's batch-1 time (a running batch is not preempted: a frame may arrive just after one
#: started), so that a slow board's tightest class is one it can meet at all (said at start).
MIN_SLO_OVER_B1 = 5.0


@dataclass(frozen=True)
class DemoSizing:
    """The cameras sized to this board, and the figures they were sized from."""

    cameras: tuple[Camera, ...]
    capacity_fps: float              # frames/s of the demo's mix the execution slots compute at batch 1
    slots: int
    per_frame_ms: dict[str, float]   # batch-1 time per model, as measured at start
    load: float
    share: float

    def describe(self) -> str:
        offered = sum(c.fps for c in self.cameras)
        costs = ", ".join(f"{name} {ms:.2f} ms" for name, ms in self.per_frame_ms.items())
        rates = ", ".join(f"{c.name} {c.fps:.0f}/s (SLO {c.slo_ms:g} ms)" for c in self.cameras)
        return (f"capacity: {self.capacity_fps:.0f} frames/s of the demo's mix on {self.slots} execution slot(s) "
                f"(batch-1 time per frame: {costs})\n"
                f"--load {self.load:g} offers {100 * self.share * self.load:.0f}% of it ({self.share:.0%} per unit "
                f"of load): {offered:.0f} frames/s: {rates}")


def slo_floor_ms(own_b1_s: float, blocking_s: float) -> float:
    """The least SLO a camera group gets: ``MIN_SLO_OVER_B1`` times its own batch-1 time plus the
    slowest batch-1 time it may find running, in whole milliseconds."""
    return float(math.ceil(1000 * (MIN_SLO_OVER_B1 * own_b1_s + blocking_s)))


def size_cameras(per_frame_s: dict[str, float], slots: int, load: float = 1.0,
                 cameras: tuple[Camera, ...] = DEFAULT_CAMERAS, share: float = LOAD_SHARE) -> DemoSizing:
    """Scale the cameras' rates so ``load`` 1 asks ``share`` of what ``slots`` execution slots can
    compute of the cameras' mix, each frame costing its model's batch-1 time (``per_frame_s``).

    Batch 1 is the conservative figure: on a CPU a batch costs about its items' single runs, and
    where batching pays (a GPU) it only adds headroom. Each group keeps its share of the traffic."""
    if slots < 1 or load <= 0:
        raise ValueError(f"slots = {slots}, load = {load}: expected slots >= 1 and load > 0")
    weight = sum(c.fps for c in cameras)
    # Seconds of compute one frame of the mix costs, on average.
    mix_cost_s = sum(c.fps / weight * per_frame_s[c.model] for c in cameras)
    capacity = slots / mix_cost_s
    scale = share * load * capacity / weight
    blocking_s = max(per_frame_s[c.model] for c in cameras)
    sized = tuple(Camera(c.name, c.model, c.fps * scale,
                         max(c.slo_ms, slo_floor_ms(per_frame_s[c.model], blocking_s)))
                  for c in cameras)
    return DemoSizing(sized, capacity, slots, {m: 1000 * t for m, t in per_frame_s.items()}, load, share)


@dataclass
class CameraStats:
    sent: int = 0
    ok: int = 0                 # replied "ok" (the agent met the deadline by its clock)
    within_slo: int = 0         # ok, and the client-side round trip was within the SLO
    correct: int = 0
    errors: dict = field(default_factory=dict)
    rtt_ms: list = field(default_factory=list)
    batch_sum: int = 0


class CameraThread(threading.Thread):
    """Publishes frames at ``fps`` with a little jitter (open loop: a slow reply never delays a frame)."""

    def __init__(self, camera: Camera, host: str, port: int, device: str, frames: np.ndarray, labels: np.ndarray,
                 stop: threading.Event, seed: int) -> None:
        super().__init__(name=camera.name, daemon=True)
        self.camera = camera
        self.stats = CameraStats()
        self.lock = threading.Lock()
        self.frames, self.labels = frames, labels
        self.stop_event = stop
        self.rng = random.Random(seed)
        self.client = InferenceClient(host, port, device, f"demo-{camera.name}")

    def run(self) -> None:
        period = 1.0 / self.camera.fps
        next_send = time.perf_counter()
        i = self.rng.randrange(len(self.frames))
        while not self.stop_event.is_set():
            label = int(self.labels[i])
            self.client.send(self.camera.model, {"frames": self.frames[i]},
                             lambda reply, rtt, label=label: self._on_reply(reply, rtt, label),
                             slo_ms=self.camera.slo_ms)
            with self.lock:
                self.stats.sent += 1
            i = (i + 1) % len(self.frames)
            next_send += period * self.rng.uniform(0.8, 1.2)
            delay = next_send - time.perf_counter()
            if delay > 0:
                self.stop_event.wait(delay)
            else:
                next_send = time.perf_counter()

    def _on_reply(self, reply: dict, rtt: float, label: int) -> None:
        with self.lock:
            stats = self.stats
            if reply.get("status") == "ok":
                stats.ok += 1
                stats.rtt_ms.append(1000 * rtt)
                stats.batch_sum += reply.get("batch_size", 1)
                if 1000 * rtt <= self.camera.slo_ms:
                    stats.within_slo += 1
                if int(np.argmax(reply["outputs"]["logits"])) == label:
                    stats.correct += 1
            else:
                code = reply.get("error", {}).get("code", "?")
                stats.errors[code] = stats.errors.get(code, 0) + 1

    def snapshot(self) -> dict:
        with self.lock:
            s = self.stats
            rtt = np.array(s.rtt_ms[-2000:]) if s.rtt_ms else None
            return {"name": self.camera.name, "model": self.camera.model, "slo_ms": self.camera.slo_ms,
                    "sent": s.sent, "ok": s.ok, "within_slo": s.within_slo, "correct": s.correct,
                    "errors": dict(s.errors), "batch_sum": s.batch_sum,
                    "p50_ms": None if rtt is None else float(np.percentile(rtt, 50)),
                    "p99_ms": None if rtt is None else float(np.percentile(rtt, 99)),
                    "unanswered": self.client.outstanding()}


def _camera_process(cameras: list[Camera], host: str, port: int, device: str, pipe, interval_s: float) -> None:
    """The applications' side, in its own process: run the cameras, report a snapshot every
    ``interval_s``; on "stop", stop sending, wait (3 s at most) for outstanding replies, report last."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle
    images, labels = load_test_set()
    frames = frames_from_digits(images)
    stop = threading.Event()
    threads = [CameraThread(cam, host, port, device, frames, labels, stop, seed=k) for k, cam in enumerate(cameras)]
    for thread in threads:
        thread.start()
    while not pipe.poll(interval_s):
        pipe.send(("tick", [t.snapshot() for t in threads]))
    pipe.recv()
    stop.set()
    for thread in threads:
        thread.join(timeout=2.0)
    deadline = time.perf_counter() + 3.0
    while any(t.client.outstanding() for t in threads) and time.perf_counter() < deadline:
        time.sleep(0.05)
    pipe.send(("final", [t.snapshot() for t in threads]))
    for thread in threads:
        thread.client.close()


def _num(value: float | None, width: int, digits: int = 2) -> str:
    return "-".rjust(width) if value is None else f"{value:>{width}.{digits}f}"


def format_cameras(snapshots: list[dict], previous: dict[str, dict], elapsed: float, interval: float) -> str:
    head = (f"{'cameras':<8} {'model':<17} {'SLO':>5} {'sent/s':>7} {'ok/s':>6} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'in SLO':>7} {'batch':>5} {'acc':>6}  errors")
    lines = [f"edge-agent demo: {elapsed:6.1f} s  (Ctrl-C to stop)", head, "-" * len(head)]
    for s in snapshots:
        before = previous.get(s["name"], {"sent": 0, "ok": 0})
        answered = s["ok"] + sum(s["errors"].values())
        lines.append(
            f"{s['name']:<8} {s['model']:<17} {s['slo_ms']:>5.0f} {(s['sent'] - before['sent']) / interval:>7.1f} "
            f"{(s['ok'] - before['ok']) / interval:>6.1f} {_num(s['p50_ms'], 7)} {_num(s['p99_ms'], 7)} "
            f"{_num(100.0 * s['within_slo'] / answered if answered else None, 6, 1)}% "
            f"{_num(s['batch_sum'] / s['ok'] if s['ok'] else None, 5, 1)} "
            f"{_num(100.0 * s['correct'] / s['ok'] if s['ok'] else None, 5, 1)}%  "
            + (", ".join(f"{k}={v}" for k, v in sorted(s["errors"].items())) or "-"))
    return "\n".join(lines)


def format_models(snapshot: dict) -> str:
    """Per model, as the agent sees it: its own latency (arrival to reply), SLO attainment, batching."""
    head = f"{'model (agent side)':<26} {'ok':>7} {'p50 ms':>7} {'p99 ms':>7} {'in SLO':>7} {'batch':>6}  errors"
    lines = [head, "-" * len(head)]
    for name, s in snapshot.items():
        attainment = None if s["slo_attainment"] is None else 100 * s["slo_attainment"]
        lines.append(f"{name:<26} {s['ok']:>7} {_num(s['p50_ms'], 7)} {_num(s['p99_ms'], 7)} {_num(attainment, 6, 1)}% "
                     f"{s['mean_batch']:>6.2f}  " + (", ".join(f"{k}={v}" for k, v in sorted(s["errors"].items())) or "-"))
    return "\n".join(lines)


def run_demo(duration_s: float | None = None, load: float = 1.0, interval_s: float = 1.0, out=sys.stdout,
             shed: bool = True, stop: Callable[[], bool] | None = None) -> dict:
    """Run the demo until Ctrl-C, ``stop()`` says so, or ``duration_s``; returns the final figures
    per camera group.

    ``stop`` is polled a few times a second: the command line's signal handlers only record the
    signal, and this loop acts on it (a handler that raised could land inside a lock of the
    shutdown itself). ``shed=False`` computes requests that can no longer make their deadline
    instead of answering them at once (the comparison in BENCHMARKS.md)."""
    try:
        broker = LocalBroker()
    except MosquittoNotFound as exc:
        print(f"edge-agent demo needs the Mosquitto broker: {exc}", file=sys.stderr)
        raise SystemExit(2)
    tty = out.isatty() if hasattr(out, "isatty") else False
    with broker:
        config = Config.demo(mqtt_port=broker.port)
        if not shed:
            config = dataclasses.replace(config, models=tuple(
                dataclasses.replace(m, batching=dataclasses.replace(m.batching, shed_hopeless=False))
                for m in config.models))
        print(f"broker: mosquitto on {broker.host}:{broker.port}; loading and profiling the demo models ...", file=out)
        service = Service(config)
        final: list[dict] = []
        try:
            for name, m in service.agent.models.items():
                table = ", ".join(f"b{b}={1000 * t:.2f}ms" for b, t in zip(m.latency.batch_sizes, m.latency.latencies_s))
                print(f"  {name}: {m.config.backend} x{m.config.instances}, {m.rule.describe()['name']}; "
                      f"measured {table}", file=out, flush=True)
            sizing = size_cameras({name: float(m.latency.predict(1)) for name, m in service.agent.models.items()},
                                  slots=min(config.worker_count, sum(m.instances for m in config.models)), load=load)
            cameras = list(sizing.cameras)
            print(sizing.describe(), file=out, flush=True)
            for before, after in zip(DEFAULT_CAMERAS, cameras):
                if after.slo_ms > before.slo_ms:
                    print(f"  {after.name}: SLO raised from {before.slo_ms:g} to {after.slo_ms:g} ms "
                          f"({MIN_SLO_OVER_B1:g}x {after.model}'s batch-1 time on this board, plus the slowest "
                          "model's, which may be running when a frame arrives)", file=out, flush=True)
            parent_end, child_end = multiprocessing.get_context("spawn").Pipe()
            process = multiprocessing.get_context("spawn").Process(
                target=_camera_process, args=(cameras, broker.host, broker.port, config.device, child_end, interval_s),
                name="demo-cameras", daemon=True)
            process.start()
            started = time.perf_counter()
            previous: dict[str, dict] = {}
            try:
                while ((duration_s is None or time.perf_counter() - started < duration_s)
                       and not (stop is not None and stop())):
                    if not parent_end.poll(STOP_POLL_S):
                        if not process.is_alive():
                            if process.exitcode is not None and process.exitcode < 0:
                                # killed by a signal: a SIGTERM to the whole process group (timeout,
                                # a service manager) reaches the cameras as it reaches us; stop as asked
                                time.sleep(STOP_POLL_S)
                                if stop is not None and stop():
                                    break
                            raise RuntimeError(f"the demo's camera process exited (code {process.exitcode})")
                        continue
                    _, snapshots = parent_end.recv()
                    text = (format_cameras(snapshots, previous, time.perf_counter() - started, interval_s) + "\n\n"
                            + format_models(service.agent.telemetry.snapshot()))
                    previous = {s["name"]: s for s in snapshots}
                    print(("\033[H\033[J" if tty else "") + text + ("" if tty else "\n"), file=out, flush=True)
                if stop is not None and stop():
                    print("\nstopping: cameras first, then the agent answers what it holds ...", file=out, flush=True)
            except KeyboardInterrupt:
                print("\nstopping: cameras first, then the agent answers what it holds ...", file=out, flush=True)
            parent_end.send("stop")
            while process.is_alive() and parent_end.poll(15.0):   # skip periodic snapshots, up to the final one
                kind, final = parent_end.recv()
                if kind == "final":
                    break
            process.join(timeout=10.0)
        finally:
            service.close()
        elapsed = time.perf_counter() - started
        summary = {s["name"]: s for s in final}
        if summary:
            print(format_cameras(final, {}, elapsed, elapsed), file=out)
        print(format_models(service.agent.telemetry.snapshot()), file=out)
        if summary:
            print("unanswered: " + ", ".join(f"{k}={v['unanswered']}" for k, v in summary.items()), file=out)
        else:
            print("the cameras were stopped by a signal before their last count: the agent's side above", file=out)
        return summary
