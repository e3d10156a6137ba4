"""``edge-agent bench probe``: what the idle link probe (``agent.offload.probe``) makes of a shaped
link, with no offload traffic at all.

The lab (:mod:`edge_lab.netlab`): the board in its own namespace, its link to the broker shaped
(tbf each way, the relay's delay), the peer beside the broker unshaped. No CPU quotas by default:
what is measured is the link, and a board throttled by its quota holds a probe's answer for up to
a quota period, which is the board's time, not the link's. The peer agent serves offload; the board
agent names it as a peer and gets no request. The board also serves offload itself, only so that
it refreshes its retained status every second: its ``offload.client.peers.peer`` is the peer table's
estimate, read off the broker by this bench from the root namespace.

Per link shape and probe size (``[offload] probe_bytes``; one board agent per size, the link
re-shaped under it): the link is set, the estimate given ``settle`` seconds to forget the previous
shape (the fit's weight of a sample is 0.2: after 20 probes the old shape weighs about 1 %), then
the board's statuses over ``measure`` seconds: the median round trip and bandwidth the table
shows, against the round trip of the unshaped lab plus twice the one-way delay, and the link's
rate. What the probe can see: a tbf lets a burst through at the line rate (its bucket is the larger
of 15 KB and 5 ms at its rate), so a probe no bigger than the bucket finds the link faster than it
is; a bigger probe, or a batch, meets the rate.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from edge_lab.bench.offload import agent_argv, log_tail, peer_toml
from edge_lab.netlab import Lab, LabError, Link, stop_groups

__all__ = ["DEFAULT_LINKS", "DEFAULT_SIZES", "bench_probe", "format_probe", "board_probe_toml"]

DEFAULT_LINKS: tuple[Link, ...] = (Link(10, 50), Link(100, 10), Link(1000, 1))
DEFAULT_SIZES: tuple[int, ...] = (16_384, 65_536, 262_144)
BOARD, PEER = "board", "peer"


def board_probe_toml(*, model: str, broker: tuple[str, int], idle_s: float, probe_bytes: int,
                     device: str = BOARD, peer: str = PEER) -> str:
    """The board: a peer to offload to, no requests, probes after ``idle_s``, and a status refreshed
    every second (``serve = true`` is what refreshes it)."""
    return "\n".join(["config_version = 1", "", "[agent]", f"device = {json.dumps(device)}", "",
                      "[mqtt]", f"host = {json.dumps(broker[0])}", f"port = {broker[1]}", "session_expiry_s = 0", "",
                      "[telemetry]", "interval_s = 0", "",
                      "[offload]", "serve = true", "status_interval_s = 1", f"peers = [{json.dumps(peer)}]",
                      f"probe_idle_s = {idle_s:g}", f"probe_bytes = {probe_bytes}", "",
                      "[[models]]", f"name = {json.dumps(model)}", f"card = {json.dumps('demo:' + model)}",
                      "instances = 1", "threads = 1"]) + "\n"


class _Statuses:
    """The board's live statuses, read off the broker in the root namespace."""

    def __init__(self, host: str, port: int) -> None:
        from agent.transport.paho_client import connect, make_client
        self._lock = threading.Condition()
        self.statuses: list[tuple[float, dict]] = []
        self.client = make_client(f"bench-probe-{os.getpid()}")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        connect(self.client, host, port)
        self.client.subscribe([(f"edge/v1/{BOARD}/status", 1), (f"edge/v1/{PEER}/status", 1)])
        if not subscribed.wait(10):
            raise LabError(f"the broker at {host}:{port} did not acknowledge the bench's subscription")

    def _on_message(self, client, userdata, message) -> None:
        try:
            status = json.loads(message.payload)
        except ValueError:
            return
        if message.retain or not isinstance(status, dict):
            return
        with self._lock:
            self.statuses.append((time.monotonic(), status))
            self._lock.notify_all()

    def wait(self, condition: Callable[[dict], bool], timeout_s: float, what: str, alive: Callable[[], bool]) -> dict:
        end = time.monotonic() + timeout_s
        seen = 0
        with self._lock:
            while True:
                for _, status in self.statuses[seen:]:
                    if condition(status):
                        return status
                seen = len(self.statuses)
                if not alive():
                    raise LabError(f"an agent exited while the bench waited for {what}")
                if time.monotonic() > end:
                    raise LabError(f"no {what} within {timeout_s:g} s")
                self._lock.wait(0.2)

    def since(self, t: float) -> list[dict]:
        with self._lock:
            return [s for at, s in self.statuses if at >= t]

    def close(self) -> None:
        try:
            self.client.disconnect()
            self.client.loop_stop()
        except Exception:
            pass


def _peer_entry(status: dict) -> dict | None:
    if status.get("device") not in (None, BOARD):
        return None
    client = (status.get("offload") or {}).get("client") or {}
    return (client.get("peers") or {}).get(PEER)


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def bench_probe(links: Sequence[Link] = DEFAULT_LINKS, sizes: Sequence[int] = DEFAULT_SIZES, *,
                model: str = "resnet_digits", idle_s: float = 0.25, settle_s: float = 8.0, measure_s: float = 5.0,
                board_cpu: float | None = None, say: Callable[[str], None] = lambda line: None) -> dict:
    """Build the lab, run a board agent per probe size under every link shape (the unshaped lab
    first), tear down."""
    if not idle_s > 0 or not links or not sizes or any(not 0 < size <= 4 * 1024 * 1024 for size in sizes):
        raise ValueError(f"idle_s = {idle_s!r}, {len(links)} links, sizes = {list(sizes)}: expected idle_s > 0, "
                         f"at least one link, probe sizes in 1..4194304 bytes")
    results: dict = {"model": model, "idle_s": idle_s, "settle_s": settle_s, "measure_s": measure_s,
                     "board_cpu": board_cpu, "rows": []}
    workdir = Path(tempfile.mkdtemp(prefix="bench-probe-"))
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    watch: _Statuses | None = None
    spawned: list[subprocess.Popen] = []
    try:
        say(f"build the lab: board link {links[0]}, no CPU quota on the peer")
        with Lab(board_cpu=board_cpu, peer_cpu=None, link=links[0]) as lab:
            assert lab.broker is not None
            watch = _Statuses(lab.bridge_address, lab.broker.port)
            peer_path = workdir / "peer.toml"
            peer_path.write_text(peer_toml(model=model, broker=lab.broker_address_for(PEER), slo_ms=1000.0))
            peer_log = workdir / "peer.log"
            with open(peer_log, "wb") as fh:
                peer = lab.spawn(PEER, agent_argv(peer_path), env, stdout=fh, stderr=subprocess.STDOUT)
            spawned.append(peer)
            try:
                watch.wait(lambda s: s.get("device") == PEER and s.get("state") == "online", 180.0,
                           "peer online", lambda: peer.poll() is None)
            except LabError as exc:
                raise LabError(f"{exc}\n--- peer log ---\n{log_tail(peer_log)}") from None
            for size in sizes:
                path = workdir / f"board-{size}.toml"
                path.write_text(board_probe_toml(model=model, broker=lab.broker_address_for(BOARD), idle_s=idle_s,
                                                 probe_bytes=size))
                log = workdir / f"board-{size}.log"
                shapes = (Link(None, 0.0), *links)
                lab.set_link(BOARD, shapes[0])
                with open(log, "wb") as fh:
                    board = lab.spawn(BOARD, agent_argv(path), env, stdout=fh, stderr=subprocess.STDOUT)
                spawned.append(board)
                alive = lambda: board.poll() is None and peer.poll() is None    # noqa: E731
                try:
                    say(f"probe_bytes {size}: board started on {_describe(shapes[0])}")
                    watch.wait(lambda s: (_peer_entry(s) or {}).get("probe_samples", 0) >= 4, 180.0,
                               "probe estimate of the peer", alive)
                    for link in shapes:
                        lab.set_link(BOARD, link)
                        time.sleep(settle_s)
                        t0 = time.monotonic()
                        time.sleep(measure_s)
                        if not alive():
                            raise LabError("an agent exited during the measurement")
                        entries = [e for e in (_peer_entry(s) for s in watch.since(t0)) if e is not None]
                        row = {"probe_bytes": size, "mbit": link.mbit, "delay_ms": link.delay_ms,
                               "statuses": len(entries),
                               "rtt_ms": _median([e.get("rtt_ms") for e in entries]),
                               "bandwidth_mbps": _median([e.get("bandwidth_mbps") for e in entries]),
                               "sources": sorted({str(e.get("source")) for e in entries}),
                               "probe_samples": max((e.get("probe_samples", 0) for e in entries), default=0)}
                        results["rows"].append(row)
                        say(f"  {_describe(link)}: rtt {row['rtt_ms']} ms, bandwidth {row['bandwidth_mbps']} Mbit/s")
                    last = watch.since(0.0)
                    counters = next((((s.get("offload") or {}).get("client") or {}).get("probes")
                                     for s in reversed(last) if s.get("device") == BOARD), None)
                    results.setdefault("probes", {})[str(size)] = counters
                except LabError as exc:
                    raise LabError(f"{exc}\n--- board log ---\n{log_tail(log)}") from None
                finally:
                    t_stop = time.monotonic()
                    stop_groups([board], 10.0)
                    spawned.remove(board)
                    # Seconds, not tenths: onnxruntime's telemetry looks up its server at exit, and the
                    # lab's namespaces have no DNS (the lookups time out).
                    say(f"board stopped in {time.monotonic() - t_stop:.1f} s")
            base = [r for r in results["rows"] if r["mbit"] is None and r["rtt_ms"] is not None]
            results["base_rtt_ms"] = _median([r["rtt_ms"] for r in base])
            say("tear the lab down")
    finally:
        if spawned:
            stop_groups(spawned, 10.0)
        if watch is not None:
            watch.close()
    return results


def _describe(link: Link) -> str:
    return "unshaped" if link.mbit is None and not link.delay_ms else f"{link.mbit:g} Mbit/s {link.delay_ms:g} ms"


def format_probe(results: dict) -> str:
    base = results.get("base_rtt_ms") or 0.0
    lines = [f"idle probe estimates, no offload traffic (probe every {results['idle_s']:g} s idle; the unshaped "
             f"lab's round trip {base:.2f} ms is added to 2 x the delay as the expected round trip)",
             f"{'link':>18} {'probe B':>8} {'rtt ms':>8} {'expected':>8} {'Mbit/s':>9} {'link':>7} {'samples':>8}"]
    for row in results["rows"]:
        link = Link(row["mbit"], row["delay_ms"])
        expected = base + 2 * row["delay_ms"]
        rtt = "-" if row["rtt_ms"] is None else f"{row['rtt_ms']:.2f}"
        bw = "-" if row["bandwidth_mbps"] is None else f"{row['bandwidth_mbps']:.1f}"
        rate = "-" if row["mbit"] is None else f"{row['mbit']:g}"
        lines.append(f"{_describe(link):>18} {row['probe_bytes']:>8} {rtt:>8} {expected:>8.2f} {bw:>9} {rate:>7} "
                     f"{row['probe_samples']:>8}")
    for size, counters in (results.get("probes") or {}).items():
        if counters:
            lines.append(f"probe_bytes {size}: sent {counters.get('sent')}, answered {counters.get('answered')}, "
                         f"lost {counters.get('lost')}, late {counters.get('late')}")
    return "\n".join(lines)
