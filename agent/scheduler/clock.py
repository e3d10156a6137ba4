"""The clock the scheduler reads. The live agent uses the monotonic clock; the simulator a virtual one.

All scheduler times (arrival, deadline, wake-ups) are seconds on this clock, never wall time:
wall time jumps (NTP, a board without an RTC booting in 1970), deadlines must not.
"""
from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds, monotonic, arbitrary origin."""


class MonotonicClock:
    """The live agent's clock."""

    now = staticmethod(time.monotonic)
