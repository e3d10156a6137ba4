"""Pure-Python twin of the compiled core: the readable specification.

One module per compiled module, with the same names:

* ``deadline_queue``: ``DeadlineQueue`` (compiled: ``agent.core._deadline_queue``);
* ``latency_table``: ``LatencyTable`` (``agent.core._latency_table``);
* ``batch_rules``: ``FixedBatch``, ``DynamicBatch``, ``DeadlineAwareBatch``
  (``agent.core._batch_rules``);
* ``batch_assembly``: ``gather_into``, ``scatter_rows`` (``agent.core._batch_assembly``).

Every name here has a compiled counterpart in ``_core/agent/core/*.pyx`` with the same signature
and the same observable behaviour (returned ids, their order, errors and their types). The twin
exists for three reasons, as msgpack's ``fallback.py`` does:

* it is the spec a reader checks first; the Cython code is the same algorithm in C structs;
* the property tests run both against a tiny oracle, so the two cannot drift apart;
* it is what runs on a board without a C compiler (``EDGE_AGENT_CORE=python``).

It is written for clarity, not speed: the queue is a ``heapq`` with lazy deletion.

What both implementations share is defined once in ``agent.core.types`` and imported by both:
``PushResult`` and ``BatchPlan`` (so both return the identical types), the rule interface
``BatchRule``, and the argument checks (so both raise the same messages). They are re-exported
here, so ``agent.core.pure`` still offers every name it did as a single module.
"""
from agent.core.pure.batch_assembly import gather_into, scatter_rows
from agent.core.pure.batch_rules import DeadlineAwareBatch, DynamicBatch, FixedBatch
from agent.core.pure.deadline_queue import DeadlineQueue
from agent.core.pure.latency_table import LatencyTable
from agent.core.types import MAX_QUEUE_CAPACITY, BatchPlan, BatchRule, PushResult

# The private helpers stay importable from here, where they lived while the twin was one module
# (agent/core/pure.py); new code imports them from agent.core.types or the twin's own modules.
from agent.core.pure.batch_assembly import _check_dst  # noqa: F401
from agent.core.pure.batch_rules import _IDLE  # noqa: F401
from agent.core.pure.deadline_queue import _INF, _Entry, _check_ids_array  # noqa: F401
from agent.core.types import (  # noqa: F401
    _INT32_MAX,
    _INT32_MIN,
    _INT64_MAX,
    _INT64_MIN,
    _as_float,
    _as_int,
    _as_int32,
    _as_int64,
    _check_batch_size,
    _check_capacity,
    _check_duration,
    _validated_preferred,
    _validated_profile,
)

from agent.core.pure.policy_features import fill_features, fill_mask
from agent.core.pure.policy_net import PolicyNet
from agent.core.pure.policy_decide import PolicyDecider

__all__ = [
    "PolicyNet",
    "PolicyDecider",
    "fill_features",
    "fill_mask",
    "DeadlineQueue",
    "PushResult",
    "LatencyTable",
    "BatchRule",
    "FixedBatch",
    "DynamicBatch",
    "DeadlineAwareBatch",
    "BatchPlan",
    "gather_into",
    "scatter_rows",
    "MAX_QUEUE_CAPACITY",
]
