"""Replay a workload trace through the live agent, open loop, and record what happened to each row.

Open loop: every send time is fixed by the trace in advance; a slow agent never delays a send (the
sender only sleeps until the next row's time), and how late each send actually went out (send lag)
is reported, so a run whose load generator fell behind is visible rather than silently lighter.
Requests go through the in-process front door (``Agent.submit``), the same path every intake uses.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from agent.api import Agent
from agent.errors import InferenceError
from agent.models.card import ModelCard
from agent.workload.records import RequestRecord
from agent.workload.trace import TraceRow


@dataclass
class LiveRun:
    records: list[RequestRecord]
    duration_s: float
    send_lag_ms_p50: float
    send_lag_ms_p99: float


def inputs_for(card: ModelCard, count: int = 64) -> list[dict[str, np.ndarray]]:
    """Request inputs for a model: real digit frames for the demo models' ``frames`` input, else
    zeros of the card's item shape (a latency benchmark needs the right shape, not the content)."""
    specs = card.inputs
    if len(specs) == 1 and specs[0].dtype == np.uint8 and specs[0].item_shape() == (64, 64, 3):
        from agent.models.digits import frames_from_digits, load_test_set
        frames = frames_from_digits(load_test_set()[0][:count])
        return [{specs[0].name: frame} for frame in frames]
    return [{spec.name: np.zeros(spec.item_shape(), dtype=spec.dtype) for spec in specs}]


def replay_live(agent: Agent, trace: Sequence[TraceRow], *, drain_s: float = 5.0,
                inputs: Mapping[str, list[dict[str, np.ndarray]]] | None = None) -> LiveRun:
    """Send every row at its time, wait for every reply (at most ``drain_s`` after the last
    deadline), and return one record per row (``unanswered`` if none came)."""
    inputs = dict(inputs or {})
    for name, loaded in agent.models.items():
        inputs.setdefault(name, inputs_for(loaded.card))
    records = [RequestRecord(i, row.app, row.model, row.t_s, row.slo_ms, row.priority, "unanswered")
               for i, row in enumerate(trace)]
    pending = threading.Semaphore(0)
    accepted = 0
    lags = []
    start = time.perf_counter()

    def on_done(future, record: RequestRecord) -> None:
        record.finish_s = time.perf_counter() - start
        error = future.exception()
        if error is None:
            result = future.result()
            record.status = "ok"
            record.batch_size, record.queue_ms, record.compute_ms = result.batch_size, result.queue_ms, result.compute_ms
        else:
            record.status = error.code if isinstance(error, InferenceError) else "internal"
        pending.release()

    for i, row in enumerate(trace):
        delay = start + row.t_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sent = time.perf_counter() - start
        lags.append(sent - row.t_s)
        record = records[i]
        record.arrival_s = sent
        model_inputs = inputs.get(row.model) or [{}]
        try:
            future = agent.submit(row.model, model_inputs[i % len(model_inputs)], slo_ms=row.slo_ms,
                                  priority=row.priority, client_id=row.app)
        except InferenceError as exc:
            record.status, record.finish_s = exc.code, time.perf_counter() - start
            continue
        accepted += 1
        future.add_done_callback(lambda f, r=record: on_done(f, r))
    last_deadline = max((r.arrival_s + r.slo_ms / 1000 for r in records), default=0.0)
    give_up = start + last_deadline + drain_s
    for _ in range(accepted):
        if not pending.acquire(timeout=max(0.0, give_up - time.perf_counter())):
            break
    finished = [r.finish_s for r in records if r.finish_s is not None]
    duration = max([trace[-1].t_s if trace else 0.0, *finished]) if records else 0.0
    lag_ms = 1000 * np.array(lags or [0.0])
    return LiveRun(records, duration, float(np.percentile(lag_ms, 50)), float(np.percentile(lag_ms, 99)))
