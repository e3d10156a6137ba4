"""Which exit answers each class of users, and at what batch size: the batching + early-exit allocation.

The joint batching + early-exit paper (Liu, Lan, Huang, JSAC 2023; see ../shared/PAPERS.md) gives
only its abstract to us: many users with different accuracy and latency requirements, batching and
early exits chosen jointly to maximise throughput, an NP-complete integer program with an optimal
and a sub-optimal algorithm. Its variables, latency model and algorithms are unknown, so the model
below is **ours**; it keeps what the abstract fixes (per-user accuracy and latency requirements,
users scheduled whole, throughput as the criterion) and prices what the card measures.

The problem
-----------
* **Classes** (:class:`UserClass`): requests of class ``i`` arrive at ``rate`` per second (steady),
  each needs its answer within ``slo_ms`` and from an exit at least ``min_accuracy`` accurate.
* **Model** (:class:`ExitModel`): exits ``1..K`` (earliest first) with their top-1 accuracy, and
  ``t_k(b)``, stage ``k``'s time for a batch of ``b`` items, at the profiled batch sizes ``B``
  (the card's ``exit_profile``). Only profiled sizes are chosen.
* **Decision** (:class:`Choice`): for each class, served or not; if served, its exit ``e_i`` and
  its batch size ``b_i`` in ``B``. All served classes with the same batch size share one *batch
  stream*: its requests, whatever their class, are collected in arrival order into batches of
  ``b``; a batch runs stage 1, the items whose exit is 1 leave, the rest run stage 2 in the same
  batch, and so on (survivors are not re-batched with other batches' survivors here; doing so
  only lowers the cost priced below, so the plan stays safe under it).
* **Accuracy**: ``accuracy(e_i) >= min_accuracy_i``.
* **Latency** of class ``i`` in stream ``b`` with rate ``Lambda_b`` (the sum of its classes'
  rates): the first item of a batch waits ``1000 (b - 1) / Lambda_b`` ms for the batch to fill
  (steady arrivals), then the stages up to its exit run, each at most ``t_k(b)`` (the survivors are
  fewer, and a stage is never slower on fewer items): ``1000 (b-1)/Lambda_b + sum_{k<=e_i} t_k(b)
  <= slo_ms_i``. Queueing behind other streams' batches is not modelled: the plan keeps the
  processor's busy share under ``utilisation`` (default 0.9) to leave room for it, and the
  scheduler's per-request deadline test stays the judge at dispatch.
* **Capacity**: one processor runs the stage batches one at a time. Stage time is taken affine in
  the items it runs, ``t_k(n) <= a_k + c_k n`` (the smallest such envelope over the profiled
  sizes: :meth:`ExitModel.envelope`). Per second, stream ``b`` runs ``Lambda_b / b`` batches; a
  batch runs stage ``k`` only if one of its items goes that deep, and at most ``F_bk`` batches per
  second can (``F_bk``: the rate of the stream's items with exit ``>= k``), so the stream's busy
  time is at most ``sum_k a_k min(Lambda_b / b, F_bk) + c_k F_bk`` ms per second. That bound is
  exact for a stream of one exit and for batch 1, and the expected value for mixed exits,
  ``(Lambda_b/b)(1 - (1 - F_bk/Lambda_b)^b)``, never exceeds it. The plan needs
  ``sum_b busy_b <= 1000 utilisation``.
* **Objective: the served rate**, ``sum of rate_i`` over the classes served whole. Why this and not
  the largest uniform scale of all rates: when the board is overloaded the agent must decide *whom*
  to serve (admission), and the served rate answers that, while a uniform scale only says how much
  and lets one costly strict class drag every class down; it is also the paper's criterion as far
  as the abstract says (users scheduled, tasks completed), and with the rates fixed the batch fill
  times are constants per stream rate, so the exact problem stays a linear integer program
  (:mod:`agent.exits.exact`). A class that no exit can serve in its SLO even alone at the smallest
  batch, or that no exit is accurate enough for, is refused up front (:class:`AllocationError`).

The heuristic (:func:`plan_allocation`), what the agent runs online
-------------------------------------------------------------------
Each class answers at its **earliest accurate exit** (in this model a deeper exit only adds stage
time and cost, so it is never better; the exact solvers are offered every accurate exit and agree).
Three starting plans: *top-down* (every class at the largest batch whose latency holds at the
rate its stream ends up with, then drop the class whose absence leaves the best plan, until it
fits) and *greedy admission* in two orders (cheapest per request first, largest rate first), each
class into the stream that adds the least busy time while its latency holds. Each start is improved
by local search: move a served class to the stream where the total busy time is smaller, admit a
class that now fits, swap one or two served classes out for an unserved one of larger rate. The
best plan is then polished with one costlier move, *absorb*: re-fit the served classes plus one or
two unserved ones from the top down (classes that only meet their SLO by sharing a stream get in
that way). The search stops early once the plan serves as much as a fractional-knapsack bound allows.
Pure python, a handful of classes: ``edge-agent bench exit-alloc`` reports the gap to the MILP's
optimum and the decision time, ``bench core`` the decision time. The plan depends only on the
classes' rates, SLOs and accuracy requirements, so the serving side keeps it and reruns the
heuristic when those change (a new class, a rate estimate that moved), not for every batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = ["AllocationError", "UserClass", "ExitModel", "Choice", "Problem", "Plan", "evaluate", "plan_allocation",
           "DEFAULT_UTILISATION"]

#: Share of the processor a plan may fill; the rest absorbs queueing behind other streams' batches.
DEFAULT_UTILISATION = 0.9
#: Relative slack when checking a constraint (capacity, latency) of a plan, against float rounding.
TOLERANCE = 1e-9


class AllocationError(ValueError):
    """Input the allocation refuses: the message names the class (or the model) and what was wrong."""


@dataclass(frozen=True)
class UserClass:
    """Users with one requirement: ``rate`` requests per second, each answered within ``slo_ms`` by an
    exit at least ``min_accuracy`` accurate (0: any exit)."""

    name: str
    rate: float
    slo_ms: float
    min_accuracy: float = 0.0


@dataclass(frozen=True)
class Choice:
    """A served class's exit (index into the model's exits, earliest first) and batch size."""

    exit: int
    batch: int


def _envelope(sizes: Sequence[int], times: Sequence[float]) -> tuple[float, float]:
    """The affine ``a + c n`` above every profiled ``(n, t(n))``: the least-squares slope (>= 0), then
    the intercept raised until the line covers every point (>= 0)."""
    b = np.asarray(sizes, dtype=float)
    t = np.asarray(times, dtype=float)
    if len(b) >= 2:
        slope = float(np.polyfit(b, t, 1)[0])
    else:
        slope = float(t[0] / b[0])
    slope = max(slope, 0.0)
    intercept = max(0.0, float(np.max(t - slope * b)))
    # The line must cover every point exactly despite rounding: nudge the intercept up if needed.
    over = float(np.max(t - (intercept + slope * b)))
    if over > 0:
        intercept += over
    return intercept, slope


@dataclass(frozen=True)
class ExitModel:
    """A multi-exit model as the allocation sees it: exit names and accuracies (earliest first), the
    profiled batch sizes, and ``stage_ms[k][j]``, stage ``k``'s time in ms for a batch of
    ``batch_sizes[j]`` (stage ``k`` ends at exit ``k``). ``fixed_ms``/``per_item_ms`` are each
    stage's affine envelope (derived: :func:`_envelope`), what partial batches are priced at."""

    names: tuple[str, ...]
    accuracy: tuple[float, ...]
    batch_sizes: tuple[int, ...]
    stage_ms: tuple[tuple[float, ...], ...]
    fixed_ms: tuple[float, ...] = field(init=False)
    per_item_ms: tuple[float, ...] = field(init=False)

    def __post_init__(self) -> None:
        names, accuracy = tuple(self.names), tuple(float(a) for a in self.accuracy)
        sizes = tuple(self.batch_sizes)
        where = f"exit model {list(names)}"
        if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise AllocationError(f"{where}: expected one or more distinct exit names")
        if len(accuracy) != len(names) or not all(0.0 <= a <= 1.0 for a in accuracy):
            raise AllocationError(f"{where}: accuracy = {list(self.accuracy)}: expected one value in 0..1 per exit")
        if not sizes or not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b >= 1
                                for b in sizes) or list(sizes) != sorted(set(sizes)):
            raise AllocationError(f"{where}: batch_sizes = {list(sizes)}: expected increasing integers >= 1")
        stage = tuple(tuple(float(v) for v in row) for row in self.stage_ms)
        if len(stage) != len(names) or any(len(row) != len(sizes) or not all(math.isfinite(v) and v >= 0 for v in row)
                                           for row in stage):
            raise AllocationError(f"{where}: stage_ms = {self.stage_ms!r}: expected {len(names)} rows (one per "
                                  f"stage) of {len(sizes)} times in ms >= 0 (one per batch size {list(sizes)})")
        fits = [_envelope(sizes, row) for row in stage]
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "accuracy", accuracy)
        object.__setattr__(self, "batch_sizes", tuple(int(b) for b in sizes))
        object.__setattr__(self, "stage_ms", stage)
        object.__setattr__(self, "fixed_ms", tuple(a for a, _ in fits))
        object.__setattr__(self, "per_item_ms", tuple(c for _, c in fits))

    @classmethod
    def affine(cls, names: Sequence[str], accuracy: Sequence[float], fixed_ms: Sequence[float],
               per_item_ms: Sequence[float], batch_sizes: Sequence[int]) -> "ExitModel":
        """A model whose stage ``k`` takes ``fixed_ms[k] + per_item_ms[k] * n`` ms for ``n`` items."""
        if len(fixed_ms) != len(names) or len(per_item_ms) != len(names):
            raise AllocationError(f"exit model {list(names)}: fixed_ms {list(fixed_ms)} and per_item_ms "
                                  f"{list(per_item_ms)}: expected one value per exit")
        stage = [[float(a) + float(c) * b for b in batch_sizes] for a, c in zip(fixed_ms, per_item_ms)]
        return cls(tuple(names), tuple(accuracy), tuple(batch_sizes), tuple(tuple(r) for r in stage))

    @classmethod
    def from_card(cls, card: Any) -> "ExitModel":
        """The exits of a model card (:class:`agent.models.card.ModelCard`) with their measured stage times."""
        exits = list(getattr(card, "exits", []) or [])
        if not exits:
            raise AllocationError(f"model {getattr(card, 'name', card)!r}: its card lists no exits")
        missing = [p.name for p in exits if p.stage_ms is None or p.batch_sizes is None]
        if missing:
            raise AllocationError(f"model {card.name!r}: exits {missing} have no stage_ms (the card's exit_profile "
                                  "gives them; tools/build_models.py measures them)")
        return cls(tuple(p.name for p in exits), tuple(p.accuracy for p in exits), tuple(exits[0].batch_sizes),
                   tuple(tuple(p.stage_ms) for p in exits))

    def envelope(self, stage: int) -> tuple[float, float]:
        """Stage ``stage``'s ``(fixed_ms, per_item_ms)``: ``t(n) <= fixed + per_item * n`` at every profiled n."""
        return self.fixed_ms[stage], self.per_item_ms[stage]

    def time_to_exit(self, exit: int, batch_index: int) -> float:
        """Stages ``0..exit`` in ms at the profiled batch size ``batch_sizes[batch_index]``."""
        return sum(self.stage_ms[k][batch_index] for k in range(exit + 1))


class Problem:
    """Classes, a model and a processor share, checked and precomputed once (for the heuristic, the
    exact solvers and :func:`evaluate` alike).

    ``options[i]``: the ``(exit, batch index)`` pairs that meet class ``i``'s accuracy and whose
    stages alone fit its SLO (the fill wait comes on top and depends on the stream's rate). A class
    with none is refused: :class:`AllocationError` names it and says which requirement fails.
    """

    def __init__(self, classes: Sequence[UserClass], model: ExitModel,
                 utilisation: float = DEFAULT_UTILISATION) -> None:
        if not (isinstance(utilisation, (int, float)) and 0.0 < utilisation <= 1.0):
            raise AllocationError(f"utilisation = {utilisation!r}: expected a share of the processor in (0, 1]")
        classes = tuple(classes)
        names = [c.name for c in classes]
        for c in classes:
            if not isinstance(c.name, str) or not c.name:
                raise AllocationError(f"class {c.name!r}: expected a non-empty name")
            if names.count(c.name) > 1:
                raise AllocationError(f"class {c.name!r}: the name is used twice")
            for key, value in (("rate", c.rate), ("slo_ms", c.slo_ms)):
                if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                        and value > 0):
                    raise AllocationError(f"class {c.name!r}: {key} = {value!r}: expected a number > 0")
            if not (isinstance(c.min_accuracy, (int, float)) and 0.0 <= c.min_accuracy <= 1.0):
                raise AllocationError(f"class {c.name!r}: min_accuracy = {c.min_accuracy!r}: expected 0..1")
        self.classes = classes
        self.model = model
        self.utilisation = float(utilisation)
        self.capacity_ms = 1000.0 * self.utilisation
        K, J = len(model.names), len(model.batch_sizes)
        #: cum_ms[e][j]: stages up to exit e at batch size j, the latency's execution part.
        self.cum_ms = [[model.time_to_exit(e, j) for j in range(J)] for e in range(K)]
        self.options: list[list[tuple[int, int]]] = []
        self.earliest_exit: list[int] = []
        for c in classes:
            accurate = [e for e in range(K) if model.accuracy[e] >= c.min_accuracy - TOLERANCE]
            if not accurate:
                best = ", ".join(f"{n} {a:.4f}" for n, a in zip(model.names, model.accuracy))
                raise AllocationError(f"class {c.name!r}: min_accuracy {c.min_accuracy:g} is above every exit's "
                                      f"accuracy ({best})")
            options = [(e, j) for e in accurate for j in range(J)
                       if self.cum_ms[e][j] <= c.slo_ms * (1 + TOLERANCE)]
            if not options:
                e = accurate[0]
                fastest = min(range(J), key=lambda j: self.cum_ms[e][j])
                raise AllocationError(
                    f"class {c.name!r}: slo_ms {c.slo_ms:g} is below the stages up to its earliest accurate exit "
                    f"{model.names[e]!r} (accuracy {model.accuracy[e]:.4f} >= {c.min_accuracy:g}) even at batch "
                    f"{model.batch_sizes[fastest]}: {self.cum_ms[e][fastest]:.3f} ms")
            self.options.append(options)
            self.earliest_exit.append(accurate[0])
        # Flat copies for the heuristic's inner loops.
        self.rates = [c.rate for c in classes]
        self.slo_limit = [c.slo_ms * (1 + TOLERANCE) for c in classes]
        self.streams = [sorted(j for e, j in options if e == first)
                        for options, first in zip(self.options, self.earliest_exit)]
        #: The heuristic's memo: member set -> its largest consistent fit (_fit).
        self._fits: dict[tuple[int, ...], tuple] = {}

    # ---- the model's two sums, shared by every solver ------------------------------------------

    def stream_busy_ms(self, batch_index: int, rate: float, flow: Sequence[float]) -> float:
        """Busy ms per second of the stream at batch size ``batch_sizes[batch_index]`` carrying ``rate``
        requests/s of which ``flow[k]`` go as deep as stage ``k`` (``flow[0] == rate``)."""
        if rate <= 0:
            return 0.0
        model = self.model
        batches = rate / model.batch_sizes[batch_index]
        busy = 0.0
        for k, f in enumerate(flow):
            if f > 0:
                busy += model.fixed_ms[k] * (batches if batches < f else f) + model.per_item_ms[k] * f
        return busy

    def fill_ms(self, batch_index: int, stream_rate: float) -> float:
        """The first item's wait for its batch to fill, in a stream of ``stream_rate`` requests/s."""
        b = self.model.batch_sizes[batch_index]
        return 0.0 if b == 1 else 1000.0 * (b - 1) / stream_rate

    def check(self, choices: Sequence[Choice | tuple[int, int] | None]) -> tuple[bool, float, float, list[float | None]]:
        """``(feasible, served rate, busy ms/s, latency ms per class)`` of a plan given as one
        ``(exit, batch index)`` or None per class (:func:`evaluate` takes batch sizes instead)."""
        K, J = len(self.model.names), len(self.model.batch_sizes)
        rate = [0.0] * J
        flow = [[0.0] * K for _ in range(J)]
        served = 0.0
        for c, choice in zip(self.classes, choices):
            if choice is None:
                continue
            e, j = choice
            rate[j] += c.rate
            row = flow[j]
            for k in range(e + 1):
                row[k] += c.rate
            served += c.rate
        busy = sum(self.stream_busy_ms(j, rate[j], flow[j]) for j in range(J) if rate[j] > 0)
        feasible = busy <= self.capacity_ms * (1 + TOLERANCE)
        latency: list[float | None] = []
        for c, choice in zip(self.classes, choices):
            if choice is None:
                latency.append(None)
                continue
            e, j = choice
            value = self.fill_ms(j, rate[j]) + self.cum_ms[e][j]
            latency.append(value)
            if value > c.slo_ms * (1 + TOLERANCE) or self.model.accuracy[e] < c.min_accuracy - TOLERANCE:
                feasible = False
        return feasible, served, busy, latency

    def plan(self, choices: Sequence[tuple[int, int] | None], method: str) -> "Plan":
        """The :class:`Plan` of ``(exit, batch index)`` choices, checked against the model."""
        feasible, served, busy, latency = self.check(choices)
        return Plan(
            classes=tuple(c.name for c in self.classes),
            choices=tuple(None if ch is None else Choice(ch[0], self.model.batch_sizes[ch[1]]) for ch in choices),
            exit_names=self.model.names,
            served_rate=served,
            offered_rate=sum(c.rate for c in self.classes),
            busy_ms_per_s=busy,
            capacity_ms_per_s=self.capacity_ms,
            latency_ms=tuple(latency),
            feasible=feasible,
            method=method,
        )


@dataclass(frozen=True)
class Plan:
    """An allocation: per class (in the problem's order) its :class:`Choice` or None (not served),
    and what the model says of it: the served rate (the objective), the processor's busy ms per
    second against the capacity, each served class's latency, and whether every constraint holds."""

    classes: tuple[str, ...]
    choices: tuple[Choice | None, ...]
    exit_names: tuple[str, ...]
    served_rate: float
    offered_rate: float
    busy_ms_per_s: float
    capacity_ms_per_s: float
    latency_ms: tuple[float | None, ...]
    feasible: bool
    method: str

    def choice(self, name: str) -> Choice | None:
        """Class ``name``'s exit and batch size, None when it is not served; KeyError names the classes."""
        try:
            return self.choices[self.classes.index(name)]
        except ValueError:
            raise KeyError(f"no class {name!r} in this plan; classes: {list(self.classes)}") from None

    def exit_for(self, name: str) -> str | None:
        """The name of the exit that answers class ``name`` (None: not served)."""
        choice = self.choice(name)
        return None if choice is None else self.exit_names[choice.exit]

    @property
    def served(self) -> tuple[str, ...]:
        return tuple(n for n, c in zip(self.classes, self.choices) if c is not None)

    @property
    def refused(self) -> tuple[str, ...]:
        return tuple(n for n, c in zip(self.classes, self.choices) if c is None)

    @property
    def utilisation(self) -> float:
        """The processor's busy share under this plan."""
        return self.busy_ms_per_s / 1000.0

    def describe(self) -> str:
        """One line per class: its exit, batch size and latency, or that it is not served."""
        lines = [f"served {self.served_rate:g}/{self.offered_rate:g} req/s, busy {self.busy_ms_per_s:.1f} of "
                 f"{self.capacity_ms_per_s:.0f} ms/s ({self.method})"]
        for name, choice, latency in zip(self.classes, self.choices, self.latency_ms):
            if choice is None:
                lines.append(f"  {name}: not served")
            else:
                lines.append(f"  {name}: exit {self.exit_names[choice.exit]}, batch {choice.batch}, "
                             f"{latency:.2f} ms")
        return "\n".join(lines)


def evaluate(problem: Problem, choices: Sequence[Choice | None], method: str = "given") -> Plan:
    """The :class:`Plan` of the given choices (exit index and batch size per class, None: not served),
    with its feasibility; a batch size the model was not profiled at is refused, naming the class."""
    if len(choices) != len(problem.classes):
        raise AllocationError(f"{len(choices)} choices for {len(problem.classes)} classes")
    indexed: list[tuple[int, int] | None] = []
    for c, choice in zip(problem.classes, choices):
        if choice is None:
            indexed.append(None)
            continue
        if choice.batch not in problem.model.batch_sizes:
            raise AllocationError(f"class {c.name!r}: batch {choice.batch} is not a profiled batch size "
                                  f"{list(problem.model.batch_sizes)}")
        if not 0 <= choice.exit < len(problem.model.names):
            raise AllocationError(f"class {c.name!r}: exit {choice.exit} is not one of the model's "
                                  f"{len(problem.model.names)} exits")
        indexed.append((choice.exit, problem.model.batch_sizes.index(choice.batch)))
    return problem.plan(indexed, method)


# ------------------------------------------------------------------------------------------------
# The heuristic
# ------------------------------------------------------------------------------------------------


class _State:
    """A partial plan under construction: each stream's rate, per-stage flows and busy time, and
    each class's batch index (None: not served). Admitting and relocating keep the plan feasible
    (:meth:`add_cost` checks the class's latency and the caller the room; a class leaves a stream
    only if :meth:`can_remove`); a swap's or absorb's trial is kept only if :func:`_feasible`."""

    __slots__ = ("p", "exit", "rate", "flow", "busy", "total", "where", "members")

    def __init__(self, p: Problem) -> None:
        J, K = len(p.model.batch_sizes), len(p.model.names)
        self.p = p
        self.exit = p.earliest_exit
        self.rate = [0.0] * J
        self.flow = [[0.0] * K for _ in range(J)]
        self.busy = [0.0] * J
        self.total = 0.0
        self.where: list[int | None] = [None] * len(p.classes)
        self.members: list[list[int]] = [[] for _ in range(J)]

    def copy(self) -> "_State":
        other = object.__new__(_State)
        other.p, other.exit = self.p, self.exit
        other.rate, other.busy, other.total = list(self.rate), list(self.busy), self.total
        other.flow = [list(f) for f in self.flow]
        other.where = list(self.where)
        other.members = [list(m) for m in self.members]
        return other

    def adopt(self, other: "_State") -> None:
        """Take ``other``'s plan (a trial that won)."""
        self.rate, self.flow, self.busy, self.total = other.rate, other.flow, other.busy, other.total
        self.where, self.members = other.where, other.members

    def served(self) -> float:
        return sum(c.rate for c, j in zip(self.p.classes, self.where) if j is not None)

    def _flow_with(self, j: int, i: int, sign: float) -> list[float]:
        flow = list(self.flow[j])
        lam = sign * self.p.classes[i].rate
        for k in range(self.exit[i] + 1):
            flow[k] += lam
        return flow

    def add_cost(self, i: int, j: int) -> float | None:
        """Busy ms/s that class ``i`` adds in stream ``j``, or None if its latency fails there: the
        change of :meth:`Problem.stream_busy_ms`, stage by stage (a deeper stage's batch count can
        grow too, through ``min(Lambda / b, F_k)``)."""
        p = self.p
        lam = p.rates[i]
        old_rate = self.rate[j]
        rate = old_rate + lam
        e = self.exit[i]
        b = p.model.batch_sizes[j]
        if b > 1 and 1000.0 * (b - 1) / rate + p.cum_ms[e][j] > p.slo_limit[i]:
            return None
        fixed, per_item = p.model.fixed_ms, p.model.per_item_ms
        old_batches, new_batches = old_rate / b, rate / b
        delta = 0.0
        for k, f in enumerate(self.flow[j]):
            if k <= e:
                nf = f + lam
                delta += per_item[k] * lam
            elif f <= 0:
                continue
            else:
                nf = f
            delta += fixed[k] * ((nf if nf < new_batches else new_batches) - (f if f < old_batches else old_batches))
        return delta

    def best_stream(self, i: int, room: float) -> tuple[float, int] | None:
        """The stream where class ``i`` adds least busy time within ``room`` ms/s, with that cost."""
        best = None
        limit = room + self.p.capacity_ms * TOLERANCE
        for j in self.p.streams[i]:
            cost = self.add_cost(i, j)
            if cost is not None and cost <= limit and (best is None or cost < best[0]):
                best = (cost, j)
        return best

    def add(self, i: int, j: int) -> None:
        c = self.p.classes[i]
        self.rate[j] += c.rate
        self.flow[j] = self._flow_with(j, i, 1.0)
        new = self.p.stream_busy_ms(j, self.rate[j], self.flow[j])
        self.total += new - self.busy[j]
        self.busy[j] = new
        self.where[i] = j
        self.members[j].append(i)

    def can_remove(self, i: int) -> bool:
        """Whether the other classes of ``i``'s stream keep their latency without it (a thinner
        stream fills more slowly)."""
        j = self.where[i]
        rate = self.rate[j] - self.p.classes[i].rate
        for m in self.members[j]:
            if m != i and self.p.fill_ms(j, rate) + self.p.cum_ms[self.exit[m]][j] > \
                    self.p.classes[m].slo_ms * (1 + TOLERANCE):
                return False
        return True

    def remove(self, i: int) -> None:
        j = self.where[i]
        c = self.p.classes[i]
        self.flow[j] = self._flow_with(j, i, -1.0)
        self.members[j].remove(i)
        if not self.members[j]:    # exact zeros, not rounding residue
            self.rate[j] = 0.0
            self.flow[j] = [0.0] * len(self.flow[j])
        else:
            self.rate[j] -= c.rate
        new = self.p.stream_busy_ms(j, self.rate[j], self.flow[j])
        self.total += new - self.busy[j]
        self.busy[j] = new
        self.where[i] = None

    def room(self) -> float:
        return self.p.capacity_ms - self.total


def _insert_all(state: _State, order: Sequence[int]) -> bool:
    """Admit each unserved class of ``order`` where it fits; True if any was admitted."""
    changed = False
    for i in order:
        if state.where[i] is None:
            best = state.best_stream(i, state.room())
            if best is not None:
                state.add(i, best[1])
                changed = True
    return changed


def _relocate(state: _State) -> bool:
    """Move served classes to the stream that lowers the total busy time most; True if any moved."""
    changed = False
    eps = state.p.capacity_ms * 1e-9
    for i in range(len(state.where)):
        j = state.where[i]
        if j is None or not state.can_remove(i):
            continue
        before = state.total
        state.remove(i)
        best = state.best_stream(i, state.room())
        # best_stream cannot fail: the old stream is one of the options and still has the room
        if best is None or state.total + best[0] >= before - eps:
            state.add(i, j)
            continue
        state.add(i, best[1])
        changed = True
    return changed


def _feasible(state: _State) -> bool:
    """The model's own check of a state's plan (a swap may leave a thinned stream too slow to fill)."""
    p = state.p
    return p.check([None if j is None else (state.exit[i], j) for i, j in enumerate(state.where)])[0]


def _swap_in(state: _State, by_rate: Sequence[int]) -> bool:
    """For an unserved class, drop one served class, or two, of smaller rate together if that lets it
    in (then refill); True if the served rate grew."""
    served = state.served()
    rates = state.p.rates
    for i in by_rate:
        if state.where[i] is not None:
            continue
        smaller = [m for m in reversed(by_rate) if state.where[m] is not None and rates[m] < rates[i]]
        drops = [(m,) for m in smaller]
        drops += [(m, q) for a, m in enumerate(smaller) for q in smaller[a + 1:] if rates[m] + rates[q] < rates[i]]
        for drop in drops:
            trial = state.copy()
            for m in drop:
                trial.remove(m)
            best = trial.best_stream(i, trial.room())
            if best is None:
                continue
            trial.add(i, best[1])
            _insert_all(trial, by_rate)
            if trial.served() > served * (1 + 1e-12) and _feasible(trial):
                state.adopt(trial)
                return True
    return False


def _absorb(state: _State, by_rate: Sequence[int]) -> bool:
    """For an unserved class, or two, re-fit the served classes with them from the top down (each at
    its largest consistent batch, dropping classes until the plan fits): classes that only fit by
    sharing a stream, with one already served or with each other, get in that way. True if the
    served rate grew."""
    served = state.served()
    members = [i for i in range(len(state.where)) if state.where[i] is not None]
    unserved = [i for i in by_rate if state.where[i] is None]
    newcomers = [(i,) for i in unserved] + [(i, m) for a, i in enumerate(unserved) for m in unserved[a + 1:]]
    for new in newcomers:
        trial = _top_down(state.p, [*members, *new])
        _insert_all(trial, by_rate)
        if trial.served() > served * (1 + 1e-12) and _feasible(trial):
            state.adopt(trial)
            return True
    return False


def _largest_consistent(p: Problem, members: Sequence[int]) -> list[int | None]:
    """Batch indexes for ``members``, all served: each at the largest batch size whose latency holds
    at the rate its stream ends up with. Start every class at the largest size its stages alone allow;
    then, from the largest size down, move the classes whose fill wait fails to their next smaller
    size (repeating at a size until the ones left hold: a thinner stream fills more slowly), so a
    stream is judged only once every class that will come down into it has; last, move classes up
    where a bigger stream now carries them, until nothing moves."""
    sizes, cum, first, limit, rates, streams = (p.model.batch_sizes, p.cum_ms, p.earliest_exit, p.slo_limit,
                                                p.rates, p.streams)
    J = len(sizes)
    where: list[int | None] = [None] * len(p.classes)
    for i in members:
        where[i] = streams[i][-1]          # streams[i] is in increasing batch size
    for j in range(J - 1, 0, -1):          # batch index 0 may be batch 1: no fill wait to fail
        b = sizes[j]
        if b == 1:
            break
        while True:
            here = [i for i in members if where[i] == j]
            if not here:
                break
            rate = sum(rates[i] for i in here)
            moved = False
            for i in here:
                if 1000.0 * (b - 1) / rate + cum[first[i]][j] > limit[i]:
                    at = streams[i].index(j)
                    if at > 0:
                        where[i] = streams[i][at - 1]
                        moved = True
            if not moved:
                break
    rate = [0.0] * J
    for i in members:
        rate[where[i]] += rates[i]
    for _ in range(len(p.classes) * J + 1):
        moved = False
        for i in members:
            j = where[i]
            for k in reversed(streams[i]):
                if k <= j:
                    break
                if 1000.0 * (sizes[k] - 1) / (rate[k] + rates[i]) + cum[first[i]][k] <= limit[i] and all(
                        1000.0 * (sizes[j] - 1) / (rate[j] - rates[i]) + cum[first[m]][j] <= limit[m]
                        for m in members if where[m] == j and m != i):
                    rate[j] -= rates[i]
                    rate[k] += rates[i]
                    where[i] = k
                    moved = True
                    break
        if not moved:
            break
    return where


def _fit(p: Problem, members: Sequence[int]) -> tuple[tuple[int, ...], list[int | None], bool, float, float]:
    """The members at their largest consistent batches (:func:`_largest_consistent`): ``(members
    sorted, batch indexes, whether every latency and the capacity hold, busy ms/s, served rate)``.
    Remembered per member set (the top-down start and the absorb move re-fit many overlapping sets)."""
    key = tuple(sorted(members))
    cached = p._fits.get(key)
    if cached is None:
        where = _largest_consistent(p, key)
        J, K = len(p.model.batch_sizes), len(p.model.names)
        rate = [0.0] * J
        flow = [[0.0] * K for _ in range(J)]
        for i in key:
            j, lam = where[i], p.rates[i]
            rate[j] += lam
            row = flow[j]
            for k in range(p.earliest_exit[i] + 1):
                row[k] += lam
        busy = sum(p.stream_busy_ms(j, rate[j], flow[j]) for j in range(J) if rate[j] > 0)
        ok = busy <= p.capacity_ms * (1 + TOLERANCE) and all(
            p.fill_ms(where[i], rate[where[i]]) + p.cum_ms[p.earliest_exit[i]][where[i]] <= p.slo_limit[i]
            for i in key)
        if len(p._fits) > 4096:
            p._fits.clear()
        cached = p._fits[key] = (key, where, ok, busy, sum(p.rates[i] for i in key))
    return cached


def _state_of(p: Problem, fit: tuple) -> _State:
    """A :func:`_fit` as a state to improve."""
    key, where = fit[0], fit[1]
    state = _State(p)
    for i in key:
        state.add(i, where[i])
    return state


def _top_down(p: Problem, members: Sequence[int] | None = None) -> "_State":
    """Serve every class (of ``members``) at its largest consistent batch; while that does not fit,
    drop one class: the one whose absence leaves a plan that fits with the largest served rate, or
    failing that, the one whose absence frees the most busy time per request/s lost (each candidate
    set re-fitted)."""
    members = list(range(len(p.classes))) if members is None else list(members)
    fit = _fit(p, members)
    while members and not fit[2]:
        fits, best_ratio, drop = None, -math.inf, None
        for i in members:
            rest = [m for m in members if m != i]
            trial = _fit(p, rest)
            if trial[2]:
                if fits is None or (trial[4], -trial[3]) > (fits[4], -fits[3]):
                    fits = trial
            elif fits is None:
                ratio = (fit[3] - trial[3]) / p.rates[i]
                if ratio > best_ratio:
                    best_ratio, drop = ratio, (trial, rest)
        if fits is not None:
            return _state_of(p, fits)
        fit, members = drop
    return _state_of(p, fit) if fit[2] else _State(p)


def _served_bound(p: Problem) -> float:
    """An upper bound on the served rate: a stream's busy time is at least ``sum_k (fixed_k / b +
    per_item_k) F_bk`` (a batch holds at most ``b`` items), so a class costs at least its cheapest
    such per-request price; filling the capacity with the cheapest classes, the last one
    fractionally (the knapsack's fractional relaxation), serves no less than any plan."""
    model = p.model
    price = []
    for i in range(len(p.classes)):
        e = p.earliest_exit[i]
        cheapest = min(sum(model.fixed_ms[k] / model.batch_sizes[j] + model.per_item_ms[k] for k in range(e + 1))
                       for j in p.streams[i])
        price.append((cheapest, p.rates[i]))
    room, served = p.capacity_ms, 0.0
    for cost, rate in sorted(price):
        if cost * rate <= room:
            room -= cost * rate
            served += rate
        else:
            served += room / cost if cost > 0 else rate
            break
    return served


def _orders(p: Problem) -> list[list[int]]:
    """Admission orders tried: cheapest per request alone, largest rate (the tightest SLO first added
    nothing on the bench's instances)."""
    n = len(p.classes)
    alone = []
    for i in range(n):
        empty = _State(p)
        costs = [cost for e, j in p.options[i] if e == p.earliest_exit[i]
                 for cost in [empty.add_cost(i, j)] if cost is not None]
        alone.append(min(costs) / p.classes[i].rate if costs else math.inf)
    by_cost = sorted(range(n), key=lambda i: (alone[i], -p.classes[i].rate))
    by_rate = sorted(range(n), key=lambda i: (-p.classes[i].rate, alone[i]))
    orders = []
    for order in (by_cost, by_rate):
        if order not in orders:
            orders.append(order)
    return orders


def _improve(state: _State, by_rate: Sequence[int], absorb: bool) -> None:
    """Local search until no move helps: relocate, admit, swap (and absorb, when asked)."""
    for _ in range(2 * len(state.where) + 2):     # each round improves or stops; a bound for safety
        moved = _relocate(state)
        added = _insert_all(state, by_rate)
        swapped = _swap_in(state, by_rate) or (absorb and _absorb(state, by_rate))
        if not (moved or added or swapped):
            break


def _warm_state(problem: Problem, previous: "Plan") -> _State | None:
    """``previous``'s choices for the classes that are still here (by name, where their exit and batch
    are still what the heuristic would use), as a state, or None if that plan no longer fits."""
    state = _State(problem)
    sizes = problem.model.batch_sizes
    for i, c in enumerate(problem.classes):
        if c.name not in previous.classes:
            continue
        choice = previous.choices[previous.classes.index(c.name)]
        if choice is None or choice.exit != problem.earliest_exit[i] or choice.batch not in sizes:
            continue
        j = sizes.index(choice.batch)
        if j in problem.streams[i]:
            state.add(i, j)
    return state if _feasible(state) else None


def plan_allocation(classes: Sequence[UserClass] | Problem, model: ExitModel | None = None,
                    utilisation: float = DEFAULT_UTILISATION, previous: "Plan | None" = None) -> Plan:
    """The heuristic plan (see the module docstring): earliest accurate exit per class, a top-down
    start and greedy admission in two orders, each improved by local search, the best of them then
    polished with the costlier absorb move; always feasible.

    Pass the classes and the model (a :class:`Problem` is built and checked: an impossible class
    raises :class:`AllocationError` naming it), or a :class:`Problem` already built.

    ``previous``: the plan of the last call, for a quick update when the classes changed a little
    (a rate estimate moved, a class came or went): local search from that plan, where it still fits,
    instead of the three starts and the absorb polish; the plan it returns is as feasible, and may
    stay further from the optimum than a cold start's (rerun without ``previous`` now and then)."""
    problem = classes if isinstance(classes, Problem) else Problem(classes, model, utilisation)
    by_rate = sorted(range(len(problem.classes)), key=lambda i: -problem.classes[i].rate)
    if previous is not None:
        warm = _warm_state(problem, previous)
        if warm is not None:
            _improve(warm, by_rate, absorb=False)
            choices = [None if j is None else (warm.exit[i], j) for i, j in enumerate(warm.where)]
            return problem.plan(choices, "heuristic (warm)")
    bound = _served_bound(problem)
    best: _State | None = None
    for order in [None, *_orders(problem)]:
        if order is None:
            state = _top_down(problem)
        else:
            state = _State(problem)
            _insert_all(state, order)
        _improve(state, by_rate, absorb=False)
        if best is None or (state.served(), -state.total) > (best.served(), -best.total):
            best = state
        if best.served() >= bound * (1 - 1e-9):      # nothing can serve more
            break
    if best.served() < bound * (1 - 1e-9):
        _improve(best, by_rate, absorb=True)
    choices = [None if j is None else (best.exit[i], j) for i, j in enumerate(best.where)]
    return problem.plan(choices, "heuristic")
