"""The contenders ``edge-agent bench run`` compares: each a scheduling system (ours or a baseline's)
written as a rewrite of the agent's config.

A contender replaces every model's ``[models.batching]`` section (and, where the contender says, its
instances and the agent's workers), so each runs through the ordinary config path: the live agent
and the simulator build it exactly as they would from a TOML file. Everything else in the config
(models, cards, backends, queue sizes, SLO defaults) is kept, so the comparison changes one thing.

The baselines follow the papers (PAPERS.md §3 DeepRT, §6 Clipper / Triton as read in code); where we
differ from the original, the rule's docstring says so (``agent.scheduler.baselines``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping

from agent.config import BatchingConfig, Config, ModelConfig


@dataclass(frozen=True)
class ContenderSpec:
    """A named contender: what it is and where it comes from (one line), and how it rewrites a model."""

    name: str
    description: str
    # (model config, its smallest SLO in ms or None) -> the model config under this contender
    apply_model: Callable[[ModelConfig, "float | None"], ModelConfig]
    workers: int | None = None         # the agent's execution slots under this contender; None = keep
    # The agent's batch cap by the tightest SLO (``Config.hold_fraction``, ours): off for the baselines,
    # which follow their papers (deeprt uses admission control, which the cap would otherwise reach).
    hold_fraction: float | None = 0.0  # None = keep the config's
    # Admission's lookahead at tighter arrivals (``Config.admission_lookahead``, ours): off likewise.
    admission_lookahead: bool | None = False   # None = keep the config's
    # The EDF horizon (``Config.edf_horizon_ms``, ours): 0 (plain EDF, or the contender's own order) likewise.
    edf_horizon_ms: float | None = 0.0  # None = keep the config's
    # The dispatch policy (``[agent] policy``); None = keep the config's. ``learned`` takes its
    # directory from the config's ``policy_path``, else :data:`DEFAULT_POLICY_PATH`.
    policy: str | None = None


#: The learned contender's policy when the config names none: the one shipped for this machine's class.
DEFAULT_POLICY_PATH = Path(__file__).resolve().parents[3] / "policies" / "cpu-2core"


def _batching(model: ModelConfig, rule: str, *, shed: bool = False, admission: bool = False, **fields) -> BatchingConfig:
    """``model``'s batching replaced by ``rule``; max_batch and margin_ms are kept unless given."""
    base = model.batching
    return BatchingConfig(rule=rule, max_batch=fields.pop("max_batch", base.max_batch),
                          margin_ms=fields.pop("margin_ms", base.margin_ms),
                          shed_hopeless=shed, admission=admission, **fields)


def _fifo(model: ModelConfig, slo_ms: float | None) -> ModelConfig:
    return replace(model, instances=1, batching=_batching(model, "fifo"))


def _fixed(model: ModelConfig, slo_ms: float | None) -> ModelConfig:
    return replace(model, batching=_batching(model, "fixed", size=4, max_batch=max(4, model.batching.max_batch)))


def _triton(model: ModelConfig, slo_ms: float | None) -> ModelConfig:
    max_batch = model.batching.max_batch
    return replace(model, batching=_batching(model, "dynamic", preferred_sizes=(max_batch,), max_queue_delay_ms=2.0))


def _clipper(model: ModelConfig, slo_ms: float | None) -> ModelConfig:
    return replace(model, batching=_batching(model, "aimd"))


def _deeprt(model: ModelConfig, slo_ms: float | None) -> ModelConfig:
    if slo_ms is None:
        raise ValueError(f"contender 'deeprt': no SLO for model {model.name!r}; pass slo_ms_by_model "
                         f"(its smallest SLO in ms, e.g. edge_lab.bench.run.slo_floor_by_model(trace))")
    if not slo_ms > 0:
        raise ValueError(f"contender 'deeprt': slo_ms_by_model[{model.name!r}] = {slo_ms!r}: expected a number > 0")
    return replace(model, batching=_batching(model, "disbatcher", window_ms=0.5 * float(slo_ms), admission=True))


def _edge(model: ModelConfig, slo_ms: float | None) -> ModelConfig:
    base = model.batching
    max_wait_ms = base.max_wait_ms if base.rule == "deadline_aware" else 0.0
    return replace(model, batching=_batching(model, "deadline_aware", max_wait_ms=max_wait_ms, shed=True, admission=True))


CONTENDERS: dict[str, ContenderSpec] = {spec.name: spec for spec in (
    ContenderSpec("fifo", "one request at a time in arrival order, one instance, one worker: the plain loop a user "
                          "writes (DeepRT's SEDF without EDF or admission)", _fifo, workers=1),
    ContenderSpec("fixed", "fixed batches of 4, no shedding or admission: Triton's plain batching, DeepRT's BATCH "
                           "baseline (PAPERS.md §3)", _fixed),
    ContenderSpec("triton", "Triton's dynamic batcher: preferred size max_batch or a 2 ms queue delay, no shedding or "
                            "admission; DeepRT's BATCH-Delay baseline (PAPERS.md §3, §6)", _triton),
    ContenderSpec("clipper", "Clipper's AIMD batch size (NSDI'17, as DeepRT describes it; not the repo's final "
                             "explore-and-fit code), no shedding or admission (PAPERS.md §3, §6)", _clipper),
    ContenderSpec("deeprt", "DeepRT's DisBatcher: jobs at window joints, window = half the model's smallest SLO, EDF "
                            "across models, with our admission control in place of its EDF imitator (PAPERS.md §3)",
                  _deeprt),
    ContenderSpec("edge", "ours, the default: deadline-aware batching from the profiled latency table, batches capped "
                          "by the tightest SLO, shedding and admission control (README, agent.scheduler)", _edge,
                  hold_fraction=None, admission_lookahead=None, edf_horizon_ms=None),
    ContenderSpec("learned", "ours: the edge lanes (deadline-aware rule, shedding, admission but on the lanes the "
                             "policy was trained without it: its card's training.admission_off, or every lane for "
                             "training.lanes = 'shed'), each dispatch decided by "
                             "the distilled network of [agent] policy_path (default policies/cpu-2core; "
                             "agent.scheduler.policies.learned)", _edge,
                  hold_fraction=None, admission_lookahead=None, edf_horizon_ms=None, policy="learned"),
)}


def _admission_off(policy_path: str, models) -> set[str]:
    """The lanes a learned policy was trained without admission on: its card's
    ``training.admission_off`` (model names), else every lane if ``training.lanes`` is ``shed``,
    else none (``tools/train_policy.py``, ``LANES``)."""
    import json
    try:
        training = json.loads((Path(policy_path) / "card.json").read_text()).get("training", {})
    except (OSError, ValueError):
        return set()            # the agent refuses the policy at load, naming why
    if "admission_off" in training:
        return {str(name) for name in training["admission_off"]}
    return {m.name for m in models} if training.get("lanes", "edge") == "shed" else set()


def apply_contender(config: Config, contender: str, *, slo_ms_by_model: Mapping[str, float] | None = None) -> Config:
    """A copy of ``config`` with every model's batching (and instances / workers / the batch cap where
    the contender says) replaced by ``contender``'s. ``slo_ms_by_model`` (model -> its smallest SLO in ms) is needed by
    ``deeprt``, whose window is half of it; a ``ValueError`` names what is missing or unknown."""
    spec = CONTENDERS.get(contender)
    if spec is None:
        raise ValueError(f"contender = {contender!r}: expected one of {sorted(CONTENDERS)}")
    slos = slo_ms_by_model or {}
    models = tuple(spec.apply_model(model, slos.get(model.name)) for model in config.models)
    workers = config.workers if spec.workers is None else spec.workers
    hold = config.hold_fraction if spec.hold_fraction is None else spec.hold_fraction
    lookahead = config.admission_lookahead if spec.admission_lookahead is None else spec.admission_lookahead
    horizon = config.edf_horizon_ms if spec.edf_horizon_ms is None else spec.edf_horizon_ms
    policy = config.policy if spec.policy is None else spec.policy
    policy_path = config.policy_path
    if policy == "learned" and policy_path is None:
        policy_path = str(DEFAULT_POLICY_PATH)
    if spec.policy == "learned":
        # Trained with admission off on some lanes (tools/train_policy.py, LANES): run it on those lanes.
        off = _admission_off(policy_path, models)
        models = tuple(replace(m, batching=replace(m.batching, admission=False)) if m.name in off else m
                       for m in models)
    return replace(config, models=models, workers=workers, hold_fraction=hold, admission_lookahead=lookahead,
                   edf_horizon_ms=horizon, policy=policy, policy_path=policy_path)


__all__ = ["CONTENDERS", "ContenderSpec", "apply_contender"]
