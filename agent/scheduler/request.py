"""What the scheduler holds for one admitted request, and what it hands back.

The queue in ``agent.core`` holds only (id, deadline, arrival, priority) as C structs; the payload
lives here, in the model's ``pending`` map, until the request is popped into a batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


class ReplySink(Protocol):
    """Where a request's one reply goes: a ``concurrent.futures.Future`` in the live agent."""

    def set_result(self, result: Any) -> None: ...
    def set_exception(self, exception: BaseException) -> None: ...


@dataclass(slots=True, eq=False)
class Request:
    rid: int                          # the agent's id (the queue key)
    model: str
    inputs: dict[str, np.ndarray]     # each (1, *item_shape), validated against the model's card
    arrival: float                    # scheduler clock
    deadline: float                   # scheduler clock
    priority: int
    reply: ReplySink
    client_id: str | None = None      # the application's id, echoed in the reply
    min_accuracy: float | None = None  # the request's accuracy requirement (0..1), None: the model's best
    # Where a multi-exit model lets it leave (agent.scheduler.exit_rule.ExitChoice); None: the whole model.
    exit: Any = None


@dataclass(slots=True)
class Result:
    """A successful reply, within the request's deadline: its outputs and where its time went.
    (A batch that finishes past a request's deadline answers it ``deadline_missed`` instead.)"""

    outputs: dict[str, np.ndarray]
    queue_ms: float
    compute_ms: float
    total_ms: float
    batch_size: int
    served_by: dict = field(default_factory=dict)
