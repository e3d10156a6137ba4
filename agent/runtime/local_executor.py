"""The local executor: runs a batch on this board's backends, on the calling worker thread.

It assembles the batch into a preallocated buffer per (model, instance) with the compiled core's
``gather_into`` (one memcpy per request), runs the instance's backend, and scatters the output rows
back per request. A batch of one (every request on an idle board) runs on the request's own arrays,
already contiguous and shaped ``(1, ...)`` at intake (``agent.models.tensors.check_inputs``): a camera frame is not copied
once more.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np

from agent.backends.base import Backend
from agent.core import gather_into, scatter_rows
from agent.models.tensors import TensorSpec
from agent.runtime.executor import BatchOutcome, OnDone
from agent.runtime.staged import run_staged
from agent.scheduler.dispatcher import Dispatch


class InstanceSet:
    """A model's loaded instances and their preallocated batch buffers (one set per instance,
    since instances run at once). A multi-exit model served stage by stage also has, per instance,
    its stage sessions (``stages``) and its exit plan (``plan``: ``agent.scheduler.exit_rule``)."""

    def __init__(self, backends: Sequence[Backend], inputs: Sequence[TensorSpec], max_batch: int,
                 stages: Sequence[Sequence[Backend]] | None = None, plan: Any = None,
                 exits: Sequence[Any] = (), first: int = 0, hand_on_lane: str | None = None) -> None:
        self.stages = None if stages is None else [list(s) for s in stages]
        self.plan = plan
        # Survivors re-batched (agent.runtime.staged): ``stages`` start at the model's stage
        # ``first``, and the survivors of the last go on to the lane ``hand_on_lane``.
        self.first = first
        self.hand_on_lane = hand_on_lane
        # Per exit: its stage's input name and the features it hands on (None for the last), and
        # what served_by adds for it.
        self.stage_inputs = [p.stage_input.name for p in exits]
        self.stage_outputs = [None if p.stage_output is None else p.stage_output.name for p in exits]
        self.exit_labels = [{"exit": p.name} for p in exits]
        self.backends = list(backends)
        self.input_names = [spec.name for spec in inputs]
        self.buffers = [
            {spec.name: np.empty((max_batch, *spec.item_shape()), dtype=spec.dtype) for spec in inputs}
            for _ in self.backends
        ]


class LocalExecutor:
    """Runs batches on this board's backends (``agent.runtime.executor.Executor``)."""

    def __init__(self, models: dict[str, InstanceSet], clock=time.perf_counter) -> None:
        self.models = models
        self._clock = clock
        # Answers part of a running batch (``Driver.answer_part``): set by the agent once its driver
        # exists; a multi-exit model's items leaving at an early exit go out through it. Hands a
        # batch's survivors on to the next stage's lane (``Driver.hand_on``), likewise.
        self.answer_part: Callable[..., None] | None = None
        self.hand_on: Callable[..., None] | None = None

    def start(self, dispatch: Dispatch, on_done: OnDone) -> None:
        """Run the batch on the calling thread, then call ``on_done`` (before returning)."""
        on_done(dispatch, self.run(dispatch))

    def run(self, dispatch: Dispatch) -> BatchOutcome:
        """Run one batch to completion on the calling thread; a backend failure is the outcome's
        ``error``, never an exception."""
        instances = self.models[dispatch.model]
        buffers = instances.buffers[dispatch.instance]
        requests = dispatch.requests
        n = len(requests)
        try:
            if n == 1:
                batch = requests[0].inputs      # (1, *item_shape), contiguous, checked at intake: no copy
            else:
                batch = {}
                for name in instances.input_names:
                    buffer = buffers[name]
                    gather_into(buffer, [r.inputs[name] for r in requests])
                    batch[name] = buffer[:n]
            if instances.stages is not None:
                return self._run_staged(dispatch, instances, batch)
            t0 = self._clock()
            outputs = instances.backends[dispatch.instance].run(batch)
            compute_s = self._clock() - t0
            per_output = {name: scatter_rows(array, n) for name, array in outputs.items()}
        except Exception as exc:  # a backend failure answers the batch; the agent keeps serving
            return BatchOutcome(None, 0.0, exc)
        return BatchOutcome([{name: rows[i] for name, rows in per_output.items()} for i in range(n)], compute_s)

    def _run_staged(self, dispatch: Dispatch, instances: InstanceSet, batch: dict) -> BatchOutcome:
        """A multi-exit model's batch, stage by stage (``agent.runtime.staged``): each item is
        answered at its exit through ``answer_part``; the outcome answers none (every item was)."""
        answer_part = self.answer_part
        t0 = self._clock()

        def answer(items: list, compute_s: float, extra: dict) -> None:
            answer_part(dispatch, items, compute_s, extra)
        lane = instances.hand_on_lane
        hand_on = None if lane is None else (
            lambda indexes, features: self.hand_on(dispatch, lane, indexes, features))
        dispatch.stage_sizes = run_staged(dispatch.requests, batch, instances.stages[dispatch.instance],
                                          instances.plan, instances.stage_inputs, instances.stage_outputs,
                                          answer, self._clock, instances.exit_labels, instances.first, hand_on)
        return BatchOutcome([None] * len(dispatch.requests), self._clock() - t0)

    def close(self) -> None:
        for instances in self.models.values():
            for backend in instances.backends:
                backend.close()
            for stages in instances.stages or ():
                for backend in stages:
                    backend.close()
