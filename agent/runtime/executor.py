"""The executor interface: how a dispatched batch is carried out.

An executor starts a batch and calls back once it is done: ``start(dispatch, on_done)``. Whether
``on_done`` runs before ``start`` returns or later is the executor's affair: the local executor runs
the backend on the calling worker thread (onnxruntime and LiteRT release the GIL while they compute,
so the worker thread *is* the execution slot) and calls back before returning; the simulator's calls
back when the batch's virtual completion comes; the offload executor calls back when the peer's
reply arrives (or its local fallback ends), holding no thread across the network round trip. The
driver (``agent.runtime.driver``) answers the batch's requests in ``on_done``, whoever calls it.

Releasing early (pipelining, BPS): an executor whose batch still has a part to run elsewhere once
its local part is done (the offload executor: the head ran and the tensor is sent) calls
``Driver.release_early(dispatch)`` before returning: the slot and the instance are free for the
next batch at once (its head runs while this tensor is on the wire). It then calls ``on_done``
later as any executor, and the driver does not release that batch again (``Dispatch.released``).
An executor that never calls it (local, simulated) is released in ``on_done``, as before.

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
    """A finished batch: per-request outputs in dispatch order, or the error that stopped it.

    Two optional parts for executors whose batch ran elsewhere (``agent.runtime.offload_executor``):
    ``item_errors``, one entry per request, an ``InferenceError`` for a request answered with it
    (its ``outputs`` entry is then ignored, e.g. ``None``), ``None`` for one with outputs; and
    ``served_by``, where the batch ran (a peer and its split point), in place of the driver's
    ``served_by(dispatch)``."""

    outputs: list[dict[str, np.ndarray] | None] | None
    compute_s: float
    error: BaseException | None = None
    item_errors: list | None = None
    served_by: dict | None = None


#: Called exactly once per started batch, with the batch and how it ended.
OnDone = Callable[[Dispatch, BatchOutcome], None]


class Executor(Protocol):
    def start(self, dispatch: Dispatch, on_done: OnDone) -> None:
        """Start ``dispatch``'s batch; call ``on_done(dispatch, outcome)`` exactly once when it is
        done. A failure of the batch is an outcome with ``error`` set, never an exception."""
