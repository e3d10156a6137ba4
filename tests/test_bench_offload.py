"""``edge-agent bench offload`` end to end, very short: the two-board lab, a real peer agent and a
board agent per row (real processes, a real Mosquitto, the shaped link), the board's applications
in its namespace. It must run both rows, serve the full-offload row's requests on the peer (the
offloaded replies are seen on the broker), answer every request exactly once (nothing lost,
nothing duplicated, no wrong prediction), and leave nothing behind. Needs root and the lab's
tools: it skips otherwise, saying which is missing. And the targets' estimate of what the lab allows,
by hand. The load is half the board's measured
capacity (an overload is the bench's business, not a test's: this machine's CPU is shared).
"""
from __future__ import annotations

import pytest

from edge_lab.netlab import Link, check_support, leftovers

_REASON = check_support()


@pytest.mark.skipif(_REASON is not None, reason=f"network lab unavailable: {_REASON}")
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
    # where each ok reply says it was computed: the local row's all here, the full row's mostly on the peer
    assert rows["local"]["served_ok"] == {"local": rows["local"]["ok"]}
    assert sum(rows["full"]["served_ok"].values()) == rows["full"]["ok"]
    assert rows["full"]["served_ok"].get("full", 0) > 0 and "unknown" not in rows["full"]["served_ok"]
    text = format_offload(results)
    assert "full offload" in text and "local only" in text


def test_the_lab_ceiling_is_the_peer_plus_what_forwarding_leaves_of_the_board():
    from edge_lab.bench.offload import BOARD, check_targets, lab_ceiling
    full = {"cpu": {BOARD: {"cores": 0.44, "throttled_share": 0.5}}}
    results = {"board_cpu": 0.5, "peer_cpu": 1.0}
    ceiling = lab_ceiling(results, full)
    assert ceiling["peer_x"] == 2.0 and ceiling["board_left_x"] == pytest.approx(0.12)
    assert ceiling["x"] == pytest.approx(2.12)
    assert lab_ceiling(results, None) is None and lab_ceiling({**results, "board_cpu": None}, full) is None

    def row(key, goodput, **more):
        return {"key": key, "label": key, "goodput_per_s": goodput, "lost": 0, "duplicated": 0,
                "config": {"policy": "offload_fixed" if key == "full" else "split"}, "served_ok": {"local": 1},
                "served_by_peer": {}, **more}
    shape = {"link": {"mbit": 100, "delay_ms": 10},
             "rows": [row("local", 70.0), row("full", 180.0, **full), row("ours", 170.0)]}
    target = check_targets({**results, "capacity": {"local_per_s": 100.0}, "shapes": [shape]})[0]
    assert target["held"] is False and "1.70x" in target["detail"] and "ceiling about 2.12x" in target["detail"]


def test_served_ok_counts_where_each_ok_reply_says_it_was_computed():
    from edge_lab.bench.offload import BOARD, PEER, served_ok
    records = [["ok", 0.0, 0.1, [BOARD, None]],                 # run here
               ["ok", 0.0, 0.1, [BOARD, "stage1"]],             # the peer failed it: rescued here
               ["ok", 0.0, 0.1, [PEER, None]],                  # full offload (no split named)
               ["ok", 0.0, 0.1, [PEER, "full"]],
               ["ok", 0.0, 0.1, [PEER, "stage2"]],
               ["ok", 0.0, 0.1, None],                          # a reply that names no board
               ["ok", 0.0, 0.1],                                # an old record: no place at all
               ["rejected", 0.0, 0.1, [BOARD, None]],           # not ok: not counted
               ["unanswered", 0.0, None, None]]
    assert served_ok(records) == {"full": 2, "local": 2, "stage2": 1, "unknown": 2}
