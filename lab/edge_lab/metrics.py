"""Benchmark metrics from per-request outcomes (``RequestRecord``), live and simulated alike.

Every figure is computed here from one list of records and the run's duration, so a policy, a
baseline and the live agent are scored by the same code. Figures come per model, per SLO class
(one model with one SLO: the unit an application sees) and overall.

Definitions (``duration_s`` is the run's length, the denominator of every rate):

- ``sent``: records; ``refused``: answered at once with a refusal code (:data:`REFUSED_CODES`:
  admission's ``rejected`` plus the malformed-request codes); ``accepted = sent - refused``.
- ``ok``: replies with outputs; ``within_slo``: ok and latency <= the request's SLO;
  ``late``: ok but over the SLO (e.g. the reply's trip back took the slack).
- ``goodput_per_s = within_slo / duration_s``; ``throughput_per_s = ok / duration_s``.
- ``slo_attainment = within_slo / sent``: refusals count as failures, so refusing is never free.
- ``deadline_miss_rate = (deadline_missed + late + unanswered) / accepted``: the share of admitted
  requests whose result did not arrive in time (DeepRT's miss rate). Late ``ok`` replies and
  requests never answered are misses too; counting only the ``deadline_missed`` code would let a
  policy that loses requests, or answers late, look better. ``internal`` and ``shutting_down`` are
  failures, not misses (``failed``).
- ``p50_ms``/``p99_ms``: latency of ok replies, numpy's linear-interpolated percentile (as the
  demo and telemetry report it); None without ok replies.
- ``mean_batch``: mean batch size over ok replies that report one, per request (the batch the
  average answered request rode in).
- ``utility``: see :func:`utility`.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from agent import errors
from agent.workload.records import RequestRecord

UNANSWERED = "unanswered"
# Codes answered at once, before any queueing: the request never entered the system.
REFUSED_CODES = frozenset({errors.REJECTED, errors.BAD_REQUEST, errors.INVALID_INPUT,
                           errors.UNKNOWN_MODEL, errors.TOO_LARGE})
FAILED_CODES = frozenset({errors.INTERNAL, errors.SHUTTING_DOWN})
KNOWN_STATUSES = frozenset({"ok", UNANSWERED, *errors.ERROR_CODES})


def class_key(model: str, slo_ms: float) -> str:
    """The key of an SLO class in :func:`summarize`'s ``classes``: ``model@SLOms``."""
    return f"{model}@{slo_ms:g}ms"


def summarize(records: Sequence[RequestRecord], duration_s: float) -> dict:
    """Figures overall, per model and per SLO class (model, slo_ms).

    Returns ``{"duration_s", "overall": {...}, "models": {model: {...}}, "classes": {key: {...}}}``;
    each ``{...}`` holds the fields of the module docstring plus ``rejected``, ``unanswered``,
    ``failed``, ``errors`` ({code: count}) and ``utility``. A class's utility is its own term of
    :func:`utility`; a model's and the overall one are the mean over their classes, so
    ``summary["overall"]["utility"] == utility(records, duration_s)``.
    """
    duration_s = _check(records, duration_s)
    by_model: dict[str, list[RequestRecord]] = {}
    by_class: dict[tuple[str, float], list[RequestRecord]] = {}
    for r in records:
        by_model.setdefault(r.model, []).append(r)
        by_class.setdefault((r.model, r.slo_ms), []).append(r)
    classes = {key: _group(group, duration_s) for key, group in sorted(by_class.items())}
    for key, figures in classes.items():
        figures.update(model=key[0], slo_ms=key[1])
        figures["utility"] = _class_utility(figures)
    models = {}
    for model, group in sorted(by_model.items()):
        figures = _group(group, duration_s)
        figures["utility"] = _mean([c["utility"] for key, c in classes.items() if key[0] == model])
        models[model] = figures
    overall = _group(records, duration_s)
    overall["utility"] = _mean([c["utility"] for c in classes.values()])
    return {"duration_s": duration_s, "overall": overall, "models": models,
            "classes": {class_key(*key): figures for key, figures in classes.items()}}


def utility(records: Sequence[RequestRecord], duration_s: float) -> float:
    """Our utility (dimensionless, in [0, 1]): how much of the offered load each SLO class got in
    time, discounted when its tail latency passes its SLO, averaged over classes.

    **Ours, not BCEdge's**: BCEdge maximises a utility that trades throughput against latency under
    SLOs, but its formula could not be read (PAPERS.md section 1). For each SLO class c (one model,
    one SLO) with offered rate ``offered_c = sent_c / duration_s``::

        U_c = (goodput_c / offered_c) x min(1, SLO_c / p99_c)         (0 if c has no ok reply)
        U   = mean over classes of U_c

    Why this shape rather than the placeholder ``sum_m thr_m / lat_m``:

    - *rewards throughput*: ``goodput_c`` counts only replies within the SLO, so a batch that raises
      throughput raises U only if its requests still arrive in time;
    - *falls as the tail passes the SLO*: the factor ``SLO_c / p99_c`` is 1 while the p99 meets the
      SLO and shrinks continuously past it, where ``thr/lat`` would reward shaving latency the
      application does not need (pushing toward batch 1) and jump discontinuously at the SLO
      under a 0-if-violated rule;
    - *scale-free*: dividing by the offered rate makes a cheap model at 1000 req/s and an expensive
      one at 10 req/s count equally, and keeps U in [0, 1] (1: every class got every request in
      time and its p99 within the SLO); ``thr/lat`` has units 1/s^2 and is dominated by the
      fastest model.

    The offered rate is fixed by the trace, so on one trace U moves only with what the policy
    does (``duration_s`` cancels; it is taken for symmetry with :func:`summarize`).
    Properties (tests/test_metrics.py): more goodput at equal latency gives a higher U; higher
    latency at equal goodput gives a lower or equal U; no reply in time gives 0.
    """
    return float(summarize(records, duration_s)["overall"]["utility"])


TABLE_COLUMNS = (
    # (header, field, format)
    ("goodput/s", "goodput_per_s", "{:.1f}"),
    ("thruput/s", "throughput_per_s", "{:.1f}"),
    ("SLO att %", "slo_attainment", "pct"),
    ("miss %", "deadline_miss_rate", "pct"),
    ("p50 ms", "p50_ms", "{:.1f}"),
    ("p99 ms", "p99_ms", "{:.1f}"),
    ("utility", "utility", "{:.3f}"),
    ("rejected", "rejected", "{:d}"),
    ("unanswered", "unanswered", "{:d}"),
)


def format_table(rows: dict[str, dict]) -> str:
    """One line per policy (name -> a :func:`summarize` result, or one of its figure dicts such as
    ``summary["overall"]``); ``-`` where a figure is undefined (no ok reply, nothing accepted)."""
    name_width = max([len("policy"), *(len(name) for name in rows)])
    widths = [max(len(header), 8) for header, _, _ in TABLE_COLUMNS]
    lines = [" ".join([f"{'policy':<{name_width}}"] + [f"{h:>{w}}" for (h, _, _), w in zip(TABLE_COLUMNS, widths)])]
    for name, row in rows.items():
        figures = row["overall"] if "overall" in row else row
        cells = []
        for (header, field, fmt), width in zip(TABLE_COLUMNS, widths):
            value = figures.get(field)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                text = "-"
            elif fmt == "pct":
                text = f"{100.0 * value:.1f}"
            else:
                text = fmt.format(value)
            cells.append(f"{text:>{width}}")
        lines.append(" ".join([f"{name:<{name_width}}"] + cells))
    return "\n".join(lines)


def _check(records: Sequence[RequestRecord], duration_s: float) -> float:
    if isinstance(duration_s, bool) or not isinstance(duration_s, (int, float, np.integer, np.floating)) \
            or not math.isfinite(duration_s) or duration_s <= 0:
        raise ValueError(f"duration_s = {duration_s!r}: expected seconds > 0")
    for r in records:
        if r.status not in KNOWN_STATUSES:
            raise ValueError(f"record {r.index}: status = {r.status!r}: expected 'ok', {UNANSWERED!r} "
                             f"or an error code ({', '.join(errors.ERROR_CODES)})")
        if r.status == "ok" and r.finish_s is None:
            raise ValueError(f"record {r.index}: status 'ok' with finish_s = None: expected the reply time")
        if r.status == UNANSWERED and r.finish_s is not None:
            raise ValueError(f"record {r.index}: status {UNANSWERED!r} with finish_s = {r.finish_s!r}: expected None")
    return float(duration_s)


def _group(records: Iterable[RequestRecord], duration_s: float) -> dict:
    records = list(records)
    sent = len(records)
    error_counts: dict[str, int] = {}
    for r in records:
        if r.status != "ok":
            error_counts[r.status] = error_counts.get(r.status, 0) + 1
    ok_records = [r for r in records if r.status == "ok"]
    ok = len(ok_records)
    within = sum(1 for r in ok_records if r.within_slo)
    late = ok - within
    refused = sum(n for code, n in error_counts.items() if code in REFUSED_CODES)
    accepted = sent - refused
    missed = error_counts.get(errors.DEADLINE_MISSED, 0)
    unanswered = error_counts.get(UNANSWERED, 0)
    latencies = np.array([r.latency_ms for r in ok_records], dtype=float)
    batches = [r.batch_size for r in ok_records if r.batch_size is not None]
    return {
        "sent": sent,
        "ok": ok,
        "within_slo": within,
        "late": late,
        "accepted": accepted,
        "refused": refused,
        "rejected": error_counts.get(errors.REJECTED, 0),
        "deadline_missed": missed,
        "unanswered": unanswered,
        "failed": sum(n for code, n in error_counts.items() if code in FAILED_CODES),
        "errors": dict(sorted(error_counts.items())),
        "goodput_per_s": within / duration_s,
        "throughput_per_s": ok / duration_s,
        "offered_per_s": sent / duration_s,
        "slo_attainment": within / sent if sent else None,
        "deadline_miss_rate": (missed + late + unanswered) / accepted if accepted else None,
        "p50_ms": float(np.percentile(latencies, 50)) if ok else None,
        "p99_ms": float(np.percentile(latencies, 99)) if ok else None,
        "mean_batch": float(np.mean(batches)) if batches else None,
    }


def _class_utility(figures: dict) -> float:
    """One class's term of :func:`utility` from its :func:`_group` figures."""
    if not figures["ok"] or not figures["within_slo"]:
        return 0.0
    tail = min(1.0, figures["slo_ms"] / figures["p99_ms"]) if figures["p99_ms"] > 0 else 1.0
    return figures["goodput_per_s"] / figures["offered_per_s"] * tail


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0
