"""The dispatch policies, one module each, named as ``[agent] policy`` names them.

Each module has ``build(scheduler) -> Policy`` (``agent.scheduler.policy``):

* ``rules`` (the default): each model's batching rule from its config (the deadline-aware rule of
  the compiled core, or a baseline: fixed, Triton's dynamic batcher, FIFO, Clipper's AIMD, DeepRT's
  DisBatcher), earliest deadline first across models, the hold cap while an urgent request waits,
  and the idle board's path.
* ``offload_fixed``: the rules' decision, a fixed share of the batches sent to one peer at one split
  point (``[offload] peer``, ``split``, ``share``): for tests and as a baseline.
* ``learned``: a distilled network decides (``[agent] policy_path``: its card and weights,
  ``agent.learned``), trained offline in the simulator by ``tools/train_policy.py``.
"""
