"""Placing applications on the fleet's boards: three methods, one plan type.

* :func:`knapsack` — **the baseline** ("traditional knapsack hosting", Ibis's comparison): a board
  takes an application while its memory and its compute capacity hold, compute counted as the
  application's rate times its model's isolated batch-1 time against the board's cores. It ignores
  interference between co-located models and queueing, so it fills a board to 100 % of its cores.
* :func:`interference_aware` — **the paper's approach** (Ibis: model-driven, interference-aware
  bin packing): a board takes an application only if the latency model
  (:func:`agent.fleet.latency.predict_board`) predicts that every application on it, the new one and
  those already there, keeps its SLO. Among the boards that can take it: one already serving the
  model (the applications share its backend, Ibis's "MaaS"), then the smallest increase in predicted
  utilisation (Ibis's heterogeneous ``best`` rule).
* :func:`local_search` — **ours, beyond the paper**: starts from the interference-aware plan and
  from packings in other orders (long-batch models first, loosest SLO first) and with a "pack"
  board rule (the fullest feasible board: long batches group and leave other boards to tight
  applications), hosts in each what it left out by moving one hosted application to another board
  to make room (an ejection chain of depth one), keeps the plan hosting the most, then runs a
  seeded large-neighbourhood search from it (ruin and recreate: empty a board or two and a few
  applications elsewhere, place them and what was left out again in a noisy smallest-demand-first
  order, repair); every board stays feasible under the same model. Why the second stage: the
  packing starts and one-move repairs stop where hosting one more application needs several
  applications to change boards at once, which on mixes of long-batch and tight-SLO models left a
  fifth of what the model can host unplaced (``agent.fleet.verify`` then checks the result in the
  simulator).

All three see the applications in the same order (smallest compute demand first: what maximises
the count for a knapsack), so they differ only in what they check.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from agent.fleet.apps import App
from agent.fleet.boards import Board
from agent.fleet.latency import BoardPrediction, Settings, predict_board

__all__ = ["METHODS", "Plan", "Predictor", "app_order", "knapsack", "interference_aware", "local_search"]

METHODS = ("knapsack", "interference_aware", "local_search")


@dataclass
class Plan:
    """Which applications each board hosts (by board name), and those no board could take."""

    method: str
    boards: list[Board]
    hosted: dict[str, list[App]] = field(default_factory=dict)
    unplaced: list[App] = field(default_factory=list)

    def board_of(self, app_name: str) -> str | None:
        for board, apps in self.hosted.items():
            if any(a.name == app_name for a in apps):
                return board
        return None

    @property
    def placed_count(self) -> int:
        return sum(len(v) for v in self.hosted.values())


class Predictor:
    """``predict_board`` with a cache: the searches ask about the same board contents many times."""

    def __init__(self, settings: Settings = Settings()) -> None:
        self.settings = settings
        self._cache: dict[tuple, BoardPrediction] = {}

    def __call__(self, board: Board, apps: Sequence[App]) -> BoardPrediction:
        key = (board.kind.name, frozenset(a.name for a in apps))
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = predict_board(board.kind, apps, self.settings)
        return hit


def _demand(app: App, boards: Sequence[Board]) -> float:
    """An application's smallest share of a board's cores at batch 1, over the boards that serve it."""
    shares = [app.rate_per_s * b.kind.isolated_s(app.model, 1) / b.kind.cores
              for b in boards if b.kind.serves(app.model)]
    return min(shares) if shares else float("inf")


def app_order(apps: Sequence[App], boards: Sequence[Board]) -> list[App]:
    """Smallest demand first (ties: by name), the order every method sees."""
    return sorted(apps, key=lambda a: (_demand(a, boards), a.name))


def _empty(method: str, boards: Sequence[Board]) -> Plan:
    return Plan(method, list(boards), {b.name: [] for b in boards}, [])


def knapsack(boards: Sequence[Board], apps: Sequence[App]) -> Plan:
    """The baseline: first fit on memory and compute capacity alone (see the module docstring)."""
    plan = _empty("knapsack", boards)
    used_cpu = {b.name: 0.0 for b in boards}
    for app in app_order(apps, boards):
        for board in boards:
            kind = board.kind
            if not kind.serves(app.model):
                continue
            cpu = app.rate_per_s * kind.isolated_s(app.model, 1)
            models = {a.model for a in plan.hosted[board.name]} | {app.model}
            memory = sum(kind.workers * kind.instance_mb(m) for m in models)
            if used_cpu[board.name] + cpu <= kind.cores and memory <= kind.memory_mb:
                plan.hosted[board.name].append(app)
                used_cpu[board.name] += cpu
                break
        else:
            plan.unplaced.append(app)
    return plan


def _best_board(app: App, plan: Plan, predict: Predictor, skip: str | None = None,
                rule: str = "spread") -> Board | None:
    """The board that takes ``app``, or None when none can. ``rule``: ``"spread"`` (Ibis: a board
    already serving the model, then the smallest increase in predicted utilisation) or ``"pack"``
    (ours, for local search: a board serving the model, then the fullest board that still takes it,
    which keeps other boards free for applications that cannot share with long batches)."""
    best, best_key = None, None
    for index, board in enumerate(plan.boards):
        if board.name == skip or not board.kind.serves(app.model):
            continue
        current = plan.hosted[board.name]
        after = predict(board, [*current, app])
        if not after.feasible:
            continue
        before = predict(board, current).load if current else 0.0
        serving = any(a.model == app.model for a in current)
        if rule == "pack":
            key = (not serving, -before / board.kind.workers, index)
        else:
            key = (not serving, (after.load - before) / board.kind.workers, index)
        if best_key is None or key < best_key:
            best, best_key = board, key
    return best


def interference_aware(boards: Sequence[Board], apps: Sequence[App], predict: Predictor | None = None,
                       order: Sequence[App] | None = None, rule: str = "spread") -> Plan:
    """The paper's approach: model-driven, interference-aware bin packing (module docstring).
    ``order`` and ``rule`` are for :func:`local_search`'s other starts; the defaults are the paper's."""
    predict = predict or Predictor()
    plan = _empty("interference_aware", boards)
    for app in (order if order is not None else app_order(apps, boards)):
        board = _best_board(app, plan, predict, rule=rule)
        if board is None:
            plan.unplaced.append(app)
        else:
            plan.hosted[board.name].append(app)
    return plan


def _orders(apps: Sequence[App], boards: Sequence[Board]) -> list[list[App]]:
    """The orders local search starts from: the paper's (smallest demand first), the models with
    the longest batches first (they group, and leave the other boards to tight applications), and
    the loosest SLO first."""
    def batch_s(app: App) -> float:
        times = [b.kind.isolated_s(app.model, 1) for b in boards if b.kind.serves(app.model)]
        return min(times) if times else 0.0
    base = app_order(apps, boards)
    return [base, sorted(base, key=lambda a: -batch_s(a)), sorted(base, key=lambda a: -a.slo_ms)]


def _repair(plan: Plan, boards: Sequence[Board], predict: Predictor, deadline: float,
            clock: Callable[[], float]) -> None:
    """Host what ``plan`` left out, one move each: straight onto a board, or onto a board after one
    of its applications moves to another board; until a pass hosts nothing more or ``deadline``."""
    by_name = {b.name: b for b in boards}
    changed = True
    while changed and plan.unplaced and clock() < deadline:
        changed = False
        for app in list(plan.unplaced):
            if clock() >= deadline:
                break
            target = _best_board(app, plan, predict)
            if target is not None:
                plan.hosted[target.name].append(app)
                plan.unplaced.remove(app)
                changed = True
                continue
            moved = False
            for board_name, hosted in plan.hosted.items():
                board = by_name[board_name]
                if moved or not board.kind.serves(app.model):
                    continue
                for victim in sorted(hosted, key=lambda a: -_demand(a, boards)):
                    rest = [a for a in hosted if a.name != victim.name]
                    if not predict(board, [*rest, app]).feasible:
                        continue
                    other = _best_board(victim, plan, predict, skip=board_name)
                    if other is None:
                        continue
                    plan.hosted[board_name] = [*rest, app]
                    plan.hosted[other.name].append(victim)
                    plan.unplaced.remove(app)
                    moved = changed = True
                    break


def _copy(plan: Plan, method: str = "local_search") -> Plan:
    return Plan(method, list(plan.boards), {k: list(v) for k, v in plan.hosted.items()}, list(plan.unplaced))


def _slack(plan: Plan, predict: Predictor) -> float:
    """The plan's free capacity: slots left under the load cap, summed over boards, in board
    units (the tie-break between plans hosting as many: more room is more robust)."""
    by_name = {b.name: b for b in plan.boards}
    return sum(1.0 - predict(by_name[n], apps).load / by_name[n].kind.workers
               for n, apps in plan.hosted.items() if apps)


def _ruin_recreate(plan: Plan, boards: Sequence[Board], predict: Predictor, rng: random.Random,
                   deadline: float, clock: Callable[[], float]) -> Plan:
    """One step of the large-neighbourhood search: empty one or two boards (chosen at random, the
    boards holding what was left out's models likelier) and a few random applications elsewhere,
    then place what was removed and what was left out again, in a random order biased to the
    smallest demand first, by a board rule chosen at random, and repair (:func:`_repair`)."""
    trial = _copy(plan)
    names = [b.name for b in boards]
    left_models = {a.model for a in trial.unplaced}
    weights = [1.0 + 2.0 * any(a.model in left_models for a in trial.hosted[n]) for n in names]
    emptied = sorted(set(rng.choices(names, weights, k=rng.choice((1, 1, 2)))))    # sorted: no hash order
    removed: list[App] = []
    for name in emptied:
        removed += trial.hosted[name]
        trial.hosted[name] = []
    for name in names:
        if name in emptied:
            continue
        for app in list(trial.hosted[name]):
            if rng.random() < 0.1:
                trial.hosted[name].remove(app)
                removed.append(app)
    pending = removed + trial.unplaced
    trial.unplaced = []
    # Smallest demand first, each key perturbed: the packing order with noise.
    order = sorted(pending, key=lambda a: _demand(a, boards) * rng.uniform(0.5, 2.0))
    rule = rng.choice(("spread", "pack"))
    for app in order:
        board = _best_board(app, trial, predict, rule=rule)
        if board is None:
            trial.unplaced.append(app)
        else:
            trial.hosted[board.name].append(app)
    _repair(trial, boards, predict, deadline, clock)
    return trial


def local_search(boards: Sequence[Board], apps: Sequence[App], predict: Predictor | None = None,
                 budget_s: float = 20.0, start: Plan | None = None,
                 clock: Callable[[], float] = time.monotonic, iterations: int = 400, seed: int = 0,
                 progress: Callable[[str], None] | None = None) -> Plan:
    """Ours: several starts of the interference-aware packing (the paper's, ``start`` when given;
    other orders and the "pack" board rule, :func:`_orders`), each repaired by one-move ejections
    (:func:`_repair`); then, from the best of them, ``iterations`` steps of a large-neighbourhood
    search (:func:`_ruin_recreate`: empty a board or two, place again, repair), each step kept when
    it hosts at least as many (more free capacity breaks ties; equal plans are kept too, so the
    search walks plateaus). Every board of every candidate is feasible under the same latency
    model. Seeded (``seed``): the same inputs give the same plan unless ``budget_s`` runs out first."""
    predict = predict or Predictor()
    deadline = clock() + budget_s
    base = start or interference_aware(boards, apps, predict)
    candidates = [base]
    for order in _orders(apps, boards):
        for rule in ("spread", "pack"):
            if clock() < deadline:
                candidates.append(interference_aware(boards, apps, predict, order=order, rule=rule))
    best = None
    for candidate in candidates:
        if clock() >= deadline and best is not None:
            break
        plan = _copy(candidate)
        _repair(plan, boards, predict, deadline, clock)
        if best is None or plan.placed_count > best.placed_count:
            best = plan
    if progress:
        progress(f"local_search: {best.placed_count} placed after the packing starts")
    rng = random.Random(seed)
    current = best
    best_key = (best.placed_count, _slack(best, predict))
    step = 0
    for step in range(1, iterations + 1):
        if clock() >= deadline or not current.unplaced:
            break
        trial = _ruin_recreate(current, boards, predict, rng, deadline, clock)
        if trial.placed_count >= current.placed_count:
            current = trial
            key = (trial.placed_count, _slack(trial, predict))
            if key > best_key:
                if progress and trial.placed_count > best.placed_count:
                    progress(f"local_search: {trial.placed_count} placed at step {step}")
                best, best_key = trial, key
        if progress and step % 100 == 0:
            progress(f"local_search: step {step} of {iterations}, best {best.placed_count} placed")
    if progress:
        stopped = ("all placed" if not current.unplaced else
                   "budget spent" if clock() >= deadline and step < iterations else f"{step} steps")
        progress(f"local_search: {best.placed_count} placed ({stopped})")
    return best
