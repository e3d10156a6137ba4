"""``edge-agent plan``: board profiles and an application list in; agent configs, Kubernetes
manifests and a report against knapsack out. Mounted by ``agent.cli.build_parser``; heavy imports
happen in the handler so ``edge-agent --help`` stays fast.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_plan_parser", "cmd_plan", "add_push_parser", "cmd_push"]


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
                    "model) and local_search (ours: the latter from several starts, moves that host what it left out, a "
                    "large-neighbourhood search, then each board checked in the simulator on traces of its own). "
                    "Each plan "
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
    parser.add_argument("--search-budget", type=_seconds, default=180.0, metavar="S",
                        help="seconds local_search may spend at most (default 180; --search-iters ends it "
                             "first on most machines, which keeps a plan reproducible)")
    parser.add_argument("--search-iters", type=int, default=400, metavar="N",
                        help="steps of local_search's large-neighbourhood search (default 400; 0: the packing "
                             "starts and repairs alone)")
    parser.add_argument("--no-check", action="store_true",
                        help="write local_search's plan without checking its boards in the simulator first")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
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
    if not 0 <= args.jitter <= 2:
        print(f"edge-agent plan: --jitter {args.jitter!r}: expected a sigma in 0..2", file=sys.stderr)
        return 2
    if not 0 <= args.search_iters <= 1_000_000:
        print(f"edge-agent plan: --search-iters {args.search_iters!r}: expected a count in 0..1000000", file=sys.stderr)
        return 2
    import time
    started = time.monotonic()

    def progress(line: str) -> None:
        if not args.quiet:
            print(f"[{time.monotonic() - started:6.1f} s] {line}", file=sys.stderr, flush=True)

    plans, predict = make_plans(boards, servable, search_budget_s=args.search_budget,
                                search_iterations=args.search_iters,
                                check_duration_s=0.0 if args.no_check else args.duration, seed=args.seed,
                                attainment=args.attainment, jitter=args.jitter, progress=progress)
    progress("replaying the three plans")
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


def add_push_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``push-plan`` command (``agent.fleet.push``); returns its parser."""
    from agent.ops.cli import KEY_ENV, add_broker_security_args
    parser = subparsers.add_parser(
        "push-plan", help="make running agents serve a plan's models, with signed load-model / unload-model commands",
        description="For each board of a plan written by edge-agent plan (DIR/configs/<board>.toml; boards it "
                    "leaves empty from DIR/report.json), ask the running agent its status, then send signed "
                    "commands that make it serve the plan's models: unload-model for models the plan does not "
                    "give it, set-batching / set-slo-default for models it keeps, unload-model and load-model "
                    "where the instances differ, load-model for models it lacks. Each step and its "
                    "acknowledgement is printed. Exit 0 when every board answered and every step was ok, 1 when a "
                    "step was refused, 3 when a board did not answer, 2 on bad input.",
        epilog="example: edge-agent push-plan --plan plan/ --key ops.key --timeout 60. The boards' configs "
               "must subscribe \"cmd\" and trust the key ([control] keyring).")
    parser.add_argument("--plan", required=True, metavar="DIR", help="the plan directory (edge-agent plan --out DIR)")
    parser.add_argument("--device", action="append", metavar="D",
                        help="push only to this board (repeatable; default every board of the plan)")
    parser.add_argument("--keep-others", action="store_true",
                        help="leave loaded the models a board serves that the plan does not give it")
    parser.add_argument("--key", metavar="PRIVATE_KEY", help=f"the operator's private key (default ${KEY_ENV})")
    parser.add_argument("--key-id", metavar="ID", help="the key's id on the boards (default: the key file's name)")
    parser.add_argument("--host", help="MQTT broker (default: the one the plan's configs name)")
    parser.add_argument("--port", type=int, default=None, help="MQTT broker port (default: the plan's configs')")
    parser.add_argument("--ttl", type=float, default=120.0, metavar="S", help="seconds each command stays valid "
                        "(default 120; boards accept at most their max_ttl_s)")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="S",
                        help="seconds to wait for each acknowledgement (default 60: a load-model loads and "
                             "profiles the model before it answers)")
    add_broker_security_args(parser)
    parser.set_defaults(func=cmd_push)
    return parser


def cmd_push(args: argparse.Namespace) -> int:
    """0: every board reached and every step ok; 1: a step refused; 3: a board silent; 2: bad input."""
    import tomllib
    from agent.fleet.push import planned_boards, push_plan
    from agent.ops.cli import broker_security, operator_key
    from agent.ops.ctl import send_command
    from agent.ops.keys import KeyFileError
    from agent.ops.signing import CommandError, sign
    from agent.transport.paho_client import SecurityError

    try:
        key = operator_key(args)
        boards = planned_boards(args.plan)
        security = broker_security(args)
    except (KeyFileError, ValueError) as exc:
        print(f"edge-agent push-plan: {exc}", file=sys.stderr)
        return 2
    except SecurityError as exc:
        print(f"edge-agent push-plan: --{exc.setting.replace('_', '-')}: {exc}", file=sys.stderr)
        return 2
    host, port = args.host, args.port
    configs = sorted((Path(args.plan) / "configs").glob("*.toml"))
    if (host is None or port is None) and configs:
        mqtt = tomllib.loads(configs[0].read_text()).get("mqtt", {})
        host = host or mqtt.get("host")
        port = port if port is not None else mqtt.get("port")
    host = host or "127.0.0.1"
    port = port if port is not None else (8883 if security.tls else 1883)
    if not boards:
        print(f"edge-agent push-plan: {args.plan}: the plan has no boards", file=sys.stderr)
        return 2

    def send(device: str, command: str, command_args: dict) -> dict | None:
        try:
            envelope = sign(command, command_args, device, key, ttl_s=args.ttl)
        except CommandError as exc:
            return {"ok": False, "code": "not_sent", "reason": str(exc), "device": device}
        from agent.ops.signing import decode_envelope
        command_id = decode_envelope(envelope)[0].command_id
        try:
            acks = send_command(host, port, device, command, envelope, command_id, timeout_s=args.timeout,
                                security=security)
        except (OSError, TimeoutError) as exc:
            return {"ok": False, "code": "not_sent", "reason": str(exc), "device": device}
        return acks[0] if acks else None

    try:
        results = push_plan(args.plan, send, devices=args.device, keep_others=args.keep_others,
                            progress=lambda line: print(line, flush=True))
    except ValueError as exc:
        print(f"edge-agent push-plan: {exc}", file=sys.stderr)
        return 2
    silent = [r.device for r in results if not r.reached]
    refused = [r.device for r in results if r.reached and not r.ok]
    print(f"push-plan: {len(results) - len(silent) - len(refused)} of {len(results)} boards serve the plan"
          + (f"; no answer from {silent}" if silent else "") + (f"; refused steps on {refused}" if refused else ""))
    return 3 if silent else 1 if refused else 0
