"""Probes that measure a lab's link and CPU quota: a server in the lab's process, clients run in a board.

Why: ``edge-agent bench netlab`` and the tests must show that the shaping is real, from inside a
board's namespace and cgroup, with plain TCP (no broker in the way). :class:`ProbeServer` listens
on one port and serves three modes, picked by the first byte a client sends: ``E`` echo (round
trips), ``U`` upload (it counts what arrives and answers the rate it saw), ``D`` download (it
sends as fast as the link takes for the seconds asked). The client side is this module run as a
program, so it can run in a board (``lab.run(board, [python, -m, edge_lab.netprobe, ...])``); it
prints one JSON line:

- ``ping HOST PORT [--count N] [--size B]``: round trips of a B-byte message; ``rtt_ms`` list,
  ``p50_ms``, ``p99_ms``.
- ``upload HOST PORT [--seconds S]`` / ``download HOST PORT [--seconds S]``: ``mbit`` measured at
  the receiving end over the transfer after its first ``--warmup`` seconds (tbf's burst and TCP's
  start would inflate or deflate it), ``bytes``, ``seconds``.
- ``busy [--seconds S]``: a busy loop's CPU seconds per wall second (``share`` of a core).
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import threading
import time

__all__ = ["ProbeServer", "main", "percentile"]

_CHUNK = 64 * 1024


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of ``values``, nearest rank; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))]


def _nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def _rate(marks: list[tuple[float, int]], warmup: float) -> tuple[float, int, float]:
    """(Mbit/s, bytes, seconds) from ``warmup`` seconds after the first arrival to the last.

    The window starts at that instant, not at the first arrival after it: when the receiver
    stalls across it (a busy 2-core machine), what piled up in buffers meanwhile arrives as a
    burst, and a window opened after the stall would count the burst but not the time it took
    to build (12.1 Mbit/s read on a 10 Mbit/s link in CI)."""
    if len(marks) < 2:
        return 0.0, 0, 0.0
    start_t = marks[0][0] + warmup
    before = [m for m in marks if m[0] <= start_t]
    first = (start_t, before[-1][1]) if before and start_t < marks[-1][0] else marks[0]
    last = marks[-1]
    seconds = last[0] - first[0]
    nbytes = last[1] - first[1]
    return (nbytes * 8 / seconds / 1e6 if seconds > 0 else 0.0), nbytes, seconds


class ProbeServer:
    """The probes' server, on ``host`` (port 0: a free one), one thread per connection."""

    def __init__(self, host: str, port: int = 0) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(64)
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="probe-server", daemon=True)
        self._thread.start()

    def __enter__(self) -> "ProbeServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                _nodelay(conn)
                mode = _recv_exact(conn, 1)
                if mode == b"E":
                    while True:
                        data = conn.recv(_CHUNK)
                        if not data:
                            return
                        conn.sendall(data)
                elif mode == b"U":
                    warmup, = struct.unpack("!d", _recv_exact(conn, 8))
                    marks: list[tuple[float, int]] = []
                    total = 0
                    while True:
                        data = conn.recv(_CHUNK)
                        if not data:
                            break
                        total += len(data)
                        marks.append((time.monotonic(), total))
                    mbit, nbytes, seconds = _rate(marks, warmup)
                    conn.sendall(json.dumps({"mbit": mbit, "bytes": nbytes, "seconds": seconds}).encode())
                elif mode == b"D":
                    seconds, = struct.unpack("!d", _recv_exact(conn, 8))
                    block = b"\0" * _CHUNK
                    end = time.monotonic() + seconds
                    while time.monotonic() < end:
                        conn.sendall(block)
                    conn.shutdown(socket.SHUT_WR)
                    while conn.recv(_CHUNK):
                        pass
        except OSError:
            return


# ---- clients (run in a board) ------------------------------------------------------------------


def _connect(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=30)
    _nodelay(sock)
    return sock


def ping(host: str, port: int, count: int, size: int) -> dict[str, object]:
    with _connect(host, port) as sock:
        sock.sendall(b"E")
        message = b"x" * size
        rtts = []
        for _ in range(count):
            start = time.perf_counter()
            sock.sendall(message)
            _recv_exact(sock, size)
            rtts.append((time.perf_counter() - start) * 1e3)
    return {"rtt_ms": rtts, "p50_ms": percentile(rtts, 0.5), "p99_ms": percentile(rtts, 0.99)}


def upload(host: str, port: int, seconds: float, warmup: float) -> dict[str, object]:
    with _connect(host, port) as sock:
        # A small send buffer: what is queued when the time is up drains after it at the link's rate.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)
        sock.sendall(b"U" + struct.pack("!d", warmup))
        block = b"\0" * _CHUNK
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            sock.sendall(block)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while True:
            data = sock.recv(_CHUNK)
            if not data:
                break
            answer += data
    return json.loads(answer)


def download(host: str, port: int, seconds: float, warmup: float) -> dict[str, object]:
    with _connect(host, port) as sock:
        sock.sendall(b"D" + struct.pack("!d", seconds))
        marks: list[tuple[float, int]] = []
        total = 0
        end = float("inf")
        while time.monotonic() < end:
            data = sock.recv(_CHUNK)
            if not data:
                break
            if not marks:
                end = time.monotonic() + seconds   # stop on our clock: what sits in buffers is not the link
            total += len(data)
            marks.append((time.monotonic(), total))
    mbit, nbytes, secs = _rate(marks, warmup)
    return {"mbit": mbit, "bytes": nbytes, "seconds": secs}


def busy(seconds: float) -> dict[str, object]:
    start_wall, start_cpu = time.monotonic(), time.process_time()
    x = 0
    while time.monotonic() - start_wall < seconds:
        for _ in range(10_000):
            x += 1
    wall = time.monotonic() - start_wall
    return {"share": (time.process_time() - start_cpu) / wall, "seconds": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_lab.netprobe", description="link and CPU probes (one JSON line)")
    sub = parser.add_subparsers(dest="probe", required=True)
    p = sub.add_parser("ping")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--count", type=int, default=50)
    p.add_argument("--size", type=int, default=64)
    for name in ("upload", "download"):
        t = sub.add_parser(name)
        t.add_argument("host")
        t.add_argument("port", type=int)
        t.add_argument("--seconds", type=float, default=2.0)
        t.add_argument("--warmup", type=float, default=0.3)
    b = sub.add_parser("busy")
    b.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.probe == "ping":
        result = ping(args.host, args.port, args.count, args.size)
    elif args.probe == "upload":
        result = upload(args.host, args.port, args.seconds, args.warmup)
    elif args.probe == "download":
        result = download(args.host, args.port, args.seconds, args.warmup)
    else:
        result = busy(args.seconds)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
