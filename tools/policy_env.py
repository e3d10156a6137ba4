"""A gymnasium environment over the simulator: one step per dispatch decision of the learned policy.

The simulator (``agent.sim.simulate``) runs the agent's own ``Scheduler`` with ``policy =
"learned"``; the policy's chooser hands each decision's features and mask to the environment and
waits for the action (the simulation runs in a thread of its own, one decision at a time, so the
event loop is the simulator's, unchanged). ``reset(seed=...)`` starts a new trace from
``trace_factory(rng)``; ``step(action)`` returns the next decision's features, the reward of
what was answered in between (``agent.learned.transitions``: per SLO class, ``+1/(n_c x classes)``
per answer in time, ``-miss_penalty`` times that per admitted miss, scaled by the trace's length
so an answer in time is worth about 1), and ``terminated`` once the trace is served. The mask of the
allowed actions is in ``info["action_mask"]`` (gymnasium's convention for masked discrete spaces).

``tools/train_policy.py`` trains by logging whole episodes instead (faster: no thread hand-off);
this class is for learners that want the gymnasium loop.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable

import gymnasium as gym
import numpy as np

from agent.learned.actions import action_names
from agent.learned.features import feature_names


class DispatchEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, run: Callable, trace_factory: Callable, lanes, miss_penalty: float = 0.5) -> None:
        """``run(trace, **policy_options)`` simulates ``trace`` under the learned policy with those
        options (``tools/train_policy.run``); ``trace_factory(rng)`` -> a trace."""
        self.run, self.trace_factory, self.lanes = run, trace_factory, tuple(lanes)
        n_in, n_out = len(feature_names(self.lanes)), len(action_names(self.lanes))
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (n_in,), np.float32)
        self.action_space = gym.spaces.Discrete(n_out)
        self.miss_penalty = miss_penalty
        self._thread = None
        self._to_env: queue.Queue = queue.Queue(maxsize=1)
        self._to_sim: queue.Queue | None = None
        self._reward = 0.0

    def _weights(self, trace) -> dict:
        counts: dict = {}
        for row in trace:
            key = (row.model, round(row.slo_ms, 3))
            counts[key] = counts.get(key, 0) + 1
        return {key: len(trace) / (n * len(counts)) for key, n in counts.items()}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.close()
        trace = self.trace_factory(self.np_random)
        weights = self._weights(trace)
        to_env, to_sim = queue.Queue(maxsize=1), queue.Queue(maxsize=1)
        self._to_env, self._to_sim, self._reward = to_env, to_sim, 0.0
        env = self

        def on_reply(request, result, error):
            weight = weights.get((request.model, round(1000.0 * (request.deadline - request.arrival), 3)), 1.0)
            env._reward += weight if result is not None else -env.miss_penalty * weight

        def chooser(features, mask, now):
            to_env.put(("decide", features.copy(), mask.copy()))
            action = to_sim.get()
            if action is None:
                raise _Stop()
            return action

        def target():
            try:
                self.run(trace, learned_chooser=chooser, learned_lanes=self.lanes, on_reply=on_reply)
                to_env.put(("done", None, None))
            except _Stop:
                pass

        self._thread = threading.Thread(target=target, daemon=True)
        self._thread.start()
        kind, obs, mask = to_env.get()
        if kind == "done":
            return np.zeros(self.observation_space.shape, np.float32), {"action_mask": np.ones(self.action_space.n, bool)}
        self._reward = 0.0
        return obs, {"action_mask": mask}

    def step(self, action):
        self._to_sim.put(int(action))
        kind, obs, mask = self._to_env.get()
        reward, self._reward = self._reward, 0.0
        if kind == "done":
            self._thread.join()
            self._thread = None
            return (np.zeros(self.observation_space.shape, np.float32), reward, True, False,
                    {"action_mask": np.ones(self.action_space.n, bool)})
        return obs, reward, False, False, {"action_mask": mask}

    def close(self):
        if self._thread is not None and self._thread.is_alive():
            self._to_sim.put(None)
            self._thread.join(timeout=10)
        self._thread = None


class _Stop(Exception):
    """Ends a simulation the environment was reset or closed in the middle of."""
