"""The exit allocation run while serving: which classes of requests a multi-exit model serves when
the board cannot serve them all (``exit_allocation = true`` in a model's config, ``exit_mode =
"fixed"``).

Without it, admission is per request and first come, first served: under overload the board takes
whatever arrives first that its deadline test passes, and a strict class (one that needs the last
exit) takes as much of the processor as three lax ones (answered at exit 1) would have. The
allocation (:mod:`agent.exits.allocation`) instead chooses, from the classes' rates, SLOs and
accuracy requirements, the set of classes that maximises the requests served per second, and this
module applies it at intake: a request whose class the current plan does not serve is refused
(``rejected``, with the plan's reason) before it takes a place in the queue.

What a class is here: the exit the fixed rule gives the request (its earliest accurate exit, what
the plan would choose too) and its SLO rounded down onto a geometric grid (``slo_step``), so a
stream of requests with jittered SLOs is a handful of classes, each priced at its tightest SLO.

What runs per request (:meth:`OnlineAllocation.admit`): the class's arrival-rate estimate (an
exponentially decayed count, time constant ``tau_s``) is updated and the plan's verdict for the
class read from a dict. The plan is made again, off the per-request path's cost, at most every
``replan_s``, and only when a class appeared or a rate moved by more than ``moved`` since the plan:
warm (local search from the last plan) and cold every ``cold_every`` plans, since a warm update may
drift from the optimum (``plan_allocation``). ``edge-agent bench core`` times both parts.

What the plan does not decide live: batch sizes. The plan's batch per class is a steady-state
figure (batches fill at the average rate); the scheduler's deadline-aware rule sees the actual
queue at each dispatch and stays the judge of batch size and of each request's deadline. The plan
prices stages by the times measured at load on this board (``ExitPlan.stage_ms``) and counts the
model's instances as processors (each instance runs on its own core: ``processors``).

Only ``fixed`` mode: in ``confidence`` mode where a request leaves depends on its input, which the
allocation's model (each class answered at one exit) does not describe.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

from agent.errors import REJECTED, InferenceError
from agent.exits.allocation import (DEFAULT_UTILISATION, AllocationError, ExitModel, Plan, Problem, UserClass,
                                    plan_allocation)
from agent.scheduler.exit_rule import ExitPlan

__all__ = ["OnlineAllocation", "ClassKey"]


@dataclass(frozen=True)
class ClassKey:
    """A class of requests: the exit that answers them and the SLO they are priced at (ms)."""

    exit: int
    slo_ms: float

    def name(self, exit_names: tuple[str, ...]) -> str:
        return f"{exit_names[self.exit]}@{self.slo_ms:g}ms"


class _Rate:
    """An arrival rate: a count decayed with time constant ``tau`` (per second). A class seen for
    ``t < tau`` seconds reads low (``rate (1 - exp(-t / tau))``): a new class is under-priced while
    its estimate warms up, so the plan refuses nothing on a burst's first requests (the deadline
    test still guards each one)."""

    __slots__ = ("value", "at")

    def __init__(self, now: float) -> None:
        self.value = 0.0
        self.at = now

    def add(self, now: float, tau: float) -> None:
        self.value = self.value * math.exp(-(now - self.at) / tau) + 1.0 / tau
        self.at = now

    def read(self, now: float, tau: float) -> float:
        return self.value * math.exp(-(now - self.at) / tau)


class OnlineAllocation:
    """The exit allocation of one multi-exit model, kept up to date from its arrivals (module
    docstring). Thread-safe: intakes call :meth:`admit` from their own threads."""

    def __init__(self, model: str, plan: ExitPlan, processors: int = 1, *,
                 utilisation: float = DEFAULT_UTILISATION, tau_s: float = 1.0, replan_s: float = 0.25,
                 moved: float = 0.1, slo_step: float = 1.25, cold_every: int = 8, max_classes: int = 8,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if plan.mode != "fixed":
            raise ValueError(f"model {model!r}: exit_allocation needs exit_mode = 'fixed' (exit_mode is "
                             f"{plan.mode!r}: where a request leaves then depends on its input)")
        if plan.stage_ms is None:
            raise ValueError(f"model {model!r}: exit_allocation needs each stage's time per batch size "
                             f"(measured at load, or the card's exit_profile)")
        self.model = model
        self.exits = plan
        self.exit_model = ExitModel(plan.names, plan.accuracy, plan.batch_sizes, plan.stage_ms)
        self.processors = processors
        self.utilisation = utilisation
        self.tau_s, self.replan_s, self.moved = tau_s, replan_s, moved
        self.slo_step, self.cold_every, self.max_classes = slo_step, cold_every, max_classes
        self.clock = clock
        self._lock = threading.Lock()
        self._rates: dict[ClassKey, _Rate] = {}
        self._planned_rates: dict[ClassKey, float] = {}
        self._served: dict[ClassKey, bool] = {}        # the plan's verdict per class
        self._buckets: dict[ClassKey, list[float]] = {}  # a refused class's [allowed rate, tokens, at]
        self.plan: Plan | None = None
        self._planned_at = -math.inf
        self._plans = 0
        self.counters = {"plans": 0, "cold_plans": 0, "refused_requests": 0}

    # --- per request ------------------------------------------------------------------------------

    def key(self, exit_index: int, slo_ms: float) -> ClassKey:
        """The class of a request answered at ``exit_index`` within ``slo_ms``: its SLO rounded down
        onto the grid ``slo_step ** n`` ms."""
        n = math.floor(math.log(max(slo_ms, 1e-3)) / math.log(self.slo_step) + 1e-9)
        return ClassKey(exit_index, round(self.slo_step ** n, 6))

    def admit(self, exit_index: int, slo_ms: float) -> None:
        """Count one arrival of its class and refuse it (``InferenceError``, ``rejected``) if the
        current plan does not serve the class. Re-plans first when it is due."""
        key = self.key(exit_index, slo_ms)
        now = self.clock()
        with self._lock:
            rate = self._rates.get(key)
            if rate is None:
                rate = self._rates[key] = _Rate(now)
            rate.add(now, self.tau_s)
            if now - self._planned_at >= self.replan_s and self._due(now):
                self._replan(now)
            if self._served.get(key, True):     # a class the plan has not seen yet: admitted
                return
            bucket = self._buckets.get(key)
            if bucket is not None:
                allowed, tokens, at = bucket
                tokens = min(tokens + allowed * (now - at), max(1.0, allowed * self.replan_s))
                bucket[1], bucket[2] = tokens, now
                if tokens >= 1.0:
                    bucket[1] = tokens - 1.0
                    return
            self.counters["refused_requests"] += 1
            plan = self.plan
            allowed = 0.0 if bucket is None else bucket[0]
        raise InferenceError(REJECTED, (
            f"model {self.model!r} is over capacity and its exit allocation gives the processor to the classes "
            f"that serve the most requests: this request's class (exit {self.exits.names[key.exit]!r}, SLO "
            f"{slo_ms:g} ms) gets {allowed:.0f} requests/s now; the plan serves {plan.served_rate:.0f} of "
            f"{plan.offered_rate:.0f} requests/s offered in whole classes "
            f"({', '.join(plan.served) or 'none'})"), "min_accuracy")

    # --- re-planning (under the lock) --------------------------------------------------------------

    def _due(self, now: float) -> bool:
        if self.plan is None or set(self._rates) != set(self._planned_rates):
            return True
        for key, planned in self._planned_rates.items():
            current = self._rates[key].read(now, self.tau_s)
            if abs(current - planned) > self.moved * max(planned, 1e-9):
                return True
        return False

    def _replan(self, now: float) -> None:
        self._planned_at = now
        rates = {key: r.read(now, self.tau_s) for key, r in self._rates.items()}
        # Forget classes gone quiet (under one request per ten time constants).
        for key in [k for k, v in rates.items() if v < 0.1 / self.tau_s]:
            del self._rates[key]
            del rates[key]
        ranked = sorted(rates, key=lambda k: -rates[k])
        kept = ranked[:self.max_classes]     # the rest (rarest) are admitted unplanned
        classes = []
        for key in kept:
            classes.append(UserClass(key.name(self.exits.names), rates[key], key.slo_ms,
                                     self.exits.accuracy[key.exit]))
        self._planned_rates = rates
        if not classes:
            self.plan, self._served = None, {}
            return
        cold = self.plan is None or self._plans % self.cold_every == 0
        try:
            plan = plan_allocation(self._problem(classes), previous=None if cold else self.plan)
        except AllocationError:
            # A class no exit can serve in its SLO even alone: the per-request deadline test
            # refuses its requests with their own reason; plan the others.
            possible = []
            for c in classes:
                try:
                    self._problem([c])
                    possible.append(c)
                except AllocationError:
                    pass
            plan = plan_allocation(self._problem(possible)) if possible else None
        self._plans += 1
        self.counters["plans"] += 1
        self.counters["cold_plans"] += int(cold)
        self.plan = plan
        served = {}
        if plan is not None:
            names = {key.name(self.exits.names): key for key in kept}
            for name, choice in zip(plan.classes, plan.choices):
                served[names[name]] = choice is not None
        self._served = served
        self._share_leftover(now, rates, plan)

    def _share_leftover(self, now: float, rates: dict[ClassKey, float], plan: Plan | None) -> None:
        """The plan serves classes whole, so under overload it can leave much of the processor idle
        (a costly class that does not fit whole is refused whole). The capacity it leaves goes to
        the refused classes as rate limits, cheapest request first (the fractional knapsack's
        order, optimal for the served rate): each class's cost per request is its stages at its
        largest batch that fits its SLO alone."""
        old = self._buckets
        self._buckets = {}
        if plan is None:
            return
        left = plan.capacity_ms_per_s - plan.busy_ms_per_s
        refused = [key for key, ok in self._served.items() if not ok]
        model = self.exit_model
        costs = {}
        for key in refused:
            fits = [j for j, b in enumerate(model.batch_sizes)
                    if sum(model.stage_ms[k][j] for k in range(key.exit + 1)) <= key.slo_ms]
            if fits:
                j = fits[-1]
                b = model.batch_sizes[j]
                costs[key] = sum(model.fixed_ms[k] / b + model.per_item_ms[k] for k in range(key.exit + 1))
        for key in sorted(costs, key=costs.get):
            allowed = max(0.0, min(rates.get(key, 0.0), left / costs[key]))
            left -= allowed * costs[key]
            tokens = old[key][1] if key in old else 0.0
            self._buckets[key] = [allowed, tokens, now]

    def _problem(self, classes: list[UserClass]) -> Problem:
        return Problem(classes, self.exit_model, self.utilisation, self.processors)

    # --- status ------------------------------------------------------------------------------------

    def status(self) -> dict:
        """The plan as the agent's status shows it: classes with their rate, the rate each refused
        class is still given, and the plan's figures."""
        with self._lock:
            plan = self.plan
            now = self.clock()
            names = self.exits.names
            rates = {key.name(names): round(r.read(now, self.tau_s), 2) for key, r in self._rates.items()}
            limits = {key.name(names): round(b[0], 2) for key, b in self._buckets.items()}
            out = {"classes": rates, "limited": limits, **self.counters}
        if plan is not None:
            out.update(served=list(plan.served), refused=list(plan.refused),
                       served_rate=round(plan.served_rate, 2), offered_rate=round(plan.offered_rate, 2),
                       busy_ms_per_s=round(plan.busy_ms_per_s, 1), capacity_ms_per_s=round(plan.capacity_ms_per_s, 1))
        return out
