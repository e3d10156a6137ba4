"""``edge-agent bench offload`` end to end, very short: the two-board lab, a real peer agent and a
board agent per row (real processes, a real Mosquitto, the shaped link), the board's applications
in its namespace. It must run both rows, serve the full-offload row's requests on the peer (the
offloaded replies are seen on the broker), answer every request exactly once (nothing lost,
nothing duplicated, no wrong prediction), and leave nothing behind. Needs root and the lab's
tools: it skips otherwise, saying which is missing. The load is half the board's measured
capacity (an overload is the bench's business, not a test's: this machine's CPU is shared).
"""
from __future__ import annotations

import pytest

from edge_lab.netlab import Link, check_support, leftovers

_REASON = check_support()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"network lab unavailable: {_REASON}")


def test_bench_offload_runs_end_to_end_and_tears_down():
    from edge_lab.bench.offload import bench_offload, format_offload
    before = leftovers()
    results = bench_offload([Link(100, 10)], rows=["local", "full"], duration_s=2.0, load=0.5, warmup_s=0.5,
                            calibrate_s=1.5, drain_s=5.0)
    assert leftovers() == before == []
    assert results["capacity"]["local_per_s"] > 0
    (shape,) = results["shapes"]
    rows = {row["key"]: row for row in shape["rows"]}
    assert set(rows) == {"local", "full"}
    for row in rows.values():
        assert row["sent"] == results["trace_rows"] > 0
        assert row["lost"] == 0 and row["duplicated"] == 0, row
        assert row["wrong"] == 0 and row["ok"] > 0, row
    assert rows["local"]["served_by_peer"] == {}
    assert rows["full"]["served_by_peer"].get("full", {}).get("items_ok", 0) > 0, rows["full"]
    text = format_offload(results)
    assert "full offload" in text and "local only" in text
