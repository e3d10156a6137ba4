"""``edge-agent bench offload``: collaborative offload on two boards of one machine, every way of
deciding side by side, under several link shapes (issue 23, "Two boards on one machine").

The lab (:mod:`edge_lab.netlab`): the board in its own network namespace with a CPU quota (default
half a core), the peer with twice that, Mosquitto beside the peer, the board's link to the broker
shaped by tbf and delayed by the relay. The peer agent (``edge-agent run``, ``[offload] serve =
true``) runs for the whole bench; each row starts a board agent with that row's policy, plays the
board's applications against it (:mod:`edge_lab.bench.nsload`: inside the board's namespace, on
its loopback, over HTTP, so only offloaded tensors cross the link), stops it, and the next row
starts afresh. Between link shapes the link is re-shaped (:meth:`~edge_lab.netlab.Lab.set_link`),
nothing rebuilt.

The load: one Poisson trace of one model and SLO class, at ``load`` times the board's own
capacity, measured at start on this machine: a local-only board agent under its quota kept busy in
a closed loop (two full batches always in flight, no SLO in the way), its replies per second. Never
a constant: the CPU differs between machines, and the quota throttles what the agent's start-up
profile measured in bursts (an open-loop overload sized from that profile was tried first: the
board fell seconds behind, and its goodput said nothing about its capacity).

Rows (contenders), each a config of the board agent:

- ``local``: policy ``rules``, no offload;
- ``full``: ``offload_fixed``, split none, share 1 (every batch's input goes to the peer);
- ``<split point>``: ``offload_fixed`` at that split point of the card, share 1;
- ``neurosurgeon``: policy ``split``, ``planner = "latency"`` (each batch's own earliest finish),
  max batch 1;
- ``ours``: policy ``split``, ``planner = "queue"``.

The last two appear when ``split`` is one of the scheduler's policies
(:func:`agent.scheduler.policy.policy_names`).

Per row: goodput (ok replies within the SLO per second of the trace), SLO attainment, replies lost
(no reply by the end of the drain) and duplicated (a second reply to one request: both must be 0),
wrong predictions, and where the replies were computed (:func:`served_ok`: each ok reply names the
board that computed it and the split point, ``parameters.served_by`` and ``parameters.split``). The
peer's offload replies are also read off the broker (``edge/v1/<board>/offload-reply/+``): what it
sent, late ones included, and the items it refused or missed, counted by code with the first
one's message (``peer_errors``: why, in the peer's words), beside each board's cores used and share
of periods throttled (``cpu``) and both agents' last statuses. The targets (:func:`check_targets`):
on 100 Mbit/s and 10 ms, ours at least 2.4x local-only (the local row's goodput, or the measured
capacity where that is higher: an overloaded local board that collapses must not flatter the ratio)
and above full offload and Neurosurgeon; on every shape, ours within 10 % of the best fixed plan
(local, full offload, or a split point at share 1); the split ours chooses most moves between
shapes; no row loses or duplicates a reply.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from agent.workload.generators import AppSpec, poisson
from agent.workload.records import RequestRecord
from agent.workload.trace import TraceRow
from edge_lab.metrics import summarize
from edge_lab.netlab import Lab, LabError, Link, stop_groups

__all__ = ["Contender", "DEFAULT_LINKS", "available_contenders", "bench_offload", "board_toml", "check_targets",
           "format_offload", "parse_links", "peer_toml", "agent_argv", "log_tail"]

#: Link shapes of the issue's targets: (Mbit/s, one-way delay ms).
DEFAULT_LINKS: tuple[Link, ...] = (Link(10, 50), Link(100, 10), Link(1000, 1))
#: The shape the 2.4x target is judged on.
TARGET_LINK = Link(100, 10)
TARGET_VS_LOCAL = 2.4
TARGET_VS_BEST_FIXED = 0.90
BOARD, PEER = "board", "peer"
HTTP_PORT = 8000           # in the board's own namespace: nothing else listens there


@dataclass(frozen=True)
class Contender:
    """One row: ``key`` (what ``--rows`` names), how the board agent decides."""

    key: str
    policy: str                        # rules | offload_fixed | split
    split: str | None = None           # offload_fixed: the split point, None = full offload
    planner: str | None = None         # split: queue | latency
    max_batch: int | None = None       # None: the agent's default

    @property
    def label(self) -> str:
        return {"local": "local only", "full": "full offload", "neurosurgeon": "Neurosurgeon (batch 1)",
                "ours": "ours (split, queue)"}.get(self.key, f"fixed split {self.key}")


def available_contenders(split_points: Sequence[str], policies: Sequence[str]) -> list[Contender]:
    """Every row this branch can run: local, full offload, each split point, and the split policy's
    two rows when that policy exists."""
    rows = [Contender("local", "rules"), Contender("full", "offload_fixed")]
    rows += [Contender(name, "offload_fixed", split=name) for name in split_points]
    if "split" in policies:
        rows += [Contender("neurosurgeon", "split", planner="latency", max_batch=1),
                 Contender("ours", "split", planner="queue")]
    return rows


def _model_contenders(model: str) -> list[Contender]:
    """:func:`available_contenders` for ``model`` (a demo model's name or a card's path)."""
    from agent.models.card import load_card
    from agent.scheduler.policy import policy_names
    card = load_card(f"demo:{model}") if not model.endswith(".json") else load_card(model)
    return available_contenders([sp.name for sp in card.split_points], policy_names())


def row_count(model: str, rows: Sequence[str] | None) -> int:
    """How many rows :func:`bench_offload` runs under each link for ``model`` (``rows`` as given to it)."""
    return len(rows) if rows is not None else len(_model_contenders(model))


def parse_links(text: str) -> list[Link]:
    """``"10:50,100:10"`` (Mbit/s:one-way ms, comma-separated) to links; ValueError naming the bad one."""
    links = []
    for part in text.split(","):
        mbit, sep, delay = part.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            links.append(Link(float(mbit), float(delay)))
        except ValueError as exc:
            detail = f" ({exc})" if str(exc) else ""
            raise ValueError(f"--links {part.strip()!r}: expected MBIT:DELAY_MS, e.g. 100:10{detail}") from None
    if not links:
        raise ValueError(f"--links {text!r}: expected at least one MBIT:DELAY_MS")
    return links


def _toml_str(value: str) -> str:
    return json.dumps(value)


def board_toml(contender: Contender, *, model: str, broker: tuple[str, int], slo_ms: float,
               device: str = BOARD, peer: str = PEER, http_port: int = HTTP_PORT) -> str:
    """The board agent's config for ``contender``: HTTP intake on its loopback, MQTT through its
    relay (a clean session each row: nothing of the previous row's board is delivered to it)."""
    lines = ["config_version = 1", "", "[agent]", f"device = {_toml_str(device)}",
             f"policy = {_toml_str(contender.policy)}", "",
             "[mqtt]", f"host = {_toml_str(broker[0])}", f"port = {broker[1]}", "session_expiry_s = 0", "",
             "[http]", "enabled = true", 'host = "127.0.0.1"', f"port = {http_port}", "",
             "[telemetry]", "interval_s = 0", ""]
    if contender.policy == "offload_fixed":
        lines += ["[offload]", f"peer = {_toml_str(peer)}", f"split = {_toml_str(contender.split or 'none')}",
                  "share = 1.0", f"splits = [{_toml_str(contender.split)}]" if contender.split else "splits = []", ""]
    elif contender.policy == "split":
        lines += ["[offload]", f"peers = [{_toml_str(peer)}]", f"planner = {_toml_str(contender.planner or 'queue')}", ""]
    lines += ["[[models]]", f"name = {_toml_str(model)}", f"card = {_toml_str('demo:' + model)}", "instances = 1",
              "threads = 1", f"default_slo_ms = {slo_ms:g}"]
    if contender.max_batch is not None:
        lines += ["", "[models.batching]", f"max_batch = {contender.max_batch}"]
    return "\n".join(lines) + "\n"


def peer_toml(*, model: str, broker: tuple[str, int], slo_ms: float, device: str = PEER) -> str:
    """The peer agent's config: serves its own requests (none here) and the board's partial work."""
    return "\n".join(["config_version = 1", "", "[agent]", f"device = {_toml_str(device)}", "",
                      "[mqtt]", f"host = {_toml_str(broker[0])}", f"port = {broker[1]}", "",
                      "[telemetry]", "interval_s = 0", "",
                      "[offload]", "serve = true", "status_interval_s = 1", "",
                      "[[models]]", f"name = {_toml_str(model)}", f"card = {_toml_str('demo:' + model)}",
                      "instances = 1", "threads = 1", f"default_slo_ms = {slo_ms:g}"]) + "\n"


# --- watching the broker ----------------------------------------------------------------------------

class _Monitor:
    """A client of the broker in the root namespace (no shaping): the agents' statuses, and a copy
    of every offload reply to the board (which split point served how many items)."""

    def __init__(self, host: str, port: int, board: str = BOARD) -> None:
        from agent.transport.paho_client import connect, make_client
        self.board = board
        self._lock = threading.Condition()
        self._live: dict[str, list[dict]] = {}        # device -> statuses published while we listened
        self._served: dict[str, list[int]] = {}       # split ("full") -> [replies, items, items ok]
        self._refused: dict[str, dict] = {}           # the peer's error code -> {"items", "example": the first}
        self._batches: set[str] = set()
        self.duplicate_wire_replies = 0
        self.bad = 0
        self.client = make_client(f"bench-offload-monitor-{os.getpid()}")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        connect(self.client, host, port)
        self.client.subscribe([("edge/v1/+/status", 1), (f"edge/v1/{board}/offload-reply/+", 1)])
        if not subscribed.wait(10):
            raise LabError(f"the broker at {host}:{port} did not acknowledge the bench's subscription")

    def _on_message(self, client, userdata, message) -> None:
        topic = message.topic
        try:
            if topic.endswith("/status"):
                status = json.loads(message.payload)
                if not message.retain and isinstance(status, dict):
                    with self._lock:
                        self._live.setdefault(topic.split("/")[2], []).append(status)
                        self._lock.notify_all()
                return
            from agent.offload.wire import decode_reply
            reply = decode_reply(message.payload)
        except Exception:
            self.bad += 1
            return
        split = reply.served_by.get("split") or "full"
        with self._lock:
            if reply.batch is not None:
                if reply.batch in self._batches:
                    self.duplicate_wire_replies += 1
                    return
                self._batches.add(reply.batch)
            counts = self._served.setdefault(split, [0, 0, 0])
            counts[0] += 1
            counts[1] += len(reply.errors)
            counts[2] += sum(1 for e in reply.errors if e is None)
            for e in reply.errors:
                if e is not None:
                    self._refused.setdefault(e.code, {"items": 0, "example": str(e)})["items"] += 1

    def wait_online(self, device: str, since: int, timeout_s: float, alive: Callable[[], bool]) -> dict:
        """The first live ``online`` status of ``device`` after its ``since``-th; raises LabError
        when ``alive()`` turns False or the time runs out."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                for status in self._live.get(device, [])[since:]:
                    if status.get("state") == "online":
                        return status
                if not alive():
                    raise LabError(f"the {device} agent exited before it came online (its log is above)")
                if time.monotonic() > deadline:
                    raise LabError(f"the {device} agent was not online on the broker within {timeout_s:g} s")
                self._lock.wait(0.2)

    def last_status(self, device: str) -> dict | None:
        """The latest live ``online`` status ``device`` published (None before any): what it said
        of itself while it served, not its goodbye."""
        with self._lock:
            for status in reversed(self._live.get(device, [])):
                if status.get("state") == "online":
                    return status
            return None

    def seen(self, device: str) -> int:
        with self._lock:
            return len(self._live.get(device, []))

    def take_served(self) -> tuple[dict[str, list[int]], int, dict[str, dict]]:
        """What the peer served since the last call (split -> [replies, items, items ok]), replies
        seen twice on the wire, and the items the peer answered with an error, by its code (how
        many, and the first one's message: why the peer refused or missed)."""
        with self._lock:
            served, dups, errors = self._served, self.duplicate_wire_replies, dict(sorted(self._refused.items()))
            self._served, self._batches, self.duplicate_wire_replies, self._refused = {}, set(), 0, {}
        return served, dups, errors

    def close(self) -> None:
        try:
            self.client.disconnect()
            self.client.loop_stop()
        except Exception:
            pass


# --- the agents -------------------------------------------------------------------------------------

def agent_argv(config_path: Path) -> list[str]:
    script = Path(sys.executable).with_name("edge-agent")
    if script.exists():
        return [str(script), "run", "--config", str(config_path)]
    return [sys.executable, "-c", "import sys; from agent.cli import main; sys.exit(main())", "run",
            "--config", str(config_path)]


def _stop(process: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGTERM the agent's process group (it drains and answers what it holds), SIGKILL if it lingers."""
    stop_groups([process], timeout_s)


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


@dataclass
class _Env:
    lab: Lab
    monitor: _Monitor
    workdir: Path
    model: str
    slo_ms: float
    env: dict[str, str]


def _start_board(e: _Env, contender: Contender, tag: str) -> tuple[subprocess.Popen, Path, dict]:
    """Start a board agent with ``contender``'s config; returns once it is online on the broker
    (its process, its log, the status it published)."""
    path = e.workdir / f"board-{tag}.toml"
    path.write_text(board_toml(contender, model=e.model, broker=e.lab.broker_address_for(BOARD), slo_ms=e.slo_ms))
    log = e.workdir / f"board-{tag}.log"
    since = e.monitor.seen(BOARD)
    with open(log, "wb") as fh:
        process = e.lab.spawn(BOARD, agent_argv(path), e.env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        status = e.monitor.wait_online(BOARD, since, 180.0, lambda: process.poll() is None)
    except LabError as exc:
        _stop(process)
        raise LabError(f"{exc}\n--- board agent ({contender.key}) log ---\n{log_tail(log)}") from None
    return process, log, status


def _trace_phase(name: str, trace: Sequence[TraceRow]) -> dict:
    return {"name": name, "kind": "trace", "rows": [[r.t_s, r.app, r.model, r.slo_ms, r.priority] for r in trace]}


class _CpuMeter:
    """Each board's cores used (its cgroup's processes' CPU seconds per second) and the share of CFS
    periods its quota throttled, from :meth:`start` to :meth:`stop`: near its quota and often
    throttled, the quota bounds that board; well below it, the machine (or the work) does."""

    def __init__(self, lab: Lab, boards: Sequence[str]) -> None:
        self.lab, self.boards = lab, tuple(boards)
        self._start: tuple[float, dict, dict] | None = None

    def _sample(self) -> tuple[dict, dict]:
        from edge_lab.bench.proctree import tree_cpu_s
        return ({b: tree_cpu_s(self.lab.pids(b)) for b in self.boards},
                {b: self.lab.cpu_stat(b) for b in self.boards})

    def start(self) -> None:
        self._start = (time.monotonic(), *self._sample())

    def stop(self) -> dict[str, dict]:
        if self._start is None:
            return {}
        t0, cpu0, stat0 = self._start
        cpu1, stat1 = self._sample()
        wall = max(time.monotonic() - t0, 1e-9)
        out = {}
        for b in self.boards:
            periods = stat1[b].get("nr_periods", 0) - stat0[b].get("nr_periods", 0)
            throttled = stat1[b].get("nr_throttled", 0) - stat0[b].get("nr_throttled", 0)
            out[b] = {"cores": round((cpu1[b] - cpu0[b]) / wall, 3),
                      "throttled_share": round(throttled / periods, 3) if periods > 0 else None}
        return out


def _play(e: _Env, phases: Sequence[dict], tag: str, *, on_phase: Callable[[str], None] = lambda name: None,
          drain_s: float = 3.0) -> list[dict]:
    """Run the board's applications (:mod:`edge_lab.bench.nsload`) in its namespace, outside its
    cgroup; ``on_phase(name)`` as each phase starts. Returns each phase's figures."""
    spec = e.workdir / f"load-{tag}.json"
    out = e.workdir / f"load-{tag}.out.json"
    spec.write_text(json.dumps({"host": "127.0.0.1", "port": HTTP_PORT, "model": e.model, "phases": list(phases),
                                "drain_s": drain_s, "ready_timeout_s": 60}))
    span = sum((p["rows"][-1][0] if p.get("rows") else 0) + p.get("seconds", 0) for p in phases)
    timeout = span + len(phases) * (2 * drain_s + 2 * e.slo_ms / 1000) + 120
    process = e.lab.spawn(BOARD, [sys.executable, "-m", "edge_lab.bench.nsload", str(spec), str(out)], e.env,
                          cgroup=False, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(timeout, process.kill)
    watchdog.start()
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("phase "):
                on_phase(line.split(None, 1)[1].strip())
        err = process.stderr.read() if process.stderr is not None else ""
        process.wait()
    finally:
        watchdog.cancel()
    if process.returncode != 0:
        raise LabError(f"the load generator in the board's namespace failed ({process.returncode}): {err.strip()[-1500:]}")
    return json.loads(out.read_text())["phases"]


def _records(trace: Sequence[TraceRow], played: dict) -> list[RequestRecord]:
    records = []
    for i, (row, (status, arrival, finish, *_)) in enumerate(zip(trace, played["records"])):
        records.append(RequestRecord(i, row.app, row.model, arrival if arrival is not None else row.t_s, row.slo_ms,
                                     row.priority, status, finish))
    return records


def _trace(rate_per_s: float, duration_s: float, model: str, slo_ms: float, seed: int) -> list[TraceRow]:
    return poisson(rate_per_s, duration_s, [AppSpec("camera", model, slo_ms, 1.0)], seed)


def served_ok(played_records: Sequence[Sequence]) -> dict[str, int]:
    """Where the ok replies say they were computed: ``local`` (on the board, a rescue of a batch the
    peer failed included) or the peer's split point (``full``, ``stage1``...), from each reply's
    ``parameters.served_by`` and ``parameters.split``; ``unknown`` for a reply that names neither.
    The replies the peer sent (``served_by_peer``, seen on the broker) count the batches it
    answered too late as well, after the board had given up on them and answered them itself."""
    counts: dict[str, int] = {}
    for status, _, _, *rest in played_records:
        if status != "ok":
            continue
        where = rest[0] if rest else None
        place = ("unknown" if not where or where[0] is None else
                 "local" if where[0] == BOARD else (where[1] or "full"))
        counts[place] = counts.get(place, 0) + 1
    return dict(sorted(counts.items()))


def _row_result(contender: Contender, trace: Sequence[TraceRow], played: dict, served: dict, wire_dups: int,
                wall_s: float) -> dict:
    records = _records(trace, played)
    overall = summarize(records, played["duration_s"] or 1e-9)["overall"]
    own = [ms for ms in played.get("server_ms") or [] if ms is not None]
    return {"server_p50_ms": float(np.percentile(own, 50)) if own else None,
            "server_p99_ms": float(np.percentile(own, 99)) if own else None,"key": contender.key, "label": contender.label, "config": dataclasses.asdict(contender),
            "goodput_per_s": overall["goodput_per_s"], "slo_attainment": overall["slo_attainment"],
            "throughput_per_s": overall["throughput_per_s"], "offered_per_s": overall["offered_per_s"],
            "p50_ms": overall["p50_ms"], "p99_ms": overall["p99_ms"], "errors": overall["errors"],
            "sent": overall["sent"], "ok": overall["ok"], "within_slo": overall["within_slo"],
            "lost": overall["unanswered"], "duplicated": played["duplicated"],
            "wrong": played["wrong"], "checked": played["checked"],
            "served_ok": served_ok(played["records"]),
            "served_by_peer": {k: {"replies": v[0], "items": v[1], "items_ok": v[2]} for k, v in sorted(served.items())},
            "duplicate_wire_replies": wire_dups,
            "send_lag_ms": played["send_lag_ms"], "wall_s": wall_s}


# --- the bench --------------------------------------------------------------------------------------

def bench_offload(links: Sequence[Link] = DEFAULT_LINKS, *, model: str = "resnet_digits", board_cpu: float | None = 0.5,
                  peer_cpu: float | None = None, duration_s: float = 10.0, load: float = 3.0, slo_ms: float = 150.0,
                  rows: Sequence[str] | None = None, seed: int = 0, warmup_s: float = 1.5, calibrate_s: float = 4.0,
                  drain_s: float = 8.0, keep: bool = False,
                  say: Callable[[str], None] = lambda line: None) -> dict:
    """Build the lab, measure the board's capacity, run every row under every link shape, tear down.
    Returns every figure (module docstring); ``say`` gets a progress line per step and row. ``keep``:
    leave the agents' logs and configs in the work directory (its path said at the end)."""
    from agent.scheduler.policy import policy_names
    if peer_cpu is None:
        peer_cpu = 2 * board_cpu if board_cpu is not None else None
    every = _model_contenders(model)
    if rows is not None:
        unknown = [key for key in rows if key not in {c.key for c in every}]
        if unknown:
            raise ValueError(f"--rows {','.join(unknown)}: not a row here (rows: {', '.join(c.key for c in every)})")
        every = [c for c in every if c.key in rows]
    results: dict = {"model": model, "board_cpu": board_cpu, "peer_cpu": peer_cpu, "duration_s": duration_s,
                     "load": load, "slo_ms": slo_ms, "seed": seed, "rows": [c.key for c in every],
                     "split_policy": "split" in policy_names(), "shapes": []}
    workdir = Path(tempfile.mkdtemp(prefix="bench-offload-"))
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    monitor: _Monitor | None = None
    peer: subprocess.Popen | None = None
    started = time.monotonic()
    try:
        say(f"build the lab: board {board_cpu} core, peer {peer_cpu} core, board link {links[0]}")
        with Lab(board_cpu=board_cpu, peer_cpu=peer_cpu, link=links[0]) as lab:
            assert lab.broker is not None
            results["lab"] = repr(lab)
            monitor = _Monitor(lab.bridge_address, lab.broker.port)
            e = _Env(lab, monitor, workdir, model, slo_ms, env)
            say("start the peer agent (serve = true)")
            peer_path = workdir / "peer.toml"
            peer_path.write_text(peer_toml(model=model, broker=lab.broker_address_for(PEER), slo_ms=slo_ms))
            peer_log = workdir / "peer.log"
            since = monitor.seen(PEER)
            with open(peer_log, "wb") as fh:
                peer = lab.spawn(PEER, agent_argv(peer_path), env, stdout=fh, stderr=subprocess.STDOUT)
            try:
                monitor.wait_online(PEER, since, 180.0, lambda: peer is not None and peer.poll() is None)
            except LabError as exc:
                raise LabError(f"{exc}\n--- peer agent log ---\n{log_tail(peer_log)}") from None

            # The board's capacity under its quota, on this machine: a local-only board kept busy
            # (closed loop, two full batches in flight, no SLO in the way).
            say("measure the board's capacity (local only, closed loop)")
            board, log, status = _start_board(e, Contender("local", "rules"), "calibrate")
            max_batch = int(status.get("models", {}).get(model, {}).get("batching", {}).get("max_batch", 8))
            probe = {"kind": "closed", "outstanding": 2 * max_batch, "slo_ms": 10_000.0}
            try:
                phases = _play(e, [{**probe, "name": "warmup", "seconds": warmup_s},
                                   {**probe, "name": "capacity", "seconds": calibrate_s}], "calibrate")
            finally:
                _stop(board)
            capacity = phases[1]["ok_per_s"]
            if capacity <= 0:
                raise LabError(f"the local board served nothing: {phases[1]}; log:\n{log_tail(log)}")
            rate = load * capacity
            results["capacity"] = {"local_per_s": capacity, "probe": phases[1], "outstanding": 2 * max_batch,
                                   "trace_rate_per_s": rate}
            say(f"board capacity {capacity:.1f}/s (local only, {2 * max_batch} in flight); "
                f"trace {rate:.1f}/s ({load:g}x) for {duration_s:g} s per row, SLO {slo_ms:g} ms")
            trace = _trace(rate, duration_s, model, slo_ms, seed)
            warmup = _trace(capacity, warmup_s, model, slo_ms, seed + 1)
            results["trace_rows"] = len(trace)

            for s, link in enumerate(links):
                if s:
                    lab.set_link(BOARD, link)
                shape = {"link": {"mbit": link.mbit, "delay_ms": link.delay_ms}, "rows": []}
                results["shapes"].append(shape)
                for k, contender in enumerate(every):
                    if peer.poll() is not None:
                        raise LabError(f"the peer agent exited ({peer.returncode}):\n{log_tail(peer_log)}")
                    t0 = time.monotonic()
                    board, log, _ = _start_board(e, contender, f"{s}-{contender.key}")
                    cpu = _CpuMeter(lab, (BOARD, PEER))
                    try:
                        played = _play(e, [_trace_phase("warmup", warmup), _trace_phase("measure", trace)],
                                       f"{s}-{contender.key}", drain_s=drain_s,
                                       on_phase=lambda name: name == "measure" and (monitor.take_served(),
                                                                                    cpu.start()))[1]
                        served, wire_dups, refused = monitor.take_served()
                        used = cpu.stop()
                    finally:
                        _stop(board)
                    row = _row_result(contender, trace, played, served, wire_dups, time.monotonic() - t0)
                    row["cpu"] = used
                    row["peer_errors"] = refused
                    row["peer_status"] = monitor.last_status(PEER)
                    row["board_status"] = monitor.last_status(BOARD)
                    row["log"] = str(log)
                    shape["rows"].append(row)
                    say(f"[{link.mbit:g} Mbit/s, {link.delay_ms:g} ms] {k + 1}/{len(every)} {contender.label}: "
                        f"goodput {row['goodput_per_s']:.1f}/s, attainment {_pct(row['slo_attainment'])}, "
                        f"lost {row['lost']}, dup {row['duplicated']}, served {_mix(row)} "
                        f"({row['wall_s']:.0f} s)")
            say("tear down")
            teardown_started = time.monotonic()
        results["teardown_s"] = time.monotonic() - teardown_started
    finally:
        if monitor is not None:
            monitor.close()
        if keep:
            say(f"kept the agents' logs and configs in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results["wall_s"] = time.monotonic() - started
    results["targets"] = check_targets(results)
    return results


# --- the verdict and the tables ---------------------------------------------------------------------

def _by_key(shape: dict) -> dict[str, dict]:
    return {row["key"]: row for row in shape["rows"]}


def _dominant(row: dict) -> str:
    """Where most of a row's ok replies were computed: ``local`` or the peer's split point."""
    counts = row["served_ok"]
    return max(counts, key=lambda k: counts[k]) if counts else "local"


def lab_ceiling(results: dict, full: dict | None) -> dict | None:
    """An estimate (not a bound) of the most goodput the two boards could reach together, in units of
    the board's capacity: the peer's compute (its quota over the board's: twice, by default) plus
    the part of the board's quota that taking in and forwarding the trace leaves free, as the
    full-offload row measured it (that row runs no model here but for rescues). The target's 3x
    counts both boards' compute and nothing for moving requests; this says what the lab leaves
    once the intake is paid. ``None`` without the quotas or the full-offload row's CPU figures."""
    board_cpu, peer_cpu = results.get("board_cpu"), results.get("peer_cpu")
    used = ((full or {}).get("cpu") or {}).get(BOARD, {}).get("cores")
    if not board_cpu or not peer_cpu or used is None:
        return None
    peer_x = peer_cpu / board_cpu
    left_x = max(0.0, board_cpu - used) / board_cpu
    return {"x": peer_x + left_x, "peer_x": peer_x, "board_left_x": left_x}


def check_targets(results: dict) -> list[dict]:
    """Issue 23's targets on these results: ``{"target", "held": True | False | None, "detail"}``
    (None: the rows it compares were not run)."""
    out: list[dict] = []

    def add(target: str, held: bool | None, detail: str) -> None:
        out.append({"target": target, "held": held, "detail": detail})

    def shape_name(shape: dict) -> str:
        return f"{shape['link']['mbit']:g} Mbit/s, {shape['link']['delay_ms']:g} ms"

    target_shape = next((s for s in results["shapes"] if s["link"] == {"mbit": TARGET_LINK.mbit,
                                                                       "delay_ms": TARGET_LINK.delay_ms}), None)
    rows = _by_key(target_shape) if target_shape else {}
    ours = rows.get("ours")
    if ours is not None and "local" in rows:
        base = max(rows["local"]["goodput_per_s"], results.get("capacity", {}).get("local_per_s", 0.0))
        ratio = ours["goodput_per_s"] / base if base else float("inf")
        ceiling = lab_ceiling(results, rows.get("full"))
        add(f"ours >= {TARGET_VS_LOCAL}x local only on {TARGET_LINK}", ratio >= TARGET_VS_LOCAL,
            f"{ratio:.2f}x (ours {ours['goodput_per_s']:.1f}/s; local row {rows['local']['goodput_per_s']:.1f}/s, "
            f"capacity {results.get('capacity', {}).get('local_per_s', 0.0):.1f}/s)"
            + (f"; this lab's ceiling about {ceiling['x']:.2f}x: the peer {ceiling['peer_x']:g}x, and "
               f"{ceiling['board_left_x']:.2f}x of the board's CPU left after forwarding the trace "
               f"(the full-offload row)" if ceiling else ""))
    else:
        add(f"ours >= {TARGET_VS_LOCAL}x local only on {TARGET_LINK}", None, "not run (needs that shape, ours and local)")
    for other in ("full", "neurosurgeon"):
        name = f"ours above {'full offload' if other == 'full' else 'Neurosurgeon (batch 1)'} on {TARGET_LINK}"
        if ours is not None and other in rows:
            add(name, ours["goodput_per_s"] > rows[other]["goodput_per_s"],
                f"{ours['goodput_per_s']:.1f}/s vs {rows[other]['goodput_per_s']:.1f}/s")
        else:
            add(name, None, "not run")
    fixed_keys = {"local", "full"} | {r["key"] for s in results["shapes"] for r in s["rows"]
                                      if r["config"]["policy"] == "offload_fixed"}
    dominant = []
    for shape in results["shapes"]:
        rows = _by_key(shape)
        fixed = [rows[k] for k in fixed_keys if k in rows]
        name = f"ours within {100 * (1 - TARGET_VS_BEST_FIXED):.0f}% of the best fixed plan on {shape_name(shape)}"
        if "ours" in rows and fixed:
            best = max(fixed, key=lambda r: r["goodput_per_s"])
            held = rows["ours"]["goodput_per_s"] >= TARGET_VS_BEST_FIXED * best["goodput_per_s"]
            add(name, held, f"{rows['ours']['goodput_per_s']:.1f}/s vs {best['label']} {best['goodput_per_s']:.1f}/s")
            dominant.append(_dominant(rows["ours"]))
        else:
            add(name, None, "not run")
    if len(dominant) >= 2:
        add("ours's chosen split moves with the link", len(set(dominant)) > 1, " / ".join(dominant))
    else:
        add("ours's chosen split moves with the link", None, "needs ours on two shapes or more")
    every = [r for s in results["shapes"] for r in s["rows"]]
    bad = [f"{shape_name(s)} {r['key']}: lost {r['lost']}, dup {r['duplicated']}"
           for s in results["shapes"] for r in s["rows"] if r["lost"] or r["duplicated"]]
    add("no reply lost or duplicated, every row", not bad if every else None, "; ".join(bad) or f"{len(every)} rows")
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _mix(row: dict) -> str:
    """Shares of the ok replies by where they were computed."""
    ok = row["ok"] or 0
    if not ok:
        return "-"
    return " ".join(f"{name} {100 * n / ok:.0f}%" for name, n in row["served_ok"].items() if n)


def format_offload(results: dict) -> str:
    cap = results.get("capacity", {})
    lines = [f"model {results['model']}, SLO {results['slo_ms']:g} ms; board {results['board_cpu']} core, peer "
             f"{results['peer_cpu']} core; board capacity {cap.get('local_per_s', float('nan')):.1f}/s "
             f"measured here (local only, closed loop); trace {cap.get('trace_rate_per_s', float('nan')):.1f}/s "
             f"({results['load']:g}x), {results['duration_s']:g} s per row"]
    if not results.get("split_policy"):
        lines.append("(the split policy is not on this branch: no Neurosurgeon or ours rows)")
    for shape in results["shapes"]:
        link = shape["link"]
        lines.append("")
        lines.append(f"link {link['mbit']:g} Mbit/s, {link['delay_ms']:g} ms one way")
        local = _by_key(shape).get("local")
        base = local["goodput_per_s"] if local else None
        cap_per_s = cap.get("local_per_s")
        lines.append(f"{'row':<24}{'goodput/s':>10}{'x local':>8}{'x cap.':>7}{'SLO att.':>9}{'p99 ms':>8}{'lost':>6}{'dup':>5}"
                     f"{'wrong':>6}  served (share of ok replies)")
        for row in shape["rows"]:
            x = f"{row['goodput_per_s'] / base:.2f}" if base else "-"
            xc = f"{row['goodput_per_s'] / cap_per_s:.2f}" if cap_per_s else "-"
            p99 = f"{row['p99_ms']:.0f}" if row["p99_ms"] is not None else "-"
            lines.append(f"{row['label']:<24}{row['goodput_per_s']:>10.1f}{x:>8}{xc:>7}{_pct(row['slo_attainment']):>9}"
                         f"{p99:>8}{row['lost']:>6}{row['duplicated']:>5}{row['wrong']:>6}  {_mix(row)}")
        for row in shape["rows"]:
            if row.get("cpu"):
                lines.append(f"  {row['label']}: cores used / periods throttled, " + ", ".join(
                    f"{b} {c['cores']:.2f} / " + ("-" if c["throttled_share"] is None else f"{c['throttled_share']:.0%}")
                    for b, c in row["cpu"].items()))
            for code, seen in (row.get("peer_errors") or {}).items():
                lines.append(f"  {row['label']}: the peer answered {seen['items']} items {code}; the first: "
                             f"{seen['example']}")
    lines.append("")
    lines.append("targets (issue 23):")
    for t in results.get("targets", []):
        mark = {True: "held", False: "NOT held", None: "n/a"}[t["held"]]
        lines.append(f"  [{mark}] {t['target']}: {t['detail']}")
    return "\n".join(lines)
