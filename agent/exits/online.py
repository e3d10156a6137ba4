"""The exit allocation run while serving: how much of each class of requests a multi-exit model
admits when the board cannot serve them all (``exit_allocation = true`` in a model's config,
``exit_mode = "fixed"``).

Without it, admission is per request: under overload the board takes whatever its deadline test
passes, first come, first served. With it, the classes' rates, SLOs and exits decide: each class's
cost per request (its stages up to its exit, as measured at load, at the largest batch that meets
its SLO) orders the classes, and the processors' capacity (``utilisation`` of ``processors``, the
model's instances, one core each; all of it by default: the scheduler's per-request deadline test
still guards each request, so the shares need no margin of their own) is filled cheapest request
first; the class where the capacity runs out is admitted at the rate that fills it
(a token bucket), the classes after it not at all. That is the allocation problem's relaxation,
where a class may be served in part (online a class is served in part: requests are refused one by
one), whose optimum for the served rate is exactly this greedy order (the fractional knapsack).
Why not the whole-class plan (``plan_allocation``, the joint batching/exit paper's setting: users
scheduled whole): measured in ``edge-agent bench exits`` past capacity (BENCHMARKS.md), admitting by
the whole-class plan served fewer requests than plain per-request admission, since a class that does
not fit whole is refused whole while the capacity it would have used stays idle; the relaxation is
the right model for admission, the whole-class plan for placing users (``bench exit-alloc``).

What a class is here: the exit the fixed rule gives the request (its earliest accurate exit) and its
SLO rounded down onto a geometric grid (``slo_step``), so requests with jittered SLOs make a handful
of classes, each priced at its tightest SLO.

What runs per request (:meth:`OnlineAllocation.admit`): the class's arrival-rate estimate (an
exponentially decayed count, time constant ``tau_s``) is updated and the class's verdict read from a
dict (and its bucket, for the class at the boundary). The shares are computed again at most every
``replan_s``, and only when a class appeared or a rate moved by more than ``moved``. ``edge-agent
bench core`` times the call.

What it does not decide: batch sizes and each request's deadline, which stay with the scheduler's
deadline-aware rule and admission test (they see the actual queue at each dispatch).

Only ``fixed`` mode: in ``confidence`` mode where a request leaves depends on its input, which a
class's single exit does not describe.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

from agent.errors import REJECTED, InferenceError
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
                 utilisation: float = 1.0, tau_s: float = 1.0, replan_s: float = 0.25,
                 moved: float = 0.1, slo_step: float = 1.25,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if plan.mode != "fixed":
            raise ValueError(f"model {model!r}: exit_allocation needs exit_mode = 'fixed' (exit_mode is "
                             f"{plan.mode!r}: where a request leaves then depends on its input)")
        if plan.stage_ms is None:
            raise ValueError(f"model {model!r}: exit_allocation needs each stage's time per batch size "
                             f"(measured at load, or the card's exit_profile)")
        self.model = model
        self.exits = plan
        self.processors = processors
        self.utilisation = utilisation
        self.tau_s, self.replan_s, self.moved = tau_s, replan_s, moved
        self.slo_step = slo_step
        self.clock = clock
        self._lock = threading.Lock()
        self._rates: dict[ClassKey, _Rate] = {}
        self._planned_rates: dict[ClassKey, float] = {}
        self._served: dict[ClassKey, bool] = {}          # admitted whole, per class
        self._buckets: dict[ClassKey, list[float]] = {}  # a class admitted in part: [allowed rate, tokens, at]
        self._check_at = -math.inf      # when admit next asks whether the shares are due again
        self.busy_ms_per_s = 0.0        # what the admitted shares cost, by the stage envelope
        self.counters = {"plans": 0, "refused_requests": 0}

    # --- per request ------------------------------------------------------------------------------

    def key(self, exit_index: int, slo_ms: float) -> ClassKey:
        """The class of a request answered at ``exit_index`` within ``slo_ms``: its SLO rounded down
        onto the grid ``slo_step ** n`` ms."""
        n = math.floor(math.log(max(slo_ms, 1e-3)) / math.log(self.slo_step) + 1e-9)
        return ClassKey(exit_index, round(self.slo_step ** n, 6))

    def admit(self, exit_index: int, slo_ms: float) -> None:
        """Count one arrival of its class and refuse it (``InferenceError``, ``rejected``) beyond the
        class's share (module docstring). Computes the shares again first when that is due."""
        key = self.key(exit_index, slo_ms)
        now = self.clock()
        with self._lock:
            rate = self._rates.get(key)
            if rate is None:
                rate = self._rates[key] = _Rate(now)
            rate.add(now, self.tau_s)
            if now >= self._check_at:
                self._check_at = now + self.replan_s
                if self._due(now):
                    self._replan(now)
            if self._served.get(key, True):     # a class not priced yet: admitted
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
            allowed = 0.0 if bucket is None else bucket[0]
            offered = self._rates[key].read(now, self.tau_s)
        raise InferenceError(REJECTED, (
            f"model {self.model!r} is over capacity, and its exit allocation admits the cheapest requests first: "
            f"this request's class (exit {self.exits.names[key.exit]!r}, SLO {slo_ms:g} ms, about {offered:.0f} "
            f"requests/s offered) is admitted at {allowed:.0f} requests/s now"), "min_accuracy")

    # --- re-planning (under the lock) --------------------------------------------------------------

    def _due(self, now: float) -> bool:
        if set(self._rates) != set(self._planned_rates):
            return True
        for key, planned in self._planned_rates.items():
            current = self._rates[key].read(now, self.tau_s)
            if abs(current - planned) > self.moved * max(planned, 1e-9):
                return True
        return False

    def _replan(self, now: float) -> None:
        rates = {key: r.read(now, self.tau_s) for key, r in self._rates.items()}
        # Forget classes gone quiet (under one request per ten time constants).
        for key in [k for k, v in rates.items() if v < 0.1 / self.tau_s]:
            del self._rates[key]
            del rates[key]
        self._planned_rates = rates
        self.counters["plans"] += 1
        costs = {key: self._cost_ms(key, rates[key]) for key in rates}
        old, self._buckets, served = self._buckets, {}, {}
        left = 1000.0 * self.utilisation * self.processors
        for key in sorted(costs, key=costs.get):
            need = rates[key] * costs[key]
            if need <= left:
                served[key] = True
                left -= need
                continue
            served[key] = False
            allowed = max(0.0, left / costs[key])
            left -= allowed * costs[key]
            self._buckets[key] = [allowed, old[key][1] if key in old else 0.0, now]
        self.busy_ms_per_s = 1000.0 * self.utilisation * self.processors - left
        self._served = served

    def _cost_ms(self, key: ClassKey, rate: float) -> float:
        """Busy ms per request of ``key`` at ``rate``: its stages up to its exit, as measured, at the
        largest profiled batch whose fill wait (at the class's own rate) and stages meet its SLO,
        divided by that batch (batch 1 if none does)."""
        sizes, stage_ms = self.exits.batch_sizes, self.exits.stage_ms
        best = 0
        for j, b in enumerate(sizes):
            fill = 0.0 if b == 1 else 1000.0 * (b - 1) / max(rate, 1e-9)
            if fill + sum(stage_ms[k][j] for k in range(key.exit + 1)) <= key.slo_ms:
                best = j
        return sum(stage_ms[k][best] for k in range(key.exit + 1)) / sizes[best]

    # --- status ------------------------------------------------------------------------------------

    def status(self) -> dict:
        """The shares as the agent's status shows them: each class's rate estimate, the classes
        admitted in part with the rate each is given, and what the admitted shares cost."""
        with self._lock:
            now = self.clock()
            names = self.exits.names
            return {"classes": {key.name(names): round(r.read(now, self.tau_s), 2) for key, r in self._rates.items()},
                    "limited": {key.name(names): round(b[0], 2) for key, b in self._buckets.items()},
                    "busy_ms_per_s": round(self.busy_ms_per_s, 1),
                    "capacity_ms_per_s": round(1000.0 * self.utilisation * self.processors, 1), **self.counters}
