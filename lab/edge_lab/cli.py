"""The lab's commands, ``edge-agent demo`` and ``edge-agent bench core | sign | run | triton | http-limits | broker-restart | fuzz | netlab | codecs | offload | probe | exit-alloc``.

The agent's command line (``agent.cli``) adds these parsers when this package is installed beside
it; the board's wheel holds the runtime only, and there these commands say where they live. Every
handler imports what it runs inside itself, so ``edge-agent --help`` stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import signal
import sys

from edge_lab.bench import write_json


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number > 0")
    return value


def _interrupt(signum: int, frame) -> None:
    """SIGTERM as Ctrl-C: bench triton's run stops its server and broker on the way out."""
    raise KeyboardInterrupt


def _cmd_demo(args: argparse.Namespace) -> int:
    from edge_lab.demo import run_demo
    # SIGTERM (`kill`, `timeout`, a terminal closing) stops the demo as Ctrl-C does: cameras first,
    # the agent answers what it holds, and the demo's own Mosquitto is stopped. Without a handler
    # the interpreter died at once and left that broker running. The handlers only record the
    # signal (as `edge-agent run`'s do): one that raised could land inside a lock of the shutdown,
    # and a second signal then stop it half-way. Once stopped, further signals are ignored.
    signals: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: signals.append(signum))
    try:
        run_demo(duration_s=args.duration, load=args.load, shed=not args.no_shed, stop=lambda: bool(signals))
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
    return 0


def _cmd_bench_core(args: argparse.Namespace) -> int:
    from edge_lab.bench.core import bench_assembly, bench_decision, bench_queue, format_core_report
    from edge_lab.bench.overhead import bench_overhead_inprocess, bench_overhead_mqtt, format_overhead
    from agent.progress import Progress
    print("edge-agent bench core: medians of repeated runs, every ratio measured side by side in this run", flush=True)
    skipped = None
    from edge_lab.bench.exit_alloc import bench_decision_time
    with Progress(5 + (not args.no_mqtt), desc="bench core") as progress:    # on a terminal: the time left
        progress.step("EDF queue")
        results = {"queue": bench_queue()}
        progress.step("batch assembly")
        results["assembly"] = bench_assembly()
        progress.step("exit allocation")
        results["exit_decision"] = bench_decision_time()
        progress.step("dispatch decision")
        results["dispatch decision, rules vs learned (policies/cpu-2core)"] = bench_decision()
        progress.step("overhead in process")
        rows = bench_overhead_inprocess(n=args.requests)
        if not args.no_mqtt:
            progress.step("overhead over MQTT")
            try:
                rows["MQTT loopback"] = bench_overhead_mqtt(n=max(200, args.requests // 2))
            except Exception as exc:  # no broker on this machine: say so, keep the other figures
                skipped = f"(MQTT loopback skipped: {exc})"
    print(format_core_report(results), flush=True)
    if skipped:
        print(skipped)
    results["overhead"] = rows
    print(format_overhead(rows), flush=True)
    write_json(args.json, results)
    return 0


def _cmd_bench_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from agent.config import Config, ConfigError, load_config
    from agent.workload.trace import TraceError, read_trace
    from edge_lab.bench.contenders import CONTENDERS
    from edge_lab.bench.run import MODES, format_results, run_bench
    try:
        config = load_config(args.config) if args.config else Config.demo()
        if args.profile:
            from agent.profiler import load_profile
            load_profile(args.profile)   # fail now, naming the field, not after the first contender
            config = dataclasses.replace(config, profile=str(Path(args.profile).resolve()))
        trace = read_trace(args.trace)
        if args.policy_path:
            from agent.learned.card import load_policy
            load_policy(args.policy_path, [m.name for m in config.models])   # refused now, naming what differs
            config = dataclasses.replace(config, policy_path=str(Path(args.policy_path).resolve()))
    except (ConfigError, TraceError, ValueError) as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 2
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in contenders if c not in CONTENDERS]
    if unknown or not contenders:
        print(f"edge-agent: --contenders (--policies) {args.contenders!r}: unknown {unknown}; "
              f"choose from {sorted(CONTENDERS)}", file=sys.stderr)
        return 2
    missing = sorted({row.model for row in trace} - {m.name for m in config.models})
    if missing:
        print(f"edge-agent: the trace names models the config does not load: {missing}", file=sys.stderr)
        return 2
    modes = MODES if args.mode == "both" else (args.mode,)
    config = dataclasses.replace(config, mqtt=dataclasses.replace(config.mqtt, enabled=False))
    results = run_bench(config, trace, contenders, modes, Path(args.out), seed=args.seed)
    print(format_results(results))
    print(f"wrote {args.out}/bench.json" + (f" and {len(results.get('plots', []))} plots" if results.get("plots") else ""))
    return 0


def _cmd_bench_exit_alloc(args: argparse.Namespace) -> int:
    from edge_lab.bench.exit_alloc import run
    try:
        return run(args)
    except ImportError as exc:    # scipy, for the exact optimum
        print(f"edge-agent: bench exit-alloc needs scipy for the exact optimum (pip install -e './lab[bench]'): "
              f"{exc}", file=sys.stderr)
        return 2


def _cmd_bench_broker_restart(args: argparse.Namespace) -> int:
    import logging
    from edge_lab.bench.broker_restart import format_restart, run_broker_restart
    logging.getLogger("agent").setLevel(logging.ERROR)    # the expected reconnect warnings
    print(f"edge-agent bench broker-restart: {args.requests} requests at {args.rate:g}/s to the demo's small model, "
          f"the broker (persistent Mosquitto) restarted after 40% of them; +backlog: the agent away meanwhile "
          f"(stopped, a quarter of the requests queued for its session); clean: [mqtt] session_expiry_s = 0", flush=True)
    from agent.progress import Progress
    rows = []
    with Progress(4 + 2 * bool(args.clean), desc="bench broker-restart") as progress:   # on a terminal: the time left
        for backlog in (False, True):
            for graceful in (True, False):
                rows.append(run_broker_restart(graceful, backlog=backlog, requests=args.requests, rate_hz=args.rate))
                progress.say(format_restart(rows[-1:]).splitlines()[1])
        if args.clean:
            for backlog in (False, True):
                rows.append(run_broker_restart(True, backlog=backlog, requests=args.requests, rate_hz=args.rate,
                                               session_expiry_s=0))
                progress.say(format_restart(rows[-1:]).splitlines()[1])
    print()
    print(format_restart(rows))
    return 0


def _cmd_bench_tls(args: argparse.Namespace) -> int:
    from agent.progress import Progress
    from edge_lab.bench.tls import bench_tls, format_tls, rounds
    print(f"edge-agent bench tls: {args.connects} connects and {args.requests} requests (one at a time, batch 1, the "
          "demo's small model) each way, plain and TLS with client certificates alternating, loopback Mosquitto",
          flush=True)
    with Progress(rounds(args.requests, args.connects), desc="bench tls", unit="round") as progress:
        figures = bench_tls(requests=args.requests, connects=args.connects, tick=progress.tick)
    print(format_tls(figures))
    return 0


def _cmd_bench_exits(args: argparse.Namespace) -> int:
    from edge_lab.bench.exits import CONTENDERS, bench_exits, format_exits
    names = [c[0] for c in CONTENDERS]
    chosen = None
    if args.contenders:
        chosen = [n.strip() for n in args.contenders.split(",") if n.strip()]
        unknown = [n for n in chosen if n not in names]
        if unknown:
            print(f"edge-agent bench exits: --contenders {unknown}: expected some of {names}", file=sys.stderr)
            return 2
    command = "edge-agent bench exits " + " ".join(sys.argv[3:])
    print(f"{command.strip()}: batching and early exit on {', '.join(names)}; simulated, then live", flush=True)
    from agent.progress import Progress
    from edge_lab.bench.exits import line_count
    with Progress(line_count(chosen, live=not args.sim_only, repeat=args.repeat, overload=args.overload),
                  desc="bench exits") as progress:
        out = bench_exits(duration_s=args.duration, sim_duration_s=args.sim_duration, attainment=args.attainment,
                          max_batch=args.max_batch, seed=args.seed, live=not args.sim_only, contenders=chosen,
                          repeat=args.repeat, overload=args.overload, say=progress.say)
    print(format_exits(out), flush=True)
    write_json(args.json, out)
    return 0


def _cmd_bench_triton(args: argparse.Namespace) -> int:
    from pathlib import Path

    from agent.workload.trace import TraceError, read_trace
    from edge_lab.bench.versus import SYSTEMS, format_versus, run_versus, triton_grid
    try:
        trace = read_trace(args.trace) if args.trace else None
        loads = _numbers(args.load, "--load") if args.scale is None else None
        scales = _numbers(args.scale, "--scale") if args.scale is not None else None
        systems = [s.strip() for s in args.systems.split(",") if s.strip()]
        if args.repeat < 1:
            raise ValueError(f"--repeat {args.repeat}: expected 1 or more rounds")
        if args.mqtt_procs is not None and args.mqtt_procs < 1:
            raise ValueError(f"--mqtt-procs {args.mqtt_procs}: expected 1 or more generator processes")
        unknown = [s for s in systems if s not in SYSTEMS]
        if unknown or not systems:
            raise ValueError(f"--systems {args.systems!r}: unknown {unknown}; choose from {', '.join(SYSTEMS)}")
        settings = None
        if "triton" in systems:
            from edge_lab.bench.triton import find_tritonserver
            find_tritonserver()      # fail now, with the install hint, not after the first system
            settings = triton_grid(args.triton_grid)
    except (TraceError, ValueError, RuntimeError) as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 2
    if trace is not None:
        missing = sorted({row.model for row in trace} - {"mobilenet_digits", "resnet_digits"})
        if missing:
            print(f"edge-agent: --trace {args.trace}: models {missing} are not served here; "
                  f"bench triton serves the demo models mobilenet_digits and resnet_digits", file=sys.stderr)
            return 2
    # SIGTERM (`kill`, `timeout`) stops the run as Ctrl-C does: the server under test and its broker
    # are stopped on the way out instead of being left running.
    signal.signal(signal.SIGTERM, _interrupt)
    results = run_versus(trace, loads=loads, scales=scales, systems=systems, triton_settings=settings,
                         out_dir=Path(args.out), duration_s=args.duration, seed=args.seed, repeat=args.repeat,
                         mqtt_procs=args.mqtt_procs)
    print(format_versus(results))
    print(f"wrote {args.out}/versus.json" + (f" and {len(results['plots'])} plots" if results.get("plots") else ""))
    return 0


def _cmd_bench_http_limits(args: argparse.Namespace) -> int:
    from edge_lab.bench.http_limits import format_http_limits, run_http_limits
    if args.connections < 1 or args.duration <= 0 or args.rate <= 0 or args.nofile < 64:
        print("edge-agent: --connections >= 1, --duration > 0, --rate > 0 and --nofile >= 64 expected", file=sys.stderr)
        return 2
    from agent.progress import ticking
    with ticking(args.duration, "bench http-limits"):    # on a terminal: a bar over the run's seconds
        results = run_http_limits(connections=args.connections, duration_s=args.duration, rate=args.rate,
                                  nofile=args.nofile, nofile_hard=args.nofile_hard,
                                  max_connections=args.max_connections)
    print(format_http_limits(results))
    write_json(args.json, results)
    return 0


def _cmd_bench_sign(args: argparse.Namespace) -> int:
    from edge_lab.bench.signing import bench_sign, format_sign_report, fuzz_verifier
    if args.n < 10 or args.fuzz < 1:
        print(f"edge-agent: --n {args.n} / --fuzz {args.fuzz}: expected at least 10 / 1", file=sys.stderr)
        return 2
    from agent.progress import Progress
    print("edge-agent bench sign: Ed25519 signed commands, each call timed alone (gc off), median and p99", flush=True)
    with Progress(2, desc="bench sign") as progress:
        progress.step("sign and verify")
        costs = bench_sign(args.n)
        progress.step(f"fuzz the verifier ({args.fuzz} envelopes)")
        fuzz = fuzz_verifier(args.fuzz, seed=args.seed)
    print(format_sign_report(costs, fuzz), flush=True)
    figures = {"costs": costs, "fuzz": fuzz}
    failed = fuzz["accepted"] or fuzz["without_reason"]
    if args.through_broker:
        from edge_lab.bench.signing import format_agent_fuzz, fuzz_agent
        print("", flush=True)
        agent_fuzz = figures["agent_fuzz"] = fuzz_agent(args.fuzz, seed=args.seed)
        print(format_agent_fuzz(agent_fuzz), flush=True)
        failed = failed or any(agent_fuzz[k] for k in ("accepted", "without_reason", "unanswered", "answered_twice"))
    write_json(args.json, figures)
    return 1 if failed else 0


def _cmd_bench_fuzz(args: argparse.Namespace) -> int:
    from edge_lab.bench.fuzz import format_fuzz, run_fuzz, targets
    if args.count < 1:
        print(f"edge-agent: --count {args.count}: expected 1 or more requests", file=sys.stderr)
        return 2
    intakes = ("mqtt", "http") if args.intake == "both" else (args.intake,)
    from agent.progress import Progress
    with Progress(args.count * len(intakes), desc="bench fuzz", unit="case") as progress:
        results = run_fuzz(args.count, args.seed, intakes, progress=progress)
    print(format_fuzz(results))
    return 0 if all(targets(results).values()) else 1


def _cmd_bench_netlab(args: argparse.Namespace) -> int:
    from edge_lab.netlab import LabError, Link, cleanup
    if args.cleanup:
        try:
            removed = cleanup()
        except LabError as exc:
            print(f"edge-agent bench netlab --cleanup: {exc}", file=sys.stderr)
            return 1
        print("\n".join(f"removed {item}" for item in removed) or "nothing left over")
        return 0
    from agent.progress import Progress
    from edge_lab.bench.netlab import bench_netlab, format_netlab
    link = Link(mbit=args.bandwidth_mbit, delay_ms=args.delay_ms)
    print(f"edge-agent bench netlab: two boards in namespaces and cgroups, the board's link {link}", flush=True)
    try:
        with Progress(7, desc="bench netlab") as progress:
            results = bench_netlab(link, args.board_cpu, args.peer_cpu, seconds=args.seconds, pings=args.pings,
                                   step=progress.step)
    except LabError as exc:
        print(f"edge-agent bench netlab: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edge-agent bench netlab: interrupted; the lab was torn down", file=sys.stderr)
        return 130
    print(format_netlab(results), flush=True)
    write_json(args.json, results)
    return 0


def _cmd_bench_codecs(args: argparse.Namespace) -> int:
    from agent.models.card import demo_model_names, load_card
    from agent.progress import Progress
    from edge_lab.bench.codecs import as_json, bench_codecs, format_codecs, split_points_of
    models = args.models.split(",") if args.models else demo_model_names()
    codecs = args.codecs.split(",") if args.codecs else None
    splits = args.splits.split(",") if args.splits else None
    try:
        steps = sum(1 for m in models for name, _, _ in split_points_of(load_card(f"demo:{m}"))
                    if splits is None or name in splits)
    except Exception as exc:
        print(f"edge-agent: --models {args.models!r}: {exc}", file=sys.stderr)
        return 2
    print(f"edge-agent bench codecs: {args.threads} onnxruntime thread(s), medians of {args.repeats} repeats",
          flush=True)
    try:
        with Progress(max(1, steps), desc="bench codecs") as progress:
            runs = bench_codecs(models, codecs, threads=args.threads, repeats=args.repeats, splits=splits,
                                progress=progress)
    except (ValueError, RuntimeError) as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 2
    if not runs:
        print("edge-agent: no split point matched --models / --splits", file=sys.stderr)
        return 2
    print(format_codecs(runs), flush=True)
    write_json(args.json, as_json(runs))
    return 0


def _cmd_bench_probe(args: argparse.Namespace) -> int:
    from edge_lab.bench.offload import parse_links
    from edge_lab.bench.probe import bench_probe, format_probe
    try:
        links = parse_links(args.links)
        expected = f"--sizes {args.sizes}: expected bytes in 0..4194304, comma-separated"
        try:
            sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
        except ValueError:
            raise ValueError(expected) from None
        if not sizes or any(not 0 <= x <= 4 * 1024 * 1024 for x in sizes):
            raise ValueError(expected)
    except ValueError as exc:
        print(f"edge-agent bench probe: {exc}", file=sys.stderr)
        return 2
    from agent.progress import Progress
    # Its lines: the lab built; per probe size, the board started, each link shape (the unshaped
    # lab first) and the board stopped; the teardown.
    with Progress(1 + len(sizes) * (len(links) + 3) + 1, desc="bench probe") as progress:
        return _lab_bench("probe", lambda: bench_probe(links, sizes, idle_s=args.idle_s, settle_s=args.settle,
                                                       measure_s=args.measure, board_cpu=args.board_cpu,
                                                       say=lambda line: progress.say(f"  {line}")),
                          format_probe, args.json)


def _lab_bench(name: str, run, format_results, json_path: str | None) -> int:
    """Run a two-board lab bench (``run()`` returns its figures), print them with
    ``format_results`` and write them to ``json_path``: 1 for the lab's or the bench's refusal,
    130 on Ctrl-C (the lab and its agents are torn down by then)."""
    from edge_lab.netlab import LabError
    try:
        results = run()
    except (LabError, ValueError) as exc:
        print(f"edge-agent bench {name}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"edge-agent bench {name}: interrupted; the lab and its agents were torn down", file=sys.stderr)
        return 130
    print(format_results(results), flush=True)
    write_json(json_path, results)
    return 0


def _cmd_bench_offload(args: argparse.Namespace) -> int:
    if args.sim:
        from edge_lab.bench.offload_sim import main as simulated
        sim_args = ["--duration", f"{args.duration:g}", "--load", f"{args.load:g}", "--seed", str(args.seed)]
        return simulated(sim_args)
    from edge_lab.bench.offload import bench_offload, format_offload, parse_links
    try:
        links = parse_links(args.links)
    except ValueError as exc:
        print(f"edge-agent bench offload: {exc}", file=sys.stderr)
        return 2
    rows = [key.strip() for key in args.rows.split(",") if key.strip()] if args.rows else None
    shapes = ", ".join(f"{link.mbit:g} Mbit/s {link.delay_ms:g} ms" for link in links)
    print(f"edge-agent bench offload: board {args.board_cpu} core, peer twice that unless --peer-cpu; "
          f"links {shapes}", flush=True)
    from agent.progress import Progress
    from edge_lab.bench.offload import row_count
    # Its lines: the lab built, the peer started, the capacity measured and said, each row under
    # each link, the teardown.
    with Progress(4 + len(links) * row_count(args.model, rows) + 1, desc="bench offload") as progress:
        return _lab_bench("offload", lambda: bench_offload(
            links, model=args.model, board_cpu=args.board_cpu, peer_cpu=args.peer_cpu, duration_s=args.duration,
            load=args.load, slo_ms=args.slo_ms, rows=rows, seed=args.seed, keep=args.keep,
            say=lambda line: progress.say(f"  {line}")), format_offload, args.json)


def _cmd_bench_pool(args: argparse.Namespace) -> int:
    from edge_lab.bench.pool import bench_pool, format_pool
    from edge_lab.netlab import check_support
    problem = check_support()
    if problem is not None:
        print(f"edge-agent bench pool: {problem}", file=sys.stderr)
        return 1
    print(f"edge-agent bench pool: one agent, then three, {args.cpu:g} core each, {args.model}", flush=True)
    from agent.progress import Progress
    with Progress(4, desc="bench pool") as progress:      # each row: its capacity, then its goodput
        return _lab_bench("pool", lambda: bench_pool(model=args.model, cpu=args.cpu, duration_s=args.duration,
                                                     load=args.load, slo_ms=args.slo_ms, seed=args.seed,
                                                     say=lambda line: progress.say(f"  {line}")),
                          format_pool, args.json)


def _cores(text: str) -> float | None:
    if text.lower() in ("none", "0"):
        return None
    return _positive_float(text)


def _numbers(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(not v > 0 for v in values):
        raise ValueError(f"{flag} {text!r}: expected comma-separated numbers > 0, e.g. 0.5,1,1.5")
    return values


def add_lab_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``demo`` and ``bench`` to the ``edge-agent`` command line (``agent.cli.build_parser``)."""
    demo = sub.add_parser("demo", help="local broker + agent + simulated cameras, with a live table",
                          description="Start Mosquitto on a free loopback port, serve the shipped demo models, and "
                                      "drive them with simulated cameras (mixed SLOs). Ctrl-C (or SIGTERM) stops "
                                      "cleanly.")
    demo.add_argument("--duration", type=float, default=None, metavar="S", help="stop after S seconds (default: run until Ctrl-C)")
    demo.add_argument("--load", type=_positive_float, default=1.0, metavar="X",
                      help="the cameras' frame rates as a share of this board's capacity, measured at start: 1 "
                           "offers half of it (the rest is for the broker, the cameras and the intake), 2 all of "
                           "it (default 1.0; the rates and the capacity are printed at start)")
    demo.add_argument("--no-shed", action="store_true",
                      help="compute requests that can no longer meet their deadline instead of answering them at once "
                           "(to compare; see BENCHMARKS.md)")
    demo.set_defaults(func=_cmd_demo)

    bench = sub.add_parser("bench", help="benchmarks that print figures")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    core = bench_sub.add_parser("core", help="compiled core vs heapq / numpy, and per-request overhead",
                                description="Queue push+pop vs heapq, batch assembly vs numpy.copyto, and the agent's "
                                            "own overhead per request at batch 1 (in process and over MQTT loopback).")
    core.add_argument("--requests", type=int, default=2000, help="requests for the overhead figure (default 2000)")
    core.add_argument("--no-mqtt", action="store_true", help="skip the MQTT loopback figure")
    core.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    core.set_defaults(func=_cmd_bench_core)

    bench_sign = bench_sub.add_parser(
        "sign", help="cost of signing and verifying a control command, and a fuzz of the verifier",
        description="Time the operator's sign and the board's verify per command (accepted, forged, malformed), "
                    "then feed the board's Verifier a seeded mix of malformed and forged envelopes (random bytes, "
                    "mutations, changed fields, wrong device, expired, unknown or revoked key, reused nonce) and "
                    "report the refusals by reason, any accepted (must be 0) and resident memory before and after. "
                    "Exits 1 if any fuzzed envelope was accepted or refused without a reason.")
    bench_sign.add_argument("--n", type=int, default=2000, help="calls timed per figure (default 2000)")
    bench_sign.add_argument("--fuzz", type=int, default=10_000, help="fuzzed envelopes (default 10000)")
    bench_sign.add_argument("--seed", type=int, default=0, help="the fuzz's seed (default 0)")
    bench_sign.add_argument("--through-broker", action="store_true",
                            help="also send the fuzzed envelopes through a local Mosquitto to an edge-agent run "
                                 "process: each must be acked once with a reason; the agent's RSS before/after")
    bench_sign.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    bench_sign.set_defaults(func=_cmd_bench_sign)

    bench_run = bench_sub.add_parser(
        "run", help="replay one trace through every contender (scheduling system), live and simulated",
        description="Replay a workload trace (edge-agent trace generate) through each contender, a scheduling "
                    "system (ours or a baseline's) written as a rewrite of the config: live (real models, "
                    "open loop, in process) and in the simulator (same scheduler code, virtual clock). Prints one "
                    "table, the simulated-vs-live goodput error, and writes JSON and PNG plots.")
    bench_run.add_argument("--trace", required=True, metavar="CSV", help="a v1 trace (t_s,app,model,slo_ms,priority)")
    bench_run.add_argument("--config", metavar="FILE", help="agent config whose models the trace names (default: the demo)")
    bench_run.add_argument("--contenders", "--policies", dest="contenders", metavar="NAMES",
                           default="fifo,fixed,triton,clipper,deeprt,edge",
                           help="comma-separated contenders (default: all but learned): fifo, fixed, triton, clipper, "
                                "deeprt, edge, learned (the distilled network of --policy-path); --policies is its "
                                "older name")
    bench_run.add_argument("--policy-path", metavar="DIR",
                           help="the learned contender's policy directory (default: the config's [agent] "
                                "policy_path, else policies/cpu-2core)")
    bench_run.add_argument("--profile", metavar="FILE",
                           help="batch latencies from this profile (edge-agent profile) instead of measuring at start")
    bench_run.add_argument("--mode", choices=("both", "live", "sim"), default="both", help="live, simulated, or both (default)")
    bench_run.add_argument("--out", default="bench_out", metavar="DIR", help="where JSON and plots go (default bench_out/)")
    bench_run.add_argument("--seed", type=int, default=0, help="simulator seed (default 0)")
    bench_run.set_defaults(func=_cmd_bench_run)

    exits = bench_sub.add_parser(
        "exits", help="batching and early exit, alone and together, at equal accuracy targets (sim, then live)",
        description="The multi-exit camera_exits model on one Poisson trace of mixed min_accuracy classes: no "
                    "batching/no exit, batching only, exit only, batching + exit (fixed and confidence modes). For "
                    "each, the highest rate whose SLO attainment holds --attainment, simulated (bisection) then live "
                    "(the real agent, started at the simulated rate, stepped down until it holds), with the "
                    "delivered top-1 accuracy per class on the card's labelled test frames. The SLO and the rates "
                    "are sized from the batch latency measured at start.")
    exits.add_argument("--duration", type=_positive_float, default=6.0, metavar="S",
                       help="seconds of each live run (default 6)")
    exits.add_argument("--sim-duration", type=_positive_float, default=20.0, metavar="S",
                       help="virtual seconds of each simulated run (default 20)")
    exits.add_argument("--attainment", type=float, default=0.95, metavar="F",
                       help="the SLO attainment every contender must hold (default 0.95)")
    exits.add_argument("--max-batch", type=int, default=8, help="the batched contenders' max batch (default 8)")
    exits.add_argument("--contenders", metavar="NAMES", help="comma-separated subset of the contenders")
    exits.add_argument("--sim-only", action="store_true", help="skip the live runs")
    exits.add_argument("--repeat", type=int, default=1, metavar="K",
                       help="live rounds, taking turns over the contenders; each contender's median round is "
                            "reported, every round's figure beside it (default 1)")
    exits.add_argument("--overload", type=float, default=2.0, metavar="X",
                       help="also run batching+exit fixed and batching+exit+allocation at X times the first one's "
                            "capacity, where the board must choose whom to serve (default 2; 0: skip)")
    exits.add_argument("--seed", type=int, default=0, help="trace seed (default 0)")
    exits.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    exits.set_defaults(func=_cmd_bench_exits)

    triton = bench_sub.add_parser(
        "triton", help="edge-agent vs a real Triton server and a plain loop, same trace, open loop",
        description="Replay one open-loop trace against edge-agent over MQTT, edge-agent over the Open Inference "
                    "Protocol (HTTP), a real tritonserver (python backend on onnxruntime, dynamic batcher at each "
                    "setting of a small grid, best kept) and the plain one-request-at-a-time loop, one system at a "
                    "time. Prints goodput, SLO attainment per class, p50/p99, refusals, CPU s per 1000 requests and "
                    "peak memory of each server's process tree; writes versus.json and plots. Triton comes from the "
                    "lab's [triton] extra: run it all with `bash tools/dev.sh triton`.")
    triton.add_argument("--trace", metavar="CSV",
                        help="a v1 trace of the demo models (default: a bursty trace of the demo's four SLO classes "
                             "at the plain loop's capacity)")
    triton.add_argument("--load", default="0.5,1,1.5", metavar="X,Y",
                        help="loads as multiples of the plain loop's capacity (default 0.5,1,1.5)")
    triton.add_argument("--scale", metavar="X,Y", help="instead of --load: play the trace X times faster, as is")
    triton.add_argument("--duration", type=float, default=15.0, metavar="S",
                        help="length of the generated trace at 1x, in seconds (default 15)")
    triton.add_argument("--systems", default=",".join(("edge-agent/mqtt", "edge-agent/oip", "triton", "plain loop")),
                        help="comma-separated systems to run (default: all four)")
    triton.add_argument("--triton-grid", choices=("full", "quick"), default="full",
                        help="Triton settings to try at each load: full (6) or quick (2) (default full)")
    triton.add_argument("--mqtt-procs", type=int, default=None, metavar="K",
                        help="load-generator processes for the edge-agent/mqtt row, each its own MQTT client taking "
                             "every K-th request (default 1, as the HTTP row); each process's send lag and CPU "
                             "are reported, and a row the generator may have limited is marked")
    triton.add_argument("--out", default="bench_out/triton", metavar="DIR", help="where JSON and plots go")
    triton.add_argument("--seed", type=int, default=0, help="seed of the generated trace (default 0)")
    triton.add_argument("--repeat", type=int, default=1, metavar="K",
                        help="play the whole comparison K times and report the median of each figure, with how "
                             "many rounds each target held in (default 1; the full grid takes about 15 minutes "
                             "a round here; BENCHMARKS.md's verdict is --repeat 3)")
    triton.set_defaults(func=_cmd_bench_triton)

    limits = bench_sub.add_parser(
        "http-limits", help="new HTTP clients' latency while thousands of idle or slow connections are held",
        description="Start `edge-agent run` (HTTP, the demo model) with its soft open-file limit at --nofile; a "
                    "second process holds --connections connections (half idle, half sending a head a byte a "
                    "second, each reopened when the agent closes it); meanwhile new clients connect and make one "
                    "request each. Prints their p50/p99/max latency and how many were served, what the held "
                    "connections were told, and how many lines the agent logged.")
    limits.add_argument("--connections", type=int, default=2000, help="idle/slow connections to hold (default 2000)")
    limits.add_argument("--duration", type=float, default=20.0, metavar="S",
                        help="how long new clients are timed while the connections are held (default 20)")
    limits.add_argument("--rate", type=float, default=50.0, help="new clients per second (default 50)")
    limits.add_argument("--nofile", type=int, default=1024, help="the agent's soft RLIMIT_NOFILE at start (default 1024)")
    limits.add_argument("--nofile-hard", type=int, metavar="N",
                        help="also lower the agent's hard limit to N, so it cannot raise its soft one "
                             "(default: the hard limit is left as it is)")
    limits.add_argument("--max-connections", type=int, metavar="N", help="the agent's [http] max_connections")
    limits.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    limits.set_defaults(func=_cmd_bench_http_limits)

    restart = bench_sub.add_parser(
        "broker-restart", help="requests sent, acknowledged, answered, duplicated and lost across a broker restart",
        description="Restart a persistent Mosquitto under load, gracefully (SIGTERM) and killed (SIGKILL), with the "
                    "agent connected and with the agent away (a backlog queued for its session): what the "
                    "application sent, what the broker acknowledged, what the agent saw and answered, duplicates, "
                    "and what the broker lost (never seen by the agent, or its reply lost). About 40 s by default.")
    restart.add_argument("--requests", type=int, default=600, metavar="N", help="requests per run (default 600)")
    restart.add_argument("--rate", type=float, default=200.0, metavar="HZ", help="requests per second (default 200)")
    restart.add_argument("--clean", action="store_true",
                         help="also run the graceful cases with a clean session ([mqtt] session_expiry_s = 0), "
                              "what agents did before")
    restart.set_defaults(func=_cmd_bench_broker_restart)

    tls = bench_sub.add_parser(
        "tls", help="TLS to the broker against plain TCP: connect time and a request's round trip",
        description="Two loopback Mosquitto brokers (plain; TLS with client certificates and the shipped ACL), an "
                    "agent on each serving the demo's small model at batch 1: connect times and request round "
                    "trips, alternating plain and TLS. A few seconds.")
    tls.add_argument("--requests", type=int, default=500, metavar="N", help="requests each way (default 500)")
    tls.add_argument("--connects", type=int, default=50, metavar="N", help="connects each way (default 50)")
    tls.set_defaults(func=_cmd_bench_tls)

    fuzz = bench_sub.add_parser(
        "fuzz", help="fuzzed requests, valid and hostile, on each intake of an agent process",
        description="Start Mosquitto and an agent (the demo config, its own process), send N fuzzed requests per "
                    "intake (MQTT msgpack payloads with odd MQTT v5 properties; Open Inference Protocol requests "
                    "with bad JSON, bad framing, pipelining, compression, odd headers), and print: cases tried, "
                    "answers per request (0 / 1 / >1), error codes, unanswerable requests counted by the agent "
                    "against those expected, the agent's RSS before and after, and its threads alive. Exits 1 "
                    "if a target of issue 21 is broken.")
    fuzz.add_argument("--count", type=int, default=1000, metavar="N", help="requests per intake (default 1000)")
    fuzz.add_argument("--seed", type=int, default=0, help="seed of the cases (default 0): a run replays exactly")
    fuzz.add_argument("--intake", choices=("mqtt", "http", "both"), default="both", help="which intake (default both)")
    fuzz.set_defaults(func=_cmd_bench_fuzz)

    netlab = bench_sub.add_parser(
        "netlab", help="the two-board lab (namespaces, CPU quotas, a shaped link): build, measure, tear down",
        description="Build the lab collaborative offload runs in (edge_lab.netlab): a board and a peer, each a "
                    "network namespace in a cgroup with a CPU quota, the board's link to the broker rate-limited "
                    "by tbf both ways and delayed by a relay process. Measures TCP round trips through the relay "
                    "(p50/p99 against 2x the delay), the rate each way against the configured one, a busy loop's "
                    "share of a core in each cgroup against its quota, and the relay alone on loopback (rate, CPU "
                    "per MB); then tears it all down, Ctrl-C or SIGTERM included. Needs root. About 20 s. "
                    "--cleanup removes what a killed run left (namespaces, veths, cgroups, relays).")
    netlab.add_argument("--bandwidth-mbit", type=_positive_float, default=100.0, metavar="MBIT",
                        help="the board's link rate each way, Mbit/s (default 100)")
    netlab.add_argument("--delay-ms", type=float, default=10.0, metavar="MS",
                        help="one-way delay added each way by the relay (default 10)")
    netlab.add_argument("--board-cpu", type=_cores, default=0.5, metavar="CORES",
                        help="the board's CPU quota in cores (default 0.5; none: no quota)")
    netlab.add_argument("--peer-cpu", type=_cores, default=1.0, metavar="CORES",
                        help="the peer's CPU quota in cores (default 1.0; none: no quota)")
    netlab.add_argument("--seconds", type=_positive_float, default=2.0, metavar="S",
                        help="seconds per throughput figure (default 2)")
    netlab.add_argument("--pings", type=int, default=100, metavar="N", help="round trips timed (default 100)")
    netlab.add_argument("--cleanup", action="store_true",
                        help="only remove what any lab left behind (after a SIGKILL), and say what")
    netlab.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    netlab.set_defaults(func=_cmd_bench_netlab)

    codecs = bench_sub.add_parser(
        "codecs", help="offload tensor codecs: ratio, encode/decode time, top-1 change, per split point",
        description="For each demo model with split points, each split point and each codec of "
                    "agent.offload.codecs: compression ratio vs float32, encode and decode time per item at "
                    "batch 1 and 8, the tail's own time and (encode + decode) / tail, and the top-1 accuracy "
                    "change on the model's test set when the tail runs on decoded activations. Head and tail "
                    "graphs are the card's, or cut from the full ONNX model at the split tensor (needs onnx).")
    codecs.add_argument("--models", default=None, metavar="A,B", help="demo models (default: all with split points)")
    codecs.add_argument("--splits", default=None, metavar="A,B", help="split point names (default: all)")
    codecs.add_argument("--codecs", default=None, metavar="A,B", help="codec names (default: all this agent has)")
    codecs.add_argument("--threads", type=int, default=1, help="onnxruntime threads of head and tail (default 1)")
    codecs.add_argument("--repeats", type=int, default=5, help="timing repeats; medians are printed (default 5)")
    codecs.add_argument("--json", default=None, metavar="FILE", help="also write every figure as JSON")
    codecs.set_defaults(func=_cmd_bench_codecs)

    from edge_lab.bench.exit_alloc import add_arguments as exit_alloc_arguments
    exit_alloc = bench_sub.add_parser(
        "exit-alloc", help="early-exit allocation: the online heuristic's gap to the exact optimum (MILP), and "
                           "its decision time",
        description="Random small instances of the batching + early-exit allocation (agent.exits.allocation: "
                    "classes with rates, SLOs and accuracy requirements; which exit and batch size serve each, "
                    "maximising the served rate): the heuristic the agent runs against the MILP optimum "
                    "(agent.exits.exact). Prints the gap's mean, p95, worst and share within 5%, and the "
                    "heuristic's median decision time. Needs scipy (the lab's [bench] extra).")
    exit_alloc_arguments(exit_alloc)
    exit_alloc.set_defaults(func=_cmd_bench_exit_alloc)

    offload = bench_sub.add_parser(
        "offload", help="collaborative offload in the two-board lab: local, full offload, fixed splits, "
                        "Neurosurgeon and ours under several link shapes",
        description="Build the two-board lab (edge_lab.netlab: the board in a namespace with a CPU quota, the "
                    "peer with twice that, Mosquitto beside the peer, the board's link shaped by tbf and delayed "
                    "by a relay), start a peer agent (serve = true) and, per row, a board agent with that row's "
                    "policy; play an overload (--load times the board's capacity, measured at start) from the "
                    "board's own namespace over HTTP; print goodput, SLO attainment, lost and duplicated replies "
                    "and where replies were computed, one table per link shape, and issue 23's targets. Tears "
                    "everything down by itself, Ctrl-C or SIGTERM included. Needs root. About 20 s per row.")
    offload.add_argument("--links", default="10:50,100:10,1000:1", metavar="MBIT:MS,...",
                         help="link shapes, Mbit/s and one-way delay ms each (default 10:50,100:10,1000:1)")
    offload.add_argument("--rows", metavar="KEY,...",
                         help="only these rows: local, full, a split point of the card (resnet_digits: stage1, "
                              "stage2), neurosurgeon, ours (default: every row this branch has)")
    offload.add_argument("--duration", type=_positive_float, default=10.0, metavar="S",
                         help="seconds of trace per row (default 10)")
    offload.add_argument("--load", type=_positive_float, default=3.0, metavar="X",
                         help="the trace's rate as a multiple of the board's measured capacity (default 3)")
    offload.add_argument("--slo-ms", type=_positive_float, default=150.0, metavar="MS",
                         help="the requests' SLO (default 150)")
    offload.add_argument("--model", default="resnet_digits",
                         help="a demo model with split points (default resnet_digits; or mobilenet_digits)")
    offload.add_argument("--board-cpu", type=_cores, default=0.5, metavar="CORES",
                         help="the board's CPU quota in cores (default 0.5; none: no quota)")
    offload.add_argument("--peer-cpu", type=_cores, default=None, metavar="CORES",
                         help="the peer's CPU quota in cores (default twice the board's)")
    offload.add_argument("--seed", type=int, default=0, help="seed of the trace (default 0)")
    offload.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    offload.add_argument("--keep", action="store_true",
                         help="keep the agents' logs and configs (their folder is printed at the end)")
    offload.add_argument("--sim", action="store_true",
                         help="the same comparison in the simulator instead (the board's scheduler on a virtual "
                              "clock, a simulated peer and link; no root, seconds): edge_lab.bench.offload_sim")
    offload.set_defaults(func=_cmd_bench_offload)

    probe = bench_sub.add_parser(
        "probe", help="the idle link probe's estimates of a shaped link, with no offload traffic",
        description="Build the two-board lab (edge_lab.netlab; no CPU quota on the peer, --board-cpu on the board), "
                    "start a peer agent (serve = true) and, per probe size, a board agent that names it as a "
                    "peer and gets no request; re-shape the board's link (unshaped, then each of --links) and "
                    "print the round trip and bandwidth the board's peer table shows, from probes alone, against "
                    "the shape. Needs root. About 15 s per shape and size.")
    probe.add_argument("--links", default="10:50,100:10,1000:1", metavar="MBIT:MS,...",
                       help="link shapes, Mbit/s and one-way delay ms each (default 10:50,100:10,1000:1)")
    probe.add_argument("--sizes", default="16384,65536,262144", metavar="BYTES,...",
                       help="[offload] probe_bytes of each board agent (default 16384,65536,262144)")
    probe.add_argument("--idle-s", type=_positive_float, default=0.25, metavar="S",
                       help="[offload] probe_idle_s (default 0.25: many samples in a short run)")
    probe.add_argument("--settle", type=_positive_float, default=8.0, metavar="S",
                       help="seconds after a re-shape before measuring (default 8)")
    probe.add_argument("--measure", type=_positive_float, default=5.0, metavar="S",
                       help="seconds of statuses per figure (default 5)")
    probe.add_argument("--board-cpu", type=_cores, default=None, metavar="CORES",
                       help="the board's CPU quota in cores (default none)")
    probe.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    probe.set_defaults(func=_cmd_bench_probe)

    pool = bench_sub.add_parser(
        "pool", help="scale-out through the broker: one agent against a shared-subscription pool of three",
        description="Build a lab of three boards (edge_lab.netlab: a namespace and a CPU quota each, Mosquitto "
                    "beside them), run one agent serving the pool, then three; for each, measure the closed-loop "
                    "capacity and play one Poisson trace (--load times three single agents' capacity, measured "
                    "at start) to the pool topic; print goodput, SLO attainment, unanswered replies and the "
                    "spread over the boards, and issue 26's target (three at least 2.7x one). Needs root. "
                    "About a minute.")
    pool.add_argument("--model", default="resnet_digits", help="a demo model (default resnet_digits)")
    pool.add_argument("--cpu", type=_positive_float, default=0.5, metavar="CORES",
                      help="each agent's CPU quota in cores (default 0.5: three fit on 2 cores)")
    pool.add_argument("--duration", type=_positive_float, default=8.0, metavar="S",
                      help="seconds of trace per row (default 8)")
    pool.add_argument("--load", type=_positive_float, default=1.1, metavar="X",
                      help="the trace's rate as a multiple of three single agents' capacity (default 1.1)")
    pool.add_argument("--slo-ms", type=_positive_float, default=200.0, metavar="MS",
                      help="the requests' SLO (default 200)")
    pool.add_argument("--seed", type=int, default=0, help="seed of the trace (default 0)")
    pool.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    pool.set_defaults(func=_cmd_bench_pool)
