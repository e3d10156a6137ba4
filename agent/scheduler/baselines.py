"""Baseline batching rules from the papers we compare against, as plain Python rule objects.

They implement the same rule interface as the compiled rules in ``agent.core`` (``plan(queue, now)
-> BatchPlan``, ``max_batch``, ``describe()``, and the two hooks below), so a config picks them like
any other rule (``agent.scheduler.rules.build_rule``) and the default policy
(``agent.scheduler.policies.rules``) runs them, live and in the simulator. They are baselines, not the
hot path: Python is fast enough for them and keeps them readable.

The hooks every rule has (no-ops in the stateless ones), called by the default policy:

- ``observe(batch_size, duration_s, met)``: a batch is answered (``met``: every request in it made its
  deadline). Clipper's AIMD adapts its batch size from it.
- ``dispatched(n, now)``: a batch the rule planned was popped. The DisBatcher marks its joint served
  here, not in ``plan``: a lane whose plan says "go" may still lose the slot to a more urgent model.

A rule with state belongs to one lane: build a fresh one per lane and per simulated run.

The FIFO baseline (``rule = "fifo"``) is not a rule class here: it is ``FixedBatch(1)`` on a lane
keyed by arrival instead of deadline (``ModelLane.fifo``), see ``build_rule`` / ``build_lane``.
"""
from __future__ import annotations

import math
from typing import Any

from agent.core import BatchPlan
from agent.core import BatchRule

_IDLE = BatchPlan(0, math.inf)


class AimdBatch(BatchRule):
    """Clipper's adaptive batching as the NSDI'17 paper and DeepRT describe it (PAPERS.md §3, §6):
    additive increase while batches meet their deadlines, multiplicative decrease on a miss.

    The batch-size limit ``b`` starts at 1. ``plan`` takes ``min(len(queue), b)`` whenever anything is
    queued: Clipper has no timer, a replica pulls a batch as soon as it is free. After each batch,
    ``observe``: all met -> ``b = min(max_batch, b + increase)``; any missed -> ``b = max(1,
    floor(b * decrease))`` (the paper's back-off of about 10%).

    Note: Clipper's final code (``containers.cpp``, "Adaptive Batching v2") explores and fits a ridge
    regression of latency on batch size instead; this is the paper's / DeepRT's AIMD, the baseline
    DeepRT compares against. Updates to ``b`` are not locked: live, two workers observing at once may
    lose one step, which only delays the adaptation by a batch.
    """

    __slots__ = ("_increase", "_decrease", "batch_limit")

    def __init__(self, max_batch: int, increase: int = 1, decrease: float = 0.9) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch = {max_batch!r}: expected an integer >= 1")
        if isinstance(increase, bool) or not isinstance(increase, int) or increase < 1:
            raise ValueError(f"increase = {increase!r}: expected an integer >= 1")
        if not 0.0 < decrease < 1.0:
            raise ValueError(f"decrease = {decrease!r}: expected a number in (0, 1)")
        self._max_batch = max_batch
        self._increase = increase
        self._decrease = float(decrease)
        self.batch_limit = 1           # b: the current largest batch

    def plan(self, queue: Any, now: float) -> BatchPlan:
        n = len(queue)
        if n == 0:
            return _IDLE
        return BatchPlan(min(n, self.batch_limit), math.inf)

    def observe(self, batch_size: int, duration_s: float, met: bool) -> None:
        if met:
            self.batch_limit = min(self._max_batch, self.batch_limit + self._increase)
        else:
            self.batch_limit = max(1, math.floor(self.batch_limit * self._decrease))

    def describe(self) -> dict:
        return {"name": "AimdBatch", "max_batch": self._max_batch, "increase": self._increase,
                "decrease": self._decrease, "batch_limit": self.batch_limit}

    def __repr__(self) -> str:
        return f"AimdBatch(max_batch={self._max_batch}, increase={self._increase}, decrease={self._decrease})"


class DisBatch(BatchRule):
    """DeepRT's DisBatcher (PAPERS.md §3): time is cut into back-to-back windows of ``window_s``
    starting at 0; at each joint (a multiple of the window) the requests queued before it are released
    as one job of up to ``max_batch``. Between joints nothing leaves: ``take = 0`` and ``wake_at`` =
    the next joint.

    A joint releases at most one job: when the batch is popped (``dispatched``) its joint is marked
    served. If the worker was busy at the joint, the job leaves at the first poll after it (and takes
    what is queued then, up to ``max_batch``). A request that arrived after the latest joint waits for
    the next one. Across models the scheduler orders jobs EDF on queue heads, as DeepRT's worker does.

    Differences from the paper, on purpose: DeepRT sets the window to half the smallest relative
    deadline of the category's requests (Theorem 1) and shortens it as requests come; here it is fixed
    by config (``window_ms``; the bench sets it from the trace's SLOs, half the model's smallest).
    DeepRT does not launch early when the GPU idles between joints (its optional optimisation), nor
    run the overrun Adaptation Module. DeepRT's admission is its EDF imitator (Algorithm 1); the
    "deeprt" bench policy pairs this rule with our own ``agent.scheduler.admission`` instead.
    """

    __slots__ = ("_window_s", "_served_joint")

    def __init__(self, window_s: float, max_batch: int) -> None:
        if not (isinstance(window_s, (int, float)) and not isinstance(window_s, bool) and window_s > 0
                and math.isfinite(window_s)):
            raise ValueError(f"window_s = {window_s!r}: expected a finite number of seconds > 0")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch = {max_batch!r}: expected an integer >= 1")
        self._window_s = float(window_s)
        self._max_batch = max_batch
        self._served_joint = -math.inf     # index k of the last joint (k * window_s) that released a job

    @property
    def window_s(self) -> float:
        return self._window_s

    def joint_index(self, now: float) -> int:
        """k of the latest joint ``k * window_s <= now`` (robust to float rounding of the division)."""
        k = math.floor(now / self._window_s)
        if (k + 1) * self._window_s <= now:
            k += 1
        elif k * self._window_s > now:
            k -= 1
        return k

    def plan(self, queue: Any, now: float) -> BatchPlan:
        n = len(queue)
        if n == 0:
            return _IDLE
        k = self.joint_index(now)
        if k > self._served_joint and queue.oldest_arrival() < k * self._window_s:
            return BatchPlan(min(n, self._max_batch), math.inf)
        return BatchPlan(0, (k + 1) * self._window_s)

    def dispatched(self, n: int, now: float) -> None:
        self._served_joint = self.joint_index(now)

    def describe(self) -> dict:
        return {"name": "DisBatch", "max_batch": self._max_batch, "window_s": self._window_s}

    def __repr__(self) -> str:
        return f"DisBatch(window_s={self._window_s}, max_batch={self._max_batch})"


__all__ = ["AimdBatch", "DisBatch"]
