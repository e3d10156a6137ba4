"""``edge-agent demo``: the embedded default, end to end on this machine.

A real Mosquitto broker on a free loopback port, the agent serving both demo models over it, and
simulated cameras that publish real digit frames (the shipped test set) at their own rates with
tight and loose SLOs. Every second a table shows, per camera, what it sent, what came back within
its SLO, latency percentiles and the share of frames classified correctly.
"""
from __future__ import annotations

import random
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from agent.broker import LocalBroker, MosquittoNotFound
from agent.client import InferenceClient
from agent.config import Config
from agent.models.digits import frames_from_digits, load_test_set
from agent.service import Service


@dataclass
class Camera:
    name: str
    model: str
    fps: float
    slo_ms: float


DEFAULT_CAMERAS = (
    Camera("cam-door", "mobilenet_digits", fps=60, slo_ms=25),
    Camera("cam-lobby", "mobilenet_digits", fps=30, slo_ms=10),
    Camera("cam-yard", "resnet_digits", fps=20, slo_ms=100),
    Camera("cam-gate", "resnet_digits", fps=15, slo_ms=30),
)


@dataclass
class CameraStats:
    sent: int = 0
    ok: int = 0                 # replied "ok" (the agent met the SLO by its clock)
    within_slo: int = 0         # ok and the client-side round trip was within the SLO
    correct: int = 0
    errors: dict = field(default_factory=dict)
    rtt_ms: list = field(default_factory=list)
    batch_sum: int = 0
    sent_last: int = 0
    ok_last: int = 0


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
        self.client = InferenceClient(host, port, device, camera.name)

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


def _num(value: float | None, width: int, digits: int = 2) -> str:
    return "-".rjust(width) if value is None else f"{value:>{width}.{digits}f}"


def format_models(snapshot: dict) -> str:
    """Per model, as the agent sees it: its own latency (arrival to reply), SLO attainment, batching."""
    head = f"{'model (agent side)':<28} {'ok':>7} {'p50 ms':>7} {'p99 ms':>7} {'in SLO':>7} {'batch':>6}  errors"
    lines = [head, "-" * len(head)]
    for name, s in snapshot.items():
        attainment = None if s["slo_attainment"] is None else 100 * s["slo_attainment"]
        lines.append(f"{name:<28} {s['ok']:>7} {_num(s['p50_ms'], 7)} {_num(s['p99_ms'], 7)} {_num(attainment, 6, 1)}% "
                     f"{s['mean_batch']:>6.2f}  " + (", ".join(f"{k}={v}" for k, v in sorted(s["errors"].items())) or "-"))
    return "\n".join(lines)


def format_table(cameras: list[CameraThread], elapsed: float, interval: float) -> str:
    head = (f"{'camera':<10} {'model':<17} {'SLO':>5} {'sent/s':>7} {'ok/s':>6} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'in SLO':>7} {'batch':>5} {'acc':>6}  errors")
    lines = [f"edge-agent demo: {elapsed:6.1f} s  (Ctrl-C to stop)", head, "-" * len(head)]
    for cam in cameras:
        with cam.lock:
            s = cam.stats
            sent_rate = (s.sent - s.sent_last) / interval
            ok_rate = (s.ok - s.ok_last) / interval
            s.sent_last, s.ok_last = s.sent, s.ok
            rtt = np.array(s.rtt_ms[-2000:]) if s.rtt_ms else None
            answered = s.ok + sum(s.errors.values())
            lines.append(
                f"{cam.camera.name:<10} {cam.camera.model:<17} {cam.camera.slo_ms:>5.0f} {sent_rate:>7.1f} {ok_rate:>6.1f} "
                f"{_num(None if rtt is None else np.percentile(rtt, 50), 7)} "
                f"{_num(None if rtt is None else np.percentile(rtt, 99), 7)} "
                f"{_num(100.0 * s.within_slo / answered if answered else None, 6, 1)}% "
                f"{_num(s.batch_sum / s.ok if s.ok else None, 5, 1)} "
                f"{_num(100.0 * s.correct / s.ok if s.ok else None, 5, 1)}%  "
                + (", ".join(f"{k}={v}" for k, v in sorted(s.errors.items())) or "-"))
    return "\n".join(lines)


def run_demo(duration_s: float | None = None, load: float = 1.0, interval_s: float = 1.0, out=sys.stdout) -> dict:
    """Run the demo until Ctrl-C (or ``duration_s``); returns the final per-camera figures."""
    images, labels = load_test_set()
    frames = frames_from_digits(images)
    try:
        broker = LocalBroker()
    except MosquittoNotFound as exc:
        print(f"edge-agent demo needs the Mosquitto broker: {exc}", file=sys.stderr)
        raise SystemExit(2)
    stop = threading.Event()
    cameras: list[CameraThread] = []
    with broker:
        config = Config.demo(mqtt_port=broker.port)
        print(f"broker: mosquitto on {broker.host}:{broker.port}; loading and profiling the demo models ...", file=out)
        service = Service(config)
        try:
            for name, m in service.agent.models.items():
                table = ", ".join(f"b{b}={1000 * t:.2f}ms" for b, t in zip(m.latency.batch_sizes, m.latency.latencies_s))
                print(f"  {name}: {m.config.backend} x{m.config.instances}, {m.rule.describe()}; profile {table}", file=out)
            for k, cam in enumerate(DEFAULT_CAMERAS):
                scaled = Camera(cam.name, cam.model, cam.fps * load, cam.slo_ms)
                cameras.append(CameraThread(scaled, broker.host, broker.port, config.device, frames, labels, stop, seed=k))
            for cam in cameras:
                cam.start()
            started = time.perf_counter()
            tty = out.isatty() if hasattr(out, "isatty") else False
            try:
                while duration_s is None or time.perf_counter() - started < duration_s:
                    time.sleep(interval_s if duration_s is None else min(interval_s, max(0.0, duration_s - (time.perf_counter() - started))))
                    table = (format_table(cameras, time.perf_counter() - started, interval_s) + "\n\n"
                             + format_models(service.agent.telemetry.snapshot()))
                    print(("\033[H\033[J" if tty else "") + table + ("" if tty else "\n"), file=out, flush=True)
            except KeyboardInterrupt:
                print("\nstopping: cameras first, then the agent answers what it holds ...", file=out)
            stop.set()
            for cam in cameras:
                cam.join(timeout=2.0)
            deadline = time.perf_counter() + 3.0
            while any(c.client.outstanding() for c in cameras) and time.perf_counter() < deadline:
                time.sleep(0.05)
        finally:
            service.close()
            for cam in cameras:
                cam.client.close()
        summary = {}
        for cam in cameras:
            s = cam.stats
            summary[cam.camera.name] = {
                "model": cam.camera.model, "slo_ms": cam.camera.slo_ms, "sent": s.sent, "ok": s.ok,
                "within_slo": s.within_slo, "correct": s.correct, "errors": dict(s.errors),
                "unanswered": cam.client.outstanding(),
            }
        print(format_table(cameras, time.perf_counter() - started, interval_s), file=out)
        print(format_models(service.agent.telemetry.snapshot()), file=out)
        print("unanswered: " + ", ".join(f"{k}={v['unanswered']}" for k, v in summary.items()), file=out)
        return summary
