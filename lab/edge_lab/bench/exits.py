"""``edge-agent bench exits``: batching and early exit, alone and together, at equal accuracy targets (issue 24).

One model, the shipped multi-exit ``camera_exits``, one Poisson trace whose requests carry mixed
``min_accuracy`` classes (the trace format's ``min_accuracy`` column), served by five contenders that
differ only in their model config:

* ``no-batch/no-exit``: the whole graph, batches of 1 (``exit_mode = "off"``, ``max_batch = 1``);
* ``batching only``: the whole graph, the deadline-aware rule up to ``max_batch``;
* ``exit only``: stage by stage, fixed mode (each request at the earliest exit accurate enough), batches of 1;
* ``batching+exit fixed`` and ``batching+exit confidence``: stage by stage, batched;
* ``batching+exit+allocation``: ``batching+exit fixed`` admitting by the online exit allocation
  (``exit_allocation = true``, ``agent.exits.online``): under overload, the cheapest requests first;
* ``batching+exit+rebatch``: ``batching+exit fixed`` with its survivors re-batched
  (``exit_rebatch = true``, ``agent.exits.survivors``): each later stage a lane of its own.

Every contender meets every class's accuracy target by construction (the whole graph meets all of
them; the exits are chosen per class), and the live runs measure it: each request carries a labelled
test frame of the card's test set, and after its timed runs each contender's agent answers every
class on the whole test set (the card's accuracies are over the whole set; a few hundred frames of a
timed run would be a sample of it): the delivered top-1 accuracy per class is printed beside what the
class asked for. Which exit answers does not depend on the load (fixed: the class; confidence: the
item's own logits), so the untimed pass delivers what the timed runs did.

Beside the table, the ceiling any exit rule has on this machine (:func:`oracle_bound`): an oracle
that knows which exit answers each labelled test frame right, timed by the stage times the agent
measured at load, at batch 1 and at a full batch, against the no-batch/no-exit row's compute. It
says how much of a target such as issue 24's 2x is left to the exits on a CPU where batching
saves little per item.

Throughput at equal SLO attainment: for each contender, the highest offered rate whose SLO attainment
(answered ``ok`` within the SLO, over all requests sent) is at least ``--attainment``. Simulated
first (the same scheduler on a virtual clock, ``agent.sim``: a bisection over the rate), then live:
the real agent, in process, open loop, started at the simulated rate and stepped down until the
attainment holds (a run on a shared CPU may fall short of the simulation). The load is sized from
what is measured at start: the model's batch latency table on this machine (the agent's start-up
profile) gives the SLO (a multiple of a full batch's time) and the search's starting rate.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

#: (name, exit_mode, batched, more model config)
CONTENDERS: tuple[tuple[str, str, bool, dict], ...] = (
    ("no-batch/no-exit", "off", False, {}),
    ("batching only", "off", True, {}),
    ("exit only", "fixed", False, {}),
    ("batching+exit fixed", "fixed", True, {}),
    ("batching+exit confidence", "confidence", True, {}),
    ("batching+exit+allocation", "fixed", True, {"exit_allocation": True}),
    ("batching+exit+rebatch", "fixed", True, {"exit_rebatch": True}),
)
#: The contenders run again past their capacity (``--overload``): where the allocation decides.
OVERLOADED = ("batching+exit fixed", "batching+exit+allocation")
#: The min_accuracy classes of the trace, equal shares.
CLASSES = (0.8, 0.9, 0.95, 0.97)
MODEL = "camera_exits"


def exit_oracle(correct: Sequence[np.ndarray], cumulative_ms: Sequence[float], target: float) -> float:
    """The least mean time per item (ms) at which any exit rule could answer ``target``'s class on
    these items: an oracle that knows which exit answers each item right sends it to the earliest
    such exit (to the first where none does: it is wrong wherever it leaves), then spends the
    class's allowance of wrong answers (the items it may get wrong and still be ``target`` accurate
    overall) on the dearest items, sent to the first exit. ``correct[k][i]``: exit ``k`` answers
    item ``i`` right; ``cumulative_ms[k]``: what running up to exit ``k`` costs per item. A bound,
    not a rule: no confidence test knows which items are right, so a real rule's mean time is at
    least this."""
    right = np.asarray(correct, dtype=bool)                      # [exits, items]
    cost = np.asarray(cumulative_ms, dtype=np.float64)
    if right.ndim != 2 or right.shape[0] != cost.shape[0] or right.shape[1] == 0:
        raise ValueError(f"correct {list(right.shape)} and cumulative_ms {list(cost.shape)}: expected "
                         "[exits, items] and [exits]")
    n = right.shape[1]
    answerable = right.any(axis=0)
    # an item no exit answers right is wrong wherever it leaves: the first exit, for nothing
    per_item = np.where(answerable, cost[right.argmax(axis=0)], cost[0])
    allowance = int(math.floor(answerable.sum() - target * n + 1e-9))
    if allowance > 0:
        dearest = np.argsort(-np.where(answerable, per_item - cost[0], -np.inf), kind="stable")[:allowance]
        per_item[dearest] = cost[0]
    return float(per_item.mean())


def oracle_bound(agent, frames: np.ndarray, labels: np.ndarray, max_batch: int,
                 classes: Sequence[float] = CLASSES) -> dict:
    """The ceiling any exit rule has on this machine (:func:`exit_oracle` per class, equal shares),
    against the whole graph at batch 1 (the no-batch/no-exit row): at batch 1, and at ``max_batch``
    (each stage's time per item in a full batch, as if batching were free to fill): compute alone,
    no queueing, no overhead. Stage times: those the agent measured at load on this machine."""
    loaded = agent.models[MODEL]
    plan = loaded.exits
    outputs = loaded.backends[0].run({loaded.card.inputs[0].name: frames})
    correct = [np.asarray(outputs[name]).argmax(axis=1) == labels for name in plan.outputs]
    sizes = list(plan.batch_sizes)
    out: dict = {"classes": {}}
    whole_1 = sum(row[sizes.index(1)] for row in plan.stage_ms)
    for b in (1, max_batch):
        if b not in sizes:
            continue
        per_item = np.cumsum([row[sizes.index(b)] / b for row in plan.stage_ms])
        means = {c: exit_oracle(correct, per_item, c) for c in classes}
        out["classes"][b] = means
        out[f"x_base_batch_{b}"] = whole_1 / float(np.mean(list(means.values())))
    return out


@dataclass
class Run:
    """One contender at one offered rate: what happened to its requests."""

    rate: float
    sent: int
    in_slo: int
    duration_s: float
    statuses: dict = field(default_factory=dict)
    exits: dict = field(default_factory=dict)
    accuracy: dict = field(default_factory=dict)          # class -> delivered top-1 (live)
    mean_batch: float = 0.0

    @property
    def attainment(self) -> float:
        return self.in_slo / self.sent if self.sent else 1.0

    @property
    def goodput(self) -> float:
        return self.in_slo / self.duration_s if self.duration_s > 0 else 0.0


def model_config(name: str, mode: str, batched: bool, max_batch: int, slo_ms: float, more: dict | None = None) -> dict:
    return {"name": name, "card": f"demo:{MODEL}", "instances": 2, "exit_mode": mode, "default_slo_ms": slo_ms,
            "batching": {"rule": "deadline_aware", "max_batch": max_batch if batched else 1}, **(more or {})}


def agent_config(mode: str, batched: bool, max_batch: int, slo_ms: float, more: dict | None = None):
    from agent.config import CONFIG_VERSION, parse_config
    return parse_config({"config_version": CONFIG_VERSION, "agent": {"device": "bench-exits", "workers": 2},
                         "mqtt": {"enabled": False},
                         "models": [model_config(MODEL, mode, batched, max_batch, slo_ms, more)]})


def make_trace(rate: float, duration_s: float, slo_ms: float, seed: int, classes: Sequence[float] = CLASSES):
    from agent.workload.generators import AppSpec, poisson
    apps = [AppSpec(f"acc{int(round(100 * c))}", MODEL, slo_ms, 1.0, min_accuracy=c) for c in classes]
    return poisson(rate, duration_s, apps, seed)


def simulate_run(config, table, trace, seed: int = 0, card=None) -> Run:
    from agent.sim.engine import sim_models_from_config, simulate
    models = sim_models_from_config(config, {MODEL: table}, cards={MODEL: card} if card is not None else None)
    result = simulate(trace, models, workers=config.worker_count, seed=seed, cores=2,
                      hold_fraction=config.hold_fraction, lookahead=config.admission_lookahead,
                      edf_horizon_s=config.edf_horizon_s, policy=config.policy)
    duration = trace[-1].t_s if trace else 0.0
    statuses: dict = {}
    exits: dict = {}
    for r in result.records:
        statuses[r.status] = statuses.get(r.status, 0) + 1
        if r.status == "ok":
            exits[r.exit] = exits.get(r.exit, 0) + 1
    return Run(trace_rate(trace), len(trace), sum(r.within_slo for r in result.records), duration, statuses, exits,
               mean_batch=result.mean_batch_size())


def trace_rate(trace) -> float:
    return len(trace) / trace[-1].t_s if len(trace) > 1 and trace[-1].t_s > 0 else 0.0


def sim_capacity(run_at: Callable[[float], Run], start: float, attainment: float, steps: int = 9) -> tuple[float, Run]:
    """The highest rate (bisection from ``start``) whose run holds ``attainment``, and that run."""
    low, high = 0.0, None
    best: Run | None = None
    rate = start
    for _ in range(steps):
        run = run_at(rate)
        if run.attainment >= attainment:
            low, best = rate, run
            rate = rate * 2 if high is None else (rate + high) / 2
        else:
            high = rate
            rate = (low + high) / 2 if low > 0 else rate / 2
    if best is None:
        best = run_at(rate)
        low = rate
    return low, best


def live_capacity(run_at: Callable[[float], Run], start: float, attainment: float, tries: list,
                  max_tries: int = 7, resolution: float = 0.08) -> tuple[float, Run]:
    """The highest rate found to hold ``attainment`` live: from the simulated rate, down (to 0.95 x
    the goodput a failing run had) until a run holds, up by 15% until one fails, then bisected to
    ``resolution``. Each try is appended to ``tries`` as (rate, attainment). When none holds, the
    last run, with its attainment below the target (the table marks it)."""
    low = high = None
    best: Run | None = None
    rate = start
    run = None
    for _ in range(max_tries):
        run = run_at(rate)
        tries.append((round(rate, 1), round(run.attainment, 4)))
        if run.attainment >= attainment:
            low, best = rate, run
        else:
            high = rate
        if low is not None and high is not None:
            if (high - low) / low <= resolution:
                break
            rate = (low + high) / 2
        elif low is not None:
            rate = low * 1.15
        else:
            rate = min(0.9 * rate, 0.95 * run.goodput)
    if best is None:
        return rate, run
    return low, best


def replay_exits(agent, trace, frames: np.ndarray, labels: np.ndarray, drain_s: float = 5.0) -> Run:
    """Open-loop replay of ``trace`` through ``agent.submit`` with each row's ``min_accuracy``; each
    class walks the labelled test frames in order. Returns the run with delivered accuracy per class."""
    from agent.errors import InferenceError
    n = len(trace)
    status = ["unanswered"] * n
    finish = [math.inf] * n
    sent = [0.0] * n
    correct = [False] * n
    exits_of: list = [None] * n
    batches: list[int] = []
    frame_of = [0] * n
    counters: dict = {}
    for i, row in enumerate(trace):
        k = counters.get(row.min_accuracy, 0)
        counters[row.min_accuracy] = k + 1
        frame_of[i] = k % len(frames)
    pending = threading.Semaphore(0)
    accepted = 0
    start = time.perf_counter()

    def done(future, i: int) -> None:
        finish[i] = time.perf_counter() - start
        error = future.exception()
        if error is None:
            result = future.result()
            status[i] = "ok"
            exits_of[i] = result.served_by.get("exit")
            correct[i] = int(np.argmax(result.outputs["logits"])) == int(labels[frame_of[i]])
            batches.append(result.batch_size)
        else:
            status[i] = error.code if isinstance(error, InferenceError) else "internal"
        pending.release()

    views = [frames[j:j + 1] for j in range(len(frames))]
    for i, row in enumerate(trace):
        delay = start + row.t_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sent[i] = time.perf_counter() - start
        try:
            future = agent.submit(MODEL, {"frames": views[frame_of[i]]}, slo_ms=row.slo_ms,
                                  min_accuracy=row.min_accuracy)
        except InferenceError as exc:
            status[i], finish[i] = exc.code, time.perf_counter() - start
            continue
        accepted += 1
        future.add_done_callback(lambda f, i=i: done(f, i))
    give_up = time.perf_counter() + max(r.slo_ms for r in trace) / 1000 + drain_s
    for _ in range(accepted):
        if not pending.acquire(timeout=max(0.0, give_up - time.perf_counter())):
            break
    statuses: dict = {}
    exits: dict = {}
    in_slo = 0
    for i, row in enumerate(trace):
        statuses[status[i]] = statuses.get(status[i], 0) + 1
        if status[i] == "ok":
            exits[exits_of[i]] = exits.get(exits_of[i], 0) + 1
            if 1000 * (finish[i] - sent[i]) <= row.slo_ms:
                in_slo += 1
    accuracy = {}
    for c in sorted(counters):
        mine = [correct[i] for i, row in enumerate(trace) if row.min_accuracy == c and status[i] == "ok"]
        accuracy[c] = (sum(mine) / len(mine), len(mine)) if mine else (None, 0)
    return Run(trace_rate(trace), n, in_slo, trace[-1].t_s if trace else 0.0, statuses, exits, accuracy,
               float(np.mean(batches)) if batches else 0.0)


def accuracy_pass(agent, frames: np.ndarray, labels: np.ndarray, classes: Sequence[float] = CLASSES,
                  window: int = 64) -> dict:
    """Every class on every labelled test frame through ``agent`` (loose SLO, ``window`` in flight):
    class -> (delivered top-1 accuracy, exits that answered)."""
    out = {}
    for c in classes:
        futures = []
        for i in range(len(frames)):
            if i >= window:
                futures[i - window].result(timeout=120)
            futures.append(agent.submit(MODEL, {"frames": frames[i:i + 1]}, slo_ms=60_000, min_accuracy=c))
        results = [f.result(timeout=120) for f in futures]
        correct = [int(np.argmax(r.outputs["logits"])) == int(y) for r, y in zip(results, labels)]
        exits: dict = {}
        for r in results:
            exits[r.served_by.get("exit")] = exits.get(r.served_by.get("exit"), 0) + 1
        out[c] = (sum(correct) / len(correct), exits)
    return out


def line_count(contenders: Sequence[str] | None = None, *, live: bool = True, repeat: int = 1,
               overload: float = 2.0) -> int:
    """How many lines :func:`bench_exits` says with these arguments (its progress bar's steps): the
    measurement, each contender simulated, each live round of each, each overloaded run."""
    names = [c[0] for c in CONTENDERS if contenders is None or c[0] in contenders]
    overloaded = (sum(1 for n in names if n in OVERLOADED) * (2 if live else 1)
                  if overload > 0 and all(n in names for n in OVERLOADED) else 0)
    return 1 + len(names) + (repeat * len(names) if live else 0) + overloaded


def bench_exits(*, duration_s: float = 6.0, sim_duration_s: float = 20.0, attainment: float = 0.95,
                max_batch: int = 8, slo_batches: float = 2.5, seed: int = 0, live: bool = True,
                contenders: Sequence[str] | None = None, repeat: int = 1, overload: float = 2.0,
                say: Callable[[str], None] = print) -> dict:
    """Run the comparison (module docstring); returns every figure as a dict."""
    from agent.api import Agent
    from agent.models.card import load_card
    from agent.models.digits import card_test_set

    chosen = [c for c in CONTENDERS if contenders is None or c[0] in contenders]
    card = load_card(f"demo:{MODEL}")
    # What this machine does: the whole graph's batch latency, measured at start on the agent's own
    # instance (more runs than the agent's start-up profile takes: the sizing rests on it, and a
    # shared CPU's steal moves a median of 5 by tens of percent).
    from agent.profiler.measure import measure_latency_table
    with Agent(agent_config("off", True, max_batch, 1000.0)) as probe:
        table = measure_latency_table(probe.models[MODEL].backends[0], card.inputs, max_batch, repeats=25)
    batch_ms = {b: 1000 * table.predict(b) for b in range(1, max_batch + 1)}
    slo_ms = round(slo_batches * batch_ms[max_batch], 1)
    start_rate = 2 / table.predict(1)          # two slots at batch 1: the plain capacity's estimate
    say(f"measured at start: whole model {batch_ms[1]:.2f} ms at batch 1, {batch_ms[max_batch]:.2f} ms at batch "
        f"{max_batch}; SLO {slo_ms:g} ms ({slo_batches:g} x a full batch), classes min_accuracy {list(CLASSES)} "
        f"in equal shares; the search starts at {start_rate:.0f} req/s")
    out: dict = {"batch_ms": batch_ms, "slo_ms": slo_ms, "classes": list(CLASSES), "attainment": attainment,
                 "sim": {}, "live": {}}
    for name, mode, batched, more in chosen:
        config = agent_config(mode, batched, max_batch, slo_ms, more)
        rate, run = sim_capacity(lambda r: simulate_run(config, table, make_trace(r, sim_duration_s, slo_ms, seed),
                                                        seed, card), start_rate, attainment)
        out["sim"][name] = {"rate": rate, "goodput": run.goodput, "attainment": run.attainment,
                            "exits": run.exits, "mean_batch": run.mean_batch}
        say(f"  sim  {name:<26} {run.goodput:7.1f} req/s in SLO at {100 * run.attainment:.1f}% attainment "
            f"(offered {rate:.1f}/s, mean batch {run.mean_batch:.2f}, exits {run.exits})")
    if not live:
        return _overloaded(out, chosen, overload, table, card, max_batch, slo_ms, duration_s, sim_duration_s, seed,
                           None, None, say)
    frames, labels = card_test_set(card.raw["dataset"], card.source.parent)
    # Rounds take turns over the contenders, so a spell of CPU stolen by other tenants falls on all
    # of them alike; each round's search starts where the last one found the contender's rate.
    for round_ in range(repeat):
        for name, mode, batched, more in chosen:
            config = agent_config(mode, batched, max_batch, slo_ms, more)
            tries: list = []
            entry = out["live"].setdefault(name, {"rounds": []})
            start = entry["rounds"][-1]["rate"] if entry["rounds"] else out["sim"][name]["rate"]
            with Agent(config) as agent:
                rate, run = live_capacity(
                    lambda r: replay_exits(agent, make_trace(r, duration_s, slo_ms, seed + 1 + round_), frames,
                                           labels), start, attainment, tries)
                if round_ == 0:
                    entry["accuracy"] = {str(c): a for c, a in accuracy_pass(agent, frames, labels).items()}
                if "oracle" not in out and mode != "off":
                    out["oracle"] = oracle_bound(agent, frames, labels, max_batch)
            entry["rounds"].append({"rate": rate, "goodput": run.goodput, "attainment": run.attainment,
                                    "exits": run.exits, "mean_batch": run.mean_batch, "statuses": run.statuses,
                                    "tries": tries, "held": run.attainment >= attainment})
            say(f"  live {name:<26} {run.goodput:7.1f} req/s in SLO at {100 * run.attainment:.1f}% attainment "
                f"(round {round_ + 1}/{repeat}: offered {rate:.1f}/s, mean batch {run.mean_batch:.2f}, exits {run.exits})")
    for entry in out["live"].values():      # the median round (by goodput) stands for the contender
        rounds = sorted(entry["rounds"], key=lambda r: r["goodput"])
        middle = rounds[(len(rounds) - 1) // 2]
        entry.update({k: middle[k] for k in ("rate", "goodput", "attainment", "mean_batch", "held")})
        entry["goodputs"] = [round(r["goodput"], 1) for r in entry["rounds"]]
    return _overloaded(out, chosen, overload, table, card, max_batch, slo_ms, duration_s, sim_duration_s, seed,
                       frames, labels, say)


def _overloaded(out: dict, chosen, overload: float, table, card, max_batch: int, slo_ms: float, duration_s: float,
                sim_duration_s: float, seed: int, frames, labels, say: Callable[[str], None]) -> dict:
    """The contenders of :data:`OVERLOADED` at ``overload`` times the plain staged contender's
    capacity (live where the run was live, else simulated): requests answered in time per second,
    and which exits answered. Past capacity the board must choose whom to serve; the allocation
    admits the cheapest requests first (``agent.exits.online``)."""
    from agent.api import Agent
    names = [c[0] for c in chosen]
    if not overload > 0 or not all(n in names for n in OVERLOADED):
        return out
    where = "live" if frames is not None else "sim"
    rate = overload * out[where][OVERLOADED[0]]["rate"]
    section = out["overload"] = {"factor": overload, "rate": rate, "sim": {}, "live": {}}
    for name, mode, batched, more in chosen:
        if name not in OVERLOADED:
            continue
        config = agent_config(mode, batched, max_batch, slo_ms, more)
        runs = {"sim": simulate_run(config, table, make_trace(rate, sim_duration_s, slo_ms, seed), seed, card)}
        if frames is not None:
            with Agent(config) as agent:
                runs["live"] = replay_exits(agent, make_trace(rate, duration_s, slo_ms, seed + 99), frames, labels)
        for kind, run in runs.items():
            section[kind][name] = {"goodput": run.goodput, "attainment": run.attainment, "exits": run.exits,
                                   "statuses": run.statuses}
            say(f"  {kind:<4} {name:<26} at {overload:g}x ({rate:.0f} req/s): {run.goodput:7.1f} req/s in SLO, "
                f"statuses {run.statuses}, answered by exit {run.exits}")
    return out


def format_exits(out: dict) -> str:
    names = list(out["sim"])
    base = "no-batch/no-exit"
    lines = [f"SLO {out['slo_ms']:g} ms, min_accuracy classes {out['classes']} (equal shares); throughput = requests "
             f"answered ok within the SLO per second at the highest rate with >= {100 * out['attainment']:g}% SLO "
             f"attainment"]
    head = f"{'contender':<26} {'sim req/s':>9} {'x base':>7} {'live req/s':>10} {'x base':>7} {'attain':>7} " \
           f"{'batch':>6}  delivered accuracy per class (asked: got)"
    lines += [head, "-" * len(head)]
    for name in names:
        sim = out["sim"][name]
        live = out["live"].get(name)
        sim_x = sim["goodput"] / out["sim"][base]["goodput"] if base in out["sim"] else float("nan")
        if live is not None:
            live_x = live["goodput"] / out["live"][base]["goodput"] if base in out["live"] else float("nan")
            accuracy = "  ".join(f"{c}: {a[0]:.3f}" for c, a in live["accuracy"].items())
            if not live.get("held", True):
                accuracy += "  (attainment never held live)"
            if len(live.get("goodputs", ())) > 1:
                accuracy += f"  rounds {live['goodputs']}"
            lines.append(f"{name:<26} {sim['goodput']:9.1f} {sim_x:6.2f}x {live['goodput']:10.1f} {live_x:6.2f}x "
                         f"{100 * live['attainment']:6.1f}% {live['mean_batch']:6.2f}  {accuracy}")
        else:
            lines.append(f"{name:<26} {sim['goodput']:9.1f} {sim_x:6.2f}x {'-':>10} {'':>7} "
                         f"{100 * sim['attainment']:6.1f}% {sim['mean_batch']:6.2f}")
    oracle = out.get("oracle")
    if oracle:
        parts = [f"{oracle[key]:.2f}x at batch {key.rsplit('_', 1)[1]}" for key in oracle if key.startswith("x_base_")]
        lines.append("ceiling of any exit rule, x base (an oracle that knows which exit answers each test frame "
                     f"right; this machine's stage times, compute alone): {', '.join(parts)}")
    section = out.get("overload")
    if section:
        lines.append(f"past capacity: {section['factor']:g}x the staged contender's rate ({section['rate']:.0f} req/s)")
        for kind in ("sim", "live"):
            for name, r in section[kind].items():
                lines.append(f"  {kind:<4} {name:<26} {r['goodput']:7.1f} req/s in SLO; answered by exit {r['exits']}; "
                             f"{r['statuses']}")
    return "\n".join(lines)
