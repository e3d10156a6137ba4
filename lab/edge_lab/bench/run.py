"""``edge-agent bench run``: one trace, every contender (a scheduling system written as a config
rewrite, :mod:`edge_lab.bench.contenders`), side by side, live and simulated.

For each contender the same trace is replayed through the live agent (real models, real runtimes,
open loop) and through the simulator (the same scheduler code on a virtual clock, batch times from
the live agent's start-up profile). One table, a row per contender and mode; the simulated-versus-live
goodput error per contender; JSON with every figure; PNG plots when matplotlib is installed
(``pip install -e 'lab[bench]'``): latency CDF, goodput over time, batch-size histogram.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from agent.config import Config
from agent.core import LatencyTable
from agent.progress import Progress
from agent.workload.records import RequestRecord
from agent.workload.trace import TraceRow
from edge_lab.metrics import format_table, summarize

MODES = ("live", "sim")


def slo_floor_by_model(trace: Sequence[TraceRow]) -> dict[str, float]:
    """The tightest SLO of each model in the trace (DeepRT sizes its windows from it)."""
    floors: dict[str, float] = {}
    for row in trace:
        floors[row.model] = min(row.slo_ms, floors.get(row.model, row.slo_ms))
    return floors


def run_contender(config: Config, trace: Sequence[TraceRow], modes: Sequence[str], overhead: dict[str, "BatchOverhead"],
                  seed: int = 0) -> dict[str, dict]:
    """Replay ``trace`` under one (already applied) contender config; returns ``{mode: {summary, records, ...}}``.

    The simulator times a batch as the live agent's profiled backend time plus ``overhead`` (the
    agent's own measured cost around a batch: hand-offs, assembly, replies), so both modes price a
    batch the same way."""
    from agent.api import Agent
    from agent.sim import sim_models_from_config, simulate
    from edge_lab.bench.replay import replay_live

    out: dict[str, dict] = {}
    with Agent(config) as agent:
        tables = {name: LatencyTable(m.latency.batch_sizes, m.latency.latencies_s
                                     + (overhead[name].of(m.latency.batch_sizes) if name in overhead else 0.0))
                  for name, m in agent.models.items()}
        if "live" in modes:
            t0 = time.perf_counter()
            run = replay_live(agent, trace)
            out["live"] = {"records": run.records, "duration_s": run.duration_s,
                           "send_lag_ms": {"p50": run.send_lag_ms_p50, "p99": run.send_lag_ms_p99},
                           "wall_s": time.perf_counter() - t0}
    if "sim" in modes:
        result = simulate(list(trace), sim_models_from_config(config, tables), config.worker_count, seed=seed,
                          hold_fraction=config.hold_fraction, lookahead=config.admission_lookahead,
                          edf_horizon_s=config.edf_horizon_s, policy=config.policy,
                          policy_options={"policy_path": config.policy_path} if config.policy_path else None)
        out["sim"] = {"records": result.records, "duration_s": result.duration_s, "wall_s": result.wall_s}
    for mode, entry in out.items():
        entry["summary"] = summarize(entry["records"], entry["duration_s"])
    return out


@dataclass(frozen=True)
class BatchOverhead:
    """What the live agent adds around a batch of b on this machine: ``per_batch_s`` once (hand-offs,
    dispatch) plus ``per_item_s`` for every request in it (validation, assembly, its reply)."""

    per_batch_s: float
    per_item_s: float

    def of(self, batch_sizes: np.ndarray) -> np.ndarray:
        return self.per_batch_s + self.per_item_s * np.asarray(batch_sizes, dtype=np.float64)


def measure_batch_overhead(config: Config, requests: int = 100,
                           burst: int = 4) -> tuple[dict[str, BatchOverhead], dict[str, LatencyTable]]:
    """Per model: the median of (submit-to-last-reply minus backend time) for single requests and
    for bursts of ``burst`` served as one batch, both through worker threads; the two fit
    ``per_batch + per_item * b``. Measured once per bench, whatever the contender. Also returns the
    models' batch latency tables (start-up profile, or the config's profile file)."""
    from agent.api import Agent
    from edge_lab.bench.contenders import apply_contender
    from edge_lab.bench.replay import inputs_for

    def median_overhead(agent, name, inputs, n) -> float:
        samples = []
        for _ in range(requests):
            t0 = time.perf_counter()
            futures = [agent.submit(name, inputs, slo_ms=10_000) for _ in range(n)]
            results = [f.result() for f in futures]
            # one batch: every result carries that batch's compute time (FixedBatch(n), one instance)
            samples.append(time.perf_counter() - t0 - max(r.compute_ms for r in results) / 1000)
        return float(np.median(samples))

    singles, bursts = {}, {}
    with Agent(apply_contender(config, "edge")) as agent:
        tables = {name: loaded.latency for name, loaded in agent.models.items()}
        for name, loaded in agent.models.items():
            singles[name] = median_overhead(agent, name, inputs_for(loaded.card, count=1)[0], 1)
    fixed = dataclasses.replace(apply_contender(config, "fixed"), workers=1)
    fixed = dataclasses.replace(fixed, models=tuple(dataclasses.replace(
        m, instances=1, batching=dataclasses.replace(m.batching, size=burst, max_batch=max(burst, m.batching.max_batch)))
        for m in fixed.models))
    with Agent(fixed) as agent:
        for name, loaded in agent.models.items():
            bursts[name] = median_overhead(agent, name, inputs_for(loaded.card, count=1)[0], burst)
    out = {}
    for name in singles:
        per_item = max(0.0, (bursts[name] - singles[name]) / (burst - 1))
        out[name] = BatchOverhead(max(0.0, singles[name] - per_item), per_item)
    return out, tables


TRITON_PREFERRED = ("max", "half,max", "2,4,max")   # candidate preferred_sizes ("max" = max_batch)
TRITON_DELAYS_MS = (0.0, 0.5, 1.0, 2.0, 5.0)        # candidate max_queue_delay_ms


def tune_triton(config: Config, trace: Sequence[TraceRow], tables: dict[str, LatencyTable],
                seed: int = 0) -> tuple[Config, dict]:
    """Triton's best dynamic-batcher setting for this trace, chosen by simulated goodput over a grid
    of preferred sizes and queue delays: the baseline gets its tuning with hindsight, on the very
    trace it is then measured on, as a Triton user tuning with perf_analyzer would aim for."""
    from agent.sim import sim_models_from_config, simulate
    from edge_lab.bench.contenders import apply_contender
    base = apply_contender(config, "triton")
    grid = []
    best: tuple[float, Config, dict] | None = None
    for preferred in TRITON_PREFERRED:
        for delay_ms in TRITON_DELAYS_MS:
            models = []
            for m in base.models:
                b = m.batching.max_batch
                sizes = {"max": (b,), "half,max": (max(1, b // 2), b), "2,4,max": (2, 4, b)}[preferred]
                models.append(dataclasses.replace(m, batching=dataclasses.replace(
                    m.batching, preferred_sizes=tuple(sorted({s for s in sizes if 1 <= s <= b})), max_queue_delay_ms=delay_ms)))
            candidate = dataclasses.replace(base, models=tuple(models))
            result = simulate(list(trace), sim_models_from_config(candidate, tables), candidate.worker_count, seed=seed,
                              hold_fraction=candidate.hold_fraction, lookahead=candidate.admission_lookahead,
                              edf_horizon_s=candidate.edf_horizon_s)
            goodput = summarize(result.records, result.duration_s)["overall"]["goodput_per_s"]
            setting = {"preferred_sizes": preferred, "max_queue_delay_ms": delay_ms, "sim_goodput": goodput}
            grid.append(setting)
            if best is None or goodput > best[0]:
                best = (goodput, candidate, setting)
    return best[1], {"best": best[2], "grid": grid}


def run_bench(config: Config, trace: Sequence[TraceRow], contenders: Sequence[str], modes: Sequence[str],
              out_dir: Path | None, seed: int = 0, log=sys.stderr) -> dict:
    """Every contender on the same trace; prints progress to ``log``; returns the JSON-able results."""
    from edge_lab.bench.contenders import apply_contender

    slo_floor = slo_floor_by_model(trace)
    overhead, raw_tables = measure_batch_overhead(config) if "sim" in modes else ({}, {})
    if overhead:
        print("agent overhead around a batch of b (added to simulated batch times): "
              + ", ".join(f"{name} {1e6 * v.per_batch_s:.0f} us + {1e6 * v.per_item_s:.0f} us x b"
                          for name, v in overhead.items()), file=log, flush=True)
    configs = {contender: apply_contender(config, contender, slo_ms_by_model=slo_floor) for contender in contenders}
    triton_tuning = None
    if "triton" in configs and overhead:
        sim_tables = {name: LatencyTable(t.batch_sizes, t.latencies_s + overhead[name].of(t.batch_sizes))
                      for name, t in raw_tables.items()}
        configs["triton"], triton_tuning = tune_triton(config, trace, sim_tables, seed)
        best = triton_tuning["best"]
        print(f"triton tuned in the simulator over {len(triton_tuning['grid'])} settings: preferred sizes "
              f"{best['preferred_sizes']}, max queue delay {best['max_queue_delay_ms']} ms", file=log, flush=True)
    runs: dict[str, dict[str, dict]] = {}
    with Progress(len(contenders), log, desc="bench run") as progress:    # a bar with the time left on a terminal
        for k, contender in enumerate(contenders, start=1):
            progress.write(f"[{k}/{len(contenders)}] {contender}: {', '.join(modes)} ({len(trace)} requests, "
                           f"{trace[-1].t_s if trace else 0:.1f} s)", log)
            progress.step(contender)
            runs[contender] = run_contender(configs[contender], trace, modes, overhead, seed)
    rows = {f"{contender} ({mode})": entry["summary"]["overall"]
            for contender, by_mode in runs.items() for mode, entry in by_mode.items()}
    agreement = {}
    for contender, by_mode in runs.items():
        if "live" in by_mode and "sim" in by_mode:
            live = by_mode["live"]["summary"]["overall"]["goodput_per_s"]
            sim = by_mode["sim"]["summary"]["overall"]["goodput_per_s"]
            agreement[contender] = {"live_goodput": live, "sim_goodput": sim,
                                    "rel_error": (sim - live) / live if live else None}
    results = {
        "trace_rows": len(trace), "policies": list(contenders), "modes": list(modes), "seed": seed,
        "agent_overhead_us": {name: {"per_batch": 1e6 * v.per_batch_s, "per_item": 1e6 * v.per_item_s}
                              for name, v in overhead.items()},
        "table": rows, "sim_vs_live": agreement, "triton_tuning": triton_tuning,
        "runs": {contender: {mode: {k: v for k, v in entry.items() if k != "records"}
                             for mode, entry in by_mode.items()}
                 for contender, by_mode in runs.items()},
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bench.json").write_text(json.dumps(results, indent=2, default=float))
        records = {f"{contender} ({mode})": entry["records"] for contender, by_mode in runs.items() for mode, entry in by_mode.items()}
        (out_dir / "records.json").write_text(json.dumps({k: [asdict(r) for r in v] for k, v in records.items()}))
        results["plots"] = write_plots(records, out_dir)
    return results


def format_results(results: dict) -> str:
    lines = [format_table(results["table"])]
    if results.get("triton_tuning"):
        best = results["triton_tuning"]["best"]
        lines.append(f"triton: best of {len(results['triton_tuning']['grid'])} settings in the simulator: preferred "
                     f"sizes {best['preferred_sizes']}, max queue delay {best['max_queue_delay_ms']} ms")
    if results["sim_vs_live"]:
        lines.append("")
        lines.append("simulated vs live goodput (same trace, same scheduler code, batch times from the live profile):")
        for contender, a in results["sim_vs_live"].items():
            error = "-" if a["rel_error"] is None else f"{100 * a['rel_error']:+.1f}%"
            lines.append(f"  {contender:<10} live {a['live_goodput']:8.1f}/s  sim {a['sim_goodput']:8.1f}/s  error {error}")
    for contender, by_mode in results["runs"].items():
        live = by_mode.get("live")
        if live:
            lag = live["send_lag_ms"]
            lines.append(f"  {contender:<10} send lag p50 {lag['p50']:.2f} ms, p99 {lag['p99']:.2f} ms (open loop)")
    return "\n".join(lines)


def write_plots(records: dict[str, list[RequestRecord]], out_dir: Path) -> list[str]:
    """Latency CDF, goodput over time (1 s bins) and batch-size histogram, one line per run."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(plots skipped: matplotlib is not installed; pip install -e 'lab[bench]', or bash tools/dev.sh setup)", file=sys.stderr)
        return []
    written = []
    contenders = list(dict.fromkeys(name.split(" (")[0] for name in records))
    colors = {p: plt.get_cmap("tab10")(k % 10) for k, p in enumerate(contenders)}

    def style(name: str) -> dict:   # one colour per contender; live solid, simulated dashed
        return {"color": colors[name.split(" (")[0]], "linestyle": "--" if name.endswith("(sim)") else "-"}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, recs in records.items():
        lat = np.sort([r.latency_ms for r in recs if r.status == "ok" and r.latency_ms is not None])
        if len(lat):
            ax.plot(lat, np.arange(1, len(lat) + 1) / len(recs), label=name, **style(name))
    ax.set_xscale("log")
    written.append(_save(fig, ax, "latency of ok replies (ms)", "fraction of all requests sent", "latency CDF",
                         out_dir / "latency_cdf.png", plt))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, recs in records.items():
        done = np.array([r.finish_s for r in recs if r.within_slo])
        if len(done):
            bins = np.arange(0, np.ceil(done.max()) + 1)
            counts, edges = np.histogram(done, bins=bins)
            ax.step(edges[:-1], counts, where="post", label=name, **style(name))
    written.append(_save(fig, ax, "time (s)", "replies within SLO per second", "goodput over time",
                         out_dir / "goodput.png", plt))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(records)
    for k, name in enumerate(names):
        sizes = np.array([r.batch_size for r in records[name] if r.batch_size])
        if len(sizes):
            values, counts = np.unique(sizes, return_counts=True)
            ax.bar(values + (k - len(names) / 2) * 0.8 / len(names), counts / counts.sum(), width=0.8 / len(names),
                   label=name, color=style(name)["color"], alpha=0.5 if name.endswith("(sim)") else 1.0)
    written.append(_save(fig, ax, "batch size a request was served in", "fraction of served requests", "batch sizes",
                         out_dir / "batch_sizes.png", plt, grid=False))
    return written


def _save(fig, ax, xlabel: str, ylabel: str, title: str, path: Path, plt, grid: bool = True) -> str:
    """Label, legend and write one plot; returns its path."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    if grid:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
