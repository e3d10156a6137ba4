"""The command line: help that helps, config errors that name the field, the core's build check."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def edge_agent(*args, **kw):
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=120, **kw)


def test_help_lists_the_commands():
    out = edge_agent("--help")
    assert out.returncode == 0
    for command in ("run", "demo", "bench", "profile", "trace"):
        assert command in out.stdout
    assert "--config" in edge_agent("run", "--help").stdout
    assert "--duration" in edge_agent("demo", "--help").stdout
    assert "heapq" in edge_agent("bench", "core", "--help").stdout


def test_run_with_a_bad_config_names_the_field(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('config_version = 1\n[[models]]\nname = "m"\ninstances = 0\n')
    out = edge_agent("run", "--config", str(bad))
    assert out.returncode == 2
    assert "models[0].instances = 0" in out.stderr and "expected" in out.stderr


def test_run_without_a_config_file():
    out = edge_agent("run", "--config", "/nonexistent/agent.toml")
    assert out.returncode == 2
    assert "/nonexistent/agent.toml" in out.stderr


def test_bench_triton_refuses_bad_arguments_before_any_work():
    # Checked up front: a run of the full grid takes about 15 minutes a round.
    out = edge_agent("bench", "triton", "--repeat", "0", "--systems", "edge-agent/oip")
    assert out.returncode == 2 and "--repeat 0: expected 1 or more rounds" in out.stderr
    out = edge_agent("bench", "triton", "--systems", "edge-agent/oip,nginx")
    assert out.returncode == 2 and "unknown ['nginx']" in out.stderr
    assert "--repeat K" in edge_agent("bench", "triton", "--help").stdout


def test_missing_compiled_core_says_how_to_build(tmp_path):
    # A copy of the package without the compiled modules, as on a checkout nobody built.
    shutil.copytree(ROOT / "agent", tmp_path / "agent", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    env.pop("EDGE_AGENT_CORE", None)
    out = subprocess.run([sys.executable, "-c", "import agent.core"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode != 0
    assert "not built" in out.stderr and "pip install -e ." in out.stderr and "EDGE_AGENT_CORE=python" in out.stderr
    env["EDGE_AGENT_CORE"] = "python"
    out = subprocess.run([sys.executable, "-c", "import agent.core as c; print(c.IMPLEMENTATION)"],
                         capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.stdout.strip() == "python", out.stderr
