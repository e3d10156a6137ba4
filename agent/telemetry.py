"""Per-model counters and recent latencies: what an operator (and the demo's live table) reads.

Every reply the agent sends passes through :meth:`Telemetry.record`, so the counts add up: accepted
requests = ok + every error code raised after acceptance.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

RECENT = 4096


@dataclass
class ModelStats:
    accepted: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)          # code -> count (refusals included)
    batch_sizes: Counter = field(default_factory=Counter)     # batch size -> requests served in one
    total_ms: deque = field(default_factory=lambda: deque(maxlen=RECENT))
    compute_ms: deque = field(default_factory=lambda: deque(maxlen=RECENT))

    def summary(self) -> dict:
        lat = np.fromiter(self.total_ms, dtype=float) if self.total_ms else None
        answered = self.ok + sum(self.errors.values())
        return {
            "accepted": self.accepted, "ok": self.ok, "errors": dict(self.errors),
            "slo_attainment": (self.ok / answered) if answered else None,
            "p50_ms": float(np.percentile(lat, 50)) if lat is not None else None,
            "p99_ms": float(np.percentile(lat, 99)) if lat is not None else None,
            "mean_batch": (sum(b * n for b, n in self.batch_sizes.items()) / max(1, sum(self.batch_sizes.values()))),
        }


class Telemetry:
    def __init__(self, models: list[str]) -> None:
        self._lock = threading.Lock()
        self.models = {name: ModelStats() for name in models}

    def accepted(self, model: str) -> None:
        with self._lock:
            self.models[model].accepted += 1

    def refused(self, model: str | None, code: str) -> None:
        with self._lock:
            stats = self.models.get(model) if model else None
            if stats is not None:
                stats.errors[code] += 1

    def record(self, model: str, total_ms: float | None, compute_ms: float | None, batch_size: int | None,
               error_code: str | None) -> None:
        with self._lock:
            stats = self.models[model]
            if error_code is None:
                stats.ok += 1
                stats.total_ms.append(total_ms)
                stats.compute_ms.append(compute_ms)
                stats.batch_sizes[batch_size] += 1
            else:
                stats.errors[error_code] += 1

    def snapshot(self) -> dict:
        with self._lock:
            return {name: stats.summary() for name, stats in self.models.items()}


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

    def __call__(self, level: int, message: str, *args) -> bool:
        """Log ``message % args`` at ``level`` unless one was logged within the interval; returns
        whether it was logged."""
        now = self._clock()
        with self._lock:
            if self._at is not None and now - self._at < self.interval_s:
                self._held += 1
                return False
            self._at, held, self._held = now, self._held, 0
        self._log.log(level, message + (" (%d more not logged since the last)" % held if held else ""), *args)
        return True
