"""Which exit of a multi-exit model answers a request (issue 24): the rule, and what it needs of the card.

A model whose card lists early exits (``agent.models.card.ExitPoint``) and whose config sets
``exit_mode`` runs stage by stage (``agent.runtime.staged``): after each stage some items leave with
that exit's answer, the rest go on. Which items leave where is decided here, once per request at
intake (:func:`choose_exit`), so that admission can price the request by the stages it needs and
the executors only apply the choice:

* ``fixed``: the earliest exit whose top-1 accuracy on the card's test set is at least the request's
  ``min_accuracy``; the request leaves there whatever its confidence.
* ``confidence``: the request leaves at the first exit whose softmax confidence reaches the card's
  calibrated threshold for its target (``min_accuracy`` rounded up to the next calibrated target,
  ``ExitCalibration.threshold_for``); the last exit always answers.

A request without ``min_accuracy`` asks for the model's best: the last exit. One whose
``min_accuracy`` is above the last exit's accuracy is refused: no exit can give it.

:func:`choose_exit` is the one place a per-request exit is chosen; a rule that assigns exits from the
load (the joint batching/exit allocation of issue 24 item 4) replaces it without touching the
executors, which only read :class:`ExitChoice`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from agent.errors import REJECTED, InferenceError
from agent.models.card import ExitCalibration, ModelCard

__all__ = ["EXIT_MODES", "ExitPlan", "ExitChoice", "exit_plan", "choose_exit"]

#: ``exit_mode`` values of a model's config: ``off`` runs the whole graph as any model.
EXIT_MODES = ("off", "fixed", "confidence")


@dataclass(frozen=True)
class ExitChoice:
    """How one request leaves: ``fixed``, the exit index it leaves at (fixed mode), else None;
    ``thresholds``, per exit, the confidence at or above which it leaves there (None: it goes on;
    the last exit answers whatever its confidence); ``deepest``, the last exit it may need
    (admission prices its batch up to that stage)."""

    fixed: int | None
    thresholds: tuple[float | None, ...]
    deepest: int


@dataclass(frozen=True)
class ExitPlan:
    """A multi-exit model's exits as the rule and the stage executors see them.

    ``fractions[k]``: per batch size in ``batch_sizes``, the share of a whole run (every stage) that
    stages ``0..k`` take, from the card's stage times (``ExitPoint.stage_ms``): admission multiplies
    the model's measured batch time by it, so a share measured on the build machine prices stages on
    this one. ``stage_ms[k]``: stage ``k``'s time in ms per batch size in ``batch_sizes`` (this
    board's where measured at load, else the card's; None with neither): what the online exit
    allocation (``agent.exits.online``) prices streams by."""

    mode: str
    names: tuple[str, ...]
    outputs: tuple[str, ...]
    accuracy: tuple[float, ...]
    calibration: tuple[ExitCalibration, ...]
    batch_sizes: tuple[int, ...]
    fractions: tuple[tuple[float, ...], ...]
    answer_output: str
    stage_ms: tuple[tuple[float, ...], ...] | None = None

    @property
    def last(self) -> int:
        return len(self.names) - 1

    def fraction(self, exit_index: int, batch_size: int) -> float:
        """The share of a whole run that a batch of ``batch_size`` takes up to exit ``exit_index``
        (linear between the card's batch sizes, the nearest one outside them)."""
        if exit_index >= self.last:
            return 1.0
        return float(np.interp(batch_size, self.batch_sizes, self.fractions[exit_index]))

    def stage_fraction(self, stage: int, batch_size: int) -> float:
        """The share of a whole run that stage ``stage`` alone takes at ``batch_size``."""
        before = self.fraction(stage - 1, batch_size) if stage > 0 else 0.0
        return self.fraction(stage, batch_size) - before


def exit_plan(card: ModelCard, mode: str, stage_times: tuple[Sequence[int], Sequence[Sequence[float]]] | None = None
              ) -> ExitPlan | None:
    """The plan for ``card`` under ``mode`` (None for ``off``). ``stage_times``: (batch sizes, times
    per size per stage) measured on this board (``agent.profiler.measure.measure_stage_times``), in
    place of the card's. Raises ``ValueError`` for a mode other than :data:`EXIT_MODES` or a card
    without exits."""
    if mode not in EXIT_MODES:
        raise ValueError(f"exit_mode = {mode!r}: expected one of {EXIT_MODES}")
    if mode == "off":
        return None
    exits = card.exits
    if len(exits) < 2:
        raise ValueError(f"model {card.name!r}: exit_mode = {mode!r} needs a card with two or more exits "
                         f"(its card lists {len(exits)})")
    measured = [p for p in exits if p.stage_ms is not None and p.batch_sizes is not None]
    if stage_times is not None:
        sizes = tuple(int(b) for b in stage_times[0])
        per_stage = np.array(stage_times[1], dtype=np.float64)
        if per_stage.shape != (len(exits), len(sizes)):
            raise ValueError(f"stage times of shape {list(per_stage.shape)}: expected [{len(exits)} stages, "
                             f"{len(sizes)} batch sizes]")
        cumulative = np.cumsum(per_stage, axis=0) / per_stage.sum(axis=0)
        fractions = tuple(tuple(float(f) for f in row) for row in cumulative)
        stage_ms = tuple(tuple(1000.0 * float(t) for t in row) for row in per_stage)
    elif len(measured) == len(exits):
        sizes = exits[0].batch_sizes
        per_stage = np.array([p.stage_ms for p in exits], dtype=np.float64)      # [exits, sizes]
        cumulative = np.cumsum(per_stage, axis=0) / per_stage.sum(axis=0)
        fractions = tuple(tuple(float(f) for f in row) for row in cumulative)
        stage_ms = tuple(tuple(float(t) for t in row) for row in per_stage)
    else:   # no stage times on the card: stages priced equal (a guess the profile replaces)
        sizes = (1,)
        fractions = tuple(((k + 1) / len(exits),) for k in range(len(exits)))
        stage_ms = None
    return ExitPlan(mode=mode, names=tuple(p.name for p in exits), outputs=tuple(p.output for p in exits),
                    accuracy=tuple(float(p.accuracy) for p in exits),
                    calibration=tuple(p.calibration for p in exits), batch_sizes=tuple(sizes),
                    fractions=fractions, answer_output=exits[-1].output, stage_ms=stage_ms)


def choose_exit(plan: ExitPlan, model: str, min_accuracy: float | None) -> ExitChoice:
    """The exit rule (module docstring). Raises ``InferenceError`` (``rejected``) when
    ``min_accuracy`` is above what the last exit reaches."""
    last = plan.last
    if min_accuracy is None:
        return ExitChoice(last, (None,) * len(plan.names), last)
    if min_accuracy > plan.accuracy[last]:
        raise InferenceError(REJECTED, (
            f"min_accuracy = {min_accuracy:g}: no exit of model {model!r} reaches it (the most accurate, "
            f"{plan.names[last]!r}, has {plan.accuracy[last]:.4f} top-1 on its card's test set)"), "min_accuracy")
    if plan.mode == "fixed":
        k = next(i for i, a in enumerate(plan.accuracy) if a >= min_accuracy)
        return ExitChoice(k, (None,) * len(plan.names), k)
    thresholds = tuple(None if k == last else plan.calibration[k].threshold_for(min_accuracy)
                       for k in range(len(plan.names)))
    return ExitChoice(None, thresholds, last)


def leaves(choice: ExitChoice, exit_index: int, confidence: float) -> bool:
    """Whether an item with ``choice`` leaves at ``exit_index`` with softmax ``confidence`` there."""
    if choice.fixed is not None:
        return choice.fixed <= exit_index
    threshold = choice.thresholds[exit_index]
    return threshold is None and exit_index == len(choice.thresholds) - 1 or (
        threshold is not None and confidence >= threshold)
