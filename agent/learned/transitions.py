"""(state, action, reward, next state) transitions from a run, for off-policy and offline learning.

A :class:`TransitionLog` wraps whatever chooses the learned policy's actions (the network, a
teacher, a rule mapped into the action space) and keeps, per decision, the feature vector, the
mask, the action and the decision's time, in growing numpy arrays. When the run is over, the
reward of each step comes from the run's records (:func:`rewards_from_records`): each request's
outcome is credited to the last decision at or before its reply, so a transition's reward is what
was answered between it and the next decision. The file (:meth:`TransitionLog.save`, ``.npz``)
holds ``state, mask, action, reward, next_state, next_mask, done, time`` and a JSON header naming
the feature schema and action space, so a board's recorded run trains an offline learner.

Reward (ours, from the parts of our utility, the lab's metrics, which the agent does not import): per SLO
class c with ``n_c`` requests in the run, an answer within the SLO earns ``1 / (n_c x classes)``
and an admitted request that misses (expired, shed or late) costs ``miss_penalty`` times that. A
run's return is then the mean share of each class answered in time (utility's goodput term, whose
best is 1) less the penalty on misses, which stands in for utility's p99 factor (a late answer
raises the p99; a decision-level reward cannot see a percentile).

How large the penalty: utility counts a request refused at the door and an admitted one that
missed alike (neither is goodput), but a miss is a promise admission made and the dispatch broke,
and the deadline-miss rate of admitted requests is a target of its own (issue 25: no worse than
the ``edge`` rule's). On lanes with admission control the policy cannot refuse; it can only keep or
break those promises, so ``tools/train_policy.py`` trains with a penalty above the answer's worth
(``--miss-penalty``, 2 by default: a broken promise costs two answers in time). The functions here
keep 0.5, the value the recorded logs of earlier runs were written with.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from agent.workload.records import RequestRecord

Chooser = Callable[[np.ndarray, np.ndarray, float], int]


class TransitionLog:
    """Records every decision ``chooser`` makes (call the log itself as the chooser)."""

    def __init__(self, chooser: Chooser, n_features: int, n_actions: int, capacity: int = 4096) -> None:
        self.chooser = chooser
        self.n = 0
        self.states = np.empty((capacity, n_features), dtype=np.float32)
        self.masks = np.empty((capacity, n_actions), dtype=bool)
        self.actions = np.empty(capacity, dtype=np.int64)
        self.times = np.empty(capacity, dtype=np.float64)

    def bind(self, scheduler) -> None:
        """Pass the scheduler on to a chooser that reads it (``agent.scheduler.policies.learned``)."""
        if hasattr(self.chooser, "bind"):
            self.chooser.bind(scheduler)

    def __call__(self, features: np.ndarray, mask: np.ndarray, now: float) -> int:
        index = self.chooser(features, mask, now)
        if self.n == len(self.actions):
            grow = len(self.actions)
            self.states = np.concatenate([self.states, np.empty_like(self.states[:grow])])
            self.masks = np.concatenate([self.masks, np.empty_like(self.masks[:grow])])
            self.actions = np.concatenate([self.actions, np.empty_like(self.actions[:grow])])
            self.times = np.concatenate([self.times, np.empty_like(self.times[:grow])])
        i = self.n
        self.states[i] = features
        self.masks[i] = mask
        self.actions[i] = index
        self.times[i] = now
        self.n += 1
        return index

    def transitions(self, records: Sequence[RequestRecord], miss_penalty: float = 0.5) -> dict[str, np.ndarray]:
        """The run's transitions, rewards from ``records`` (:func:`rewards_from_records`); the last
        step is terminal (its next state is itself)."""
        n = self.n
        reward = rewards_from_records(self.times[:n], records, miss_penalty)
        nxt = np.minimum(np.arange(1, n + 1), max(n - 1, 0))
        done = np.zeros(n, dtype=bool)
        if n:
            done[-1] = True
        return {"state": self.states[:n].copy(), "mask": self.masks[:n].copy(), "action": self.actions[:n].copy(),
                "reward": reward, "next_state": self.states[nxt].copy(), "next_mask": self.masks[nxt].copy(),
                "done": done, "time": self.times[:n].copy()}

    def save(self, path: str | Path, records: Sequence[RequestRecord], header: dict, miss_penalty: float = 0.5) -> Path:
        """Write the transitions and ``header`` (schema, action names, where the run came from) to ``path``."""
        data = self.transitions(records, miss_penalty)
        np.savez_compressed(path, header=np.array(json.dumps(header)), **data)
        return Path(path)


def outcome_values(records: Sequence[RequestRecord], miss_penalty: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Per record: its reply time (``nan`` if none, or refused at once) and its reward (module docstring)."""
    classes: dict[tuple[str, float], int] = {}
    for r in records:
        key = (r.model, r.slo_ms)
        classes[key] = classes.get(key, 0) + 1
    n_classes = max(1, len(classes))
    finish = np.full(len(records), np.nan)
    value = np.zeros(len(records))
    for i, r in enumerate(records):
        weight = 1.0 / (classes[(r.model, r.slo_ms)] * n_classes)
        if r.finish_s is None or r.status == "rejected":
            continue
        finish[i] = r.finish_s
        if r.status == "ok" and (r.finish_s - r.arrival_s) * 1000.0 <= r.slo_ms:
            value[i] = weight
        elif r.status in ("ok", "deadline_missed"):
            value[i] = -miss_penalty * weight
    return finish, value


def rewards_from_records(times: np.ndarray, records: Sequence[RequestRecord], miss_penalty: float = 0.5) -> np.ndarray:
    """The reward of each decision at ``times`` (ascending): the outcomes replied between it and the next."""
    reward = np.zeros(len(times), dtype=np.float32)
    if not len(times):
        return reward
    finish, value = outcome_values(records, miss_penalty)
    answered = ~np.isnan(finish)
    step = np.searchsorted(times, finish[answered], side="right") - 1
    np.add.at(reward, np.maximum(step, 0), value[answered].astype(np.float32))
    return reward


__all__ = ["TransitionLog", "outcome_values", "rewards_from_records"]
