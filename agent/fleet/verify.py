"""Checking a plan's boards in the simulator before it is written, on traces of their own.

The latency model (``agent.fleet.latency``) is a queueing approximation: a search that packs
boards up to the model's limit finds the places where it is optimistic (a board of long batches
near its load cap, its tail a little longer than the model's). :func:`simulation_checked` runs
each board of a plan in the simulator (``agent.fleet.replay.replay_board``: the board's written
config on the live scheduler, the profile's interference model) on Poisson traces seeded apart from
the report's replay, so the report stays a check on arrivals the planner never saw. A board where
an application misses its SLO gives up one application at a time, the one whose removal lets the
rest hold (the smallest such; else the one that leaves the best attainment), until it holds; each
application given up is then offered to the other boards that take it under the latency model, in
the order the packing prefers, and placed on the first where the simulator agrees, else left out.
"""
from __future__ import annotations

from typing import Callable, Sequence

from agent.fleet.apps import App
from agent.fleet.boards import Board
from agent.fleet.placement import Plan, Predictor, _copy, _demand
from agent.fleet.replay import replay_board

__all__ = ["CHECK_SEED", "simulation_checked"]

#: Added to the report's replay seed for the check's traces (a different stream of arrivals).
CHECK_SEED = 104_729


def simulation_checked(plan: Plan, predict: Predictor, *, duration_s: float = 20.0, seed: int = 0,
                       attainment: float = 0.99, jitter: float = 0.0,
                       progress: Callable[[str], None] | None = None) -> Plan:
    """A copy of ``plan`` whose every board holds every SLO in the simulator (module docstring)."""
    out = _copy(plan, plan.method)
    by_name = {b.name: b for b in plan.boards}
    index = {b.name: i for i, b in enumerate(plan.boards)}
    cache: dict[tuple, float] = {}

    def worst(board: Board, apps: Sequence[App]) -> float:
        """The lowest attainment of an application on ``board`` hosting ``apps``, simulated."""
        if not apps:
            return 1.0
        key = (board.name, frozenset(a.name for a in apps))
        if key not in cache:
            outcomes, _ = replay_board(board, apps, duration_s=duration_s, predict=predict, jitter=jitter,
                                       trace_seed=(seed + CHECK_SEED) * 7919 + index[board.name])
            cache[key] = min(o.attainment for o in outcomes.values())
        return cache[key]

    given_up: list[App] = []
    for name in sorted(out.hosted):
        board = by_name[name]
        while out.hosted[name] and worst(board, out.hosted[name]) < attainment:
            apps = out.hosted[name]
            trials = [(worst(board, [a for a in apps if a is not app]), app) for app in apps]
            holding = [app for w, app in trials if w >= attainment]
            if holding:
                drop = min(holding, key=lambda a: (_demand(a, plan.boards), a.name))
            else:
                drop = max(trials, key=lambda t: (t[0], -_demand(t[1], plan.boards)))[1]
            out.hosted[name] = [a for a in apps if a is not drop]
            given_up.append(drop)
            if progress:
                progress(f"simulation check: {board.name} gives up {drop.name} (an SLO missed in the simulator)")
    for app in sorted(given_up, key=lambda a: (_demand(a, plan.boards), a.name)):
        options = []
        for board in plan.boards:
            current = out.hosted[board.name]
            if not board.kind.serves(app.model):
                continue
            prediction = predict(board, [*current, app])
            if not prediction.feasible:
                continue
            serving = any(a.model == app.model for a in current)
            options.append((not serving, prediction.load / board.kind.workers, board.name))
        for _, _, name in sorted(options):
            if worst(by_name[name], [*out.hosted[name], app]) >= attainment:
                out.hosted[name].append(app)
                if progress:
                    progress(f"simulation check: {app.name} placed again on {name}")
                break
        else:
            out.unplaced.append(app)
    return out
