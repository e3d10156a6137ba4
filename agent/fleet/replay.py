"""Checking a plan in the simulator: every board runs its applications' traces on the live scheduler.

Per board: the agent config the plan writes for it (``agent.fleet.emit``) is turned into the lanes
the live agent would build (``agent.sim.sim_models_from_config``), timed by the board kind's
profiled batch table and slowed by its fitted interference model (``simulate(slowdown=...)``), and
fed a Poisson trace of its applications at their stated rates (``agent.workload.generators``).

**When an application's SLO holds** (the definition the hosting counts use): at least
``attainment`` (default 99 %) of its requests in the replay are answered ``ok`` within their SLO;
a request refused, shed, late or unanswered counts against it. An application is **hosted** by a
plan when the plan places it and its SLO holds in the replay; one placed whose SLO does not hold
is a **violation**.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from agent.config import parse_config
from agent.fleet.apps import App
from agent.fleet.boards import Board
from agent.fleet.placement import Plan, Predictor
from agent.fleet.emit import board_config
from agent.sim.engine import sim_models_from_config, simulate
from agent.workload.generators import AppSpec, poisson
from agent.workload.trace import write_trace

__all__ = ["AppOutcome", "Replay", "replay_board", "replay_plan"]


@dataclass
class AppOutcome:
    app: str
    board: str
    requests: int
    within_slo: int
    statuses: dict[str, int]

    @property
    def attainment(self) -> float:
        return self.within_slo / self.requests if self.requests else 1.0


@dataclass
class Replay:
    method: str
    attainment: float
    apps: dict[str, AppOutcome] = field(default_factory=dict)
    goodput_per_s: dict[str, float] = field(default_factory=dict)     # per board: answered in SLO per second

    def holds(self, app: str) -> bool:
        return self.apps[app].attainment >= self.attainment

    @property
    def hosted(self) -> list[str]:
        return sorted(a for a in self.apps if self.holds(a))

    @property
    def violations(self) -> list[str]:
        return sorted(a for a in self.apps if not self.holds(a))

    @property
    def missed_requests(self) -> int:
        return sum(o.requests - o.within_slo for o in self.apps.values())


def replay_board(board: Board, apps: Sequence[App], *, duration_s: float = 20.0, trace_seed: int = 0,
                 predict: Predictor | None = None, jitter: float = 0.0,
                 trace_path: str | Path | None = None) -> tuple[dict[str, AppOutcome], float]:
    """Simulate one board hosting ``apps`` (its config as the plan writes it, a Poisson trace seeded
    ``trace_seed``): per-application outcomes and the board's goodput (answered in SLO per second)."""
    predict = predict or Predictor()
    kind = board.kind
    prediction = predict(board, apps)
    config = parse_config(board_config(board, prediction))
    tables = {m.name: kind.table(m.name) for m in config.models}
    models = sim_models_from_config(config, tables, jitter=jitter)
    total = sum(a.rate_per_s for a in apps)
    specs = [AppSpec(a.name, a.model, a.slo_ms, a.rate_per_s) for a in apps]
    trace = poisson(total, duration_s, specs, seed=trace_seed)
    if trace_path is not None:
        Path(trace_path).parent.mkdir(parents=True, exist_ok=True)
        write_trace(Path(trace_path), trace)
    slowdown = {m.name: (lambda n, _m=m.name: kind.slowdown(_m, n)) for m in config.models}
    sim = simulate(trace, models, config.worker_count, cores=kind.cores, hold_fraction=config.hold_fraction,
                   lookahead=config.admission_lookahead, edf_horizon_s=config.edf_horizon_s,
                   policy=config.policy, slowdown=slowdown)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    statuses: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for record in sim.records:
        counts[record.app][0] += 1
        counts[record.app][1] += int(record.within_slo)
        statuses[record.app][record.status] += 1
    outcomes = {}
    for app in apps:
        n, ok = counts.get(app.name, [0, 0])
        outcomes[app.name] = AppOutcome(app.name, board.name, n, ok, dict(statuses.get(app.name, {})))
    return outcomes, sum(r.within_slo for r in sim.records) / duration_s


def replay_plan(plan: Plan, *, duration_s: float = 20.0, seed: int = 0, attainment: float = 0.99,
                predict: Predictor | None = None, jitter: float = 0.0, trace_dir: str | Path | None = None) -> Replay:
    """Simulate every board of ``plan`` with its applications' traces; per-application outcomes.

    ``trace_dir``: also write each board's trace there (``<board>.csv``, trace v1), to replay the
    same arrivals against a live agent running the board's config (``edge-agent bench run``)."""
    predict = predict or Predictor()
    result = Replay(plan.method, attainment)
    by_name = {b.name: b for b in plan.boards}
    for index, (board_name, apps) in enumerate(sorted(plan.hosted.items())):
        if not apps:
            continue
        outcomes, goodput = replay_board(by_name[board_name], apps, duration_s=duration_s,
                                         trace_seed=seed * 7919 + index, predict=predict, jitter=jitter,
                                         trace_path=Path(trace_dir) / f"{board_name}.csv" if trace_dir else None)
        result.apps.update(outcomes)
        result.goodput_per_s[board_name] = goodput
    return result
