"""The driver: carries the scheduler's decisions out, the same way live and in the simulator.

Everything between a decision and its replies is written here once:

* **fill** the free slots: ask the scheduler (``Scheduler.poll``) and carry out what it says until
  there is nothing to start, then hand back to the caller's idle step (a live worker waits on its
  condition; the simulator schedules a wake-up event);
* **carry out** a decision: answer what expired or was shed (``deadline_missed``), start the batch on
  the executor with :meth:`Driver.complete` as its ``on_done``;
* **complete** a batch, in this order: release its slot and instance (so a waiting request can take
  them at once; unless the executor released them early, :meth:`Driver.release_early`, when its
  local part was done and the rest went to a peer), answer each request (``ok``; ``deadline_missed`` for one the batch finished after;
  ``internal`` for every request of a failed batch), then let the scheduler learn from the batch's
  whole cost (``Scheduler.observe``: admission and the policy). A batch the scheduler started alone
  on an idle board (:meth:`Driver.complete_alone`) answers first: nothing waits for its slot, and its
  client waits for the reply.

The live agent (``agent.runtime.live``) gives it the monotonic clock, a lock and its executors (the
local backends under the ``local`` target);
the simulator (``agent.sim.engine``) a virtual clock, no lock and the simulated executor, and asks
for terse errors (``explain=False``: it records only the code).
"""
from __future__ import annotations

import contextlib
import logging
from concurrent.futures import InvalidStateError
from typing import Callable, ContextManager, Mapping

from agent.errors import DEADLINE_MISSED, INTERNAL, InferenceError
from agent.runtime.executor import BatchOutcome, Executor
from agent.scheduler.dispatcher import Decision, Dispatch, Scheduler
from agent.scheduler.policy import LOCAL
from agent.scheduler.request import Request, Result

log = logging.getLogger(__name__)

#: ``on_reply(request, result, error)``: told of every reply just before it is set (telemetry).
OnReply = Callable[[Request, Result | None, InferenceError | None], None]

# With explain=False one shared error per reason saves formatting a message per request.
_EXPIRED = InferenceError(DEADLINE_MISSED, "expired (or shed) in the queue")
_LATE = InferenceError(DEADLINE_MISSED, "the batch finished after the deadline")
_NO_SERVED_BY: dict = {}


class Driver:
    """Drives ``scheduler`` on ``clock``, starting each batch on the executor of its action's target
    (``executors``: target -> executor; one executor alone serves ``LOCAL``).

    ``lock`` guards the scheduler where several threads drive it (held around every scheduler call,
    never around a batch's run or a reply); ``on_release``, called with the lock held after a batch's
    slot is freed, lets the caller wake a thread for a waiting request. ``served_by(dispatch)`` says
    where a batch ran, for its replies.
    """

    def __init__(self, scheduler: Scheduler, executors: Executor | Mapping[str, Executor], clock: Callable[[], float], *,
                 lock: ContextManager | None = None, on_release: Callable[[], None] | None = None,
                 on_reply: OnReply | None = None, served_by: Callable[[Dispatch], dict] | None = None,
                 explain: bool = True) -> None:
        self.scheduler = scheduler
        self.executors: dict[str, Executor] = dict(executors) if isinstance(executors, Mapping) else {LOCAL: executors}
        self.clock = clock
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self._on_release = on_release
        self._on_reply = None if on_reply is None else _guarded(on_reply)
        self._served_by = served_by
        self._explain = explain
        self._complete = self.complete      # one bound method, not one per batch

    # --- deciding ------------------------------------------------------------------------------

    def fill(self, idle: Callable[[Decision, float], bool], *, until: Callable[[], bool] | None = None,
             slots: int | None = None) -> None:
        """Poll and carry out until nothing is to be started. Then ``idle(decision, now)`` is called
        with the lock held (the last decision: its ``wake_at``): it may wait for work and return
        True to poll again, or return False to stop. Also stops once ``until()`` holds after a
        decision was carried out, and, with ``slots``, as soon as that many batches are in flight
        (nothing polls while every slot is busy)."""
        scheduler, lock, clock = self.scheduler, self.lock, self.clock
        while True:
            with lock:
                while True:
                    if slots is not None and scheduler.in_flight >= slots:
                        return
                    now = clock()
                    decision = scheduler.poll(now)
                    if decision.dispatch is not None or decision.expired:
                        break
                    if not idle(decision, now):
                        return
            self.carry_out(decision, now)
            if until is not None and until():
                return

    def carry_out(self, decision: Decision, now: float) -> None:
        """Answer what expired, and start the batch (if any) with :meth:`complete` as its callback."""
        for request in decision.expired:
            self.fail(request, self._expired_error(request, now))
        if decision.dispatch is not None:
            self.start(decision.dispatch, self._complete)

    def start(self, dispatch: Dispatch, on_done: Callable[[Dispatch, BatchOutcome], None]) -> None:
        """Start ``dispatch`` on the executor of its action's target. A target without one is a
        policy's mistake: the batch is answered ``internal`` (naming the target), the agent goes on."""
        executor = self.executors.get(dispatch.action.target)
        if executor is None:
            on_done(dispatch, BatchOutcome(None, 0.0, LookupError(
                f"no executor for target {dispatch.action.target!r}; this agent has {sorted(self.executors)}")))
            return
        executor.start(dispatch, on_done)

    def _expired_error(self, request: Request, now: float) -> InferenceError:
        if not self._explain:
            return _EXPIRED
        if request.deadline < now:
            return InferenceError(DEADLINE_MISSED, f"deadline passed after {1000 * (now - request.arrival):.1f} ms in the queue")
        return InferenceError(DEADLINE_MISSED, (
            f"shed: {1000 * (request.deadline - now):.2f} ms left, less than this model's fastest run, "
            f"after {1000 * (now - request.arrival):.1f} ms in the queue"))

    # --- completing ----------------------------------------------------------------------------

    def release_early(self, dispatch: Dispatch) -> None:
        """The executor's local part of ``dispatch`` is done (the offload executor: head run and
        tensor sent): free its slot and instance now, so the next batch starts while this one's
        rest runs elsewhere. Its ``on_done`` comes later and answers and learns without releasing
        again. At most once per batch; before ``on_done``.

        The idle board's path stays shut ``IDLE_GAP_S`` from here, as after a batch started alone
        (``Scheduler.alone_ended``): the local part may have run on an intake's thread (a batch
        started alone, sent on), and the requests that arrived meanwhile, read just after and
        stamped then, must not each start alone in turn, one head at a time on the intake's
        thread while the workers sit idle and the sockets fill (seen in ``bench offload``: fixed
        split rows answered seconds late from the client's side, 42 ms from the agent's).
        ``complete_alone`` of such a batch comes only with the peer's reply, too late for that."""
        if dispatch.released:
            raise RuntimeError(f"batch of {dispatch.model} instance {dispatch.instance} released twice")
        now = self.clock()
        self._release(dispatch, local_part_ended=True)
        dispatch.released_at = now

    def complete(self, dispatch: Dispatch, outcome: BatchOutcome) -> None:
        """A batch is done (an executor's ``on_done``): release (unless released early), answer, learn."""
        if not dispatch.released:
            self._release(dispatch)
        self._answer(dispatch, outcome)
        # Outside the lock: one float updated per batch; a lost update between two workers only
        # delays the estimate by a batch.
        self.scheduler.observe(dispatch, self.clock())

    def complete_alone(self, dispatch: Dispatch, outcome: BatchOutcome) -> None:
        """A batch ``Scheduler.start_alone`` started is done: its reply goes first (an intake's
        callback sends it from inside ``set_result``), then the slot is freed, the reply counted and
        the request's admission learned (``Scheduler.learn_admitted``), then the batch's cost."""
        answered = self._answer(dispatch, outcome, record=False)
        if dispatch.released:
            with self.lock:
                self.scheduler.learn_admitted(dispatch.requests[0])
        else:
            self._release(dispatch, started_alone=dispatch.requests[0])
        if self._on_reply is not None:
            for request, result in answered:
                self._on_reply(request, result, None)
        self.scheduler.observe(dispatch, self.clock())

    def _release(self, dispatch: Dispatch, started_alone: Request | None = None,
                 local_part_ended: bool = False) -> None:
        with self.lock:
            now = self.clock()
            self.scheduler.release(dispatch, now)
            if started_alone is not None:
                self.scheduler.learn_admitted(started_alone)
            if started_alone is not None or local_part_ended:
                self.scheduler.alone_ended(now)
            if self._on_release is not None:
                self._on_release()

    def _answer(self, dispatch: Dispatch, outcome: BatchOutcome, record: bool = True) -> list[tuple[Request, Result]]:
        """Answer the batch's requests; returns those answered with a result. ``record``: report each
        to ``on_reply`` before its reply is set (else the caller reports them afterwards)."""
        now = self.clock()
        answered_early = dispatch.answered
        if outcome.error is not None:
            log.error("model %s instance %d failed a batch of %d: %r", dispatch.model, dispatch.instance,
                      len(dispatch.requests), outcome.error)
            error = InferenceError(INTERNAL, f"backend failed: {type(outcome.error).__name__}: {outcome.error}")
            for i, request in enumerate(dispatch.requests):
                if answered_early is None or i not in answered_early:
                    self.fail(request, error)
            return []
        compute_ms = 1000.0 * outcome.compute_s
        served_by = (outcome.served_by if outcome.served_by is not None
                     else self._served_by(dispatch) if self._served_by is not None else _NO_SERVED_BY)
        on_reply = self._on_reply if record else None
        answered = []
        item_errors = outcome.item_errors
        for i, (request, outputs) in enumerate(zip(dispatch.requests, outcome.outputs)):
            if answered_early is not None and i in answered_early:
                continue
            if item_errors is not None and item_errors[i] is not None:
                self.fail(request, item_errors[i])
                continue
            result = self._answer_one(dispatch, request, outputs, now, compute_ms, served_by, on_reply,
                                      "", f" computed in {compute_ms:.1f} ms")
            if result is not None:
                answered.append((request, result))
        return answered

    def _answer_one(self, dispatch: Dispatch, request: Request, outputs, now: float, compute_ms: float,
                    served_by: dict, on_reply: OnReply | None, at: str, computed: str) -> Result | None:
        """One request of a batch done at ``now``: ``deadline_missed`` past its deadline (the reason
        says where, ``at``, and ``computed``), else its result; returns the result (None: missed)."""
        batch_size = len(dispatch.requests)
        if now > request.deadline:
            self.fail(request, InferenceError(DEADLINE_MISSED, (
                f"finished {1000 * (now - request.deadline):.1f} ms after its deadline{at} "
                f"(queued {1000 * (dispatch.started - request.arrival):.1f} ms, batch of {batch_size}"
                f"{computed})")) if self._explain else _LATE)
            return None
        result = Result(outputs=outputs, queue_ms=1000.0 * (dispatch.started - request.arrival),
                        compute_ms=compute_ms, total_ms=1000.0 * (now - request.arrival),
                        batch_size=batch_size, served_by=served_by)
        if on_reply is not None:
            on_reply(request, result, None)
        _deliver(request.reply.set_result, result)
        return result

    def answer_part(self, dispatch: Dispatch, items: list[tuple[int, dict]], compute_s: float,
                    extra: dict | None = None) -> None:
        """Answer some of a running batch's requests now, before the batch ends (a multi-exit model's
        items leaving at an early exit, ``agent.runtime.staged``): ``items`` are (index in the batch,
        outputs), ``compute_s`` the batch's compute so far, ``extra`` added to the batch's
        ``served_by`` (the exit). Each is answered as :meth:`complete` would (``deadline_missed`` past
        its deadline) and skipped there. Called by the executor on the batch's thread, no lock held."""
        answered = dispatch.answered
        if answered is None:
            answered = dispatch.answered = set()
        now = self.clock()
        compute_ms = 1000.0 * compute_s
        served_by = self._served_by(dispatch) if self._served_by is not None else _NO_SERVED_BY
        if extra:
            served_by = {**served_by, **extra}
        at = f" at exit {(extra or {}).get('exit')!r}"
        for i, outputs in items:
            if i in answered:
                raise RuntimeError(f"request {i} of a batch of {dispatch.model} answered twice")
            answered.add(i)
            self._answer_one(dispatch, dispatch.requests[i], outputs, now, compute_ms, served_by, self._on_reply,
                             at, "")

    def hand_on(self, dispatch: Dispatch, lane: str, indexes, features: Mapping[str, object]) -> None:
        """Hand some of a running batch's requests on to the lane ``lane`` (a multi-exit model's
        next stage, its survivors re-batched: ``agent.runtime.staged``): ``indexes`` in the batch,
        ``features`` their rows, in that order, the next stage's inputs. Each goes on as a request of
        that lane with the same id, deadline and reply; this batch does not answer it. One the lane
        refuses (a full queue, a model being unloaded) is answered with the refusal. Called by the
        executor on the batch's thread, no lock held."""
        answered = dispatch.answered
        if answered is None:
            answered = dispatch.answered = set()
        refused = []
        with self.lock:
            for j, i in enumerate(indexes):
                i = int(i)
                if i in answered:
                    raise RuntimeError(f"request {i} of a batch of {dispatch.model} handed on after its answer")
                answered.add(i)
                r = dispatch.requests[i]
                survivor = Request(r.rid, lane, {name: rows[j:j + 1] for name, rows in features.items()}, r.arrival,
                                   r.deadline, r.priority, r.reply, r.client_id, r.min_accuracy, r.exit)
                try:
                    self.scheduler.enqueue(survivor)
                except InferenceError as exc:
                    refused.append((survivor, exc))
            if self._on_release is not None:
                self._on_release()      # wakes a worker for the waiting survivors
        for survivor, exc in refused:
            self.fail(survivor, exc)

    def fail(self, request: Request, error: InferenceError) -> None:
        """Answer ``request`` with ``error``."""
        if self._on_reply is not None:
            self._on_reply(request, None, error)
        _deliver(request.reply.set_exception, error)


def _guarded(on_reply: OnReply) -> OnReply:
    """``on_reply``, never raising: what it records (telemetry) must not cost a request its reply,
    nor a worker its thread. A failure is logged with its traceback once a minute at most."""
    from agent.telemetry import RateLimitedLog
    say = RateLimitedLog(log, 60.0)

    def report(request: Request, result: Result | None, error: InferenceError | None) -> None:
        try:
            on_reply(request, result, error)
        except Exception:
            say(logging.ERROR, "recording the reply to request %s of %s failed (the reply is still sent)",
                request.rid, request.model, exc_info=True)
    return report


def _deliver(setter, value) -> None:
    """Set a reply, tolerating a caller that cancelled its future: the worker must survive that."""
    try:
        setter(value)
    except InvalidStateError:
        log.debug("reply to a cancelled future dropped")
