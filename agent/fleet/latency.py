"""Predicted latency of every application on one board: the planner's interference-aware model.

What comes from the paper (Ibis, PAPERS.md section 2) and what is ours:

* **From Ibis:** the structure. Co-located models slow each other through a shared resource, so a
  placement is feasible only if the predicted latency of *every* application already on the board,
  not only the new one, stays under its SLO; utilisation is capped below 1 (Ibis: 0.8); the
  applications of one model share one backend (Ibis's "MaaS" mode: rates summed, the tightest SLO
  rules the model's batching).
* **Ours** (Ibis's formulas are for one GPU under processor sharing or one Edge TPU under FCFS;
  our boards have several cores, batch, and have the profiler's interference model):

  - A board has ``W`` execution slots (the agent's ``workers``). Model ``m`` runs batches of ``b_m``;
    a batch's time with ``k`` batches running is the profile's ``t_m(b, k)``
    (``BoardKind.service_s``: isolated time times the fitted slowdown, which holds both sharing
    and contention).
  - Offered load in slots: ``a = sum_m (Lambda_m / b_m) * t_m(b_m, k)``, with ``k`` the number of
    batches a batch runs beside on average, itself and each other slot busy with chance ``a / W``:
    ``k = 1 + (W - 1) * min(1, a / W)``; a fixed point (iterated; ``t`` grows with ``k``). Where
    co-running batches slow each other much (``gamma`` near 1 on this 2-core machine) this is what
    makes a second slot add little capacity, which a knapsack counting cores does not see.
  - Waiting for a slot, at quantile ``q``: the board is a W-server queue of batches. The chance to
    wait is Erlang C ``C(W, a)``; the wait, given one, has the Allen-Cunneen mean
    ``E[S^2] / (2 E[S] (W - a))`` (Pollaczek-Khinchine's for W = 1, as Ibis uses for the Edge TPU)
    and an exponential tail, so the ``q``-quantile is that mean times ``ln(C / (1 - q))`` (0 when
    ``C <= 1 - q``).
  - Service at the tail: ``t_m(b_m, k_tail)``, ``k_tail = W`` when all slots are busy more often
    than ``1 - q`` (``C(W, a) > 1 - q``), else ``min(W, floor(a) + 1)``.
  - Head-of-line blocking: batches are not preempted, so when a request waits at all more often
    than ``1 - q`` (``C > 1 - q``) its wait at the tail is at least the board's longest batch,
    ``max_o t_o(b_o, k_tail)``, added to the queueing wait. This keeps a tight application off a
    board that runs long batches of another model. Weaker versions (the larger of the two instead
    of the sum; blocking only when all slots held long batches more often than ``1 - q``) let the
    replay miss the SLO of a looser mobilenet application beside camera batches under EDF.
  - Batch formation: a batch of ``b > 1`` waits ``(b - 1) / Lambda_m`` for its last request.
  - Application ``i`` of model ``m`` fits when ``wait_q + fill + t_m(b_m, k_tail) <= margin * SLO_i``
    and ``a <= rho_max * W``.
  - ``b_m`` is chosen per model among the profiled batch sizes by coordinate descent on the
    worst ratio latency / SLO over the board's applications (batching pays on a GPU, where the
    per-call cost dominates, and costs latency on a CPU, where it does not).

The emitted ``max_batch`` (``ModelPrediction.max_batch``) is the largest profiled batch whose
interfered time takes at most a quarter of the model's tightest SLO (at least ``b_m``): under a
burst the agent may batch more than ``b_m`` and still answer in time. With half the SLO, bursts
formed batches long enough that the model's own tight requests missed in the replay.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from agent.fleet.apps import App
from agent.fleet.boards import BoardKind

__all__ = ["Settings", "ModelPrediction", "BoardPrediction", "erlang_c", "predict_board"]


@dataclass(frozen=True)
class Settings:
    """The model's knobs: the latency quantile it bounds, the load cap, the share of the SLO used."""

    quantile: float = 0.99
    rho_max: float = 0.8          # Ibis's SYSTEM_THRESHOLD
    slo_margin: float = 0.8       # predicted latency <= margin * SLO (the rest: what the model leaves out)


@dataclass
class ModelPrediction:
    model: str
    rate_per_s: float
    slo_s: float                  # the tightest SLO of its applications here
    batch: int                    # b_m: the batch the board is predicted to run at this load
    max_batch: int                # the emitted batching limit
    instances: int                # emitted: enough to keep the slots it needs busy, plus one
    service_s: float              # t_m(b_m, k_tail)
    fill_s: float
    load: float                   # this model's share of ``a`` (slots)


@dataclass
class BoardPrediction:
    feasible: bool
    reason: str
    load: float                   # a, slots busy on average
    k: float                      # the fixed point's mean concurrency
    wait_s: float                 # the q-quantile wait for a slot
    memory_mb: float
    models: dict[str, ModelPrediction] = field(default_factory=dict)
    latency_s: dict[str, float] = field(default_factory=dict)     # per application, predicted at quantile q

    @property
    def worst_ratio(self) -> float:
        return max((v for v in self.ratios.values()), default=0.0)

    ratios: dict[str, float] = field(default_factory=dict)         # latency / SLO per application


def erlang_c(servers: int, load: float) -> float:
    """Probability that an arrival waits in an M/M/``servers`` queue offered ``load`` (Erlangs)."""
    if load <= 0:
        return 0.0
    if load >= servers:
        return 1.0
    # Erlang B by the stable recursion, then C from B.
    b = 1.0
    for n in range(1, servers + 1):
        b = load * b / (n + load * b)
    rho = load / servers
    return b / (1.0 - rho + rho * b)


def _group(apps: Iterable[App]) -> dict[str, list[App]]:
    out: dict[str, list[App]] = {}
    for app in apps:
        out.setdefault(app.model, []).append(app)
    return out


def _evaluate(kind: BoardKind, groups: dict[str, list[App]], batches: dict[str, int],
              settings: Settings) -> BoardPrediction:
    workers = kind.workers
    rates = {m: sum(a.rate_per_s for a in apps) for m, apps in groups.items()}
    k = 1.0
    load = 0.0
    for _ in range(30):
        load = sum(rates[m] / batches[m] * kind.service_s(m, batches[m], k) for m in groups)
        new_k = 1.0 + (workers - 1) * min(1.0, load / workers)
        if abs(new_k - k) < 1e-6:
            break
        k = new_k
    prediction = BoardPrediction(True, "", load, k, 0.0, 0.0)
    c = erlang_c(workers, load)
    tail = 1.0 - settings.quantile
    # At the tail every slot is busy (when that happens more often than 1 - q): batches run at k = W.
    k_tail = float(workers) if c > tail else min(float(workers), math.floor(load) + 1.0)
    if load > settings.rho_max * workers:
        prediction.feasible = False
        prediction.reason = f"load {load:.2f} slots > {settings.rho_max:g} x {workers} workers"
        prediction.wait_s = math.inf
    else:
        # Queueing (Allen-Cunneen): the conditional wait's mean is E[S^2] / (2 E[S] (W - a)), its
        # tail taken exponential; E over batches, each model's batch time at k_tail.
        batch_rates = {m: rates[m] / batches[m] for m in groups}
        times = {m: kind.service_s(m, batches[m], k_tail) for m in groups}
        total = sum(batch_rates.values())
        mean = sum(batch_rates[m] * times[m] for m in groups) / total
        second = sum(batch_rates[m] * times[m] ** 2 for m in groups) / total
        queueing = second / (2 * mean * (workers - load)) * math.log(c / tail) if c > tail else 0.0
        # Head-of-line blocking (batches are not preempted): a request that has to wait at all
        # (chance C > 1 - q) can find a slot's batch of the board's longest model just started.
        blocking = max(times.values()) if c > tail else 0.0
        prediction.wait_s = queueing + blocking
    for m, apps in groups.items():
        slo_s = min(a.slo_ms for a in apps) / 1e3
        b = batches[m]
        service = kind.service_s(m, b, k_tail)
        fill = (b - 1) / rates[m] if b > 1 else 0.0
        sizes = kind.batch_sizes(m)
        fitting = [s for s in sizes if kind.service_s(m, s, k_tail) <= 0.25 * slo_s]
        max_batch = max([b, *fitting])
        model_load = rates[m] / b * kind.service_s(m, b, k)
        instances = max(1, min(workers, math.ceil(model_load - 1e-9) + 1))
        prediction.models[m] = ModelPrediction(m, rates[m], slo_s, b, max_batch, instances, service, fill, model_load)
        for a in apps:
            latency = prediction.wait_s + fill + service
            prediction.latency_s[a.name] = latency
            ratio = latency / (a.slo_ms / 1e3)
            prediction.ratios[a.name] = ratio
            if prediction.feasible and latency > settings.slo_margin * a.slo_ms / 1e3:
                prediction.feasible = False
                prediction.reason = (f"{a.name}: predicted {latency * 1e3:.1f} ms > {settings.slo_margin:g} x "
                                     f"SLO {a.slo_ms:g} ms")
    prediction.memory_mb = sum(p.instances * kind.instance_mb(m) for m, p in prediction.models.items())
    if prediction.feasible and prediction.memory_mb > kind.memory_mb:
        prediction.feasible = False
        prediction.reason = f"memory {prediction.memory_mb:.0f} MB > {kind.memory_mb:.0f} MB"
    return prediction


def _score(p: BoardPrediction) -> tuple:
    # Feasible first, then the worst latency/SLO ratio, then the load (leaves room for more).
    return (not p.feasible, p.worst_ratio if math.isfinite(p.wait_s) else math.inf, p.load)


def predict_board(kind: BoardKind, apps: Sequence[App], settings: Settings = Settings()) -> BoardPrediction:
    """Predict every application's latency on a board of ``kind`` hosting ``apps``; pick batches.

    Raises KeyError when an application's model is not in the board's profile.
    """
    groups = _group(apps)
    for m in groups:
        if not kind.serves(m):
            raise KeyError(f"model {m!r} is not profiled on board kind {kind.name!r} (it has {kind.models})")
    if not groups:
        return BoardPrediction(True, "", 0.0, 0.0, 0.0, 0.0)
    batches = {m: kind.batch_sizes(m)[0] for m in groups}
    best = _evaluate(kind, groups, batches, settings)
    for _ in range(2):
        improved = False
        for m in sorted(groups):
            for size in kind.batch_sizes(m):
                if size == batches[m]:
                    continue
                trial = dict(batches)
                trial[m] = size
                candidate = _evaluate(kind, groups, trial, settings)
                if _score(candidate) < _score(best):
                    best, batches, improved = candidate, trial, True
        if not improved:
            break
    return best
