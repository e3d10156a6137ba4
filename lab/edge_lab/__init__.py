"""edge-agent's lab: what measures, compares and shows the agent, and is not shipped to a board.

The benchmarks (``edge_lab.bench``: ``edge-agent bench core | run | triton``, with the contenders
compared and the real-Triton harness), the benchmark metrics (``edge_lab.metrics``), the demo and
its simulated cameras (``edge_lab.demo``) and the Mosquitto launcher of the tests and the demo
(``edge_lab.broker``). It runs against the ``agent`` package installed beside it; the agent never
imports it (the runtime's wheel is built from the repository's root ``pyproject.toml``).
"""
