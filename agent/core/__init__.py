"""The hot-path core: deadline queue, latency table, batching rules, batch assembly.

Two implementations behind the same names, as msgpack does with ``_cmsgpack`` and
``fallback.py``:

* the compiled one (``_core/agent/core/*.pyx``, built into ``agent.core._deadline_queue`` and
  friends): what the agent runs by default;
* the pure-Python twin, the package ``agent.core.pure`` (one module per compiled module): the
  readable specification, and what runs on a board without a C compiler. Select it with
  ``EDGE_AGENT_CORE=python``.

What both share is defined once in ``agent.core.types`` and exported from here whichever runs:
the result types ``PushResult`` and ``BatchPlan``, and ``BatchRule``, the interface of every
batching rule (compiled, pure, and the baselines in ``agent.scheduler.baselines``).

Callers import from here (``from agent.core import DeadlineQueue``), never a compiled module by
name. ``IMPLEMENTATION`` says which one was loaded ("compiled" or "python"). If the compiled
modules are missing and the twin was not asked for, importing fails loudly rather than falling
back silently: on a board, a queue many times slower is a deployment mistake, not a detail
(BENCHMARKS.md, "Deadline queue").
"""
import os

__all__ = [
    "DeadlineQueue",
    "PushResult",
    "LatencyTable",
    "FixedBatch",
    "DynamicBatch",
    "DeadlineAwareBatch",
    "BatchPlan",
    "BatchRule",
    "gather_into",
    "scatter_rows",
    "PolicyNet",
    "PolicyDecider",
    "fill_features",
    "fill_mask",
    "IMPLEMENTATION",
]

from agent.core.types import BatchPlan, BatchRule, PushResult

_ENV_VAR = "EDGE_AGENT_CORE"
_requested = os.environ.get(_ENV_VAR, "").strip().lower()

if _requested == "python":
    from agent.core.pure import (
        DeadlineAwareBatch,
        DeadlineQueue,
        DynamicBatch,
        FixedBatch,
        LatencyTable,
        gather_into,
        PolicyNet,
        PolicyDecider,
        fill_features,
        fill_mask,
        scatter_rows,
    )

    IMPLEMENTATION = "python"
elif _requested in ("", "compiled"):
    try:
        from agent.core._deadline_queue import DeadlineQueue
        from agent.core._latency_table import LatencyTable
        from agent.core._batch_rules import DeadlineAwareBatch, DynamicBatch, FixedBatch
        from agent.core._batch_assembly import gather_into, scatter_rows
        from agent.core._policy_net import PolicyNet
        from agent.core._policy_features import fill_features, fill_mask
        from agent.core._policy_decide import PolicyDecider
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").startswith("agent.core._"):
            _why = f"the compiled core was not built ({exc.name} is missing)"
        else:
            _why = f"the compiled core failed to import ({exc}); rebuild it"
        raise ImportError(
            f"edge-agent: {_why}. Build it with `pip install -e .` (or "
            f"`python setup.py build_ext --inplace` in the source tree), or set "
            f"{_ENV_VAR}=python to run the pure-Python twin (slower, same behaviour)."
        ) from exc

    IMPLEMENTATION = "compiled"
else:
    raise ImportError(
        f"{_ENV_VAR} must be 'python' or 'compiled' (or unset, meaning compiled), "
        f"got {os.environ[_ENV_VAR]!r}"
    )
