"""The learned dispatch policy's board side: the feature schema, the action space, the network's
forward pass in numpy and the policy card that ties a shipped network to both.

Nothing here imports torch: training (``tools/train_policy.py``, the ``[train]`` extra) writes the
weights and the card; the agent only reads them (``agent.scheduler.policies.learned``).
"""
