"""``edge-agent bench exits`` from the command line: the simulated half, on a short trace (the figures
themselves are the bench's to print, not a test's to assert)."""
import json

from agent.cli import main


def test_bench_exits_sim_prints_the_table_and_the_run_past_capacity(tmp_path, capsys):
    out = tmp_path / "exits.json"
    assert main(["bench", "exits", "--sim-only", "--sim-duration", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    figures = json.loads(out.read_text())
    names = ["no-batch/no-exit", "batching only", "exit only", "batching+exit fixed", "batching+exit confidence",
             "batching+exit+allocation", "batching+exit+rebatch"]
    assert list(figures["sim"]) == names
    for name in names:
        assert name in printed
        assert figures["sim"][name]["attainment"] >= 0.95 and figures["sim"][name]["goodput"] > 0
    # the staged contenders answered at the exits, the whole-graph ones did not name one
    assert set(figures["sim"]["exit only"]["exits"]) <= {"exit1", "exit2", "final"}
    assert figures["sim"]["batching+exit confidence"]["exits"].get("exit1", 0) > 0
    assert "measured at start" in printed and "SLO" in printed
    # past capacity, the staged contender with and without the allocation, on the same trace
    past = figures["overload"]
    assert past["factor"] == 2.0 and set(past["sim"]) == {"batching+exit fixed", "batching+exit+allocation"}
    assert all(r["goodput"] > 0 and r["statuses"].get("rejected", 0) > 0 for r in past["sim"].values())
    assert "past capacity" in printed
    # Its progress bar counts the lines it says as it goes: as many as line_count says.
    from edge_lab.bench.exits import line_count
    lines = printed.splitlines()
    said = lines[1:next(i for i, line in enumerate(lines) if line.startswith("SLO "))]
    assert said[0].startswith("measured at start") and len(said) == line_count(live=False) == 10, said
    assert line_count(live=True, repeat=3) == 1 + 7 + 3 * 7 + 2 * 2 and line_count(["exit only"], live=True) == 3


def test_the_exit_oracle_sends_each_item_to_its_earliest_right_exit_and_spends_the_allowance_on_the_dearest():
    import numpy as np
    from edge_lab.bench.exits import exit_oracle
    # four items, three exits costing 1, 3 and 6 per item (cumulative)
    correct = [np.array([True, False, False, False]),      # exit 1 gets item 0 right
               np.array([True, True, False, False]),       # exit 2 items 0 and 1
               np.array([True, True, True, False])]        # the last items 0-2; item 3 no exit
    cost = [1.0, 3.0, 6.0]
    # everything right that can be (3 of 4 = 0.75): item 0 at 1, item 1 at 3, item 2 at 6; item 3,
    # wrong at every exit, leaves at the first
    assert exit_oracle(correct, cost, 0.75) == (1 + 3 + 6 + 1) / 4
    # 0.5 allows one wrong answer more: the dearest right item (item 2, at 6) leaves at exit 1 instead
    assert exit_oracle(correct, cost, 0.5) == (1 + 3 + 1 + 1) / 4
    # 0.25: two; items 2 and then 1
    assert exit_oracle(correct, cost, 0.25) == (1 + 1 + 1 + 1) / 4
    # a target above what the exits can reach gets no allowance: the same as everything right
    assert exit_oracle(correct, cost, 0.9) == exit_oracle(correct, cost, 0.75)


def test_the_oracle_bound_on_the_shipped_exit_model_is_above_one_and_rises_with_batching_only_where_it_pays():
    import numpy as np
    from agent.api import Agent
    from agent.models.card import load_card
    from agent.models.digits import card_test_set
    from edge_lab.bench.exits import MODEL, agent_config, oracle_bound
    card = load_card(f"demo:{MODEL}")
    frames, labels = card_test_set(card.raw["dataset"], card.source.parent)
    with Agent(agent_config("fixed", True, 8, 1000.0)) as agent:
        bound = oracle_bound(agent, frames[:120], labels[:120], 8)
        plan = agent.models[MODEL].exits
        stage_ms, sizes = np.array(plan.stage_ms), list(plan.batch_sizes)
    # the first exit is cheaper than the whole graph, and it answers most frames right: the oracle
    # beats batch-1 whole-graph serving; what batching adds is this machine's per-item saving
    assert bound["x_base_batch_1"] > 1.0
    assert set(bound["classes"]) == {1, 8}
    # the oracle pays each frame's cost up to its exit: batching raises the bound when every exit's
    # cumulative per-item cost is lower at batch 8, lowers it when every one is higher (mixed orders,
    # e.g. a dearer first stage and a cheaper tail, can go either way with the exit mix)
    cum_1 = np.cumsum(stage_ms[:, sizes.index(1)])
    cum_8 = np.cumsum(stage_ms[:, sizes.index(8)] / 8)
    if np.all(cum_8 <= cum_1):
        assert bound["x_base_batch_8"] >= bound["x_base_batch_1"]
    if np.all(cum_8 >= cum_1):
        assert bound["x_base_batch_8"] <= bound["x_base_batch_1"]
    for b, means in bound["classes"].items():
        assert list(means) == [0.8, 0.9, 0.95, 0.97]
        assert all(x <= y + 1e-9 for x, y in zip(list(means.values()), list(means.values())[1:]))  # stricter costs more
