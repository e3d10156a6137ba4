"""An analytic interference model of batch latency under k co-running instances, and its fit.

    t(b, k) = (alpha + beta * b) * max(1, k * u / P) * (1 + gamma * (min(k, P) - 1))

* ``b``: batch size; ``k``: instances busy at once (this one included); ``P``: cores on the board.
* ``alpha + beta * b``: the isolated batch time, a fixed per-call cost plus a per-item cost
  (ours; on the 2-core CPU of BENCHMARKS.md, "Board profile", a batch costs about as much as its
  items run one by one, so ``alpha`` is small; on a GPU it dominates).
* ``max(1, k * u / P)``: **processor sharing, from Ibis** (PAPERS.md section 2). Ibis models
  instances that share one accelerator as an M/G/1/PS queue: every busy instance gets an equal
  share of the processor, so each one's service stretches with the number sharing it. Ours: the
  board has ``P`` cores, not one processor, and an instance can use at most ``u`` of a core (its
  intra-op threads, its serial parts); k instances want ``k * u`` cores, and only when that
  exceeds ``P`` do they stretch, by the ratio, which is egalitarian PS over P servers. Also ours:
  the profiler runs a closed system (k instances always busy), so the Poisson-arrival queueing
  term of Ibis's E[R] (1/(mu - lambda) - 1/mu) does not appear; the scheduler adds queueing
  itself. Above the knee this is linear in k, as DeepRT measured (PAPERS.md section 3).
* ``1 + gamma * (min(k, P) - 1)``: contention (ours): instances running *at the same instant*
  on different cores still share memory bandwidth and the last-level cache, which PS ignores.
  At most ``P`` instances run at the same instant, so the term stops growing at ``k = P``;
  beyond that the extra instances only time-slice, which the PS factor already counts.

Fitting: ``alpha`` and ``beta`` enter linearly once ``u`` and ``gamma`` are fixed, so the fit
searches ``(u, gamma)`` on a grid that it zooms into, solving a least-squares problem for
``(alpha, beta)`` at each grid point. The loss is the sum of squared *relative* errors, so batch 1
weighs as much as batch 64, many times longer: admission control cares about relative error.

Held-out points are never seen by the fit; their relative errors are the figure of merit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = [
    "FORM",
    "FitResult",
    "slowdown",
    "predict_ms",
    "checkerboard_heldout",
    "fit_interference",
]

FORM = "t(b,k) = (alpha_ms + beta_ms*b) * max(1, k*u/cores) * (1 + gamma*(min(k,cores)-1))"

# Search ranges. u above the board's cores would mean one instance wants more than the board;
# gamma above 1 would mean two instances on two cores are slower than on one: both are cut off.
_U_MIN = 0.02
_GAMMA_MAX = 1.0


def slowdown(k: int | np.ndarray, u: float, gamma: float, cores: int) -> np.ndarray | float:
    """Factor by which k co-running instances stretch one instance's batch time (1 at k = 1)."""
    k = np.asarray(k, dtype=np.float64)
    sharing = np.maximum(1.0, k * u / cores)
    contention = 1.0 + gamma * (np.minimum(k, cores) - 1.0)
    out = sharing * contention
    return float(out) if out.ndim == 0 else out


def predict_ms(params: dict[str, float], batch: int | np.ndarray, concurrency: int | np.ndarray = 1) -> np.ndarray | float:
    """The model's latency in ms for batch ``batch`` with ``concurrency`` instances busy at once."""
    b = np.asarray(batch, dtype=np.float64)
    base = params["alpha_ms"] + params["beta_ms"] * b
    out = base * slowdown(concurrency, params["u"], params["gamma"], int(params["cores"]))
    out = np.asarray(out)
    return float(out) if out.ndim == 0 else out


def checkerboard_heldout(points: Sequence[tuple[int, int]]) -> list[bool]:
    """Which (batch, k) points to hold out: alternate ones within each k, shifted by k.

    Within each concurrency level the points are ordered by batch size and numbered from 0;
    a point is held out when ``position + k`` is even. At k = 1 that holds out every second batch
    size (2, 8, 32, ...: interpolation between trained neighbours), and across k the pattern
    alternates, so each level that has two or more points keeps one for training and gives one
    for testing: the slowdown is trained at every k and tested at every k.
    """
    heldout = [False] * len(points)
    by_k: dict[int, list[int]] = {}
    for index, (_, k) in enumerate(points):
        by_k.setdefault(int(k), []).append(index)
    for k, indices in by_k.items():
        indices.sort(key=lambda i: points[i][0])
        for position, index in enumerate(indices):
            heldout[index] = (position + k) % 2 == 0
    return heldout


@dataclass(frozen=True)
class FitResult:
    """Fitted parameters, which points trained and which tested the fit, and its errors.

    ``median_rel_error`` / ``max_rel_error`` are over the held-out points only (None when there
    were none); ``train_*`` over the training points, to see over-fitting. ``note`` says when a
    part of the model could not be fitted from the data (e.g. no training point with k > 1).
    """

    form: str
    params: dict[str, float]
    train: list[list[int]]
    heldout: list[list[int]]
    heldout_rel_errors: list[float]
    median_rel_error: float | None
    max_rel_error: float | None
    train_median_rel_error: float
    train_max_rel_error: float
    note: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {
            "form": self.form,
            "params": dict(self.params),
            "train": [list(p) for p in self.train],
            "heldout": [list(p) for p in self.heldout],
            "heldout_rel_errors": list(self.heldout_rel_errors),
            "median_rel_error": self.median_rel_error,
            "max_rel_error": self.max_rel_error,
            "train_median_rel_error": self.train_median_rel_error,
            "train_max_rel_error": self.train_max_rel_error,
        }
        if self.note:
            out["note"] = self.note
        return out


def _solve_linear(b: np.ndarray, s: np.ndarray, t: np.ndarray) -> tuple[float, float, float]:
    """Best (alpha, beta >= 0) for fixed slowdowns s, minimising squared relative error; + loss."""
    # Relative residual (s*(alpha + beta*b) - t)/t: divide each row by t, target 1.
    design = np.stack([s / t, s * b / t], axis=1)
    target = np.ones_like(t)
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    alpha, beta = float(coef[0]), float(coef[1])
    if alpha < 0 or beta < 0:
        # A negative fixed cost or per-item cost is not a latency; refit with it pinned at 0.
        candidates = []
        for col in (0, 1):
            x = design[:, col]
            value = max(0.0, float(x @ target / (x @ x)))
            coefs = (value, 0.0) if col == 0 else (0.0, value)
            candidates.append(coefs)
        alpha, beta = min(candidates, key=lambda c: float(np.sum((design @ np.array(c) - target) ** 2)))
    loss = float(np.sum((design @ np.array([alpha, beta]) - target) ** 2))
    return alpha, beta, loss


def fit_interference(points: Sequence[tuple[int, int, float]], cores: int,
                     heldout: Sequence[bool] | None = None, max_u: float | None = None) -> FitResult:
    """Fit :data:`FORM` to measured ``(batch, k, latency_ms)`` points; test on the held-out ones.

    ``heldout`` marks the points kept out of the fit (default :func:`checkerboard_heldout`).
    ``max_u`` bounds how much of a core one instance may use (default: all ``cores``).
    Raises ValueError when there are fewer than two training points or a latency is not > 0.
    """
    if cores < 1:
        raise ValueError(f"cores = {cores}: expected an integer >= 1")
    data = np.array([(float(b), float(k), float(t)) for b, k, t in points], dtype=np.float64).reshape(-1, 3)
    if np.any(data[:, 2] <= 0) or np.any(data[:, 0] < 1) or np.any(data[:, 1] < 1):
        raise ValueError("every point needs batch >= 1, k >= 1 and latency_ms > 0")
    mask = np.array(checkerboard_heldout([(int(b), int(k)) for b, k, _ in data]) if heldout is None
                    else list(heldout), dtype=bool)
    if mask.shape != (len(data),):
        raise ValueError(f"heldout has {mask.size} flags for {len(data)} points")
    train = data[~mask]
    if len(train) < 2:
        raise ValueError(f"{len(train)} training point(s): expected at least 2 to fit alpha and beta")
    b, k, t = train[:, 0], train[:, 1], train[:, 2]
    u_hi = float(max_u) if max_u is not None else float(cores)

    note = ""
    if np.all(k == 1):
        # Nothing to learn the slowdown from: keep pure PS with a whole core per instance.
        u, gamma = min(1.0, u_hi), 0.0
        alpha, beta, _ = _solve_linear(b, np.ones_like(t), t)
        note = "no training point with k > 1: u fixed at 1, gamma at 0 (not fitted)"
    else:
        best = (np.inf, 1.0, 0.0, 0.0, 0.0)
        u_lo_edge, u_hi_edge, g_lo_edge, g_hi_edge = _U_MIN, u_hi, 0.0, _GAMMA_MAX
        for _ in range(8):  # zoom: each round narrows the grid around the best point so far
            for u_try in np.linspace(u_lo_edge, u_hi_edge, 33):
                for g_try in np.linspace(g_lo_edge, g_hi_edge, 33):
                    s = slowdown(k, float(u_try), float(g_try), cores)
                    a_try, b_try, loss = _solve_linear(b, s, t)
                    if loss < best[0] - 1e-15:
                        best = (loss, float(u_try), float(g_try), a_try, b_try)
            _, u, gamma, alpha, beta = best
            du = (u_hi_edge - u_lo_edge) / 8
            dg = (g_hi_edge - g_lo_edge) / 8
            u_lo_edge, u_hi_edge = max(_U_MIN, u - du), min(u_hi, u + du)
            g_lo_edge, g_hi_edge = max(0.0, gamma - dg), min(_GAMMA_MAX, gamma + dg)
        k_max = float(k.max())
        if k_max * u / cores <= 1.0 + 1e-9:
            # No training point is past the sharing knee, so any u up to cores/k_max fits equally
            # well. Take the largest (the knee right after the last measured k): the pessimistic
            # choice, where a tiny u would promise that any number of instances run for free.
            u = min(u_hi, cores / k_max)
            alpha, beta, _ = _solve_linear(b, np.asarray(slowdown(k, u, gamma, cores)), t)
            note = (f"no training point is past the sharing knee: u is only bounded (u <= {u:.3f}); "
                    "the largest value is kept")

    params = {"alpha_ms": alpha, "beta_ms": beta, "u": u, "gamma": gamma, "cores": int(cores)}

    def rel_errors(rows: np.ndarray) -> np.ndarray:
        if len(rows) == 0:
            return np.zeros(0)
        predicted = np.asarray(predict_ms(params, rows[:, 0], rows[:, 1]), dtype=np.float64)
        return np.abs(predicted - rows[:, 2]) / rows[:, 2]

    held_rows = data[mask]
    held_err = rel_errors(held_rows)
    train_err = rel_errors(train)
    as_points = lambda rows: [[int(r[0]), int(r[1])] for r in rows]  # noqa: E731
    return FitResult(
        form=FORM,
        params=params,
        train=as_points(train),
        heldout=as_points(held_rows),
        heldout_rel_errors=[float(e) for e in held_err],
        median_rel_error=float(np.median(held_err)) if held_err.size else None,
        max_rel_error=float(np.max(held_err)) if held_err.size else None,
        train_median_rel_error=float(np.median(train_err)),
        train_max_rel_error=float(np.max(train_err)),
        note=note,
    )
