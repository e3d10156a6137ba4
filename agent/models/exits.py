"""Early exits' confidence calibration: when may an item leave at an exit and still meet an accuracy target.

A multi-exit model (issue 24; ``tools/build_models.py --models camera_exits``) answers at an early
exit when that exit is good enough for the request. In *confidence* mode an item leaves at the first
exit whose softmax confidence (its largest class probability) reaches a threshold; the threshold for
an accuracy target is read off a calibration split held out from both training and the test set:

* for a grid of thresholds ``t``, the accuracy and the share (coverage) of the calibration items
  whose confidence is ``>= t``: what the card shows;
* for each target ``a``, the smallest confidence ``t`` such that every set ``{confidence >= t'}`` with
  ``t' >= t`` (and at least ``min_support`` items) is at least ``a`` accurate. Requiring it of every
  higher threshold, not just ``t``, makes the threshold non-decreasing in the target (a stricter
  target never lets more items out) and keeps a lucky dip in the curve from setting it. ``None``
  where no threshold reaches the target: that exit never answers for it.

numpy only: the build computes these, the card carries them (:class:`agent.models.card.ExitPoint`),
and the tests recompute them from the shipped calibration digits.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["softmax_confidence", "threshold_for_target", "calibrate", "CALIBRATION_GRID", "CALIBRATION_TARGETS",
           "MIN_SUPPORT"]

#: Thresholds the card's accuracy/coverage curve is reported at.
CALIBRATION_GRID = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
#: Accuracy targets the card gives a threshold for (a request's ``min_accuracy`` rounds up to one).
CALIBRATION_TARGETS = (0.8, 0.85, 0.9, 0.95, 0.97, 0.99)
#: Fewest calibration items a threshold may rest on: above it the accuracy is a handful of lucky items.
MIN_SUPPORT = 30


def softmax_confidence(logits: np.ndarray) -> np.ndarray:
    """The largest softmax probability per row of ``[N, classes]`` logits, in float64."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 1:
        raise ValueError(f"logits: expected [N, classes], got shape {list(z.shape)}")
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e.max(axis=1) / e.sum(axis=1)


def threshold_for_target(confidence: np.ndarray, correct: np.ndarray, target: float,
                         min_support: int = MIN_SUPPORT) -> float | None:
    """The smallest confidence ``t`` (one of the items' own) such that, for every item confidence
    ``t' >= t`` with at least ``min_support`` items at or above it, those items are at least
    ``target`` accurate; None when not even the most confident ``min_support`` items are."""
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    if conf.shape != ok.shape or conf.ndim != 1:
        raise ValueError(f"confidence {list(conf.shape)} and correct {list(ok.shape)}: expected two [N] arrays")
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target = {target!r}: expected an accuracy in 0..1")
    order = np.argsort(-conf, kind="stable")
    conf, ok = conf[order], ok[order]
    # the set {confidence >= conf[k]} is the first last_index(conf[k]) + 1 items (ties go together)
    distinct_end = np.searchsorted(-conf, -conf, side="right")          # items with confidence >= conf[k]
    accuracy = np.cumsum(ok)[distinct_end - 1] / distinct_end
    eligible = distinct_end >= min_support
    if not eligible.any():
        return None
    # walk from the most confident eligible set down; stop at the first that misses the target
    best = None
    for k in np.flatnonzero(eligible):
        if accuracy[k] < target:
            break
        best = float(conf[k])
    return best


def calibrate(confidence: np.ndarray, correct: np.ndarray, grid: Sequence[float] = CALIBRATION_GRID,
              targets: Sequence[float] = CALIBRATION_TARGETS, min_support: int = MIN_SUPPORT) -> dict:
    """One exit's calibration as the card holds it: the accuracy and coverage of ``{confidence >= t}``
    per grid threshold (None where no item is that confident), and the threshold per target."""
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    accuracy, coverage = [], []
    for t in grid:
        chosen = conf >= t
        coverage.append(round(float(chosen.mean()), 6))
        accuracy.append(round(float(ok[chosen].mean()), 6) if chosen.any() else None)
    thresholds = [threshold_for_target(conf, ok, a, min_support) for a in targets]
    return {
        "grid": [float(t) for t in grid],
        "accuracy": accuracy,
        "coverage": coverage,
        "targets": [float(a) for a in targets],
        "threshold": thresholds,
        "coverage_at_threshold": [None if t is None else round(float((conf >= t).mean()), 6) for t in thresholds],
        "min_support": int(min_support),
        "items": int(len(conf)),
    }
