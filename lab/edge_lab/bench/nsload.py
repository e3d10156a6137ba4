"""The board's applications for ``bench offload``: a trace replayed over HTTP from inside a namespace.

Why a process of its own: in the two-board lab (:mod:`edge_lab.netlab`) the board's applications
run on the board, beside its agent, and reach it on the board's own loopback; only the offloaded
tensors cross the shaped link. So this runs in the board's network namespace (but not in its CPU
cgroup: the generator's CPU is not the board's compute), waits for the agent's HTTP intake to be
ready, plays its phases (a warm-up, a capacity probe, the measured trace) and writes what happened
to each request as JSON. Every reply is checked against the frame's label (``wrong``), and a request
answered twice is counted (``duplicated``): exactly one reply per request is what offload promises.

Use: ``python -m edge_lab.bench.nsload SPEC.json OUT.json``; the spec holds ``host``, ``port``,
``model``, ``drain_s``, ``ready_timeout_s`` and ``phases``, played in turn, each announced on
stdout (``phase <name>``) as it starts, so the caller can tell warm-up traffic from measured:
``{"name", "kind": "trace", "rows": [[t_s, app, model, slo_ms, priority], ...]}`` (open loop, the
generator of ``bench triton``) or ``{"name", "kind": "closed", "outstanding", "seconds", "slo_ms"}``
(closed loop: ``outstanding`` requests always in flight; the capacity probe).
"""
from __future__ import annotations

import asyncio
import functools
import json
import sys
import time
import urllib.error
import urllib.request
from typing import Sequence

from agent.workload.trace import TraceRow
from edge_lab.bench.loadgen import Frames, HttpTarget, replay

__all__ = ["CountingTarget", "wait_ready", "main"]


class CountingTarget(HttpTarget):
    """:class:`HttpTarget` that counts replies beyond the first to one request (``duplicated``)."""

    duplicated = 0

    def send(self, row, frame_index, done) -> None:   # type: ignore[override]
        calls = [0]

        def counted(*args) -> None:
            calls[0] += 1
            if calls[0] > 1:
                self.duplicated += 1
            done(*args)

        super().send(row, frame_index, counted)


def wait_ready(host: str, port: int, timeout_s: float) -> None:
    """Until ``GET /v2/health/ready`` answers 200; raises TimeoutError naming the address."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return
                last = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.1)
    raise TimeoutError(f"the agent's HTTP intake at {host}:{port} was not ready within {timeout_s:g} s ({last})")


def _rows(raw: Sequence[Sequence]) -> list[TraceRow]:
    return [TraceRow(float(t), str(app), str(model), float(slo), int(prio)) for t, app, model, slo, prio in raw]


async def _closed_loop(target: HttpTarget, row: TraceRow, frames: Frames, outstanding: int, seconds: float) -> dict:
    """Keep ``outstanding`` requests in flight for ``seconds`` (each reply sends the next): the
    most the agent serves, whatever the SLO, without a backlog growing behind it."""
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    count = len(frames.inputs[row.model][2])
    target.prepare([row])
    statuses: dict[str, int] = {}
    state = {"open": 0, "last": 0.0}
    start = time.perf_counter()

    def fire(k: int) -> None:
        state["open"] += 1
        try:
            target.send(row, k % count, functools.partial(done, k))
        except (OSError, ValueError):
            done(k, "internal", None, time.perf_counter(), time.perf_counter())

    def done(k: int, status: str, *rest) -> None:
        state["open"] -= 1
        statuses[status] = statuses.get(status, 0) + 1
        now = time.perf_counter()
        if now - start < seconds:
            fire(k + outstanding)
        else:
            state["last"] = max(state["last"], now)
            if not state["open"] and not finished.done():
                finished.set_result(None)

    for k in range(outstanding):
        fire(k)
    await asyncio.wait_for(finished, timeout=seconds + 60)
    await target.close()
    elapsed = max(state["last"], start + seconds) - start
    return {"statuses": statuses, "seconds": elapsed, "ok_per_s": statuses.get("ok", 0) / elapsed}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m edge_lab.bench.nsload SPEC.json OUT.json", file=sys.stderr)
        return 2
    with open(args[0]) as fh:
        spec = json.load(fh)
    host, port, model = spec["host"], int(spec["port"]), spec["model"]
    wait_ready(host, port, float(spec.get("ready_timeout_s", 60.0)))
    frames = Frames.digits([model])
    results = []
    for phase in spec["phases"]:
        print(f"phase {phase['name']}", flush=True)
        if phase["kind"] == "closed":
            row = TraceRow(0.0, "camera", model, float(phase["slo_ms"]), 0)
            results.append(asyncio.run(_closed_loop(HttpTarget(host, port, frames, "edge-agent"), row, frames,
                                                    int(phase["outstanding"]), float(phase["seconds"]))))
            continue
        target = CountingTarget(host, port, frames, "edge-agent")
        run = replay(target, _rows(phase["rows"]), frames, drain_s=float(spec.get("drain_s", 3.0)))
        where = run.where or [None] * len(run.records)
        results.append({"records": [[r.status, r.arrival_s, r.finish_s, w] for r, w in zip(run.records, where)],
                        "duration_s": run.duration_s, "duplicated": target.duplicated, "wrong": run.wrong,
                        "checked": run.checked, "send_lag_ms": run.send_lag_ms, "generators": run.generators,
                        "server_ms": run.server_ms})
    print("phase done", flush=True)
    with open(args[1], "w") as fh:
        json.dump({"phases": results}, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
