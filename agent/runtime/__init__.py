"""What carries the scheduler's decisions out: the one driver and the executors it starts batches on.

* ``driver``: answering a batch (ok, late, expired, failed), filling free slots, and the order of
  release, reply and learning, written once for the live agent and the simulator;
* ``executor``: the interface every executor implements (``start(dispatch, on_done)``);
* ``local_executor``: this board's backends;
* ``offload_executor``: a peer's: the head here, the rest on the peer, a local fallback;
* ``live``: the worker threads that drive the scheduler on the monotonic clock.

The simulator's executor (``agent.sim.executor``) draws batch times from the profile. The scheduler (``agent.scheduler``) sees none of them.
"""
