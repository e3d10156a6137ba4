"""The exit allocation while serving (issue 24 item 4, ``agent.exits.online``): classes admitted by
the plan under overload, everything admitted when it fits, the capacity a whole-class plan leaves
given to the refused classes, and the agent wiring (config, intake, status).

The plans are made on the shipped multi-exit model's own stage times (its card), on a virtual clock.
"""
from __future__ import annotations

import time

import pytest

from agent.config import CONFIG_VERSION, ConfigError, parse_config
from agent.errors import REJECTED, InferenceError
from agent.exits.online import OnlineAllocation
from agent.models.card import load_card
from agent.scheduler.exit_rule import exit_plan


@pytest.fixture(scope="module")
def plan():
    return exit_plan(load_card("demo:camera_exits"), "fixed")


def cost_ms(plan, exit_index: int, batch: int) -> float:
    """Busy ms per request of a class answered at ``exit_index`` in batches of ``batch`` (the card's times)."""
    j = plan.batch_sizes.index(batch)
    return sum(plan.stage_ms[k][j] for k in range(exit_index + 1)) / batch


def drive(allocation: OnlineAllocation, clock: list, mix: list[tuple[int, float, float]], seconds: float,
          start: float = 0.0) -> dict:
    """Offer each ``(exit, slo_ms, rate)`` class at its steady rate for ``seconds``; count admitted
    and refused requests per class over the last half (after the plan has settled)."""
    events = sorted((start + n / rate, i) for i, (_, _, rate) in enumerate(mix)
                    for n in range(int(seconds * rate)))
    counts = {i: {"admitted": 0, "refused": 0} for i in range(len(mix))}
    errors = []
    for at, i in events:
        clock[0] = at
        exit_index, slo_ms, _ = mix[i]
        try:
            allocation.admit(exit_index, slo_ms)
            outcome = "admitted"
        except InferenceError as exc:
            errors.append(exc)
            outcome = "refused"
        if at >= start + seconds / 2:
            counts[i][outcome] += 1
    return {"counts": counts, "errors": errors}


def test_everything_is_admitted_when_the_classes_fit(plan):
    clock = [0.0]
    allocation = OnlineAllocation("m", plan, processors=2, clock=lambda: clock[0])
    # Two classes well inside two processors: 100/s at the last exit, 100/s at the first.
    out = drive(allocation, clock, [(2, 60.0, 100.0), (0, 60.0, 100.0)], 6.0)
    assert all(c["refused"] == 0 for c in out["counts"].values()), out["counts"]
    status = allocation.status()
    assert status["limited"] == {} and len(status["classes"]) == 2 and status["plans"] >= 1
    assert 0 < status["busy_ms_per_s"] <= status["capacity_ms_per_s"]


def test_under_overload_the_cheapest_requests_are_admitted_first_and_the_capacity_is_filled(plan):
    clock = [0.0]
    allocation = OnlineAllocation("m", plan, processors=2, clock=lambda: clock[0])
    slo = 40.0
    cheap, costly = (0, slo, 600.0), (2, slo, 600.0)
    # The two together need more than two processors at their best batch (the card's times).
    best = plan.batch_sizes[-1]
    assert 600 * (cost_ms(plan, 0, best) + cost_ms(plan, 2, best)) > 2000 * allocation.utilisation
    out = drive(allocation, clock, [cheap, costly], 10.0)
    c, k = out["counts"][0], out["counts"][1]
    assert c["refused"] == 0                       # the class that serves the most per ms, whole
    assert k["refused"] > 0 and k["admitted"] > 0  # the costly one: refused in part, not in whole
    status = allocation.status()
    assert list(status["limited"]) == [f"final@{allocation.key(2, slo).slo_ms:g}ms"]
    # What is admitted fits the processors by the card's times (the plan's utilisation included).
    half = 5.0
    admitted_ms = (c["admitted"] * cost_ms(plan, 0, best) + k["admitted"] * cost_ms(plan, 2, best)) / half
    assert admitted_ms <= 2000 * allocation.utilisation * 1.05
    # ... and uses most of them (a plan of whole classes would refuse the costly class whole).
    assert admitted_ms >= 0.8 * 2000 * allocation.utilisation
    reason = out["errors"][-1]
    assert reason.code == REJECTED and "'final'" in reason.message and "admitted at" in reason.message


def test_a_class_whose_rate_falls_is_served_again(plan):
    clock = [0.0]
    allocation = OnlineAllocation("m", plan, processors=2, clock=lambda: clock[0])
    drive(allocation, clock, [(0, 40.0, 600.0), (2, 40.0, 600.0)], 6.0)
    assert allocation.status()["limited"]
    out = drive(allocation, clock, [(0, 40.0, 100.0), (2, 40.0, 100.0)], 8.0, start=6.0)
    assert all(c["refused"] == 0 for c in out["counts"].values()), out["counts"]


def test_classes_are_the_exit_and_the_slo_rounded_down_onto_a_grid(plan):
    allocation = OnlineAllocation("m", plan)
    a, b = allocation.key(1, 50.0), allocation.key(1, 52.0)
    assert a == b and a.slo_ms <= 50.0
    assert allocation.key(1, 80.0).slo_ms > 50.0 and allocation.key(0, 50.0) != a


def test_only_fixed_mode_takes_the_allocation(plan):
    with pytest.raises(ValueError, match="exit_mode = 'fixed'"):
        OnlineAllocation("m", exit_plan(load_card("demo:camera_exits"), "confidence"))
    base = {"config_version": CONFIG_VERSION, "agent": {"device": "b"}, "mqtt": {"enabled": False},
            "http": {"enabled": False}}
    with pytest.raises(ConfigError, match="exit_allocation"):
        parse_config({**base, "models": [{"name": "m", "card": "demo:camera_exits", "exit_mode": "confidence",
                                          "exit_allocation": True}]})
    config = parse_config({**base, "models": [{"name": "m", "card": "demo:camera_exits", "exit_mode": "fixed",
                                               "exit_allocation": True}]})
    assert config.models[0].exit_allocation is True


def test_an_agent_admits_by_the_allocation_and_answers_every_request_once():
    """Live: the shipped model with ``exit_allocation`` on, flooded with a cheap class (exit 1) and a
    costly one (the last exit): every request is answered once (a result, or refused with a reason:
    by the allocation or admission, or late); the allocation's refusals, if the flood overloads this
    machine, fall on the costly class only; the status shows the classes it planned."""
    from agent.api import Agent
    from agent.errors import DEADLINE_MISSED
    from agent.models.digits import camera_frames, load_test_set
    card = load_card("demo:camera_exits")
    dataset = card.raw["dataset"]
    images, _ = load_test_set(card.source.parent / dataset["test_file"])
    frames = camera_frames(images[:16], dataset["seed"], int(dataset["frame_size"]))
    config = parse_config({
        "config_version": CONFIG_VERSION, "agent": {"device": "alloc-board", "workers": 2},
        "mqtt": {"enabled": False}, "http": {"enabled": False},
        "models": [{"name": "m", "card": "demo:camera_exits", "instances": 2, "exit_mode": "fixed",
                    "exit_allocation": True, "batching": {"rule": "deadline_aware", "max_batch": 8}}]})
    with Agent(config) as agent:
        futures, refused_now = [], []
        start = time.monotonic()
        for i in range(1200):
            wait = start + i / 600.0 - time.monotonic()       # 600 requests/s for 2 s
            if wait > 0:
                time.sleep(wait)
            min_accuracy = 0.8 if i % 2 else None
            try:
                futures.append((min_accuracy, agent.submit("m", {"frames": frames[i % 16:i % 16 + 1]}, slo_ms=40,
                                                          min_accuracy=min_accuracy)))
            except InferenceError as exc:
                refused_now.append((min_accuracy, exc))
        outcomes = []
        for min_accuracy, future in futures:
            try:
                result = future.result(timeout=60)
                outcomes.append((min_accuracy, "ok", result))
            except InferenceError as exc:
                outcomes.append((min_accuracy, exc.code, exc))
        status = agent.status()["models"]["m"]["exit_allocation"]
    assert len(outcomes) + len(refused_now) == 1200
    assert all(code in ("ok", DEADLINE_MISSED) for _, code, _ in outcomes)
    assert all(exc.code == REJECTED for _, exc in refused_now)
    by_allocation = [m for m, exc in refused_now if "exit allocation" in exc.message]
    assert all(m is None for m in by_allocation), "the allocation refused the cheap class"
    assert any(code == "ok" for _, code, _ in outcomes)
    assert status["plans"] >= 1 and {name.split("@")[0] for name in status["classes"]} == {"exit1", "final"}


def test_three_classes_fill_in_order_of_cost_the_dearest_gets_nothing(plan):
    clock = [0.0]
    allocation = OnlineAllocation("m", plan, processors=2, clock=lambda: clock[0])
    mix = [(2, 40.0, 600.0), (1, 40.0, 600.0), (0, 40.0, 600.0)]
    best = plan.batch_sizes[-1]
    # exit 1 and exit 2 together fit only in part; the last exit's class cannot fit beside them
    assert 600 * (cost_ms(plan, 0, best) + cost_ms(plan, 1, best)) > 1.2 * 2000 * allocation.utilisation
    out = drive(allocation, clock, mix, 10.0)
    final, exit2, exit1 = (out["counts"][i] for i in range(3))
    assert exit1["refused"] == 0 and exit2["refused"] > 0 and exit2["admitted"] > 0
    assert final["admitted"] == 0
