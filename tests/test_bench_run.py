"""`edge-agent bench run` end to end on a short trace: every contender's row, live and simulated, JSON and plots."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.workload.generators import DEMO_APPS, generate
from agent.workload.trace import write_trace

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "trace.csv"
    write_trace(path, generate("poisson", rate_per_s=150, duration_s=2.0, apps=DEMO_APPS, seed=3))
    return path


def test_bench_run_compares_contenders_live_and_simulated(trace_file, tmp_path):
    # --policies: the flag's older name (BENCHMARKS.md's commands), kept beside --contenders.
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "bench", "run", "--trace", str(trace_file), "--policies", "fifo,triton,edge",
         "--out", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for row in ("fifo (live)", "fifo (sim)", "triton (live)", "triton (sim)", "edge (live)", "edge (sim)"):
        assert row in out.stdout
    assert "triton: best of 15 settings in the simulator" in out.stdout
    assert "simulated vs live goodput" in out.stdout
    results = json.loads((tmp_path / "out" / "bench.json").read_text())
    rows = results["trace_rows"]
    for name, summary in results["table"].items():
        assert summary["sent"] == rows, name                      # every row accounted for, in every run
        assert summary["unanswered"] == 0, name
    assert set(results["sim_vs_live"]) == {"fifo", "triton", "edge"}
    tuning = results["triton_tuning"]
    assert tuning["best"]["sim_goodput"] == max(g["sim_goodput"] for g in tuning["grid"])
    # At 150 requests/s the board is far from full: every contender serves most requests in time.
    assert results["table"]["edge (live)"]["slo_attainment"] > 0.8
    assert results["table"]["edge (sim)"]["slo_attainment"] > 0.8
    for plot in ("latency_cdf.png", "goodput.png", "batch_sizes.png"):
        assert (tmp_path / "out" / plot).stat().st_size > 1000


@pytest.mark.parametrize("args, message", [
    (["--policies", "fifo,nonsense"], "unknown ['nonsense']"),
    (["--contenders", "edge,sjf"], "unknown ['sjf']; choose from ['clipper', 'deeprt', 'edge', 'fifo', 'fixed', 'learned', 'triton']"),
    (["--config", "/nonexistent.toml"], "an existing TOML file"),
])
def test_bench_run_refuses_bad_arguments(trace_file, tmp_path, args, message):
    out = subprocess.run([sys.executable, "-m", "agent.cli", "bench", "run", "--trace", str(trace_file),
                          "--out", str(tmp_path), *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and message in out.stderr
