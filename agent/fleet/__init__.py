"""Fleet planning (``edge-agent plan``): place applications on boards so every SLO holds.

Modules: ``apps`` (the application list), ``boards`` (board kinds from profiles), ``latency`` (the
interference-aware latency model), ``placement`` (knapsack baseline, the paper's interference-aware
packing, our local search), ``replay`` (the plan checked in the simulator), ``emit`` (agent
configs), ``k8s`` (Kubernetes manifests), ``derive`` (derived board profiles), ``plan`` (the
pipeline), ``cli`` (the command). Shipped board kinds are in ``profiles/``.
"""
from pathlib import Path

#: The shipped board-kind profiles (``edge-agent plan --profiles`` default).
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
