"""Build a model's batching rule (``agent.core``) from its config.

The rules themselves live in the compiled core (``_core/batch_rules.pyx``, twin in
``agent/core/pure.py``); this is the one place a config section becomes a rule object.
"""
from __future__ import annotations

from agent.config import BatchingConfig
from agent.core import DeadlineAwareBatch, DynamicBatch, FixedBatch, LatencyTable


def build_rule(batching: BatchingConfig, table: LatencyTable):
    """A rule object with ``plan(queue, now) -> BatchPlan`` and ``max_batch``."""
    if batching.rule == "fixed":
        return FixedBatch(batching.size)
    if batching.rule == "dynamic":
        return DynamicBatch(batching.max_batch, batching.preferred_sizes, batching.max_queue_delay_ms / 1000.0)
    if batching.rule == "deadline_aware":
        return DeadlineAwareBatch(table, batching.max_batch, batching.max_wait_ms / 1000.0, batching.margin_ms / 1000.0)
    raise ValueError(f"unknown batching rule {batching.rule!r}")
