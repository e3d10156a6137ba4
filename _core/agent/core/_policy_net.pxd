# C-level declaration of the policy network, for the fused decision (agent.core._policy_decide).
#
# cimport it as:  from agent.core._policy_net cimport PolicyNet

cimport cython


@cython.final
cdef class PolicyNet:
    cdef const float[::1] mean, inv_std, b1, b2, b3
    cdef const float[:, ::1] w1, w2, w3
    cdef float[::1] z, h1, h2, out
    cdef const float[::1] bound_x
    cdef const unsigned char[::1] bound_mask
    cdef bint bound
    cdef Py_ssize_t n_in, n1, n2, n_out
    cdef readonly object logits

    # The forward pass and masked argmax on raw buffers of n_in floats and n_out mask bytes.
    cdef Py_ssize_t act_c(self, const float* x, const unsigned char* mask) noexcept nogil
    cdef Py_ssize_t _act(self, const float[::1] x, const unsigned char[::1] mask)
