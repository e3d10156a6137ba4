"""The learned policy's network forward and masked argmax: the specification of the compiled
``agent.core._policy_net`` (same class and results, float32 throughout).

Layers: ``z = (x - mean) * inv_std``, ``h1 = relu(z W1 + b1)``, ``h2 = relu(h1 W2 + b2)``,
``logits = h2 W3 + b3``; the action is the first index of the largest logit among those whose
``mask`` entry is non-zero (-1 if none). Weights and buffers are bound at construction. The
products are numpy's (``np.dot``), whose summation order may differ from the compiled loops' by
float rounding: the two agree on the action except where two allowed logits are that close.
"""
from __future__ import annotations

import numpy as np


class PolicyNet:
    def __init__(self, mean: np.ndarray, inv_std: np.ndarray, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray,
                 b2: np.ndarray, w3: np.ndarray, b3: np.ndarray) -> None:
        self.mean, self.inv_std, self.w1, self.b1, self.w2, self.b2, self.w3, self.b3 = (
            mean, inv_std, w1, b1, w2, b2, w3, b3)
        n_in, n1 = w1.shape
        n2, n_out = w2.shape[1], w3.shape[1]
        if (mean.shape != (n_in,) or inv_std.shape != (n_in,) or w2.shape[0] != n1 or w3.shape[0] != n2
                or b1.shape != (n1,) or b2.shape != (n2,) or b3.shape != (n_out,)):
            raise ValueError("PolicyNet: array shapes do not fit one network")
        self.z = np.empty(n_in, dtype=np.float32)
        self.h1 = np.empty(n1, dtype=np.float32)
        self.h2 = np.empty(n2, dtype=np.float32)
        self.logits = np.empty(n_out, dtype=np.float32)

    def bind(self, x: np.ndarray, mask: np.ndarray) -> None:
        """Remember the feature and mask buffers a caller refills before each :meth:`act_bound`."""
        if x.shape != self.z.shape or mask.shape != self.logits.shape:
            raise ValueError(f"PolicyNet.bind: {x.shape[0]} features and {mask.shape[0]} mask entries: "
                             f"expected {self.z.shape[0]} and {self.logits.shape[0]}")
        self._bound = (x, mask)

    def act_bound(self) -> int:
        """:meth:`act` on the buffers of :meth:`bind`."""
        bound = getattr(self, "_bound", None)
        if bound is None:
            raise ValueError("PolicyNet.act_bound: bind(x, mask) first")
        return self.act(*bound)

    def act(self, x: np.ndarray, mask: np.ndarray) -> int:
        """The allowed action (``mask`` != 0) with the largest logit, the first of equal ones
        (-1 when nothing is allowed); the logits are left in :attr:`logits`."""
        if x.shape != self.z.shape or mask.shape != self.logits.shape:
            raise ValueError(f"PolicyNet.act: {x.shape[0]} features and {mask.shape[0]} mask entries: "
                             f"expected {self.z.shape[0]} and {self.logits.shape[0]}")
        z = self.z
        np.multiply(np.subtract(x, self.mean, out=z), self.inv_std, out=z)
        for out, inputs, w, b in ((self.h1, z, self.w1, self.b1), (self.h2, self.h1, self.w2, self.b2),
                                  (self.logits, self.h2, self.w3, self.b3)):
            np.dot(inputs, w, out=out)
            out += b
            if out is not self.logits:
                np.maximum(out, np.float32(0.0), out=out)
        allowed = np.flatnonzero(mask)
        if not len(allowed):
            return -1
        return int(allowed[np.argmax(self.logits[allowed])])     # the first of equal ones


__all__ = ["PolicyNet"]
