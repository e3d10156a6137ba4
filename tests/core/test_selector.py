"""agent.core picks the compiled core or the pure twin, and fails loudly when neither is asked for."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXPORTS = [
    "DeadlineQueue", "PushResult", "LatencyTable", "FixedBatch", "DynamicBatch",
    "DeadlineAwareBatch", "BatchPlan", "gather_into", "scatter_rows", "IMPLEMENTATION",
]


def run_python(code: str, env_value: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "EDGE_AGENT_CORE"}
    env["PYTHONPATH"] = str(REPO)
    if env_value is not None:
        env["EDGE_AGENT_CORE"] = env_value
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )


def test_python_twin_selected_by_environment():
    result = run_python(
        """
        import agent.core as core, agent.core.pure as pure
        assert core.IMPLEMENTATION == "python"
        assert all(getattr(core, name) is getattr(pure, name) for name in core.__all__ if name != "IMPLEMENTATION")
        print(sorted(core.__all__))
        """,
        "python",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(sorted(EXPORTS))


def test_compiled_core_is_the_default():
    pytest.importorskip("agent.core._deadline_queue")
    result = run_python(
        """
        import agent.core as core
        assert core.IMPLEMENTATION == "compiled", core.IMPLEMENTATION
        assert core.DeadlineQueue.__module__ == "agent.core._deadline_queue"
        assert core.PushResult.__module__ == core.BatchPlan.__module__ == "agent.core.pure"
        """,
        None,
    )
    assert result.returncode == 0, result.stderr


def test_unknown_selection_is_refused():
    result = run_python("import agent.core", "fast")
    assert result.returncode != 0
    assert "EDGE_AGENT_CORE must be 'python' or 'compiled'" in result.stderr and "'fast'" in result.stderr


def test_missing_compiled_core_explains_how_to_fix_it():
    """Simulate an unbuilt tree by hiding the extension modules from the import system."""
    result = run_python(
        """
        import sys
        from importlib.abc import MetaPathFinder

        class HideCompiledCore(MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.startswith("agent.core._"):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, HideCompiledCore())
        import agent.core
        """,
        None,
    )
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("ImportError: edge-agent: the compiled core was not built")
    assert "pip install -e ." in message and "python setup.py build_ext --inplace" in message
    assert "EDGE_AGENT_CORE=python" in message
