"""Running a multi-exit model's batch stage by stage, answering items as they leave (issue 24).

The card's stage graphs (``ExitPoint.stage_path``) chain: stage 1 takes the model's input and gives
exit 1's logits and its features, stage k the previous stage's features. A batch runs stage 1 on
every item; the items whose exit choice (``agent.scheduler.exit_rule``) says they leave at exit 1 are
answered at once, through ``answer`` (``Driver.answer_part``), before stage 2 runs; the survivors'
rows of the features go on to stage 2, and so on; the last exit answers whoever is left. A stage with
no survivor is not run. Why answer at once: an item that leaves early needs only the stages before
its exit, and its client should not wait for the ones after (that is what makes an early exit pay
inside a batch).

Survivors re-batched (``exit_rebatch``, ``agent.api``): a batch runs only its own stage (``first``)
and hands its survivors on (``hand_on``: ``Driver.hand_on``) with their rows of the stage's features,
as requests of the next stage's lane ``<model>#<k>``, where the scheduler batches them with the
survivors of other batches, by that stage's latency table and their deadlines, as it batches any lane.

Each answered item's outputs hold the answering exit's logits under the model's answer output (the
last exit's output name, ``logits`` for the shipped model), so a client reads one name whichever exit
answered; ``served_by`` names the exit.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from agent.backends.base import Backend
from agent.models.exits import softmax_confidence
from agent.scheduler.exit_rule import ExitPlan, leaves
from agent.scheduler.request import Request

#: ``answer(items, compute_s, extra)``: answer (index in the batch, outputs) now; ``extra`` joins served_by.
Answer = Callable[[list, float, dict], None]
#: ``hand_on(indexes, features)``: the batch's items ``indexes`` go on to the next stage with ``features``.
HandOn = Callable[[np.ndarray, dict], None]


def run_staged(requests: Sequence[Request], batch: dict[str, np.ndarray], stages: Sequence[Backend],
               plan: ExitPlan, stage_inputs: Sequence[str], stage_outputs: Sequence[str | None],
               answer: Answer, clock: Callable[[], float], exit_labels: Sequence[dict], first: int = 0,
               hand_on: HandOn | None = None) -> list[int]:
    """Run ``batch`` (the model's inputs for ``requests``, or stage ``first``'s) through ``stages``
    (the model's stages from ``first`` on), answering each item at its exit; with ``hand_on``, the
    survivors of the last of ``stages`` are handed on to the next stage (module docstring). Returns
    the items each stage ran (for admission's cost model). Raises what a backend raises: the caller
    answers the items not answered yet."""
    alive = np.arange(len(requests))
    sizes: list[int] = []
    features: dict[str, np.ndarray] = batch
    last = plan.last
    answer_name = plan.answer_output
    t0 = clock()
    for k, stage in enumerate(stages, start=first):
        sizes.append(len(alive))
        out = stage.run(features)
        logits = out[plan.outputs[k]]
        if k == last:
            leaving = np.ones(len(alive), dtype=bool)
        else:
            confidence = softmax_confidence(logits) if any(
                requests[i].exit is not None and requests[i].exit.fixed is None for i in alive) else None
            leaving = np.array([_leaves(requests[i], k, last, None if confidence is None else confidence[j])
                                for j, i in enumerate(alive)], dtype=bool)
        if leaving.any():
            rows = np.flatnonzero(leaving)
            answer([(int(alive[j]), {answer_name: logits[j:j + 1].copy()}) for j in rows], clock() - t0,
                   exit_labels[k])
        if k == last or leaving.all():
            break
        keep = np.flatnonzero(~leaving)
        alive = alive[keep]
        carried = out[stage_outputs[k]]
        features = {stage_inputs[k + 1]: np.ascontiguousarray(carried if len(keep) == len(carried) else carried[keep])}
        if hand_on is not None and k == first + len(stages) - 1:
            hand_on(alive, features)
            break
    return sizes


def _leaves(request: Request, k: int, last: int, confidence: float | None) -> bool:
    choice = request.exit
    if choice is None:                  # no choice made: the model's best, the last exit
        return k == last
    return leaves(choice, k, 0.0 if confidence is None else float(confidence))
