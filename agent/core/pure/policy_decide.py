"""The learned policy's whole decision: the specification of the compiled
``agent.core._policy_decide`` (same class, constructor and results).

One call does what the policy asks at each dispatch: the feasibility mask (``fill_mask``); when it
allows a start, the feature vector (``fill_features``) and the network's masked argmax
(``PolicyNet.act``), in the buffers given at construction. The compiled twin does the same in one C
call, reading the lanes' queues, instance lists, arrival rates, rules and admission controls bound
here (a ``ModelLane`` keeps those objects for a policy's whole life: the scheduler builds its policy
again when a lane's rule or admission changes).
"""
from __future__ import annotations

import numpy as np

from agent.core.pure.policy_features import fill_features, fill_mask


class PolicyDecider:
    def __init__(self, lanes: list, goodput: list, batch_ms: list, buckets: tuple, net, features: np.ndarray,
                 mask: np.ndarray, clip: float, arrival_tau_s: float, goodput_tau_s: float) -> None:
        n_lanes, nb = len(lanes), len(buckets)
        if len(goodput) != n_lanes or len(batch_ms) != n_lanes:
            raise ValueError(f"PolicyDecider: {n_lanes} lanes, {len(goodput)} goodput entries and "
                             f"{len(batch_ms)} profiles: expected one each")
        n_rates = len(lanes[0].arrival_rates) if n_lanes else 0
        n_features = n_lanes * (4 + n_rates + 2 + nb + 2) + 2
        if features.shape[0] != n_features or features.shape[0] != net.z.shape[0]:
            raise ValueError(f"PolicyDecider: {features.shape[0]} features, the network takes {net.z.shape[0]}: "
                             f"expected {n_features}")
        if mask.shape[0] != 1 + n_lanes * nb or mask.shape[0] != net.logits.shape[0]:
            raise ValueError(f"PolicyDecider: {mask.shape[0]} mask entries, the network gives {net.logits.shape[0]}: "
                             f"expected {1 + n_lanes * nb}")
        self.lanes, self.goodput, self.batch_ms, self.buckets = list(lanes), list(goodput), list(batch_ms), tuple(buckets)
        self.net, self.features, self.mask = net, features, mask
        self.clip, self.arrival_tau_s, self.goodput_tau_s = clip, arrival_tau_s, goodput_tau_s
        self.starts = 0

    def decide(self, scheduler, now: float) -> int:
        """The chosen action index (0 = idle) at ``now``, or -1 when the mask allows no start
        (then the features and the network are not computed); :attr:`starts` the starts allowed."""
        self.starts = fill_mask(self.lanes, self.buckets, scheduler.in_flight, scheduler.max_concurrent, self.mask)
        if not self.starts:
            return -1
        fill_features(self.lanes, self.goodput, self.batch_ms, scheduler, now, self.clip, self.arrival_tau_s,
                      self.goodput_tau_s, self.features)
        return self.net.act(self.features, self.mask)


__all__ = ["PolicyDecider"]
