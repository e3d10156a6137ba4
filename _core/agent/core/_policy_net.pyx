# cython: language_level=3, embedsignature=True
"""The learned policy's network forward and masked argmax in C loops (compiled as
agent.core._policy_net).

The specification is ``agent.core.pure.policy_net.PolicyNet``: the same layers, in float32,
summed in the same order (input index ascending), so both pick the same action wherever two
logits are not within float rounding of each other (tests/test_learned_policy.py compares them).
The weights and buffers are bound once, at load; a decision passes only its features and mask.
"""
cimport cython

import numpy as np


cdef inline void _dense(const float* x, Py_ssize_t n_in, const float* w, const float* b, Py_ssize_t n_out,
                        float* y, bint relu) noexcept nogil:
    """``y = x @ w + b`` (``w`` row-major, ``n_in`` x ``n_out``), ReLU'd when ``relu``: each output's
    sum runs in input order ``i`` ascending, as the pure twin's does; the inner loop over ``j``
    vectorises."""
    cdef Py_ssize_t i, j
    cdef float xi, acc
    cdef const float* row
    for j in range(n_out):
        y[j] = 0.0
    for i in range(n_in):
        xi = x[i]
        row = w + i * n_out
        for j in range(n_out):
            y[j] += xi * row[j]
    for j in range(n_out):
        acc = y[j] + b[j]
        y[j] = (acc if acc > 0.0 else 0.0) if relu else acc


@cython.final
cdef class PolicyNet:
    # Fields in _policy_net.pxd (the fused decision, agent.core._policy_decide, calls act_c).

    def __init__(self, mean, inv_std, w1, b1, w2, b2, w3, b3):
        self.mean, self.inv_std, self.w1, self.b1 = mean, inv_std, w1, b1
        self.w2, self.b2, self.w3, self.b3 = w2, b2, w3, b3
        self.n_in, self.n1 = self.w1.shape[0], self.w1.shape[1]
        self.n2, self.n_out = self.w2.shape[1], self.w3.shape[1]
        if (self.mean.shape[0] != self.n_in or self.inv_std.shape[0] != self.n_in or self.w2.shape[0] != self.n1
                or self.w3.shape[0] != self.n2 or self.b1.shape[0] != self.n1 or self.b2.shape[0] != self.n2
                or self.b3.shape[0] != self.n_out):
            raise ValueError("PolicyNet: array shapes do not fit one network")
        self.z = np.empty(self.n_in, dtype=np.float32)
        self.h1 = np.empty(self.n1, dtype=np.float32)
        self.h2 = np.empty(self.n2, dtype=np.float32)
        self.logits = np.empty(self.n_out, dtype=np.float32)
        self.out = self.logits

    def bind(self, x, mask):
        """Remember the feature and mask buffers a caller refills before each :meth:`act_bound`."""
        cdef const float[::1] bx = x
        cdef const unsigned char[::1] bm = mask
        if bx.shape[0] != self.n_in or bm.shape[0] != self.n_out:
            raise ValueError(f"PolicyNet.bind: {bx.shape[0]} features and {bm.shape[0]} mask entries: "
                             f"expected {self.n_in} and {self.n_out}")
        self.bound_x, self.bound_mask, self.bound = bx, bm, True

    def act_bound(self):
        """:meth:`act` on the buffers of :meth:`bind` (no buffer to acquire per call)."""
        if not self.bound:
            raise ValueError("PolicyNet.act_bound: bind(x, mask) first")
        return self._act(self.bound_x, self.bound_mask)

    def act(self, const float[::1] x, const unsigned char[::1] mask):
        """The allowed action (``mask`` != 0) with the largest logit, the first of equal ones
        (-1 when nothing is allowed); the logits are left in :attr:`logits`."""
        if x.shape[0] != self.n_in or mask.shape[0] != self.n_out:
            raise ValueError(f"PolicyNet.act: {x.shape[0]} features and {mask.shape[0]} mask entries: "
                             f"expected {self.n_in} and {self.n_out}")
        return self._act(x, mask)

    cdef Py_ssize_t _act(self, const float[::1] x, const unsigned char[::1] mask):
        return self.act_c(&x[0], &mask[0])

    cdef Py_ssize_t act_c(self, const float* x, const unsigned char* mask) noexcept nogil:
        # Local pointers, so the compiler keeps them in registers and vectorises the inner loops
        # (over j: each output's sum still runs in input order i ascending, as before).
        cdef Py_ssize_t i, j, n_in = self.n_in, n1 = self.n1, n2 = self.n2, n_out = self.n_out
        cdef float best = 0.0
        cdef Py_ssize_t best_j = -1
        cdef const float* mean = &self.mean[0]
        cdef const float* inv_std = &self.inv_std[0]
        cdef const float* w1 = &self.w1[0, 0]
        cdef const float* w2 = &self.w2[0, 0]
        cdef const float* w3 = &self.w3[0, 0]
        cdef const float* b1 = &self.b1[0]
        cdef const float* b2 = &self.b2[0]
        cdef const float* b3 = &self.b3[0]
        cdef float* z = &self.z[0]
        cdef float* h1 = &self.h1[0]
        cdef float* h2 = &self.h2[0]
        cdef float* out = &self.out[0]
        for i in range(n_in):
            z[i] = (x[i] - mean[i]) * inv_std[i]
        _dense(z, n_in, w1, b1, n1, h1, True)
        _dense(h1, n1, w2, b2, n2, h2, True)
        _dense(h2, n2, w3, b3, n_out, out, False)
        for j in range(n_out):
            if mask[j] and (best_j < 0 or out[j] > best):
                best, best_j = out[j], j
        return best_j
