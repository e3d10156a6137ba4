"""The executor interface: how a dispatched batch is carried out.

An executor starts a batch and calls back once it is done: ``start(dispatch, on_done)``. Whether
``on_done`` runs before ``start`` returns or later is the executor's affair: the local executor runs
the backend on the calling worker thread (onnxruntime and LiteRT release the GIL while they compute,
so the worker thread *is* the execution slot) and calls back before returning; the simulator's calls
back when the batch's virtual completion comes; an offload executor will call back when the peer's
reply arrives, holding no thread across the network round trip. The driver
(``agent.runtime.driver``) answers the batch's requests in ``on_done``, whoever calls it.

Each executor serves one action target (``agent.scheduler.policy.Action.target``): the driver starts
a batch on the executor of its target. The agent has the local backends under ``local``; a new
executor is a module of its own, built by the agent under the target it serves (an offload peer's
from the offload config, when that exists).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from agent.scheduler.dispatcher import Dispatch


@dataclass(slots=True)
class BatchOutcome:
    """A finished batch: per-request outputs in dispatch order, or the error that stopped it."""

    outputs: list[dict[str, np.ndarray]] | None
    compute_s: float
    error: BaseException | None = None


#: Called exactly once per started batch, with the batch and how it ended.
OnDone = Callable[[Dispatch, BatchOutcome], None]


class Executor(Protocol):
    def start(self, dispatch: Dispatch, on_done: OnDone) -> None:
        """Start ``dispatch``'s batch; call ``on_done(dispatch, outcome)`` exactly once when it is
        done. A failure of the batch is an outcome with ``error`` set, never an exception."""
