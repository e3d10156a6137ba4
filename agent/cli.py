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


def _config_path(args: argparse.Namespace, command: str) -> str | None:
    """``--config``'s file: ``auto`` detects the board (agent.ops.boards) and says on stderr which
    config it took and why; a shipped board's name (``jetson-orin-nano``) is its config; else a path."""
    if not args.config:
        return None
    from agent.ops.boards import resolve_config_arg
    path, choice = resolve_config_arg(args.config)
    if choice is not None:
        print(f"edge-agent {command}: --config auto: {choice.describe()}", file=sys.stderr, flush=True)
    return path


def _with_policy(config, policy: str):
    """``config`` deciding by ``policy``: a policy's name, or a learned policy's directory (checked
    here against the config's models: a ``ConfigError`` names what differs)."""
    from pathlib import Path

    from agent.config import ConfigError
    from agent.learned.card import CARD_FILE, PolicyCardError, load_policy
    from agent.scheduler.policy import policy_names
    if (Path(policy) / CARD_FILE).is_file():
        try:
            load_policy(policy, [m.name for m in config.models])
        except PolicyCardError as exc:
            raise ConfigError("--policy", policy, f"a policy for this config's models ({exc})") from None
        return dataclasses.replace(config, policy="learned", policy_path=str(Path(policy).resolve()))
    if policy not in policy_names():
        raise ConfigError("--policy", policy, f"one of {policy_names()} or a learned policy's directory (its card.json)")
    if policy == "learned" and config.policy_path is None:
        raise ConfigError("--policy", policy, "a learned policy's directory, or [agent] policy_path in the config")
    return dataclasses.replace(config, policy=policy)


def _cmd_run(args: argparse.Namespace) -> int:
    from agent.config import ConfigError, load_config
    from agent.intake.http import raise_open_file_limit
    from agent.ops.supervisor import Supervisor
    from agent.profiler import ProfileError
    from agent.ops.json_log import configure_logging
    from agent.service import Service
    # The process's own: each HTTP connection is a descriptor, and the common soft limit of 1,024
    # would stop new clients at about a thousand idle ones (issue 21).
    raise_open_file_limit()
    # systemd (Type=notify): READY=1, STATUS=, WATCHDOG=1 from the scheduler's progress, STOPPING=1;
    # all no-ops without $NOTIFY_SOCKET (agent.ops.supervisor).
    try:
        supervisor = Supervisor()
    except ValueError as exc:   # a malformed $NOTIFY_SOCKET
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 2
    args.json_logs = args.log_format == "json"

    def read_config():
        """The config file with this command line's overrides: at start, and for ``reload-config``."""
        config = load_config(_config_path(args, "run"))
        if args.http_port is not None:
            config = dataclasses.replace(config, http=dataclasses.replace(config.http, enabled=True, port=args.http_port))
        if args.no_mqtt:
            config = dataclasses.replace(config, mqtt=dataclasses.replace(config.mqtt, enabled=False))
        if args.policy is not None:
            config = _with_policy(config, args.policy)
        return config

    try:
        config = read_config()
        if args.log_format is None and config.log_format == "json":
            configure_logging(logging.getLogger().level, "json")
            args.json_logs = True
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
        with supervisor.starting(f"loading and profiling {', '.join(m.name for m in config.models)}"):
            service = Service(config, mqtt_retry=True, config_source=read_config)
    except (ConfigError, ProfileError) as exc:
        _say(args, f"edge-agent: {exc}", error=True)
        return 2
    except OSError as exc:   # the HTTP port is taken, the broker unreachable...
        _say(args, f"edge-agent: {exc}", error=True)
        return 1
    endpoints = ([f"mqtt://{config.mqtt.host}:{config.mqtt.port}"] if service.mqtt is not None else []) + (
        [f"http://{config.http.host}:{service.http.port} (Open Inference Protocol)"] if service.http is not None else [])
    metrics = (f"; metrics on http://{config.telemetry.prometheus_host}:{service.prometheus.port}/metrics"
               if service.prometheus is not None else "")
    models = sorted(service.agent.models)
    _say(args, f"edge-agent: device {config.device!r} serving {models} on {' and '.join(endpoints)}{metrics}")
    for missing in service.missing():
        _say(args, f"edge-agent: degraded: {missing}", error=True)
    urls = [endpoint.split(" ")[0] for endpoint in endpoints]
    supervisor.ready(service, f"serving {', '.join(models)} on {', '.join(urls)}")
    try:
        while not signals:
            supervisor.tick()
            time.sleep(STOP_POLL_S)
    finally:
        supervisor.stopping(config.drain_timeout_s)
        _say(args, "edge-agent: stopping (answering what is queued) ...")
        service.close()
        supervisor.close()
        # Stopped: more signals change nothing. Ignored, they stay ignored while the interpreter
        # exits (it puts a Python handler back to the default, which would end it by the signal).
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
    return 0


def _say(args: argparse.Namespace, text: str, *, error: bool = False) -> None:
    """What `edge-agent run` tells its operator (serving, stopping, why it could not start): a plain
    line (errors on stderr), or with JSON logs a JSON log line on stdout like every other."""
    if getattr(args, "json_logs", False):
        from agent.ops.json_log import json_line
        print(json_line("ERROR" if error else "INFO", "agent.cli", text), flush=True)
    else:
        print(text, file=sys.stderr if error else sys.stdout, flush=True)


def _cmd_selftest(args: argparse.Namespace) -> int:
    """``edge-agent selftest``: the table (or JSON) of :func:`agent.ops.selftest.run_selftest`;
    exit 0 when nothing failed, 1 when a check failed, 2 when the config itself is invalid."""
    from agent.config import Config, ConfigError, load_config
    from agent.ops.selftest import GROUPS, run_selftest
    from agent.progress import Progress
    config_file = _config_path(args, "selftest")
    try:
        config = load_config(config_file) if config_file else Config.demo()
    except ConfigError as exc:
        print(f"edge-agent selftest: {exc}", file=sys.stderr)
        return 2
    if args.no_mqtt:
        config = dataclasses.replace(config, mqtt=dataclasses.replace(config.mqtt, enabled=False))
    groups = [g for g in GROUPS if g not in (args.skip or ())]
    steps = ("core" in groups) + len(config.models) * ("models" in groups) + ("accelerators" in groups) + ("broker" in groups)
    progress = Progress(steps, stream=None if args.quiet else sys.stderr, desc="selftest")
    try:
        report = run_selftest(config, config_file=config_file, groups=groups, state_dir=args.state_dir,
                              progress=progress.step)
    finally:
        progress.close()
    print(report.to_json() if args.json else report.format_table(), flush=True)
    return report.exit_code


def _cmd_service_install(args: argparse.Namespace) -> int:
    import subprocess
    from pathlib import Path

    from agent.config import ConfigError
    from agent.ops.systemd import install
    try:
        steps = install(Path(args.root), user=args.user, config_source=args.config, exec_start=args.exec_start,
                        dry_run=args.dry_run, board=args.board)
    except (ValueError, ConfigError) as exc:
        print(f"edge-agent service install: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"edge-agent service install: {' '.join(exc.cmd)} failed ({exc.returncode}): {exc.stderr.strip()}",
              file=sys.stderr)
        return 1
    except OSError as exc:      # not root, a read-only file system...
        print(f"edge-agent service install: {exc}", file=sys.stderr)
        return 1
    for step in steps:
        print(step)
    if Path(args.root).resolve() == Path("/") and not args.dry_run:
        print("next: systemctl enable --now edge-agent; systemctl status edge-agent (its STATUS line: load, goodput)")
    return 0


def _add_service_parser(sub: argparse._SubParsersAction) -> None:
    from agent.ops.systemd import BOARD_DEVICES, DEFAULT_USER
    service = sub.add_parser("service", help="run the agent as the board's systemd service (service install)",
                             description="Operate the agent as a systemd service.")
    actions = service.add_subparsers(dest="action", required=True, metavar="ACTION")
    install = actions.add_parser(
        "install", help="write the unit, the config and the service user (idempotent)",
        description="Write /etc/systemd/system/edge-agent.service (Type=notify, watchdog, hardening), "
                    "/etc/edge-agent/agent.toml (from --config, or the firmware_configs/ file for this board; an "
                    "existing one is kept) and the system user; print each action. Running it again changes "
                    "nothing that is already right.")
    install.add_argument("--root", default="/", metavar="DIR",
                         help="install under DIR (a staging tree): users are then not created, their commands printed")
    install.add_argument("--user", default=DEFAULT_USER, metavar="NAME", help=f"the service user (default {DEFAULT_USER})")
    install.add_argument("--config", metavar="FILE", help="the config to install: a file, or a shipped board's name "
                                                          "(default: the shipped config for this board, as --config auto picks it)")
    install.add_argument("--board", choices=sorted(BOARD_DEVICES), metavar="BOARD",
                         help="whose accelerator nodes the unit's DeviceAllow= lets the service open (default: the "
                              "board --config names, else the one detected here; a --root tree without it: every "
                              f"board's). One of {', '.join(sorted(BOARD_DEVICES))}")
    install.add_argument("--exec", dest="exec_start", metavar="PATH",
                         help="the edge-agent executable for ExecStart (default: the one running this command)")
    install.add_argument("--dry-run", action="store_true", help="print what would be done, change nothing")
    install.set_defaults(func=_cmd_service_install)


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
    from agent.ops.boards import BOARD_CONFIGS   # no heavy imports: the names --config also takes
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
    run.add_argument("--config", required=True, metavar="FILE|auto|BOARD",
                     help="TOML config (e.g. firmware_configs/generic-linux.toml); `auto`: the shipped config of "
                          "this board, detected (it says which and why); or a shipped board's name: "
                          + ", ".join(BOARD_CONFIGS))
    run.add_argument("--http-port", type=_port, metavar="N",
                     help="also serve the Open Inference Protocol (KServe v2 / Triton HTTP, e.g. tritonclient.http) "
                          "on port N (0 = any free port) of the config's [http] host (default 127.0.0.1)")
    run.add_argument("--no-mqtt", action="store_true",
                     help="do not connect to the MQTT broker (serve only HTTP: give --http-port or enable [http])")
    run.add_argument("--policy", metavar="NAME|DIR",
                     help="decide dispatches by this policy instead of the config's [agent] policy: a name (rules, "
                          "learned, ...) or a learned policy's directory (e.g. policies/cpu-2core), checked at start")
    run.add_argument("--log-format", choices=("text", "json"),
                     help="json: one JSON object a line on stdout (ts, level, logger, msg, ...), for journald; "
                          "default: the config's [agent] log_format, else text on stderr")
    run.set_defaults(func=_cmd_run)

    selftest = sub.add_parser(
        "selftest", help="check this board can serve a config: core, models, accelerators, broker, headroom",
        description="Check that this board can serve a config: the compiled core agrees with its pure twin; each "
                    "model's file matches its card's sha256 and reproduces the card's golden outputs on the "
                    "configured backend, and its latency against the profile (drift); Edge TPU and Jetson GPU "
                    "found or not, with what to install; the MQTT broker's round trip; disk, memory and "
                    "temperature headroom. Prints a table (or --json); exit 1 if any check fails, each failure "
                    "saying what to do; 2 for an invalid config.")
    selftest.add_argument("--config", metavar="FILE|auto|BOARD", help="TOML config, as for `edge-agent run` (`auto`: "
                          "this board's shipped config, detected) "
                          "(default: the embedded demo config: both demo models, broker 127.0.0.1:1883)")
    selftest.add_argument("--json", action="store_true", help="print the report as JSON (for machines)")
    selftest.add_argument("--no-mqtt", action="store_true", help="skip the broker check ([mqtt] enabled = false)")
    selftest.add_argument("--skip", nargs="+", metavar="GROUP",
                          choices=("core", "files", "models", "accelerators", "broker", "headroom"),
                          help="groups of checks not to run: core files models accelerators broker headroom")
    selftest.add_argument("--state-dir", metavar="DIR", help="the agent's state directory, checked for free disk "
                          "(default: $STATE_DIRECTORY, else the profile file's folder)")
    selftest.add_argument("-q", "--quiet", action="store_true",
                          help="no progress bar on stderr (there is none where stderr is not a terminal)")
    selftest.set_defaults(func=_cmd_selftest)

    _add_service_parser(sub)
    _add_lab_parsers(sub)

    from agent.fleet.cli import add_plan_parser, add_push_parser
    from agent.models.cli import add_model_parser
    from agent.ops.cli import add_ctl_parser, add_keys_parser
    from agent.profiler.cli import add_profile_parser
    from agent.workload.cli import add_trace_parser
    add_profile_parser(sub)
    add_model_parser(sub)
    add_trace_parser(sub)
    add_keys_parser(sub)
    add_ctl_parser(sub)
    add_plan_parser(sub)
    add_push_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.func is not _lab_missing:   # a lab command's arguments, where the lab is absent
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    from agent.ops.json_log import configure_logging
    configure_logging(logging.INFO if args.verbose else logging.WARNING, getattr(args, "log_format", None) or "text")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
