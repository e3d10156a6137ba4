"""A delaying TCP proxy: adds a fixed one-way delay in each direction, as a slow link would.

Why: this machine's kernel has no netem, so ``tc`` can shape a link's rate (tbf, in
:mod:`edge_lab.netlab`) but not its delay. The lab puts this relay in front of the broker: a board
connects to the relay, the relay to the broker, and every chunk read on one side is written to the
other ``delay`` seconds after it arrived.

How, so that delay does not cost throughput: each direction of each connection keeps a FIFO of
``(release time, bytes)``; one timer per direction releases every chunk whose time has come, in
order, and re-arms for the next one. Nothing sleeps per chunk or per connection, so a stream keeps
its rate (what is in flight inside the relay is rate x delay, like a real pipe), and any number of
connections share one event loop. TCP_NODELAY on both sockets: a small MQTT packet leaves at once.
Back-pressure: a side whose queue holds more than ``max_queued_bytes``, or whose destination's
socket buffer is full, stops reading until it drains. A half-close (FIN) travels in order behind
the data, delayed like it; a reset (or a failed upstream connect) becomes a reset on the other
side after the delay (SO_LINGER 0), and what was still queued is dropped, as a real RST drops it.

The relay's own legs have no kernel delay, so TCP's windows open at loopback speed on each leg:
the delay here is added latency, not a larger bandwidth-delay product. Good enough for request and
tensor latency; not a model of TCP's behaviour on a long fat pipe.

Run it as a process of its own (the lab does): ``python -m edge_lab.relay --listen HOST:PORT
--upstream HOST:PORT --delay-ms D [--tag T]``. It prints ``listening HOST:PORT`` once bound (port 0
picks one), then reads commands on stdin: ``delay MS`` (applies to what arrives from then on; it
answers ``ok delay MS``) and ``stats`` (answers one JSON line: connections, bytes each way, CPU
seconds). It exits on SIGTERM, SIGINT, or when stdin closes: a relay never outlives the lab
that started it, even one killed by SIGKILL. ``--tag`` is only there to be seen in its command
line, so :func:`edge_lab.netlab.cleanup` can find a relay left over.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import resource
import signal
import socket
import struct
import sys
from typing import Deque

__all__ = ["Relay", "main"]

_EOF = object()      # queue markers: a half-close, a reset
_RESET = object()


def _set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def _reset(transport: asyncio.BaseTransport | None) -> None:
    """Close with an RST instead of a FIN (SO_LINGER 0), as the other side's reset did."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


class _Direction:
    """One direction of one connection: chunks read from ``source``, released to ``dest`` after the delay."""

    def __init__(self, relay: "Relay", name: str) -> None:
        self.relay = relay
        self.name = name                     # "up" (client -> upstream) or "down"
        self.queue: Deque[tuple[float, object]] = collections.deque()
        self.queued_bytes = 0
        self.timer: asyncio.TimerHandle | None = None
        self.source: "_Side | None" = None
        self.dest: "_Side | None" = None
        self.done = False                    # EOF or reset delivered

    def push(self, item: object) -> None:
        loop = self.relay.loop
        self.queue.append((loop.time() + self.relay.delay_s, item))
        if isinstance(item, (bytes, bytearray)):
            self.queued_bytes += len(item)
            if self.queued_bytes > self.relay.max_queued_bytes and self.source is not None:
                self.source.pause("queue")
        self.arm()

    def arm(self) -> None:
        if self.timer is None and self.queue and self.dest is not None and self.dest.transport is not None:
            self.timer = self.relay.loop.call_at(self.queue[0][0], self.release)

    def release(self) -> None:
        self.timer = None
        dest = self.dest
        if dest is None or dest.transport is None:
            return
        now = self.relay.loop.time()
        parts: list[bytes] = []
        while self.queue and self.queue[0][0] <= now:
            _, item = self.queue.popleft()
            if isinstance(item, (bytes, bytearray)):
                parts.append(item)
                self.queued_bytes -= len(item)
                continue
            if parts:
                self._write(dest, parts)
                parts = []
            if item is _EOF:
                self.done = True
                if not dest.transport.is_closing() and dest.transport.can_write_eof():
                    dest.transport.write_eof()
                dest.conn.maybe_close()
            elif item is _RESET:
                self.done = True
                dest.conn.reset_both()
                return
        if parts:
            self._write(dest, parts)
        if self.source is not None and self.queued_bytes <= self.relay.max_queued_bytes // 2:
            self.source.resume("queue")
        self.arm()

    def _write(self, dest: "_Side", parts: list[bytes]) -> None:
        data = b"".join(parts) if len(parts) > 1 else parts[0]
        if dest.transport is not None and not dest.transport.is_closing():
            self.relay.bytes[self.name] += len(data)
            dest.transport.write(data)

    def drop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()
        self.queued_bytes = 0


class _Side(asyncio.Protocol):
    """One socket of a relayed connection (the accepted client or the upstream)."""

    def __init__(self, conn: "_Connection", inbound: _Direction, outbound: _Direction) -> None:
        self.conn = conn
        self.inbound = inbound      # what this side reads goes here
        self.outbound = outbound    # what this side writes comes from here
        self.transport: asyncio.Transport | None = None
        self.paused_for: set[str] = set()
        self.closed = False

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _set_nodelay(transport)
        self.outbound.arm()

    def data_received(self, data: bytes) -> None:
        self.inbound.push(data)

    def eof_received(self) -> bool:
        self.inbound.push(_EOF)
        return True                 # keep the socket open: the other direction may still flow

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.conn.closing and (exc is not None or not self.inbound.done):
            # A reset (even after this side's FIN: its peer reset us when we wrote to it), or a close
            # we did not ask for before EOF: reset the other side, after the delay, like a real RST.
            self._forget_outbound()
            self.inbound.push(_RESET)
        self.conn.maybe_close()

    def _forget_outbound(self) -> None:
        """This side is gone: what was queued for it goes nowhere, and its source need not wait."""
        self.outbound.drop()
        if self.outbound.source is not None:
            self.outbound.source.resume("dest")
            self.outbound.source.resume("queue")

    def pause_writing(self) -> None:
        other = self.outbound.source
        if other is not None:
            other.pause("dest")

    def resume_writing(self) -> None:
        other = self.outbound.source
        if other is not None:
            other.resume("dest")

    # flow control
    def pause(self, why: str) -> None:
        if not self.paused_for and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self.paused_for.add(why)

    def resume(self, why: str) -> None:
        if why in self.paused_for:
            self.paused_for.discard(why)
            if not self.paused_for and self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()


class _Connection:
    def __init__(self, relay: "Relay") -> None:
        self.relay = relay
        self.closing = False
        self.up = _Direction(relay, "up")
        self.down = _Direction(relay, "down")
        self.client = _Side(self, self.up, self.down)
        self.upstream = _Side(self, self.down, self.up)
        self.up.source, self.up.dest = self.client, self.upstream
        self.down.source, self.down.dest = self.upstream, self.client

    async def connect_upstream(self) -> None:
        host, port = self.relay.upstream
        try:
            await self.relay.loop.create_connection(lambda: self.upstream, host, port)
        except OSError:
            self.down.push(_RESET)  # the client sees a reset, after the delay, like a refused connect
            self.down.dest = self.client
            self.upstream.closed = True
            self.down.arm()

    def maybe_close(self) -> None:
        """Close both sockets once both directions delivered their EOF (or a side is gone)."""
        if self.closing:
            return
        if (self.up.done and self.down.done) or (self.client.closed and self.upstream.closed):
            self._close()

    def reset_both(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.up.drop()
        self.down.drop()
        _reset(self.client.transport)
        _reset(self.upstream.transport)
        self.relay.connections.discard(self)

    def _close(self) -> None:
        self.closing = True
        self.up.drop()
        self.down.drop()
        for side in (self.client, self.upstream):
            if side.transport is not None and not side.transport.is_closing():
                side.transport.close()
        self.relay.connections.discard(self)


class Relay:
    """The relay's state inside its event loop (one per process; see the module docstring)."""

    def __init__(self, upstream: tuple[str, int], delay_s: float, *, max_queued_bytes: int = 32 << 20) -> None:
        if delay_s < 0:
            raise ValueError(f"delay = {delay_s!r} s: expected >= 0")
        self.upstream = upstream
        self.delay_s = delay_s
        self.max_queued_bytes = max_queued_bytes
        self.loop = asyncio.get_running_loop()
        self.connections: set[_Connection] = set()
        self.accepted = 0
        self.bytes = {"up": 0, "down": 0}

    def accept(self) -> asyncio.Protocol:
        conn = _Connection(self)
        self.connections.add(conn)
        self.accepted += 1
        self.loop.create_task(conn.connect_upstream())
        return conn.client

    def stats(self) -> dict[str, object]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {"accepted": self.accepted, "open": len(self.connections), "bytes_up": self.bytes["up"],
                "bytes_down": self.bytes["down"], "cpu_s": usage.ru_utime + usage.ru_stime,
                "delay_ms": self.delay_s * 1e3}


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host, int(port)


def _delay_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of milliseconds") from None
    if not 0 <= value <= 60_000:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0..60000 ms")
    return value


async def _serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    relay = Relay(args.upstream, args.delay_ms / 1e3)
    server = await loop.create_server(relay.accept, args.listen[0], args.listen[1], backlog=1024,
                                      reuse_address=True)
    host, port = server.sockets[0].getsockname()[:2]
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)     # runs in the loop, not in the signal handler
    out = sys.stdout

    def say(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    say(f"listening {host}:{port}")
    reader = asyncio.StreamReader()
    if not args.ignore_stdin:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def commands() -> None:
        if args.ignore_stdin:
            return
        while True:
            line = await reader.readline()
            if not line:
                break                       # the lab is gone: so are we
            words = line.decode(errors="replace").split()
            if not words:
                continue
            if words[0] == "delay" and len(words) == 2:
                try:
                    relay.delay_s = _delay_ms(words[1]) / 1e3
                except argparse.ArgumentTypeError as exc:
                    say(f"error delay {exc}")
                    continue
                say(f"ok delay {relay.delay_s * 1e3:g}")
            elif words[0] == "stats":
                say(json.dumps(relay.stats()))
            else:
                say(f"error unknown command {line.decode(errors='replace').strip()!r}: "
                    "expected `delay MS` or `stats`")
        stop.set()

    task = loop.create_task(commands())
    await stop.wait()
    task.cancel()
    server.close()
    for conn in list(relay.connections):
        conn.reset_both()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_lab.relay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=_address, required=True, help="HOST:PORT to accept on (port 0: any)")
    parser.add_argument("--upstream", type=_address, required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay-ms", type=_delay_ms, default=0.0, help="one-way delay added each way")
    parser.add_argument("--ignore-stdin", action="store_true",
                        help="no commands on stdin, and run until a signal (by hand, not from the lab)")
    parser.add_argument("--tag", default="", help="a label for cleanup to find this process by")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except OSError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
