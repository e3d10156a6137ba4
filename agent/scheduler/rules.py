"""Build a model's batching rule (``agent.core``) and scheduler lane from its config.

The rules themselves live in the compiled core (``_core/agent/core/_batch_rules.pyx``, twin in
``agent/core/pure/batch_rules.py``), the paper baselines in ``agent/scheduler/baselines.py``, all
behind one interface (``agent.core.BatchRule``); this is the one place a config section becomes a
rule object and a lane, for the live agent and the simulator alike.
"""
from __future__ import annotations

from agent.config import BatchingConfig, ModelConfig
from agent.core import DeadlineAwareBatch, DynamicBatch, FixedBatch, LatencyTable
from agent.scheduler.admission import AdmissionControl
from agent.scheduler.baselines import AimdBatch, DisBatch
from agent.scheduler.dispatcher import ModelLane, Scheduler


def build_rule(batching: BatchingConfig, table: LatencyTable):
    """A rule object with ``plan(queue, now) -> BatchPlan`` and ``max_batch``."""
    if batching.rule == "fixed":
        return FixedBatch(batching.size)
    if batching.rule == "dynamic":
        return DynamicBatch(batching.max_batch, batching.preferred_sizes, batching.max_queue_delay_ms / 1000.0)
    if batching.rule == "deadline_aware":
        return DeadlineAwareBatch(table, batching.max_batch, batching.max_wait_ms / 1000.0, batching.margin_ms / 1000.0)
    if batching.rule == "fifo":
        return FixedBatch(1)       # one at a time; the lane keys its queue by arrival (build_lane)
    if batching.rule == "aimd":
        return AimdBatch(batching.max_batch)
    if batching.rule == "disbatcher":
        return DisBatch(batching.window_ms / 1000.0, batching.max_batch)
    raise ValueError(f"unknown batching rule {batching.rule!r}")


def build_lane(name: str, rule, config: ModelConfig, table: LatencyTable) -> ModelLane:
    """The model's scheduler lane: queue, rule, instances, shedding and admission per its config."""
    batching = config.batching
    return Scheduler.lane(
        name, rule, config.instances, config.queue_capacity,
        min_latency_s=table.predict(1) if batching.shed_hopeless else 0.0,
        admission=AdmissionControl(table, rule.max_batch, batching.margin_ms / 1000.0) if batching.admission else None,
        fifo=batching.rule == "fifo",
        starts_alone=(batching.rule == "fifo" or (batching.rule == "deadline_aware" and batching.max_wait_ms == 0)
                      or (batching.rule == "dynamic" and batching.max_queue_delay_ms == 0)),
    )
