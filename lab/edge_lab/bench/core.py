"""Benchmarks of the compiled core, side by side with its twin and the obvious baselines.

* ``bench_queue``: push + pop pairs per second at a steady queue depth, pushing requests one by
  one and popping whole batches with ``pop_batch`` (how the agent uses the queue), for the
  compiled ``DeadlineQueue``, the pure twin, and a ``heapq`` of ``(deadline, seq, rid)`` tuples
  (push a tuple, ``heappop`` one at a time). The heapq figure is the bar the compiled queue must
  clear by a wide margin to be worth its build step.
* ``bench_assembly``: ``gather_into`` of a batch of separate request tensors into one
  preallocated buffer, against a single ``numpy.copyto`` of the same number of bytes from one
  contiguous block: the memory-bandwidth floor no assembly can beat.

Both measure every contender in the same run, interleaved repeat by repeat (so drift in CPU
frequency or load hits all alike), with the garbage collector off while timing, and report the
median over repeats. Both always import the compiled modules and the twin by name, whatever
``EDGE_AGENT_CORE`` selects. Where the extensions are not built (and ``EDGE_AGENT_CORE=python``
lets ``agent.core`` import at all), the compiled figures are ``None`` and ``compiled_error``
says why.

The per-pair cost of the compiled queue is mostly Python's own: the ``for`` loop and one method
call per push (~40 ns on a 2.3 GHz Xeon), which the heapq baseline pays too; the C work behind
a push and its share of a ``pop_batch`` is ~40-70 ns, depending on how ordered the deadlines are.
"""
from __future__ import annotations

import gc
import heapq
import importlib
import math
import random
import statistics
import time
from typing import Any, Callable, Mapping

import numpy as np

from agent.core import pure

__all__ = ["bench_queue", "bench_assembly", "format_core_report"]

#: Targets the compiled core is held to (see the brief in the README's benchmark section).
QUEUE_TARGET_PAIRS_PER_S = 2_000_000
QUEUE_TARGET_RATIO_OVER_HEAPQ = 5.0
ASSEMBLY_TARGET_RATIO_OVER_COPYTO = 2.0


def _compiled(module: str) -> tuple[Any, str | None]:
    try:
        return importlib.import_module(f"agent.core.{module}"), None
    except ImportError as exc:
        return None, f"compiled core not built: {exc}"


def _timed(run: Callable[[], Any]) -> float:
    """Seconds taken by ``run()``, with the collector off (as timeit does)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()


# --------------------------------------------------------------------------------------------
# Queue
# --------------------------------------------------------------------------------------------


def _queue_round(queue_cls: type, depth: int, batch: int, deadlines: list[float]) -> Callable[[], None]:
    """A timed body: ``len(deadlines) - depth`` pushes, popped in batches, at steady depth."""
    queue = queue_cls(depth + batch)
    for rid in range(depth):
        queue.push(rid, deadlines[rid], 0.0)
    ready = np.empty(batch, dtype=np.int64)
    expired = np.empty(batch, dtype=np.int64)

    def run(push=queue.push, pop_batch=queue.pop_batch, deadlines=deadlines,
            ready=ready, expired=expired) -> None:
        # Everything the loop touches is a fast local (default arguments), as in real code.
        for start in range(depth, len(deadlines), batch):
            for rid in range(start, start + batch):
                push(rid, deadlines[rid], 0.0)
            pop_batch(batch, 0.0, ready, expired)

    return run


def _heapq_round(depth: int, batch: int, deadlines: list[float]) -> Callable[[], None]:
    heap = [(deadlines[rid], rid, rid) for rid in range(depth)]
    heapq.heapify(heap)

    def run(heap=heap, heappush=heapq.heappush, heappop=heapq.heappop, deadlines=deadlines) -> None:
        for start in range(depth, len(deadlines), batch):
            for rid in range(start, start + batch):
                heappush(heap, (deadlines[rid], rid, rid))
            for _ in range(batch):
                heappop(heap)

    return run


def _deadlines(workload: str, count: int) -> list[float]:
    """Seeded deadlines for ``count`` requests.

    ``"mixed_slo"`` (default): requests arrive every 50 us, each with one of four SLOs
    (20, 50, 100, 250 ms), so deadlines are increasing within an SLO class and interleaved
    across classes, as on a board serving several applications. ``"random"``: uniform in
    [1, 2) s, the worst case for a heap (every comparison a coin flip).
    """
    rng = random.Random(7)
    if workload == "mixed_slo":
        slos = (0.020, 0.050, 0.100, 0.250)
        return [i * 50e-6 + rng.choice(slos) for i in range(count)]
    if workload == "random":
        return [rng.uniform(1.0, 2.0) for _ in range(count)]
    raise ValueError(f"workload must be 'mixed_slo' or 'random', got {workload!r}")


def bench_queue(depth: int = 64, n_ops: int = 200_000, batch: int = 32, repeats: int = 5,
                workload: str = "mixed_slo") -> dict:
    """Push+pop pairs per second: compiled DeadlineQueue vs pure twin vs heapq of tuples.

    ``n_ops`` requests are pushed one at a time onto a queue holding ``depth`` requests, and
    popped ``batch`` at a time, so the depth stays at ``depth`` .. ``depth + batch``. The
    deadlines follow ``workload`` (see ``_deadlines``); all contenders get the same ones.
    """
    if depth < 0 or n_ops < batch or batch < 1 or repeats < 1:
        raise ValueError(
            f"need depth >= 0, batch >= 1, n_ops >= batch, repeats >= 1; "
            f"got depth={depth}, n_ops={n_ops}, batch={batch}, repeats={repeats}"
        )
    n_ops -= n_ops % batch
    deadlines = _deadlines(workload, depth + n_ops)
    compiled, compiled_error = _compiled("_deadline_queue")
    contenders: dict[str, Callable[[], Callable[[], None]]] = {
        "python": lambda: _queue_round(pure.DeadlineQueue, depth, batch, deadlines),
        "heapq": lambda: _heapq_round(depth, batch, deadlines),
    }
    if compiled is not None:
        contenders = {"compiled": lambda: _queue_round(compiled.DeadlineQueue, depth, batch, deadlines), **contenders}
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, make in contenders.items():
            seconds[name].append(_timed(make()))
    rate = {name: n_ops / statistics.median(times) for name, times in seconds.items()}
    result: dict[str, Any] = {
        "benchmark": "queue",
        "workload": workload,
        "depth": depth,
        "batch": batch,
        "n_ops": n_ops,
        "repeats": repeats,
        "compiled_pairs_per_s": rate.get("compiled"),
        "python_pairs_per_s": rate["python"],
        "heapq_pairs_per_s": rate["heapq"],
        "compiled_ns_per_pair": 1e9 / rate["compiled"] if "compiled" in rate else None,
        "python_ns_per_pair": 1e9 / rate["python"],
        "heapq_ns_per_pair": 1e9 / rate["heapq"],
        "ratio_compiled_over_heapq": rate["compiled"] / rate["heapq"] if "compiled" in rate else None,
        "ratio_compiled_over_python": rate["compiled"] / rate["python"] if "compiled" in rate else None,
        "target_pairs_per_s": QUEUE_TARGET_PAIRS_PER_S,
        "target_ratio_over_heapq": QUEUE_TARGET_RATIO_OVER_HEAPQ,
        "compiled_error": compiled_error,
    }
    result["meets_rate_target"] = compiled is not None and rate["compiled"] >= QUEUE_TARGET_PAIRS_PER_S
    result["meets_ratio_aim"] = (compiled is not None
                                 and result["ratio_compiled_over_heapq"] >= QUEUE_TARGET_RATIO_OVER_HEAPQ)
    return result


# --------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------


def bench_assembly(batch: int = 32, shape: tuple[int, ...] = (3, 224, 224), repeats: int = 20) -> dict:
    """Seconds to gather ``batch`` float32 arrays of ``shape`` into a preallocated batch buffer:
    compiled ``gather_into`` vs the pure twin vs one ``numpy.copyto`` of the same bytes."""
    if batch < 1 or repeats < 1:
        raise ValueError(f"need batch >= 1 and repeats >= 1, got batch={batch}, repeats={repeats}")
    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng(0)
    srcs = [rng.random(shape, dtype=np.float32) for _ in range(batch)]
    block = np.stack(srcs)  # the same bytes, contiguous: copyto's best case
    dst = np.empty((batch, *shape), dtype=np.float32)
    compiled, compiled_error = _compiled("_batch_assembly")
    contenders: dict[str, Callable[[], Any]] = {
        "python": lambda: pure.gather_into(dst, srcs),
        "copyto": lambda: np.copyto(dst, block),
    }
    if compiled is not None:
        contenders = {"compiled": lambda: compiled.gather_into(dst, srcs), **contenders}
    for run in contenders.values():  # warm up: fault in dst's pages, load code
        run()
    if compiled is not None:
        compiled.gather_into(dst, srcs)
        if not np.array_equal(dst, block):  # pragma: no cover - the tests guard this
            raise AssertionError("gather_into produced a wrong batch")
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            seconds[name].append(_timed(run))
    median = {name: statistics.median(times) for name, times in seconds.items()}
    nbytes = int(block.nbytes)
    result: dict[str, Any] = {
        "benchmark": "assembly",
        "batch": batch,
        "shape": list(shape),
        "dtype": "float32",
        "bytes": nbytes,
        "repeats": repeats,
        "compiled_ms": 1e3 * median["compiled"] if "compiled" in median else None,
        "python_ms": 1e3 * median["python"],
        "copyto_ms": 1e3 * median["copyto"],
        "compiled_gb_per_s": nbytes / median["compiled"] / 1e9 if "compiled" in median else None,
        "copyto_gb_per_s": nbytes / median["copyto"] / 1e9,
        "ratio_compiled_over_copyto": median["compiled"] / median["copyto"] if "compiled" in median else None,
        "ratio_python_over_copyto": median["python"] / median["copyto"],
        "target_ratio_max": ASSEMBLY_TARGET_RATIO_OVER_COPYTO,
        "compiled_error": compiled_error,
    }
    result["meets_target"] = (
        compiled is not None and result["ratio_compiled_over_copyto"] <= ASSEMBLY_TARGET_RATIO_OVER_COPYTO
    )
    return result


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _number(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:,.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  " + "   ".join(cells))
    return lines


def _queue_section(r: Mapping[str, Any]) -> list[str]:
    heapq_rate = r["heapq_pairs_per_s"]
    rows = []
    for name, label in [("compiled", "compiled DeadlineQueue"), ("python", "pure twin"), ("heapq", "heapq of tuples")]:
        rate = r.get(f"{name}_pairs_per_s")
        ratio = None if rate is None else rate / heapq_rate
        rows.append([label, _number(rate, 0), _number(r.get(f"{name}_ns_per_pair")),
                     "n/a" if ratio is None else f"{ratio:.2f}x"])
    lines = [
        f"Deadline queue: push one by one + pop_batch({r['batch']}) at steady depth {r['depth']}, "
        f"{r['workload']} deadlines, {r['n_ops']:,} pairs, median of {r['repeats']}",
        *_table(["implementation", "pairs/s", "ns/pair", "vs heapq"], rows),
        f"  target: >= {r['target_pairs_per_s']:,} pairs/s: " + ("met" if r["meets_rate_target"] else "NOT met")
        + f"; aim: >= {r['target_ratio_over_heapq']:g}x heapq: " + ("met" if r["meets_ratio_aim"] else "NOT met"),
    ]
    if r.get("compiled_error"):
        lines.append(f"  note: {r['compiled_error']}")
    return lines


def _assembly_section(r: Mapping[str, Any]) -> list[str]:
    mib = r["bytes"] / 2**20
    rows = []
    for name, label in [("compiled", "gather_into (compiled)"), ("python", "gather_into (pure twin)"),
                        ("copyto", "one numpy.copyto")]:
        ms = r.get(f"{name}_ms")
        gbps = None if ms is None else r["bytes"] / (ms / 1e3) / 1e9
        ratio = None if ms is None else ms / r["copyto_ms"]
        rows.append([label, _number(ms, 3), _number(gbps, 2), "n/a" if ratio is None else f"{ratio:.2f}x"])
    shape = "x".join(str(s) for s in r["shape"])
    lines = [
        f"Batch assembly: {r['batch']} {r['dtype']} {shape} arrays ({mib:.1f} MiB) into one "
        f"preallocated buffer, median of {r['repeats']}",
        *_table(["method", "ms", "GB/s", "vs copyto"], rows),
        f"  target: gather_into within {r['target_ratio_max']:g}x of one copyto: "
        + ("met" if r["meets_target"] else "NOT met"),
    ]
    if r.get("compiled_error"):
        lines.append(f"  note: {r['compiled_error']}")
    return lines


def _exit_decision_section(r: Mapping[str, Any]) -> list[str]:
    rows = [[f"{n} classes", _number(us, 0), _number(r["warm_median_us"][n], 0)] for n, us in r["median_us"].items()]
    return [f"Early-exit allocation heuristic (agent.exits.allocation.plan_allocation): one decision, random "
            f"instances ({r['instances']} per row, median of {r['repeats']} each); cold: from the classes, warm: "
            f"from the previous plan after the rates moved <= 5% (edge-agent bench exit-alloc: gap to the optimum)",
            *_table(["instance", "cold us", "warm us"], rows),
            *([] if "online" not in r else [
                f"  online (agent.exits.online.OnlineAllocation.admit, per request, {r['online']['rate']:g} requests/s "
                f"in 4 classes, {r['online']['calls']} calls, {r['online']['plans']} share updates): median "
                f"{_number(r['online']['median_us'], 2)} us, mean with the updates {_number(r['online']['mean_us'], 2)} us"])]


def _generic_section(name: str, r: Mapping[str, Any]) -> list[str]:
    width = max((len(key) for key in r), default=0)
    return [f"{name}:"] + [f"  {key.ljust(width)}  {_number(value, 2)}" for key, value in r.items()]


def format_core_report(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A readable report of benchmark results: ``{section name: figures dict}``.

    Sections produced by ``bench_queue`` / ``bench_assembly`` (their ``benchmark`` field) get a
    table; any other dict of figures (e.g. the per-request overhead) is listed key by key.
    """
    blocks = []
    for name, figures in results.items():
        kind = figures.get("benchmark")
        if kind == "queue":
            blocks.append(_queue_section(figures))
        elif kind == "assembly":
            blocks.append(_assembly_section(figures))
        elif kind == "exit_decision":
            blocks.append(_exit_decision_section(figures))
        else:
            blocks.append(_generic_section(name, figures))
    return "\n\n".join("\n".join(block) for block in blocks)


def bench_decision(policy_path: str | None = None, queued: int = 16, n: int = 20_000, repeats: int = 5) -> dict:
    """One dispatch decision's time, rules against the learned policy, on the same scheduler state:
    the two demo models' lanes (deadline-aware rule, admission, the learned policy's card's lanes)
    with ``queued`` requests each and both slots free. For the learned policy also its parts: the
    one compiled call the policy makes (``agent.core.PolicyDecider``: mask, features, forward and
    masked argmax), then the same work as separate calls (the feature vector, the mask, the forward
    pass with the masked argmax). Median over ``repeats`` of ``n`` calls each, in microseconds per
    call."""
    import statistics
    import time as _time

    import numpy as np

    from agent.core import DeadlineAwareBatch, LatencyTable
    from agent.learned.card import load_policy
    from agent.scheduler.dispatcher import Scheduler
    from agent.scheduler.policies.learned import LearnedPolicy
    from agent.scheduler.policies.rules import RulePolicy
    from edge_lab.bench.contenders import DEFAULT_POLICY_PATH
    from agent.scheduler.admission import AdmissionControl

    loaded = load_policy(policy_path or DEFAULT_POLICY_PATH)
    profile = loaded.card["training"]["profile"]["batch_ms"]
    lanes = []
    for name in loaded.lanes:
        table = LatencyTable(np.array([1, 2, 4, 8], dtype=np.int64), np.array(profile[name], dtype=np.float64) / 1000)
        lanes.append(Scheduler.lane(name, DeadlineAwareBatch(table, 8), 2, 1024, min_latency_s=table.predict(1),
                                    admission=AdmissionControl(table, 8)))
    scheduler = Scheduler(lanes, max_concurrent=2, hold_fraction=0.25, lookahead=True)
    rid = 0
    for k in range(queued):
        for lane in loaded.lanes:
            rid += 1
            slo = (0.010, 0.050)[k % 2] if lane == loaded.lanes[0] else (0.030, 0.150)[k % 2]
            lane_obj = scheduler.lanes[lane]
            lane_obj.queue.push(rid, 0.5 + slo, 0.5, 0, 0.5 + slo)
            lane_obj.count_arrival(slo, 0.5)
    now = 0.5005
    rules = RulePolicy(scheduler)
    learned = LearnedPolicy(scheduler, loaded)
    features = learned.features.fill(scheduler, now)
    mask = learned.space.fill_mask(scheduler)

    def timed(call) -> float:
        samples = []
        for _ in range(repeats):
            t0 = _time.perf_counter()
            for _ in range(n):
                call()
            samples.append((_time.perf_counter() - t0) / n * 1e6)
        return statistics.median(samples)

    return {
        "rules decide (us)": timed(lambda: rules.decide(scheduler, now)),
        "learned decide (us)": timed(lambda: learned.decide(scheduler, now)),
        "  one fused call (us)": timed(lambda: learned._decider.decide(scheduler, now)),
        "  separately: features (us)": timed(lambda: learned.features.fill(scheduler, now, learned._lanes)),
        "  separately: mask (us)": timed(lambda: learned.space.fill_mask(scheduler, learned._lanes)),
        "  separately: forward + argmax (us)": timed(loaded.net.core.act_bound),
        "features": float(len(features)),
        "actions": float(len(mask)),
    }
