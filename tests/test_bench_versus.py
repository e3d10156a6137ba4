"""The pieces of ``edge-agent bench triton`` that run everywhere: the process-tree meter, the
open-loop load generator against real edge-agent servers (MQTT and the Inference Protocol), the
load plan and the target checks. The real-Triton runs are in tests/test_triton_harness.py."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from agent import errors
from agent.bench import versus
from agent.bench.loadgen import Frames, error_code_of, replay
from agent.bench.proctree import TreeMeter, descendants, tree_cpu_s
from agent.metrics import summarize
from agent.workload.trace import TraceRow

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


def test_tree_meter_counts_children_and_reaped_grandchildren():
    # A parent that runs a CPU-burning child to completion (reaped: its time moves to the parent's
    # cutime) and then holds 80 MB while a second child burns; the parent stays alive.
    script = (f"import subprocess, sys, time\n"
              f"subprocess.run([sys.executable, '-c', {BURN.format(s=0.3)!r}])\n"
              f"hold = bytearray(80 * 2**20)\n"
              f"p = subprocess.Popen([sys.executable, '-c', {BURN.format(s=0.3)!r}])\n"
              f"time.sleep(0.2)\nprint('ready', flush=True)\np.wait()\nsys.stdin.read()\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        meter = TreeMeter([parent.pid], interval_s=0.05).start()
        assert parent.stdout.readline().strip() == "ready"
        assert len(descendants([parent.pid])) == 2          # the parent and the second burner
        time.sleep(0.4)
        usage = meter.stop()
    finally:
        parent.stdin.close()
        parent.wait(10)
    assert usage.cpu_s >= 0.5, usage                           # both burners, one of them reaped
    assert usage.peak_rss_bytes >= 80 * 2**20, usage
    assert 0 < usage.peak_pss_bytes <= usage.peak_rss_bytes
    assert usage.processes >= 2
    assert tree_cpu_s([parent.pid]) == 0.0                      # gone: nothing left to count


def test_error_codes_from_both_servers_messages():
    assert error_code_of("rejected: admission control: ...") == errors.REJECTED
    assert error_code_of("deadline_missed: expired in the queue") == errors.DEADLINE_MISSED
    assert error_code_of("Request timeout expired") == errors.DEADLINE_MISSED      # Triton's queue policy
    assert error_code_of("Exceeds maximum queue size") == errors.REJECTED
    assert error_code_of("something else broke") == errors.INTERNAL


def test_scaled_trace_and_capacity():
    rows = [TraceRow(t, "a", "m", 10.0, 0) for t in (0.0, 1.0, 2.0, 4.0)]
    assert [r.t_s for r in versus.scaled(rows, 2.0)] == [0.0, 0.5, 1.0, 2.0]
    assert versus.trace_rate(rows) == pytest.approx(1.0)
    mixed = [TraceRow(0, "a", "fast", 10, 0), TraceRow(1, "b", "slow", 10, 0)]
    assert versus.plain_capacity_per_s(mixed, {"fast": 1.0, "slow": 3.0}) == pytest.approx(500.0)


def _row(o: dict) -> dict:
    return {"summary": {"overall": o}, "cpu_s_per_1000": o.pop("cpu"), "usage": {"peak_rss_mb": o.pop("rss")},
            "mean_overhead_ms": o.pop("overhead", None)}


def test_check_targets_judges_each_load():
    ours = {"goodput_per_s": 140.0, "deadline_miss_rate": 0.02, "slo_attainment": 0.9, "p99_ms": 20.0,
            "cpu": 1.0, "rss": 100.0, "overhead": 0.3}
    triton = {"goodput_per_s": 100.0, "deadline_miss_rate": 0.3, "slo_attainment": 0.85, "p99_ms": 30.0,
              "cpu": 5.0, "rss": 90.0, "overhead": 4.0}
    results = {"loads": {label: {"rows": {"edge-agent/oip": _row(dict(ours)), "triton": _row(dict(triton))}}
                         for label in ("0.5x", "1x", "1.5x")}}
    checks = {(c["load"], c["target"]): c["met"] for c in versus.check_targets(results)}
    assert checks[("1.5x", "goodput >= 1.3x Triton's best")] is True          # 1.4x
    assert checks[("1.5x", ">= 95% of admitted requests within SLO")] is True   # 98%
    assert checks[("1x", "SLO attainment >= Triton's + 10 points")] is False    # +5 points only
    assert checks[("0.5x", "p99 no worse than Triton's")] is True
    assert checks[("0.5x", "per-request overhead <= half of Triton's")] is True
    assert checks[("1x", "CPU s per 1000 requests below Triton's")] is True
    assert checks[("1x", "peak RSS below Triton's")] is False                  # 100 MB vs 90 MB


@pytest.fixture(scope="module")
def frames():
    return Frames.digits(["mobilenet_digits", "resnet_digits"], count=16)


def _light_trace(n: int = 60) -> list[TraceRow]:
    models = ["mobilenet_digits", "resnet_digits"]
    return [TraceRow(round(0.01 * k, 6), "app", models[k % 2], 200.0, 0) for k in range(n)]


@pytest.mark.parametrize("system", ["edge-agent/mqtt", "edge-agent/oip", "plain loop"])
def test_replay_against_a_real_agent_server_answers_everything_right(system, frames, tmp_path):
    server = versus.start_system(system, workdir=tmp_path)
    try:
        assert all(descendants([pid]) for pid in server.roots)
        trace = _light_trace()
        run = replay(server.target(frames), trace, frames)
    finally:
        server.stop()
    statuses = [r.status for r in run.records]
    assert statuses == ["ok"] * len(trace), statuses
    assert run.checked == len(trace) and run.wrong == 0
    summary = summarize(run.records, run.duration_s)
    assert summary["overall"]["within_slo"] == len(trace)
    assert run.send_lag_ms["p99"] < 50.0


def test_a_reply_is_timed_when_it_arrives_not_when_the_busy_generator_reads_it(frames, tmp_path):
    # The generator's loop is held for 150 ms right after each send (as a burst of other replies
    # would hold it): the latency must still be the server's, and the wait show as read lag.
    class BusyAfterSend:
        def __init__(self, target):
            self.target = target

        def prepare(self, trace):
            self.target.prepare(trace)

        def send(self, row, frame_index, done):
            self.target.send(row, frame_index, done)
            time.sleep(0.15)

        async def close(self):
            await self.target.close()

    server = versus.start_system("edge-agent/oip", workdir=tmp_path)
    try:
        trace = [TraceRow(0.2 * k, "app", "mobilenet_digits", 100.0, 0) for k in range(4)]
        run = replay(BusyAfterSend(server.target(frames)), trace, frames)
    finally:
        server.stop()
    assert [r.status for r in run.records] == ["ok"] * 4 and run.wrong == 0
    latencies = [r.latency_ms for r in run.records]
    read_ms = [1000 * (t - r.arrival_s) for r, t in zip(run.records, run.read_s)]
    assert max(latencies) < 50.0, latencies              # a mobilenet reply takes a few ms here
    assert min(read_ms) >= 150.0, read_ms                # the loop read each after its 150 ms stall
    assert run.read_lag_ms["p50"] > 100.0


def test_a_server_that_does_not_accept_delays_no_send(frames):
    # A listening socket that never accepts, its backlog full after the first connection: the
    # kernel drops further handshakes and retries them after a second. A generator that connected
    # with a blocking call would send every row after the second one that late.
    from agent.bench.loadgen import HttpTarget
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    try:
        trace = [TraceRow(0.01 * k, "app", "mobilenet_digits", 50.0, 0) for k in range(6)]
        run = replay(HttpTarget("127.0.0.1", server.getsockname()[1], frames, "edge-agent"), trace, frames,
                     drain_s=0.3)
    finally:
        server.close()
    assert [r.status for r in run.records] == ["unanswered"] * 6
    assert run.send_lag_ms["max"] < 100.0, run.send_lag_ms


def test_replay_records_refusals_and_unanswered(frames, tmp_path):
    # An impossible SLO is refused by admission (or missed): never counted as ok.
    server = versus.start_system("edge-agent/oip", workdir=tmp_path)
    try:
        trace = [TraceRow(0.01 * k, "app", "resnet_digits", 0.01, 0) for k in range(10)]
        run = replay(server.target(frames), trace, frames)
    finally:
        server.stop()
    assert all(r.status in (errors.REJECTED, errors.DEADLINE_MISSED) for r in run.records), \
        [r.status for r in run.records]
    # A stopped server: connections refused, every row errored, none left pending.
    run = replay(server.target(frames), _light_trace(5), frames, drain_s=0.5)
    assert [r.status for r in run.records] == [errors.INTERNAL] * 5
