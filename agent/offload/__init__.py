"""Collaborative offload (issue 23): the offload wire, the peer role, the peer table, split points,
the split decision's inputs and the intermediate tensors' codecs.

* ``wire``: one msgpack message per batch to ``edge/v1/<peer>/offload/<model>``, one reply back;
* ``peer``: the peer role, a transport subscriber that runs tails under this agent's own scheduler;
* ``peers``: the live peer table, from the retained statuses and this board's own offload traffic;
* ``splits``: a model card's split points, as the head and tail sessions need them;
* ``planner``: where a batch runs (here, or split at k on peer p), priced from what is committed.

The board's side, the executor that runs a head and ships the rest, is
``agent.runtime.offload_executor``.
"""
