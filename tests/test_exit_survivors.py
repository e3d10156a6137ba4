"""Survivors re-batched (issue 24 item 3, ``exit_rebatch``: ``agent.exits.survivors``): a multi-exit
model's later stages are lanes of their own, where the survivors of several batches run together.

The agent runs the shipped ``camera_exits`` on its card's labelled test frames, in process.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from agent.api import Agent
from agent.config import CONFIG_VERSION, ConfigError, parse_config
from agent.errors import SHUTTING_DOWN, InferenceError
from agent.models.card import load_card
from agent.models.digits import camera_frames, load_test_set

SLO_MS = 20000      # loose: these tests are about who answers, not about time


@pytest.fixture(scope="module")
def frames():
    card = load_card("demo:camera_exits")
    dataset = card.raw["dataset"]
    images, _ = load_test_set(card.source.parent / dataset["test_file"])
    return camera_frames(images[:64], dataset["seed"], int(dataset["frame_size"]))


def config(mode: str = "fixed", rebatch: bool = True, batching: dict | None = None):
    return parse_config({
        "config_version": CONFIG_VERSION, "agent": {"device": "survivors", "workers": 2},
        "mqtt": {"enabled": False}, "http": {"enabled": False},
        "models": [{"name": "m", "card": "demo:camera_exits", "instances": 2, "exit_mode": mode,
                    "exit_rebatch": rebatch, "batching": batching or {"rule": "deadline_aware", "max_batch": 8}}]})


def submit(agent, frames, targets):
    futures = [agent.submit("m", {"frames": frames[i:i + 1]}, slo_ms=SLO_MS, min_accuracy=t)
               for i, t in enumerate(targets)]
    return [f.result(timeout=60) for f in futures]


def test_survivors_of_several_batches_run_their_next_stage_together(frames):
    """One request in eight needs exit 2, the rest leave at exit 1: any eight consecutive requests
    (a first-stage batch) hold at most one survivor, so a second stage run on two or more survivors
    joined survivors of different batches. The lanes batch as the model's config says: here Triton's
    dynamic batcher, which holds a batch up to 50 ms for more (on this CPU the deadline-aware rule
    holds only where the stage's table says batching pays, which it hardly does, so whether two
    survivors meet there is a matter of timing)."""
    targets = [0.9 if i % 8 == 3 else 0.8 for i in range(64)]
    with Agent(config(batching={"rule": "dynamic", "max_batch": 8, "max_queue_delay_ms": 50})) as agent:
        assert sorted(agent.scheduler.lanes) == ["m", "m#2", "m#3"]
        sizes = []
        for _ in range(3):
            replies = submit(agent, frames, targets)
            assert [r.served_by["exit"] for r in replies] == ["exit2" if t == 0.9 else "exit1" for t in targets]
            sizes += [r.batch_size for r, t in zip(replies, targets) if t == 0.9]
        telemetry = agent.telemetry.snapshot()
    assert max(sizes) >= 2, sizes
    # Replies are counted under the model; each stage's batches under its lane.
    assert telemetry["m"]["ok"] == 3 * 64 and telemetry["m#2"]["exec_count"] >= 1
    assert telemetry["m#2"]["inference_count"] == 3 * 8


def test_re_batched_answers_equal_the_stage_by_stage_ones(frames):
    """The same requests, survivors re-batched or not: each leaves at the same exit with the same
    logits (the stage graphs continue one another whatever batch the survivor runs in)."""
    targets = [(None, 0.8, 0.9, 0.95, 0.97)[i % 5] for i in range(40)]
    answers = {}
    for rebatch in (False, True):
        with Agent(config(rebatch=rebatch)) as agent:
            answers[rebatch] = submit(agent, frames, targets)
    for plain, joined in zip(answers[False], answers[True]):
        assert plain.served_by["exit"] == joined.served_by["exit"]
        np.testing.assert_allclose(plain.outputs["logits"], joined.outputs["logits"], rtol=1e-4, atol=1e-4)
    assert {r.served_by["exit"] for r in answers[True]} == {"exit1", "exit2", "final"}


def test_confidence_mode_survivors_go_on_and_every_request_is_answered_once(frames):
    with Agent(config(mode="confidence")) as agent:
        replies = submit(agent, frames, [0.9] * 64)
    assert len(replies) == 64 and {r.served_by["exit"] for r in replies} >= {"exit1"}


def test_unload_and_set_batching_with_survivor_lanes_answer_every_request_once(frames):
    """``set-batching`` swaps every stage lane's rule; ``unload-model`` serves or answers what waits
    in each stage's lane, then removes the lanes."""
    with Agent(config()) as agent:
        agent.set_batching("m", dataclasses.replace(agent.models["m"].config.batching, max_batch=4))
        assert all(agent.scheduler.lanes[n].rule.max_batch == 4 for n in ("m", "m#2", "m#3"))
        assert len(submit(agent, frames, [0.97] * 16)) == 16
        futures = [agent.submit("m", {"frames": frames[i:i + 1]}, slo_ms=SLO_MS, min_accuracy=0.97)
                   for i in range(64)]
        counts = agent.remove_model("m", timeout_s=0.05)
        outcomes = []
        for f in futures:
            try:
                f.result(timeout=60)
                outcomes.append("ok")
            except InferenceError as exc:
                outcomes.append(exc.code)
        assert set(outcomes) <= {"ok", SHUTTING_DOWN} and len(outcomes) == 64
        assert counts["answered_shutting_down"] == outcomes.count(SHUTTING_DOWN)
        assert not {"m", "m#2", "m#3"} & set(agent.scheduler.lanes)


def test_exit_rebatch_needs_stages():
    with pytest.raises(ConfigError, match="exit_rebatch"):
        config(mode="off")
