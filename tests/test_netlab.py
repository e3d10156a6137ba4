"""The two-board lab (edge_lab.netlab) and its delaying relay (edge_lab.relay).

The relay's tests run anywhere (loopback, a real relay process). The lab's need root, iproute2 and
a cgroup CPU controller: without them they skip, saying which is missing. They check that the
shaping is real (a 10 Mbit/s tbf gives 6-11 Mbit/s each way, a 20 ms relay gives round trips of
at least 40 ms, a 0.2-core quota throttles a busy loop), that an MQTT round trip from inside the
board's namespace reaches a real Mosquitto through the relay, and that nothing is left behind:
after the ``with``, after SIGTERM / SIGINT of the owning process, and after its SIGKILL plus
``cleanup``. Tolerances are wide: this machine's CPU is shared.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from edge_lab.netlab import Lab, LabError, Link, check_support, cleanup, leftovers, wait_gone

PROBE = [sys.executable, "-m", "edge_lab.netprobe"]
_REASON = check_support()
needs_lab = pytest.mark.skipif(_REASON is not None, reason=f"network lab unavailable: {_REASON}")


# ---- the relay, on loopback ---------------------------------------------------------------------


class _Relay:
    def __init__(self, upstream: tuple[str, int], delay_ms: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edge_lab.relay", "--listen", "127.0.0.1:0", "--upstream",
             f"{upstream[0]}:{upstream[1]}", "--delay-ms", str(delay_ms), "--tag", "test"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        line = self.process.stdout.readline().split()
        assert line and line[0] == "listening", line
        host, _, port = line[1].rpartition(":")
        self.address = (host, int(port))

    def command(self, line: str) -> str:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def close(self) -> None:
        self.process.stdin.close()     # EOF on stdin: the relay exits by itself
        assert self.process.wait(timeout=10) == 0
        self.process.stdout.close()


@pytest.fixture
def upstream():
    """A listening socket the test accepts on itself."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        server.settimeout(10)
        yield server


def _client(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_probe_rate_counts_a_stall_across_the_warmup_inside_its_window():
    """A receiver that stalls across the warmup instant reads the backlog as one burst; the rate
    must still be the link's (CI read 12.1 Mbit/s on 10 when the window opened after the stall)."""
    from edge_lab.netprobe import _rate
    per_ms = 10e6 / 8 / 1000                     # 10 Mbit/s in bytes per ms
    marks = [(t / 1000, int(t * per_ms)) for t in range(0, 280, 5)]
    got = marks[-1][1]                          # stalled 280-450 ms: the backlog then comes in
    while got < 450 * per_ms:                   # 64 KiB reads a tenth of a ms apart
        got = min(got + 65536, int(450 * per_ms))
        marks.append((0.450 + len(marks) * 1e-7, got))
    marks += [(t / 1000, int(t * per_ms)) for t in range(455, 1200, 5)]
    mbit, _, seconds = _rate(marks, warmup=0.3)
    assert mbit == pytest.approx(10.0, rel=0.05)
    assert seconds == pytest.approx(1.195 - 0.3)


def test_relay_delays_each_way_and_carries_a_half_close(upstream):
    relay = _Relay(upstream.getsockname(), delay_ms=30)
    try:
        client = _client(relay.address)
        server, _ = upstream.accept()
        with client, server:
            start = time.monotonic()
            client.sendall(b"request")
            client.shutdown(socket.SHUT_WR)              # half-close: the reply must still come back
            assert _recv_all(server) == b"request"       # data, then the EOF, in order
            one_way = time.monotonic() - start
            server.sendall(b"reply" * 1000)
            server.close()
            assert _recv_all(client) == b"reply" * 1000
            round_trip = time.monotonic() - start
        assert one_way >= 0.029, one_way
        assert round_trip >= 0.059, round_trip
        stats = json.loads(relay.command("stats"))
        assert stats["bytes_up"] == len(b"request") and stats["bytes_down"] == 5000
        assert relay.command("delay 0") == "ok delay 0"
        assert relay.command("delay -5").startswith("error")
    finally:
        relay.close()


def test_relay_turns_a_reset_into_a_reset(upstream):
    relay = _Relay(upstream.getsockname(), delay_ms=10)
    try:
        client = _client(relay.address)
        server, _ = upstream.accept()
        with server:
            client.sendall(b"x")
            assert server.recv(1) == b"x"
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()                               # an RST, not a FIN
            server.settimeout(10)
            with pytest.raises(ConnectionResetError):
                while server.recv(100):
                    pass
        deadline = time.monotonic() + 5
        while json.loads(relay.command("stats"))["open"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert json.loads(relay.command("stats"))["open"] == 0
    finally:
        relay.close()


def test_relay_serves_many_connections_at_once_without_serialising_them(upstream):
    """50 clients each wait for an echo through a 100 ms relay: all done in well under 50 x 200 ms."""
    relay = _Relay(upstream.getsockname(), delay_ms=100)

    def echo() -> None:
        for _ in range(50):
            conn, _ = upstream.accept()
            threading.Thread(target=lambda c=conn: (c.sendall(c.recv(100)), c.close()), daemon=True).start()

    threading.Thread(target=echo, daemon=True).start()
    try:
        clients = [_client(relay.address) for _ in range(50)]
        start = time.monotonic()
        for i, sock in enumerate(clients):
            sock.sendall(b"%03d" % i)
        answers = [_recv_all(sock) for sock in clients]
        elapsed = time.monotonic() - start
        assert answers == [b"%03d" % i for i in range(50)]
        assert 0.19 <= elapsed < 3.0, elapsed
        for sock in clients:
            sock.close()
    finally:
        relay.close()


def test_relay_resets_a_client_when_the_upstream_refuses():
    with socket.socket() as probe:              # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        refused = probe.getsockname()
    relay = _Relay(refused, delay_ms=5)
    try:
        with _client(relay.address) as client:
            try:
                assert client.recv(10) == b""
            except ConnectionResetError:
                pass
        assert json.loads(relay.command("stats"))["open"] == 0
    finally:
        relay.close()


# ---- the lab (root) ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab():
    with Lab(board_cpu=0.2, peer_cpu=None, link=Link(mbit=10, delay_ms=20)) as built:
        yield built
    assert leftovers(built.id) == []


def _probe(lab: Lab, board: str, *args: str, cgroup: bool = False) -> dict:
    done = lab.run(board, PROBE + list(args), cgroup=cgroup, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@needs_lab
def test_shaped_link_rate_and_delay_are_real(lab):
    from edge_lab.netprobe import ProbeServer
    with ProbeServer(lab.bridge_address) as server:
        host, port = lab.forward("board", server.address)
        ping = _probe(lab, "board", "ping", host, str(port), "--count", "20")
        assert min(ping["rtt_ms"]) >= 39.0, ping["rtt_ms"]            # 2 x 20 ms, never less
        assert ping["p50_ms"] < 40 + 100, ping["p50_ms"]
        up = _probe(lab, "board", "upload", host, str(port), "--seconds", "1.2")
        down = _probe(lab, "board", "download", host, str(port), "--seconds", "1.2")
        assert 6 <= up["mbit"] <= 11, up
        assert 6 <= down["mbit"] <= 11, down
        # The peer's link is not shaped: far above 10 Mbit/s.
        assert _probe(lab, "peer", "upload", *map(str, server.address), "--seconds", "0.5")["mbit"] > 50
        lab.set_link("board", Link(mbit=10, delay_ms=5))               # re-shaped without a rebuild
        ping = _probe(lab, "board", "ping", host, str(port), "--count", "10")
        assert 9.5 <= min(ping["rtt_ms"]) and ping["p50_ms"] < 39, ping["rtt_ms"]
        lab.set_link("board", Link(mbit=10, delay_ms=20))


@needs_lab
def test_cpu_quota_throttles_a_busy_loop(lab):
    before = lab.cpu_stat("board")["nr_throttled"]
    share = _probe(lab, "board", "busy", "--seconds", "1", cgroup=True)["share"]
    assert share < 0.3, share                                         # quota 0.2 core
    assert lab.cpu_stat("board")["nr_throttled"] > before


@needs_lab
def test_mqtt_round_trip_from_the_board_through_the_relay(lab):
    host, port = lab.broker_address_for("board")
    assert (host, port) != (lab.bridge_address, lab.broker.port)      # through the relay
    script = textwrap.dedent(f"""
        import json, threading, time
        from agent.transport.paho_client import connect, make_client
        got = threading.Event()
        client = make_client("board-probe")
        client.on_message = lambda c, u, m: got.set()
        connect(client, {host!r}, {port}, timeout=10)
        client.loop_start()
        client.subscribe("lab/ping", qos=1)
        time.sleep(0.3)
        start = time.monotonic()
        client.publish("lab/ping", b"hello", qos=1)
        ok = got.wait(10)
        print(json.dumps({{"ok": ok, "rtt_ms": (time.monotonic() - start) * 1e3}}))
        client.loop_stop(); client.disconnect()
    """)
    done = lab.run("board", [sys.executable, "-c", script], timeout=60)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["ok"] and answer["rtt_ms"] >= 39.0, answer
    # The peer is not behind a relay: it reaches the broker straight.
    assert lab.broker_address_for("peer") == (lab.bridge_address, lab.broker.port)


@needs_lab
def test_spawned_process_is_in_the_board_namespace_and_cgroup(lab):
    done = lab.run("board", ["sh", "-c", "cat /proc/self/cgroup; ip -o -4 addr show"], timeout=30)
    assert f"{lab.id}-board" in done.stdout
    assert lab.address_of("board") in done.stdout
    assert lab.address_of("peer") not in done.stdout


@needs_lab
def test_bad_requests_are_refused_with_the_reason(lab):
    with pytest.raises(LabError, match="no board 'nope'"):
        lab.spawn("nope", ["true"])
    with pytest.raises(LabError, match="built without a link"):
        lab.set_link("peer", Link(mbit=1))
    with pytest.raises(ValueError, match="Link.mbit"):
        Link(mbit=-1)


@needs_lab
def test_teardown_leaves_nothing_and_stops_what_ran():
    with Lab(board_cpu=0.5, peer_cpu=1.0, link=Link(mbit=100, delay_ms=1)) as lab:
        sleeper = lab.spawn("board", ["sh", "-c", "sleep 60 & sleep 60"])   # a child of the child too
        time.sleep(0.2)
        pids = [sleeper.pid, lab.broker.pid, *lab.relay_pids()]
        assert leftovers(lab.id)
    assert leftovers(lab.id) == []
    assert wait_gone(pids, 5)
    lab.close()                                                      # idempotent


_OWNER = textwrap.dedent("""
    import signal, sys, time
    from edge_lab.netlab import Lab, Link
    # Ctrl-C as at a terminal: a process started in the background by a non-interactive shell
    # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt for it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with Lab(board_cpu=0.5, peer_cpu=1.0, link=Link(mbit=50, delay_ms=5), stop_timeout_s=2.0) as lab:
        # "stubborn": the board's process ignores SIGTERM, so the teardown waits 2 s before SIGKILL
        command = "trap '' TERM; sleep 60" if sys.argv[1:] == ["stubborn"] else "sleep 60"
        child = lab.spawn("board", ["sh", "-c", command])
        print(lab.id, child.pid, lab.broker.pid, *lab.relay_pids(), flush=True)
        while True:
            time.sleep(0.1)
""")


def _owner(*args: str) -> tuple[subprocess.Popen, str, list[int]]:
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    words = owner.stdout.readline().split()
    assert words, "the owning process did not build its lab"
    return owner, words[0], [int(w) for w in words[1:]]


@needs_lab
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_owner_tears_the_lab_down(signum):
    owner, lab_id, pids = _owner()
    assert leftovers(lab_id)
    owner.send_signal(signum)
    owner.wait(timeout=20)
    assert leftovers(lab_id) == []
    assert wait_gone(pids, 5)


@needs_lab
def test_a_second_signal_during_the_teardown_does_not_cut_it_short():
    owner, lab_id, pids = _owner("stubborn")
    time.sleep(0.5)                                     # the board's shell has set its trap by now
    owner.send_signal(signal.SIGTERM)
    time.sleep(0.5)                                     # the teardown now waits for the stubborn process
    assert owner.poll() is None
    owner.send_signal(signal.SIGINT)                    # a second Ctrl-C, impatient
    owner.wait(timeout=20)
    assert "KeyboardInterrupt" in owner.stderr.read()   # held until the teardown ended, then raised
    assert leftovers(lab_id) == []
    assert wait_gone(pids, 5)


@needs_lab
def test_cleanup_after_the_owner_is_killed():
    owner, lab_id, pids = _owner()
    owner.kill()                                        # SIGKILL: no teardown ran
    owner.wait(timeout=10)
    left = leftovers(lab_id)
    assert any(item.startswith("netns") for item in left) and any(item.startswith("cgroup") for item in left)
    removed = cleanup(lab_id)
    assert any(item.startswith("link") for item in removed)
    assert leftovers(lab_id) == []
    assert wait_gone(pids, 5)                            # the board's process, the broker, the relay
    assert cleanup(lab_id) == []                         # idempotent
