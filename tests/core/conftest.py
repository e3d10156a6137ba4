"""Run every core test against both implementations: the compiled modules and the pure twin.

The ``core`` fixture is a namespace with the public names (DeadlineQueue, PushResult,
LatencyTable, FixedBatch, DynamicBatch, DeadlineAwareBatch, BatchPlan, gather_into,
scatter_rows). The compiled modules are imported by name here, on purpose: the tests must
exercise both, whatever ``EDGE_AGENT_CORE`` selects for the package. ``PushResult`` and
``BatchPlan`` are the shared ones (``agent.core.types``) in both. If the extensions were not
built the compiled half is skipped with the reason (``-ra`` shows it).
"""
from __future__ import annotations

import importlib
import types

import pytest
from hypothesis import HealthCheck, settings

import agent.core.pure as pure
import agent.core.types as core_types

settings.register_profile(
    "core",
    deadline=None,  # timing varies on a shared 2-core box; correctness is what is checked
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("core")

_PUBLIC = (
    "DeadlineQueue",
    "PushResult",
    "LatencyTable",
    "FixedBatch",
    "DynamicBatch",
    "DeadlineAwareBatch",
    "BatchPlan",
    "gather_into",
    "scatter_rows",
)


def _compiled_namespace() -> types.SimpleNamespace:
    queue = importlib.import_module("agent.core._deadline_queue")
    table = importlib.import_module("agent.core._latency_table")
    rules = importlib.import_module("agent.core._batch_rules")
    assembly = importlib.import_module("agent.core._batch_assembly")
    return types.SimpleNamespace(
        name="compiled",
        DeadlineQueue=queue.DeadlineQueue,
        PushResult=core_types.PushResult,
        LatencyTable=table.LatencyTable,
        FixedBatch=rules.FixedBatch,
        DynamicBatch=rules.DynamicBatch,
        DeadlineAwareBatch=rules.DeadlineAwareBatch,
        BatchPlan=core_types.BatchPlan,
        gather_into=assembly.gather_into,
        scatter_rows=assembly.scatter_rows,
    )


def _pure_namespace() -> types.SimpleNamespace:
    return types.SimpleNamespace(name="python", **{name: getattr(pure, name) for name in _PUBLIC})


@pytest.fixture(scope="session", params=["compiled", "python"])
def core(request) -> types.SimpleNamespace:
    if request.param == "python":
        return _pure_namespace()
    try:
        return _compiled_namespace()
    except ImportError as exc:
        pytest.skip(f"compiled core not built ({exc}); run `python setup.py build_ext --inplace`")
