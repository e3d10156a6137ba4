"""The one driver (agent.runtime.driver): the order of a batch's completion, answering expired and
late requests, and executors that call back later (as an offload executor will) without holding a
worker thread while their batch is out."""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest

from agent.core import FixedBatch
from agent.errors import DEADLINE_MISSED, InferenceError
from agent.runtime.driver import Driver
from agent.runtime.executor import BatchOutcome
from agent.runtime.live import LiveLoop
from agent.scheduler.dispatcher import Scheduler
from agent.scheduler.request import Request
from tests.scheduling import req


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Recording:
    """An executor that keeps what it was given, to complete it when the test says."""

    def __init__(self) -> None:
        self.started = []

    def start(self, dispatch, on_done) -> None:
        self.started.append((dispatch, on_done))


def test_a_batch_is_released_then_answered_then_learned_from():
    clock = Clock()
    scheduler = Scheduler([Scheduler.lane("m", FixedBatch(1), 1, 8)], max_concurrent=1)
    events = []
    release, observe = scheduler.release, scheduler.observe
    scheduler.release = lambda d, now=None: (events.append("release"), release(d, now))
    scheduler.observe = lambda d, now: (events.append("observe"), observe(d, now))
    executor = Recording()
    driver = Driver(scheduler, executor, clock, on_reply=lambda r, result, error: events.append("reply"))
    on_time, late = req("m", 0.0, 0.010), req("m", 0.0, 0.020)
    for request in (on_time, late):
        scheduler.enqueue(request)
    driver.fill(lambda decision, now: False, slots=1)
    (dispatch, on_done), = executor.started
    assert dispatch.requests == [on_time] and dispatch.action.model == "m"
    clock.now = 0.008
    on_done(dispatch, BatchOutcome([{"y": np.zeros(1)}], 0.008))
    assert events == ["release", "reply", "observe"]
    assert on_time.reply.value.outputs["y"].shape == (1,) and on_time.reply.value.queue_ms == 0.0
    # The other request expires before the next fill: it answers it, naming why.
    clock.now = 0.5
    driver.fill(lambda decision, now: False, slots=1)
    assert isinstance(late.reply.value, InferenceError) and late.reply.value.code == DEADLINE_MISSED
    assert "deadline passed" in late.reply.value.message and scheduler.in_flight == 0


def test_a_batch_that_finishes_past_a_deadline_or_fails_is_answered_with_an_error_each():
    clock = Clock()
    scheduler = Scheduler([Scheduler.lane("m", FixedBatch(2), 1, 8)], max_concurrent=1)
    executor = Recording()
    driver = Driver(scheduler, executor, clock)
    loose, tight = req("m", 0.0, 1.0), req("m", 0.0, 0.100)
    scheduler.enqueue(loose)
    scheduler.enqueue(tight)
    driver.fill(lambda decision, now: False)
    (dispatch, on_done), = executor.started
    clock.now = 0.2
    on_done(dispatch, BatchOutcome([{}, {}], 0.2))
    assert loose.reply.value.batch_size == 2
    assert tight.reply.value.code == DEADLINE_MISSED and "after its deadline" in tight.reply.value.message
    broken = [req("m", 0.3, 1.0), req("m", 0.3, 1.0)]
    for request in broken:
        scheduler.enqueue(request)
    clock.now = 0.3
    driver.fill(lambda decision, now: False)
    dispatch, on_done = executor.started[-1]
    on_done(dispatch, BatchOutcome(None, 0.0, RuntimeError("device lost")))
    assert [r.reply.value.code for r in broken] == ["internal", "internal"]
    assert "device lost" in broken[0].reply.value.message and scheduler.in_flight == 0


class Later:
    """An executor that answers from another thread after ``delay_s``, as a peer's reply would."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.threads = set()
        self.out = self.peak = 0
        self.lock = threading.Lock()

    def start(self, dispatch, on_done) -> None:
        self.threads.add(threading.current_thread().name)
        with self.lock:
            self.out += 1
            self.peak = max(self.peak, self.out)
        outcome = BatchOutcome([{"x": r.inputs["x"]} for r in dispatch.requests], self.delay_s)
        threading.Timer(self.delay_s, self._done, (on_done, dispatch, outcome)).start()

    def _done(self, on_done, dispatch, outcome) -> None:
        with self.lock:
            self.out -= 1
        on_done(dispatch, outcome)


def test_an_executor_that_calls_back_later_holds_no_worker_thread():
    """One worker thread, two slots: batches of an asynchronous executor overlap, every request is
    answered once with its own output, and the slots are free again at the end."""
    scheduler = Scheduler([Scheduler.lane("m", FixedBatch(1), 2, 64)], max_concurrent=2)
    executor = Later(0.2)
    loop = LiveLoop(scheduler, executor, time.monotonic, workers=1, served_by=lambda d: {"device": "test"})
    loop.start()
    futures = []
    for i in range(4):
        future: Future = Future()
        now = time.monotonic()
        loop.submit(Request(i + 1, "m", {"x": np.full(1, i)}, now, now + 10.0, 0, future))
        futures.append(future)
    results = [future.result(timeout=5) for future in futures]
    loop.stop(1.0)
    assert [int(r.outputs["x"][0]) for r in results] == [0, 1, 2, 3]
    assert executor.threads == {"edge-agent-worker-0"}
    assert executor.peak == 2          # both slots busy at once on one thread; never more than the slots
    assert scheduler.in_flight == 0 and not scheduler.queued()


def test_each_batch_starts_on_the_executor_of_its_target_and_a_target_without_one_is_answered():
    from agent.scheduler.policy import Action

    class Peer:
        """A policy that sends every batch to a target it names."""
        name = "to-target"

        def __init__(self, target):
            self.target = target

        def decide(self, s, now):
            lane = s.lanes["m"]
            if len(lane.queue) and lane.free_instances and s.in_flight < s.max_concurrent:
                return Action("m", 1, target=self.target), float("inf")
            return None, float("inf")

        def alone(self, s, lane, request):
            return None

        def dispatched(self, action, n, now):
            pass

        def observe(self, dispatch, now):
            pass

    clock = Clock()
    local, peer = Recording(), Recording()
    for target, expected in (("peer-1", peer), ("local", local)):
        scheduler = Scheduler([Scheduler.lane("m", FixedBatch(1), 1, 8)], max_concurrent=1, policy=Peer(target))
        driver = Driver(scheduler, {"local": local, "peer-1": peer}, clock)
        scheduler.enqueue(req("m", 0.0, 1.0))
        driver.fill(lambda decision, now: False)
        assert expected.started[-1][0].action.target == target
    scheduler = Scheduler([Scheduler.lane("m", FixedBatch(1), 1, 8)], max_concurrent=1, policy=Peer("peer-9"))
    driver = Driver(scheduler, {"local": local}, clock)
    lost = req("m", 0.0, 1.0)
    scheduler.enqueue(lost)
    driver.fill(lambda decision, now: False)
    assert lost.reply.value.code == "internal" and "peer-9" in lost.reply.value.message
    assert scheduler.in_flight == 0


def test_a_failing_reply_recorder_costs_no_reply(caplog):
    """What records replies (telemetry) may fail; the request is answered all the same, and the
    failure is logged, not raised into the worker."""
    clock = Clock()
    scheduler = Scheduler([Scheduler.lane("m", FixedBatch(1), 1, 8)], max_concurrent=1)
    executor = Recording()

    def broken(request, result, error):
        raise OverflowError("cannot convert float infinity to integer")
    driver = Driver(scheduler, executor, clock, on_reply=broken)
    served, failed = req("m", 0.0, 0.010), req("m", 0.0, 0.010)
    scheduler.enqueue(served)
    driver.fill(lambda decision, now: False, slots=1)
    (dispatch, on_done), = executor.started
    on_done(dispatch, BatchOutcome([{"y": np.zeros(1)}], 0.001))
    driver.fail(failed, InferenceError(DEADLINE_MISSED, "late"))
    assert served.reply.value.outputs["y"].shape == (1,)
    assert isinstance(failed.reply.value, InferenceError) and failed.reply.value.code == DEADLINE_MISSED
    assert "recording the reply" in caplog.text and "OverflowError" in caplog.text


def test_release_early_frees_the_slot_for_the_next_batch_and_completion_does_not_release_again():
    """The offload executor's contract (pipelining): the local part done, the slot is free while
    the rest is out; the batch is answered and learned from later, released once."""
    from agent.core import LatencyTable
    from agent.scheduler.admission import AdmissionControl
    from agent.scheduler.policy import Action
    clock = Clock()
    table = LatencyTable(np.array([1]), np.array([0.010]))
    lane = Scheduler.lane("m", FixedBatch(1), 1, 8, admission=AdmissionControl(table, 1, 0.0))
    scheduler = Scheduler([lane], max_concurrent=1)
    releases = []
    release = scheduler.release
    scheduler.release = lambda d, now=None: (releases.append(d), release(d, now))
    peer = Recording()
    driver = Driver(scheduler, {"local": Recording(), "board-b": peer}, clock)
    first, second = req("m", 0.0, 1.0), req("m", 0.0, 1.0)
    scheduler.enqueue(first)
    scheduler.enqueue(second)
    decision = scheduler.poll(0.0)
    decision.dispatch.action = Action("m", 1, target="board-b")
    driver.carry_out(decision, 0.0)
    (out, on_done), = peer.started
    assert scheduler.in_flight == 1 and not scheduler.poll(0.0).dispatch     # the slot is held ...
    clock.now = 0.002                                                         # the head ran 2 ms here
    driver.release_early(out)
    assert out.released and scheduler.in_flight == 0 and releases == [out]   # ... until the head is done
    nxt = scheduler.poll(0.001).dispatch
    assert nxt is not None and nxt.requests == [second]                      # the next batch starts at once
    with pytest.raises(RuntimeError, match="released twice"):
        driver.release_early(out)
    slowdown = lane.admission.slowdown
    clock.now = 0.5                                                           # the peer's reply, much later
    on_done(out, BatchOutcome([{"y": np.ones(1)}], 0.004, served_by={"device": "board-b", "split": "s"}))
    assert releases == [out] and scheduler.in_flight == 1                     # not released twice
    assert first.reply.value.served_by == {"device": "board-b", "split": "s"}
    # Admission learns the 2 ms the batch held its slot (a profiled 10 ms batch: faster than the
    # profile), not the 500 ms round trip elsewhere: the queue drains as fast as the slots do.
    assert out.released_at == 0.002 and lane.admission.slowdown < slowdown


def test_item_errors_answer_their_requests_and_the_rest_get_outputs():
    clock = Clock()
    scheduler = Scheduler([Scheduler.lane("m", FixedBatch(3), 1, 8)], max_concurrent=1)
    executor = Recording()
    driver = Driver(scheduler, executor, clock)
    requests = [req("m", 0.0, 1.0) for _ in range(3)]
    for request in requests:
        scheduler.enqueue(request)
    driver.fill(lambda decision, now: False)
    (dispatch, on_done), = executor.started
    refused = InferenceError("rejected", "peer: queue too long")
    on_done(dispatch, BatchOutcome([{"y": np.zeros(1)}, None, {"y": np.ones(1)}], 0.001,
                                   item_errors=[None, refused, None]))
    assert requests[0].reply.value.outputs["y"][0] == 0 and requests[2].reply.value.outputs["y"][0] == 1
    assert requests[1].reply.value is refused and scheduler.in_flight == 0


def test_a_request_read_just_after_a_batch_run_alone_is_queued_not_run_alone_again():
    """The intake's thread ran a batch alone (an idle board's request); a request it reads just
    after (it arrived meanwhile, unread) goes to the queue and a worker, not to the intake's thread
    again: else under load every request ran alone in turn, seconds late, with the workers idle and
    nothing refused. After a quiet ``IDLE_GAP_S`` the path is open again."""
    from agent.scheduler.dispatcher import IDLE_GAP_S

    class Immediate:
        def start(self, dispatch, on_done):
            clock.now += 0.004                       # the model runs 4 ms on the calling thread
            on_done(dispatch, BatchOutcome([{"x": r.inputs.get("x")} for r in dispatch.requests], 0.004))

    clock = Clock()
    scheduler = Scheduler([Scheduler.lane("m", FixedBatch(1), 1, 8, starts_alone=True)], max_concurrent=1)
    driver = Driver(scheduler, Immediate(), clock)
    first = req("m", 0.0, 1.0)
    started = scheduler.start_alone(first)
    assert started is not None
    driver.start(started, driver.complete_alone)
    assert clock.now == 0.004 and first.reply.value is not None
    clock.now += 0.0001
    second = req("m", clock.now, 1.0)                # read right after the run: it waited in the socket
    assert scheduler.start_alone(second) is None
    clock.now += IDLE_GAP_S + 0.001
    third = req("m", clock.now, 1.0)
    assert scheduler.start_alone(third) is not None


def test_a_request_read_just_after_a_batch_run_alone_and_sent_on_is_queued_not_run_alone_again():
    """The same, for a batch run alone whose local part (a head) ends on the intake's thread and
    whose rest goes to a peer (released early, answered much later): the path stays shut from the
    release, not from the peer's reply, else every request read after a head ran alone in turn on
    the intake's thread (bench offload's fixed-split rows: seconds late, nothing refused)."""
    from agent.scheduler.dispatcher import IDLE_GAP_S

    sent: list = []

    class HeadHereRestAway:
        def start(self, dispatch, on_done):
            clock.now += 0.004                       # the head runs 4 ms on the calling thread
            driver.release_early(dispatch)           # tensor sent: the slot is free
            sent.append((dispatch, on_done))         # the peer answers later

    clock = Clock()
    scheduler = Scheduler([Scheduler.lane("m", FixedBatch(1), 1, 8, starts_alone=True)], max_concurrent=1)
    driver = Driver(scheduler, HeadHereRestAway(), clock)
    first = req("m", 0.0, 1.0)
    started = scheduler.start_alone(first)
    assert started is not None
    driver.start(started, driver.complete_alone)
    assert scheduler.in_flight == 0 and first.reply.value is None     # released, not answered yet
    clock.now += 0.0001
    second = req("m", clock.now, 1.0)                # read right after the head: it waited in the socket
    assert scheduler.start_alone(second) is None
    clock.now += IDLE_GAP_S + 0.001
    third = req("m", clock.now, 1.0)
    assert scheduler.start_alone(third) is not None
    dispatch, on_done = sent[0]
    on_done(dispatch, BatchOutcome([{"x": np.zeros(1)}], 0.004))
    assert first.reply.value is not None
