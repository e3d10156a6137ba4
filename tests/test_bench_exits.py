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
