"""The scheduler: per-model deadline queues, and the decision, each time an execution slot frees,
of which model runs next and how big a batch it takes.

It is a passive state machine with no threads and no clock of its own: a driver calls
:meth:`Scheduler.enqueue` when a request arrives, :meth:`Scheduler.poll` when it has a free slot,
and :meth:`Scheduler.release` when a batch is done (``agent.runtime.driver``). The live agent drives
it from worker threads on the monotonic clock (``agent.runtime.live``); the simulator drives the very
same object on a virtual clock. That is how policies trained or compared in simulation are the code that runs on the board.

Across models the choice is earliest-deadline-first on each queue's head (higher priority first), among
models whose rule says "dispatch now" and that have an idle instance.

A batch cannot be preempted: while it runs, its slot is closed to a tight request waiting behind
it. So lanes under admission control (ours) cap their batches by a *hold bound* (:func:`hold_cap`)
while an urgent request waits: when any of their queues holds a request due within the tightest
SLO seen in the last ``TIGHT_WINDOW_S``, a batch holds its slot for at most ``hold_fraction`` of
that SLO, unless batching pays for itself on this board (a batch of ``b`` at most half the cost of
``b`` runs of one, as on a GPU). With nothing urgent queued, batches take what the rule allows and
drain a backlog of loose requests at full efficiency. On the 2-core CPU of BENCHMARKS.md a batch
costs about as much as its requests run one by one, so batching buys little there and a long batch
only keeps a tight request out: the cap raised the tightest class's share of requests in time.
Capping always, not only while something urgent waits, left the loosest class waiting behind tight
ones after every burst, with a much longer tail (BENCHMARKS.md, "Figures that were in docstrings").

EDF horizon (ours). EDF lets the loosest requests wait as long as their deadlines allow, and in a
burst that is the whole burst: every tighter request that arrives meanwhile pops first. They are
still served in time, but they make the tail: in ``bench triton`` at 0.5x load the slowest replies
were all of resnet's loosest class, waiting out one burst, which put the agent's p99 above Triton's
(BENCHMARKS.md, "Side by side with a real Triton": "p99 at 0.5x was one burst"). So a
request is queued by ``min(deadline, arrival + edf_horizon_s)`` (:meth:`Scheduler.queue_key`): EDF
among requests whose SLOs are within the horizon, arrival order past it, so a tighter request that
arrives more than ``horizon - its SLO`` later no longer overtakes a loose one. It still expires by
its own deadline (the queue keeps the two apart). Admission and lookahead count what pops first by
the same key. The batch rules still size a batch by its head's own deadline: a tighter request
queued behind a loose head rides in that batch, and the hold cap bounds it while anything urgent
waits. The cost is where deadlines bind: a loose request served earlier takes the slot from a
tighter one that then no longer fits: at 1x load in ``bench triton`` attainment fell a little
(BENCHMARKS.md, "Side by side with a real Triton", the EDF horizon A/B).

Admission (``agent.scheduler.admission``) is asked at each arrival. With ``lookahead`` (ours) the
scheduler also tracks, per SLO class, the work it admits per second, and admission counts what the
tighter classes will bring while a request waits: under EDF they pop first.

What runs when a slot frees is the policy's decision (``agent.scheduler.policy``: an
:class:`~agent.scheduler.policy.Action`; the default, ``agent.scheduler.policies.rules``, asks each
lane's batching rule and takes the most urgent). The scheduler keeps the mechanism around it: the
queues, shedding what can no longer finish in time (before the policy is asked), admission, the
hold caps admission predicts with, and which slots and instances are busy.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from agent.core import DeadlineQueue, PushResult
from agent.errors import REJECTED, UNKNOWN_MODEL, InferenceError
from agent.scheduler.admission import MAX_CLASSES, AdmissionControl, CostShare, slo_class
from agent.scheduler.policy import DEFAULT_POLICY, Action, Policy, build_policy
from agent.scheduler.request import Request


#: A request is started alone (:meth:`Scheduler.start_alone`) only when no other request arrived, and
#: no batch started alone ended, for this long: a loaded board's requests arrive closer together than
#: one batch of the cheapest model takes, and under load the intake's thread must stay on its sockets.
IDLE_GAP_S = 0.002
#: ``Dispatch.instance`` of a batch that computes nothing here (:meth:`Scheduler.take_away`).
NO_INSTANCE = -1
#: SLO band edges (ms) of a lane's arrival rates (``ModelLane.arrival_rates``): tight below the first,
#: loose from the last on.
ARRIVAL_BANDS_MS = (25.0, 100.0)
#: Time constant of those rates.
ARRIVAL_TAU_S = 0.5


def water_level(free_at: list[float], work: float) -> float:
    """The time by which slots free at ``free_at`` (ascending) have together done ``work`` seconds,
    work poured onto whichever slot is free (a fluid approximation of list scheduling)."""
    level, total = free_at[0], 0.0
    for k, t in enumerate(free_at, start=1):
        total += t
        level = (work + total) / k
        if k == len(free_at) or level <= free_at[k]:
            return max(level, free_at[0])
    return level


def _depth_fraction(lane: ModelLane, requests: list[Request]) -> float:
    """The share of a whole run a batch of ``requests`` takes on a multi-exit lane: up to the deepest
    exit any of them may need (1 for a whole-graph lane or one that may go to the last exit)."""
    exits = lane.exits
    if exits is None:
        return 1.0
    deepest = 0
    for request in requests:
        choice = request.exit
        depth = exits.last if choice is None else choice.deepest
        if depth > deepest:
            deepest = depth
    return exits.fraction(deepest, len(requests))


def _profiled_stages(lane: ModelLane, dispatch: Dispatch) -> float | None:
    """The profiled time of what a staged batch really ran (each stage at the items it ran), for
    admission to learn its slowdown from; None for a whole-graph batch (the table's time)."""
    sizes, exits, admission = dispatch.stage_sizes, lane.exits, lane.admission
    if sizes is None or exits is None:
        return None
    return sum(admission.table.predict(m) * exits.stage_fraction(k, m) for k, m in enumerate(sizes) if m)


def hold_cap(table, max_batch: int, bound_s: float) -> int:
    """The largest batch, up to ``max_batch``, that may hold a slot: one predicted to run within
    ``bound_s``, or one at most half the cost of as many batches of 1 (batching that pays); at least 1."""
    single = table.predict(1)
    for b in range(max_batch, 1, -1):
        cost = table.predict(b)
        if cost <= bound_s or cost <= 0.5 * b * single:
            return b
    return 1


@dataclass(slots=True, eq=False)
class Dispatch:
    """A batch handed to an executor: which model, which of its instances, which requests, when,
    and the policy's action it carries out (its target and exit)."""

    model: str
    instance: int
    requests: list[Request]
    started: float
    action: Action
    # When the executor freed the batch's slot and instance before its end (the scheduler's clock;
    # ``Driver.release_early``: its local part is done, the rest runs on a peer), else None.
    released_at: float | None = None
    # A multi-exit model run stage by stage (agent.runtime.staged): the indices of the requests
    # answered already at an early exit (``Driver.answer_part``), and how many items each stage ran
    # (what admission learns the batch's profiled cost from); None for a whole-graph batch.
    answered: set | None = None
    stage_sizes: list | None = None

    @property
    def released(self) -> bool:
        """Released early (:attr:`released_at`): not released again at its end."""
        return self.released_at is not None


@dataclass(slots=True)
class Decision:
    """What :meth:`Scheduler.poll` decided: a batch to run (or none), requests that expired in the
    queue (to be answered ``deadline_missed``), and when to poll again if nothing arrives first."""

    dispatch: Dispatch | None
    expired: list[Request]
    wake_at: float


@dataclass(eq=False)
class ModelLane:
    """One model's queue, batching rule and instance slots."""

    name: str
    rule: object
    instances: int
    queue: DeadlineQueue
    # Seconds a batch of one takes at the least. With ``shed_hopeless``, a request whose deadline
    # is nearer than this is answered ``deadline_missed`` at once instead of being computed late:
    # under overload that compute is what the next, still feasible, requests need.
    min_latency_s: float = 0.0
    # Refuses at arrival what cannot finish in time (agent.scheduler.admission); None = admit all.
    admission: AdmissionControl | None = None
    # The FIFO baseline (rule "fifo"): the queue is keyed by arrival instead of deadline (priority
    # ignored), nothing expires in the queue, and a late request is computed and answered
    # deadline_missed at completion, as a plain one-at-a-time loop does. No shedding, no admission.
    fifo: bool = False
    # The biggest batch this lane takes while an urgent request waits: ``rule.max_batch``, or less
    # under a hold bound (Scheduler.urgent_waiting).
    batch_cap: int = 0
    # The rule dispatches a lone request at once (deadline-aware without a hold, dynamic without a
    # queue delay, fifo): on an idle board such a request may start without the queue
    # (Scheduler.start_alone).
    starts_alone: bool = False
    # A multi-exit model served stage by stage (agent.scheduler.exit_rule.ExitPlan): admission
    # prices a request by the stages up to its exit; None for a whole-graph model.
    exits: object = None
    # Set when the model is being unloaded (Scheduler.close_lane): new requests are refused; what
    # is queued is still served.
    closed: bool = False
    # Predicted end of the batch running on each busy instance (for admission).
    busy_until: dict[int, float] = field(default_factory=dict)
    pending: dict[int, Request] = field(default_factory=dict)
    free_instances: list[int] = field(default_factory=list)
    ready_ids: np.ndarray = field(default=None)
    expired_ids: np.ndarray = field(default=None)
    # Admitted arrivals per second by SLO band (ARRIVAL_BANDS_MS), an EWMA with time constant
    # ARRIVAL_TAU_S as of ``arrivals_at``: kept per request at admission so that a policy reads the
    # rates (the learned policy's features) without a pass over the queue.
    arrival_rates: list = field(default_factory=lambda: [0.0] * (len(ARRIVAL_BANDS_MS) + 1))
    arrivals_at: float = 0.0

    def count_arrival(self, slo_s: float, now: float) -> None:
        """One more admitted request with SLO ``slo_s`` at ``now`` in :attr:`arrival_rates`."""
        decay = math.exp(-max(0.0, now - self.arrivals_at) / ARRIVAL_TAU_S)
        rates = self.arrival_rates
        for k in range(len(rates)):
            rates[k] *= decay
        band = 0
        slo_ms = 1000.0 * slo_s
        while band < len(ARRIVAL_BANDS_MS) and slo_ms >= ARRIVAL_BANDS_MS[band]:
            band += 1
        rates[band] += 1.0 / ARRIVAL_TAU_S
        self.arrivals_at = now

    def __post_init__(self) -> None:
        if self.fifo and (self.min_latency_s > 0 or self.admission is not None):
            raise ValueError(f"model {self.name!r}: a fifo lane neither sheds nor refuses "
                             f"(min_latency_s = {self.min_latency_s!r}, admission = {self.admission!r}): expected 0 and None")
        self.free_instances = list(range(self.instances - 1, -1, -1))
        self.batch_cap = self.rule.max_batch
        self.ready_ids = np.empty(self.rule.max_batch, dtype=np.int64)
        self.expired_ids = np.empty(max(64, self.rule.max_batch), dtype=np.int64)


class Scheduler:
    """Queues, batching rules and slot accounting for every loaded model.

    ``max_concurrent`` bounds the batches in flight across all models (the execution slots: worker
    threads live, virtual slots in simulation); each model is further bounded by its instance count.
    ``policy`` decides each dispatch: a name of ``agent.scheduler.policies`` or a :class:`Policy`;
    ``policy_options``, what the config gives it beyond the lanes (kept as ``policy_options``).
    """

    TIGHT_WINDOW_S = 1.0   # the hold bound follows the tightest SLO among this window's arrivals
    LOOKAHEAD_TAU_S = 0.5  # time constant of the admitted work rates per SLO class (lookahead)

    def __init__(self, lanes: Iterable[ModelLane], max_concurrent: int, hold_fraction: float = 0.0,
                 lookahead: bool = False, edf_horizon_s: float = math.inf,
                 policy: str | Policy = DEFAULT_POLICY, policy_options: dict | None = None) -> None:
        self.lanes: dict[str, ModelLane] = {lane.name: lane for lane in lanes}
        self._lane_list = list(self.lanes.values())
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent = {max_concurrent}: expected >= 1")
        self.max_concurrent = max_concurrent
        self.in_flight = 0
        if not 0.0 <= hold_fraction <= 1.0:
            raise ValueError(f"hold_fraction = {hold_fraction!r}: expected a fraction in 0..1 (0 = no cap)")
        self.hold_fraction = hold_fraction
        self.share: CostShare | None = None
        self._index_admission()
        self.tight_slo_s = math.inf        # the tightest SLO seen within TIGHT_WINDOW_S ...
        self._tight_at = -math.inf         # ... last seen then
        # Lookahead (ours): admitted work per second by SLO class (admission.slo_class), [rate, as of,
        # the class's tightest SLO seen]; admission counts the tighter classes' arrivals that will
        # overtake a request while it waits (AdmissionControl.refuse, overtaken_wait).
        self.lookahead = lookahead
        self._class_rates: dict[int, list[float]] = {}
        if not edf_horizon_s > 0:
            raise ValueError(f"edf_horizon_s = {edf_horizon_s!r}: expected seconds > 0 (inf = plain EDF)")
        self.edf_horizon_s = edf_horizon_s
        # What the config gives a policy beyond the lanes (``{"offload": OffloadConfig}``: the fixed
        # offload policy's plan); read by a policy's ``build(scheduler)``.
        self.policy_options: dict = dict(policy_options or {})
        self._policy_name = policy if isinstance(policy, str) else None
        self.policy: Policy = build_policy(policy, self) if isinstance(policy, str) else policy
        self.last_arrival = -math.inf     # of the last request admitted (the idle path's gap)
        self.idle_since = -math.inf       # when the board last became idle (AdmissionControl.relax)

    @staticmethod
    def lane(name: str, rule: object, instances: int, queue_capacity: int, min_latency_s: float = 0.0,
             admission: AdmissionControl | None = None, fifo: bool = False, starts_alone: bool = False) -> ModelLane:
        """A model's lane; ``min_latency_s`` > 0 sheds requests that cannot finish in time,
        ``admission`` refuses at arrival those predicted not to, ``fifo`` serves in arrival order
        and never expires in the queue, ``starts_alone``: the rule dispatches a lone request at once
        (see ModelLane)."""
        return ModelLane(name=name, rule=rule, instances=instances, queue=DeadlineQueue(queue_capacity),
                         min_latency_s=min_latency_s, admission=admission, fifo=fifo, starts_alone=starts_alone)

    def queued(self) -> int:
        return sum(len(lane.queue) for lane in self._lane_list)

    def queue_key(self, request: Request) -> float:
        """When ``request`` pops, in the deadline's terms: its deadline, or ``arrival +
        edf_horizon_s`` if that is earlier (module docstring, "EDF horizon")."""
        return min(request.deadline, request.arrival + self.edf_horizon_s)

    def enqueue(self, request: Request) -> None:
        """Queue an admitted request; a full queue refuses it at once (``rejected``), never silently,
        and a model being unloaded (:meth:`close_lane`) refuses it ``unknown_model``."""
        lane = self.lanes.get(request.model)
        if lane is None or lane.closed:
            raise InferenceError(UNKNOWN_MODEL, f"model {request.model!r} is being unloaded (an operator's "
                                                f"command): not taking new requests for it", "model")
        key = self.queue_key(request)
        self._admit(lane, request, key)
        if lane.fifo:   # keyed by arrival; the Request keeps its real deadline for the reply
            result = lane.queue.push(request.rid, request.arrival, request.arrival, 0)
        else:
            result = lane.queue.push(request.rid, request.deadline, request.arrival, request.priority, key)
        if result != PushResult.OK:
            if result == PushResult.FULL:
                raise InferenceError(
                    REJECTED, f"model {request.model!r} queue is full ({lane.queue.capacity} requests waiting)")
            raise InferenceError(REJECTED, f"request id {request.rid} is already queued")
        lane.pending[request.rid] = request
        self.last_arrival = request.arrival
        self.learn_admitted(request)

    def _admit(self, lane: ModelLane, request: Request, key: float) -> None:
        """The tests every arriving request passes (the batch caps set first, from the tightest
        recent SLO): the cost share, then the deadline test; raises ``rejected`` with the reason."""
        if self._capped:
            self._track_tight(request.deadline - request.arrival, request.arrival)
            self._predict_capped(request)
        if lane.admission is None:
            return
        if self.share is not None:
            reason = self.share.refuse(request.model, request.priority, request.arrival)
            if reason is not None:
                raise InferenceError(REJECTED, reason)
        if self.in_flight == 0 and not self.queued():
            # An idle board: the request starts now, so no other model's work and no overtaker
            # can delay it (the bounds below would come to the same, at a cost on every request).
            # What admission learned under load is forgotten in proportion to the idle time.
            shared_start, overtakers = None, ()
            lane.admission.relax(self.idle_since, request.arrival)
        else:
            shared_start = self._shared_start(lane, request, key)
            overtakers = (self._overtakers(request.deadline - request.arrival, request.arrival)
                          if self.lookahead else ())
        exits, choice = lane.exits, request.exit
        own_share = None
        if exits is not None and choice is not None and choice.deepest < exits.last:
            # Its own batch answers it once the stages up to its exit ran (agent.runtime.staged).
            own_share = lambda b, k=choice.deepest: exits.fraction(k, b)   # noqa: E731
        reason = lane.admission.refuse(lane.queue, request.deadline, request.priority, request.arrival,
                                       min(lane.instances, self.max_concurrent), list(lane.busy_until.values()),
                                       shared_start, overtakers, self.max_concurrent, key, own_share)
        if reason is not None and exits is not None and choice is not None:
            reason = (f"accuracy {request.min_accuracy if request.min_accuracy is not None else 'best'} "
                      f"needs exit {exits.names[choice.deepest]!r} "
                      f"({'fixed' if choice.fixed is not None else 'confidence: the last exit at worst'}) "
                      f"and cannot be met in time there: {reason}")
        if reason is not None:
            # What this board cannot finish in time, a peer may: a policy that offloads says so
            # (``admit_elsewhere``), and then sends the request there.
            elsewhere = getattr(self.policy, "admit_elsewhere", None)
            if elsewhere is None or not elsewhere(lane, request):
                raise InferenceError(REJECTED, reason)

    def start_alone(self, request: Request) -> Dispatch | None:
        """The idle board's path (ours): a request that finds nothing queued and nothing in flight
        starts at once as a batch of one, without passing through its queue, when the policy says so
        (:meth:`Policy.alone`; the default: when its lane's rule would dispatch it at once and it is
        not to be shed). The decisions are those of :meth:`enqueue` and :meth:`poll` for a queue of
        one (:meth:`_admit`: ``InferenceError`` ``rejected`` if refused, with the same reasons),
        without the queue's push and pop or the poll over every lane; the lookahead's rate is counted
        by :meth:`learn_admitted`, which the driver calls once the reply is out. On an idle board
        this Python runs on cold caches: what the path saves is in BENCHMARKS.md ("Side by side with
        a real Triton", ninth session: "the idle board's path").
        Idle means nothing queued, nothing in flight, and no request for ``IDLE_GAP_S``, nor the end
        of a batch started alone (:meth:`alone_ended`): the intake's thread runs that batch, and
        requests that arrive meanwhile wait unread in its sockets, stamped when it reads them, just
        after: counting from the arrival before, each would look like an idle board's, run on the
        intake's thread in turn, and the workers would sit idle while the sockets filled (seen: an
        HTTP load at 1.4x the board's capacity answered every request, one at a time, seconds late,
        with nothing refused; BENCHMARKS.md, twelfth session).
        ``None``: not this path; :meth:`enqueue` the request."""
        if self.in_flight or request.arrival - self.last_arrival < IDLE_GAP_S or self.queued():
            return None
        lane = self.lanes.get(request.model)
        if lane is None or lane.closed:
            return None                                   # enqueue refuses it
        action = self.policy.alone(self, lane, request)
        if action is None:
            return None
        self._admit(lane, request, self.queue_key(request))
        self.last_arrival = request.arrival
        return self._start(lane, action, [request], request.arrival)

    def alone_ended(self, now: float) -> None:
        """A batch started alone (:meth:`start_alone`) ended at ``now``: the idle board's path stays
        shut for ``IDLE_GAP_S`` from then, as after an arrival."""
        if now > self.last_arrival:
            self.last_arrival = now

    def learn_admitted(self, request: Request) -> None:
        """What the scheduler keeps from an admitted request once it is queued (:meth:`enqueue`) or
        answered (:meth:`start_alone`'s driver): the lookahead's rate of its SLO class."""
        lane = self.lanes[request.model]
        lane.count_arrival(request.deadline - request.arrival, request.arrival)
        if self.lookahead and lane.admission is not None:
            self._count_admitted(lane.admission, request.deadline - request.arrival, request.arrival)

    def _count_admitted(self, admission: AdmissionControl, slo_s: float, now: float) -> None:
        """Add an admitted request's predicted work (per item, in full batches) to its SLO class's rate."""
        key = slo_class(slo_s)
        entry = self._class_rates.get(key)
        if entry is None:
            if len(self._class_rates) >= MAX_CLASSES:   # SLOs that vary request by request: keep the live ones
                self._class_rates = {k: e for k, e in self._class_rates.items()
                                     if now - e[1] < 4 * self.LOOKAHEAD_TAU_S}
                if len(self._class_rates) >= MAX_CLASSES:
                    self._class_rates.clear()
            entry = self._class_rates[key] = [0.0, now, slo_s]
        entry[0] = (entry[0] * math.exp(-max(0.0, now - entry[1]) / self.LOOKAHEAD_TAU_S)
                    + admission.item_s() / self.LOOKAHEAD_TAU_S)
        entry[1], entry[2] = now, min(entry[2], slo_s)

    def _overtakers(self, slo_s: float, now: float) -> list[tuple[float, float]]:
        """(window, work rate) of each SLO class that pops before a request of SLO ``slo_s`` arriving
        later: one of class s arriving within ``min(slo_s, H) - min(s, H)`` of now (``H`` the EDF
        horizon) has the earlier key and pops first. Past the horizon every class is in arrival
        order: nothing overtakes."""
        out = []
        tau = self.LOOKAHEAD_TAU_S
        horizon = self.edf_horizon_s
        own = min(slo_s, horizon)
        for rate, at, class_s in self._class_rates.values():
            window = own - min(class_s, horizon)
            if window > 0:
                out.append((window, rate * math.exp(-max(0.0, now - at) / tau)))
        return out

    def urgent_waiting(self, now: float) -> bool:
        """Whether a capped lane holds a request due within the tightest recent SLO (from ``now``)."""
        horizon = now + self.tight_slo_s
        for lane in self._capped:
            if len(lane.queue) and lane.queue.earliest_deadline() <= horizon:
                return True
        return False

    def _track_tight(self, slo_s: float, now: float) -> None:
        """Keep the tightest SLO of the last ``TIGHT_WINDOW_S`` and re-cap the lanes when it moves."""
        if slo_s < self.tight_slo_s or now - self._tight_at > self.TIGHT_WINDOW_S:
            moved = slo_s != self.tight_slo_s
            self.tight_slo_s, self._tight_at = slo_s, now
            if moved:
                bound = self.hold_fraction * slo_s
                for lane in self._capped:
                    lane.batch_cap = hold_cap(lane.admission.table, lane.rule.max_batch, bound)
        elif slo_s == self.tight_slo_s:
            self._tight_at = now

    def _predict_capped(self, request: Request) -> None:
        """Admission predicts every capped lane with its cap while the cap binds for this request:
        when it is urgent itself or an urgent request already waits; otherwise with full batches.
        (Predicting with the cap always over-predicted on a Poisson trace near capacity, where the cap
        seldom binds: live it refused several times what the simulator refused; BENCHMARKS.md,
        "Poisson at about 90% of capacity".)"""
        urgent = (request.deadline <= request.arrival + self.tight_slo_s
                  or self.urgent_waiting(request.arrival))
        for lane in self._capped:
            limit = lane.batch_cap if urgent else lane.rule.max_batch
            if lane.admission.max_batch != limit:
                lane.admission.limit_batch(limit)

    def _shared_start(self, lane: ModelLane, request: Request, key: float) -> float | None:
        """When the execution slots, shared by every model, would have done all the work that runs
        before ``request``: queued requests that pop first across models (an earlier queue key or a
        higher priority, as :meth:`poll` chooses) poured like water over the slots, each slot free now or when
        its batch in flight is predicted to end. ``None`` with a single model (its own bound covers it)."""
        if len(self._lane_list) == 1:
            return None
        now, work = request.arrival, 0.0
        free_at = []
        for other in self._lane_list:
            admission = other.admission
            if admission is None:
                continue
            # What pops first; the request's own batch is priced by its lane's bound.
            work += admission.work_s(other.queue.count_ahead(key, request.priority))
            free_at.extend(max(now, t) for t in other.busy_until.values())
        free_at = sorted(free_at + [now] * (self.max_concurrent - len(free_at)))[:self.max_concurrent]
        return water_level(free_at, work)

    def poll(self, now: float) -> Decision:
        """Called by a driver with a free slot: take out what can no longer finish in time, then
        ask the policy for at most one batch."""
        expired: list[Request] = []
        for lane in self._lane_list:
            if lane.fifo or not len(lane.queue):
                continue
            horizon = now + lane.min_latency_s
            if lane.queue.earliest_deadline() < horizon:
                self._expire(lane, horizon, expired)
        action, wake_at = self.policy.decide(self, now)
        dispatch = None
        if action is not None:
            dispatch = self._pop(self.lanes[action.model], action, now, expired)
        return Decision(dispatch, expired, wake_at)

    def _expire(self, lane: ModelLane, horizon: float, expired: list[Request]) -> None:
        """Take out every request whose deadline is before ``horizon``."""
        while True:
            n = lane.queue.drop_expired(horizon, lane.expired_ids)
            self._missed(lane, n, expired)
            if n < len(lane.expired_ids):
                return

    def _pop(self, lane: ModelLane, action: Action, now: float, expired: list[Request]) -> Dispatch | None:
        if action.requests:
            return self._take(lane, action, self._named(lane, action), now)
        expire_before = -math.inf if lane.fifo else now + lane.min_latency_s
        n_ready, n_expired = lane.queue.pop_batch(action.batch_size, expire_before, lane.ready_ids, lane.expired_ids)
        pending = lane.pending
        if n_expired:
            self._missed(lane, n_expired, expired)
        if not n_ready:
            return None
        return self._start(lane, action, [pending.pop(rid) for rid in lane.ready_ids[:n_ready].tolist()], now)

    def latest(self, lane: ModelLane, n: int) -> list[Request]:
        """The ``n`` queued requests of ``lane`` that pop last (the latest queue keys), earliest
        first: a partial sort of its pending requests, for a batch sent away under load (a policy
        names them in ``Action.requests``)."""
        chosen = heapq.nlargest(n, lane.pending.values(), key=self.queue_key)
        chosen.reverse()
        return chosen

    @staticmethod
    def _named(lane: ModelLane, action: Action) -> list[Request]:
        """The queued requests ``action.requests`` names (those still queued), at most its batch."""
        pending = lane.pending
        return [pending[rid] for rid in action.requests if rid in pending][:action.batch_size]

    def _take(self, lane: ModelLane, action: Action, chosen: list[Request], now: float,
              take_instance: bool = True) -> Dispatch | None:
        """Start a batch of ``chosen`` (queued requests of ``lane``, picked other than by the queue's
        own pop), taking them out of the queue; the rest stay in deadline order."""
        if not chosen:
            return None
        pending = lane.pending
        for request in chosen:
            lane.queue.cancel(request.rid)
            del pending[request.rid]
        return self._start(lane, action, chosen, now, take_instance)

    def take_away(self, now: float) -> Dispatch | None:
        """A batch that needs no compute here, to start at once whatever the slots (the policy's
        ``away(scheduler)``: requests admitted for a peer, sent to it whole). It takes no instance
        (``Dispatch.instance`` is ``NO_INSTANCE``) and counts in ``in_flight`` only until its
        executor releases it, once sent. ``None``: nothing to send."""
        away = getattr(self.policy, "away", None)
        action = away(self) if away is not None else None
        if action is None:
            return None
        lane = self.lanes[action.model]
        return self._take(lane, action, self._named(lane, action), now, take_instance=False)

    def _start(self, lane: ModelLane, action: Action, requests: list[Request], now: float,
               take_instance: bool = True) -> Dispatch:
        """The batch takes a slot and an instance (the action's, or any free one; none for a batch
        that computes nothing here: :meth:`take_away`)."""
        self.policy.dispatched(action, len(requests), now)
        self.in_flight += 1
        if not take_instance:
            return Dispatch(lane.name, NO_INSTANCE, requests, now, action)
        if action.instance is None:
            instance = lane.free_instances.pop()
        else:
            lane.free_instances.remove(action.instance)
            instance = action.instance
        if lane.admission is not None:
            lane.busy_until[instance] = now + lane.admission.batch_s(len(requests)) * _depth_fraction(lane, requests)
        return Dispatch(lane.name, instance, requests, now, action)

    @staticmethod
    def _missed(lane: ModelLane, n: int, expired: list[Request]) -> None:
        """The first ``n`` of ``lane.expired_ids`` expired or were shed in the queue: move them from
        the lane's pending requests to ``expired``, each a miss for calibration."""
        pending, admission = lane.pending, lane.admission
        for rid in lane.expired_ids[:n].tolist():
            request = pending.pop(rid)
            expired.append(request)
            if admission is not None:
                admission.calibrate(True, request.deadline - request.arrival)

    def release(self, dispatch: Dispatch, now: float | None = None) -> None:
        """The batch is done (whatever its outcome): its instance and slot are free again. ``now``:
        when; the board's idle time counts from the release that leaves it idle (None: not counted)."""
        lane = self.lanes[dispatch.model]
        if dispatch.instance != NO_INSTANCE:
            lane.free_instances.append(dispatch.instance)
            lane.busy_until.pop(dispatch.instance, None)
        self.in_flight -= 1
        if now is not None and self.in_flight == 0 and not self.queued():
            self.idle_since = now

    def observe(self, dispatch: Dispatch, now: float) -> None:
        """The batch's requests are answered: its whole cost (dispatch to the last reply) teaches
        the lane's admission control what a batch really takes here (see admission.py), and the
        policy learns what it wants from it (the default: a rule such as Clipper's AIMD, whether the
        batch met every deadline in it)."""
        lane = self.lanes.get(dispatch.model)
        if lane is None:      # its model was unloaded while the batch's replies went out
            return
        admission = lane.admission
        if admission is not None:
            # A batch released early (its rest ran on a peer: Driver.release_early) held its slot
            # only until then: that is what it cost the queue here, and what admission learns, so
            # its queue model drains as fast as the slots do while batches leave. Whether each
            # request made its deadline, wherever it ran, calibrates the class's slack as always.
            held = (dispatch.released_at if dispatch.released else now) - dispatch.started
            admission.observe(len(dispatch.requests), held, _profiled_stages(lane, dispatch))
            for request in dispatch.requests:
                admission.calibrate(now > request.deadline, request.deadline - request.arrival)
        self.policy.observe(dispatch, now)

    def drain(self) -> list[Request]:
        """Remove every queued request (shutdown): the caller answers each ``shutting_down``."""
        out: list[Request] = []
        for lane in self._lane_list:
            for rid in list(lane.pending):
                lane.queue.cancel(rid)
                out.append(lane.pending.pop(rid))
        return out

    # --- lanes added, changed and removed while serving (agent.api: load-model, unload-model,
    # set-batching). The caller holds the lock the drivers hold around every scheduler call. The
    # lane dict and list are replaced, never changed in place, so a reader without the lock (the
    # status) iterates a consistent copy.

    def add_lane(self, lane: ModelLane) -> None:
        """Serve a new model's lane from the next poll on."""
        if lane.name in self.lanes:
            raise ValueError(f"model {lane.name!r} has a lane already")
        self._check_policy_follows()
        self.lanes = {**self.lanes, lane.name: lane}
        self._lanes_changed()

    def close_lane(self, name: str) -> None:
        """Refuse new requests for ``name`` (``unknown_model``); what is queued is still served."""
        self.lanes[name].closed = True

    def cancel_lane(self, name: str) -> list[Request]:
        """Take every queued request of ``name`` out: the caller answers each (``shutting_down``)."""
        lane = self.lanes[name]
        out = []
        for rid in list(lane.pending):
            lane.queue.cancel(rid)
            out.append(lane.pending.pop(rid))
        return out

    def lane_idle(self, name: str) -> bool:
        """Nothing of ``name`` is queued and no batch of it holds an instance."""
        lane = self.lanes[name]
        return not len(lane.queue) and len(lane.free_instances) == lane.instances

    def remove_lane(self, name: str) -> None:
        """Forget a closed, idle lane (:meth:`close_lane`, :meth:`lane_idle`)."""
        lane = self.lanes[name]
        if not lane.closed or not self.lane_idle(name):
            raise ValueError(f"model {name!r}: only a closed lane with nothing queued or running can be removed")
        self._check_policy_follows()
        self.lanes = {n: other for n, other in self.lanes.items() if n != name}
        self._lanes_changed()

    def swap_rule(self, name: str, template: ModelLane) -> None:
        """Batch ``name`` by ``template``'s rule from the next poll on (``template``: a lane built
        from the new batching config, ``agent.scheduler.rules.build_lane``; its queue is not used).
        What admission learned of the model is kept (its margin and batch bound follow the new
        rule); a rule's own state (AIMD's size, DisBatcher's window) starts over. Between fifo and
        the other rules the queue's keys differ (arrival, deadline): that cannot change live."""
        lane = self.lanes[name]
        if lane.fifo != template.fifo:
            raise ValueError(f"model {name!r}: switching to or from rule 'fifo' changes how its queue is keyed; "
                             f"unload and load the model instead")
        self._check_policy_follows()
        admission = template.admission
        if admission is not None and lane.admission is not None:
            lane.admission.limit_batch(template.rule.max_batch)
            lane.admission.margin_s = admission.margin_s
            admission = lane.admission
        lane.rule = template.rule
        lane.admission = admission
        lane.min_latency_s = template.min_latency_s
        lane.starts_alone = template.starts_alone
        lane.batch_cap = template.rule.max_batch
        if len(lane.ready_ids) < template.rule.max_batch:
            lane.ready_ids = template.ready_ids
            lane.expired_ids = template.expired_ids
        self._lanes_changed()

    def _index_admission(self) -> None:
        """The cost share and the capped lanes, from the lanes' admission controls."""
        admitted = {lane.name: lane.admission for lane in self._lane_list if lane.admission is not None}
        # With several models under admission control, overload refuses the expensive ones first.
        if len(admitted) <= 1:
            self.share = None
        elif self.share is None or self.share.lanes != admitted:
            self.share = CostShare(admitted, self.max_concurrent)
        self._capped = [lane for lane in self._lane_list if lane.admission is not None] if self.hold_fraction > 0 else []
        if self._capped and math.isfinite(getattr(self, "tight_slo_s", math.inf)):
            bound = self.hold_fraction * self.tight_slo_s
            for lane in self._capped:
                lane.batch_cap = hold_cap(lane.admission.table, lane.rule.max_batch, bound)

    def set_policy(self, policy: str | Policy, policy_options: dict | None = None) -> Policy:
        """Decide by ``policy`` from the next poll on (``set-policy``; the caller holds the drivers'
        lock). It is built before anything changes, so a policy that cannot be built (a learned
        policy's card refused) leaves the old one deciding. Queued requests and batches in flight
        stay as they are; the new policy observes the batches the old one started. Returns the old."""
        options = {**self.policy_options, **(policy_options or {})}
        old_options, self.policy_options = self.policy_options, options
        try:
            new = build_policy(policy, self) if isinstance(policy, str) else policy
        except Exception:
            self.policy_options = old_options
            raise
        old, self.policy = self.policy, new
        self._policy_name = policy if isinstance(policy, str) else None
        return old

    def _check_policy_follows(self) -> None:
        """Refuse a change of lanes, before anything changes, that the policy could not follow."""
        if self._policy_name is None and not hasattr(self.policy, "lanes_changed"):
            raise ValueError(f"policy {getattr(self.policy, 'name', self.policy)!r} cannot follow lanes changed "
                             f"while serving (it has no lanes_changed)")

    def _lanes_changed(self) -> None:
        self._lane_list = list(self.lanes.values())
        self._index_admission()
        if self._policy_name is not None:
            self.policy = build_policy(self._policy_name, self)
        else:
            self.policy.lanes_changed(self)
