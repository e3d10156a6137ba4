"""Exact solvers of the batching + early-exit allocation (:mod:`agent.exits.allocation`): a MILP for
small instances and a brute force for tiny ones; what the heuristic's gap is measured against.

The MILP (``scipy.optimize.milp``, HiGHS) states the model of :mod:`agent.exits.allocation` as a
linear integer program. scipy is imported inside :func:`solve_exact` only: the lab and the tests
need it (the ``dev`` extra and the lab's ``bench`` extra), a board running the heuristic does not.

Variables
  ``y[i,e,j]`` in {0,1}: class ``i`` served at exit ``e`` in the stream of batch size ``B[j]``, for
  the pairs ``Problem.options[i]`` (accuracy met, stages alone within the SLO); every exit that is
  accurate enough is offered, not only the earliest, so the program checks that choice too.
  ``m[j,k] >= 0`` with ``delta[j,k]`` in {0,1}, for ``B[j] > 1`` and ``k > 1``: the batches per
  second that run stage ``k``, ``min(Lambda_j / B[j], F_jk)``.
Linear expressions
  ``Lambda_j = sum_{i,e} rate_i y[i,e,j]``, ``F_jk = sum_{i, e >= k} rate_i y[i,e,j]``.
Constraints
  * one choice per class: ``sum_{e,j} y[i,e,j] <= 1``;
  * the minimum: ``m[j,k] >= Lambda_j / B[j] - M delta[j,k]`` and ``m[j,k] >= F_jk - M (1 - delta[j,k])``
    with ``M = sum of all rates``: ``m`` is at least one of the two, and the capacity row pushes it
    to the smaller (for ``k = 1`` the minimum is ``Lambda_j / B[j]``, for ``B[j] = 1`` it is ``F_jk``:
    no variable needed);
  * capacity: ``sum_j sum_k fixed_k m[j,k] + per_item_k F_jk <= 1000 utilisation``;
  * latency, for each ``y[i,e,j]`` with ``B[j] > 1``: ``1000 (B[j]-1)/Lambda_j + T_ej <= SLO_i`` when
    served, i.e. ``(SLO_i - T_ej) Lambda_j >= 1000 (B[j] - 1) y[i,e,j]`` (linear: ``Lambda_j``
    includes class ``i``'s own rate, and with ``y = 0`` the row is void). ``T_ej``: stages up to ``e``.
Objective
  maximise ``sum rate_i y[i,e,j]``, the served rate.

The solver's answer is re-checked with :meth:`Problem.check` (the same model the heuristic uses);
the capacity and latency rows are tightened by a millionth so that HiGHS's feasibility tolerance
cannot buy an answer the check refuses.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from agent.exits.allocation import AllocationError, ExitModel, Plan, Problem, UserClass

__all__ = ["solve_exact", "brute_force", "BRUTE_FORCE_LIMIT"]

#: Plans brute_force will enumerate at most: (1 + options per class) multiplied over the classes.
BRUTE_FORCE_LIMIT = 2_000_000
#: Relative tightening of the MILP's capacity and latency rows (see the module docstring).
MILP_MARGIN = 1e-6


def _problem(classes: Sequence[UserClass] | Problem, model: ExitModel | None, utilisation: float | None) -> Problem:
    if isinstance(classes, Problem):
        return classes
    return Problem(classes, model) if utilisation is None else Problem(classes, model, utilisation)


def solve_exact(classes: Sequence[UserClass] | Problem, model: ExitModel | None = None,
                utilisation: float | None = None, time_limit_s: float = 60.0) -> Plan:
    """The plan of largest served rate, by a MILP (see the module docstring). Raises
    :class:`AllocationError` for an impossible class (as :class:`Problem` does) and RuntimeError
    when HiGHS finds no optimum within ``time_limit_s``."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    p = _problem(classes, model, utilisation)
    model = p.model
    n, K, J = len(p.classes), len(model.names), len(model.batch_sizes)
    sizes = model.batch_sizes
    y_index: list[tuple[int, int, int]] = [(i, e, j) for i in range(n) for e, j in p.options[i]]
    mk = [(j, k) for j in range(J) if sizes[j] > 1 for k in range(1, K)]
    n_y, n_m = len(y_index), len(mk)
    # columns: y..., m..., delta...
    n_var = n_y + 2 * n_m
    m_col = {jk: n_y + t for t, jk in enumerate(mk)}
    d_col = {jk: n_y + n_m + t for t, jk in enumerate(mk)}
    rate = [c.rate for c in p.classes]
    big = float(sum(rate))

    def lam_row(row: np.ndarray, j: int, scale: float = 1.0) -> None:
        for col, (i, e, jj) in enumerate(y_index):
            if jj == j:
                row[col] += scale * rate[i]

    def flow_row(row: np.ndarray, j: int, k: int, scale: float = 1.0) -> None:
        for col, (i, e, jj) in enumerate(y_index):
            if jj == j and e >= k:
                row[col] += scale * rate[i]

    rows: list[np.ndarray] = []
    lower: list[float] = []
    upper: list[float] = []

    def add(row: np.ndarray, lo: float, hi: float) -> None:
        rows.append(row)
        lower.append(lo)
        upper.append(hi)

    for i in range(n):                                   # one choice per class
        row = np.zeros(n_var)
        for col, (ii, e, j) in enumerate(y_index):
            if ii == i:
                row[col] = 1.0
        add(row, -np.inf, 1.0)
    for j, k in mk:                                      # m >= min(Lambda/b, F_k)
        row = np.zeros(n_var)
        row[m_col[(j, k)]] = 1.0
        lam_row(row, j, -1.0 / sizes[j])
        row[d_col[(j, k)]] = big
        add(row, 0.0, np.inf)
        row = np.zeros(n_var)
        row[m_col[(j, k)]] = 1.0
        flow_row(row, j, k, -1.0)
        row[d_col[(j, k)]] = -big
        add(row, -big, np.inf)
    row = np.zeros(n_var)                                # capacity
    for j in range(J):
        for k in range(K):
            flow_row(row, j, k, model.per_item_ms[k])
            if k == 0:
                lam_row(row, j, model.fixed_ms[0] / sizes[j])
            elif sizes[j] == 1:
                flow_row(row, j, k, model.fixed_ms[k])
            else:
                row[m_col[(j, k)]] += model.fixed_ms[k]
    add(row, -np.inf, p.capacity_ms * (1 - MILP_MARGIN))
    for col, (i, e, j) in enumerate(y_index):            # latency: the batch's fill wait
        if sizes[j] == 1:
            continue
        slack = p.classes[i].slo_ms * (1 - MILP_MARGIN) - p.cum_ms[e][j]
        row = np.zeros(n_var)
        if slack <= 0:
            row[col] = 1.0
            add(row, 0.0, 0.0)
            continue
        lam_row(row, j, slack)
        row[col] -= 1000.0 * (sizes[j] - 1)
        add(row, 0.0, np.inf)

    objective = np.zeros(n_var)
    for col, (i, e, j) in enumerate(y_index):
        objective[col] = -rate[i]
    integrality = np.zeros(n_var)
    integrality[:n_y] = 1
    integrality[n_y + n_m:] = 1
    upper_bounds = np.full(n_var, np.inf)
    upper_bounds[:n_y] = 1.0
    upper_bounds[n_y + n_m:] = 1.0
    matrix = lil_matrix((len(rows), n_var))
    for r, row in enumerate(rows):
        nz = np.nonzero(row)[0]
        matrix[r, nz] = row[nz]
    result = milp(objective, integrality=integrality, bounds=Bounds(np.zeros(n_var), upper_bounds),
                  constraints=LinearConstraint(matrix.tocsr(), lower, upper),
                  options={"time_limit": time_limit_s, "mip_rel_gap": 0.0})
    if result.x is None or result.status != 0:
        raise RuntimeError(f"the allocation MILP found no optimum: {result.message}")
    choices: list[tuple[int, int] | None] = [None] * n
    for col, (i, e, j) in enumerate(y_index):
        if result.x[col] > 0.5:
            choices[i] = (e, j)
    plan = p.plan(choices, "milp")
    if not plan.feasible:     # the model's own check disagrees: a formulation bug, never a plan to serve
        raise RuntimeError(f"the allocation MILP's plan fails the model's check:\n{plan.describe()}")
    return plan


def brute_force(classes: Sequence[UserClass] | Problem, model: ExitModel | None = None,
                utilisation: float | None = None) -> Plan:
    """The plan of largest served rate by trying every combination of choices (every accurate exit,
    every batch size, or not served, per class): for tiny instances, to check the MILP. Ties go to
    the smaller busy time. Refuses instances over :data:`BRUTE_FORCE_LIMIT` plans."""
    p = _problem(classes, model, utilisation)
    count = 1
    for options in p.options:
        count *= 1 + len(options)
    if count > BRUTE_FORCE_LIMIT:
        raise AllocationError(f"brute force over {count:,} plans: more than {BRUTE_FORCE_LIMIT:,}; use solve_exact")
    best_key, best = None, None
    for choices in itertools.product(*[[None, *options] for options in p.options]):
        feasible, served, busy, _ = p.check(choices)
        if feasible and (best_key is None or (served, -busy) > best_key):
            best_key, best = (served, -busy), choices
    return p.plan(list(best), "brute-force")
