"""``edge-agent bench netlab``: builds the two-board lab (:mod:`edge_lab.netlab`), measures that its
shaping is what was asked, and tears it down.

What it measures, from inside the board's namespace (probe clients of :mod:`edge_lab.netprobe`
against a probe server in the root namespace, through a relay with the board's delay, as the
board's broker traffic goes): TCP round trips (p50/p99, against twice the one-way delay), the
rate board -> root and root -> board (against the tbf rate), the same straight to the server
without the relay (what the relay costs on a shaped link); a busy loop's share of a core in each
board's cgroup (against its quota) with the cgroup's throttle count; and, on loopback outside the
lab, the relay alone: a stream's rate with and without it and its CPU seconds per MB.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Callable

from edge_lab.netlab import Lab, Link
from edge_lab.netprobe import ProbeServer, download, upload

__all__ = ["bench_netlab", "format_netlab", "bench_relay_loopback"]

_PROBE = [sys.executable, "-m", "edge_lab.netprobe"]


def _probe(lab: Lab, board: str, args: list[str], *, cgroup: bool = False, timeout: float = 60.0) -> dict:
    done = lab.run(board, _PROBE + args, cgroup=cgroup, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"probe {' '.join(args)} in {board} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def bench_relay_loopback(delay_ms: float, seconds: float = 1.5) -> dict:
    """A stream's rate on loopback straight to a sink and through a relay (``delay_ms``), and the
    relay's CPU seconds per MB relayed (both ways counted)."""
    with ProbeServer("127.0.0.1") as server:
        direct = upload(*server.address, seconds, 0.2)
        relay = subprocess.Popen([sys.executable, "-m", "edge_lab.relay", "--listen", "127.0.0.1:0",
                                  "--upstream", f"127.0.0.1:{server.address[1]}", "--delay-ms", f"{delay_ms:g}",
                                  "--tag", "bench-loopback"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        try:
            assert relay.stdin is not None and relay.stdout is not None
            host, _, port = relay.stdout.readline().split()[1].rpartition(":")

            def stats() -> dict:
                relay.stdin.write("stats\n")
                relay.stdin.flush()
                return json.loads(relay.stdout.readline())

            before = stats()
            relayed = upload(host, int(port), seconds, 0.2)
            down = download(host, int(port), seconds, 0.2)
            after = stats()
        finally:
            if relay.stdin is not None:
                relay.stdin.close()
            relay.wait(timeout=10)
    moved_mb = (after["bytes_up"] + after["bytes_down"] - before["bytes_up"] - before["bytes_down"]) / 1e6
    cpu_s = after["cpu_s"] - before["cpu_s"]
    return {"direct_mbit": direct["mbit"], "relay_up_mbit": relayed["mbit"], "relay_down_mbit": down["mbit"],
            "relay_cpu_ms_per_mb": cpu_s * 1e3 / moved_mb if moved_mb else float("nan"), "relayed_mb": moved_mb}


def bench_netlab(link: Link, board_cpu: float | None, peer_cpu: float | None, *, seconds: float = 2.0,
                 pings: int = 100, step: Callable[[str], None] = lambda label: None) -> dict:
    """Build the lab, measure it (module docstring), tear it down; returns the figures."""
    results: dict = {"link": {"mbit": link.mbit, "delay_ms": link.delay_ms},
                     "board_cpu": board_cpu, "peer_cpu": peer_cpu}
    step("build the lab")
    started = time.monotonic()
    with Lab(board_cpu=board_cpu, peer_cpu=peer_cpu, link=link) as lab:
        results["build_s"] = time.monotonic() - started
        results["lab"] = repr(lab)
        with ProbeServer(lab.bridge_address) as server:
            via = lab.forward("board", server.address)
            host, port = via
            step("round trips through the relay")
            ping = _probe(lab, "board", ["ping", host, str(port), "--count", str(pings)])
            results["rtt"] = {"p50_ms": ping["p50_ms"], "p99_ms": ping["p99_ms"],
                              "configured_ms": 2 * link.delay_ms}
            step("throughput through the relay")
            secs = ["--seconds", f"{seconds:g}"]
            results["through_relay"] = {
                "board_to_root_mbit": _probe(lab, "board", ["upload", host, str(port), *secs])["mbit"],
                "root_to_board_mbit": _probe(lab, "board", ["download", host, str(port), *secs])["mbit"]}
            step("throughput without the relay")
            shost, sport = server.address
            results["without_relay"] = {
                "board_to_root_mbit": _probe(lab, "board", ["upload", shost, str(sport), *secs])["mbit"],
                "root_to_board_mbit": _probe(lab, "board", ["download", shost, str(sport), *secs])["mbit"]}
        step("CPU quotas")
        results["cpu"] = {}
        for board, quota in (("board", board_cpu), ("peer", peer_cpu)):
            before = lab.cpu_stat(board)
            share = _probe(lab, board, ["busy", "--seconds", f"{min(seconds, 1.5):g}"], cgroup=True)["share"]
            after = lab.cpu_stat(board)
            results["cpu"][board] = {"quota": quota, "share": share,
                                     "throttled_periods": after.get("nr_throttled", 0) - before.get("nr_throttled", 0)}
        step("tear down")
        teardown_started = time.monotonic()
    results["teardown_s"] = time.monotonic() - teardown_started
    step("the relay alone, on loopback")
    results["relay_loopback"] = bench_relay_loopback(link.delay_ms, seconds=min(seconds, 1.5))
    return results


def format_netlab(r: dict) -> str:
    link = r["link"]
    rate = "unlimited" if link["mbit"] is None else f"{link['mbit']:g}"
    lines = [f"lab: board {r['board_cpu']} core, peer {r['peer_cpu']} core; board link {rate} Mbit/s, "
             f"{link['delay_ms']:g} ms one way (built in {r['build_s']:.2f} s, torn down in {r['teardown_s']:.2f} s)",
             f"round trip board -> relay -> root, 64 B over TCP: p50 {r['rtt']['p50_ms']:.2f} ms, "
             f"p99 {r['rtt']['p99_ms']:.2f} ms (configured {r['rtt']['configured_ms']:g} ms)",
             f"{'throughput, Mbit/s':<28}{'board -> root':>15}{'root -> board':>15}{'configured':>12}"]
    for key, label in (("through_relay", "through the relay"), ("without_relay", "straight (tbf only)")):
        row = r[key]
        lines.append(f"{label:<28}{row['board_to_root_mbit']:>15.2f}{row['root_to_board_mbit']:>15.2f}{rate:>12}")
    lines.append(f"{'busy loop in its cgroup':<28}{'share of a core':>17}{'quota':>8}{'throttled periods':>19}")
    for board, row in r["cpu"].items():
        lines.append(f"{board:<28}{row['share']:>17.2f}{str(row['quota']):>8}{row['throttled_periods']:>19}")
    lo = r["relay_loopback"]
    lines.append(f"relay alone on loopback ({link['delay_ms']:g} ms): stream {lo['direct_mbit']:.0f} Mbit/s straight, "
                 f"{lo['relay_up_mbit']:.0f} up / {lo['relay_down_mbit']:.0f} down through it; its CPU "
                 f"{lo['relay_cpu_ms_per_mb']:.2f} ms per MB relayed ({lo['relayed_mb']:.0f} MB)")
    return "\n".join(lines)
