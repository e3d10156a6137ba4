"""Survivors re-batched: a multi-exit model's later stages as lanes of their own (``exit_rebatch =
true`` in a model's config).

Without it a batch runs every stage its items need on one worker, its survivors alone: a batch of 8
of which 6 leave at exit 1 runs stage 2 on 2 items, and the batch beside it on 3. With it, a batch
runs its first stage and hands its survivors on (``Driver.hand_on``) to the lane ``<model>#2``,
whose requests are the survivors of every batch, with their features; that lane's batches run stage
2 and hand theirs on to ``<model>#3``, and so on to the last exit. The scheduler batches each lane as
it batches a model (the deadline-aware rule over that stage's latency table, measured at load, and
the survivors' own deadlines), so survivors of several batches run their next stage together where
the slots are busy (it pays: the stage's fixed cost is paid once) and at once where a slot is free
(waiting would not pay). The worker is also free between stages: the next batch's first stage, or a
more urgent lane, runs before this batch's rest (EDF over the lanes).

What the lanes keep of the model: its instances (each lane's instance ``i`` runs the same stage
session ``i`` of the model), its queue capacity and batching rule, no admission (a request was
admitted once, priced by the stages up to its exit, at intake); shedding stays, so a survivor that
can no longer finish in time is answered ``deadline_missed`` from the queue. Replies name the exit
that answered (``served_by.exit``); a reply's ``queue_ms`` counts from the request's arrival to the
start of the batch that answered it, ``compute_ms`` that batch's stage.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from agent.core import LatencyTable
from agent.runtime.local_executor import InstanceSet
from agent.scheduler.rules import build_lane, build_rule

__all__ = ["survivor_lane_name", "survivor_lanes", "stage_lane", "first_stage_instances"]


def survivor_lane_name(model: str, stage: int) -> str:
    """The lane of ``model``'s stage ``stage`` (0-based: stage 1 is the model's own lane)."""
    return f"{model}#{stage + 1}"


def first_stage_instances(name: str, loaded: Any) -> InstanceSet:
    """The model's own lane's instances with ``exit_rebatch``: the first stage, survivors handed on."""
    return InstanceSet(loaded.backends, loaded.card.inputs, loaded.rule.max_batch,
                       [[stages[0]] for stages in loaded.stages], loaded.exits, loaded.card.exits,
                       first=0, hand_on_lane=survivor_lane_name(name, 1))


def stage_lane(config: Any, stage: int, table: LatencyTable) -> Any:
    """The scheduler lane of stage ``stage`` of the model configured by ``config`` (an
    ``agent.config.ModelConfig``), timed by ``table``: the model's rule and queue, no admission (a
    request was admitted once, at intake). The agent and the simulator build it alike."""
    name = survivor_lane_name(config.name, stage)
    batching = dataclasses.replace(config.batching, admission=False)
    return build_lane(name, build_rule(batching, table), dataclasses.replace(config, name=name, batching=batching),
                      table)


def survivor_lanes(name: str, loaded: Any) -> list[tuple[str, Any, InstanceSet]]:
    """``(lane name, scheduler lane, instances)`` per later stage of ``loaded`` (an
    ``agent.api.LoadedModel`` with its stages and exit plan, measured at load)."""
    exits, card = loaded.exits, loaded.card
    if exits is None or exits.stage_ms is None:
        raise ValueError(f"model {name!r}: exit_rebatch needs a stage-by-stage model with its stage times")
    out = []
    last = len(card.exits) - 1
    for k in range(1, last + 1):
        lane = stage_lane(loaded.config, k,
                          LatencyTable(list(exits.batch_sizes), [ms / 1000.0 for ms in exits.stage_ms[k]]))
        instances = InstanceSet([stages[k] for stages in loaded.stages], [card.exits[k].stage_input],
                                lane.rule.max_batch, [[stages[k]] for stages in loaded.stages], exits, card.exits,
                                first=k, hand_on_lane=survivor_lane_name(name, k + 1) if k < last else None)
        out.append((lane.name, lane, instances))
    return out
