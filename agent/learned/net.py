"""The distilled policy network: a small MLP on preallocated buffers.

Layers ``x -> relu(x W1 + b1) -> relu(. W2 + b2) -> . W3 + b3`` (logits, one per action); the
input is normalised first, ``(x - mean) / std`` from the card. Every intermediate lives in a
buffer made once at load. Weights are float32, as training exports them.

(each decision) runs ``agent.core.PolicyNet``: the compiled core's loops, or their
pure twin (``agent.core.pure.policy_net``) with ``EDGE_AGENT_CORE=python``. :meth:`MLP.forward`
is the same network in numpy's matrix products (tools, tests).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.core import PolicyNet

#: The arrays a weights file holds, in order: (W, b) per layer.
WEIGHT_KEYS = ("w1", "b1", "w2", "b2", "w3", "b3")


class MLP:
    """The network of a weights file (``.npz`` with :data:`WEIGHT_KEYS`) and its normalisation."""

    def __init__(self, weights: dict[str, np.ndarray], mean: np.ndarray, std: np.ndarray) -> None:
        missing = [k for k in WEIGHT_KEYS if k not in weights]
        if missing:
            raise ValueError(f"policy weights: missing array(s) {missing}: expected {list(WEIGHT_KEYS)}")
        w = [np.ascontiguousarray(weights[k], dtype=np.float32) for k in WEIGHT_KEYS]
        self.w1, self.b1, self.w2, self.b2, self.w3, self.b3 = w
        n_in = self.w1.shape[0]
        for name, array, shape in (("b1", self.b1, (self.w1.shape[1],)), ("w2", self.w2, (self.w1.shape[1], self.w2.shape[1])),
                                   ("b2", self.b2, (self.w2.shape[1],)), ("w3", self.w3, (self.w2.shape[1], self.w3.shape[1])),
                                   ("b3", self.b3, (self.w3.shape[1],))):
            if array.shape != shape:
                raise ValueError(f"policy weights: {name} has shape {array.shape}: expected {shape}")
        self.mean = np.ascontiguousarray(mean, dtype=np.float32).reshape(-1)
        self.std = np.ascontiguousarray(std, dtype=np.float32).reshape(-1)
        if self.mean.shape != (n_in,) or self.std.shape != (n_in,):
            raise ValueError(f"policy normalisation: mean {self.mean.shape}, std {self.std.shape}: expected ({n_in},) each")
        if not np.all(self.std > 0):
            raise ValueError("policy normalisation: every std must be > 0")
        self.inv_std = (1.0 / self.std).astype(np.float32)
        self.x = np.empty(n_in, dtype=np.float32)
        self.h1 = np.empty(self.w1.shape[1], dtype=np.float32)
        self.h2 = np.empty(self.w2.shape[1], dtype=np.float32)
        self.logits = np.empty(self.w3.shape[1], dtype=np.float32)
        self.core = PolicyNet(self.mean, self.inv_std, self.w1, self.b1, self.w2, self.b2, self.w3, self.b3)

    @classmethod
    def load(cls, path: str | Path, mean: np.ndarray, std: np.ndarray) -> "MLP":
        with np.load(path) as data:
            return cls({k: data[k] for k in data.files}, mean, std)

    @property
    def n_in(self) -> int:
        return self.w1.shape[0]

    @property
    def n_out(self) -> int:
        return self.w3.shape[1]

    def forward(self, features: np.ndarray) -> np.ndarray:
        """The logits of ``features`` (into :attr:`logits`, returned; overwritten by the next call)."""
        x, h1, h2, out = self.x, self.h1, self.h2, self.logits
        np.subtract(features, self.mean, out=x)
        np.multiply(x, self.inv_std, out=x)
        np.dot(x, self.w1, out=h1)
        np.add(h1, self.b1, out=h1)
        np.maximum(h1, 0.0, out=h1)
        np.dot(h1, self.w2, out=h2)
        np.add(h2, self.b2, out=h2)
        np.maximum(h2, 0.0, out=h2)
        np.dot(h2, self.w3, out=out)
        np.add(out, self.b3, out=out)
        return out

    def act(self, features: np.ndarray, mask: np.ndarray) -> int:
        """The allowed action (``mask``: bool or uint8, non-zero = allowed) with the largest logit
        (the first of equal ones); the logits are left in ``core.logits``."""
        if mask.dtype == np.bool_:
            mask = mask.view(np.uint8)
        return self.core.act(features, mask)


__all__ = ["WEIGHT_KEYS", "MLP"]
