"""The scheduler as a state machine on a hand-driven clock, with the real core's queue and rules.

No backend and no threads: exactly how the simulator will drive it.
"""
import math

import numpy as np
import pytest

from agent.core import DynamicBatch, FixedBatch, LatencyTable, DeadlineAwareBatch
from agent.errors import REJECTED, InferenceError
from agent.scheduler.dispatcher import Scheduler
from tests.scheduling import req


def table(per_item_s=0.001, fixed_s=0.001):
    sizes = np.array([1, 2, 4, 8])
    return LatencyTable(sizes, fixed_s + per_item_s * sizes)


def scheduler(rules, instances=None, max_concurrent=4, capacity=64):
    instances = instances or {}
    return Scheduler([Scheduler.lane(name, rule, instances.get(name, 1), capacity) for name, rule in rules.items()],
                     max_concurrent=max_concurrent)


def test_earliest_deadline_model_goes_first():
    s = scheduler({"a": FixedBatch(1), "b": FixedBatch(1)})
    s.enqueue(req("a", 0.0, 0.050))
    s.enqueue(req("b", 0.0, 0.010))
    first = s.poll(0.001).dispatch
    second = s.poll(0.001).dispatch
    assert (first.model, second.model) == ("b", "a")


def test_priority_beats_deadline_across_models():
    s = scheduler({"a": FixedBatch(1), "b": FixedBatch(1)})
    s.enqueue(req("a", 0.0, 0.050, priority=5))
    s.enqueue(req("b", 0.0, 0.010))
    assert s.poll(0.001).dispatch.model == "a"


def test_instance_limit_and_release():
    s = scheduler({"a": FixedBatch(1)}, instances={"a": 2})
    for _ in range(3):
        s.enqueue(req("a", 0.0, 1.0))
    d1, d2 = s.poll(0.0).dispatch, s.poll(0.0).dispatch
    assert {d1.instance, d2.instance} == {0, 1}
    blocked = s.poll(0.0)
    assert blocked.dispatch is None
    assert blocked.wake_at == pytest.approx(1.0)     # wakes to expire the waiting one at its deadline
    s.release(d1)
    d3 = s.poll(0.0).dispatch
    assert d3.instance == d1.instance


def test_global_slot_limit():
    s = scheduler({"a": FixedBatch(1), "b": FixedBatch(1)}, max_concurrent=1)
    s.enqueue(req("a", 0.0, 1.0))
    s.enqueue(req("b", 0.0, 1.0))
    d = s.poll(0.0).dispatch
    assert d is not None and s.poll(0.0).dispatch is None
    s.release(d)
    assert s.poll(0.0).dispatch is not None


def test_expired_requests_are_returned_not_run():
    s = scheduler({"a": FixedBatch(2)})
    late = req("a", 0.0, 0.005)
    s.enqueue(late)
    decision = s.poll(0.001)
    assert decision.dispatch is None and decision.wake_at == pytest.approx(0.005)
    decision = s.poll(0.006)
    assert decision.expired == [late] and s.queued() == 0


def test_dynamic_batch_waits_for_queue_delay_then_dispatches():
    s = scheduler({"a": DynamicBatch(8, (4,), 0.002)})
    for _ in range(3):
        s.enqueue(req("a", 0.0, 1.0))
    waiting = s.poll(0.0005)
    assert waiting.dispatch is None and waiting.wake_at == pytest.approx(0.002)
    dispatch = s.poll(0.002).dispatch
    assert len(dispatch.requests) == 3


def test_deadline_aware_takes_the_batch_that_meets_the_head_deadline():
    s = scheduler({"a": DeadlineAwareBatch(table(0.001, 0.001), 8)})
    for _ in range(8):
        s.enqueue(req("a", 0.0, 0.0045))   # batch of b takes 1 + b ms; 4.5 ms of slack fits 3
    dispatch = s.poll(0.0).dispatch
    assert len(dispatch.requests) == 3


def test_batch_requests_come_out_in_deadline_order():
    s = scheduler({"a": FixedBatch(4)})
    slos = [0.04, 0.01, 0.03, 0.02]
    requests = [req("a", 0.0, slo) for slo in slos]
    for r in requests:
        s.enqueue(r)
    dispatch = s.poll(0.0).dispatch
    assert [r.deadline for r in dispatch.requests] == sorted(slos)


def test_full_queue_is_refused():
    s = scheduler({"a": FixedBatch(4)}, capacity=2)
    s.enqueue(req("a", 0.0, 1.0))
    s.enqueue(req("a", 0.0, 1.0))
    with pytest.raises(InferenceError) as info:
        s.enqueue(req("a", 0.0, 1.0))
    assert info.value.code == REJECTED and "full" in info.value.message


def test_drain_returns_everything_queued():
    s = scheduler({"a": FixedBatch(4), "b": FixedBatch(4)})
    queued = [req("a", 0.0, 1.0), req("b", 0.0, 1.0), req("b", 0.0, 1.0)]
    for r in queued:
        s.enqueue(r)
    assert sorted(r.rid for r in s.drain()) == sorted(r.rid for r in queued)
    assert s.queued() == 0 and s.poll(0.0).wake_at == math.inf


def test_hopeless_requests_are_shed_not_computed_late():
    s = Scheduler([Scheduler.lane("a", FixedBatch(1), 1, 64, min_latency_s=0.004)], max_concurrent=1)
    hopeless, fine = req("a", 0.0, 0.003), req("a", 0.0, 0.010)   # a run takes at least 4 ms
    s.enqueue(hopeless)
    s.enqueue(fine)
    decision = s.poll(0.0)
    assert decision.expired == [hopeless]
    assert decision.dispatch.requests == [fine]


def test_without_shedding_a_late_request_still_runs():
    s = scheduler({"a": FixedBatch(1)})
    late = req("a", 0.0, 0.003)
    s.enqueue(late)
    assert s.poll(0.0).dispatch.requests == [late]


def test_admission_predicts_from_the_queue_ahead_and_busy_instances():
    from agent.scheduler.admission import AdmissionControl
    t = table(0.001, 0.001)              # a batch of b takes (1 + b) ms
    s = Scheduler([Scheduler.lane("a", FixedBatch(2), 1, 64, admission=AdmissionControl(t, 2))], max_concurrent=1)
    # Idle: one request alone finishes at 2 ms.
    with pytest.raises(InferenceError) as info:
        s.enqueue(req("a", 0.0, 0.0019))
    assert info.value.code == REJECTED and "0 queued ahead" in info.value.message
    s.enqueue(req("a", 0.0, 0.0021))
    # Second request: batch of 2 finishing at 3 ms.
    with pytest.raises(InferenceError):
        s.enqueue(req("a", 0.0, 0.0029))
    s.enqueue(req("a", 0.0, 0.0031))
    # The instance starts that batch (predicted to end at 3 ms); a third request waits for it,
    # then runs alone: 3 + 2 = 5 ms.
    dispatch = s.poll(0.0).dispatch
    assert len(dispatch.requests) == 2
    with pytest.raises(InferenceError):
        s.enqueue(req("a", 0.0, 0.0049))
    s.enqueue(req("a", 0.0, 0.0051))
    s.release(dispatch)
    assert s.lanes["a"].busy_until == {}


def test_admission_learns_a_slowdown_weighted_by_batch_length():
    from agent.scheduler.admission import AdmissionControl
    t = table(0.001, 0.001)              # a batch of b takes (1 + b) ms as profiled
    admission = AdmissionControl(t, 8)
    assert admission.batch_s(4) == pytest.approx(0.005) and admission.slowdown == 1.0
    admission.observe(8, 0.027)          # a batch of 8: three times its 9 ms
    assert admission.slowdown == pytest.approx(3.0)
    assert admission.batch_s(1) == pytest.approx(0.006) and admission.batch_s(4) == pytest.approx(0.015)
    admission.observe(1, 0.002)          # a batch of one at its profiled 2 ms: a short batch moves it little
    w = admission.EWMA_WEIGHT
    assert admission.slowdown == pytest.approx((0.027 + w * (0.002 - 0.027)) / (0.009 + w * (0.002 - 0.009)))
    assert admission.slowdown > 2.7
    for _ in range(60):                  # batches back at their profiled time, of any size
        admission.observe(2, 0.003)
    assert admission.slowdown == pytest.approx(1.0, abs=1e-4)
    assert admission.overruns == 1       # only the first batch took longer than predicted


def test_overtaken_wait_adds_the_work_tighter_arrivals_bring_while_it_waits():
    from agent.scheduler.admission import overtaken_wait
    assert overtaken_wait(0.0, [(0.1, 0.5)], 1) == 0.0                        # starts now: nothing overtakes
    assert overtaken_wait(0.010, [], 1) == 0.010
    assert overtaken_wait(0.010, [(0.1, 0.5)], 1) == pytest.approx(0.020, rel=0.01)   # w = 10 ms + w / 2
    assert overtaken_wait(0.010, [(0.1, 0.5)], 2) == pytest.approx(0.010 / 0.75, rel=0.01)  # two slots share it
    assert overtaken_wait(0.010, [(0.004, 0.5)], 1) == pytest.approx(0.012)  # only 4 ms of arrivals are earlier


def test_admission_refuses_what_tighter_arrivals_will_push_past_its_deadline():
    from agent.core import DeadlineQueue
    from agent.scheduler.admission import AdmissionControl
    admission = AdmissionControl(table(0.001, 0.001), 1)    # 2 ms a request, one at a time
    queue = DeadlineQueue(64)
    for rid in range(4):
        queue.push(rid, 0.012, 0.0, 0)                      # 8 ms of work ahead of a 15 ms request
    assert admission.refuse(queue, 0.015, 0, 0.0, 1, []) is None               # finishes at 10 ms
    # Tighter requests arriving at 0.5 s of work a second overtake it while it waits: 20 ms ahead.
    reason = admission.refuse(queue, 0.015, 0, 0.0, 1, [], None, [(0.1, 0.5)], 1)
    assert reason is not None and "predicted finish in 18.0 ms" in reason


def test_lookahead_tracks_the_admitted_work_of_each_tighter_class():
    from agent.scheduler.admission import AdmissionControl
    lanes = [Scheduler.lane("a", FixedBatch(1), 1, 64, admission=AdmissionControl(table(0.001, 0.001), 1))]
    s = Scheduler(lanes, max_concurrent=1, lookahead=True)
    for k in range(5):
        s.enqueue(req("a", 0.0, 0.010 + 0.01 * k))           # five classes, 2 ms of work each
    tau = Scheduler.LOOKAHEAD_TAU_S
    overtakers = sorted(s._overtakers(0.035, 0.0))          # classes of 10, 20 and 30 ms are tighter
    assert [w for w, _ in overtakers] == pytest.approx([0.005, 0.015, 0.025])
    assert [rate for _, rate in overtakers] == pytest.approx([0.002 / tau] * 3)
    later = s._overtakers(0.035, tau)                       # a time constant later, rates down to 1/e
    assert [rate for _, rate in later] == pytest.approx([0.002 / tau / math.e] * 3)
    assert Scheduler(lanes, max_concurrent=1)._overtakers(0.035, 0.0) == []   # off by default: nothing counted


def _pop_order(horizon_s, requests, now):
    s = Scheduler([Scheduler.lane("a", FixedBatch(1), 1, 64)], max_concurrent=1, edf_horizon_s=horizon_s)
    for r in requests:
        s.enqueue(r)
    order = []
    while s.queued():
        decision = s.poll(now)
        assert not decision.expired
        order.append(decision.dispatch.requests[0])
        s.release(decision.dispatch)
    return order


def test_edf_horizon_queues_a_loose_request_by_arrival_plus_horizon():
    loose = req("a", 0.0, 0.150)                 # keyed 0.050 under a 50 ms horizon
    early_tight = req("a", 0.005, 0.030)         # keyed (and due) 0.035: before it either way
    late_tight = req("a", 0.030, 0.030)          # due 0.060: after it under the horizon only
    requests = (loose, early_tight, late_tight)
    assert _pop_order(0.050, requests, 0.031) == [early_tight, loose, late_tight]
    assert _pop_order(math.inf, requests, 0.031) == [early_tight, late_tight, loose]   # plain EDF


def test_edf_horizon_expires_a_request_by_its_deadline_not_its_key():
    loose = req("a", 0.0, 0.150)                 # keyed 0.050, due 0.150
    assert _pop_order(0.050, [loose], 0.100) == [loose]       # past its key: still served
    s = Scheduler([Scheduler.lane("a", FixedBatch(1), 1, 64)], max_concurrent=1, edf_horizon_s=0.050)
    late = req("a", 0.0, 0.150)
    s.enqueue(late)
    decision = s.poll(0.151)
    assert decision.dispatch is None and decision.expired == [late]


def test_edf_horizon_counts_as_overtakers_only_classes_keyed_tighter():
    from agent.scheduler.admission import AdmissionControl
    lanes = [Scheduler.lane("a", FixedBatch(1), 1, 64, admission=AdmissionControl(table(0.001, 0.001), 1))]
    s = Scheduler(lanes, max_concurrent=1, lookahead=True, edf_horizon_s=0.020)
    for k in range(5):
        s.enqueue(req("a", 0.0, 0.010 + 0.01 * k))           # classes of 10, 20, 30, 40 and 50 ms
    # A 35 ms request is keyed 20 ms after its arrival, as are the 20-50 ms classes: only the 10 ms
    # class, keyed 10 ms after its arrival, overtakes it, for arrivals within 10 ms.
    assert [w for w, _ in s._overtakers(0.035, 0.0)] == pytest.approx([0.010])
    assert s._overtakers(0.015, 0.0) == [(pytest.approx(0.005), pytest.approx(0.002 / Scheduler.LOOKAHEAD_TAU_S))]


def test_a_horizon_of_zero_or_less_is_refused():
    with pytest.raises(ValueError, match="edf_horizon_s = 0"):
        Scheduler([Scheduler.lane("a", FixedBatch(1), 1, 64)], max_concurrent=1, edf_horizon_s=0)


def test_admission_counts_only_what_pops_first():
    from agent.scheduler.admission import AdmissionControl
    t = table(0.001, 0.001)
    s = Scheduler([Scheduler.lane("a", FixedBatch(1), 1, 64, admission=AdmissionControl(t, 1))], max_concurrent=1)
    for _ in range(5):
        s.enqueue(req("a", 0.0, 1.0))     # loose deadlines: they pop after a tight one
    s.enqueue(req("a", 0.0, 0.0021))      # nothing ahead of it: admitted


def test_admission_learns_a_slack_from_misses_and_lets_it_go_when_requests_make_it():
    from agent.scheduler.admission import AdmissionControl
    t = table(0.001, 0.001)              # a batch of one: 2 ms
    s = Scheduler([Scheduler.lane("a", FixedBatch(1), 1, 64, admission=AdmissionControl(t, 1))], max_concurrent=1)
    admission = s.lanes["a"].admission
    s.enqueue(req("a", 0.0, 0.003))      # 1 ms to spare: admitted
    dispatch = s.poll(0.0).dispatch
    s.release(dispatch)
    s.observe(dispatch, 0.010)           # ...but it finished at 10 ms: a miss
    step = admission.STEP_FRACTION * 0.003            # a class steps in proportion to its SLO
    assert admission.slack_s(0.003) == pytest.approx(admission.MISS_QUANTILE * step)
    assert admission.slack_s(0.006) == 0.0            # another class learned nothing
    for _ in range(60):                  # the slow batch taught its size's slowdown too; this test is the
        admission.observe(1, 0.002)      # slack's, so batches at the profiled time teach it back to 1
    misses = math.ceil(0.0011 / (admission.MISS_QUANTILE * step))
    for _ in range(misses - 1):
        admission.calibrate(True, 0.003)
    assert admission.slack_s(0.003) > 0.001
    with pytest.raises(InferenceError) as info:
        s.enqueue(req("a", 0.0, 0.003))  # the same request is now refused, and the reason says why
    assert info.value.code == REJECTED and "learned slack" in info.value.message
    with pytest.raises(InferenceError):
        s.enqueue(req("a", 0.0, 0.00301))  # 3.01 ms: the same class (4% wide), the same slack
    s.enqueue(req("a", 0.0, 0.006))      # 6 ms: another class, without slack: 2 ms fits
    # Requests that make it take the slack back down, at (1 - q) / q of a miss's step each.
    hits = math.ceil(admission.slack_s(0.003) / ((1 - admission.MISS_QUANTILE) * step))
    for _ in range(hits):
        admission.calibrate(False, 0.003)
    assert admission.slack_s(0.003) == pytest.approx(0.0, abs=1e-12)
    s.enqueue(req("a", 0.0, 0.003))


def test_admission_forgets_a_slow_spell_while_the_board_is_idle():
    """After a spell of starvation the slack and the slowdown refused every request, and with
    nothing admitted nothing could bring them down: the board idle, they decay with its idle time."""
    from agent.scheduler.admission import AdmissionControl
    t = table(0.001, 0.001)              # a batch of one: 2 ms
    s = Scheduler([Scheduler.lane("a", FixedBatch(1), 1, 64, admission=AdmissionControl(t, 1))], max_concurrent=1)
    admission = s.lanes["a"].admission
    slo = 0.010
    s.enqueue(req("a", 0.0, slo))
    dispatch = s.poll(0.0).dispatch
    s.release(dispatch, 0.05)            # starved: the batch of one took 50 ms
    s.observe(dispatch, 0.05)
    for _ in range(10_000):              # ... and many admitted requests missed
        admission.calibrate(True, slo)
    assert admission.slack_s(slo) == pytest.approx(slo)   # the slack stops at the SLO: it refuses all already
    assert admission.slowdown > 20
    with pytest.raises(InferenceError, match="learned slack"):
        s.enqueue(req("a", 0.06, slo))   # an idle board, nothing queued, yet refused
    assert not s.queued() and s.in_flight == 0
    # Idle for a while (refused requests keep it idle): what was learned under load fades.
    now = 0.06
    while True:
        now += 0.1
        try:
            s.enqueue(req("a", now, slo))
            break
        except InferenceError:
            assert now < 60.0, "admission did not recover on an idle board"
    assert admission.slack_s(slo) < 0.001 and admission.slowdown * 0.002 + admission.slack_s(slo) <= slo
    # A board that keeps busy forgets nothing: a batch in flight, the next arrival changes no state.
    slack, slowdown = admission.slack_s(slo), admission.slowdown
    s.poll(now)
    try:
        s.enqueue(req("a", now + 5.0, slo))
    except InferenceError:
        pass
    assert (admission.slack_s(slo), admission.slowdown) == (slack, slowdown)


def test_requests_expiring_in_the_queue_count_as_misses():
    from agent.scheduler.admission import AdmissionControl
    s = Scheduler([Scheduler.lane("a", FixedBatch(1), 1, 64, min_latency_s=0.002,
                                  admission=AdmissionControl(table(0.001, 0.001), 1))], max_concurrent=1)
    for deadline in (0.003, 0.005, 0.007):   # each admitted: predicted to finish at 2, 4, 6 ms
        s.enqueue(req("a", 0.0, deadline))
    decision = s.poll(0.0055)            # the first slot frees late: 1.5 ms left at best, a run takes 2

    assert len(decision.expired) == 3 and decision.dispatch is None
    admission = s.lanes["a"].admission
    for slo in (0.003, 0.005, 0.007):       # one miss in each request's class
        assert admission.slack_s(slo) == pytest.approx(admission.MISS_QUANTILE * admission.STEP_FRACTION * slo)


def test_water_level_pours_work_over_the_slots_free_first():
    from agent.scheduler.dispatcher import water_level
    assert water_level([0.0, 0.0], 0.0) == 0.0
    assert water_level([0.0, 0.0], 2.0) == pytest.approx(1.0)         # both slots share it
    assert water_level([0.0, 10.0], 2.0) == pytest.approx(2.0)        # the busy slot does not help
    assert water_level([0.0, 1.0], 3.0) == pytest.approx(2.0)         # 2 s on the first, 1 on the second
    assert water_level([5.0, 5.0], 0.0) == pytest.approx(5.0)         # nothing ahead: the first free slot


def test_admission_sees_the_other_models_work_on_the_shared_slots():
    from agent.scheduler.admission import AdmissionControl
    t = table(0.001, 0.001)              # a batch of b takes (1 + b) ms
    lanes = [Scheduler.lane(name, FixedBatch(1), 1, 64, admission=AdmissionControl(t, 1)) for name in ("a", "b")]
    s = Scheduler(lanes, max_concurrent=1)
    for _ in range(4):
        s.enqueue(req("b", 0.0, 0.0090))  # 8 ms of b's work with earlier deadlines: it runs first
    with pytest.raises(InferenceError) as info:
        s.enqueue(req("a", 0.0, 0.0095))  # alone it takes 2 ms, but the one slot is b's for 8 ms first
    assert "slots shared with other models" in info.value.message
    s.enqueue(req("a", 0.0, 0.0105))      # 8 + 2 ms fits
    s.enqueue(req("a", 0.0, 0.0085))      # due before b's: b's work does not come first (and 2 + 2 ms fits)


def _share(capacity=1.0):
    from agent.scheduler.admission import AdmissionControl, CostShare
    return CostShare({"cheap": AdmissionControl(table(0.0005, 0.0005), 1),      # 1 ms a request
                      "dear": AdmissionControl(table(0.002, 0.002), 1)}, capacity)  # 4 ms a request


def _offer(share, seconds, cheap_per_s, dear_per_s, priority=0):
    """Interleaved arrivals of both models at the given rates; returns admitted counts after 1 s."""
    arrivals = sorted([(k / cheap_per_s, "cheap") for k in range(int(seconds * cheap_per_s))]
                      + [(k / dear_per_s, "dear") for k in range(int(seconds * dear_per_s))])
    admitted = {"cheap": [0, 0], "dear": [0, 0]}
    for t, model in arrivals:
        ok = share.refuse(model, priority, t) is None
        if t >= 1.0:
            admitted[model][0] += ok
            admitted[model][1] += 1
    return {m: a / n for m, (a, n) in admitted.items()}


def test_cost_share_admits_everything_below_capacity():
    share = _share()
    assert _offer(share, 3.0, cheap_per_s=300, dear_per_s=100) == {"cheap": 1.0, "dear": 1.0}   # 0.7 s/s of work
    assert share.refused == {"cheap": 0, "dear": 0}


def test_cost_share_refuses_the_expensive_model_first_under_overload():
    # 0.5 s/s of cheap work + 1.0 s/s of dear work on one slot: cheap gets all it asks, dear the
    # 0.5 s/s left, so about half of dear's requests (the greedy fluid optimum: 750 answered/s, where
    # refusing both alike would give 500).
    fractions = _offer(_share(), 4.0, cheap_per_s=500, dear_per_s=250)
    assert fractions["cheap"] == 1.0
    assert 0.4 <= fractions["dear"] <= 0.6, fractions


def test_cost_share_reason_and_priority():
    share = _share()
    _offer(share, 2.0, cheap_per_s=1000, dear_per_s=250)       # cheap alone fills the slot
    reason = share.refuse("dear", 0, 2.0)
    assert reason is not None and "'dear'" in reason and "cost-aware admission" in reason
    assert share.refuse("dear", 1, 2.0) is None                  # priority above 0 is never refused here


def test_cost_share_leaves_the_cheapest_models_overload_to_the_deadline_test():
    # 2 s/s of cheap work alone on one slot: nothing cheaper to protect, so none of it is refused
    # here (the deadline test keeps what can wait); dear gets nothing while cheap fills the slot.
    share = _share()
    fractions = _offer(share, 3.0, cheap_per_s=2000, dear_per_s=100)
    assert fractions["cheap"] == 1.0 and share.refused["cheap"] == 0
    assert fractions["dear"] < 0.1, fractions


def test_scheduler_refuses_through_the_cost_share_only_with_several_admitted_models():
    from agent.scheduler.admission import AdmissionControl
    one = Scheduler([Scheduler.lane("a", FixedBatch(1), 1, 64, admission=AdmissionControl(table(), 1))], 1)
    assert one.share is None
    two = Scheduler([Scheduler.lane(n, FixedBatch(1), 1, 64, admission=AdmissionControl(table(), 1)) for n in "ab"], 2)
    assert two.share is not None and two.share.capacity == 2.0


# --- the hold bound: batches capped by the tightest recent SLO --------------------------------------

def test_hold_cap_bounds_the_batch_unless_batching_pays():
    from agent.scheduler.dispatcher import hold_cap
    linear = table(per_item_s=0.001, fixed_s=0.0)          # a batch of b takes b ms: batching saves nothing
    assert hold_cap(linear, 8, 0.0025) == 2
    assert hold_cap(linear, 8, 0.0005) == 1                # even one does not fit: still 1
    assert hold_cap(linear, 8, 0.010) == 8
    paying = table(per_item_s=0.0001, fixed_s=0.002)       # a batch of 8 costs 0.28 ms a request (GPU-like)
    assert hold_cap(paying, 8, 0.0025) == 8


def _capped_scheduler(hold_fraction):
    from agent.scheduler.admission import AdmissionControl
    t = table(per_item_s=0.001, fixed_s=0.0)
    lanes = [Scheduler.lane(name, DeadlineAwareBatch(t, 8), 1, 64, admission=AdmissionControl(t, 8)) for name in "ab"]
    return Scheduler(lanes, max_concurrent=2, hold_fraction=hold_fraction)


def test_an_urgent_request_waiting_caps_every_lanes_batches():
    s = _capped_scheduler(0.25)
    for _ in range(8):
        s.enqueue(req("a", 0.0, 1.0))                      # loose: a full batch of 8 (8 ms)
    for _ in range(3):                                     # three 10 ms requests on the other model (one instance)
        s.enqueue(req("b", 0.0, 0.010))
    assert s.tight_slo_s == pytest.approx(0.010)
    assert [lane.batch_cap for lane in s.lanes.values()] == [2, 2]     # 2 ms <= 10 ms / 4
    first, second = s.poll(0.0).dispatch, s.poll(0.0).dispatch
    assert (first.model, len(first.requests)) == ("b", 2)
    assert (second.model, len(second.requests)) == ("a", 2)           # the third b is still waiting
    # Admission predicts with the cap while it binds: an urgent arrival, or any arrival while one waits.
    s.enqueue(req("a", 0.0, 1.0))
    assert s.lanes["a"].admission.max_batch == 2 and s.lanes["b"].admission.max_batch == 2


def test_with_nothing_urgent_queued_a_batch_takes_what_the_rule_allows():
    s = _capped_scheduler(0.25)
    s.enqueue(req("b", 0.0, 0.010))
    assert s.poll(0.0).dispatch.model == "b"               # the tight request runs
    for _ in range(8):
        s.enqueue(req("a", 0.0, 1.0))
    assert s.lanes["a"].batch_cap == 2                     # a tight SLO was seen within the window ...
    assert s.lanes["a"].admission.max_batch == 8           # ... but none waits: admission predicts full batches
    assert len(s.poll(0.0).dispatch.requests) == 8         # ... and the backlog drains at full size


def test_the_cap_lifts_once_no_tight_request_came_for_a_window():
    s = _capped_scheduler(0.25)
    s.enqueue(req("b", 0.0, 0.010))
    assert s.lanes["a"].batch_cap == 2
    later = Scheduler.TIGHT_WINDOW_S + 0.5
    for _ in range(8):
        s.enqueue(req("a", later, 1.0))
    assert s.tight_slo_s == pytest.approx(1.0)
    assert s.lanes["a"].batch_cap == 8
    decision = s.poll(later)
    assert len(decision.expired) == 1                       # the 10 ms request, long overdue
    assert len(decision.dispatch.requests) == 8


def test_no_cap_without_a_hold_fraction():
    s = _capped_scheduler(0.0)
    for _ in range(8):
        s.enqueue(req("a", 0.0, 1.0))
    s.enqueue(req("b", 0.0, 0.010))
    s.enqueue(req("b", 0.0, 0.010))
    s.poll(0.0)
    assert len(s.poll(0.0).dispatch.requests) == 8
    with pytest.raises(ValueError, match="hold_fraction"):
        _capped_scheduler(1.5)


def test_slos_that_vary_request_by_request_keep_the_learned_state_bounded():
    from agent.scheduler.admission import MAX_CLASSES, AdmissionControl
    admission = AdmissionControl(table(0.001, 0.001), 1)
    s = Scheduler([Scheduler.lane("a", FixedBatch(1), 1, 10_000, admission=admission)], max_concurrent=1,
                  lookahead=True)
    for k in range(4 * MAX_CLASSES):
        slo = 0.010 * 1.05 ** k                       # every request its own class
        admission.calibrate(True, slo)
        s.enqueue(req("a", 0.0, slo))
        s.release(s.poll(0.0).dispatch)               # run it: the next one finds the board idle
        assert len(admission._slack) <= MAX_CLASSES and len(s._class_rates) <= MAX_CLASSES


# --- the idle board's path: start_alone ------------------------------------------------------------

def _ours(starts_alone=True, **lane_kwargs):
    """Two models under admission control, as the agent runs them: cost share, batch caps, lookahead."""
    from agent.scheduler.admission import AdmissionControl
    lanes = [Scheduler.lane(name, DeadlineAwareBatch(t, 8), 2, 64, min_latency_s=t.predict(1),
                            admission=AdmissionControl(t, 8, 0.001), starts_alone=starts_alone, **lane_kwargs)
             for name, t in (("cheap", table(0.001, 0.001)), ("dear", table(0.004, 0.002)))]
    return Scheduler(lanes, max_concurrent=2, hold_fraction=0.25, lookahead=True, edf_horizon_s=0.050)


def _state(s):
    return (s.in_flight, s.tight_slo_s, s._tight_at, {k: list(v) for k, v in s._class_rates.items()},
            dict(s.share._demand), {n: dict(lane.busy_until) for n, lane in s.lanes.items()},
            {n: lane.batch_cap for n, lane in s.lanes.items()})


def test_start_alone_starts_a_lone_request_at_once_and_learns_what_enqueue_and_poll_would():
    alone, queued = _ours(), _ours()
    for s in (alone, queued):                    # some history: a request answered a while ago
        s.enqueue(req("cheap", 0.0, 0.010))
        s.release(s.poll(0.0).dispatch)
    a = req("dear", 0.100, 0.150)
    b = req("dear", 0.100, 0.150)
    started = alone.start_alone(a)
    assert started.requests == [a] and started.model == "dear" and started.started == 0.100
    assert not alone.queued() and not alone.lanes["dear"].pending          # never queued
    queued.enqueue(b)
    polled = queued.poll(0.100).dispatch
    assert polled.requests == [b] and polled.instance == started.instance
    alone.learn_admitted(a)
    assert _state(alone) == _state(queued)
    assert alone.lanes["dear"].busy_until[started.instance] == pytest.approx(0.100 + 0.006)


def test_start_alone_leaves_to_the_queue_a_board_that_is_not_idle_a_rule_that_may_hold_and_a_hopeless_request():
    s = _ours()
    s.enqueue(req("cheap", 0.0, 0.050))
    assert s.start_alone(req("dear", 0.0, 0.150)) is None                   # something queued
    s.poll(0.0)
    assert s.start_alone(req("dear", 0.0, 0.150)) is None                   # something in flight
    assert _ours(starts_alone=False).start_alone(req("dear", 0.0, 0.150)) is None
    hopeless = req("dear", 0.0, 0.005)            # due before its model's fastest run (6 ms)
    assert _ours().start_alone(hopeless) is None  # enqueue and poll shed it, as any other
    assert _ours().start_alone(req("dear", 0.0, 0.150)) is not None


def test_start_alone_refuses_what_enqueue_refuses_with_the_same_reason():
    alone, queued = _ours(), _ours()
    tight = req("dear", 0.0, 0.0065)              # 6 ms to run and 1 ms of margin: cannot make it
    with pytest.raises(InferenceError) as refused_alone:
        alone.start_alone(tight)
    with pytest.raises(InferenceError) as refused_queued:
        queued.enqueue(tight)
    assert refused_alone.value.code == REJECTED and refused_alone.value.message == refused_queued.value.message
    assert _state(alone) == _state(queued) and alone.in_flight == 0


def test_a_batch_started_alone_passes_through_the_policy_like_a_polled_one():
    """The rule's dispatched hook runs for a batch started alone too: DeepRT's DisBatcher marks its
    window's joint served, so a request arriving later in the same window waits for the next joint."""
    from agent.scheduler.baselines import DisBatch
    s = Scheduler([Scheduler.lane("a", DisBatch(0.1, 8), 2, 64, starts_alone=True)], max_concurrent=2)
    started = s.start_alone(req("a", 0.25, 1.0))
    assert started is not None and started.action.batch_size == 1 and started.action.target == "local"
    s.release(started)
    s.enqueue(req("a", 0.26, 1.0))
    decision = s.poll(0.26)
    assert decision.dispatch is None and decision.wake_at == pytest.approx(0.3)


def test_start_alone_waits_for_a_quiet_moment():
    """Requests closer together than IDLE_GAP_S mean a loaded board: the second one is queued."""
    from agent.scheduler.dispatcher import IDLE_GAP_S
    s = _ours()
    s.release(s.start_alone(req("cheap", 1.0, 0.010)))
    assert s.start_alone(req("cheap", 1.0 + IDLE_GAP_S / 2, 0.010)) is None
    assert s.start_alone(req("cheap", 1.0 + 2 * IDLE_GAP_S, 0.010)) is not None


@pytest.mark.parametrize("batching, alone", [
    ({}, True),                                                  # deadline_aware, no hold: the default
    ({"max_wait_ms": 2.0}, False),
    ({"rule": "dynamic", "max_queue_delay_ms": 0.0}, True),
    ({"rule": "dynamic", "max_queue_delay_ms": 1.0}, False),
    ({"rule": "fixed", "size": 4}, False),
    ({"rule": "fifo", "shed_hopeless": False, "admission": False}, True),
    ({"rule": "aimd"}, False),
])
def test_the_lane_starts_alone_only_under_a_rule_that_dispatches_a_lone_request_at_once(batching, alone):
    from agent.config import BatchingConfig, ModelConfig
    from agent.scheduler.rules import build_lane, build_rule
    config = ModelConfig("m", "demo:mobilenet_digits", batching=BatchingConfig(**batching))
    t = table()
    assert build_lane("m", build_rule(config.batching, t), config, t).starts_alone is alone


# --- the policy seam ------------------------------------------------------------------------------


class _MostQueued:
    """A policy of the test's own: the model with the most queued requests, all of them, on the
    highest free instance; records what it was told."""

    name = "most-queued"

    def __init__(self):
        self.dispatched_calls, self.observed = [], []

    def decide(self, s, now):
        from agent.scheduler.policy import Action
        lanes = [lane for lane in s.lanes.values() if len(lane.queue) and lane.free_instances]
        if not lanes or s.in_flight >= s.max_concurrent:
            return None, math.inf
        lane = max(lanes, key=lambda lane: len(lane.queue))
        return Action(lane.name, len(lane.queue), instance=max(lane.free_instances)), math.inf

    def alone(self, s, lane, request):
        return None

    def dispatched(self, action, n, now):
        self.dispatched_calls.append((action.model, n))

    def observe(self, dispatch, now):
        self.observed.append(dispatch.model)


def test_a_policy_of_its_own_decides_every_dispatch_and_learns_from_it():
    policy = _MostQueued()
    s = Scheduler([Scheduler.lane(name, FixedBatch(4), 2, 64) for name in ("a", "b")], max_concurrent=2, policy=policy)
    s.enqueue(req("a", 0.0, 0.010))          # the earliest deadline: EDF would take it first
    for _ in range(3):
        s.enqueue(req("b", 0.0, 1.0))
    dispatch = s.poll(0.0).dispatch
    assert (dispatch.model, len(dispatch.requests), dispatch.instance) == ("b", 3, 1)
    assert dispatch.action.batch_size == 3 and dispatch.action.target == "local" and dispatch.action.exit is None
    assert policy.dispatched_calls == [("b", 3)]
    assert s.start_alone(req("a", 5.0, 1.0)) is None        # the policy never starts alone
    s.release(dispatch)
    s.observe(dispatch, 0.1)
    assert policy.observed == ["b"] and sorted(s.lanes["b"].free_instances) == [0, 1] and s.in_flight == 0


def test_the_policy_is_chosen_by_name():
    from agent.scheduler.policy import build_policy, policy_names
    assert "rules" in policy_names()
    s = scheduler({"a": FixedBatch(1)})
    assert s.policy.name == "rules" and build_policy("rules", s).name == "rules"
    with pytest.raises(ValueError, match="policy = 'nope'"):
        Scheduler([Scheduler.lane("a", FixedBatch(1), 1, 8)], max_concurrent=1, policy="nope")


# --- lanes added, closed, removed and re-ruled while serving (load-model, unload-model, set-batching) ---

def test_an_added_lane_is_served_at_the_next_poll():
    s = scheduler({"a": FixedBatch(1)})
    s.add_lane(Scheduler.lane("b", FixedBatch(1), 1, 64))
    s.enqueue(req("b", 0.0, 1.0))
    assert s.poll(0.0).dispatch.model == "b"
    with pytest.raises(ValueError, match="has a lane already"):
        s.add_lane(Scheduler.lane("b", FixedBatch(1), 1, 64))


def test_a_closed_lane_refuses_new_requests_serves_its_queue_and_is_removed_only_when_idle():
    from agent.errors import UNKNOWN_MODEL
    s = scheduler({"a": FixedBatch(1), "b": FixedBatch(1)})
    s.enqueue(req("b", 0.0, 1.0))
    s.enqueue(req("b", 0.0, 1.0))
    s.close_lane("b")
    with pytest.raises(InferenceError) as refused:
        s.enqueue(req("b", 0.0, 1.0))
    assert refused.value.code == UNKNOWN_MODEL and "unloaded" in str(refused.value)
    assert s.start_alone(req("b", 5.0, 6.0)) is None
    running = s.poll(0.0).dispatch                      # the queue is still served
    assert running.model == "b"
    with pytest.raises(ValueError, match="nothing queued or running"):
        s.remove_lane("b")
    cancelled = s.cancel_lane("b")                      # what the unload's timeout answers
    assert len(cancelled) == 1 and not s.queued()
    with pytest.raises(ValueError):
        s.remove_lane("b")                              # a batch still holds an instance
    s.release(running)
    s.observe(running, 0.01)
    s.remove_lane("b")
    assert list(s.lanes) == ["a"]
    s.observe(running, 0.02)                            # a late reply's bookkeeping finds no lane: no error
    s.enqueue(req("a", 0.0, 1.0))
    assert s.poll(0.0).dispatch.model == "a"


def test_swap_rule_takes_effect_at_the_next_poll_and_keeps_what_admission_learned():
    from agent.config import BatchingConfig, ModelConfig
    from agent.scheduler.rules import build_lane, build_rule
    t = table()
    config = ModelConfig("m", "demo:m", batching=BatchingConfig(rule="fixed", max_batch=8, size=4))
    s = Scheduler([build_lane("m", build_rule(config.batching, t), config, t)], max_concurrent=1)
    for _ in range(2):
        s.enqueue(req("m", 0.0, 10.0))
    assert s.poll(0.0).dispatch is None                 # fixed 4 waits for four
    dynamic = BatchingConfig(rule="dynamic", max_batch=16, shed_hopeless=False, admission=False)
    s.swap_rule("m", build_lane("m", build_rule(dynamic, t), ModelConfig("m", "demo:m", batching=dynamic), t))
    for _ in range(14):
        s.enqueue(req("m", 0.0, 10.0))
    batch = s.poll(0.0).dispatch
    assert len(batch.requests) == 16                    # the new rule's max_batch, buffers sized for it
    fifo = BatchingConfig(rule="fifo", max_batch=1, shed_hopeless=False, admission=False)
    with pytest.raises(ValueError, match="fifo"):
        s.swap_rule("m", build_lane("m", build_rule(fifo, t), ModelConfig("m", "demo:m", batching=fifo), t))

    admitted = BatchingConfig(rule="deadline_aware", max_batch=8)
    a = Scheduler([build_lane("m", build_rule(admitted, t), ModelConfig("m", "demo:m", batching=admitted), t)],
                  max_concurrent=1)
    learned = a.lanes["m"].admission
    learned.slowdown = 3.0
    smaller = BatchingConfig(rule="deadline_aware", max_batch=2, margin_ms=2.0)
    a.swap_rule("m", build_lane("m", build_rule(smaller, t), ModelConfig("m", "demo:m", batching=smaller), t))
    assert a.lanes["m"].admission is learned and learned.slowdown == 3.0
    assert learned.max_batch == 2 and learned.margin_s == pytest.approx(0.002)


def test_an_action_that_takes_the_latest_pops_the_requests_with_the_most_time_left():
    """``Scheduler.latest`` named in ``Action.requests`` (a batch for a peer): the requests that pop
    last leave, earliest first within the batch; the urgent ones stay queued in deadline order."""
    from agent.scheduler.policy import Action

    class Latest:
        name = "latest"

        def decide(self, scheduler, now):
            lane = scheduler.lanes["m"]
            return Action("m", 2, requests=tuple(r.rid for r in scheduler.latest(lane, 2))), math.inf

        def alone(self, scheduler, lane, request):
            return None

        def dispatched(self, action, n, now):
            pass

        def observe(self, dispatch, now):
            pass

    s = Scheduler([Scheduler.lane("m", FixedBatch(2), 1, 16)], max_concurrent=1, policy=Latest())
    requests = [req("m", 0.0, slo) for slo in (0.5, 0.1, 0.4, 0.2, 0.3)]
    for r in requests:
        s.enqueue(r)
    batch = s.poll(0.0).dispatch
    assert [r.deadline for r in batch.requests] == [0.4, 0.5]
    assert len(s.lanes["m"].queue) == 3 and s.lanes["m"].queue.earliest_deadline() == 0.1
    assert sorted(r.deadline for r in s.lanes["m"].pending.values()) == [0.1, 0.2, 0.3]
