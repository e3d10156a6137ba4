"""The batching + early-exit allocation (issue 24 item 4): the exact solver on hand-checked cases, the
MILP against a brute force, the heuristic's plans always feasible, impossible classes refused.

Units throughout: rates in requests/s, times in ms, busy time in ms per second (the capacity is
1000 * utilisation).
"""
from __future__ import annotations

import random
import subprocess
import sys

import pytest

pytest.importorskip("scipy", reason="the exact solver needs scipy (the dev extra)")

from agent.exits.allocation import (AllocationError, Choice, ExitModel, Problem, UserClass, evaluate,
                                    plan_allocation)
from agent.exits.exact import brute_force, solve_exact
from agent.models.card import load_card
from edge_lab.bench.exit_alloc import random_problem


def _both_exact(problem: Problem):
    """The MILP's plan, after checking the brute force agrees on the optimum."""
    milp, brute = solve_exact(problem), brute_force(problem)
    assert milp.feasible and brute.feasible
    assert milp.served_rate == pytest.approx(brute.served_rate, rel=1e-9)
    return milp


def test_accuracy_decides_the_exit():
    # Exits: exit1 (80% accurate), exit2 (95%); each stage 1 + 1*n ms; batch 1 only, so a request
    # costs 2 ms to exit1 and 4 ms to exit2. Capacity 0.9 * 1000 = 900 ms/s.
    # A: 100/s needing 0.9 -> only exit2: 400 ms/s. B: 200/s, any accuracy: exit1 400 ms/s, exit2 800.
    # A + B at exit1 = 800 <= 900, served 300; B at exit2 would need 1200. So the optimum serves both,
    # B at exit1.
    model = ExitModel.affine(["exit1", "exit2"], [0.80, 0.95], [1.0, 1.0], [1.0, 1.0], [1])
    problem = Problem([UserClass("A", 100, 10, 0.9), UserClass("B", 200, 10, 0.0)], model, 0.9)
    plan = _both_exact(problem)
    assert plan.served_rate == pytest.approx(300)
    assert plan.exit_for("A") == "exit2" and plan.exit_for("B") == "exit1"
    assert plan.busy_ms_per_s == pytest.approx(800)
    heuristic = plan_allocation(problem)
    assert heuristic.feasible and heuristic.exit_for("A") == "exit2" and heuristic.exit_for("B") == "exit1"


def test_sharing_a_batch_stream_makes_a_larger_batch_possible():
    # One exit, stage 4 + 1*n ms, batch sizes 1, 2, 4; capacity 0.8 * 1000 = 800 ms/s.
    # A: 250/s, SLO 19 ms. Alone: b=1 costs 250 * 5 = 1250 (too much); b=2: 125 batches * 6 ms = 750,
    # latency fill 1000*1/250 = 4 + 6 = 10 ms; b=4: fill 1000*3/250 = 12 + 8 = 20 > 19 ms.
    # B: 60/s, SLO 100 ms. Alone at b=4: 15 * 8 = 120 ms/s, latency 3000/60 + 8 = 58 ms.
    # A at b=2 with B anywhere: 750 + 120 (B at 4) = 870, 930 (B with A at 2), 750 + 300 (B at 1): all > 800.
    # A and B together at b=4: 310/s, fill 3000/310 = 9.68 + 8 = 17.7 ms <= 19; 77.5 batches * 8 = 620.
    # So the optimum serves 310/s, both in the batch-4 stream: only sharing it meets A's SLO.
    model = ExitModel.affine(["only"], [0.9], [4.0], [1.0], [1, 2, 4])
    problem = Problem([UserClass("A", 250, 19), UserClass("B", 60, 100)], model, 0.8)
    plan = _both_exact(problem)
    assert plan.served_rate == pytest.approx(310)
    assert plan.choice("A") == Choice(0, 4) and plan.choice("B") == Choice(0, 4)
    assert plan.busy_ms_per_s == pytest.approx(620)
    assert plan.latency_ms[0] == pytest.approx(3000 / 310 + 8)
    # Alone, A gets batch 2 (the only size that both fits and meets its SLO).
    alone = _both_exact(Problem([UserClass("A", 250, 19)], model, 0.8))
    assert alone.choice("A") == Choice(0, 2) and alone.busy_ms_per_s == pytest.approx(750)
    assert plan_allocation(problem).served_rate == pytest.approx(310)


def test_mixed_exits_in_one_batch_pay_the_deep_stage_only_for_batches_that_reach_it():
    # Exits 80% and 95%, each stage 2 + 1*n ms, batch sizes 1 and 4; capacity 0.5 * 1000 = 500 ms/s;
    # SLOs loose (100 ms). A: 200/s at exit1; B: 40/s needing exit2.
    # Both in the batch-4 stream: 240/s, 60 batches/s. Stage 1: 2 * 60 + 1 * 240 = 360. Stage 2 runs
    # for B's 40 items/s, in at most min(60, 40) = 40 batches/s: 2 * 40 + 1 * 40 = 120. Total 480.
    # (Charging stage 2's fixed 2 ms to all 60 batches would make it 520 > 500.)
    # Other ways to serve both: both at b=1: 200*3 + 40*6 = 840; A at 4, B at 1: 300 + 240 = 540;
    # A at 1, B at 4: 600 + 120 = 720. So the optimum serves 240/s, both at batch 4, busy 480.
    model = ExitModel.affine(["exit1", "exit2"], [0.80, 0.95], [2.0, 2.0], [1.0, 1.0], [1, 4])
    problem = Problem([UserClass("A", 200, 100, 0.0), UserClass("B", 40, 100, 0.9)], model, 0.5)
    plan = _both_exact(problem)
    assert plan.served_rate == pytest.approx(240)
    assert plan.choice("A") == Choice(0, 4) and plan.choice("B") == Choice(1, 4)
    assert plan.busy_ms_per_s == pytest.approx(480)


def test_the_optimum_may_refuse_the_largest_class():
    # One exit costing exactly 1 ms per request (no fixed part), batch 1; capacity 0.95 * 1000 = 950.
    # A 600/s, B 480/s, C 460/s: A+B = 1080, A+C = 1060 do not fit, B+C = 940 does: the optimum serves
    # 940/s and refuses A (taking the largest class first would serve only 600/s).
    model = ExitModel.affine(["only"], [0.9], [0.0], [1.0], [1])
    problem = Problem([UserClass("A", 600, 50), UserClass("B", 480, 50), UserClass("C", 460, 50)], model, 0.95)
    plan = _both_exact(problem)
    assert plan.served_rate == pytest.approx(940)
    assert plan.refused == ("A",) and plan.served == ("B", "C")
    assert plan_allocation(problem).served_rate == pytest.approx(940)


def test_milp_equals_brute_force_on_random_tiny_instances():
    rng = random.Random(2401)
    for _ in range(16):
        problem = random_problem(rng, classes=rng.choice((2, 3, 4)), exits=rng.choice((2, 3)),
                                 batch_sizes=(1, 2, 4))
        # Every exit accurate enough is offered to both (not only the earliest): the MILP must find the
        # same optimum the enumeration of all of them does.
        milp, brute = solve_exact(problem), brute_force(problem)
        assert milp.feasible and brute.feasible
        assert milp.served_rate == pytest.approx(brute.served_rate, rel=1e-7), (milp.describe(), brute.describe())


def test_heuristic_plans_are_always_feasible_and_never_beat_the_optimum():
    rng = random.Random(7)
    for index in range(60):
        problem = random_problem(rng, classes=rng.randint(1, 8))
        plan = plan_allocation(problem)
        assert plan.feasible, plan.describe()
        # The model's constraints, recomputed here from the plan's own figures.
        assert plan.busy_ms_per_s <= problem.capacity_ms * (1 + 1e-9)
        for c, choice, latency in zip(problem.classes, plan.choices, plan.latency_ms):
            if choice is None:
                continue
            assert problem.model.accuracy[choice.exit] >= c.min_accuracy
            assert choice.exit == problem.earliest_exit[problem.classes.index(c)]
            assert latency <= c.slo_ms * (1 + 1e-9)
        if index % 4 == 0 and len(problem.classes) <= 6:
            assert plan.served_rate <= solve_exact(problem).served_rate * (1 + 1e-9)


def test_a_class_no_exit_is_accurate_enough_for_is_refused_by_name():
    model = ExitModel.affine(["exit1", "final"], [0.8, 0.93], [1.0, 1.0], [1.0, 1.0], [1, 2])
    with pytest.raises(AllocationError, match=r"class 'strict'.*min_accuracy 0.95.*final 0.9300"):
        Problem([UserClass("ok", 10, 50, 0.5), UserClass("strict", 10, 50, 0.95)], model)
    with pytest.raises(AllocationError, match="class 'strict'"):
        plan_allocation([UserClass("strict", 10, 50, 0.95)], model)
    with pytest.raises(AllocationError, match="class 'strict'"):
        solve_exact([UserClass("strict", 10, 50, 0.95)], model)


def test_a_class_whose_slo_no_batch_can_meet_is_refused_by_name():
    # Reaching 'final' takes (1+1) + (1+1) = 4 ms at batch 1: an SLO of 3 ms cannot be met.
    model = ExitModel.affine(["exit1", "final"], [0.8, 0.93], [1.0, 1.0], [1.0, 1.0], [1, 2])
    with pytest.raises(AllocationError, match=r"class 'fast'.*slo_ms 3.*'final'.*4.000 ms"):
        Problem([UserClass("fast", 10, 3, 0.9)], model)
    # The same SLO is fine where the earlier exit is accurate enough (2 ms).
    assert plan_allocation([UserClass("fast", 10, 3, 0.7)], model).exit_for("fast") == "exit1"


@pytest.mark.parametrize("bad, field", [
    (UserClass("x", 0, 10), "rate"), (UserClass("x", -5, 10), "rate"), (UserClass("x", 10, 0), "slo_ms"),
    (UserClass("x", 10, float("nan")), "slo_ms"), (UserClass("x", 10, 10, 1.5), "min_accuracy"),
])
def test_bad_class_fields_are_refused_naming_the_class_and_field(bad, field):
    model = ExitModel.affine(["only"], [0.9], [1.0], [1.0], [1])
    with pytest.raises(AllocationError, match=rf"class 'x': {field}"):
        Problem([bad], model)


def test_duplicate_class_names_and_bad_models_are_refused():
    model = ExitModel.affine(["only"], [0.9], [1.0], [1.0], [1])
    with pytest.raises(AllocationError, match="class 'a': the name is used twice"):
        Problem([UserClass("a", 1, 10), UserClass("a", 2, 10)], model)
    with pytest.raises(AllocationError, match="batch_sizes"):
        ExitModel(("e",), (0.9,), (4, 2), ((1.0, 2.0),))
    with pytest.raises(AllocationError, match="stage_ms"):
        ExitModel(("e", "f"), (0.8, 0.9), (1, 2), ((1.0, 2.0),))
    with pytest.raises(AllocationError, match="class 'a': batch 3 is not a profiled batch size"):
        evaluate(Problem([UserClass("a", 1, 10)], model), [Choice(0, 3)])


def test_the_shipped_cards_exits_give_a_model_whose_envelope_covers_the_profile():
    card = load_card("demo:camera_exits")
    model = ExitModel.from_card(card)
    assert model.names == tuple(p.name for p in card.exits)
    assert model.accuracy == tuple(p.accuracy for p in card.exits)
    assert model.batch_sizes == tuple(card.exits[0].batch_sizes)
    for k, point in enumerate(card.exits):
        fixed, per_item = model.envelope(k)
        assert fixed >= 0 and per_item >= 0
        for b, t in zip(point.batch_sizes, point.stage_ms):
            assert fixed + per_item * b >= t - 1e-12
            assert fixed + per_item * b <= t * 1.25     # an envelope, not a loose bound
    # Three classes asking for each exit's accuracy: each answered at the earliest exit that has it.
    classes = [UserClass(f"a{k}", 20, 200, acc) for k, acc in enumerate(model.accuracy)]
    plan = plan_allocation(classes, model)
    assert [plan.exit_for(c.name) for c in classes] == list(model.names)
    assert plan.served_rate == pytest.approx(60)


def test_a_warm_update_from_the_previous_plan_stays_feasible_as_classes_change():
    rng = random.Random(31)
    for _ in range(25):
        problem = random_problem(rng, classes=rng.randint(2, 6))
        previous = plan_allocation(problem)
        # Rates move by up to 20%, one class leaves and a new one (a copy of another, renamed) arrives.
        moved = [UserClass(c.name, c.rate * rng.uniform(0.8, 1.2), c.slo_ms, c.min_accuracy)
                 for c in problem.classes[1:]]
        moved.append(UserClass("newcomer", *[getattr(problem.classes[0], f) for f in ("rate", "slo_ms",
                                                                                    "min_accuracy")]))
        warm = plan_allocation(moved, problem.model, problem.utilisation, previous=previous)
        assert warm.feasible, warm.describe()
        assert warm.classes == tuple(c.name for c in moved)
        # Unchanged classes: the warm update keeps at least what the previous plan served.
        again = plan_allocation(problem, previous=previous)
        assert again.feasible and again.served_rate >= previous.served_rate * (1 - 1e-12)


def _edge_agent(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=120)


def test_bench_exit_alloc_prints_the_gap_and_refuses_bad_arguments():
    out = _edge_agent("bench", "exit-alloc", "--instances", "3", "--repeats", "1", "--card", "demo:camera_exits")
    assert out.returncode == 0, out.stderr
    assert "3 random instances" in out.stdout and "gap mean" in out.stdout and "within 5%" in out.stdout
    assert "warm update" in out.stdout
    bad = _edge_agent("bench", "exit-alloc", "--instances", "0")
    assert bad.returncode == 2 and "--instances" in bad.stderr and "expected a whole number >= 1" in bad.stderr
    no_exits = _edge_agent("bench", "exit-alloc", "--instances", "1", "--card", "demo:resnet_digits")
    assert no_exits.returncode == 2 and "resnet_digits" in no_exits.stderr and "no exits" in no_exits.stderr
