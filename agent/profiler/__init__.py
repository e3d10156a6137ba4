"""The on-device profiler: how fast each model runs on this board, alone and under co-running load.

Two uses:

* the quick start-up profile the agent takes before serving (:func:`measure_latency_table`, used by
  :mod:`agent.api`): batch latency of one instance, nothing more, so start-up stays fast;
* the full board profile, ``edge-agent profile --config FILE``: batch sweep with p50/p99/mean,
  latency under k concurrent instances, pairs of different models co-running, and a fitted
  interference model (:mod:`agent.profiler.fit`), written to a versioned JSON file
  (:mod:`agent.profiler.profile_file`) that :func:`load_profile` reads back as a
  :class:`Profile` (``latency_table(model)``, ``predict_ms(model, batch, concurrency)``).

Modules: :mod:`~agent.profiler.measure` (timing), :mod:`~agent.profiler.fit` (the model),
:mod:`~agent.profiler.profile_file` (format and validation), :mod:`~agent.profiler.run`
(a whole config), :mod:`~agent.profiler.cli` (the command).
"""
from agent.profiler.measure import measure_latency_table, profile_batch_sizes
from agent.profiler.profile_file import PROFILE_VERSION, Profile, ProfileError, load_profile, save_profile

__all__ = [
    "measure_latency_table",
    "profile_batch_sizes",
    "PROFILE_VERSION",
    "Profile",
    "ProfileError",
    "load_profile",
    "save_profile",
]
