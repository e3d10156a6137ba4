"""``edge-agent plan``: board profiles and an application list in; agent configs, Kubernetes
manifests and a report against knapsack out. Mounted by ``agent.cli.build_parser``; heavy imports
happen in the handler so ``edge-agent --help`` stays fast.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_plan_parser", "cmd_plan"]


def _board_counts(text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for part in text.split(","):
        kind, sep, number = part.partition("=")
        try:
            value = int(number)
        except ValueError:
            value = -1
        if not sep or not kind or value < 0:
            raise argparse.ArgumentTypeError(f"{part!r}: expected KIND=N[,KIND=N...], e.g. cpu-2core=2,jetson-like=1")
        counts[kind] = value
    return counts


def _float_in(low: float, high: float, expected: str):
    """An argparse type: a number in ``(low, high]``, else an error saying ``expected``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = low
        if not low < value <= high:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}")
        return value
    return parse


_fraction = _float_in(0.0, 1.0, "a fraction in (0, 1]")
_seconds = _float_in(0.0, 3600.0, "seconds in (0, 3600]")


def add_plan_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``plan`` command to an ``add_subparsers()`` object; returns its parser."""
    from agent.fleet.placement import METHODS
    parser = subparsers.add_parser(
        "plan", help="place applications on a fleet of boards so every SLO holds; write configs and manifests",
        description="Place applications (apps.toml: model, rate, SLO) on a fleet of boards (one profile per board "
                    "kind, from `edge-agent profile` with a planner 'board' section; the shipped kinds are in "
                    "agent/fleet/profiles) three ways: knapsack (memory and cores alone, the baseline), "
                    "interference_aware (the Ibis paper's model-driven packing with the profiles' interference "
                    "model) and local_search (ours: the latter, then moves that host what it left out). Each plan "
                    "is replayed in the simulator (the live scheduler on a virtual clock, per board, Poisson "
                    "traces at the stated rates). Writes, for the chosen plan, OUT/configs/<board>.toml (the "
                    "agent's config; each checked by the agent's own loader), OUT/k8s/manifests.yaml (per board a "
                    "ConfigMap and a Deployment pinned to its node and board kind), OUT/push.sh (the same "
                    "models for running agents, as signed load-model commands) and OUT/report.{txt,json}.",
        epilog="An application is counted hosted when the plan places it and, in the replay, at least "
               "--attainment of its requests are answered ok within its SLO. Example: edge-agent plan "
               "--apps examples/fleet/apps.toml --out plan/")
    parser.add_argument("--profiles", metavar="DIR", default=None,
                        help="directory of board-kind profiles (*.json; default: the shipped agent/fleet/profiles)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--apps", metavar="FILE", help="the application list (apps.toml)")
    source.add_argument("--random-apps", type=int, metavar="N",
                        help="instead of --apps: N seeded applications of the three demo models (agent.fleet.plan."
                             "random_apps; --apps-seed picks the mix), to see how the ratio varies with the mix")
    parser.add_argument("--apps-seed", type=int, default=1, help="seed of --random-apps (default 1)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write configs/, k8s/ and the report")
    parser.add_argument("--boards", type=_board_counts, metavar="KIND=N,...",
                        help="boards per kind (default: apps.toml's [fleet] table, else one board per profile)")
    parser.add_argument("--method", choices=METHODS, default="local_search",
                        help="whose plan to write (default local_search; all three are replayed and reported)")
    parser.add_argument("--duration", type=_seconds, default=20.0, metavar="S",
                        help="simulated seconds of traffic per board in the replay (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the replay's traces (default 0)")
    parser.add_argument("--jitter", type=float, default=0.0, metavar="SIGMA",
                        help="lognormal sigma of the replay's batch times around the profiled median (default 0: "
                             "every batch takes its profiled time, slowed by the interference model)")
    parser.add_argument("--attainment", type=_fraction, default=0.99, metavar="F",
                        help="share of an application's requests that must be answered in SLO (default 0.99)")
    parser.add_argument("--search-budget", type=_seconds, default=20.0, metavar="S",
                        help="seconds local_search may spend (default 20)")
    parser.add_argument("--traces", action="store_true",
                        help="also write OUT/traces/<board>.csv, the chosen plan's replay traces, to replay against a "
                             "live agent: edge-agent bench run --trace OUT/traces/B.csv --config OUT/configs/B.toml")
    parser.add_argument("--broker", default="127.0.0.1:1883", metavar="HOST:PORT",
                        help="the MQTT broker the written configs name (default 127.0.0.1:1883)")
    parser.add_argument("--image", default="edge-agent:latest", help="container image in the manifests")
    parser.add_argument("--namespace", default="edge-agent", help="Kubernetes namespace (default edge-agent)")
    parser.add_argument("--kubeedge", action="store_true",
                        help="KubeEdge: also select edge nodes and tolerate their node-role.kubernetes.io/edge taint")
    parser.set_defaults(func=cmd_plan)
    return parser


def cmd_plan(args: argparse.Namespace) -> int:
    """0 when the chosen plan's replay has no violation, 1 when it has, 2 on bad input (named)."""
    from agent.config import ConfigError
    from agent.fleet import PROFILES_DIR
    from agent.fleet.apps import AppsError, load_apps
    from agent.fleet.boards import fleet_boards, load_kinds
    from agent.fleet.plan import compare, format_report, make_plans, random_apps, write_outputs
    from agent.profiler.profile_file import ProfileError

    host, _, port_text = args.broker.rpartition(":")
    if not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        print(f"edge-agent plan: --broker {args.broker!r}: expected HOST:PORT", file=sys.stderr)
        return 2
    try:
        kinds = load_kinds(args.profiles or PROFILES_DIR)
        if args.apps:
            apps = load_apps(args.apps)
        else:
            if not 1 <= args.random_apps <= 10_000:
                raise AppsError("--random-apps", args.random_apps, "a number of applications in 1..10000")
            apps = random_apps(args.random_apps, args.apps_seed)
        boards = fleet_boards(kinds, args.boards or apps.fleet or None)
        for app in apps.apps:
            if not any(b.kind.serves(app.model) for b in boards):
                raise AppsError(f"apps ({app.name}).model", app.model,
                                f"a model profiled on some board kind of the fleet: "
                                f"{sorted({m for b in boards for m in b.kind.models})}", args.apps or "--random-apps")
    except (ProfileError, AppsError) as exc:
        print(f"edge-agent plan: {exc}", file=sys.stderr)
        return 2
    from agent.fleet.emit import card_accuracy
    servable, refused = [], []
    for app in apps.apps:
        accuracy = card_accuracy(app.model) if app.min_accuracy is not None else None
        if accuracy is not None and accuracy < app.min_accuracy:
            refused.append(f"{app.name}: min_accuracy {app.min_accuracy:g} > {app.model}'s {accuracy:g} (its card)")
        else:
            servable.append(app)
    for line in refused:
        print(f"edge-agent plan: not placed: {line}", file=sys.stderr)
    plans, predict = make_plans(boards, servable, search_budget_s=args.search_budget)
    if not 0 <= args.jitter <= 2:
        print(f"edge-agent plan: --jitter {args.jitter!r}: expected a sigma in 0..2", file=sys.stderr)
        return 2
    comparison = compare(plans, predict, duration_s=args.duration, seed=args.seed, attainment=args.attainment,
                         jitter=args.jitter, trace_dir=Path(args.out) / "traces" if args.traces else None,
                         trace_method=args.method)
    try:
        written = write_outputs(args.out, plans[args.method], predict, comparison, broker_host=host,
                                broker_port=int(port_text), image=args.image, namespace=args.namespace,
                                kubeedge=args.kubeedge)
    except ConfigError as exc:      # a config the agent would refuse: a planner bug, said plainly
        print(f"edge-agent plan: a written config does not load: {exc}", file=sys.stderr)
        return 1
    print(f"fleet: {len(boards)} boards ({', '.join(sorted({b.kind.name for b in boards}))}), "
          f"{len(apps.apps)} applications")
    print(format_report(comparison, args.method))
    for path in written:
        print(f"wrote {path}")
    return 1 if comparison.replays[args.method].violations else 0
