"""The live driver: worker threads that run the scheduler on the monotonic clock.

Each worker is an execution slot. When idle it asks the scheduler for a batch, runs it through the
executor on its own thread (onnxruntime and LiteRT release the GIL while they compute, so instances
really run at once), answers every request, and asks again. A new request wakes one idle worker.
No dispatcher thread sits in between: a submitted request crosses two thread hand-offs (submitter
-> worker -> waiter), a blocking caller's request none (:meth:`LiveLoop.run_while_pending`), nor
an event-loop intake's request on an idle board (:meth:`LiveLoop.submit` with ``alone``).
Timed wake-ups (a rule holding for a bigger batch, a deadline to expire) are each worker's
``Condition.wait`` timeout, taken from the scheduler's ``wake_at``.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import threading
from concurrent.futures import InvalidStateError
from typing import Callable

from agent.errors import DEADLINE_MISSED, INTERNAL, SHUTTING_DOWN, InferenceError
from agent.scheduler.dispatcher import Decision, Dispatch, Scheduler
from agent.scheduler.executor import BatchOutcome, Executor
from agent.scheduler.request import Request, Result

log = logging.getLogger(__name__)

MAX_IDLE_WAIT_S = 1.0
# submit(alone=True): no other request for this long means the board is idle (a loaded board's requests
# arrive closer together than one batch of the cheapest model takes).
IDLE_GAP_S = 0.002


class LiveLoop:
    def __init__(self, scheduler: Scheduler, executor: Executor, clock: Callable[[], float], workers: int,
                 served_by: Callable[[Dispatch], dict], on_reply: Callable[[Request, Result | None, InferenceError | None], None] | None = None,
                 worker_nice: int = 0) -> None:
        self.scheduler = scheduler
        self.executor = executor
        self.clock = clock
        # ``with self.lock`` (C-level) where nothing waits; ``self.cond`` (the same lock) to wait/notify.
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self._served_by = served_by
        self._on_reply = on_reply
        self._stopping = False
        self._worker_nice = worker_nice
        self._last_arrival = -math.inf
        self._threads = [
            threading.Thread(target=self._worker, name=f"edge-agent-worker-{i}", daemon=True) for i in range(workers)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, request: Request, wake_worker: bool = True, alone: bool = False) -> Dispatch | None:
        """Queue a request (raises ``InferenceError`` if refused) and wake one idle worker, unless
        the caller will run it itself (:meth:`run_while_pending`).

        ``alone`` (an event-loop intake, HTTP): on an idle board the request is not queued but
        started here, and returned for the caller to run on its own thread (:meth:`run_alone`): the
        thread that read the request runs it and writes the reply, so it crosses no thread (two
        fewer cross-vCPU wake-ups, about 0.15 ms here). Idle means no batch in flight, nothing
        queued, and no other request for ``IDLE_GAP_S`` (``Scheduler.start_alone`` has the rest):
        under load the loop must stay on its sockets (a model run there would delay every other
        connection's requests, unseen by their deadlines), so the workers run everything."""
        with self.lock:
            if self._stopping:
                raise InferenceError(SHUTTING_DOWN, "the agent is shutting down")
            started = None
            if alone and request.arrival - self._last_arrival >= IDLE_GAP_S:
                started = self.scheduler.start_alone(request)
            if started is None:
                self.scheduler.enqueue(request)
                if wake_worker:
                    self.cond.notify()
            self._last_arrival = request.arrival
        return started

    def stop(self, grace_s: float) -> None:
        """Stop taking requests, serve what is queued for up to ``grace_s``, answer the rest
        ``shutting_down``, then end the workers. Every accepted request gets its one reply."""
        deadline = self.clock() + grace_s
        with self.cond:
            self._stopping = True
            while self.scheduler.queued() and self.clock() < deadline:
                self.cond.wait(timeout=max(0.0, min(0.05, deadline - self.clock())))
            leftover = self.scheduler.drain()
            self.cond.notify_all()
        for request in leftover:
            self._fail(request, InferenceError(SHUTTING_DOWN, "the agent shut down before this request ran"))
        for thread in self._threads:
            thread.join(timeout=10.0)

    def run_while_pending(self, request: Request) -> None:
        """While a queued request's reply is pending, run batches on the calling thread.

        For a caller about to block on the reply anyway (``Agent.infer``): the thread that would
        sleep does the work, so on an idle agent the request crosses no thread at all (on a VM each
        cross-vCPU wake-up costs tens of microseconds). The caller takes an execution slot like any
        worker and runs whatever the scheduler picks, its own request or a more urgent one. When
        nothing may run now (a rule holds for a bigger batch, every slot is busy) it hands the
        timing to a worker and waits for its reply.
        """
        scheduler, lock, clock = self.scheduler, self.lock, self.clock
        reply = request.reply
        while True:
            with lock:
                now = clock()
                decision = scheduler.poll(now)
                if decision.dispatch is None and not decision.expired:
                    self.cond.notify()
                    return
            self._carry_out(decision, now)
            if reply.done():
                return

    def run_alone(self, dispatch: Dispatch) -> None:
        """Run a batch that :meth:`submit` started alone, on the calling thread.

        Its reply goes first: an intake's callback sends it from inside ``set_result``, before the
        slot is freed, the reply counted and the scheduler's state updated (on an idle board no
        other request waits for the slot, and the client waits for the reply)."""
        outcome = self.executor.run(dispatch)
        answered = self._complete(dispatch, outcome, record=False)
        self._free(dispatch, started_alone=dispatch.requests[0])
        if self._on_reply is not None:
            for request, result in answered:
                self._on_reply(request, result, None)
        self.scheduler.observe(dispatch, self.clock())

    # --- worker --------------------------------------------------------------------------------

    def _worker(self) -> None:
        if self._worker_nice:
            lower_thread_priority(self._worker_nice)
        scheduler, cond, clock = self.scheduler, self.cond, self.clock
        while True:
            with cond:
                while True:
                    now = clock()
                    decision = scheduler.poll(now)
                    if decision.dispatch is not None or decision.expired:
                        break
                    if self._stopping and not scheduler.queued():
                        cond.notify_all()
                        return
                    timeout = decision.wake_at - now
                    cond.wait(MAX_IDLE_WAIT_S if math.isinf(timeout) else min(max(timeout, 0.0), MAX_IDLE_WAIT_S))
            self._carry_out(decision, now)

    def _carry_out(self, decision: Decision, now: float) -> None:
        """Answer what expired, run the batch (if any), free its slot, answer its requests."""
        for request in decision.expired:
            if request.deadline < now:
                message = f"deadline passed after {1000 * (now - request.arrival):.1f} ms in the queue"
            else:
                message = (f"shed: {1000 * (request.deadline - now):.2f} ms left, less than this model's "
                           f"fastest run, after {1000 * (now - request.arrival):.1f} ms in the queue")
            self._fail(request, InferenceError(DEADLINE_MISSED, message))
        dispatch = decision.dispatch
        if dispatch is None:
            return
        outcome = self.executor.run(dispatch)
        self._free(dispatch)
        self._complete(dispatch, outcome)
        # Outside the lock: one float updated per batch; a lost update between two workers only
        # delays the estimate by a batch.
        self.scheduler.observe(dispatch, self.clock())

    def _free(self, dispatch: Dispatch, started_alone: Request | None = None) -> None:
        """The batch's slot is free again (and what the scheduler keeps from a request it started
        alone is recorded); a waiting request gets a worker."""
        with self.lock:
            self.scheduler.finish(dispatch)
            if started_alone is not None:
                self.scheduler.learn_admitted(started_alone)
            if self.scheduler.queued():   # a freed instance matters only to waiting requests
                self.cond.notify()

    def _complete(self, dispatch: Dispatch, outcome: BatchOutcome, record: bool = True) -> list[tuple[Request, Result]]:
        """Answer the batch's requests; returns those answered with a result. ``record``: report each
        to ``on_reply`` before its reply is set (else the caller reports them afterwards)."""
        now = self.clock()
        if outcome.error is not None:
            log.error("model %s instance %d failed a batch of %d: %r", dispatch.model, dispatch.instance,
                      len(dispatch.requests), outcome.error)
            error = InferenceError(INTERNAL, f"backend failed: {type(outcome.error).__name__}: {outcome.error}")
            for request in dispatch.requests:
                self._fail(request, error)
            return []
        batch_size = len(dispatch.requests)
        compute_ms = 1000.0 * outcome.compute_s
        served_by = self._served_by(dispatch)
        on_reply = self._on_reply if record else None
        answered = []
        for request, outputs in zip(dispatch.requests, outcome.outputs):
            if now > request.deadline:
                self._fail(request, InferenceError(DEADLINE_MISSED, (
                    f"finished {1000 * (now - request.deadline):.1f} ms after its deadline "
                    f"(queued {1000 * (dispatch.started - request.arrival):.1f} ms, batch of {batch_size} "
                    f"computed in {compute_ms:.1f} ms)")))
                continue
            result = Result(
                outputs=outputs,
                queue_ms=1000.0 * (dispatch.started - request.arrival),
                compute_ms=compute_ms,
                total_ms=1000.0 * (now - request.arrival),
                batch_size=batch_size,
                served_by=served_by,
            )
            if on_reply is not None:
                on_reply(request, result, None)
            _deliver(request.reply.set_result, result)
            answered.append((request, result))
        return answered

    def _fail(self, request: Request, error: InferenceError) -> None:
        if self._on_reply is not None:
            self._on_reply(request, None, error)
        _deliver(request.reply.set_exception, error)


def lower_thread_priority(nice: int) -> bool:
    """Add ``nice`` to the calling thread's nice value; whether it could (Linux only).

    The workers run the models; the intake's event loop thread reads and admits requests, and the
    board's applications send them. On a board with as many workers as cores, every core is busy
    computing under load, and a request waits for the loop until the kernel takes a core from a
    worker: its arrival is stamped late (the agent's clock starts at admission), so a reply the
    agent sends in time reaches its application late. A higher nice value lets the loop (and the
    applications) preempt model compute at once. On Linux a thread is a task with its own nice
    value; elsewhere ``setpriority`` would renice the whole process, so it is left alone."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError as exc:
        log.warning("could not lower the priority of worker thread %s: %s", threading.current_thread().name, exc)
        return False
    return True


def _deliver(setter, value) -> None:
    """Set a reply, tolerating a caller that cancelled its future: the worker must survive that."""
    try:
        setter(value)
    except InvalidStateError:
        log.debug("reply to a cancelled future dropped")
