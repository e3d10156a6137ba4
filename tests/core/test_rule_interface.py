"""One rule interface: every batching rule, compiled, pure or baseline, is an
``agent.core.types.BatchRule`` and has its members: ``plan(queue, now) -> BatchPlan``,
``max_batch``, ``describe() -> dict`` and the hooks ``dispatched(n, now)`` and
``observe(batch_size, duration_s, met)`` that the default policy calls on every rule.

The compiled rules are cdef classes registered as virtual subclasses of the abstract base (they
cannot inherit from it), so ``isinstance`` alone would not prove they have the members: each
member is checked on every class.
"""
from __future__ import annotations

import importlib
import inspect
import json
import math

import pytest

import agent.core
from agent.core.types import BatchPlan, BatchRule
from agent.scheduler.baselines import AimdBatch, DisBatch

CORE_RULES = ("FixedBatch", "DynamicBatch", "DeadlineAwareBatch")


def core_rules(core) -> list:
    """One instance of each core rule class, with max_batch 4."""
    table = core.LatencyTable([1, 4], [0.01, 0.02])
    return [
        core.FixedBatch(4),
        core.DynamicBatch(4, (2, 4), 0.001),
        core.DeadlineAwareBatch(table, 4, 0.001, 0.0),
    ]


def baseline_rules() -> list:
    return [AimdBatch(4), DisBatch(0.1, 4)]


def filled_queue(queue_class):
    queue = queue_class(16)
    for rid in range(3):
        queue.push(rid, 1.0 + rid, 0.0)
    return queue


def check_rule(rule, queue) -> None:
    cls = type(rule)
    assert isinstance(rule, BatchRule), f"{cls.__module__}.{cls.__name__} is not a BatchRule"
    for member in ("plan", "max_batch", "describe", "dispatched", "observe"):
        assert hasattr(cls, member), f"{cls.__name__} has no {member}"
    assert list(inspect.signature(cls.plan).parameters) == ["self", "queue", "now"]
    assert list(inspect.signature(cls.describe).parameters) == ["self"]
    assert list(inspect.signature(cls.dispatched).parameters) == ["self", "n", "now"]
    assert list(inspect.signature(cls.observe).parameters) == ["self", "batch_size", "duration_s", "met"]
    assert type(rule.max_batch) is int and rule.max_batch == 4
    for now in (0.0, 0.05, 0.5):
        plan = rule.plan(queue, now)
        assert type(plan) is BatchPlan
        assert 0 <= plan.take <= min(len(queue), rule.max_batch)
        assert plan.take == 0 or plan.wake_at == math.inf
    description = rule.describe()
    assert type(description) is dict
    assert description["name"] == cls.__name__ and description["max_batch"] == 4
    json.dumps(description)


def test_core_rules_satisfy_the_interface(core):
    rules = core_rules(core)
    assert sorted(type(rule).__name__ for rule in rules) == sorted(CORE_RULES)
    for rule in rules:
        check_rule(rule, filled_queue(core.DeadlineQueue))


def test_baselines_satisfy_the_interface():
    for rule in baseline_rules():
        check_rule(rule, filled_queue(agent.core.DeadlineQueue))


def test_agent_core_exports_the_shared_interface():
    assert agent.core.BatchRule is BatchRule
    assert agent.core.BatchPlan is BatchPlan
    assert all(isinstance(rule, agent.core.BatchRule) for rule in core_rules(agent.core))


@pytest.mark.parametrize("module_name", [
    "agent.core.pure.batch_rules", "agent.core._batch_rules", "agent.scheduler.baselines",
])
def test_every_rule_class_is_checked_here(module_name):
    """A rule class added to one of these modules must be added to the tests above too."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        pytest.skip(f"compiled core not built ({exc})")
    found = {
        name for name, obj in vars(module).items()
        if isinstance(obj, type) and issubclass(obj, BatchRule) and obj.__module__ == module_name
        and name != "BatchRule"  # the compiled cdef base: plan_c's default, not a rule
    }
    checked = {type(rule).__name__ for rule in core_rules(agent.core) + baseline_rules()}
    assert found and found <= checked, f"rules in {module_name} not checked: {found - checked}"


def test_a_python_rule_must_define_plan_and_describe():
    class PlanOnly(BatchRule):
        __slots__ = ()

        def plan(self, queue, now):
            return BatchPlan(0, math.inf)

    with pytest.raises(TypeError, match="describe"):
        PlanOnly()
