"""Per-model counters and recent latencies: what an operator (and the demo's live table) reads.

Every reply the agent sends passes through :meth:`Telemetry.record`, so the counts add up: accepted
requests = ok + every error code raised after acceptance.
"""
from __future__ import annotations

import threading
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

    def add_model(self, model: str) -> None:
        """Count a model loaded while serving (its counters go on if it was loaded before)."""
        with self._lock:
            self.models.setdefault(model, ModelStats())

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
