"""The simulator's executor: how long a batch takes, drawn from the board's latency profile.

The live executor runs a backend and measures; this one *predicts*: a batch of ``b`` on model ``m``
needs ``table[m].predict(b)`` seconds of work, times multiplicative lognormal noise.

Timing model (kept deliberately simple, and exactly reproducible for ``jitter = 0``):

* **Work.** ``work_s = table.predict(b) * exp(N(0, jitter))``. The noise has median 1 because the
  profiler's table holds *medians* (``agent.profiler.measure_latency_table``), so the simulated
  median equals the profiled one; its mean is ``exp(jitter**2 / 2)`` times higher, a right skew like
  real run times. Each model draws from its own stream, seeded by ``(seed, model name)``: adding a
  model to a configuration does not reshuffle another model's noise.
* **Concurrency: processor sharing.** Up to ``cores`` batches run at once without interfering (one
  intra-op thread per instance, one core each: the live agent's set-up). With ``running > cores``
  every running batch progresses at ``rate = cores / running`` seconds of work per second, so the
  board's total throughput stays at ``cores`` and each batch is slowed proportionally. A batch's
  finish time therefore changes whenever another batch starts or ends while the board is
  oversubscribed; :meth:`SimExecutor.begin` and :meth:`SimExecutor.stop` return every batch whose
  finish moved, each with a new ``generation`` so the engine can ignore its stale completion event.
  While the rate stays 1, a batch finishes at exactly ``start + work_s`` (no accumulated rounding).

* **Interference (optional).** With ``slowdown`` (model name -> ``f(n)``, the profiler's fitted
  factor ``agent.profiler.fit.slowdown`` for ``n`` batches running), each running batch of a model
  progresses at ``1 / f(n)``: contention on memory bandwidth and caches as well as sharing, per
  model. Plain processor sharing is the case ``f(n) = max(1, n / cores)``. Models missing from the
  mapping keep the processor-sharing rate. The fleet planner's replay (``agent.fleet.replay``)
  uses it, so a placement is checked under the same interference model it was planned with.

What it leaves out: GPU/TPU queueing inside the device, and a backend's per-call overhead outside
the profiled run.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from agent.core import LatencyTable
from agent.runtime.executor import BatchOutcome, OnDone
from agent.scheduler.dispatcher import Dispatch

_NO_OUTPUTS: dict = {}


class SimBatch:
    """One batch running in the simulation: its work and where it stands.

    ``remaining_s`` is the work (seconds at full speed) left as of virtual time ``since``;
    ``finish`` is when it completes at the current rate; ``generation`` counts finish changes.
    """

    __slots__ = ("payload", "model", "size", "work_s", "remaining_s", "since", "started", "finish", "generation",
                 "on_done", "rate")

    def __init__(self, payload: Any, model: str, size: int, work_s: float, now: float) -> None:
        self.payload = payload
        self.model = model
        self.size = size
        self.work_s = work_s
        self.remaining_s = work_s
        self.since = now
        self.started = now
        self.finish = math.inf
        self.generation = 0
        self.on_done: OnDone | None = None
        self.rate = 1.0                 # work seconds per second now (used with a slowdown mapping)

    def __repr__(self) -> str:
        return (f"SimBatch({self.model!r}, size={self.size}, work_s={self.work_s:.6g}, "
                f"finish={self.finish:.6g}, generation={self.generation})")


class SimExecutor:
    """Draws batch run times from latency tables and shares ``cores`` among running batches.

    ``tables`` maps a model name to its :class:`~agent.core.LatencyTable`; ``jitter`` is the
    lognormal sigma, one float for every model or a per-model mapping (missing models: 0);
    ``cores=None`` means no sharing at all (every batch runs at full speed).

    As the driver's executor (``agent.runtime.executor.Executor``): :meth:`start` reads the virtual
    time from ``clock.now`` and hands every batch whose finish time is new or changed to
    ``schedule`` (the engine's event heap); when that completion comes due the engine calls
    :meth:`complete`, which calls the batch's ``on_done``. It counts the batches it ran, per model and
    size (``histogram``).
    """

    def __init__(self, tables: Mapping[str, LatencyTable], seed: int = 0,
                 jitter: float | Mapping[str, float] = 0.0, cores: int | None = None,
                 clock: Any = None, schedule: Callable[[SimBatch], None] | None = None,
                 slowdown: Mapping[str, Callable[[int], float]] | None = None) -> None:
        if cores is not None and cores < 1:
            raise ValueError(f"cores = {cores!r}: expected an integer >= 1 (or None: no sharing)")
        self.tables = dict(tables)
        self.cores = cores
        self.slowdown = dict(slowdown) if slowdown else None
        self._clock = clock
        self._schedule = schedule
        self.batches = 0
        self.histogram: dict[str, Counter] = {name: Counter() for name in self.tables}
        self._jitter: dict[str, float] = {}
        for name in self.tables:
            sigma = jitter.get(name, 0.0) if isinstance(jitter, Mapping) else jitter
            if not (sigma >= 0.0 and math.isfinite(sigma)):
                raise ValueError(f"jitter of model {name!r} = {sigma!r}: expected a finite number >= 0")
            self._jitter[name] = float(sigma)
        # str seeds are hashed with SHA-512 by random.seed: stable across runs and Python versions.
        self._rngs = {name: random.Random(f"edge-agent-sim/{seed}/{name}") for name in self.tables}
        self.running: list[SimBatch] = []
        # Multi-exit models run stage by stage (:meth:`_stage`): model name -> ExitPlan, set by the
        # engine, with ``answer_part`` (``Driver.answer_part``) their early items go out through.
        self.exits: dict[str, Any] = {}
        self.answer_part: Callable[..., None] | None = None
        # exit_rebatch (agent.exits.survivors): lane -> (its stage, the lane its survivors go on to,
        # None for the last), and ``hand_on`` (``Driver.hand_on``) they go through.
        self.stage_lanes: dict[str, tuple[int, str | None]] = {}
        self.hand_on: Callable[..., None] | None = None

    def start(self, dispatch: Dispatch, on_done: OnDone) -> None:
        """Start ``dispatch``'s batch now; its completion is scheduled, ``on_done`` called then."""
        size = len(dispatch.requests)
        self.batches += 1
        self.histogram[dispatch.model][size] += 1
        plan = self.exits.get(dispatch.model)
        if plan is not None:
            dispatch.stage_sizes = []
            self._stage(dispatch, on_done, plan, self.stage_lanes.get(dispatch.model, (0, None))[0], list(range(size)))
            return
        changed = self.begin(dispatch, dispatch.model, size, self._clock.now)
        changed[0].on_done = on_done
        for batch in changed:
            self._schedule(batch)

    def complete(self, batch: SimBatch, now: float) -> None:
        """``batch``'s scheduled completion came due: re-time the others, then answer it."""
        for other in self.stop(batch, now):
            self._schedule(other)
        batch.on_done(batch.payload, BatchOutcome([_NO_OUTPUTS] * batch.size, now - batch.started))

    def _stage(self, dispatch: Dispatch, on_done: OnDone, plan: Any, k: int, alive: list[int]) -> None:
        """Start stage ``k`` of a multi-exit batch (``self.exits``: model name ->
        ``agent.scheduler.exit_rule.ExitPlan``) on the items ``alive``, as live (``agent.runtime.staged``):
        stage ``k`` on the ``m`` items still in the batch takes ``table.predict(m)`` times the stage's
        share of a whole run (from the card's stage times), times the noise; after it the items
        leaving there are answered at once (``answer_part``) and the rest go on. Fixed-mode items
        leave at their exit. A confidence-mode item's exit is drawn: without outputs to be confident
        about, it leaves by stage ``k`` with the probability that the card's calibration split reached
        its threshold at some exit up to ``k`` (the coverage at each exit's threshold, read off its
        calibration curve, taken as nested), from the model's own seeded stream."""
        m = len(alive)
        dispatch.stage_sizes.append(m)
        model = dispatch.model
        work = self.noisy(model, self.tables[model].predict(m) * plan.stage_fraction(k, m))
        changed = self.begin((dispatch, on_done, plan, k, alive), model, m, self._clock.now, work_s=work)
        changed[0].on_done = self._stage_done
        for batch in changed:
            self._schedule(batch)

    def _stage_done(self, payload: tuple, outcome: BatchOutcome) -> None:
        dispatch, on_done, plan, k, alive = payload
        now = self._clock.now
        requests = dispatch.requests
        last = k == plan.last
        rng = self._rngs[dispatch.model]
        leaving, staying = [], []
        for i in alive:
            if last or _leaves_here(requests[i].exit, plan, k, rng):
                leaving.append((i, _NO_OUTPUTS))
            else:
                staying.append(i)
        compute_s = now - dispatch.started
        if leaving:
            self.answer_part(dispatch, leaving, compute_s, {"exit": plan.names[k]})
        onward = self.stage_lanes.get(dispatch.model, (0, None))[1] if staying else None
        if onward is not None:
            self.hand_on(dispatch, onward, staying, {})
            on_done(dispatch, BatchOutcome([None] * len(requests), compute_s))
        elif staying:
            self._stage(dispatch, on_done, plan, k + 1, staying)
        else:
            on_done(dispatch, BatchOutcome([None] * len(requests), compute_s))

    def work_s(self, model: str, batch_size: int) -> float:
        """Seconds a batch of ``batch_size`` needs at full speed: the profile times the noise."""
        return self.noisy(model, self.tables[model].predict(batch_size))

    def noisy(self, model: str, predicted_s: float) -> float:
        """``predicted_s`` times a draw of ``model``'s run-time noise (its own stream)."""
        sigma = self._jitter[model]
        if sigma == 0.0:
            return predicted_s
        return predicted_s * math.exp(self._rngs[model].gauss(0.0, sigma))

    def start_part(self, payload: Any, model: str, size: int, predicted_s: float, on_done: OnDone) -> None:
        """Start a part of a batch on this board now (an offloaded batch's head: ``agent.sim.offload``),
        sharing the cores with the batches running here: ``predicted_s`` of work times ``model``'s
        noise; ``on_done(payload, outcome)`` when it ends. Not counted in ``batches``."""
        changed = self.begin(payload, model, size, self._clock.now, work_s=self.noisy(model, predicted_s))
        changed[0].on_done = on_done
        for batch in changed:
            self._schedule(batch)

    def rate(self, running: int | None = None) -> float:
        """Seconds of work each running batch gets per second when ``running`` batches share the board."""
        n = len(self.running) if running is None else running
        cores = self.cores
        if cores is None or n <= cores:
            return 1.0
        return cores / n

    def begin(self, payload: Any, model: str, batch_size: int, now: float,
              work_s: float | None = None) -> Sequence[SimBatch]:
        """Start a batch at ``now`` (the timing model alone; ``work_s``: its work, default drawn from
        the model's table); returns the batches whose finish time is new or changed (the new one first)."""
        batch = SimBatch(payload, model, batch_size, self.work_s(model, batch_size) if work_s is None else work_s, now)
        running = self.running
        running.append(batch)
        if self.slowdown is not None:
            return self._retime(now, new=batch)
        n, cores = len(running), self.cores
        if cores is None or n <= cores:      # the common case: the rate was and stays 1
            batch.finish = now + batch.work_s
            return (batch,)
        new_rate = cores / n
        changed = self._rerate(now, self.rate(n - 1), new_rate, exclude=batch)
        batch.finish = now + batch.work_s / new_rate
        return [batch, *changed]

    def stop(self, batch: SimBatch, now: float) -> Sequence[SimBatch]:
        """``batch`` completed at ``now``; returns the other batches whose finish time changed."""
        running = self.running
        n, cores = len(running), self.cores
        running.remove(batch)
        if self.slowdown is not None:
            return self._retime(now, new=None)
        if cores is None or n <= cores:
            return ()
        return self._rerate(now, cores / n, self.rate(n - 1), exclude=None)

    def _model_rate(self, model: str, n: int) -> float:
        """With a slowdown mapping: the rate of a batch of ``model`` while ``n`` batches run."""
        f = self.slowdown.get(model)
        if f is None:
            return self.rate(n)
        return 1.0 / max(1.0, float(f(n)))

    def _retime(self, now: float, new: SimBatch | None) -> list[SimBatch]:
        """Per-model rates (``slowdown``): account each running batch's work at its old rate up to
        ``now``, give it its rate for the new count, and return those whose finish moved (``new`` first)."""
        n = len(self.running)
        changed = []
        for batch in self.running:
            rate = self._model_rate(batch.model, n)
            if batch is new:
                batch.rate = rate
                batch.finish = now + batch.work_s / rate
                continue
            if rate == batch.rate:
                continue
            remaining = batch.remaining_s - (now - batch.since) * batch.rate
            batch.remaining_s = remaining if remaining > 0.0 else 0.0
            batch.since = now
            batch.rate = rate
            batch.finish = now + batch.remaining_s / rate
            batch.generation += 1
            changed.append(batch)
        return [new, *changed] if new is not None else changed

    def _rerate(self, now: float, old_rate: float, new_rate: float, exclude: SimBatch | None) -> list[SimBatch]:
        """Account the work done at ``old_rate`` up to ``now`` and re-time every running batch."""
        changed = []
        for batch in self.running:
            if batch is exclude:
                continue
            remaining = batch.remaining_s - (now - batch.since) * old_rate
            batch.remaining_s = remaining if remaining > 0.0 else 0.0
            batch.since = now
            batch.finish = now + batch.remaining_s / new_rate
            batch.generation += 1
            changed.append(batch)
        return changed


def _leaves_here(choice: Any, plan: Any, k: int, rng: random.Random) -> bool:
    """Whether an item that reached exit ``k`` (not the last) leaves there: its fixed exit, or, in
    confidence mode, a draw with the chance that the calibration split left by ``k`` given it had
    not left before (module docstring)."""
    if choice is None:
        return False
    if choice.fixed is not None:
        return choice.fixed <= k
    before = _covered(choice, plan, k - 1)
    by_now = _covered(choice, plan, k)
    if by_now <= before:
        return False
    return rng.random() < (by_now - before) / (1.0 - before) if before < 1.0 else True


def _covered(choice: Any, plan: Any, k: int) -> float:
    """The share of items whose confidence reached their threshold at some exit up to ``k``, taking
    the exits' confident sets as nested (the largest coverage among them)."""
    best = 0.0
    for j in range(k + 1):
        threshold = choice.thresholds[j]
        if threshold is None:
            continue
        calibration = plan.calibration[j]
        coverage = float(np.interp(threshold, calibration.grid, calibration.coverage))
        best = max(best, coverage)
    return best
