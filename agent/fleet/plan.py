"""One call from profiles and an application list to plans, replays and the files to deploy.

``make_plans`` runs the three placements (``agent.fleet.placement``) on the same fleet and order;
``compare`` replays each (``agent.fleet.replay``) and counts what it hosts; ``write_outputs``
writes, for the chosen plan, one agent config per board, the Kubernetes manifests and the report
(``report.json`` and ``report.txt``: the same figures the command prints).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from agent.fleet.apps import App, AppList
from agent.fleet.boards import Board, BoardKind, fleet_boards
from agent.fleet.emit import board_config, to_toml
from agent.fleet.k8s import board_manifests, to_yaml
from agent.fleet.latency import Settings
from agent.fleet.placement import Plan, Predictor, interference_aware, knapsack, local_search
from agent.fleet.replay import Replay, replay_plan

__all__ = ["Comparison", "make_plans", "compare", "write_outputs", "random_apps", "format_report"]


@dataclass
class Comparison:
    plans: dict[str, Plan]
    replays: dict[str, Replay]
    duration_s: float = 0.0
    seed: int = 0

    def hosted(self, method: str) -> int:
        return len(self.replays[method].hosted)

    def ratio(self, method: str, baseline: str = "knapsack") -> float:
        base = self.hosted(baseline)
        return self.hosted(method) / base if base else float("inf")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"hosting": "an application counts as hosted when the plan places it and, in the "
                                          "simulated replay, at least attainment of its requests are answered ok "
                                          "within its SLO; placed but below that is a violation",
                               "methods": {}}
        for method, plan in self.plans.items():
            replay = self.replays[method]
            out["methods"][method] = {
                "placed": plan.placed_count,
                "unplaced": [a.name for a in plan.unplaced],
                "hosted": self.hosted(method),
                "violations": replay.violations,
                "missed_requests": replay.missed_requests,
                "requests": sum(o.requests for o in replay.apps.values()),
                "ratio_to_knapsack": self.ratio(method) if "knapsack" in self.plans else None,
                "boards": {b: [a.name for a in apps] for b, apps in plan.hosted.items()},
                "goodput_per_s": {b: round(g, 2) for b, g in sorted(replay.goodput_per_s.items())},
                "attainment": {a: round(o.attainment, 4) for a, o in sorted(replay.apps.items())},
            }
        out["attainment_threshold"] = next(iter(self.replays.values())).attainment if self.replays else None
        out["replay"] = {"duration_s": self.duration_s, "seed": self.seed}
        return out


def make_plans(boards: Sequence[Board], apps: Sequence[App], settings: Settings = Settings(),
               search_budget_s: float = 20.0, *, search_iterations: int = 400, check_duration_s: float = 20.0,
               seed: int = 0, attainment: float = 0.99, jitter: float = 0.0,
               progress: Callable[[str], None] | None = None) -> tuple[dict[str, Plan], Predictor]:
    """The three plans: knapsack (baseline), interference-aware (the paper's), local search (ours:
    the search, then each board checked in the simulator on traces of its own,
    :func:`agent.fleet.verify.simulation_checked`; ``check_duration_s`` 0 skips the check)."""
    from agent.fleet.verify import simulation_checked
    predict = Predictor(settings)
    ours = interference_aware(boards, apps, predict)
    searched = local_search(boards, apps, predict, budget_s=search_budget_s, start=ours,
                            iterations=search_iterations, progress=progress)
    if check_duration_s > 0:
        searched = simulation_checked(searched, predict, duration_s=check_duration_s, seed=seed,
                                      attainment=attainment, jitter=jitter, progress=progress)
        if progress:
            progress(f"simulation check: {searched.placed_count} placed")
    return {
        "knapsack": knapsack(boards, apps),
        "interference_aware": ours,
        "local_search": searched,
    }, predict


def compare(plans: dict[str, Plan], predict: Predictor, *, duration_s: float = 20.0, seed: int = 0,
            attainment: float = 0.99, jitter: float = 0.0, trace_dir: str | Path | None = None,
            trace_method: str | None = None) -> Comparison:
    """Replay each plan; ``trace_dir``: write ``trace_method``'s per-board traces there."""
    return Comparison(plans, {m: replay_plan(p, duration_s=duration_s, seed=seed, attainment=attainment,
                                             predict=predict, jitter=jitter,
                                             trace_dir=trace_dir if m == trace_method else None)
                              for m, p in plans.items()}, duration_s, seed)


def format_report(comparison: Comparison, chosen: str) -> str:
    lines = [f"{'method':<20} {'placed':>6} {'hosted':>6} {'violations':>10} {'missed/requests':>16} {'x knapsack':>10}"]
    for method, plan in comparison.plans.items():
        replay = comparison.replays[method]
        total = sum(o.requests for o in replay.apps.values())
        ratio = comparison.ratio(method) if "knapsack" in comparison.plans else float("nan")
        lines.append(f"{method:<20} {plan.placed_count:>6} {comparison.hosted(method):>6} "
                     f"{len(replay.violations):>10} {f'{replay.missed_requests}/{total}':>16} {ratio:>10.2f}")
    threshold = next(iter(comparison.replays.values())).attainment
    lines.append("knapsack: the baseline (memory and cores alone); interference_aware: the Ibis paper's "
                 "model-driven packing; local_search: ours (packing starts, one-move repairs, a large-neighbourhood "
                 "search, then each board checked in the simulator on traces other than this replay's)")
    lines.append(f"hosted = placed and >= {threshold:.0%} of its requests answered ok within its SLO in the "
                 f"simulated replay; the files written are the {chosen} plan's")
    for method in comparison.plans:
        bad = comparison.replays[method].violations
        if bad:
            shown = ", ".join(f"{a} ({comparison.replays[method].apps[a].attainment:.1%})" for a in bad[:8])
            lines.append(f"  {method} violations: {shown}{' ...' if len(bad) > 8 else ''}")
    return "\n".join(lines)


def write_outputs(out_dir: str | Path, plan: Plan, predict: Predictor, comparison: Comparison, *,
                  broker_host: str = "127.0.0.1", broker_port: int = 1883, image: str = "edge-agent:latest",
                  namespace: str = "edge-agent", kubeedge: bool = False) -> list[Path]:
    """Write ``configs/<board>.toml``, ``k8s/manifests.yaml``, ``push.sh`` (the same models pushed to
    running agents with ``load-model``), ``report.json`` and ``report.txt``."""
    out = Path(out_dir)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "k8s").mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    documents: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}]
    for board in plan.boards:
        apps = plan.hosted.get(board.name, [])
        if not apps:
            continue
        prediction = predict(board, apps)
        config = board_config(board, prediction, broker_host=broker_host, broker_port=broker_port)
        header = (f"edge-agent config for board {board.name} (kind {board.kind.name}), written by edge-agent plan "
                  f"({plan.method}).\napplications: " + ", ".join(f"{a.name} ({a.model}, {a.rate_per_s:g}/s, "
                                                                  f"SLO {a.slo_ms:g} ms)" for a in apps)
                  + f"\npredicted load {prediction.load:.2f} of {board.kind.workers} slots, "
                    f"p99 wait {prediction.wait_s * 1e3:.1f} ms")
        text = to_toml(config, header)
        path = out / "configs" / f"{board.name}.toml"
        path.write_text(text)
        written.append(path)
        documents += board_manifests(board.name, board.kind.name, text, namespace=namespace, image=image,
                                     cpu_request=board.kind.cpu_request, cpu_limit=board.kind.cpu_limit,
                                     memory_mb=max(128.0, prediction.memory_mb + 64.0),
                                     device_resource=board.kind.device_resource, kubeedge=kubeedge)
    path = out / "k8s" / "manifests.yaml"
    path.write_text(to_yaml(documents))
    written.append(path)
    path = out / "push.sh"
    path.write_text(push_script(plan, predict, broker_host=broker_host, broker_port=broker_port))
    path.chmod(0o755)
    written.append(path)
    path = out / "report.json"
    path.write_text(json.dumps({"chosen": plan.method, **comparison.to_dict()}, indent=1) + "\n")
    written.append(path)
    path = out / "report.txt"
    path.write_text(format_report(comparison, plan.method) + "\n")
    written.append(path)
    return written


def push_script(plan: Plan, predict: Predictor, *, broker_host: str, broker_port: int) -> str:
    """A shell script that loads the plan's models into boards already running an agent, with the
    signed ``load-model`` control command (``edge-agent ctl``; the key from $EDGE_AGENT_KEY)."""
    import shlex
    lines = ["#!/bin/sh", f"# Written by edge-agent plan ({plan.method}): load each board's models into its running agent.",
             "# Needs the operator key ($EDGE_AGENT_KEY or add --key FILE) and boards whose config subscribes \"cmd\".",
             "# A board already serving a model of the same name refuses load-model: for boards that serve",
             "# models already, edge-agent push-plan --plan DIR unloads, changes and loads what differs.",
             "set -e"]
    for board in plan.boards:
        apps = plan.hosted.get(board.name, [])
        if not apps:
            continue
        config = board_config(board, predict(board, apps), broker_host=broker_host, broker_port=broker_port)
        for model in config["models"]:
            args = ["edge-agent", "ctl", "--device", board.name, "--host", broker_host, "--port", str(broker_port),
                    "load-model"]
            for key, value in model.items():
                flag = "--" + key.replace("_", "-")
                args += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
            lines.append(" ".join(shlex.quote(a) for a in args))
    return "\n".join(lines) + "\n"


def random_apps(n: int, seed: int, models: Sequence[str] = ("mobilenet_digits", "resnet_digits", "camera_digits"),
                ) -> AppList:
    """A seeded application mix for sensitivity runs: per model a range of rates and SLO classes
    (tight and loose), scaled to the shipped demo models' cost (camera >> resnet >> mobilenet)."""
    rng = random.Random(seed)
    ranges = {"mobilenet_digits": ((40, 400), (10, 15, 30, 50)),
              "resnet_digits": ((10, 100), (25, 40, 80, 150)),
              "camera_digits": ((2, 25), (60, 100, 200, 400))}
    apps = []
    for i in range(n):
        model = models[i % len(models)]
        (lo, hi), slos = ranges.get(model, ((5, 50), (50, 100, 200)))
        apps.append(App(f"app{i:03d}-{model.split('_')[0]}", model, float(round(rng.uniform(lo, hi))),
                        float(rng.choice(slos))))
    return AppList(tuple(apps))


def fleet(kinds: dict[str, BoardKind], apps: AppList, counts: dict[str, int] | None = None) -> list[Board]:
    return fleet_boards(kinds, counts if counts else apps.fleet or None)
