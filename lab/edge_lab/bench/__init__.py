"""Benchmarks of the agent's own costs (``edge-agent bench``).

``edge_lab.bench.core`` measures the compiled hot path against its pure-Python twin and the obvious
standard-library / numpy baselines; ``edge_lab.bench.overhead`` measures the cost per request end to
end. Each benchmark returns a plain dict of figures, so the CLI can print, log or compare them.
"""
from __future__ import annotations

import json

__all__ = ["write_json"]


def write_json(path: str | None, figures) -> None:
    """``--json FILE`` of every bench: its figures as JSON (numpy scalars as floats); nothing
    without a path."""
    if path:
        with open(path, "w") as fh:
            json.dump(figures, fh, indent=2, default=float)
        print(f"wrote {path}")
