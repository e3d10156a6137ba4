"""Workloads: the trace format every consumer shares (live replay, simulator, baselines) and the
per-request outcome records that metrics are computed from."""
