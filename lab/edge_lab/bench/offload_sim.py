"""Offload compared in the simulator: every way of placing batches, under several link shapes, on
one trace (issue 23's table, simulated; the live one is ``edge-agent bench offload``).

For each link shape (:class:`LinkShape`: bandwidth and one-way delay to one peer of ``speed``
times this board's compute), :func:`simulate_offload_matrix` runs the same trace through the
simulator (``agent.sim.simulate`` with a simulated peer, ``agent.sim.offload``) under:

* ``local``: the rules, every batch here (the peer present and unused);
* ``full``: ``offload_fixed`` with no split point, share 1: every batch's whole input to the peer;
* ``neurosurgeon``: the split policy with ``[offload] planner = "latency"`` (each batch's own
  earliest finish) and batches of one (``max_batch = 1``): Neurosurgeon's per-request argmin;
* ``fixed:<split>``: ``offload_fixed`` at that split point, share 1, for every split point the
  models' cards offer (the best of these is the yardstick for a split policy on that shape);
* ``split``: ours, the split policy with the ``queue`` planner and the rules' batches.

Each row has the goodput (replies ok within their SLO per second of the trace), the SLO attainment
(of every request sent), the statuses and where the batches went (``placements``: ``local``,
``<peer>:<split>``, ``<peer>:full`` -> batches). ``python -m edge_lab.bench.offload_sim`` prints the
table for the demo ResNet on the three shapes of the issue (its board timed by the card's profile,
one slot, Poisson arrivals at ``--load`` times the board's best throughput, one SLO); ``--codec-ratio``
and ``--codec-us`` stand in for an intermediate-tensor codec.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tomllib
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from agent.config import Config, OffloadConfig, parse_config
from agent.core import LatencyTable
from agent.models.card import load_card
from agent.sim import SimModel, SimOffloadModel, SimPeerSpec, sim_models_from_config, simulate
from agent.workload.trace import TraceRow

PEER = "peer"


@dataclass(frozen=True)
class LinkShape:
    """A link to the peer: ``bandwidth_Bps`` (bytes per second) and ``delay_s`` (one way)."""

    name: str
    bandwidth_Bps: float
    delay_s: float


#: The issue's three shapes: 10 Mbit/s 50 ms, 100 Mbit/s 10 ms, 1 Gbit/s 1 ms (one way).
LINK_SHAPES = (LinkShape("10Mbit/50ms", 10e6 / 8, 0.050), LinkShape("100Mbit/10ms", 100e6 / 8, 0.010),
               LinkShape("1Gbit/1ms", 1e9 / 8, 0.001))
#: Every policy of the table, in its order (``fixed:<split>`` expands to each split point).
POLICIES = ("local", "full", "neurosurgeon", "fixed:*", "split")


def _with_max_batch(config: Config, max_batch: int) -> Config:
    models = tuple(dataclasses.replace(m, batching=dataclasses.replace(m.batching, max_batch=max_batch))
                   for m in config.models)
    return dataclasses.replace(config, models=models)


def _plans(policies: Sequence[str], offload_models: Sequence[SimOffloadModel]) -> list[tuple[str, str, OffloadConfig, bool]]:
    """(label, scheduler policy, [offload] config, unbatched) per policy asked for."""
    splits = list(dict.fromkeys(s.name for m in offload_models for s in m.splits))
    out = []
    for name in policies:
        if name == "local":
            out.append(("local", "rules", OffloadConfig(peers=(PEER,)), False))
        elif name == "full":
            out.append(("full", "offload_fixed", OffloadConfig(peer=PEER, split=None, share=1.0), False))
        elif name == "neurosurgeon":
            out.append(("neurosurgeon", "split", OffloadConfig(peers=(PEER,), planner="latency"), True))
        elif name == "split":
            out.append(("split", "split", OffloadConfig(peers=(PEER,), planner="queue"), False))
        elif name == "fixed:*":
            out.extend((f"fixed:{s}", "offload_fixed", OffloadConfig(peer=PEER, split=s, share=1.0), False)
                       for s in splits)
        elif name.startswith("fixed:"):
            split = name.split(":", 1)[1]
            if split not in splits:
                raise ValueError(f"policy {name!r}: no split point {split!r}; the models offer {splits}")
            out.append((name, "offload_fixed", OffloadConfig(peer=PEER, split=split, share=1.0), False))
        else:
            raise ValueError(f"unknown policy {name!r}: expected one of local, full, neurosurgeon, split, "
                             "fixed:<split point>, fixed:*")
    return out


def simulate_offload_matrix(trace: Sequence[TraceRow], models: Config | Callable[[bool], Sequence[SimModel]],
                            link_shapes: Sequence[LinkShape] = LINK_SHAPES, policies: Sequence[str] = POLICIES, *,
                            tables: Mapping[str, LatencyTable] | None = None,
                            offload_models: Sequence[SimOffloadModel] | None = None, speed: float = 2.0,
                            peer_slots: int = 1, workers: int = 1, cores: int | None = None,
                            codec_ratio: float = 1.0, codec_s_per_item: float = 0.0,
                            duration_s: float | None = None, seed: int = 0) -> list[dict]:
    """One row per (link shape, policy): the figures of the module docstring.

    ``models``: the board's config (its lanes built per run by ``sim_models_from_config`` from
    ``tables``; the split points from each model's card unless ``offload_models`` is given), or a
    function ``models(unbatched)`` returning fresh lanes (``unbatched``: batches of one, for
    Neurosurgeon), then with ``offload_models``. The peer runs ``speed`` times this board's compute
    on ``peer_slots`` slots; ``codec_*`` is the intermediate tensors' codec (``SimPeerSpec``).
    ``duration_s``: goodput's denominator (default: the trace's last arrival)."""
    if isinstance(models, Config):
        config = models
        if tables is None:
            raise ValueError("simulate_offload_matrix: a config needs tables (model name -> LatencyTable)")
        if offload_models is None:
            offload_models = [SimOffloadModel.from_card(load_card(m.card)) for m in config.models]
        unbatched_config = _with_max_batch(config, 1)

        def make(unbatched: bool) -> Sequence[SimModel]:
            return sim_models_from_config(unbatched_config if unbatched else config, tables)
    else:
        make = models
        if offload_models is None:
            raise ValueError("simulate_offload_matrix: give offload_models with a models function")
    if duration_s is None:
        duration_s = max((row.t_s for row in trace), default=0.0) or 1.0
    rows = []
    for shape in link_shapes:
        peer = SimPeerSpec(PEER, speed=speed, slots=peer_slots, bandwidth_Bps=shape.bandwidth_Bps,
                           delay_s=shape.delay_s, codec_ratio=codec_ratio, codec_s_per_item=codec_s_per_item)
        for label, policy, offload, unbatched in _plans(policies, offload_models):
            result = simulate(trace, make(unbatched), workers, cores=cores, seed=seed, policy=policy,
                              peers=[peer], offload=offload, offload_models=offload_models)
            within = sum(1 for r in result.records if r.within_slo)
            rows.append({
                "link": shape.name, "policy": label,
                "goodput_per_s": within / duration_s,
                "slo_attainment": result.slo_attainment(),
                "statuses": result.status_counts(),
                "placements": result.placements,
                "mean_batch": result.mean_batch_size(),
                "peer": result.offload.get("peers", {}).get(PEER, {}),
            })
    return rows


def format_matrix(rows: Sequence[dict]) -> str:
    """The rows as a table: per link shape, each policy's goodput, its ratio to local-only,
    SLO attainment, mean batch and where its batches went (shares)."""
    lines = [f"{'link':<14} {'policy':<14} {'goodput/s':>9} {'x local':>7} {'SLO':>6} {'batch':>5}  placements"]
    local = {r["link"]: r["goodput_per_s"] for r in rows if r["policy"] == "local"}
    for r in rows:
        base = local.get(r["link"])
        ratio = f"{r['goodput_per_s'] / base:6.2f}x" if base else "      -"
        total = sum(r["placements"].values()) or 1
        where = ", ".join(f"{k.replace(PEER + ':', 'peer:')} {100 * v / total:.0f}%" for k, v in
                          sorted(r["placements"].items(), key=lambda kv: -kv[1]))
        lines.append(f"{r['link']:<14} {r['policy']:<14} {r['goodput_per_s']:9.1f} {ratio} "
                     f"{100 * r['slo_attainment']:5.1f}% {r['mean_batch']:5.2f}  {where}")
    return "\n".join(lines)


DEMO_CONFIG = """
config_version = 1
[agent]
device = "board"
workers = 1
[[models]]
name = "resnet_digits"
card = "demo:resnet_digits"
default_slo_ms = 100
"""


def demo_trace(rate_per_s: float, duration_s: float, slo_ms: float, seed: int, model: str = "resnet_digits") -> list[TraceRow]:
    """Poisson arrivals of one model with one SLO."""
    import random
    rng = random.Random(seed)
    rows, t = [], rng.expovariate(rate_per_s)
    while t < duration_s:
        rows.append(TraceRow(t, "app", model, slo_ms, 0))
        t += rng.expovariate(rate_per_s)
    return rows


def demo_tables(config: Config) -> dict[str, LatencyTable]:
    """Each model's table from its card's profile (the first split point's ``full_ms``): the host
    that cut the split files, one intra-op thread."""
    import numpy as np
    tables = {}
    for m in config.models:
        card = load_card(m.card)
        profiled = [p.profile for p in card.split_points if p.profile]
        if not profiled:
            raise ValueError(f"model {m.name!r}: its card has no split point with a profile")
        p = profiled[0]
        tables[m.name] = LatencyTable(np.array(p["batch_sizes"], dtype=np.int64), np.array(p["full_ms"]) / 1000.0)
    return tables


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_lab.bench.offload_sim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--load", type=float, default=3.0,
                        help="offered load, in multiples of the board's own capacity at its most efficient batch size (default 3)")
    parser.add_argument("--duration", type=float, default=20.0, help="trace seconds (default 20)")
    parser.add_argument("--slo-ms", type=float, default=100.0)
    parser.add_argument("--speed", type=float, default=2.0, help="the peer's compute, in multiples of the board's")
    parser.add_argument("--codec-ratio", type=float, default=1.0, help="split tensors' size reduction (1: none)")
    parser.add_argument("--codec-us", type=float, default=0.0, help="codec time per item, microseconds")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    config = parse_config(tomllib.loads(DEMO_CONFIG))
    tables = demo_tables(config)
    table = tables["resnet_digits"]
    max_batch = config.models[0].batching.max_batch
    capacity = max(b / table.predict(b) for b in range(1, max_batch + 1))   # at its most efficient batch
    trace = demo_trace(args.load * capacity, args.duration, args.slo_ms, args.seed)
    rows = simulate_offload_matrix(trace, config, tables=tables, speed=args.speed, codec_ratio=args.codec_ratio,
                                   codec_s_per_item=args.codec_us / 1e6, duration_s=args.duration)
    print(f"simulated: resnet_digits, {len(trace)} requests over {args.duration:g} s ({args.load:g}x the board's "
          f"capacity of {capacity:.0f}/s), SLO {args.slo_ms:g} ms, peer {args.speed:g}x, codec ratio {args.codec_ratio:g}")
    print(format_matrix(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["LINK_SHAPES", "LinkShape", "POLICIES", "format_matrix", "simulate_offload_matrix"]
