"""The discrete-event simulator: the live agent's scheduler on a virtual clock.

DESIGN.md, "One scheduler, two clocks": policies are trained and baselines compared on exactly the
code that runs on the board. So this module contains no scheduling logic of its own. It builds the
same :class:`agent.scheduler.dispatcher.Scheduler` (same compiled ``DeadlineQueue``, same lanes from
``agent.scheduler.rules.build_lane``, same policy) and drives it with the live agent's driver
(``agent.runtime.driver``), only with time taken from an event heap instead of the monotonic clock
and batches timed by :class:`~agent.sim.executor.SimExecutor` instead of run by a backend.
"""
from __future__ import annotations

import heapq
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from agent.config import Config
from agent.core import LatencyTable
from agent.errors import UNKNOWN_MODEL, InferenceError
from agent.runtime.driver import Driver
from agent.scheduler.admission import AdmissionControl
from agent.scheduler.dispatcher import ModelLane, Scheduler
from agent.scheduler.exit_rule import choose_exit
from agent.scheduler.policy import DEFAULT_POLICY, LOCAL
from agent.scheduler.request import Request, Result
from agent.scheduler.rules import build_lane, build_rule
from agent.sim.executor import SimBatch, SimExecutor
from agent.workload.records import RequestRecord
from agent.workload.trace import TraceRow

if TYPE_CHECKING:
    from agent.config import OffloadConfig
    from agent.sim.offload import SimOffloadModel, SimPeerSpec

# Event kinds, in the order they are applied when they fall on the same instant (the heap key is
# (time, kind, seq)): a batch that ends at t frees its slot before a request arriving at t is
# queued, and both happen before a timed wake-up at t re-plans. ``seq`` (insertion order) breaks
# the remaining ties; arrivals at one instant are applied in trace order.
#
# A COMPLETE entry is ``(time, COMPLETE, seq, item, generation, owner)``: when it comes due the
# engine calls ``owner.complete(item, now)``. The board's batches (owner: the SimExecutor) carry a
# ``generation`` and are skipped as stale when their finish moved since; the offload model's
# events (``agent.sim.offload``: a tensor reaching a peer, a tail ending there, a reply reaching
# the board) carry ``None`` and always apply. All completions come before arrivals at the same
# instant, among themselves in the order they were scheduled.
COMPLETE = 0
ARRIVAL = 1
WAKE = 2

_NO_INPUTS: dict = {}


@dataclass(frozen=True)
class SimModel:
    """One model lane of the simulated board: what ``agent.api.Agent`` builds per loaded model.

    ``rule`` is a batching rule from ``agent.core`` (``FixedBatch``, ``DynamicBatch``,
    ``DeadlineAwareBatch``) or ``agent.scheduler.baselines`` (``AimdBatch``, ``DisBatch``: they keep
    state, so give each run fresh ones); ``latency`` the profiled table that times its batches;
    ``min_latency_s`` > 0 sheds requests that cannot finish in time (``ModelLane``); ``jitter`` the
    lognormal sigma of its run times (0: every batch takes exactly ``latency.predict(b)``).
    """

    name: str
    rule: object
    instances: int
    queue_capacity: int
    latency: LatencyTable
    min_latency_s: float = 0.0
    jitter: float = 0.0
    admission: bool = False            # refuse at arrival what is predicted to miss (admission.py)
    margin_s: float = 0.0              # the admission test's safety margin
    fifo: bool = False                 # rule "fifo": arrival order, no expiry in the queue (ModelLane.fifo)
    starts_alone: bool = False         # the rule dispatches a lone request at once (ModelLane.starts_alone)
    # A multi-exit model run stage by stage (agent.scheduler.exit_rule.ExitPlan; the executor times
    # each stage by its share of ``latency``), None for a whole-graph model.
    exits: object = None
    exit_allocation: bool = False      # admit by the online exit allocation (agent.exits.online)
    # exit_rebatch: the later stages' lanes (agent.exits.survivors): (lane name, stage, factory of a
    # fresh lane), the stage timed as in the model's own lane (its share of ``latency``).
    survivors: tuple = ()

    def lane(self) -> ModelLane:
        """A fresh scheduler lane with these settings (its own queue)."""
        lane = Scheduler.lane(self.name, self.rule, self.instances, self.queue_capacity,
                              min_latency_s=self.min_latency_s,
                              admission=AdmissionControl(self.latency, self.rule.max_batch, self.margin_s)
                              if self.admission else None,
                              fifo=self.fifo, starts_alone=self.starts_alone)
        lane.exits = self.exits
        return lane

    def lanes(self) -> list[ModelLane]:
        """Fresh lanes: the model's own and, with ``exit_rebatch``, its later stages'."""
        return [self.lane(), *(make() for _, _, make in self.survivors)]


def sim_models_from_config(config: Config, tables: Mapping[str, LatencyTable],
                           jitter: float = 0.0, cards: Mapping[str, object] | None = None) -> list[SimModel]:
    """The lanes ``agent.api.Agent`` would build from ``config``, timed by ``tables`` (model name ->
    table, e.g. the live agent's start-up profile) instead of a fresh measurement.

    The lane settings come from ``agent.scheduler.rules.build_lane``, exactly what ``Agent.__init__``
    uses (the rule, shedding, admission, fifo order), so the simulator cannot drift from the live
    agent's reading of the config. Rules with state (``aimd``, ``disbatcher``) are built fresh here,
    so build the models anew for each run. ``cards`` (model name -> ``ModelCard``): a model whose
    config sets ``exit_mode`` runs stage by stage with its card's exits (loaded from the config's
    card reference when not given).
    """
    from agent.models.card import load_card
    from agent.scheduler.exit_rule import exit_plan
    models = []
    for model in config.models:
        if model.name not in tables:
            raise KeyError(f"no latency table for model {model.name!r}; tables given for {sorted(tables)}")
        table = tables[model.name]
        lane = build_lane(model.name, build_rule(model.batching, table), model, table)
        exits = None
        if model.exit_mode != "off":
            card = (cards or {}).get(model.name) or load_card(model.card)
            exits = exit_plan(card, model.exit_mode)
        models.append(SimModel(
            name=model.name,
            rule=lane.rule,
            instances=lane.instances,
            queue_capacity=lane.queue.capacity,
            latency=table,
            min_latency_s=lane.min_latency_s,
            jitter=jitter,
            admission=lane.admission is not None,
            margin_s=lane.admission.margin_s if lane.admission is not None else 0.0,
            fifo=lane.fifo,
            starts_alone=lane.starts_alone,
            exits=exits,
            exit_allocation=model.exit_allocation,
            survivors=_survivor_templates(model, table, exits) if model.exit_rebatch and exits is not None else (),
        ))
    return models


def _survivor_templates(model, table: LatencyTable, exits) -> tuple:
    """What the simulator needs of ``model``'s later stages' lanes (``agent.exits.survivors``): each
    built as live, timed by the stage's share of the model's table."""
    from agent.exits.survivors import stage_lane, survivor_lane_name
    sizes = list(table.batch_sizes.tolist())
    out = []
    for k in range(1, len(exits.names)):
        stage = LatencyTable(sizes, [table.predict(b) * exits.stage_fraction(k, b) for b in sizes])
        out.append((survivor_lane_name(model.name, k), k, lambda k=k, stage=stage: stage_lane(model, k, stage)))
    return tuple(out)


@dataclass
class SimResult:
    """What a simulated run produced: one record per trace row (same index), and counters."""

    records: list[RequestRecord]
    duration_s: float                  # virtual seconds until the last arrival or reply, whichever is later
    events: int                        # events applied (arrivals, completions, wakes)
    stale_events: int                  # superseded completions / wakes, popped and ignored
    batches: int
    batch_histogram: dict[str, dict[int, int]] = field(default_factory=dict)  # model -> size -> count
    wall_s: float = 0.0                # real seconds the simulation took
    #: Where the batches ran (runs with peers): "local", or "<peer>:<split>" ("<peer>:full" for a
    #: full offload) -> batches.
    placements: dict[str, int] = field(default_factory=dict)
    offload: dict = field(default_factory=dict)   # the offload model's counters (runs with peers)

    def status_counts(self) -> dict[str, int]:
        return dict(Counter(r.status for r in self.records))

    def slo_attainment(self) -> float:
        """Share of all trace rows answered ``ok`` within their SLO."""
        return sum(1 for r in self.records if r.within_slo) / len(self.records) if self.records else 1.0

    def mean_batch_size(self, model: str | None = None) -> float:
        hists = [self.batch_histogram.get(model, {})] if model else list(self.batch_histogram.values())
        n = sum(c for h in hists for c in h.values())
        return sum(s * c for h in hists for s, c in h.items()) / n if n else 0.0


class _Reply:
    """A request's reply sink (``ReplySink``): writes the outcome into its record at virtual now."""

    __slots__ = ("record", "clock")

    def __init__(self, record: RequestRecord, clock: "_Clock") -> None:
        self.record = record
        self.clock = clock

    def set_result(self, result: Result) -> None:
        record = self.record
        record.status = "ok"
        record.finish_s = self.clock.now
        record.batch_size = result.batch_size
        record.queue_ms = result.queue_ms
        record.compute_ms = result.compute_ms
        record.exit = result.served_by.get("exit")

    def set_exception(self, exception: InferenceError) -> None:
        record = self.record
        record.status = exception.code
        record.finish_s = self.clock.now


class _Clock:
    """The virtual clock: the time of the event being applied."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0


def simulate(trace: Sequence[TraceRow], models: Sequence[SimModel], workers: int, *, seed: int = 0,
             cores: int | None = None, hold_fraction: float = 0.0, lookahead: bool = False,
             edf_horizon_s: float = math.inf, policy: str = DEFAULT_POLICY, idle_path: bool = True,
             peers: Sequence["SimPeerSpec"] = (), offload: "OffloadConfig | None" = None,
             offload_models: "Sequence[SimOffloadModel]" = (),
             slowdown: "Mapping[str, Callable[[int], float]] | None" = None, policy_options: dict | None = None,
             on_reply=None) -> SimResult:
    """Replay ``trace`` through the live scheduler on a virtual clock; one record per row.

    ``workers`` is the number of execution slots (``Config.worker_count``: the scheduler's
    ``max_concurrent``); ``cores`` how many batches run at full speed at once (default
    ``workers``: no slowdown; fewer cores than workers shares them, see ``agent.sim.executor``);
    ``hold_fraction`` is ``Config.hold_fraction`` (the scheduler's batch cap by the tightest SLO;
    0 = none); ``lookahead`` is ``Config.admission_lookahead``; ``edf_horizon_s`` is
    ``Config.edf_horizon_s`` (``math.inf``: plain EDF); ``policy`` is ``Config.policy``; ``seed``
    seeds the run-time noise (only used by models with ``jitter > 0``); ``idle_path``: a request
    arriving at an idle board starts at once without the queue where its lane allows
    (``Scheduler.start_alone``, as the HTTP intake does; False: every request queued, as
    ``Agent.submit``). Times in the records are seconds from the trace's start, like ``TraceRow.t_s``.

    Event loop. Pending events sit in a heap keyed ``(time, kind, seq)``; arrivals come from the
    trace (already in time order) and are merged with the heap as if they were ``ARRIVAL`` entries
    (cheaper than pushing them all). Same-instant order: completions, then arrivals (in trace
    order), then wakes. On every event the engine

    1. applies it: an arrival is started alone (``idle_path``) or ``Scheduler.enqueue``-d (refused:
       recorded with its code at once, ``rejected`` for a full queue; a model not configured is
       recorded ``unknown_model``); a completion goes to the driver (``Driver.complete``: the slot
       is released, the batch's requests answered ``ok``, or ``deadline_missed`` for each whose
       deadline the batch finished after, then the scheduler learns); an offload event goes to its
       owner (``agent.sim.offload``: a peer queues or ends a tail, a reply answers its batch);
    2. fills the idle execution slots (``Driver.fill``): expired or shed requests are answered
       ``deadline_missed`` at ``now``; a dispatched batch starts on the executor, which schedules
       its completion; as live, nothing polls while every slot is busy;
    3. when the last poll dispatched nothing, schedules a ``WAKE`` at its ``wake_at`` if finite and
       earlier than the pending wake. A ``wake_at`` at or before ``now`` (the queue expires only
       deadlines strictly before ``now``, so a request is still queued at its exact deadline) is
       moved to the next representable instant, ``math.nextafter(now, inf)``: the live worker's
       clock moves on the same way. A request held past its deadline thus expires one ulp after it.

    Comparing with a live run. Replay the same trace file against the live agent (the lead's
    replayer) and simulate it with ``sim_models_from_config(config, tables)``, where ``config`` is
    the live agent's config and ``tables`` its start-up profile (``{name: agent.models[name].latency}``,
    also published in the status message's ``latency_ms``); use ``workers=config.worker_count``,
    ``hold_fraction=config.hold_fraction``, ``lookahead=config.admission_lookahead``,
    ``edf_horizon_s=config.edf_horizon_s`` and ``cores`` = the board's cores. Then compare per-status counts, goodput, the batch-size
    histogram and latency percentiles, per model. Expect the simulation to be optimistic by the
    agent's per-request overhead (intake, thread hand-offs: ``edge-agent bench``) and, on a
    shared board, by the interference the processor-sharing model leaves out.

    Offload (``agent.sim.offload``). With ``peers`` (one :class:`~agent.sim.offload.SimPeerSpec`
    each: its speed, slots, link), each peer's device id becomes an action target served by a
    simulated offload executor, the policy gets ``policy_options = {"offload": offload,
    "offload_view": <simulated OffloadView>}`` (``offload`` default: ``OffloadConfig(peers=<their
    ids>)``), and ``offload_models`` (:class:`~agent.sim.offload.SimOffloadModel`, e.g. from a
    card) give each model's split points and input size. The run then ends when nothing is left on
    a link or a peer either. Without peers none of this exists and the run is as before.

    ``policy_options``: more for the policy (``Scheduler.policy_options``), e.g. the learned
    policy's ``policy_path``; merged over the offload's. ``on_reply(request, result, error)``: told of
    every reply the driver sets (``Driver``'s hook; a learner's reward as it happens), at virtual now.
    """
    started_wall = time.perf_counter()
    if workers < 1:
        raise ValueError(f"workers = {workers!r}: expected an integer >= 1")
    if cores is None:
        cores = workers
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    clock = _Clock()
    heap: list = []
    seq = 0

    def schedule(batch: SimBatch) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(heap, (batch.finish, COMPLETE, seq, batch, batch.generation, executor))

    def post(at: float, owner, item) -> None:
        """An offload event: ``owner.complete(item, now)`` at ``at`` (never stale)."""
        nonlocal seq
        seq += 1
        heapq.heappush(heap, (at, COMPLETE, seq, item, None, owner))

    executor = SimExecutor({**{m.name: m.latency for m in models},
                            **{name: m.latency for m in models for name, _, _ in m.survivors}}, seed=seed,
                           jitter={**{m.name: m.jitter for m in models},
                                   **{name: m.jitter for m in models for name, _, _ in m.survivors}},
                           cores=cores, clock=clock, schedule=schedule, slowdown=slowdown)
    offloading = None
    extra_options, policy_options = policy_options, None
    if peers:
        from agent.sim.offload import SimOffload
        offloading = SimOffload(peers, {m.name: m.latency for m in models}, offload_models, executor, clock, post)
        policy_options = offloading.policy_options(offload)
    if extra_options:
        policy_options = {**(policy_options or {}), **extra_options}
    scheduler = Scheduler([lane for m in models for lane in m.lanes()], max_concurrent=workers, hold_fraction=hold_fraction,
                          lookahead=lookahead, edf_horizon_s=edf_horizon_s, policy=policy,
                          policy_options=policy_options)
    if offloading is None:
        driver = Driver(scheduler, executor, lambda: clock.now, explain=False, on_reply=on_reply)
        executor.answer_part = driver.answer_part
    else:
        driver = Driver(scheduler, {LOCAL: executor, **offloading.executors}, lambda: clock.now, explain=False,
                        on_reply=on_reply)
        offloading.driver = driver
        executor.answer_part = driver.answer_part
    exit_plans = {m.name: m.exits for m in models if m.exits is not None}
    executor.exits = exit_plans        # multi-exit models run stage by stage (SimExecutor._stage)
    for m in models:                   # exit_rebatch: each stage's lane runs its stage and hands on
        if m.survivors:
            names = [m.name, *(name for name, _, _ in m.survivors)]
            executor.exits.update({name: m.exits for name in names[1:]})
            executor.stage_lanes.update({name: (k, names[k + 1] if k + 1 < len(names) else None)
                                         for k, name in enumerate(names)})
    executor.hand_on = driver.hand_on
    allocations = {m.name: _allocation(m, lambda: clock.now) for m in models if m.exit_allocation}
    n_rows = len(trace)
    records = [RequestRecord(i, row.app, row.model, row.t_s, row.slo_ms, row.priority, "unanswered")
               for i, row in enumerate(trace)]
    order = list(range(n_rows))
    if any(trace[i].t_s > trace[i + 1].t_s for i in range(n_rows - 1)):
        order.sort(key=lambda i: trace[i].t_s)    # stable: same-instant rows stay in trace order

    pending_wake = math.inf
    events = stale = 0
    lanes = scheduler.lanes
    enqueue, start_alone = scheduler.enqueue, scheduler.start_alone
    heappush, heappop = heapq.heappush, heapq.heappop
    inf = math.inf
    next_i = 0
    next_t = trace[order[0]].t_s if n_rows else inf
    now = 0.0

    def wake(decision, at: float) -> bool:
        """Nothing to start: wake at the decision's ``wake_at`` (step 3 below)."""
        nonlocal pending_wake, seq
        wake_at = decision.wake_at
        if wake_at <= at:
            wake_at = math.nextafter(at, inf)
        if wake_at < pending_wake:
            pending_wake = wake_at
            seq += 1
            heappush(heap, (wake_at, WAKE, seq, None, 0, None))
        return False

    while True:
        # --- 1. the next event, and apply it ---------------------------------------------------
        if heap and (next_t > heap[0][0] or (next_t == heap[0][0] and heap[0][1] == COMPLETE)):
            at, kind, _, item, generation, owner = heappop(heap)
            if kind == COMPLETE:
                if generation is not None and generation != item.generation:
                    stale += 1
                    continue
                now = clock.now = at
                events += 1
                owner.complete(item, now)
            else:  # WAKE
                if at != pending_wake:
                    stale += 1
                    continue
                now = clock.now = at
                events += 1
                pending_wake = inf
        elif next_t < inf:
            index = order[next_i]
            next_i += 1
            now = next_t
            next_t = trace[order[next_i]].t_s if next_i < n_rows else inf
            clock.now = now
            events += 1
            row = trace[index]
            record = records[index]
            if row.model not in lanes:
                record.status = UNKNOWN_MODEL
                record.finish_s = now
                continue        # nothing changed for the scheduler: no need to poll
            request = Request(index + 1, row.model, _NO_INPUTS, now, now + row.slo_ms / 1000.0,
                              row.priority, _Reply(record, clock), row.app, row.min_accuracy)
            try:
                plan = exit_plans.get(row.model) if exit_plans else None
                if plan is not None:
                    request.exit = choose_exit(plan, row.model, row.min_accuracy)
                    if allocations and row.model in allocations:
                        allocations[row.model].admit(request.exit.fixed, row.slo_ms)
                started = start_alone(request) if idle_path else None
                if started is None:
                    enqueue(request)
            except InferenceError as exc:
                record.status = exc.code
                record.finish_s = now
                continue
            if started is not None:
                driver.start(started, driver.complete_alone)
                continue        # the board was idle: nothing else waits for a slot
            away = scheduler.take_away(now)      # admitted for a peer: sent at once, as live
            if away is not None:
                driver.start(away, driver.complete)
        else:
            break
        if (next_t == inf and not scheduler.in_flight and not scheduler.queued()
                and (offloading is None or not offloading.outstanding)):
            break       # all answered; a pending wake could only poll an empty scheduler

        # --- 2. fill idle slots, 3. schedule the next wake ------------------------------------
        driver.fill(wake, slots=workers)

    # Every rule dispatches or expires what it holds, so nothing should be left; if a rule ever
    # held a request forever, say so in the records rather than lose it silently.
    for request in scheduler.drain():
        request.reply.record.finish_s = None
    return SimResult(
        records=records,
        duration_s=max([now, *(r.finish_s for r in records if r.finish_s is not None)]),
        events=events,
        stale_events=stale,
        batches=executor.batches + (offloading.batches if offloading is not None else 0),
        batch_histogram={name: dict(sorted(h.items())) for name, h in executor.histogram.items()},
        wall_s=time.perf_counter() - started_wall,
        placements=offloading.placements(executor.batches) if offloading is not None else {},
        offload=offloading.stats() if offloading is not None else {},
    )


__all__ = ["COMPLETE", "ARRIVAL", "WAKE", "SimModel", "SimResult", "SimBatch", "simulate", "sim_models_from_config"]


def _allocation(model: SimModel, clock: Callable[[], float]):
    """The online exit allocation of a simulated model, its stages priced as the simulator times
    them (each stage's share of the model's batch time), on the simulator's clock."""
    import dataclasses

    from agent.exits.online import OnlineAllocation
    plan = model.exits
    sizes = plan.batch_sizes
    stage_ms = tuple(tuple(1000.0 * model.latency.predict(b) * plan.stage_fraction(k, b) for b in sizes)
                     for k in range(len(plan.names)))
    return OnlineAllocation(model.name, dataclasses.replace(plan, stage_ms=stage_ms), processors=model.instances,
                            clock=clock)
