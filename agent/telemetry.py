"""Per-model counters and recent latencies: what an operator, the Prometheus endpoint
(:mod:`agent.ops.prometheus`), the periodic telemetry topic (:mod:`agent.ops.telemetry_publisher`)
and the demo's live table read.

Every reply the agent sends passes through :meth:`Telemetry.record`, every refusal through
:meth:`Telemetry.refused`, and every batch through :meth:`Telemetry.batch_started` (the executor
wrapper :meth:`Telemetry.counting`), so the counts add up: accepted requests = ok + every error code
raised after acceptance; refused requests = the refusals by reason.

The counters are cumulative since start, as Triton's are (a scraper takes rates): the durations are
sums over successful requests, so ``request_us / ok`` is the mean latency, the meaning of Triton's
``nv_inference_request_duration_us``. Per request the cost is one uncontended lock, a few integer
and float additions and two dict look-ups (the SLO class); per batch, one lock and one addition.
Everything derived (execution and inference counts from the batch sizes, microseconds, percentiles,
attainment, the histogram's cumulative buckets) is computed when a reader asks, not per request.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from agent.scheduler.admission import slo_class

if TYPE_CHECKING:
    from agent.runtime.executor import Executor, OnDone
    from agent.scheduler.dispatcher import Dispatch

RECENT = 4096
#: SLO classes counted per model; requests of further classes (SLOs that vary request by request)
#: are counted under :data:`OTHER_CLASS`, so a client cannot grow the agent's memory or the scrape.
MAX_SLO_CLASSES = 32
OTHER_CLASS = "other"
MAX_SLO_CACHE = 1024
#: SLOs past this (about 31 years: a request that names a vast slo_ms, as the wire allows) count in
#: its class: the class keys are integers of the SLO and could not hold an infinite one.
MAX_SLO_S = 1e9


@dataclass
class SloClassStats:
    """One SLO class of one model: how many of its requests were answered in time."""

    label: str          # the SLO of the first request seen in the class, in ms ("50", "12.5")
    met: int = 0        # ok replies (an ok reply is always within its deadline)
    missed: int = 0     # every other answer: refused at admission, expired, late, failed

    @property
    def requests(self) -> int:
        return self.met + self.missed

    @property
    def attainment(self) -> float | None:
        return self.met / self.requests if self.requests else None


@dataclass
class ModelStats:
    accepted: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)          # code -> count (refusals included)
    refusals: Counter = field(default_factory=Counter)        # code -> requests refused at arrival
    batch_sizes: Counter = field(default_factory=Counter)     # batch size -> ok requests served in one
    total_ms: deque = field(default_factory=lambda: deque(maxlen=RECENT))
    compute_ms: deque = field(default_factory=lambda: deque(maxlen=RECENT))
    # Triton's cumulative durations, summed over ok requests in ms (read in us: the properties below).
    request_ms_sum: float = 0.0   # arrival to reply
    queue_ms_sum: float = 0.0     # arrival to the batch's start
    compute_ms_sum: float = 0.0   # the batch's run on the backend, counted for each of its requests
    batches: Counter = field(default_factory=Counter)         # batch size -> batches started
    classes: dict = field(default_factory=dict)               # admission.slo_class | OTHER_CLASS -> SloClassStats
    # The class of each SLO seen, by the SLO in 10 us steps: the log2 of admission's class key is
    # computed once per SLO, not once per request (bounded: cleared past MAX_SLO_CACHE).
    by_slo: dict = field(default_factory=dict)

    @property
    def request_us(self) -> float:
        return 1000.0 * self.request_ms_sum

    @property
    def queue_us(self) -> float:
        return 1000.0 * self.queue_ms_sum

    @property
    def compute_us(self) -> float:
        return 1000.0 * self.compute_ms_sum

    @property
    def exec_count(self) -> int:
        """Batches started: Triton's execution count."""
        return sum(self.batches.values())

    @property
    def inference_count(self) -> int:
        """Requests in the batches started: Triton's inference count."""
        return sum(size * n for size, n in self.batches.items())

    def class_of(self, slo_s: float) -> SloClassStats:
        """The class of ``slo_s``, created on first sight (bounded: :data:`MAX_SLO_CLASSES`)."""
        slo_s = min(slo_s, MAX_SLO_S)
        step = round(slo_s * 1e5)
        stats = self.by_slo.get(step)
        if stats is not None:
            return stats
        key = slo_class(slo_s)
        stats = self.classes.get(key)
        if stats is None:
            if len(self.classes) >= MAX_SLO_CLASSES:
                key = OTHER_CLASS
                stats = self.classes.get(key)
            if stats is None:
                stats = self.classes[key] = SloClassStats(OTHER_CLASS if key == OTHER_CLASS else f"{1000 * slo_s:.4g}")
        if len(self.by_slo) >= MAX_SLO_CACHE:
            self.by_slo.clear()
        self.by_slo[step] = stats
        return stats

    def summary(self) -> dict:
        lat = np.fromiter(self.total_ms, dtype=float) if self.total_ms else None
        answered = self.ok + sum(self.errors.values())
        return {
            "accepted": self.accepted, "ok": self.ok, "errors": dict(self.errors),
            "refusals": dict(self.refusals),
            "slo_attainment": (self.ok / answered) if answered else None,
            "p50_ms": float(np.percentile(lat, 50)) if lat is not None else None,
            "p99_ms": float(np.percentile(lat, 99)) if lat is not None else None,
            "mean_batch": (sum(b * n for b, n in self.batch_sizes.items()) / max(1, sum(self.batch_sizes.values()))),
            "inference_count": self.inference_count, "exec_count": self.exec_count,
            "request_us": self.request_us, "queue_us": self.queue_us, "compute_us": self.compute_us,
            "batches": {str(size): n for size, n in sorted(self.batches.items())},
            "classes": {c.label: {"requests": c.requests, "met": c.met, "attainment": c.attainment}
                        for c in self.classes.values()},
        }

    def copy(self) -> "ModelStats":
        """A consistent copy for a reader (taken under the lock; the deques are left out)."""
        return ModelStats(
            accepted=self.accepted, ok=self.ok, errors=Counter(self.errors), refusals=Counter(self.refusals),
            batch_sizes=Counter(self.batch_sizes), total_ms=deque(), compute_ms=deque(),
            request_ms_sum=self.request_ms_sum, queue_ms_sum=self.queue_ms_sum, compute_ms_sum=self.compute_ms_sum,
            batches=Counter(self.batches),
            classes={key: SloClassStats(c.label, c.met, c.missed) for key, c in self.classes.items()})


class Telemetry:
    def __init__(self, models: list[str]) -> None:
        self._lock = threading.Lock()
        self.models = {name: ModelStats() for name in models}

    def add_model(self, model: str) -> None:
        """Count a model loaded while serving (its counters go on if it was loaded before)."""
        with self._lock:
            self.models.setdefault(model, ModelStats())

    def accepted(self, model: str) -> None:
        with self._lock:
            self.models[model].accepted += 1

    def refused(self, model: str | None, code: str, slo_s: float | None = None) -> None:
        """A request refused at arrival with ``code``; ``slo_s`` where it was known (admission's
        refusals), so its SLO class counts it as missed: refusing is never free."""
        with self._lock:
            stats = self.models.get(model) if model else None
            if stats is not None:
                stats.errors[code] += 1
                stats.refusals[code] += 1
                if slo_s is not None:
                    stats.class_of(slo_s).missed += 1

    def record(self, model: str, slo_s: float, total_ms: float | None, queue_ms: float | None,
               compute_ms: float | None, batch_size: int | None, error_code: str | None) -> None:
        """An accepted request's one answer: ok (with its times) or ``error_code``."""
        with self._lock:
            stats = self.models[model]
            if error_code is None:
                stats.ok += 1
                stats.total_ms.append(total_ms)
                stats.compute_ms.append(compute_ms)
                stats.batch_sizes[batch_size] += 1
                stats.request_ms_sum += total_ms
                stats.queue_ms_sum += queue_ms
                stats.compute_ms_sum += compute_ms
                (stats.by_slo.get(round(min(slo_s, MAX_SLO_S) * 1e5)) or stats.class_of(slo_s)).met += 1
            else:
                stats.errors[error_code] += 1
                stats.class_of(slo_s).missed += 1

    def batch_started(self, model: str, size: int) -> None:
        """A batch of ``size`` requests starts on the model's backend (Triton's execution)."""
        with self._lock:
            self.models[model].batches[size] += 1

    def counting(self, executor: "Executor") -> "CountingExecutor":
        """``executor``, with every batch it starts counted here (as :meth:`batch_started` does)."""
        return CountingExecutor(executor, self)

    def snapshot(self) -> dict:
        with self._lock:
            return {name: stats.summary() for name, stats in self.models.items()}

    def class_labels(self, model: str) -> dict:
        """The label (the SLO in ms) of each of the model's SLO classes, by class key."""
        with self._lock:
            return {key: stats.label for key, stats in self.models[model].classes.items()}

    def counters(self) -> dict[str, ModelStats]:
        """A consistent copy of every model's counters (no recent latencies), for a scrape."""
        with self._lock:
            return {name: stats.copy() for name, stats in self.models.items()}


class CountingExecutor:
    """An executor that tells :meth:`Telemetry.batch_started` of each batch, then starts it on the
    executor it wraps. Per batch, not per request: the one place every batch passes, whichever
    thread runs it (a worker, a blocking caller, the HTTP intake's loop on an idle board)."""

    def __init__(self, executor: "Executor", telemetry: Telemetry) -> None:
        self.executor = executor
        self._lock = telemetry._lock
        self._models = telemetry.models

    def start(self, dispatch: "Dispatch", on_done: "OnDone") -> None:
        with self._lock:    # Telemetry.batch_started, inlined: one call less per batch
            self._models[dispatch.model].batches[len(dispatch.requests)] += 1
        self.executor.start(dispatch, on_done)

    def close(self) -> None:
        self.executor.close()


class Counters:
    """Named event counts for one part of the agent (the MQTT transport, the MQTT intake), added
    to from any thread and read as one consistent snapshot (the retained status, the tests).

    Kept apart from the per-model stats: these count what happened on the wire (redeliveries,
    duplicates dropped, replies that overflowed the outgoing queue, reconnects), not answers.
    """

    def __init__(self, *names: str) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(names, 0)

    def add(self, name: str, n: int = 1) -> int:
        """Add ``n`` to ``name``; returns the new count."""
        with self._lock:
            value = self._counts[name] = self._counts.get(name, 0) + n
            return value

    def __getitem__(self, name: str) -> int:
        with self._lock:
            return self._counts.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class RateLimitedLog:
    """Log one line at most every ``interval_s`` seconds, saying how many were held back since:
    a condition that repeats per message (a full queue, a takeover loop) must not flood the log."""

    def __init__(self, logger, interval_s: float = 10.0) -> None:
        self._clock = time.monotonic
        self._log = logger
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._at: float | None = None
        self._held = 0

    def __call__(self, level: int, message: str, *args, exc_info: bool = False) -> bool:
        """Log ``message % args`` at ``level`` unless one was logged within the interval; returns
        whether it was logged. ``exc_info``: with the exception being handled."""
        now = self._clock()
        with self._lock:
            if self._at is not None and now - self._at < self.interval_s:
                self._held += 1
                return False
            self._at, held, self._held = now, self._held, 0
        self._log.log(level, message + (" (%d more not logged since the last)" % held if held else ""), *args,
                      exc_info=exc_info)
        return True
