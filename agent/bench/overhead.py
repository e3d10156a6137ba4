"""The agent's own cost per request at batch 1: submit to reply, minus the backend's run time.

Requests go one at a time (closed loop), so every one runs alone as a batch of 1 and the figure is the
agent's overhead (validation, queueing, thread hand-offs, batch assembly, reply), not queueing delay.
In process it is ``Agent.submit(...).result()``; over MQTT it is a loopback round trip through a real
Mosquitto broker (wire encoding, broker hops and paho on both sides included).
"""
from __future__ import annotations

import time

import numpy as np

from agent.config import parse_config, CONFIG_VERSION

OVERHEAD_MODEL = "mobilenet_digits"


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


def bench_overhead_inprocess(n: int = 2000, warmup: int = 200) -> dict:
    from agent.api import Agent
    frame = _frame()
    totals, computes = [], []
    with Agent(parse_config(_config(None))) as agent:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            result = agent.submit(OVERHEAD_MODEL, {"frames": frame}, slo_ms=1000).result()
            t1 = time.perf_counter()
            if i >= warmup:
                totals.append(t1 - t0)
                computes.append(result.compute_ms / 1000)
    totals, computes = np.array(totals), np.array(computes)
    overhead = totals - computes
    return {"n": n, "median_total_us": 1e6 * float(np.median(totals)),
            "median_backend_us": 1e6 * float(np.median(computes)),
            "median_overhead_us": 1e6 * float(np.median(overhead)),
            "p99_overhead_us": 1e6 * float(np.percentile(overhead, 99))}


def bench_overhead_mqtt(n: int = 1000, warmup: int = 100) -> dict:
    from agent.broker import LocalBroker
    from agent.client import InferenceClient
    from agent.service import Service
    frame = _frame()
    totals, computes = [], []
    with LocalBroker() as broker, Service(parse_config(_config(broker.port))) as service:
        client = InferenceClient(broker.host, broker.port, service.config.device, "bench-client")
        try:
            for i in range(warmup + n):
                t0 = time.perf_counter()
                reply = client.infer(OVERHEAD_MODEL, {"frames": frame}, slo_ms=1000)
                t1 = time.perf_counter()
                if reply["status"] != "ok":
                    raise RuntimeError(f"overhead bench got an error reply: {reply.get('error')}")
                if i >= warmup:
                    totals.append(t1 - t0)
                    computes.append(reply["timing"]["compute_ms"] / 1000)
        finally:
            client.close()
    totals, computes = np.array(totals), np.array(computes)
    overhead = totals - computes
    return {"n": n, "median_total_us": 1e6 * float(np.median(totals)),
            "median_backend_us": 1e6 * float(np.median(computes)),
            "median_overhead_us": 1e6 * float(np.median(overhead)),
            "p99_overhead_us": 1e6 * float(np.percentile(overhead, 99))}


def format_overhead(inprocess: dict, mqtt: dict | None) -> str:
    lines = ["per-request overhead at batch 1 (submit to reply minus the backend's own run time; target: in-process median < 50 us)",
             f"{'path':<22} {'n':>6} {'total med us':>13} {'backend med us':>15} {'overhead med us':>16} {'overhead p99 us':>16}"]
    for name, r in (("in-process", inprocess), ("MQTT loopback", mqtt)):
        if r is None:
            continue
        lines.append(f"{name:<22} {r['n']:>6} {r['median_total_us']:>13.1f} {r['median_backend_us']:>15.1f} "
                     f"{r['median_overhead_us']:>16.1f} {r['p99_overhead_us']:>16.1f}")
    return "\n".join(lines)
