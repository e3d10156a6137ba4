"""Batching rules: scenarios from Triton's and DeepRT's behaviour, plus oracles over random queues."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

import agent.core.pure as pure
import agent.core.types as core_types

INF = math.inf


# ---- oracles: the documented rules restated over a plain list of entries -----------------


def key_sorted(entries):
    """entries: list of (deadline, arrival, priority) in push order -> key order."""
    return sorted(enumerate(entries), key=lambda item: (-item[1][2], item[1][0], item[0]))


def oracle_fixed(entries, size):
    if not entries:
        return (0, INF)
    if len(entries) >= size:
        return (size, INF)
    return (0, min(e[0] for e in entries))


def oracle_dynamic(entries, now, max_batch, preferred, delay):
    if not entries:
        return (0, INF)
    preferred = sorted(set(preferred)) or [max_batch]
    limit = min(len(entries), max_batch)
    formed = [p for p in preferred if p <= limit]
    best = formed[-1] if formed else 0
    oldest = min(e[1] for e in entries)
    exceeded = delay > 0 and oldest + delay <= now
    if best and not exceeded:
        return (best, INF)
    if limit >= preferred[-1] or exceeded or delay == 0:
        return (limit, INF)
    return (0, min(oldest + delay, min(e[0] for e in entries)))


def oracle_deadline_aware(entries, now, table, max_batch, max_wait, margin):
    if not entries:
        return (0, INF)
    n = min(len(entries), max_batch)
    head = key_sorted(entries)[0][1][0]
    if max_wait > 0 and n < max_batch:
        oldest = min(e[1] for e in entries)
        cost = table.predict(n + 1)
        if now < oldest + max_wait and now + cost + margin < head:
            return (0, min(oldest + max_wait, head - margin - cost))
    fits = [b for b in range(1, n + 1) if table.predict(b) <= head - now - margin]
    return (max(fits) if fits else 1, INF)


def make_queue(core, entries, capacity=64):
    queue = core.DeadlineQueue(capacity)
    for rid, (deadline, arrival, priority) in enumerate(entries):
        assert queue.push(rid, deadline, arrival, priority) is core.PushResult.OK
    return queue


ENTRIES = st.lists(
    st.tuples(
        st.sampled_from([0.5, 1.0, 2.0, 3.0, 10.0, INF]) | st.floats(0, 5),
        st.floats(-1, 2),
        st.integers(0, 2),
    ),
    max_size=14,
)
NOW = st.floats(-1, 6)


# ---- shared behaviour -----------------------------------------------------------------------


def all_rules(core):
    table = core.LatencyTable([1, 4, 8], [0.01, 0.02, 0.04])
    return [
        core.FixedBatch(4),
        core.DynamicBatch(8),
        core.DynamicBatch(8, preferred_sizes=[2, 4], max_queue_delay_s=0.01),
        core.DeadlineAwareBatch(table, 8),
        core.DeadlineAwareBatch(table, 8, max_wait_s=0.01, margin_s=0.001),
    ]


def test_empty_queue_plans_nothing(core):
    queue = core.DeadlineQueue(4)
    for rule in all_rules(core):
        plan = rule.plan(queue, 0.0)
        assert plan == (0, INF) and plan.take == 0 and plan.wake_at == INF


def test_plans_are_the_shared_namedtuple(core):
    queue = make_queue(core, [(1.0, 0.0, 0)] * 5)
    for rule in all_rules(core):
        plan = rule.plan(queue, 0.0)
        assert type(plan) is core_types.BatchPlan
        assert 0 <= plan.take <= min(len(queue), rule.max_batch)
        assert len(queue) == 5  # rules never pop


def test_describe_is_json_ready_and_names_the_rule(core):
    names = [rule.describe()["name"] for rule in all_rules(core)]
    assert names == ["FixedBatch", "DynamicBatch", "DynamicBatch", "DeadlineAwareBatch", "DeadlineAwareBatch"]
    for rule in all_rules(core):
        described = rule.describe()
        assert described["max_batch"] == rule.max_batch
        json.dumps(described)
    dynamic = core.DynamicBatch(8, preferred_sizes=[4, 2, 4], max_queue_delay_s=0.005).describe()
    assert dynamic == {"name": "DynamicBatch", "max_batch": 8, "preferred_sizes": [2, 4], "max_queue_delay_s": 0.005}
    aware = all_rules(core)[4].describe()
    assert aware["latency_table"] == {"batch_sizes": [1, 4, 8], "latencies_s": [0.01, 0.02, 0.04]}
    assert (aware["max_wait_s"], aware["margin_s"]) == (0.01, 0.001)


def test_parameters_are_read_only(core):
    for rule in all_rules(core):
        with pytest.raises(AttributeError):
            rule.max_batch = 3
        assert rule.max_batch in (4, 8)


# ---- FixedBatch -----------------------------------------------------------------------------


def test_fixed_batch_waits_for_size_until_earliest_deadline(core):
    rule = core.FixedBatch(3)
    assert rule.size == 3 and rule.max_batch == 3
    queue = make_queue(core, [(5.0, 0.0, 1), (2.0, 0.0, 0)])
    assert rule.plan(queue, 0.0) == (0, 2.0)  # min deadline, not the head's 5.0
    queue.push(9, 7.0, 0.0)
    queue.push(10, 8.0, 0.0)
    assert rule.plan(queue, 0.0) == (3, INF)


@given(entries=ENTRIES, now=NOW, size=st.integers(1, 6))
def test_fixed_batch_matches_oracle(core, entries, now, size):
    assert core.FixedBatch(size).plan(make_queue(core, entries), now) == oracle_fixed(entries, size)


# ---- DynamicBatch (Triton) ------------------------------------------------------------------


def test_dynamic_without_delay_takes_largest_available(core):
    rule = core.DynamicBatch(8)
    assert rule.preferred_sizes == (8,)
    assert rule.plan(make_queue(core, [(9.0, 0.0, 0)] * 3), 0.0) == (3, INF)
    assert rule.plan(make_queue(core, [(9.0, 0.0, 0)] * 11), 0.0) == (8, INF)


def test_dynamic_dispatches_a_formed_preferred_size_at_once(core):
    rule = core.DynamicBatch(16, preferred_sizes=[4, 8], max_queue_delay_s=1.0)
    # 6 queued, delay not exceeded: Triton sends the preferred 4 now, not 6 later.
    assert rule.plan(make_queue(core, [(9.0, 0.0, 0)] * 6), 0.1) == (4, INF)
    # 20 queued: the largest preferred size that is formed, 8, not max_batch.
    assert rule.plan(make_queue(core, [(9.0, 0.0, 0)] * 20), 0.1) == (8, INF)


def test_dynamic_waits_for_a_preferred_size_then_sends_what_is_pending(core):
    rule = core.DynamicBatch(16, preferred_sizes=[4, 8], max_queue_delay_s=0.5)
    queue = make_queue(core, [(9.0, 1.0, 0), (3.0, 1.2, 0), (9.0, 1.3, 0)])
    assert rule.plan(queue, 1.25) == (0, 1.5)  # oldest arrival 1.0 + delay 0.5
    assert rule.plan(queue, 1.5) == (3, INF)  # at exactly wake_at: dispatch, no second wait
    urgent = make_queue(core, [(1.2, 1.0, 0), (9.0, 1.1, 0)])
    assert rule.plan(urgent, 1.1) == (0, 1.2)  # an earlier deadline cuts the wait short


def test_dynamic_delay_exceeded_beats_preferred_size(core):
    rule = core.DynamicBatch(16, preferred_sizes=[4, 8], max_queue_delay_s=0.5)
    assert rule.plan(make_queue(core, [(9.0, 0.0, 0)] * 6), 0.6) == (6, INF)


@given(
    entries=ENTRIES,
    now=NOW,
    max_batch=st.integers(1, 10),
    preferred=st.lists(st.integers(1, 10), max_size=4),
    delay=st.sampled_from([0.0, 0.5, 2.0]),
)
def test_dynamic_matches_oracle(core, entries, now, max_batch, preferred, delay):
    preferred = [p for p in preferred if p <= max_batch]
    rule = core.DynamicBatch(max_batch, preferred_sizes=preferred, max_queue_delay_s=delay)
    want = oracle_dynamic(entries, now, max_batch, preferred, delay)
    assert rule.plan(make_queue(core, entries), now) == want


# ---- DeadlineAwareBatch (DeepRT-inspired) ----------------------------------------------------


def test_deadline_aware_takes_largest_batch_that_meets_head_deadline(core):
    table = core.LatencyTable([1, 4, 8], [0.010, 0.020, 0.040])
    rule = core.DeadlineAwareBatch(table, 8)
    queue = make_queue(core, [(1.0275, 0.0, 0)] + [(5.0, 0.0, 0)] * 9)
    assert rule.plan(queue, 1.0) == (5, INF)  # slack 0.0275: predict(5) = 0.025, predict(6) = 0.030
    assert rule.plan(queue, 0.0) == (8, INF)  # plenty of slack: max_batch


def test_deadline_aware_runs_one_even_when_it_cannot_make_it(core):
    table = core.LatencyTable([1, 8], [0.010, 0.040])
    rule = core.DeadlineAwareBatch(table, 8)
    assert rule.plan(make_queue(core, [(1.001, 0.0, 0)] * 3), 1.0) == (1, INF)
    assert rule.plan(make_queue(core, [(0.5, 0.0, 0)] * 3), 1.0) == (1, INF)  # already late


def test_deadline_aware_margin_shrinks_the_budget(core):
    table = core.LatencyTable([1, 8], [0.010, 0.080])
    queue = make_queue(core, [(1.05, 0.0, 0)] * 8)
    assert core.DeadlineAwareBatch(table, 8).plan(queue, 1.0) == (5, INF)
    assert core.DeadlineAwareBatch(table, 8, margin_s=0.02).plan(queue, 1.0) == (3, INF)


def test_deadline_aware_waits_only_while_safe(core):
    table = core.LatencyTable([1, 8], [0.010, 0.080])
    rule = core.DeadlineAwareBatch(table, 8, max_wait_s=0.005)
    queue = make_queue(core, [(2.0, 1.0, 0), (2.0, 1.001, 0)])
    assert rule.plan(queue, 1.002) == (0, 1.005)  # wait for more, up to oldest + max_wait
    assert rule.plan(queue, 1.005) == (2, INF)  # waited long enough
    tight = make_queue(core, [(1.0335, 1.0, 0), (2.0, 1.0, 0)])
    # predict(3) = 0.03: waiting is safe until 1.0335 - 0.03 = 1.0035, before oldest + max_wait.
    plan = rule.plan(tight, 1.001)
    assert plan.take == 0 and plan.wake_at == pytest.approx(1.0035)
    assert rule.plan(tight, 1.004) == (2, INF)  # a bigger batch would now miss: go
    full = make_queue(core, [(2.0, 1.0, 0)] * 8)
    assert rule.plan(full, 1.0) == (8, INF)  # max_batch reached: never waits


def test_deadline_aware_uses_the_head_deadline(core):
    """With priorities the head (highest priority) sets the budget, not the earliest deadline."""
    table = core.LatencyTable([1, 8], [0.010, 0.080])
    queue = make_queue(core, [(1.0, 0.0, 0), (5.0, 0.0, 2), (5.0, 0.0, 2)])
    assert queue.head_deadline() == 5.0 and queue.earliest_deadline() == 1.0
    assert core.DeadlineAwareBatch(table, 8).plan(queue, 0.99) == (3, INF)


@given(
    entries=ENTRIES,
    now=NOW,
    max_batch=st.integers(1, 10),
    max_wait=st.sampled_from([0.0, 0.01, 1.0]),
    margin=st.sampled_from([0.0, 0.005]),
    lats=st.tuples(st.floats(0.001, 0.5), st.floats(0.001, 0.5)),
)
def test_deadline_aware_matches_oracle(core, entries, now, max_batch, max_wait, margin, lats):
    table = core.LatencyTable([1, 6], list(lats))
    rule = core.DeadlineAwareBatch(table, max_batch, max_wait_s=max_wait, margin_s=margin)
    want = oracle_deadline_aware(entries, now, table, max_batch, max_wait, margin)
    assert rule.plan(make_queue(core, entries), now) == want


# ---- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda c, t: c.FixedBatch(0), ValueError, r"size must be an integer in 1\.\.\d+, got 0"),
        (lambda c, t: c.FixedBatch(2.0), TypeError, r"size must be an integer, got 2\.0"),
        (lambda c, t: c.DynamicBatch(-1), ValueError, r"max_batch must be an integer in 1\.\.\d+, got -1"),
        (lambda c, t: c.DynamicBatch(8, preferred_sizes=[4, 16]), ValueError,
         r"preferred_sizes\[1\] must be in 1\.\.max_batch \(8\), got 16"),
        (lambda c, t: c.DynamicBatch(8, preferred_sizes=[0]), ValueError, r"preferred_sizes\[0\]"),
        (lambda c, t: c.DynamicBatch(8, max_queue_delay_s=-0.1), ValueError,
         r"max_queue_delay_s must be a finite number of seconds >= 0, got -0\.1"),
        (lambda c, t: c.DynamicBatch(8, max_queue_delay_s=math.inf), ValueError, r"max_queue_delay_s"),
        (lambda c, t: c.DeadlineAwareBatch("fast", 8), TypeError, r"table must be a LatencyTable"),
        (lambda c, t: c.DeadlineAwareBatch(t, 0), ValueError, r"max_batch must be an integer in 1\.\."),
        (lambda c, t: c.DeadlineAwareBatch(t, 8, max_wait_s=math.nan), ValueError, r"max_wait_s .* got nan"),
        (lambda c, t: c.DeadlineAwareBatch(t, 8, margin_s=-1), ValueError, r"margin_s .* got -1"),
    ],
)
def test_invalid_parameters_name_field_and_value(core, build, error, message):
    table = core.LatencyTable([1], [0.01])
    with pytest.raises(error, match=message):
        build(core, table)


def test_compiled_rules_require_the_compiled_queue():
    """They read the queue's C struct; a pure queue is refused, not misread."""
    rules = pytest.importorskip("agent.core._batch_rules")
    with pytest.raises(TypeError):
        rules.FixedBatch(2).plan(pure.DeadlineQueue(4), 0.0)
    with pytest.raises(TypeError):
        rules.DeadlineAwareBatch(pure.LatencyTable([1], [0.01]), 4)
