"""Admission control: refuse at arrival a request whose deadline cannot be met.

DeepRT (PAPERS.md §3) admits a request only if the whole admitted set stays schedulable, with a
utilisation test first and an exact EDF imitation second. This is a cheaper per-request test in the
same spirit, and ours: it predicts when the arriving request would finish if it joined its model's
queue now, from the profiled latency table, and refuses it when that is after its deadline.

The prediction, for a request of model m:

- ``ahead`` = queued requests of m that pop before it (higher priority, or an earlier or equal
  deadline: ``DeadlineQueue.count_ahead``, one pass in C);
- those ``ahead + 1`` requests run in batches of at most ``max_batch``; batch ``j`` (0-based) runs on
  the instance that becomes free ``j mod I``-th earliest, in round ``j // I``, where the ``I``
  instances free up now (idle) or when their running batch is predicted to end;
- the request finishes at that instance's free time + full batches before it + its own batch.

The profiled table holds the backend's own run time; a batch in the live agent also pays batch
assembly, replies and thread hand-offs, and shares the CPU with the intake. So every finished batch
reports its observed duration (dispatch to done), and an exponentially weighted mean of the excess
over the table's prediction is added to every predicted batch: the model adapts online to what
the board really delivers (an overrun raises it, a calm period lowers it).

Models share the execution slots: the scheduler also pours every model's predicted work that will
run before the request (queued requests that pop first) over the slots, each free now or when its
batch in flight is predicted to end, to find when a slot is free for it; the later of the two
predictions decides.

What it leaves out, and so where it is optimistic: batches smaller than ``max_batch`` (the
deadline-aware rule may pick them), CPU taken by the intake and the applications themselves, and
requests that arrive later with earlier deadlines and overtake this one (EDF across models: a
tight request of an expensive model pushes cheap ones back). So the test is calibrated online, as
a quantile (ours): every admitted request that misses raises a learned slack by ``q x STEP_S``, every
one that makes it lowers it by ``(1 - q) x STEP_S`` (never below 0), and a request is admitted only
if its predicted finish plus the slack is within its deadline. This is the stochastic-approximation
quantile tracker: the slack settles where a fraction ``1 - q`` of admitted requests miss (the
``MISS_QUANTILE`` target), whatever the model above leaves out, and falls back to 0 off overload.
An admitted request that still cannot make it is shed before it runs (``shed_hopeless``).
"""
from __future__ import annotations

import math
from typing import Sequence

from agent.core import DeadlineQueue, LatencyTable


class AdmissionControl:
    EWMA_WEIGHT = 0.2     # weight of the newest batch in the excess estimate
    MISS_QUANTILE = 0.98  # the slack aims at 98% of admitted requests in time (2% miss)
    STEP_S = 0.0001       # a miss adds 0.098 ms of slack, a request in time takes off 0.002 ms

    def __init__(self, table: LatencyTable, max_batch: int, margin_s: float = 0.0) -> None:
        self.table = table
        self.limit_batch(max_batch)   # sets max_batch (checked) and the full batch's predicted time
        self.margin_s = margin_s
        self.excess_s = 0.0       # learned: observed batch duration minus the table's prediction
        self.slack_s = 0.0        # learned: the quantile slack (module docstring)
        self.overruns = 0         # batches that took longer than predicted + the learned excess

    def limit_batch(self, max_batch: int) -> None:
        """Predict with batches of at most ``max_batch`` from now on (the scheduler's hold cap)."""
        if max_batch < 1:
            raise ValueError(f"max_batch = {max_batch}: expected >= 1")
        self.max_batch = max_batch
        self._full_batch_s = self.table.predict(max_batch)

    def observe(self, batch_size: int, duration_s: float) -> None:
        """A batch of ``batch_size`` took ``duration_s`` from dispatch to done: adapt the excess."""
        excess = duration_s - self.table.predict(batch_size)
        if excess > self.excess_s + self.margin_s:
            self.overruns += 1
        self.excess_s += self.EWMA_WEIGHT * (excess - self.excess_s)

    def calibrate(self, missed: bool, count: int = 1) -> None:
        """``count`` admitted requests were answered in time, or missed (late, expired or shed):
        move the slack (misses add up; each request in time steps down, never below 0)."""
        if missed:
            self.slack_s += count * self.MISS_QUANTILE * self.STEP_S
        else:
            self.slack_s = max(0.0, self.slack_s - count * (1.0 - self.MISS_QUANTILE) * self.STEP_S)

    def batch_s(self, batch_size: int) -> float:
        """Predicted duration of one batch: the profiled time plus the learned excess."""
        return max(0.0, self.table.predict(batch_size) + self.excess_s)

    def work_s(self, n: int) -> float:
        """Predicted compute for ``n`` requests in batches of at most ``max_batch``."""
        if n <= 0:
            return 0.0
        full_batches, rest = divmod(n, self.max_batch)
        return full_batches * self.batch_s(self.max_batch) + (self.batch_s(rest) if rest else 0.0)

    def refuse(self, queue: DeadlineQueue, deadline: float, priority: int, now: float,
               instances: int, busy_until: Sequence[float], shared_start: float | None = None) -> str | None:
        """``None`` to admit, else the reason (for the ``rejected`` reply).

        Two bounds, the later wins: this model's own queue on its instances (above), and, when other
        models share the execution slots, ``shared_start``: when the slots will have done every
        model's work that runs before this request (``Scheduler._shared_start``).
        """
        ahead = queue.count_ahead(deadline, priority)
        if ahead == 0 and len(busy_until) < instances and shared_start is None:
            # The common case on a board with headroom: an idle instance, nothing ahead.
            finish = now + self.batch_s(1)
            if finish + self.margin_s + self.slack_s <= deadline:
                return None
        n = ahead + 1
        batches = -(-n // self.max_batch)
        last_batch = n - (batches - 1) * self.max_batch
        free_at = sorted([now] * (instances - len(busy_until)) + [max(now, t) for t in busy_until])
        j = batches - 1
        full = max(0.0, self._full_batch_s + self.excess_s)
        finish = free_at[j % instances] + (j // instances) * full + self.batch_s(last_batch)
        if shared_start is not None:
            finish = max(finish, shared_start + self.batch_s(last_batch))
        if finish + self.margin_s + self.slack_s <= deadline:
            return None
        return (f"deadline cannot be met: predicted finish in {1000 * (finish - now):.1f} ms + "
                f"{1000 * self.slack_s:.1f} ms learned slack, deadline in "
                f"{1000 * (deadline - now):.1f} ms ({ahead} queued ahead, batches of up to {self.max_batch}, "
                f"{instances} instance{'s' if instances != 1 else ''}"
                + ("" if shared_start is None else
                   f"; slots shared with other models free for it in {1000 * max(0.0, shared_start - now):.1f} ms")
                + ")")


class CostShare:
    """Under overload, refuse the most expensive models' requests first (ours).

    Goodput counts requests, and a request of a cheap model costs the board a fraction of an
    expensive one's compute: when more work arrives than the execution slots can do, serving the
    cheap models fully and giving the expensive ones what is left answers the most requests in time
    (the greedy optimum of the fluid problem: maximise admitted requests subject to their summed
    work fitting the capacity). Per-request deadline tests alone (:class:`AdmissionControl`) refuse
    whichever request arrives when the queue is long, whatever it costs, and EDF then lets a tight
    request of an expensive model push several cheap ones past their deadlines.

    Each model's demand is tracked as work arriving per second (its requests' predicted per-item
    cost, exponentially decayed with time constant ``TAU_S``). On an arrival of model m, with the
    models sorted by per-item cost, m's share of the ``capacity`` (in slots, i.e. seconds of work per
    second) is what the cheaper models' demand leaves; the fraction ``share / demand`` of m's
    requests is admitted (deterministically, by accumulating credit), the rest refused with the
    figures in the reason. Requests that pass still face the deadline test. With demand below
    capacity every model gets everything: nothing changes off overload. Requests with a priority
    above 0 are never refused here, nor those of the cheapest model: when it alone brings more work
    than the slots can do, a share would refuse its requests blindly, loose and tight alike, where
    the deadline test refuses those that cannot finish and keeps those that can wait out a burst.
    """

    TAU_S = 0.25

    def __init__(self, lanes: "dict[str, AdmissionControl]", capacity: float) -> None:
        if not capacity > 0:
            raise ValueError(f"capacity = {capacity!r}: expected slots > 0")
        self.lanes = dict(lanes)
        self.capacity = float(capacity)
        self._demand = {name: 0.0 for name in self.lanes}    # work per second, decayed to _at[name]
        self._at = {name: 0.0 for name in self.lanes}
        self._credit = {name: 1.0 for name in self.lanes}
        self.refused = {name: 0 for name in self.lanes}

    def item_cost_s(self, model: str) -> float:
        """Predicted compute per request when batches are full (the learned excess included)."""
        admission = self.lanes[model]
        return admission.batch_s(admission.max_batch) / admission.max_batch

    def demand(self, model: str, now: float) -> float:
        """Model's arriving work, seconds of compute per second, as of ``now``."""
        return self._demand[model] * math.exp(-max(0.0, now - self._at[model]) / self.TAU_S)

    def refuse(self, model: str, priority: int, now: float) -> str | None:
        cost = self.item_cost_s(model)
        demand = self.demand(model, now) + cost / self.TAU_S
        self._demand[model], self._at[model] = demand, now
        left = self.capacity
        for other in sorted(self.lanes, key=lambda name: (self.item_cost_s(name), name)):
            if other == model:
                break
            left -= self.demand(other, now)
        share = min(1.0, max(0.0, left) / demand)
        if share >= 1.0 or priority > 0 or left >= self.capacity:
            # (left == capacity: no cheaper model asks for anything, so refusing here would protect
            # nobody; the deadline test refuses what cannot finish and keeps what can wait.)
            self._credit[model] = 1.0
            return None
        credit = min(1.0, self._credit[model]) + share
        if credit >= 1.0:
            self._credit[model] = credit - 1.0
            return None
        self._credit[model] = credit
        self.refused[model] += 1
        return (f"over its share of the board: {model!r} brings {demand:.2f} s of work per second at "
                f"{1000 * cost:.2f} ms a request; cheaper models leave {max(0.0, left):.2f} of the "
                f"{self.capacity:g} slots, so {100 * share:.0f}% of its requests are admitted (cost-aware admission)")
