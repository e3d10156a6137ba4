"""Seeded workload generators: arrival processes that produce v1 traces (``list[TraceRow]``).

Why these three: a steady Poisson stream is the textbook baseline; an on/off Markov-modulated
Poisson process (MMPP) gives the bursts under which batching and admission decisions actually
matter (counts per window are over-dispersed, unlike Poisson); a sinusoidal day/night ramp makes the
load drift slowly, which tests whether a policy adapts rather than being tuned to one rate.

Every generator takes ``rate_per_s`` as the **long-run mean** arrival rate, so two kinds at the
same ``rate_per_s`` offer the same total load and differ only in its shape; the kind-specific
parameters say how that mean is spread over time.

Which application an arrival belongs to is drawn independently per arrival from the ``AppSpec``
list by ``share``: SLO classes ("tight", "loose") and several models are just several specs.
The same seed gives the identical trace (numpy's PCG64 via ``default_rng``); arrival times are
rounded to the microsecond that ``write_trace`` keeps, so a written trace reads back equal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from agent.workload.trace import TraceRow


class WorkloadError(ValueError):
    """A bad generator parameter; the message names the parameter, its value and what was expected."""


def _check_number(name: str, value: Any, check: Callable[[float], bool], expected: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or not check(value):
        raise WorkloadError(f"{name} = {value!r}: expected {expected}")


@dataclass(frozen=True, slots=True)
class AppSpec:
    """One application (and so one SLO class of one model) of a generated workload.

    ``share`` is a relative weight (shares need not sum to 1; they are normalised), so a spec list
    reads as "30 % of arrivals are mobilenet with a 10 ms SLO".
    """
    app: str
    model: str
    slo_ms: float
    share: float
    priority: int = 0
    min_accuracy: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.app, str) or not self.app or "," in self.app:
            raise WorkloadError(f"AppSpec.app = {self.app!r}: expected a non-empty name without commas")
        if not isinstance(self.model, str) or not self.model or "," in self.model:
            raise WorkloadError(f"AppSpec({self.app}).model = {self.model!r}: expected a non-empty name without commas")
        _check_number(f"AppSpec({self.app}).slo_ms", self.slo_ms, lambda v: v > 0, "milliseconds > 0")
        _check_number(f"AppSpec({self.app}).share", self.share, lambda v: v > 0, "a weight > 0")
        if isinstance(self.priority, bool) or not isinstance(self.priority, (int, np.integer)):
            raise WorkloadError(f"AppSpec({self.app}).priority = {self.priority!r}: expected an integer")
        if self.min_accuracy is not None:
            _check_number(f"AppSpec({self.app}).min_accuracy", self.min_accuracy, lambda v: 0 <= v <= 1,
                          "a number in 0..1 or None")


# The shipped demo models, a tight and a loose SLO class each. resnet_digits costs several times
# mobilenet's compute, hence its looser SLOs. All priority 0, so an SLO class differs from the other
# only by its deadline (EDF orders them) and comparisons are not confounded by priorities.
DEMO_APPS: tuple[AppSpec, ...] = (
    AppSpec("mobilenet_tight", "mobilenet_digits", slo_ms=10.0, share=0.3),
    AppSpec("mobilenet_loose", "mobilenet_digits", slo_ms=50.0, share=0.3),
    AppSpec("resnet_tight", "resnet_digits", slo_ms=30.0, share=0.2),
    AppSpec("resnet_loose", "resnet_digits", slo_ms=150.0, share=0.2),
)


def poisson(rate_per_s: float, duration_s: float, apps: Sequence[AppSpec], seed: int) -> list[TraceRow]:
    """Homogeneous Poisson arrivals at ``rate_per_s`` over ``[0, duration_s)``.

    Drawn as N ~ Poisson(rate x duration) arrivals placed uniformly at random (the conditional
    law of a Poisson process given its count), which is exact and vectorised.
    """
    _check_common("poisson", rate_per_s, duration_s, apps, seed)
    rng = np.random.default_rng(seed)
    times = _uniform_arrivals(rng, rate_per_s, 0.0, duration_s)
    return _rows(rng, np.sort(times), apps)


def bursty(rate_per_s: float, duration_s: float, apps: Sequence[AppSpec], seed: int, *,
           burst_factor: float = 10.0, mean_on_s: float = 1.0, mean_off_s: float = 4.0) -> list[TraceRow]:
    """Bursty arrivals: a two-state (on/off) Markov-modulated Poisson process with mean rate ``rate_per_s``.

    The process alternates between an *on* (burst) state and an *off* state; each sojourn is
    exponential with mean ``mean_on_s`` / ``mean_off_s``, and within a state arrivals are Poisson
    at ``high`` / ``low`` per second, where ``high = burst_factor x low``. With the fraction of time
    on ``p = mean_on_s / (mean_on_s + mean_off_s)``, ``low = rate_per_s / (p x burst_factor + 1 - p)``,
    so the long-run mean rate is exactly ``rate_per_s`` (the same offered load as ``poisson``).
    Defaults (10x, 1 s on, 4 s off): low = rate/2.8, high = 3.57 x rate, bursts of about a
    second every five. ``burst_factor = 1`` is plain Poisson. The initial state is drawn from the
    stationary law (on with probability p), so the trace has no start-up transient.

    Use :func:`mmpp_rates` to see the high and low rates a parameter set gives.
    """
    _check_common("bursty", rate_per_s, duration_s, apps, seed)
    high, low = mmpp_rates(rate_per_s, burst_factor=burst_factor, mean_on_s=mean_on_s, mean_off_s=mean_off_s)
    rng = np.random.default_rng(seed)
    p_on = mean_on_s / (mean_on_s + mean_off_s)
    on = bool(rng.random() < p_on)
    chunks: list[np.ndarray] = []
    t = 0.0
    while t < duration_s:
        sojourn = rng.exponential(mean_on_s if on else mean_off_s)
        end = min(t + sojourn, duration_s)
        chunks.append(_uniform_arrivals(rng, high if on else low, t, end))
        t, on = end, not on
    times = np.sort(np.concatenate(chunks)) if chunks else np.empty(0)
    return _rows(rng, times, apps)


def mmpp_rates(rate_per_s: float, *, burst_factor: float = 10.0, mean_on_s: float = 1.0,
               mean_off_s: float = 4.0) -> tuple[float, float]:
    """The (high, low) per-second rates of :func:`bursty` for a mean rate and its shape parameters."""
    _check_number("bursty: rate_per_s", rate_per_s, lambda v: v > 0, "arrivals per second > 0")
    _check_number("bursty: burst_factor", burst_factor, lambda v: v >= 1, "a ratio high/low rate >= 1")
    _check_number("bursty: mean_on_s", mean_on_s, lambda v: v > 0, "seconds > 0")
    _check_number("bursty: mean_off_s", mean_off_s, lambda v: v > 0, "seconds > 0")
    p_on = mean_on_s / (mean_on_s + mean_off_s)
    low = rate_per_s / (p_on * burst_factor + 1.0 - p_on)
    return burst_factor * low, low


def diurnal(rate_per_s: float, duration_s: float, apps: Sequence[AppSpec], seed: int, *,
            peak_to_trough: float = 4.0, period_s: float | None = None) -> list[TraceRow]:
    """Slowly varying load: a sinusoidal rate between a trough and a peak (a compressed day).

    ``rate(t) = low + (high - low) x (1 - cos(2 pi t / period_s)) / 2``: the trough ``low`` at t = 0
    (and every period), the peak ``high`` at half a period. ``high = peak_to_trough x low`` and
    ``(low + high) / 2 = rate_per_s``, so over whole periods the mean rate is ``rate_per_s``.
    ``period_s`` defaults to ``duration_s`` (one "day" per trace: trough, peak at the middle,
    trough). Generated by thinning (Lewis-Shedler): Poisson candidates at ``high``, each kept with
    probability ``rate(t) / high``, which is exact for a non-homogeneous Poisson process.
    """
    _check_common("diurnal", rate_per_s, duration_s, apps, seed)
    _check_number("diurnal: peak_to_trough", peak_to_trough, lambda v: v >= 1, "a ratio peak/trough rate >= 1")
    if period_s is None:
        period_s = duration_s
    _check_number("diurnal: period_s", period_s, lambda v: v > 0, "seconds > 0")
    low = 2.0 * rate_per_s / (1.0 + peak_to_trough)
    high = peak_to_trough * low
    rng = np.random.default_rng(seed)
    candidates = np.sort(_uniform_arrivals(rng, high, 0.0, duration_s))
    rate = low + (high - low) * 0.5 * (1.0 - np.cos(2.0 * math.pi * candidates / period_s))
    keep = rng.random(candidates.size) * high < rate
    return _rows(rng, candidates[keep], apps)


# kind -> (generator, the keyword parameters it takes beyond the common ones)
KINDS: dict[str, tuple[Callable[..., list[TraceRow]], tuple[str, ...]]] = {
    "poisson": (poisson, ()),
    "bursty": (bursty, ("burst_factor", "mean_on_s", "mean_off_s")),
    "diurnal": (diurnal, ("peak_to_trough", "period_s")),
}


def generate(kind: str, *, rate_per_s: float, duration_s: float, apps: Sequence[AppSpec], seed: int,
             **params: Any) -> list[TraceRow]:
    """Generate a trace of ``kind`` (``poisson``, ``bursty``, ``diurnal``): one entry point for the CLI,
    the simulator and benchmark scripts, which name the kind and its parameters in a config."""
    if kind not in KINDS:
        raise WorkloadError(f"kind = {kind!r}: expected one of {', '.join(KINDS)}")
    generator, accepted = KINDS[kind]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise WorkloadError(f"{kind}: unknown parameter(s) {', '.join(unknown)}: "
                            f"expected {', '.join(accepted) if accepted else 'none beyond rate_per_s, duration_s, apps, seed'}")
    return generator(rate_per_s, duration_s, apps, seed, **params)


def _check_common(kind: str, rate_per_s: float, duration_s: float, apps: Sequence[AppSpec], seed: int) -> None:
    _check_number(f"{kind}: rate_per_s", rate_per_s, lambda v: v > 0, "arrivals per second > 0")
    _check_number(f"{kind}: duration_s", duration_s, lambda v: v > 0, "seconds > 0")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise WorkloadError(f"{kind}: seed = {seed!r}: expected an integer >= 0")
    if isinstance(apps, (str, bytes)) or not isinstance(apps, Sequence) or not apps \
            or not all(isinstance(a, AppSpec) for a in apps):
        raise WorkloadError(f"{kind}: apps = {apps!r}: expected a non-empty list of AppSpec")
    names = [a.app for a in apps]
    if len(set(names)) != len(names):
        raise WorkloadError(f"{kind}: apps: app names {names} repeat: expected each app once")


def _uniform_arrivals(rng: np.random.Generator, rate_per_s: float, start_s: float, end_s: float) -> np.ndarray:
    """Poisson arrivals on [start_s, end_s), unsorted: a Poisson count placed uniformly."""
    count = rng.poisson(rate_per_s * (end_s - start_s))
    return start_s + (end_s - start_s) * rng.random(count)


def _rows(rng: np.random.Generator, times: np.ndarray, apps: Sequence[AppSpec]) -> list[TraceRow]:
    """Attach an app (by share) to each sorted arrival time; times are rounded to the microsecond
    that write_trace keeps so a written trace reads back identical."""
    shares = np.array([a.share for a in apps], dtype=float)
    picks = rng.choice(len(apps), size=times.size, p=shares / shares.sum())
    rows = [TraceRow(float(f"{t:.6f}"), apps[i].app, apps[i].model, float(apps[i].slo_ms), int(apps[i].priority),
                     apps[i].min_accuracy)
            for t, i in zip(times.tolist(), picks.tolist())]
    rows.sort(key=lambda r: r.t_s)        # rounding can only tie neighbours, never reorder; stable anyway
    return rows
