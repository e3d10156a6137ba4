"""Making board-kind profiles for the planner: a measured profile with its board section, and the
derived kinds (a board not at hand), each labelled in ``board.made`` with how it was made.

* :func:`with_board` adds the planner's ``"board"`` section (``agent.fleet.boards``) to a profile
  written by ``edge-agent profile``.
* :func:`gpu_like` writes a profile for an accelerator where batching pays: per model a batch
  curve ``t(b) = alpha + beta * b`` whose fixed per-launch cost ``alpha`` dominates small batches
  (the shape NVIDIA's TensorRT figures for Jetson boards show: throughput rising several-fold from
  batch 1 to batch 32), and instances that time-share the one GPU (processor sharing: ``cores =
  1, u = 1, gamma = 0``). Nothing in it is measured; the file says so.

Used once to make the shipped ``agent/fleet/profiles/*.json``; kept so the derivation can be
re-run and checked (tests/test_fleet_plan.py).
"""
from __future__ import annotations

import copy
from typing import Any

from agent.profiler.fit import FORM

__all__ = ["with_board", "gpu_like"]


def with_board(profile: dict[str, Any], board: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``profile`` with ``board`` as its planner section."""
    out = copy.deepcopy(profile)
    out["board"] = dict(board)
    return out


def gpu_like(curves: dict[str, tuple[float, float]], board: dict[str, Any], created: str,
             sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)) -> dict[str, Any]:
    """A GPU-like profile from ``curves`` (model -> (alpha_ms, beta_ms)); see the module docstring."""
    models = {}
    for name, (alpha, beta) in curves.items():
        p50 = [round(alpha + beta * b, 4) for b in sizes]
        models[name] = {
            "backend": "onnxruntime", "file": "onnx", "threads": 1, "device": "gpu (derived, not measured)",
            "batch": {"sizes": list(sizes), "p50_ms": p50, "p99_ms": [round(t * 1.1, 4) for t in p50],
                      "mean_ms": [round(t * 1.02, 4) for t in p50], "tail": "p99", "repeats": 1, "stopped": None},
            "concurrency": {"levels": [1, 2], "batch_sizes": [1, 8],
                            "p50_ms": [[p50[0], round(alpha + 8 * beta, 4)],
                                       [round(2 * p50[0], 4), round(2 * (alpha + 8 * beta), 4)]]},
            "co_running": {},
            "fit": {"form": FORM, "params": {"alpha_ms": alpha, "beta_ms": beta, "u": 1.0, "gamma": 0.0, "cores": 1},
                    "train": [], "heldout": [], "heldout_rel_errors": [], "median_rel_error": None,
                    "max_rel_error": None, "note": "not fitted: the curve is the derivation's own"},
        }
    return {"profile_version": 1, "created": created,
            "host": {"cpu": "GPU-like accelerator (derived)", "cores": 1, "machine": "derived", "system": "derived",
                     "python": "n/a", "runtimes": {}},
            "settings": {"derived": True},
            "models": models, "board": dict(board)}


def with_quota(profile: dict[str, Any], quota_cores: float, board: dict[str, Any]) -> dict[str, Any]:
    """A board whose agent runs in a CPU quota of ``quota_cores`` (< 1), derived from a measured
    profile of the unconfined board by the sustained-rate rule: a single-threaded instance gets
    ``quota_cores`` of a core over time, so every batch time is divided by ``quota_cores``; the
    quota is less than one core, so the board has one core's worth (``cores = 1``) and instances
    only time-slice it (``u = 1, gamma = 0``). Measuring under a CFS quota instead gives short
    batches their full-speed time (they finish inside one period before the throttle), which
    misstates the sustained capacity the planner needs."""
    if not 0 < quota_cores < 1:
        raise ValueError(f"quota_cores = {quota_cores!r}: expected a fraction of one core in (0, 1)")
    out = copy.deepcopy(profile)
    scale = 1.0 / quota_cores
    out["host"]["cores"] = 1
    out["settings"] = {**out.get("settings", {}), "derived": f"cpu quota {quota_cores:g} core from the measured profile"}
    for entry in out["models"].values():
        batch = entry["batch"]
        for key in ("p50_ms", "p99_ms", "mean_ms"):
            batch[key] = [round(t * scale, 4) for t in batch[key]]
        sizes = batch["sizes"]
        pick = [s for s in (1, 8) if s in sizes] or sizes[:1]
        alone = [batch["p50_ms"][sizes.index(s)] for s in pick]
        entry["concurrency"] = {"levels": [1, 2], "batch_sizes": pick,
                                "p50_ms": [alone, [round(2 * t, 4) for t in alone]]}
        entry["co_running"] = {}
        params = entry["fit"]["params"]
        entry["fit"] = {"form": FORM,
                        "params": {"alpha_ms": params["alpha_ms"] * scale, "beta_ms": params["beta_ms"] * scale,
                                   "u": 1.0, "gamma": 0.0, "cores": 1},
                        "train": [], "heldout": [], "heldout_rel_errors": [], "median_rel_error": None,
                        "max_rel_error": None, "note": f"derived: the measured fit's alpha, beta / {quota_cores:g}"}
    out["board"] = dict(board)
    return out
