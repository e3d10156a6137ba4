"""Profile every model of a config on this board: the work behind ``edge-agent profile``.

Order of work per model: load ``K`` instances (separate sessions, the config's threads each),
sweep batch sizes on one instance alone, then run 1..K instances at once at a couple of batch
sizes; after all models, every pair of different models co-running (one instance each); then fit
the interference model (:mod:`agent.profiler.fit`) per model and check it on the co-running
points, which it never saw. All instances stay loaded until the end so that co-running uses
warm sessions.
"""
from __future__ import annotations

import datetime as _dt
import itertools
import os
import platform
from typing import IO, Sequence

import numpy as np

from agent.backends import available_backends, load_backend
from agent.config import Config, ModelConfig
from agent.models.card import load_card
from agent.profiler.fit import fit_interference, predict_ms
from agent.profiler.measure import (
    measure_batch_sweep,
    profile_batch_sizes,
    run_concurrently,
    summarize,
    zeros_batch,
)
from agent.profiler.profile_file import PROFILE_VERSION, validate_profile
from agent.progress import STDERR, Progress

__all__ = ["Progress", "host_info", "default_max_concurrency", "profile_config", "format_summary"]

DEFAULT_CONCURRENCY_BATCH_SIZES = (1, 8)


def default_max_concurrency(cores: int | None = None) -> int:
    """Instances to try at once: twice the cores (to see the sharing knee and past it), at most 4.

    Past 2x cores every extra instance only time-slices; 4 keeps a profile of a small board short.
    """
    cores = cores or os.cpu_count() or 1
    return max(2, min(2 * cores, 4))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "processor\t: ")) and ":" in line:
                    value = line.split(":", 1)[1].strip()
                    if value and not value.isdigit():
                        return value
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def host_info() -> dict:
    """What the figures belong to: CPU, cores, OS, Python and the runtime versions."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 1,
        "machine": platform.machine(),
        "system": platform.platform(),
        "python": platform.python_version(),
        "runtimes": available_backends(),
    }


def _batch_sizes(model: ModelConfig, max_batch: int) -> list[int]:
    sizes = set(profile_batch_sizes(max_batch))
    configured = model.batching.max_batch
    if configured <= max_batch:
        sizes.add(configured)  # the scheduler's own largest batch is then exact, not interpolated
    return sorted(sizes)


def _stats_lists(stats) -> dict:
    return {"p50_ms": [s.p50_ms for s in stats], "p99_ms": [s.p99_ms for s in stats],
            "mean_ms": [s.mean_ms for s in stats]}


def fit_points(entry: dict) -> list[tuple[int, int, float]]:
    """The (batch, k, ms) points the interference model is fitted to and tested on.

    k = 1: the batch sweep's p50 (one instance alone). k >= 2: the per-instance *cycle* time
    (wall time per completed batch, :class:`~agent.profiler.measure.ConcurrentSamples`), not the
    run duration, because processor sharing predicts how much less often each instance finishes,
    and on a board where a run is shorter than the OS time slice the run's own duration hides
    exactly that. At k = 1 the two agree within the Python overhead per call.
    """
    batch, conc = entry["batch"], entry["concurrency"]
    points = [(int(b), 1, float(t)) for b, t in zip(batch["sizes"], batch["p50_ms"])]
    points += [(int(b), int(k), float(conc["cycle_ms"][i][j])) for i, k in enumerate(conc["levels"]) if k > 1
               for j, b in enumerate(conc["batch_sizes"])]
    return points


def _fit_entry(entry: dict, cores: int) -> tuple[dict, dict]:
    # u may reach `cores`: a board whose cores do not all deliver (a VM's vCPUs on shared
    # hardware, hyper-threads) shows up as instances that each need more than "one core".
    fit = fit_interference(fit_points(entry), cores, max_u=float(cores))
    return fit.to_dict(), fit.params


def profile_config(config: Config, *, max_batch: int = 64, repeats: int = 30, warmup: int = 2,
                   max_concurrency: int | None = None,
                   concurrency_batch_sizes: Sequence[int] = DEFAULT_CONCURRENCY_BATCH_SIZES,
                   min_window_s: float = 0.25, rounds: int = 3, models: Sequence[str] | None = None,
                   progress_stream: IO[str] | None | object = STDERR, quick: bool = False) -> dict:
    """Measure every model of ``config`` (or those named in ``models``) and return a profile dict.

    ``max_batch`` bounds the batch sweep (the config's own ``max_batch`` is added when smaller);
    ``repeats`` timed runs per point and round after ``warmup``; ``max_concurrency`` instances at
    most at once (default :func:`default_max_concurrency`); ``min_window_s`` the least time a
    concurrency point runs, so a sub-millisecond model still collects a steady sample.

    ``rounds``: the whole plan (sweeps, concurrency grid, pairs) runs this many times, interleaved,
    and each figure is the median over rounds (the sweep pools its samples). A board shares its
    cores with whatever else runs on it (on the development VM a burst of other work took cores
    away for seconds and made co-running instances look much slower: BENCHMARKS.md, "Figures that
    were in docstrings"); a burst now spoils one round of a point, not the point.
    ``progress_stream``: where the progress bar goes (default stderr; None, or not a terminal: nowhere).
    The result is validated (:func:`agent.profiler.profile_file.validate_profile`).
    """
    if max_batch < 1 or repeats < 1 or rounds < 1:
        raise ValueError(f"max_batch = {max_batch}, repeats = {repeats}, rounds = {rounds}: expected all >= 1")
    chosen = list(config.models)
    if models:
        known = {m.name for m in config.models}
        unknown = [name for name in models if name not in known]
        if unknown:
            raise ValueError(f"models {unknown} are not in the config; it has {sorted(known)}")
        chosen = [m for m in config.models if m.name in set(models)]
    cores = os.cpu_count() or 1
    levels = list(range(1, (max_concurrency or default_max_concurrency(cores)) + 1))

    plan = {m.name: _batch_sizes(m, max_batch) for m in chosen}
    conc_sizes = {name: sorted({min(b, sizes[-1]) for b in concurrency_batch_sizes})
                  for name, sizes in plan.items()}
    pairs = list(itertools.combinations([m.name for m in chosen], 2))
    per_round = sum(len(plan[n]) + len(levels) * len(conc_sizes[n]) for n in plan)
    per_round += sum(len(set(conc_sizes[a]) & set(conc_sizes[b])) for a, b in pairs)
    progress = Progress(per_round * rounds, progress_stream, desc="profile")

    loaded: dict[str, tuple] = {}
    sweep_samples: dict[str, list[list[float]]] = {}
    stopped: dict[str, str | None] = {}
    # (model, k, b) -> per-round (stats, cycle_ms); (model, other, b) -> the same for pairs
    conc_rounds: dict[tuple, list] = {}
    pair_rounds: dict[tuple, list] = {}
    try:
        for model in chosen:
            card = load_card(model.card)
            path = card.verify_file(model.file)
            loaded[model.name] = (card, [load_backend(model.backend, path, threads=model.threads)
                                         for _ in range(levels[-1])])
        for r in range(1, rounds + 1):
            tag = f" r={r}/{rounds}" if rounds > 1 else ""
            for model in chosen:
                card, backends = loaded[model.name]
                sweep = measure_batch_sweep(
                    backends[0], card.inputs, plan[model.name], repeats=repeats, warmup=warmup,
                    on_step=lambda b, n=model.name: progress.step(f"{n} b={b} k=1{tag}"))
                if r == 1:
                    # A size that failed once is not tried again; later rounds sweep what fit.
                    plan[model.name], stopped[model.name] = sweep.sizes, sweep.stopped
                    conc_sizes[model.name] = sorted({min(b, sweep.sizes[-1]) for b in conc_sizes[model.name]})
                    sweep_samples[model.name] = [[] for _ in sweep.sizes]
                for pooled, samples in zip(sweep_samples[model.name], sweep.samples_s):
                    pooled.extend(samples)
                for k in levels:
                    for b in conc_sizes[model.name]:
                        progress.step(f"{model.name} b={b} k={k}{tag}")
                        batch = zeros_batch(card.inputs, b)
                        run = run_concurrently([(backends[n], batch) for n in range(k)], repeats=repeats,
                                               min_window_s=min_window_s, warmup=warmup)
                        conc_rounds.setdefault((model.name, k, b), []).append(
                            (summarize(run.balanced()), 1e3 * float(np.mean(run.cycle_s))))
            for name_a, name_b in pairs:
                (card_a, backends_a), (card_b, backends_b) = loaded[name_a], loaded[name_b]
                for b in sorted(set(conc_sizes[name_a]) & set(conc_sizes[name_b])):
                    progress.step(f"{name_a}+{name_b} b={b}{tag}")
                    run = run_concurrently(
                        [(backends_a[0], zeros_batch(card_a.inputs, b)), (backends_b[0], zeros_batch(card_b.inputs, b))],
                        repeats=repeats, min_window_s=min_window_s, warmup=warmup)
                    for side, (me, other) in enumerate(((name_a, name_b), (name_b, name_a))):
                        pair_rounds.setdefault((me, other, b), []).append(
                            (summarize(run.durations_s[side]), 1e3 * run.cycle_s[side]))
    finally:
        progress.close()
        for _, backends in loaded.values():
            for backend in backends:
                backend.close()

    def median_of(rounds_list: list, attr: str) -> float:
        values = [cycle if attr == "cycle_ms" else getattr(stats, attr) for stats, cycle in rounds_list]
        return float(np.median(values))

    result_models: dict[str, dict] = {}
    for model in chosen:
        name = model.name
        stats = [summarize(samples) for samples in sweep_samples[name]]
        sizes = conc_sizes[name]
        grid = {key: [[median_of(conc_rounds[(name, k, b)], key) for b in sizes] for k in levels]
                for key in ("p50_ms", "p99_ms", "mean_ms", "cycle_ms")}
        co_running = {}
        for (me, other, b), per_round in sorted(pair_rounds.items()):
            if me != name:
                continue
            entry = co_running.setdefault(other, {"batch_sizes": [], "p50_ms": [], "p99_ms": [],
                                                  "cycle_ms": [], "alone_p50_ms": []})
            entry["batch_sizes"].append(b)
            for key in ("p50_ms", "p99_ms", "cycle_ms"):
                entry[key].append(median_of(per_round, key))
            entry["alone_p50_ms"].append(grid["p50_ms"][0][sizes.index(b)])
        result_models[name] = {
            "backend": model.backend,
            "file": model.file,
            "threads": model.threads,
            "device": loaded[name][1][0].device,
            "batch": {"sizes": plan[name], **_stats_lists(stats), "tail": stats[0].tail,
                      "repeats": repeats * rounds, "warmup": warmup, "stopped": stopped[name]},
            "concurrency": {"levels": levels, "batch_sizes": sizes, **grid, "repeats": repeats,
                            "rounds": rounds, "min_window_s": min_window_s},
            "co_running": co_running,
        }

    for name, entry in result_models.items():
        entry["fit"], fit_params = _fit_entry(entry, cores)
        for co in entry["co_running"].values():
            # Two instances busy, one of another model: the PS view counts them alike. Never trained on.
            co["predicted_ms"] = [float(predict_ms(fit_params, b, 2)) for b in co["batch_sizes"]]
            co["rel_error"] = [abs(p - m) / m for p, m in zip(co["predicted_ms"], co["cycle_ms"])]

    data = {
        "profile_version": PROFILE_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": host_info(),
        "settings": {"max_batch": max_batch, "repeats": repeats, "rounds": rounds, "warmup": warmup,
                     "max_concurrency": levels[-1], "concurrency_batch_sizes": list(concurrency_batch_sizes),
                     "min_window_s": min_window_s, "quick": quick},
        "models": result_models,
    }
    return validate_profile(data)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_summary(data: dict) -> str:
    """The measured tables and the fit, as text for a terminal."""
    host = data["host"]
    lines = [f"profile v{data['profile_version']} {data['created']}  {host.get('cpu', '?')}, "
             f"{host['cores']} cores, python {host.get('python', '?')}"]
    for name, m in data["models"].items():
        batch, conc, fit = m["batch"], m["concurrency"], m["fit"]
        lines.append("")
        lines.append(f"{name} ({m['backend']}/{m['file']}, {m['threads']} thread(s)) "
                     f"- batch alone, {batch['repeats']} runs each; tail = {batch['tail']}")
        lines.append(f"  {'batch':>5} {'p50 ms':>9} {'tail ms':>9} {'mean ms':>9} {'ms/item':>8}")
        for b, p50, p99, mean in zip(batch["sizes"], batch["p50_ms"], batch["p99_ms"], batch["mean_ms"]):
            lines.append(f"  {b:>5} {p50:>9.3f} {p99:>9.3f} {mean:>9.3f} {p50 / b:>8.3f}")
        if batch.get("stopped"):
            lines.append(f"  sweep stopped early: {batch['stopped']}")
        lines.append("  k instances busy, ms per batch p50 / cycle: " + "  ".join(f"{'b=' + str(b):<17}" for b in conc["batch_sizes"]))
        for k, row, cycles in zip(conc["levels"], conc["p50_ms"], conc["cycle_ms"]):
            cells = "  ".join(f"{f'{v:.3f} / {c:.3f}':<17}" for v, c in zip(row, cycles))
            lines.append(f"  {'k=' + str(k):>43}  {cells}")
        for other, co in m.get("co_running", {}).items():
            cells = ", ".join(
                f"b={b}: p50 {p:.3f} / cycle {c:.3f} ms (alone {a:.3f}, fit {f:.3f})"
                for b, p, c, a, f in zip(co["batch_sizes"], co["p50_ms"], co["cycle_ms"], co["alone_p50_ms"],
                                         co.get("predicted_ms", co["p50_ms"])))
            lines.append(f"  next to {other}: {cells}")
        p = fit["params"]
        lines.append(f"  fit: {fit['form']}")
        lines.append(f"       alpha={p['alpha_ms']:.4f} ms  beta={p['beta_ms']:.4f} ms/item  u={p['u']:.3f}  "
                     f"gamma={p['gamma']:.3f}  cores={p['cores']}")
        lines.append(f"       held out {fit['heldout']}: median error {_pct(fit['median_rel_error'])}, "
                     f"max {_pct(fit['max_rel_error'])} (train median {_pct(fit['train_median_rel_error'])})")
        if fit.get("note"):
            lines.append(f"       note: {fit['note']}")
    return "\n".join(lines)
