"""DeadlineQueue: both implementations against a sorted-list oracle, plus the promises one by one."""
from __future__ import annotations

import bisect
import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

INF = math.inf
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class OracleQueue:
    """The specification in its plainest form: a list kept sorted by the pop order; the key
    orders, the deadline expires."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: list[tuple] = []  # (-priority, key, seq, rid, arrival, deadline), sorted
        self.seq = 0

    def push(self, rid, deadline, arrival, priority=0, key=None) -> int:
        if any(e[3] == rid for e in self.entries):
            return 2
        if len(self.entries) >= self.capacity:
            return 1
        bisect.insort(self.entries, (-priority, deadline if key is None else key, self.seq, rid, arrival, deadline))
        self.seq += 1
        return 0

    def pop_batch(self, max_n, now, ready_len, expired_len):
        ready, expired = [], []
        while len(ready) < min(max_n, ready_len) and self.entries:
            head = self.entries[0]
            if head[5] < now:
                if len(expired) >= expired_len:
                    break
                expired.append(head[3])
            else:
                ready.append(head[3])
            self.entries.pop(0)
        return ready, expired

    def drop_expired(self, now, room):
        dropped = [e for e in self.entries if e[5] < now][:room]
        for e in dropped:
            self.entries.remove(e)
        return [e[3] for e in dropped]

    def cancel(self, rid) -> bool:
        for e in self.entries:
            if e[3] == rid:
                self.entries.remove(e)
                return True
        return False

    def ids(self):
        return [e[3] for e in self.entries]

    def earliest_deadline(self):
        return min((e[5] for e in self.entries), default=INF)

    def oldest_arrival(self):
        return min((e[4] for e in self.entries), default=INF)

    def head_deadline(self):
        return self.entries[0][5] if self.entries else INF

    def head_key(self):
        return self.entries[0][1] if self.entries else INF

    def head_priority(self):
        return -self.entries[0][0] if self.entries else 0


def assert_same_state(queue, oracle, rid_universe=()):
    queue._check_invariants()  # internal structures first: a corrupt index can look right for a while
    assert len(queue) == len(oracle.entries)
    assert queue.ids() == oracle.ids()
    assert queue.earliest_deadline() == oracle.earliest_deadline()
    assert queue.oldest_arrival() == oracle.oldest_arrival()
    assert queue.head_deadline() == oracle.head_deadline()
    assert queue.head_key() == oracle.head_key()
    assert queue.head_priority() == oracle.head_priority()
    queued = set(oracle.ids())
    for rid in rid_universe:
        assert (rid in queue) == (rid in queued)


def apply(queue, oracle, op):
    """Apply one operation to both; assert the results agree."""
    kind = op[0]
    if kind == "push":
        _, rid, deadline, arrival, priority, key = op
        assert int(queue.push(rid, deadline, arrival, priority, key)) == oracle.push(rid, deadline, arrival, priority, key)
    elif kind == "pop":
        _, max_n, now, ready_len, expired_len = op
        ready = np.full(ready_len, -7, dtype=np.int64)
        expired = np.full(expired_len, -7, dtype=np.int64)
        n_ready, n_expired = queue.pop_batch(max_n, now, ready, expired)
        want_ready, want_expired = oracle.pop_batch(max_n, now, ready_len, expired_len)
        assert ready[:n_ready].tolist() == want_ready
        assert expired[:n_expired].tolist() == want_expired
        assert (ready[n_ready:] == -7).all() and (expired[n_expired:] == -7).all()
    elif kind == "drop":
        _, now, room = op
        out = np.full(room, -7, dtype=np.int64)
        count = queue.drop_expired(now, out)
        assert out[:count].tolist() == oracle.drop_expired(now, room)
        assert (out[count:] == -7).all()
    elif kind == "cancel":
        assert queue.cancel(op[1]) == oracle.cancel(op[1])
    else:  # pragma: no cover
        raise AssertionError(op)


RIDS = st.integers(0, 12) | st.sampled_from([INT64_MIN, INT64_MAX, -1, 1 << 40])
DEADLINES = st.sampled_from([-1.0, 0.0, 1.0, 2.0, 2.0, 3.0, 5.0, INF]) | st.floats(-5, 10, allow_nan=False)
NOWS = st.sampled_from([-INF, 0.0, 1.0, 2.0, 2.5, 4.0, 10.0, INF])
OPS = st.one_of(
    st.tuples(st.just("push"), RIDS, DEADLINES, st.floats(-5, 5, allow_nan=False), st.integers(-2, 2), st.none()),
    st.tuples(st.just("push"), RIDS, DEADLINES, st.floats(-5, 5, allow_nan=False), st.integers(-2, 2),
              st.none() | DEADLINES),
    st.tuples(st.just("pop"), st.integers(0, 6), NOWS, st.integers(0, 6), st.integers(0, 4)),
    st.tuples(st.just("drop"), NOWS, st.integers(0, 5)),
    st.tuples(st.just("cancel"), RIDS),
)


@settings(max_examples=300)
@given(capacity=st.integers(1, 10), ops=st.lists(OPS, max_size=60))
def test_any_operation_sequence_agrees_with_oracle(core, capacity, ops):
    queue, oracle = core.DeadlineQueue(capacity), OracleQueue(capacity)
    universe = list(range(13)) + [INT64_MIN, INT64_MAX, -1, 1 << 40]
    for op in ops:
        apply(queue, oracle, op)
        assert_same_state(queue, oracle, universe)


def test_large_random_workload_agrees_with_oracle(core):
    """Thousands of entries: exercises hash-table wrap-around, the filter+heapify path of
    drop_expired, and the cached minima after many removals."""
    rng = random.Random(1234)
    capacity = 2000
    queue, oracle = core.DeadlineQueue(capacity), OracleQueue(capacity)
    next_rid = 0
    for step in range(4000):
        r = rng.random()
        if r < 0.55:
            rid = next_rid if rng.random() < 0.95 else rng.randrange(max(next_rid, 1))
            next_rid += 1
            deadline, arrival = rng.choice([rng.uniform(0, 100), float(rng.randrange(50))]), rng.uniform(0, 50)
            # Half keyed as the scheduler keys them past its EDF horizon: min(deadline, arrival + horizon).
            key = None if rng.random() < 0.5 else min(deadline, arrival + rng.choice([5.0, 20.0]))
            op = ("push", rid, deadline, arrival, rng.randrange(-1, 3), key)
        elif r < 0.75:
            op = ("pop", rng.randrange(0, 40), rng.uniform(0, 60), rng.randrange(0, 40), rng.randrange(0, 20))
        elif r < 0.85:
            op = ("drop", rng.uniform(0, 80), rng.choice([5, 50, 2000]))
        else:
            op = ("cancel", rng.randrange(max(next_rid, 1)))
        apply(queue, oracle, op)
        queue._check_invariants()
        if step % 50 == 0:
            assert_same_state(queue, oracle)
    assert_same_state(queue, oracle)


def test_push_returns_pushresult_members(core):
    queue = core.DeadlineQueue(1)
    ok = queue.push(1, 1.0, 0.0)
    duplicate = queue.push(1, 2.0, 0.0)
    full = queue.push(2, 2.0, 0.0)
    assert ok is core.PushResult.OK and ok == 0
    assert duplicate is core.PushResult.DUPLICATE and duplicate == 2
    assert full is core.PushResult.FULL and full == 1
    assert queue.ids() == [1] and queue.head_deadline() == 1.0  # neither changed the queue
    assert 2 not in queue


def test_key_order_is_priority_then_deadline_then_insertion(core):
    queue = core.DeadlineQueue(8)
    queue.push(10, 5.0, 0.0)
    queue.push(11, 1.0, 0.0)
    queue.push(12, 9.0, 0.0, priority=1)
    queue.push(13, 1.0, 0.0)  # same deadline as 11, pushed later
    queue.push(14, INF, 0.0, priority=1)
    assert queue.ids() == [12, 14, 11, 13, 10]
    assert queue.head_priority() == 1 and queue.head_deadline() == 9.0
    assert queue.earliest_deadline() == 1.0  # min over all, not the head's


def test_pop_batch_never_loses_an_id_when_expired_out_is_full(core):
    queue = core.DeadlineQueue(8)
    for rid, deadline in [(1, 1.0), (2, 2.0), (3, 50.0)]:
        queue.push(rid, deadline, 0.0)
    ready, expired = np.zeros(8, np.int64), np.zeros(1, np.int64)
    assert queue.pop_batch(8, 10.0, ready, expired) == (0, 1)
    assert expired[0] == 1
    assert queue.ids() == [2, 3]  # 2 is expired but had nowhere to go: still queued
    assert queue.pop_batch(8, 10.0, ready, expired) == (1, 1)
    assert expired[0] == 2 and ready[0] == 3 and len(queue) == 0


def test_pop_batch_clips_max_n_to_ready_out(core):
    queue = core.DeadlineQueue(8)
    for rid in range(5):
        queue.push(rid, 10.0 + rid, 0.0)
    ready = np.zeros(2, np.int64)
    assert queue.pop_batch(100, 0.0, ready, np.zeros(4, np.int64)) == (2, 0)
    assert ready.tolist() == [0, 1] and len(queue) == 3


def test_pop_batch_skips_expired_entries_towards_ready_ones(core):
    queue = core.DeadlineQueue(8)
    for rid, deadline in [(1, 1.0), (2, 8.0), (3, 2.0), (4, 9.0)]:
        queue.push(rid, deadline, 0.0)
    ready, expired = np.zeros(2, np.int64), np.zeros(4, np.int64)
    assert queue.pop_batch(2, 5.0, ready, expired) == (2, 2)
    assert ready.tolist() == [2, 4] and expired[:2].tolist() == [1, 3] and len(queue) == 0


def test_drop_expired_finds_entries_below_the_head(core):
    queue = core.DeadlineQueue(8)
    queue.push(1, 100.0, 0.0, priority=5)  # the head, not expired
    queue.push(2, 1.0, 0.0)
    queue.push(3, 2.0, 0.0)
    queue.push(4, 50.0, 0.0)
    out = np.zeros(8, np.int64)
    assert queue.drop_expired(10.0, out) == 2
    assert out[:2].tolist() == [2, 3]  # key order
    assert queue.ids() == [1, 4] and queue.earliest_deadline() == 50.0


def test_drop_expired_removes_no_more_than_fits(core):
    queue = core.DeadlineQueue(64)
    for rid in range(40):
        queue.push(rid, float(40 - rid), 0.0)  # later ids expire first
    out = np.zeros(12, np.int64)
    assert queue.drop_expired(100.0, out) == 12
    assert out.tolist() == list(range(39, 27, -1))  # the 12 earliest deadlines
    assert len(queue) == 28 and queue.earliest_deadline() == 13.0
    assert queue.drop_expired(100.0, np.zeros(0, np.int64)) == 0 and len(queue) == 28


def test_drop_expired_uses_strict_comparison(core):
    queue = core.DeadlineQueue(4)
    queue.push(1, 5.0, 0.0)
    assert queue.drop_expired(5.0, np.zeros(4, np.int64)) == 0  # deadline == now is not late
    assert queue.drop_expired(5.000001, np.zeros(4, np.int64)) == 1


def test_cancel_and_repush(core):
    queue = core.DeadlineQueue(2)
    queue.push(7, 3.0, 1.0)
    queue.push(8, 4.0, 0.5)
    assert queue.cancel(7) is True
    assert queue.cancel(7) is False
    assert 7 not in queue and queue.oldest_arrival() == 0.5
    assert queue.push(7, 1.0, 2.0) is core.PushResult.OK  # the freed slot is reused
    assert queue.ids() == [7, 8]


def test_empty_queue_queries(core):
    queue = core.DeadlineQueue(3)
    assert len(queue) == 0 and queue.capacity == 3
    assert queue.earliest_deadline() == INF and queue.oldest_arrival() == INF
    assert queue.head_deadline() == INF and queue.head_priority() == 0
    assert queue.earliest_slack(5.0) == INF and queue.ids() == []
    assert queue.pop_batch(4, 0.0, np.zeros(4, np.int64), np.zeros(4, np.int64)) == (0, 0)


def test_earliest_slack(core):
    queue = core.DeadlineQueue(3)
    queue.push(1, 7.5, 0.0, priority=1)
    queue.push(2, 3.0, 0.0)
    assert queue.earliest_slack(1.0) == 2.0


def test_ids_survive_adversarial_hash_patterns(core):
    """Ids that share low or high bits still each get their own entry."""
    ids = [k << 56 for k in range(-60, 60)] + [k * 1024 for k in range(200)] + [INT64_MIN, INT64_MAX]
    ids = list(dict.fromkeys(ids))
    queue = core.DeadlineQueue(len(ids))
    for i, rid in enumerate(ids):
        assert queue.push(rid, float(i), 0.0) is core.PushResult.OK
    assert all(rid in queue for rid in ids)
    for rid in ids[::2]:
        assert queue.cancel(rid)
    assert queue.ids() == ids[1::2]
    assert all((rid in queue) == (i % 2 == 1) for i, rid in enumerate(ids))


@pytest.mark.parametrize("capacity", [1, 4, 5, 7])
def test_id_index_survives_churn(core, capacity):
    """Small tables (8 or 16 buckets) under heavy push/cancel churn: probe chains collide and
    wrap around the end of the compiled id index, and deletions must keep them intact."""
    rng = random.Random(capacity)
    queue, oracle = core.DeadlineQueue(capacity), OracleQueue(capacity)
    for _ in range(3000):
        rid = rng.randrange(-40, 40) * rng.choice([1, 1 << 20, 1 << 40])
        if rng.random() < 0.6:
            apply(queue, oracle, ("push", rid, float(rng.randrange(5)), 0.0, 0, None))
        else:
            apply(queue, oracle, ("cancel", rid))
        queue._check_invariants()
        assert sorted(queue.ids()) == sorted(oracle.ids())


def test_contains_is_false_for_non_ids(core):
    queue = core.DeadlineQueue(2)
    queue.push(1, 1.0, 0.0)
    rid = 1
    assert rid in queue and np.int64(rid) in queue
    assert "1" not in queue and 1.5 not in queue and None not in queue and (1 << 70) not in queue


@pytest.mark.parametrize("capacity", [0, -3])
def test_capacity_must_be_positive(core, capacity):
    with pytest.raises(ValueError, match=r"capacity must be in 1\.\.\d+, got -?\d"):
        core.DeadlineQueue(capacity)


def test_capacity_must_be_an_integer(core):
    with pytest.raises(TypeError, match="capacity"):
        core.DeadlineQueue(2.5)


def test_nan_times_are_refused(core):
    queue = core.DeadlineQueue(2)
    with pytest.raises(ValueError, match="deadline must be a number, got nan"):
        queue.push(1, math.nan, 0.0)
    with pytest.raises(ValueError, match="arrival must be a number, got nan"):
        queue.push(1, 1.0, math.nan)
    assert len(queue) == 0


def test_priority_and_id_must_fit_c_types(core):
    queue = core.DeadlineQueue(2)
    with pytest.raises(OverflowError):
        queue.push(1, 1.0, 0.0, priority=2**31)
    with pytest.raises(OverflowError):
        queue.push(2**63, 1.0, 0.0)
    with pytest.raises(TypeError):
        queue.push("1", 1.0, 0.0)
    assert len(queue) == 0


@pytest.mark.parametrize(
    "bad, error",
    [
        (np.zeros(4, np.float64), ValueError),
        (np.zeros(4, np.int32), ValueError),
        (np.zeros((2, 2), np.int64), ValueError),
        (np.zeros(8, np.int64)[::2], ValueError),
        ([0, 0, 0], TypeError),
    ],
)
def test_id_buffers_are_checked(core, bad, error):
    queue = core.DeadlineQueue(2)
    queue.push(1, 1.0, 0.0)
    with pytest.raises(error, match="ready_out must be a writable 1-D C-contiguous int64"):
        queue.pop_batch(1, 0.0, bad, np.zeros(1, np.int64))
    with pytest.raises(error, match="expired_out must be a writable 1-D C-contiguous int64"):
        queue.drop_expired(5.0, bad)
    assert queue.ids() == [1]


def test_read_only_id_buffer_is_refused(core):
    queue = core.DeadlineQueue(2)
    queue.push(1, 1.0, 0.0)
    frozen = np.zeros(2, np.int64)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="expired_out"):
        queue.pop_batch(1, 0.0, np.zeros(1, np.int64), frozen)
    assert queue.ids() == [1]


def test_negative_max_n_is_refused(core):
    queue = core.DeadlineQueue(2)
    with pytest.raises(ValueError, match="max_n must be >= 0, got -1"):
        queue.pop_batch(-1, 0.0, np.zeros(1, np.int64), np.zeros(1, np.int64))


@settings(max_examples=200, deadline=None)
@given(entries=st.lists(st.tuples(st.integers(-2, 2), st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0])), max_size=40),
       probe=st.tuples(st.integers(-2, 2), st.sampled_from([0.25, 1.0, 1.5, 2.5, 9.0])))
def test_count_ahead_is_the_position_a_new_entry_would_pop_at(core, entries, probe):
    queue = core.DeadlineQueue(64)
    for rid, (priority, deadline) in enumerate(entries):
        queue.push(rid, deadline, 0.0, priority)
    priority, deadline = probe
    ahead = queue.count_ahead(deadline, priority)
    queue.push(10_000, deadline, 0.0, priority)          # the probe itself: pops after exactly `ahead`
    assert queue.ids().index(10_000) == ahead


@settings(max_examples=200, deadline=None)
@given(entries=st.lists(st.tuples(st.integers(-1, 1), st.sampled_from([0.5, 1.0, 1.5, 2.0]),
                                  st.sampled_from([0.0, 0.5, 3.0])), max_size=40),
       probe=st.tuples(st.integers(-1, 1), st.sampled_from([0.25, 1.0, 1.5, 2.5])))
def test_count_ahead_counts_by_key_when_the_key_is_not_the_deadline(core, entries, probe):
    queue = core.DeadlineQueue(64)
    for rid, (priority, key, later) in enumerate(entries):
        queue.push(rid, key + later, 0.0, priority, key)   # due `later` after its key
    priority, key = probe
    ahead = queue.count_ahead(key, priority)
    queue.push(10_000, key + 9.0, 0.0, priority, key)
    assert queue.ids().index(10_000) == ahead


def test_a_key_orders_while_the_deadline_expires(core):
    queue = core.DeadlineQueue(8)
    queue.push(1, 10.0, 0.0, key=1.0)     # a loose request keyed early
    queue.push(2, 2.0, 0.0)               # a tight one, keyed by its deadline
    assert queue.ids() == [1, 2] and queue.head_key() == 1.0 and queue.head_deadline() == 10.0
    assert queue.earliest_deadline() == 2.0
    ready, expired = np.zeros(8, np.int64), np.zeros(8, np.int64)
    assert queue.pop_batch(8, 5.0, ready, expired) == (1, 1)   # past 1's key, before its deadline: ready
    assert ready[0] == 1 and expired[0] == 2
    with pytest.raises(ValueError, match="key must be a number, got nan"):
        queue.push(3, 1.0, 0.0, key=math.nan)
