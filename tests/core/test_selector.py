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
    "DeadlineAwareBatch", "BatchPlan", "BatchRule", "gather_into", "scatter_rows", "IMPLEMENTATION",
    "PolicyNet", "PolicyDecider", "fill_features", "fill_mask",          # the learned policy's
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
        import sys
        import agent.core as core
        assert core.IMPLEMENTATION == "compiled", core.IMPLEMENTATION
        assert core.DeadlineQueue.__module__ == "agent.core._deadline_queue"
        assert core.PushResult.__module__ == core.BatchPlan.__module__ == "agent.core.types"
        assert core.BatchRule.__module__ == "agent.core.types"
        assert "agent.core.pure" not in sys.modules  # the compiled core needs nothing of the twin
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


# Every name agent/core/pure.py defined while the twin was one module, private helpers included:
# the package agent/core/pure/ re-exports them all, so no import elsewhere breaks.
SINGLE_MODULE_ALL = [
    "DeadlineQueue", "PushResult", "LatencyTable", "BatchRule", "FixedBatch", "DynamicBatch",
    "DeadlineAwareBatch", "BatchPlan", "gather_into", "scatter_rows", "MAX_QUEUE_CAPACITY",
    "PolicyNet", "PolicyDecider", "fill_features", "fill_mask",
]
SINGLE_MODULE_PRIVATE = [
    "_Entry", "_IDLE", "_INF", "_INT32_MAX", "_INT32_MIN", "_INT64_MAX", "_INT64_MIN", "_as_float",
    "_as_int", "_as_int32", "_as_int64", "_check_batch_size", "_check_capacity", "_check_dst",
    "_check_duration", "_check_ids_array", "_validated_preferred", "_validated_profile",
]


def test_pure_twin_package_keeps_every_name_of_the_single_module():
    import agent.core.pure as pure
    import agent.core.types as core_types

    assert sorted(pure.__all__) == sorted(SINGLE_MODULE_ALL)
    assert [name for name in SINGLE_MODULE_ALL + SINGLE_MODULE_PRIVATE if not hasattr(pure, name)] == []
    for name in ("PushResult", "BatchPlan", "BatchRule", "MAX_QUEUE_CAPACITY", "_check_capacity"):
        assert getattr(pure, name) is getattr(core_types, name), name
