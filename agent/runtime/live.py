"""The live agent's threads: worker threads that drive the scheduler on the monotonic clock.

Each worker is an execution slot. When idle it asks the scheduler for a batch, runs it through the
local executor on its own thread (onnxruntime and LiteRT release the GIL while they compute, so
instances really run at once), answers every request, and asks again: the driver
(``agent.runtime.driver``) does all of that; this module owns the threads, the lock and the waits.
A new request wakes one idle worker. No dispatcher thread sits in between: a submitted request
crosses two thread hand-offs (submitter -> worker -> waiter), a blocking caller's request none
(:meth:`LiveLoop.run_while_pending`), nor an event-loop intake's request on an idle board
(:meth:`LiveLoop.submit` with ``alone``). Timed wake-ups (a rule holding for a bigger batch, a
deadline to expire) are each worker's ``Condition.wait`` timeout, taken from the decision's ``wake_at``.

All times are seconds on the monotonic clock, never wall time: wall time jumps (NTP, a board
without an RTC booting in 1970), deadlines must not.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import threading
from typing import Callable, Mapping

from agent.errors import SHUTTING_DOWN, InferenceError
from agent.runtime.driver import Driver, OnReply
from agent.runtime.executor import Executor
from agent.scheduler.dispatcher import Decision, Dispatch, Scheduler
from agent.scheduler.request import Request

log = logging.getLogger(__name__)

MAX_IDLE_WAIT_S = 1.0


class LiveLoop:
    def __init__(self, scheduler: Scheduler, executors: Executor | Mapping[str, Executor], clock: Callable[[], float], workers: int,
                 served_by: Callable[[Dispatch], dict], on_reply: OnReply | None = None,
                 worker_nice: int = 0) -> None:
        self.scheduler = scheduler
        self.clock = clock
        # ``with self.lock`` (C-level) where nothing waits; ``self.cond`` (the same lock) to wait/notify.
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.driver = Driver(scheduler, executors, clock, lock=self.lock, on_release=self._released,
                             on_reply=on_reply, served_by=served_by)
        self._stopping = False
        # Advanced (under the lock) each time a worker comes round the dispatch loop: an idle wait
        # ended (at most MAX_IDLE_WAIT_S apart while idle) or a batch's slot was freed. The systemd
        # watchdog is fed only while it moves (agent.ops.supervisor): a worker stuck in a backend,
        # or the lock never released, stops it, whatever other threads still run.
        self.heartbeat = 0
        self._worker_nice = worker_nice
        self._threads = [
            threading.Thread(target=self._worker, name=f"edge-agent-worker-{i}", daemon=True) for i in range(workers)
        ]
        # The sender: starts what needs no compute here (requests a policy admitted for a peer,
        # taken by ``submit`` with Scheduler.take_away) the moment they are queued, off the
        # intake's thread. Only for a policy that sends so.
        self._send_cond = threading.Condition(self.lock)
        self._to_send: list[Dispatch] = []
        self._sends = hasattr(scheduler.policy, "away")
        if self._sends:
            self._threads.append(threading.Thread(target=self._sender, name="edge-agent-sender", daemon=True))

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, request: Request, wake_worker: bool = True, alone: bool = False) -> Dispatch | None:
        """Queue a request (raises ``InferenceError`` if refused) and wake one idle worker, unless
        the caller will run it itself (:meth:`run_while_pending`).

        ``alone`` (an event-loop intake, HTTP): on an idle board the request is not queued but
        started here, and returned for the caller to run on its own thread (:meth:`run_alone`): the
        thread that read the request runs it and writes the reply, so it crosses no thread (two
        fewer cross-vCPU wake-ups). Idle means no batch in flight, nothing queued, and no other
        request for a moment (``Scheduler.start_alone``): under load the loop must stay on its
        sockets (a model run there would delay every other connection's requests, unseen by their
        deadlines), so the workers run everything. A request the policy admitted for a peer
        (``Scheduler.take_away``) is sent by the sender thread at once: it needs no compute here,
        and neither the intake's thread nor a busy worker should hold it."""
        with self.lock:
            if self._stopping:
                raise InferenceError(SHUTTING_DOWN, "the agent is shutting down")
            started = self.scheduler.start_alone(request) if alone else None
            if started is None:
                self.scheduler.enqueue(request)
                if self._sends:
                    away = self.scheduler.take_away(self.clock())
                    if away is not None:
                        self._to_send.append(away)
                        self._send_cond.notify()
                if wake_worker:
                    self.cond.notify()
        return started

    def stop(self, grace_s: float) -> None:
        """Stop taking requests, serve what is queued for up to ``grace_s``, answer the rest
        ``shutting_down``, then end the workers. Every accepted request gets its one reply."""
        deadline = self.clock() + grace_s
        with self.cond:
            self._stopping = True
            self._send_cond.notify_all()
            while self.scheduler.queued() and self.clock() < deadline:
                self.cond.wait(timeout=max(0.0, min(0.05, deadline - self.clock())))
            leftover = self.scheduler.drain()
            self.cond.notify_all()
        for request in leftover:
            self.driver.fail(request, InferenceError(SHUTTING_DOWN, "the agent shut down before this request ran"))
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
        self.driver.fill(self._hand_off, until=request.reply.done)

    def run_alone(self, dispatch: Dispatch) -> None:
        """Run a batch that :meth:`submit` started alone, on the calling thread; its reply goes
        before the scheduler's bookkeeping (``Driver.complete_alone``)."""
        self.driver.start(dispatch, self.driver.complete_alone)

    # --- worker --------------------------------------------------------------------------------

    def _worker(self) -> None:
        if self._worker_nice:
            lower_thread_priority(self._worker_nice)
        self.driver.fill(self._wait)

    def _sender(self) -> None:
        while True:
            with self.lock:
                while not self._to_send:
                    if self._stopping:
                        return
                    self._send_cond.wait(MAX_IDLE_WAIT_S)
                batches, self._to_send = self._to_send, []
            for away in batches:
                self.driver.start(away, self.driver.complete)

    def _wait(self, decision: Decision, now: float) -> bool:
        """A worker with nothing to start (the lock held): wait for work or the decision's wake-up;
        False once stopping with nothing queued."""
        if self._stopping and not self.scheduler.queued():
            self.cond.notify_all()
            return False
        timeout = decision.wake_at - now
        self.cond.wait(MAX_IDLE_WAIT_S if math.isinf(timeout) else min(max(timeout, 0.0), MAX_IDLE_WAIT_S))
        self.heartbeat += 1
        return True

    def _hand_off(self, decision: Decision, now: float) -> bool:
        """A blocking caller with nothing to start: a worker takes over the waiting."""
        self.cond.notify()
        return False

    def _released(self) -> None:
        """A batch's slot is free (the lock held): a waiting request gets a worker."""
        self.heartbeat += 1
        if self.scheduler.queued():   # a freed instance matters only to waiting requests
            self.cond.notify()


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
