"""Offload: the peer table, the split decision's inputs, the intermediate tensors' codecs and the
peer-side handler (``../shared/DESIGN.md``, "A request's way")."""
