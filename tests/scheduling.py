"""Shared pieces for tests that drive the scheduler by hand: a reply sink and a request maker."""
from __future__ import annotations

import itertools

from agent.scheduler.request import Request


class Sink:
    """Stands where a Future would: keeps the one reply."""

    def __init__(self):
        self.value = None

    def set_result(self, value):
        self.value = value

    def set_exception(self, exc):
        self.value = exc


_ids = itertools.count(1)


def req(model: str, arrival: float, slo: float, priority: int = 0) -> Request:
    return Request(next(_ids), model, {}, arrival, arrival + slo, priority, Sink())
