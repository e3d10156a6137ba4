"""What happened to each request of a replayed or simulated trace: the one record type every
metric (goodput, SLO attainment, percentiles, utility) is computed from, live or simulated alike."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class RequestRecord:
    index: int                  # row of the trace
    app: str
    model: str
    arrival_s: float            # seconds from the start of the run (sent time, for a live replay)
    slo_ms: float
    priority: int
    status: str                 # "ok" or an error code (agent.errors), or "unanswered"
    finish_s: float | None = None     # reply time, seconds from the start; None if unanswered
    batch_size: int | None = None
    queue_ms: float | None = None
    compute_ms: float | None = None
    exit: str | None = None           # a multi-exit model's exit that answered (served_by's "exit")

    @property
    def latency_ms(self) -> float | None:
        return None if self.finish_s is None else 1000.0 * (self.finish_s - self.arrival_s)

    @property
    def within_slo(self) -> bool:
        latency = self.latency_ms
        return self.status == "ok" and latency is not None and latency <= self.slo_ms
