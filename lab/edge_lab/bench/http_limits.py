"""``edge-agent bench http-limits``: the HTTP intake while thousands of connections do nothing useful.

Issue 21's attack, replayed: ``edge-agent run`` serves the demo model over HTTP in a process of its
own, started with its soft ``RLIMIT_NOFILE`` at 1,024 (the common default; ``--nofile-hard`` lowers
the hard limit too, so the agent cannot raise it and its connection bound is what holds). A second
process (its own limit raised) holds ``--connections`` connections open: half idle (connected, never
a byte), half slow (a request head that never ends, one byte a second), and reopens each one the
agent closes, as a slowloris client does. Meanwhile this process opens a new connection every
``1 / --rate`` seconds and makes one request on it, health and inference in turn, and times it from
connect to the whole reply. Printed: p50/p99/max of those new clients' latency and how many were
served (200), the connections the load held and how often the agent closed them (and with what
status), the agent's descriptor count at its peak, and the lines the agent logged over the run.
"""
from __future__ import annotations

import json
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODEL = "mobilenet_digits"
TARGET_MS = 100.0
TARGET_LOG_LINES = 100
_SLOW_HEAD = b"GET /v2/health/live HTTP/1.1\r\nHost: slow\r\nX-Slow: " + b"a" * 1_000_000


def _raise_own_limit(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard == resource.RLIM_INFINITY else min(hard, max(soft, want))
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def hold_connections(port: int, count: int) -> None:
    """The load process: hold ``count`` connections (half idle, half slow) until a line on stdin,
    reopening each one the server closes; then print what happened as JSON."""
    _raise_own_limit(count + 256)
    selector = selectors.DefaultSelector()
    stats = {"opened": 0, "closed_by_server": 0, "statuses": {}, "open_failures": 0}
    slow: dict[socket.socket, int] = {}            # slow connection -> bytes of its head sent

    def open_one(is_slow: bool) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex(("127.0.0.1", port))
        if err not in (0, 115):                    # EINPROGRESS
            sock.close()
            stats["open_failures"] += 1
            return
        selector.register(sock, selectors.EVENT_READ, is_slow)
        if is_slow:
            slow[sock] = 0
        stats["opened"] += 1

    for k in range(count):
        open_one(k % 2 == 1)
    print(f"held {count}", flush=True)
    selector.register(sys.stdin, selectors.EVENT_READ, "stop")
    next_tick = time.monotonic() + 1.0
    while True:
        for key, _ in selector.select(timeout=max(0.0, next_tick - time.monotonic())):
            if key.data == "stop":
                print(json.dumps(stats), flush=True)
                return
            sock = key.fileobj
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if data:
                status = data.split(b"\r\n", 1)[0].decode("latin-1", "replace")
                stats["statuses"][status] = stats["statuses"].get(status, 0) + 1
                continue
            stats["closed_by_server"] += 1     # closed (or reset): reopen, as a slowloris client does
            selector.unregister(sock)
            was_slow = slow.pop(sock, None) is not None
            sock.close()
            open_one(was_slow)
        if time.monotonic() >= next_tick:       # one more byte of each slow head
            next_tick += 1.0
            for sock, sent in list(slow.items()):
                try:
                    if sock.send(_SLOW_HEAD[sent:sent + 1]) == 1:
                        slow[sock] = sent + 1
                except OSError:                  # not connected yet, or closed: the read side reopens it
                    pass


def _agent_config(directory: Path, max_connections: int | None) -> Path:
    path = directory / "agent.toml"
    http = f"\n[http]\nmax_connections = {max_connections}\n" if max_connections else "\n"
    path.write_text(f'config_version = 1\n[agent]\ndevice = "bench-http-limits"\nworkers = 1\n{http}'
                    f'[[models]]\nname = "{MODEL}"\ncard = "demo:{MODEL}"\n')
    return path


def _start_agent(config: Path, log_path: Path, nofile: int, nofile_hard: int | None) -> tuple[subprocess.Popen, int]:
    def limit() -> None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1] if nofile_hard is None else nofile_hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, hard), hard))

    log_file = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config), "--no-mqtt",
                             "--http-port", "0"], stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=limit)
    log_file.close()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        text = log_path.read_text()
        if "http://127.0.0.1:" in text:
            return proc, int(text.split("http://127.0.0.1:")[1].split()[0])
        if proc.poll() is not None:
            raise RuntimeError(f"edge-agent run exited {proc.returncode}: {text}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("edge-agent run did not start serving within 180 s")


def _requests(port: int) -> dict[str, bytes]:
    from agent.models.digits import frames_from_digits, load_test_set
    images, _ = load_test_set()
    frame = frames_from_digits(images[:1])
    header = json.dumps({"inputs": [{"name": "frames", "shape": list(frame.shape), "datatype": "UINT8",
                                     "parameters": {"binary_data_size": frame.nbytes}}],
                         "parameters": {"slo_ms": 1000}}).encode()
    body = header + frame.tobytes()
    return {
        "health": b"GET /v2/health/ready HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n",
        "infer": (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n"
                  f"Content-Length: {len(body)}\r\nInference-Header-Content-Length: {len(header)}\r\n\r\n").encode()
                 + body,
    }


def _one_request(port: int, request: bytes, timeout_s: float = 5.0) -> tuple[float, str]:
    """A new client: connect, send, read the reply to its end; seconds taken and the status line."""
    t0 = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(request)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except OSError as exc:
        return time.perf_counter() - t0, f"error: {type(exc).__name__}"
    data = b"".join(chunks)
    return time.perf_counter() - t0, data.split(b"\r\n", 1)[0].decode("latin-1") if data else "closed, no reply"


def _fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def run_http_limits(connections: int = 2000, duration_s: float = 20.0, rate: float = 50.0, nofile: int = 1024,
                    nofile_hard: int | None = None, max_connections: int | None = None) -> dict:
    """Start the agent and the load process, time new clients for ``duration_s``, stop both."""
    _raise_own_limit(256)
    with tempfile.TemporaryDirectory(prefix="bench-http-limits-") as tmp:
        directory = Path(tmp)
        log_path = directory / "agent.log"
        agent, port = _start_agent(_agent_config(directory, max_connections), log_path, nofile, nofile_hard)
        limits = Path(f"/proc/{agent.pid}/limits").read_text()
        agent_nofile = next((line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files")),
                            ["?", "?"])
        load = None
        try:
            requests = _requests(port)
            _one_request(port, requests["infer"])       # warm the model's path before the load
            load = subprocess.Popen([sys.executable, "-c", "import sys; from edge_lab.bench.http_limits import "
                                     "hold_connections; hold_connections(int(sys.argv[1]), int(sys.argv[2]))",
                                     str(port), str(connections)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert load.stdout.readline().startswith("held"), "the load process did not start"
            time.sleep(1.0)                              # the agent accepts them
            peak_fds = _fd_count(agent.pid)
            kinds = list(requests)
            samples: dict[str, list[float]] = {k: [] for k in kinds}
            statuses: dict[str, int] = {}
            start = time.monotonic()
            k = 0
            while time.monotonic() - start < duration_s:
                kind = kinds[k % len(kinds)]
                seconds, status = _one_request(port, requests[kind])
                samples[kind].append(seconds)
                statuses[status] = statuses.get(status, 0) + 1
                k += 1
                if k % 25 == 0:
                    peak_fds = max(peak_fds, _fd_count(agent.pid))
                time.sleep(max(0.0, start + k / rate - time.monotonic()))
            load.stdin.write("stop\n")
            load.stdin.flush()
            load_stats = json.loads(load.stdout.readline())
        finally:
            if load is not None and load.poll() is None:
                load.kill()
                load.wait()
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(timeout=60)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        log_lines = log_path.read_text().splitlines()
    rows = {}
    for kind, values in samples.items():
        ms = np.array(values) * 1000.0
        rows[kind] = {"n": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                      "max_ms": float(ms.max())}
    return {"connections": connections, "duration_s": duration_s, "agent_nofile": agent_nofile,
            "agent_peak_fds": peak_fds, "new_clients": rows, "statuses": statuses, "load": load_stats,
            "agent_exit": agent.returncode, "log_lines": len(log_lines),
            "log_head": [line for line in log_lines if "WARNING" in line or "ERROR" in line][:5]}


def format_http_limits(results: dict) -> str:
    soft, hard = results["agent_nofile"]
    load = results["load"]
    served = results["statuses"].get("HTTP/1.1 200 OK", 0)
    total = sum(results["statuses"].values())
    p99 = max(row["p99_ms"] for row in results["new_clients"].values())
    worst = max(row["max_ms"] for row in results["new_clients"].values())
    lines = [
        f"edge-agent bench http-limits: {results['connections']} idle/slow connections held by a second process "
        f"for {results['duration_s']:g} s",
        f"agent process: open-file limit at start 1024 soft, now {soft} soft / {hard} hard; "
        f"peak descriptors {results['agent_peak_fds']}",
        f"load process: {load['opened']} connections opened, {load['closed_by_server']} closed by the agent "
        f"(then reopened), {load['open_failures']} failed to open; replies they got: "
        f"{json.dumps(load['statuses']) if load['statuses'] else 'none'}",
        f"new clients (a fresh connection each, connect to whole reply): {served}/{total} served 200",
    ]
    others = {s: n for s, n in results["statuses"].items() if s != "HTTP/1.1 200 OK"}
    if others:
        lines.append(f"  not served: {json.dumps(others)}")
    lines.append(f"  {'request':8s} {'n':>5s} {'p50 ms':>8s} {'p99 ms':>8s} {'max ms':>8s}")
    for kind, row in results["new_clients"].items():
        lines.append(f"  {kind:8s} {row['n']:5d} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} {row['max_ms']:8.2f}")
    lines.append(f"agent log: {results['log_lines']} lines over the run (exit {results['agent_exit']})")
    for line in results["log_head"]:
        lines.append(f"  {line[:200]}")
    verdict = served == total and p99 <= TARGET_MS and results["log_lines"] < TARGET_LOG_LINES
    lines.append(f"target (every new client served, p99 within {TARGET_MS:g} ms, agent log under {TARGET_LOG_LINES} "
                 f"lines): {'held' if verdict else 'MISSED'} (p99 {p99:.1f} ms, worst {worst:.1f} ms)")
    return "\n".join(lines)
