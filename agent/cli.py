"""``edge-agent``: serve, profile and make traces from the command line; demo and benchmark through
the lab package (``edge_lab``, the ``edge-agent-lab`` distribution in ``lab/``) where it is installed."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import time

#: What ``edge-agent demo`` and ``edge-agent bench`` say where the lab is not installed (a board).
#: How often `edge-agent run`'s main thread looks whether a stop signal came.
STOP_POLL_S = 0.2

LAB_MISSING = (
    "the demo and the benchmarks (bench core | run | triton) live in the edge-agent-lab package, which is "
    "not installed here: the agent's own wheel, the one a board installs, holds the runtime only. From the "
    "source tree: `pip install -e lab` beside the agent (or `bash tools/dev.sh setup`, which installs both "
    "into .venv)")

_LAB_COMMANDS = {
    "demo": "local broker + agent + simulated cameras, with a live table (lab)",
    "bench": "benchmarks that print figures: core, run, triton (lab)",
}


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a port in 0..65535 (0 = any free port)")
    return port


def _cmd_run(args: argparse.Namespace) -> int:
    from agent.config import ConfigError, load_config
    from agent.intake.http import raise_open_file_limit
    from agent.profiler import ProfileError
    from agent.service import Service
    # The process's own: each HTTP connection is a descriptor, and the common soft limit of 1,024
    # would stop new clients at about a thousand idle ones (issue 21).
    raise_open_file_limit()

    def read_config():
        """The config file with this command line's overrides: at start, and for ``reload-config``."""
        config = load_config(args.config)
        if args.http_port is not None:
            config = dataclasses.replace(config, http=dataclasses.replace(config.http, enabled=True, port=args.http_port))
        if args.no_mqtt:
            config = dataclasses.replace(config, mqtt=dataclasses.replace(config.mqtt, enabled=False))
        return config

    try:
        config = read_config()
        if not (config.mqtt.enabled or config.http.enabled):
            print("edge-agent: no intake: enable [mqtt] or [http] in the config, or give --http-port", file=sys.stderr)
            return 2
        signals: list[int] = []
        # A signal handler only appends to a list: no lock, no I/O. One that set a threading.Event
        # could be re-entered by a second signal inside the first's Event.set and deadlock on the
        # event's own lock in the same thread, leaving the agent deaf to SIGTERM. Ctrl-C (SIGINT)
        # is handled the same way, so a second Ctrl-C cannot interrupt the shutdown half-way.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda signum, frame: signals.append(signum))
        service = Service(config, config_source=read_config)
    except (ConfigError, ProfileError) as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:   # the HTTP port is taken, the broker unreachable...
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 1
    endpoints = ([f"mqtt://{config.mqtt.host}:{config.mqtt.port}"] if service.mqtt is not None else []) + (
        [f"http://{config.http.host}:{service.http.port} (Open Inference Protocol)"] if service.http is not None else [])
    print(f"edge-agent: device {config.device!r} serving {sorted(service.agent.models)} on {' and '.join(endpoints)}",
          flush=True)
    try:
        while not signals:
            time.sleep(STOP_POLL_S)
    finally:
        print("edge-agent: stopping (answering what is queued) ...", flush=True)
        service.close()
        # Stopped: more signals change nothing. Ignored, they stay ignored while the interpreter
        # exits (it puts a Python handler back to the default, which would end it by the signal).
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
    return 0


def _cmd_selftest(args: argparse.Namespace) -> int:
    """``edge-agent selftest``: the table (or JSON) of :func:`agent.ops.selftest.run_selftest`;
    exit 0 when nothing failed, 1 when a check failed, 2 when the config itself is invalid."""
    from agent.config import Config, ConfigError, load_config
    from agent.ops.selftest import GROUPS, run_selftest
    from agent.profiler.run import Progress
    try:
        config = load_config(args.config) if args.config else Config.demo()
    except ConfigError as exc:
        print(f"edge-agent selftest: {exc}", file=sys.stderr)
        return 2
    if args.no_mqtt:
        config = dataclasses.replace(config, mqtt=dataclasses.replace(config.mqtt, enabled=False))
    groups = [g for g in GROUPS if g not in (args.skip or ())]
    steps = ("core" in groups) + len(config.models) * ("models" in groups) + ("accelerators" in groups) + ("broker" in groups)
    progress = Progress(steps, stream=None if args.quiet else sys.stderr)
    try:
        report = run_selftest(config, config_file=args.config, groups=groups, state_dir=args.state_dir,
                              progress=progress.step)
    finally:
        progress.close()
    print(report.to_json() if args.json else report.format_table(), flush=True)
    return report.exit_code


def _lab_missing(args: argparse.Namespace) -> int:
    print(f"edge-agent {args.command}: {LAB_MISSING}", file=sys.stderr)
    return 2


def _add_lab_parsers(sub: argparse._SubParsersAction) -> None:
    """``demo`` and ``bench`` from the lab where it is installed (its parsers import nothing heavy);
    elsewhere, commands of the same names that say where they live and exit 2."""
    try:
        from edge_lab.cli import add_lab_parsers
    except ModuleNotFoundError as exc:
        if exc.name != "edge_lab":
            raise                   # the lab is there but broken: show that, not "not installed"
    else:
        add_lab_parsers(sub)
        return
    for name, help_text in _LAB_COMMANDS.items():
        sub.add_parser(name, help=help_text, description=f"Not installed: {LAB_MISSING}.").set_defaults(func=_lab_missing)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="On-device DNN inference agent: SLO-aware adaptive batching over MQTT and in process.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="serve the models of a config file until SIGTERM or Ctrl-C",
                         description="Load the models of a config (see firmware_configs/), profile them, and serve "
                                     "inference requests over MQTT and/or HTTP (the Open Inference Protocol, "
                                     "Triton's HTTP API) until SIGTERM or Ctrl-C; queued requests are answered "
                                     "before exit.")
    run.add_argument("--config", required=True, metavar="FILE", help="TOML config (e.g. firmware_configs/generic-linux.toml)")
    run.add_argument("--http-port", type=_port, metavar="N",
                     help="also serve the Open Inference Protocol (KServe v2 / Triton HTTP, e.g. tritonclient.http) "
                          "on port N (0 = any free port) of the config's [http] host (default 127.0.0.1)")
    run.add_argument("--no-mqtt", action="store_true",
                     help="do not connect to the MQTT broker (serve only HTTP: give --http-port or enable [http])")
    run.set_defaults(func=_cmd_run)

    selftest = sub.add_parser(
        "selftest", help="check this board can serve a config: core, models, accelerators, broker, headroom",
        description="Check that this board can serve a config: the compiled core agrees with its pure twin; each "
                    "model's file matches its card's sha256 and reproduces the card's golden outputs on the "
                    "configured backend, and its latency against the profile (drift); Edge TPU and Jetson GPU "
                    "found or not, with what to install; the MQTT broker's round trip; disk, memory and "
                    "temperature headroom. Prints a table (or --json); exit 1 if any check fails, each failure "
                    "saying what to do; 2 for an invalid config.")
    selftest.add_argument("--config", metavar="FILE", help="TOML config, as for `edge-agent run` "
                          "(default: the embedded demo config: both demo models, broker 127.0.0.1:1883)")
    selftest.add_argument("--json", action="store_true", help="print the report as JSON (for machines)")
    selftest.add_argument("--no-mqtt", action="store_true", help="skip the broker check ([mqtt] enabled = false)")
    selftest.add_argument("--skip", nargs="+", metavar="GROUP",
                          choices=("core", "files", "models", "accelerators", "broker", "headroom"),
                          help="groups of checks not to run: core files models accelerators broker headroom")
    selftest.add_argument("--state-dir", metavar="DIR", help="the agent's state directory, checked for free disk "
                          "(default: $STATE_DIRECTORY, else the profile file's folder)")
    selftest.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    selftest.set_defaults(func=_cmd_selftest)

    _add_lab_parsers(sub)

    from agent.ops.cli import add_ctl_parser, add_keys_parser
    from agent.profiler.cli import add_profile_parser
    from agent.workload.cli import add_trace_parser
    add_profile_parser(sub)
    add_trace_parser(sub)
    add_keys_parser(sub)
    add_ctl_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.func is not _lab_missing:   # a lab command's arguments, where the lab is absent
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
