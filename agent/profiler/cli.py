"""``edge-agent profile``: measure the configured models on this board and write a profile file.

The lead's :func:`agent.cli.build_parser` mounts it with ``add_profile_parser(sub)``. Heavy
imports (runtimes, numpy) happen in the handler, so ``edge-agent --help`` stays fast.
"""
from __future__ import annotations

import argparse
import sys

__all__ = ["add_profile_parser", "cmd_profile", "QUICK"]

#: --quick: enough to check a board and the pipeline in seconds, not figures to schedule by.
QUICK = {"max_batch": 8, "repeats": 5, "max_concurrency": 2, "min_window_s": 0.05, "rounds": 1}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected an integer >= 1")
    return value


def add_profile_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``profile`` command to an ``add_subparsers()`` object; returns its parser."""
    parser = subparsers.add_parser(
        "profile", help="measure each configured model on this board and write a profile file",
        description="For each model of the config: latency per batch size (alone), latency with k "
                    "instances busy at once and next to each other model, and a fitted interference "
                    "model t(b,k) with its error on held-out points. Writes a versioned JSON profile "
                    "and prints a summary; progress goes to stderr.")
    parser.add_argument("--config", required=True, metavar="FILE|auto|BOARD",
                        help="TOML config (e.g. firmware_configs/generic-linux.toml); `auto`: this board's shipped "
                             "config, detected; or a shipped board's name")
    parser.add_argument("--out", default="profile.json", metavar="FILE", help="profile to write (default profile.json)")
    parser.add_argument("--max-batch", type=_positive_int, default=None, metavar="N",
                        help="largest batch in the sweep (default 64; the config's max_batch is always included "
                             "when smaller); the sweep stops early if a batch does not fit in memory")
    parser.add_argument("--repeats", type=_positive_int, default=None, metavar="N",
                        help="timed runs per point after warm-up (default 30)")
    parser.add_argument("--rounds", type=_positive_int, default=None, metavar="N",
                        help="measure the whole plan N times, interleaved, and keep the median per point, so a "
                             "burst of other work on the board spoils one round, not the figure (default 3)")
    parser.add_argument("--max-concurrency", type=_positive_int, default=None, metavar="K",
                        help="most instances busy at once (default: 2x cores, at most 4)")
    parser.add_argument("--model", action="append", default=None, metavar="NAME",
                        help="profile only this model (repeatable; default: every model in the config)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a check in seconds: max batch {QUICK['max_batch']}, {QUICK['repeats']} repeats, "
                             f"k up to {QUICK['max_concurrency']}, {QUICK['rounds']} round (explicit options still win)")
    parser.set_defaults(func=cmd_profile)
    return parser


def cmd_profile(args: argparse.Namespace) -> int:
    """Run the profile; 0 on success, 2 on a bad config or option (the message names it)."""
    from agent.config import ConfigError, load_config
    from agent.models.card import CardError
    from agent.backends import BackendError
    from agent.profiler.profile_file import save_profile
    from agent.profiler.run import format_summary, profile_config

    from agent.ops.boards import resolve_config_arg
    path, choice = resolve_config_arg(args.config)
    if choice is not None:
        print(f"edge-agent profile: --config auto: {choice.describe()}", file=sys.stderr, flush=True)
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 2
    quick = QUICK if args.quick else {}
    settings = {
        "max_batch": args.max_batch or quick.get("max_batch", 64),
        "repeats": args.repeats or quick.get("repeats", 30),
        "max_concurrency": args.max_concurrency or quick.get("max_concurrency"),
        "rounds": args.rounds or quick.get("rounds", 3),
    }
    if "min_window_s" in quick:
        settings["min_window_s"] = quick["min_window_s"]
    try:
        data = profile_config(config, models=args.model, quick=bool(args.quick), **settings)
    except (ValueError, CardError, BackendError) as exc:
        print(f"edge-agent profile: {exc}", file=sys.stderr)
        return 2
    save_profile(data, args.out)
    print(format_summary(data))
    print(f"\nwrote {args.out}")
    return 0
