"""Benchmarks of the agent's own costs (``edge-agent bench``).

``edge_lab.bench.core`` measures the compiled hot path against its pure-Python twin and the obvious
standard-library / numpy baselines; ``edge_lab.bench.overhead`` measures the cost per request end to
end. Each benchmark returns a plain dict of figures, so the CLI can print, log or compare them.
"""
