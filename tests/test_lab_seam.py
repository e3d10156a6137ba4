"""The seam between the agent and the lab: the runtime a board installs (the wheel built from the
root pyproject.toml, package ``agent``) never needs the lab (``lab/``, package ``edge_lab``: the
benchmarks, the Triton harness, the demo, the test broker, the benchmark metrics), and that wheel
packages ``agent`` only. Building the wheel itself takes about 40 s (it compiles the core), so
these checks read what decides its contents; README ("Agent and lab") gives the command that
builds it."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from setuptools import find_namespace_packages

ROOT = Path(__file__).resolve().parents[1]

# Run first in a child interpreter: `edge_lab` then fails to import exactly as where it is not
# installed (ModuleNotFoundError naming it), though it is installed in this virtualenv.
BLOCK_LAB = """
import importlib.abc, sys

class _NoLab(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "edge_lab" or name.startswith("edge_lab."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoLab())
"""


def without_lab(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_LAB + code, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_the_blocker_blocks():
    out = without_lab("import edge_lab")
    assert out.returncode == 1 and "No module named 'edge_lab'" in out.stderr


def test_every_agent_module_imports_without_the_lab():
    out = without_lab("""
import pkgutil, sys
import agent
names = sorted(m.name for m in pkgutil.walk_packages(agent.__path__, "agent."))
for name in names:
    __import__(name)
assert not [m for m in sys.modules if m.split(".")[0] == "edge_lab"]
print("\\n".join(names))
""")
    assert out.returncode == 0, out.stderr[-3000:]
    imported = set(out.stdout.split())
    assert {"agent.api", "agent.cli", "agent.service", "agent.client", "agent.sim.engine",
            "agent.workload.trace", "agent.workload.generators"} <= imported
    assert not [m for m in imported if m.split(".")[1] in ("bench", "demo", "broker", "metrics")]


def test_without_the_lab_the_cli_lists_its_commands_and_says_where_they_live():
    main = "import sys; from agent.cli import main; sys.exit(main(sys.argv[1:]))"
    out = without_lab(main, "--help")
    assert out.returncode == 0
    for command in ("run", "demo", "bench", "profile", "trace"):
        assert command in out.stdout
    for argv in (["bench", "run", "--trace", "trace.csv", "--policies", "fifo,edge"], ["bench", "core"],
                 ["demo", "--duration", "5"], ["demo"]):
        out = without_lab(main, *argv)
        assert out.returncode == 2, (argv, out.stderr)
        assert f"edge-agent {argv[0]}: " in out.stderr and "edge-agent-lab package" in out.stderr
        assert "pip install -e lab" in out.stderr and "bash tools/dev.sh setup" in out.stderr
    out = without_lab(main, "bench", "--help")
    assert out.returncode == 0 and "edge-agent-lab" in out.stdout
    # The agent's own commands still refuse what they do not know.
    out = without_lab(main, "run", "--config", "x.toml", "--no-such-flag")
    assert out.returncode == 2 and "unrecognized arguments: --no-such-flag" in out.stderr


def test_the_agent_wheel_packages_the_agent_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert include == ["agent*"]
    packages = find_namespace_packages(where=str(ROOT), include=include)
    assert "agent" in packages and all(p == "agent" or p.startswith("agent.") for p in packages)
    lab_names = {"bench", "triton", "demo.py", "broker.py", "metrics.py", "contenders.py"}
    shipped = [p.relative_to(ROOT) for package in packages for p in (ROOT / package.replace(".", "/")).glob("*.py")]
    assert shipped and not [p for p in shipped if lab_names & set(p.parts)]
    for path in shipped:
        text = (ROOT / path).read_text()
        assert "pytriton" not in text and "tritonserver" not in text, path
        if path != Path("agent/cli.py"):    # the one place that reaches the lab, when it is installed
            assert "edge_lab" not in text, path
    extras = project["project"]["optional-dependencies"]
    assert not {"bench", "triton"} & set(extras)
    assert not [r for reqs in extras.values() for r in reqs if r.startswith(("nvidia-pytriton", "matplotlib"))]
    assert "lab" not in (ROOT / "MANIFEST.in").read_text().split()


def test_the_lab_is_its_own_distribution():
    lab = tomllib.loads((ROOT / "lab" / "pyproject.toml").read_text())
    assert lab["project"]["name"] == "edge-agent-lab"
    assert lab["tool"]["setuptools"]["packages"]["find"]["include"] == ["edge_lab*"]
    extras = lab["project"]["optional-dependencies"]
    assert "nvidia-pytriton==0.7.0" in extras["triton"] and any(r.startswith("matplotlib") for r in extras["bench"])
    # Not `edge-agent`: that name on PyPI is another project (the agent comes from this tree).
    assert not [r for r in lab["project"]["dependencies"] if r.startswith("edge-agent")]
    packages = find_namespace_packages(where=str(ROOT / "lab"), include=["edge_lab*"])
    assert {"edge_lab", "edge_lab.bench", "edge_lab.bench.triton"} <= set(packages)
