"""The agent's own cost per request at batch 1: submit to reply, minus the backend's run time.

Requests go one at a time (closed loop), so each runs alone as a batch of 1 and the figure is the
agent's overhead (validation, queueing, hand-offs, batch assembly, reply), not queueing delay. Rows:

- ``submit``: ``Agent.submit(...).result()``: a worker thread runs the batch (two thread hand-offs);
- ``infer``: ``Agent.infer(...)``: the calling thread runs the batch itself when a slot is free;
- ``infer, no-op model``: the same path with the backend answering from a preallocated output, so
  the figure is the agent's code alone, with the caches warm (after a real model run, the same code
  runs on caches the model has flushed, which costs tens of microseconds more on this machine);
- ``MQTT loopback``: a round trip through a real Mosquitto broker (wire codec, broker, paho both sides).

Beside each real-model row, ``floor``: the same model run on a bare worker thread (Condition in,
Future out), timed interleaved request by request so both see the same machine. On a VM it is mostly
wake-up latency of an idle vCPU, and it moves with the machine's state.
"""
from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Callable

import numpy as np

from agent.config import CONFIG_VERSION, parse_config

OVERHEAD_MODEL = "mobilenet_digits"
TARGET_US = 50.0


def _config(port: int | None) -> dict:
    return {
        "config_version": CONFIG_VERSION,
        "agent": {"device": "bench", "workers": 1},
        "mqtt": {"enabled": port is not None, "port": port or 1883},
        "models": [{"name": OVERHEAD_MODEL, "card": f"demo:{OVERHEAD_MODEL}", "instances": 1,
                    "batching": {"rule": "deadline_aware", "max_batch": 1}}],
    }


def _frame() -> np.ndarray:
    from agent.models.digits import frames_from_digits, load_test_set
    images, _ = load_test_set()
    return frames_from_digits(images[:1])[0]


class HandoffFloor:
    """The least a thread-pool server does: hand the frame to a worker thread, run the model there,
    hand the outputs back. No queue, no batching, no checks."""

    def __init__(self, run: Callable) -> None:
        import threading
        self._run = run
        self._cond = threading.Condition(threading.Lock())
        self._box: list = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._box:
                    self._cond.wait()
                job = self._box.pop()
            if job is None:
                return
            future, inputs = job
            t0 = time.perf_counter()
            outputs = self._run(inputs)
            future.set_result((outputs, time.perf_counter() - t0))

    def overhead(self, inputs) -> float:
        """Round trip minus the model's own run time, in seconds."""
        t0 = time.perf_counter()
        future: Future = Future()
        with self._cond:
            self._box.append((future, inputs))
            self._cond.notify()
        _, compute = future.result()
        return time.perf_counter() - t0 - compute

    def close(self) -> None:
        with self._cond:
            self._box.append(None)
            self._cond.notify()
        self._thread.join()


def _measure(call: Callable[[], float], n: int, warmup: int, floor: HandoffFloor | None, batch: dict) -> dict:
    """``call()`` runs one request and returns the backend's own seconds; interleaved with the floor."""
    totals, computes, floors = [], [], []
    for i in range(warmup + n):
        handoff = floor.overhead(batch) if floor is not None else 0.0
        t0 = time.perf_counter()
        compute = call()
        total = time.perf_counter() - t0
        if i >= warmup:
            totals.append(total)
            computes.append(compute)
            floors.append(handoff)
    totals, computes, floors = np.array(totals), np.array(computes), np.array(floors)
    return {"n": n,
            "median_total_us": 1e6 * float(np.median(totals)),
            "median_backend_us": 1e6 * float(np.median(computes)),
            "median_overhead_us": 1e6 * float(np.median(totals - computes)),
            "p99_overhead_us": 1e6 * float(np.percentile(totals - computes, 99)),
            "median_floor_us": 1e6 * float(np.median(floors)) if floor is not None else None}


def _floor_backend():
    """A second instance of the overhead model, loaded the way the agent loads one."""
    from agent.backends import load_backend
    from agent.models.card import load_card
    card = load_card(f"demo:{OVERHEAD_MODEL}")
    return load_backend("onnxruntime", card.verify_file("onnx"), threads=1)


def bench_overhead_inprocess(n: int = 2000, warmup: int = 200) -> dict[str, dict]:
    """Rows ``submit``, ``infer`` and ``infer, no-op model`` (see the module docstring)."""
    from agent.api import Agent
    frame = _frame()
    inputs, batch = {"frames": frame}, {"frames": frame[None]}
    floor_backend = _floor_backend()
    floor = HandoffFloor(floor_backend.run)
    rows: dict[str, dict] = {}
    try:
        with Agent(parse_config(_config(None))) as agent:
            rows["submit"] = _measure(
                lambda: agent.submit(OVERHEAD_MODEL, inputs, slo_ms=1000).result().compute_ms / 1000,
                n, warmup, floor, batch)
            rows["infer"] = _measure(
                lambda: agent.infer(OVERHEAD_MODEL, inputs, slo_ms=1000).compute_ms / 1000,
                n, warmup, floor, batch)
            backend = agent.models[OVERHEAD_MODEL].backends[0]
            real_run, canned = backend.run, backend.run(batch)
            backend.run = lambda _batch: canned
            try:
                rows["infer, no-op model"] = _measure(
                    lambda: agent.infer(OVERHEAD_MODEL, inputs, slo_ms=1000).compute_ms / 1000,
                    n, warmup, None, batch)
            finally:
                backend.run = real_run
    finally:
        floor.close()
        floor_backend.close()
    return rows


def bench_overhead_mqtt(n: int = 1000, warmup: int = 100) -> dict:
    from agent.client import InferenceClient
    from agent.service import Service
    from edge_lab.broker import LocalBroker
    frame = _frame()
    inputs, batch = {"frames": frame}, {"frames": frame[None]}
    floor_backend = _floor_backend()
    floor = HandoffFloor(floor_backend.run)
    try:
        with LocalBroker() as broker, Service(parse_config(_config(broker.port))) as service:
            client = InferenceClient(broker.host, broker.port, service.config.device, "bench-client")

            def call() -> float:
                reply = client.infer(OVERHEAD_MODEL, inputs, slo_ms=1000)
                if reply["status"] != "ok":
                    raise RuntimeError(f"overhead bench got an error reply: {reply.get('error')}")
                return reply["timing"]["compute_ms"] / 1000

            try:
                return _measure(call, n, warmup, floor, batch)
            finally:
                client.close()
    finally:
        floor.close()
        floor_backend.close()


def format_overhead(rows: dict[str, dict]) -> str:
    lines = ["Per-request overhead at batch 1 (submit to reply minus the backend's own run time), requests one at a time;",
             "floor = the same model on a bare worker thread (two hand-offs, nothing else), interleaved request by request.",
             f"{'path':<22} {'n':>6} {'total us':>9} {'backend us':>11} {'overhead us':>12} {'p99 us':>8} {'floor us':>9}"]
    for name, r in rows.items():
        if r is None:
            continue
        floor = "-" if r["median_floor_us"] is None else f"{r['median_floor_us']:.1f}"
        lines.append(f"{name:<22} {r['n']:>6} {r['median_total_us']:>9.1f} {r['median_backend_us']:>11.1f} "
                     f"{r['median_overhead_us']:>12.1f} {r['p99_overhead_us']:>8.1f} {floor:>9}")
    verdicts = ", ".join(f"{name}: {'met' if r['median_overhead_us'] < TARGET_US else 'NOT met'}"
                         for name, r in rows.items() if r is not None and name != "MQTT loopback")
    lines.append(f"target: in-process median overhead < {TARGET_US:.0f} us: {verdicts}")
    return "\n".join(lines)
