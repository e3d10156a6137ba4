"""Admission control: refuse at arrival a request whose deadline cannot be met.

DeepRT (PAPERS.md §3) admits a request only if the whole admitted set stays schedulable, with a
utilisation test first and an exact EDF imitation second. This is a cheaper per-request test in the
same spirit, and ours: it predicts when the arriving request would finish if it joined its model's
queue now, from the profiled latency table, and refuses it when that is after its deadline.

The prediction, for a request of model m:

- ``ahead`` = queued requests of m that pop before it (higher priority, or an earlier or equal
  queue key: its deadline, or its arrival plus the EDF horizon if that is earlier,
  ``Scheduler.queue_key``; ``DeadlineQueue.count_ahead``, one pass in C);
- those ``ahead + 1`` requests run in batches of at most ``max_batch``; batch ``j`` (0-based) runs on
  the instance that becomes free ``j mod I``-th earliest, in round ``j // I``, where the ``I``
  instances free up now (idle) or when their running batch is predicted to end;
- the request finishes at that instance's free time + full batches before it + its own batch.

The profiled table holds the backend's own run time, measured alone; a batch in the live agent
also pays batch assembly, replies and thread hand-offs, and shares the cores with the other
instances, the intake and the applications. So every finished batch reports its observed duration
(dispatch to done), and the lane learns its slowdown: the ratio of exponentially weighted means of
observed and profiled batch durations, so each batch counts in proportion to its length. Every
prediction is the profiled time times it: the model adapts online to what the board really
delivers. A slowdown, not an added excess, because sharing the cores stretches a batch in
proportion to its length: under load in ``bench triton`` a big batch ran further past its profiled
time, in proportion, than a batch of one, and one excess learned mostly from the many batches of
one had the big batches finish well past their deadlines. (A slowdown per batch size was tried: a
size the lane stops running keeps the slowdown of its last slow spell, and the cheap model's loose
class lost much of its share in time. Trimming a planned batch until its first deadline held at
the learned time was tried too: it cost goodput and lengthened the tail, smaller batches draining
each burst more slowly. Figures: BENCHMARKS.md, "Side by side with a real Triton", fifth session,
and "Figures that were in docstrings".)

Models share the execution slots: the scheduler also pours every model's predicted work that will
run before the request (queued requests that pop first) over the slots, each free now or when its
batch in flight is predicted to end, to find when a slot is free for it; the later of the two
predictions decides.

What it leaves out, and so where it is optimistic: batches smaller than ``max_batch`` (the
deadline-aware rule may pick them), CPU taken by the intake and the applications themselves, and
requests that arrive later with earlier deadlines and overtake this one (EDF across models: a
tight request of an expensive model pushes cheap ones back; the scheduler's lookahead estimates
those, see :func:`overtaken_wait`). So the test is calibrated online, as a quantile (ours), one per
SLO class (:func:`slo_class`): every admitted request of the class that misses raises its learned
slack by ``q x STEP_FRACTION x SLO``, every one that makes it lowers it by ``(1 - q) x
STEP_FRACTION x SLO`` (never below 0), and a request is admitted only if its predicted finish plus
its class's slack is within its deadline. This is the stochastic-approximation quantile tracker:
the slack settles where a fraction ``1 - q`` of the class's admitted requests miss (the
``MISS_QUANTILE`` target), whatever the model above leaves out, and falls back to 0 off overload.
Per class, because what the model leaves out grows with the wait a class can afford: in ``bench
triton`` at 1.5x load one slack for all of resnet's requests left its loose class missing far more
of its admitted requests than its tight class (BENCHMARKS.md, "Side by side with a real Triton",
fifth session). Steps in proportion to the SLO, so that a 150 ms class moves as fast, in its own
terms, as a 10 ms one (0.1 ms a miss there).
An admitted request that still cannot make it is shed before it runs (``shed_hopeless``).

What is learned only from admitted requests cannot correct itself once nothing is admitted: after
a spell of CPU starvation the slack (and the slowdown) can grow until every request is refused,
even on an idle board, and then nothing finishes that would bring them down (seen here: an empty
queue, a 38 ms prediction, 2.3 s of slack, refusing for good). So both are forgotten while the
board is idle (ours, :meth:`AdmissionControl.relax`): what the slack stands for, waits the model
leaves out, needs a queue, and the slowdown's evidence is as old as the idle spell. A class's slack
decays with time constant ``RELAX_SLOS`` of its SLO, the slowdown's excess over the profile with
``SLOWDOWN_RELAX_S``; and a slack never grows past the SLO itself (beyond it, it refuses every
request of the class anyway, and would only take longer to forget). The time constants are long
beside the gaps between bursts: with 10 SLOs and 1 s, a board that idled between two bursts had
forgotten what the first taught it and over-admitted the second (tests/test_agent.py's bursts
taking turns failed 2 runs in 7 under the pure core, against none in 7 without the decay, and none
in 6 with these); the cap keeps the recovery short all the same (a slack at the SLO stops refusing
a 38 ms prediction at 150 ms after about 0.3 of its time constant).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

from agent.core import DeadlineQueue, LatencyTable


class AdmissionControl:
    EWMA_WEIGHT = 0.2     # weight of the newest batch in the slowdown's two means
    MISS_QUANTILE = 0.98  # the slack aims at 98% of admitted requests in time (2% miss)
    STEP_FRACTION = 0.01  # of the class's SLO: at 10 ms a miss adds 0.098 ms, a request in time takes off 0.002
    RELAX_SLOS = 100.0    # while the board idles, a class's slack decays with this many of its SLO as time constant
    SLOWDOWN_RELAX_S = 10.0  # ... and the slowdown's excess over the profile with this one (s)

    def __init__(self, table: LatencyTable, max_batch: int, margin_s: float = 0.0) -> None:
        self.table = table
        # Per batch size 0..max_batch: the profiled time (predicted: times the slowdown).
        self._profiled = [0.0] + [table.predict(b) for b in range(1, max_batch + 1)]
        self._observed_mean_s = self._profiled_mean_s = 0.0   # EWMAs over batches (module docstring)
        self.slowdown = 1.0       # learned: observed / profiled, batches weighted by their length
        self.limit_batch(max_batch)   # sets max_batch (checked)
        self.margin_s = margin_s
        self._slack: dict[int, float] = {}   # learned per SLO class: the quantile slack (module docstring)
        self.overruns = 0         # batches that took longer than predicted
        self._relaxed_to = -math.inf   # idle time before this is forgotten already (relax)

    def limit_batch(self, max_batch: int) -> None:
        """Predict with batches of at most ``max_batch`` from now on (the scheduler's hold cap)."""
        if max_batch < 1:
            raise ValueError(f"max_batch = {max_batch}: expected >= 1")
        self.max_batch = max_batch

    def observe(self, batch_size: int, duration_s: float, profiled_s: float | None = None) -> None:
        """A batch of ``batch_size`` took ``duration_s`` from dispatch to done: adapt the slowdown.
        ``profiled_s``: the profiled time of what the batch ran when that is not a whole batch (a
        multi-exit model's batch that stopped at an early exit), else the table's."""
        profiled = self._profiled_s(batch_size) if profiled_s is None else profiled_s
        if duration_s > profiled * self.slowdown + self.margin_s:
            self.overruns += 1
        if self._profiled_mean_s == 0.0:      # the first batch sets both means
            self._observed_mean_s, self._profiled_mean_s = duration_s, profiled
        else:
            self._observed_mean_s += self.EWMA_WEIGHT * (duration_s - self._observed_mean_s)
            self._profiled_mean_s += self.EWMA_WEIGHT * (profiled - self._profiled_mean_s)
        self.slowdown = self._observed_mean_s / max(self._profiled_mean_s, 1e-9)

    def calibrate(self, missed: bool, slo_s: float) -> None:
        """An admitted request with SLO ``slo_s`` was answered in time, or missed (late, expired or
        shed): move its class's slack (misses add up; each request in time steps down, never below 0)."""
        key = slo_class(slo_s)
        step = self.STEP_FRACTION * slo_s
        slack = self._slack.get(key, 0.0)
        if missed:
            slack = min(slack + self.MISS_QUANTILE * step, slo_s)
        elif slack > 0.0:
            slack = max(0.0, slack - (1.0 - self.MISS_QUANTILE) * step)
        else:
            return
        if key not in self._slack and len(self._slack) >= MAX_CLASSES:
            self._slack = {k: v for k, v in self._slack.items() if v > 0.0}   # forget the settled ones
            if len(self._slack) >= MAX_CLASSES:
                self._slack.clear()               # SLOs that vary request by request: start over
        self._slack[key] = slack

    def relax(self, idle_since: float, now: float) -> None:
        """The board has been idle since ``idle_since``: forget what was learned under load in
        proportion to the idle time not yet counted (module docstring)."""
        idle_s = now - max(idle_since, self._relaxed_to)
        self._relaxed_to = now
        if idle_s <= 0.0:
            return
        if self._slack:
            self._slack = {key: slack * math.exp(-idle_s / (self.RELAX_SLOS * 2.0 ** (key / 16)))
                           for key, slack in self._slack.items()}
        if self._observed_mean_s > self._profiled_mean_s > 0.0:
            excess = self._observed_mean_s - self._profiled_mean_s
            self._observed_mean_s = self._profiled_mean_s + excess * math.exp(-idle_s / self.SLOWDOWN_RELAX_S)
            self.slowdown = self._observed_mean_s / self._profiled_mean_s

    def slack_s(self, slo_s: float) -> float:
        """The learned slack of ``slo_s``'s class (0 while no class has learned any)."""
        return self._slack.get(slo_class(slo_s), 0.0) if self._slack else 0.0

    def slack_by_class(self) -> dict[int, float]:
        """The learned slack of every SLO class (:func:`slo_class` key -> seconds): a copy, so a
        reader on another thread (telemetry) never iterates the dict a worker is updating."""
        return dict(self._slack)

    def _profiled_s(self, batch_size: int) -> float:
        if batch_size < len(self._profiled):
            return self._profiled[batch_size]
        return self.table.predict(batch_size)

    def batch_s(self, batch_size: int) -> float:
        """Predicted duration of one batch: the profiled time times the learned slowdown."""
        return self._profiled_s(batch_size) * self.slowdown

    def item_s(self) -> float:
        """Predicted compute per request when batches are full (the learned slowdown included)."""
        return self.batch_s(self.max_batch) / self.max_batch

    def work_s(self, n: int) -> float:
        """Predicted compute for ``n`` requests in batches of at most ``max_batch``."""
        if n <= 0:
            return 0.0
        full_batches, rest = divmod(n, self.max_batch)
        return full_batches * self.batch_s(self.max_batch) + (self.batch_s(rest) if rest else 0.0)

    def refuse(self, queue: DeadlineQueue, deadline: float, priority: int, now: float,
               instances: int, busy_until: Sequence[float], shared_start: float | None = None,
               overtakers: Sequence[tuple[float, float]] = (), slots: int = 1,
               key: float | None = None, own_share: Callable[[int], float] | None = None) -> str | None:
        """``None`` to admit, else the reason (for the ``rejected`` reply).

        Two bounds, the later wins: this model's own queue on its instances (above), and, when other
        models share the execution slots, ``shared_start``: when the slots will have done every
        model's work that runs before this request (``Scheduler._shared_start``).

        ``overtakers``: (window s, work s per s) per class of requests that will pop before this one
        if they arrive within the window (a tighter SLO: ``Scheduler._overtakers``). While this
        request waits to start, they arrive and run first, on ``slots`` slots: its start moves later
        by the work they bring in the wait, found by fixed-point iteration (module docstring).
        ``key``: what the request is queued by (``Scheduler.queue_key``; default its deadline).
        ``own_share(b)``: the share of a whole batch of ``b`` after which the request is answered (a
        multi-exit model's early exit: its batch's stages up to it; default the whole batch). The
        batches ahead of it are priced whole (they may hold requests for the last exit).
        """
        ahead = queue.count_ahead(deadline if key is None else key, priority)
        slack_s = self.slack_s(deadline - now)
        if ahead == 0 and len(busy_until) < instances and shared_start is None:
            # The common case on a board with headroom: an idle instance, nothing ahead.
            finish = now + self.batch_s(1) * (1.0 if own_share is None else own_share(1))
            if finish + self.margin_s + slack_s <= deadline:
                return None
        n = ahead + 1
        batches = -(-n // self.max_batch)
        last_batch = n - (batches - 1) * self.max_batch
        free_at = sorted([now] * (instances - len(busy_until)) + [max(now, t) for t in busy_until])
        j = batches - 1
        full = self.batch_s(self.max_batch)
        start = free_at[j % instances] + (j // instances) * full
        if shared_start is not None:
            start = max(start, shared_start)
        if overtakers:
            start = now + overtaken_wait(start - now, overtakers, slots)
        finish = start + self.batch_s(last_batch) * (1.0 if own_share is None else own_share(last_batch))
        if finish + self.margin_s + slack_s <= deadline:
            return None
        return (f"deadline cannot be met: predicted finish in {1000 * (finish - now):.1f} ms + "
                f"{1000 * slack_s:.1f} ms learned slack, deadline in "
                f"{1000 * (deadline - now):.1f} ms ({ahead} queued ahead, batches of up to {self.max_batch}, "
                f"{instances} instance{'s' if instances != 1 else ''}"
                + ("" if shared_start is None else
                   f"; slots shared with other models free for it in {1000 * max(0.0, shared_start - now):.1f} ms")
                + ")")


MAX_CLASSES = 64   # SLO classes remembered (slack, lookahead rates); SLOs that vary request by request


def slo_class(slo_s: float) -> int:
    """The SLO class of a latency objective: 16 classes an octave (4% wide), so that objectives that
    differ by a rounding (a deadline sent as wall-clock time) share one, and 10 ms and 12 ms do not."""
    return round(16 * math.log2(max(slo_s, 1e-6)))


def overtaken_wait(wait_s: float, overtakers: Sequence[tuple[float, float]], slots: int, rounds: int = 8) -> float:
    """How long a request waits to start when ``wait_s`` of work is ahead of it now and, while it
    waits, requests that pop before it keep arriving: ``overtakers`` are (window, rate) pairs, each
    bringing ``rate`` seconds of work per second for as long as the wait lasts, up to ``window``
    (after that its arrivals' deadlines fall behind this one's). The wait w solves
    ``w = wait_s + sum(rate x min(w, window)) / slots``; iterated from ``wait_s`` (each round
    only lengthens it), and left at the last round's value when the overtakers alone fill the slots."""
    if wait_s <= 0.0:
        return 0.0
    w = wait_s
    for _ in range(rounds):
        extra = 0.0
        for window, rate in overtakers:
            extra += rate * (w if w < window else window)
        w_next = wait_s + extra / slots
        if w_next - w < 1e-5:
            return w_next
        w = w_next
    return w


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
        """Predicted compute per request of ``model`` (:meth:`AdmissionControl.item_s`)."""
        return self.lanes[model].item_s()

    def demand(self, model: str, now: float) -> float:
        """Model's arriving work, seconds of compute per second, as of ``now``."""
        return self._demand[model] * math.exp(-max(0.0, now - self._at[model]) / self.TAU_S)

    def refuse(self, model: str, priority: int, now: float) -> str | None:
        cost = self.item_cost_s(model)
        demand = self.demand(model, now) + cost / self.TAU_S
        self._demand[model], self._at[model] = demand, now
        left = self.capacity
        for other in self.lanes:                   # less what the cheaper models (by cost, then name) ask
            if other != model and (self.item_cost_s(other), other) < (cost, model):
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
