"""The pure-Python twin of the core drives the whole agent too (what runs on a board without a
compiler): the scheduler, driver and in-process agent tests, rerun with ``EDGE_AGENT_CORE=python``."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_scheduler_and_agent_pass_on_the_pure_python_core():
    env = dict(os.environ, EDGE_AGENT_CORE="python")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_scheduler.py", "tests/test_driver.py", "tests/test_agent.py",
         "-k", "not test_pure_core"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "failed" not in out.stdout
    probe = subprocess.run([sys.executable, "-c", "import agent.core as c; print(c.IMPLEMENTATION)"],
                           cwd=ROOT, env=env, capture_output=True, text=True)
    assert probe.stdout.strip() == "python"
