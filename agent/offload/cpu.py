"""How much of the CPU it may use this board's agent keeps busy: the offload client's signal that the
board itself, not its model slots, is short.

A board that offloads spends CPU on every request it forwards (the intake, the head, the codec, the
MQTT send and the reply) outside its execution slots. Work it adds outside the slots (the fallback
that runs what a peer refused) takes that CPU: under a cgroup CPU quota the whole process stalls for
the rest of each period once the quota is spent, so the requests it forwards reach the peer late
and are refused there in turn (``edge-agent bench offload``, BENCHMARKS.md).

The budget is the cgroup's CPU quota where one is set, else the cores the process may run on
(``agent.config.cpu_budget``); the load is the process's CPU time over the wall time, as a share of
that budget, over windows of at least ``window_s`` (a read between window ends returns the last
window's figure).
"""
from __future__ import annotations

import time
from typing import Callable

from agent.config import cpu_budget


class CpuGauge:
    """This process's CPU time over wall time, as a share of ``budget`` cores (module docstring)."""

    def __init__(self, budget: float | None = None, window_s: float = 0.25,
                 clock: Callable[[], float] = time.monotonic, cpu: Callable[[], float] = time.process_time) -> None:
        self.budget = budget if budget is not None else cpu_budget()
        if not self.budget > 0:
            raise ValueError(f"CpuGauge budget = {budget!r}: expected cores > 0")
        self.window_s = window_s
        self._clock, self._cpu = clock, cpu
        self._at, self._used = clock(), cpu()
        self._load = 0.0

    def load(self) -> float:
        """The share of the budget used over the last whole window (0 before the first ends)."""
        now = self._clock()
        elapsed = now - self._at
        if elapsed >= self.window_s:
            used = self._cpu()
            self._load = (used - self._used) / (elapsed * self.budget)
            self._at, self._used = now, used
        return self._load


__all__ = ["CpuGauge"]
