"""The discrete-event simulator: the live agent's scheduler, queues and batching rules on a virtual
clock, with batch run times drawn from the board's latency profile (DESIGN.md, "One scheduler, two
clocks"). ``simulate(trace, models, workers)`` replays a v1 trace and returns one
``RequestRecord`` per row, the same record type a live replay produces; with ``peers`` it also
simulates collaborative offload (``agent.sim.offload``: peers, links, the offload executor).
"""
from agent.sim.engine import ARRIVAL, COMPLETE, WAKE, SimModel, SimResult, sim_models_from_config, simulate
from agent.sim.executor import SimBatch, SimExecutor
from agent.sim.offload import SimOffloadModel, SimPeerSpec, SimSplit

__all__ = ["simulate", "SimModel", "SimResult", "SimExecutor", "SimBatch", "sim_models_from_config",
           "SimPeerSpec", "SimOffloadModel", "SimSplit", "COMPLETE", "ARRIVAL", "WAKE"]
