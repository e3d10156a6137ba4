"""``edge-agent trace generate``: write a seeded workload trace (DESIGN.md, traces v1).

Kept beside the generators so ``agent/cli.py`` only mounts it (``add_trace_parser(sub)``).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter

from agent.workload.generators import DEMO_APPS, KINDS, AppSpec, WorkloadError, generate
from agent.workload.trace import write_trace

# CLI flag -> generator parameter; a flag left unset keeps the generator's default.
_KIND_FLAGS = {
    "burst_factor": "burst_factor",
    "mean_on": "mean_on_s",
    "mean_off": "mean_off_s",
    "peak_to_trough": "peak_to_trough",
    "period": "period_s",
}


def parse_apps(text: str) -> list[AppSpec]:
    """``demo`` or comma-separated ``APP=MODEL:SLO_MS:SHARE[:PRIORITY]`` specs."""
    if text == "demo":
        return list(DEMO_APPS)
    specs = []
    for item in text.split(","):
        app, sep, rest = item.partition("=")
        parts = rest.split(":")
        if not sep or len(parts) not in (3, 4):
            raise WorkloadError(f"--apps item {item!r}: expected APP=MODEL:SLO_MS:SHARE[:PRIORITY] or 'demo'")
        try:
            slo_ms, share = float(parts[1]), float(parts[2])
            priority = int(parts[3]) if len(parts) == 4 else 0
        except ValueError:
            raise WorkloadError(f"--apps item {item!r}: SLO_MS and SHARE must be numbers, PRIORITY an integer") from None
        specs.append(AppSpec(app.strip(), parts[0].strip(), slo_ms, share, priority))
    return specs


def add_trace_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Mount ``trace generate`` on the top-level subparsers of ``edge-agent``."""
    trace = subparsers.add_parser("trace", help="workload traces: generate seeded arrival traces")
    trace_sub = trace.add_subparsers(dest="trace", required=True, metavar="ACTION")
    gen = trace_sub.add_parser(
        "generate", help="write a seeded trace (poisson, bursty, diurnal) as CSV",
        description="Write a v1 trace (t_s,app,model,slo_ms,priority). --rate is the long-run mean "
                    "arrival rate for every kind, so kinds at one rate offer the same load.")
    gen.add_argument("--kind", required=True, choices=sorted(KINDS), help="arrival process")
    gen.add_argument("--rate", required=True, type=float, metavar="PER_S", help="mean arrivals per second")
    gen.add_argument("--duration", required=True, type=float, metavar="S", help="trace length in seconds")
    gen.add_argument("--seed", required=True, type=int, help="same seed, same trace")
    gen.add_argument("--out", required=True, metavar="FILE", help="CSV to write")
    gen.add_argument("--apps", default="demo", metavar="SPEC",
                     help="'demo' (mobilenet/resnet digits, tight and loose SLO each; the default) or "
                          "APP=MODEL:SLO_MS:SHARE[:PRIORITY],...")
    gen.add_argument("--burst-factor", type=float, help="bursty: high rate / low rate (default 10)")
    gen.add_argument("--mean-on", type=float, metavar="S", help="bursty: mean burst length (default 1)")
    gen.add_argument("--mean-off", type=float, metavar="S", help="bursty: mean gap between bursts (default 4)")
    gen.add_argument("--peak-to-trough", type=float, help="diurnal: peak rate / trough rate (default 4)")
    gen.add_argument("--period", type=float, metavar="S", help="diurnal: period (default: the duration)")
    gen.set_defaults(func=cmd_trace_generate)
    return trace


def cmd_trace_generate(args: argparse.Namespace) -> int:
    """Generate, write, and print one summary line; bad parameters exit 2 with the reason."""
    params = {name: getattr(args, flag) for flag, name in _KIND_FLAGS.items() if getattr(args, flag) is not None}
    accepted = KINDS[args.kind][1]
    stray = [f"--{flag.replace('_', '-')}" for flag, name in _KIND_FLAGS.items() if name in params and name not in accepted]
    if stray:
        takes = ", ".join(f"--{f.replace('_', '-')}" for f, n in _KIND_FLAGS.items() if n in accepted) or "no shape flags"
        print(f"edge-agent trace generate: {', '.join(stray)} not a parameter of --kind {args.kind}: it takes {takes}",
              file=sys.stderr)
        return 2
    try:
        rows = generate(args.kind, rate_per_s=args.rate, duration_s=args.duration,
                        apps=parse_apps(args.apps), seed=args.seed, **params)
    except WorkloadError as exc:
        print(f"edge-agent trace generate: {exc}", file=sys.stderr)
        return 2
    write_trace(args.out, rows)
    counts = Counter(r.app for r in rows)
    per_app = " ".join(f"{app}={n}" for app, n in sorted(counts.items()))
    print(f"{args.out}: {len(rows)} rows, {args.kind} seed {args.seed}, realised {len(rows) / args.duration:.1f}/s "
          f"(asked {args.rate:g}/s) over {args.duration:g} s; {per_app}", flush=True)
    return 0
