"""Collaborative offload (issue 23): the peer table, the split decision's inputs, the codecs of the
intermediate tensors sent between a board and its peer, and the peer-side handler that runs a tail.

Each lives in its own module; import them by name (``agent.offload.codecs``...). This file stays
empty so that importing one part does not load the others.
"""
