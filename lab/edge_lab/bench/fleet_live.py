"""Live replay of a fleet plan on this machine: one agent process per board, each in the CPU quota
its board kind has, a real Mosquitto, and every board's replay trace played over MQTT at once.

``python -m edge_lab.bench.fleet_live --plan PLAN_DIR [--quota cpu-halfcore=0.5]`` where PLAN_DIR
was written by ``edge-agent plan ... --traces`` (configs/, traces/, report.json). For each board:
its config, pointed at the local broker, runs as ``edge-agent run`` in its own process; a board
whose kind is named in ``--quota`` runs in a cgroup v1 ``cpu`` group with that many cores of
quota (``cfs_quota_us``; needs root and the v1 ``cpu`` controller, else it says so and stops). Its
trace is played by the lab's MQTT generator (:func:`edge_lab.bench.mqttload.replay_mqtt`), real
digit frames, QoS 1. Prints per board the simulated goodput (the plan's replay: requests answered
in SLO per second of trace) against the live one, and the error.

Why this and not ``bench run`` per board: the boards here share the machine's cores and one broker
at the same time, as a small fleet on one host would; ``bench run`` replays one board in process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import numpy as np

__all__ = ["main"]

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")


def _frames(models: list[str]):
    """Digit frames for every model, resized (nearest neighbour) to the model card's input size."""
    from agent.models.card import load_card
    from agent.models.digits import frames_from_digits, load_test_set
    from edge_lab.bench.loadgen import Frames
    images, labels = load_test_set()
    base = frames_from_digits(images[:64])
    inputs = {}
    for model in models:
        spec = load_card(f"demo:{model}").inputs[0]
        h, w = spec.item_shape()[:2]
        rows = (np.arange(h) * base.shape[1] // h)
        cols = (np.arange(w) * base.shape[2] // w)
        frames = [np.ascontiguousarray(f[rows][:, cols])[None] for f in base]
        inputs[model] = (spec.name, "logits", frames, np.asarray(labels[:64]))
    return Frames(inputs)


def _quota_group(name: str, cores: float) -> Path:
    if not (CGROUP_CPU / "cpu.cfs_quota_us").exists():
        raise SystemExit(f"fleet_live: --quota needs the cgroup v1 cpu controller at {CGROUP_CPU} (and root)")
    group = CGROUP_CPU / f"edge-fleet-{name}"
    group.mkdir(exist_ok=True)
    (group / "cpu.cfs_period_us").write_text("100000")
    (group / "cpu.cfs_quota_us").write_text(str(int(cores * 100000)))
    return group


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_lab.bench.fleet_live", description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", required=True, help="a directory written by edge-agent plan --traces")
    parser.add_argument("--quota", action="append", default=[], metavar="KIND=CORES",
                        help="run the boards of KIND in a cgroup CPU quota of CORES (repeatable)")
    parser.add_argument("--drain", type=float, default=3.0, help="seconds to wait for replies after the last deadline")
    args = parser.parse_args(argv)
    from agent.workload.trace import read_trace
    from edge_lab.broker import LocalBroker
    from edge_lab.bench.loadgen import MqttTarget
    from edge_lab.bench.mqttload import replay_mqtt

    plan = Path(args.plan)
    report = json.loads((plan / "report.json").read_text())
    chosen = report["methods"][report["chosen"]]
    duration = float(report["replay"]["duration_s"])
    quotas = {}
    for item in args.quota:
        kind, _, cores = item.partition("=")
        quotas[kind] = float(cores)
    boards = sorted(p.stem for p in (plan / "configs").glob("*.toml"))
    work = plan / "live"
    work.mkdir(exist_ok=True)
    processes: list[subprocess.Popen] = []
    groups: list[Path] = []
    results: dict[str, object] = {}
    with LocalBroker() as broker:
        try:
            for board in boards:
                data = tomllib.loads((plan / "configs" / f"{board}.toml").read_text())
                lines = (plan / "configs" / f"{board}.toml").read_text().replace(
                    f'port = {data["mqtt"]["port"]}', f"port = {broker.port}", 1)
                config = work / f"{board}.toml"
                config.write_text(lines)
                log = open(work / f"{board}.log", "wb")
                process = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                processes.append(process)
                kind = next((k for k in quotas if board.startswith(k + "-")), None)
                if kind is not None:
                    group = _quota_group(board, quotas[kind])
                    groups.append(group)
                    (group / "cgroup.procs").write_text(str(process.pid))
            deadline = time.monotonic() + 240
            for board, process in zip(boards, processes):
                while b"serving" not in (work / f"{board}.log").read_bytes():
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"fleet_live: agent {board} did not start:\n"
                                         + (work / f"{board}.log").read_text(errors="replace")[-2000:])
                    time.sleep(0.2)
            traces = {b: read_trace(plan / "traces" / f"{b}.csv") for b in boards}
            frames = _frames(sorted({row.model for t in traces.values() for row in t}))

            def play(board: str) -> None:
                target = MqttTarget("127.0.0.1", broker.port, board, frames, procs=1)
                results[board] = replay_mqtt(target, traces[board], frames, drain_s=args.drain)

            threads = [threading.Thread(target=play, args=(b,)) for b in boards]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            for process in processes:
                if process.poll() is None:
                    os.killpg(process.pid, 15)
            for process in processes:
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, 9)
                    process.wait(5)
            for group in groups:
                try:
                    group.rmdir()
                except OSError:
                    pass
    print(f"{'board':<18} {'quota':>6} {'sim goodput/s':>14} {'live goodput/s':>15} {'error':>7} {'live statuses'}")
    total_sim = total_live = 0.0
    out = {}
    for board in boards:
        replay = results.get(board)
        if replay is None:
            print(f"{board:<18} no replay (its generator failed)")
            continue
        live = sum(r.within_slo for r in replay.records) / duration
        sim = float(chosen["goodput_per_s"].get(board, 0.0))
        total_sim += sim
        total_live += live
        statuses: dict[str, int] = {}
        for r in replay.records:
            statuses[r.status] = statuses.get(r.status, 0) + 1
        kind = next((k for k in quotas if board.startswith(k + "-")), None)
        quota = f"{quotas[kind]:g}" if kind else "-"
        error = (sim - live) / live * 100 if live else float("inf")
        print(f"{board:<18} {quota:>6} {sim:>14.1f} {live:>15.1f} {error:>+6.1f}% {statuses}")
        per_app: dict[str, list[int]] = {}
        for r in replay.records:
            counts = per_app.setdefault(r.app, [0, 0])
            counts[0] += 1
            counts[1] += int(r.within_slo)
        attainment = {app: ok / n for app, (n, ok) in sorted(per_app.items())}
        out[board] = {"sim_goodput_per_s": sim, "live_goodput_per_s": live, "statuses": statuses,
                      "attainment": attainment}
    threshold = float(report.get("attainment_threshold") or 0.99)
    below = [f"{app} {a:.1%} (sim {chosen['attainment'].get(app, float('nan')):.1%})"
             for board in out.values() for app, a in board["attainment"].items() if a < threshold]
    if total_live:
        print(f"{'fleet':<18} {'':>6} {total_sim:>14.1f} {total_live:>15.1f} "
              f"{(total_sim - total_live) / total_live * 100:>+6.1f}%")
    print(f"applications below {threshold:.0%} in SLO live: {', '.join(below) if below else 'none'}")
    (work / "live.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
