"""The peer's tail lanes: a split point's tail loaded as a model of its own, ``<model>@<split>``.

A peer serving offload (``[offload] serve = true``) runs the tail of each split point of each
configured model (those ``[offload] splits`` names; default all the card has) in a scheduler lane of
its own, beside its local models: the tails are queued, admitted and batched by the same scheduler
as the peer's own requests, so a peer under load refuses (``rejected``, with admission's reason)
instead of answering late. A whole model sent to a peer (full offload) goes to the model's own lane.

A tail lane takes the model's config (instances, queue, batching rule and its SLO behaviour) with
the tail's one input (the split tensor, float32 ``[N, ...]``) in place of the model's inputs, and
its batch latency measured at start like any model's (a split point's profile could serve instead
once cards carry one per board).
"""
from __future__ import annotations

import dataclasses
import logging

from agent.backends import load_backend
from agent.models.card import CardError, ModelCard
from agent.offload.splits import chosen, lane_name
from agent.profiler.measure import measure_latency_table, zeros_batch
from agent.scheduler.rules import build_rule

log = logging.getLogger(__name__)


def tail_card(card: ModelCard, sp) -> ModelCard:
    """A card for the tail of ``sp``: its one input is the split tensor; the model's outputs."""
    return dataclasses.replace(card, name=lane_name(card.name, sp.name), inputs=(sp.spec,), split_points=(),
                               golden=None)


def load_tails(models: dict, splits) -> dict:
    """``{lane: LoadedModel}`` for the tails of ``models`` (``agent.api.LoadedModel`` by name) at
    the split points ``splits`` names (``None``: every one each card has)."""
    from agent.api import LoadedModel, _check_backend_matches_card
    out = {}
    try:
        for name, loaded in models.items():
            config = loaded.config
            if config.backend != "onnxruntime":
                log.warning("offload: model %s runs on %s: its tails are served only on onnxruntime", name,
                            config.backend)
                continue
            for sp in chosen(loaded.card, splits):
                try:
                    path = sp.verify_tail()
                except CardError as exc:
                    if splits is not None:      # named in the config: it must be there
                        raise
                    log.info("offload: %s: the tail after %s is not served (%s)", name, sp.name, exc)
                    continue
                card = tail_card(loaded.card, sp)
                lane = card.name
                backends = [load_backend("onnxruntime", path, threads=config.threads) for _ in range(config.instances)]
                try:
                    for backend in backends:
                        _check_backend_matches_card(card, backend, path)
                    max_batch = config.batching.max_batch if config.batching.rule != "fixed" else config.batching.size
                    latency = measure_latency_table(backends[0], card.inputs, max_batch)
                    for backend in backends[1:]:
                        backend.run(zeros_batch(card.inputs, max_batch))
                except Exception:
                    for backend in backends:
                        backend.close()
                    raise
                out[lane] = LoadedModel(dataclasses.replace(config, name=lane), card, backends, latency,
                                        build_rule(config.batching, latency))
                log.info("offload: serving the tail of %s after %s as lane %s", name, sp.name, lane)
    except Exception:
        for loaded in out.values():
            for backend in loaded.backends:
                backend.close()
        raise
    return out


__all__ = ["load_tails", "tail_card"]
