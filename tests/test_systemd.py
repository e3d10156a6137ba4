"""systemd: the notification protocol on a real AF_UNIX datagram socket, ``edge-agent run`` as a
real child process under it (READY, STATUS, WATCHDOG from the scheduler's progress, STOPPING, a
degraded start), a stalled scheduler that stops the pings, ``edge-agent service install`` and
``systemd-analyze verify`` on the unit.

systemd is not PID 1 here: the tests play the manager's part, binding the socket that
``$NOTIFY_SOCKET`` names and reading what the agent sends.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from agent.config import ConfigError, parse_config
from agent.ops.notify import Notifier, notify_address, watchdog_interval
from agent.ops.supervisor import ProgressWatchdog
from agent.ops.systemd import JETSON_NODES, board_devices, render_unit

ROOT = Path(__file__).resolve().parents[1]
CHILD = ROOT / "tests" / "systemd_child.py"
UNIT = ROOT / "firmware_configs" / "systemd" / "edge-agent.service"
WATCHDOG_USEC = 3_000_000            # pings every 1.5 s: above the live loop's 1 s idle wake-up
PING_S = WATCHDOG_USEC / 2e6


class Manager:
    """The service manager's end: a bound AF_UNIX datagram socket and what arrived, timestamped."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._open = True
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while self._open:
            try:
                data = self.sock.recv(65536)
            except (socket.timeout, OSError):
                continue
            with self._lock:
                self.messages.append((time.monotonic(), data.decode()))

    def received(self, since: float = 0.0) -> list[tuple[float, str]]:
        with self._lock:
            return [(t, m) for t, m in self.messages if t >= since]

    def wait_for(self, predicate, timeout: float, since: float = 0.0) -> tuple[float, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, message in self.received(since):
                if predicate(message):
                    return t, message
            time.sleep(0.05)
        raise AssertionError(f"no such notification within {timeout} s; got {[m for _, m in self.received()]}")

    def close(self) -> None:
        self._open = False
        self._thread.join()
        self.sock.close()


def lines(message: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.split("\n"))


def is_ping(message: str) -> bool:
    return message == "WATCHDOG=1"


def status_of(message: str) -> str | None:
    return lines(message).get("STATUS")


def write_config(tmp_path: Path, mqtt: dict, **agent_fields) -> Path:
    agent = {"device": "systemd-board", "workers": 2, **agent_fields}
    text = ["config_version = 1", "[agent]", *(f"{k} = {json.dumps(v)}" for k, v in agent.items()),
            "[mqtt]", *(f"{k} = {json.dumps(v)}" for k, v in mqtt.items()),
            "[http]", "enabled = true", "port = 0",
            "[[models]]", 'name = "mobilenet_digits"', 'card = "demo:mobilenet_digits"',
            "[models.batching]", "max_batch = 2"]
    path = tmp_path / "agent.toml"
    path.write_text("\n".join(text) + "\n")
    return path


def start_agent(config: Path, notify_socket: str) -> subprocess.Popen:
    """``edge-agent run`` (through tests/systemd_child.py) with the environment systemd gives a
    Type=notify service with WatchdogSec: WATCHDOG_PID is the agent's own pid, as exec keeps it."""
    env = dict(os.environ, NOTIFY_SOCKET=notify_socket, WATCHDOG_USEC=str(WATCHDOG_USEC))
    return subprocess.Popen(["sh", "-c", 'WATCHDOG_PID=$$ exec "$0" "$@"', sys.executable, str(CHILD),
                             "run", "--config", str(config)],
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def http_port(status: str) -> int:
    return int(re.search(r"http://127\.0\.0\.1:(\d+)", status).group(1))


def infer_over_http(port: int, slo_ms: float = 5000) -> dict:
    body = json.dumps({"inputs": [{"name": "frames", "shape": [1, 64, 64, 3], "datatype": "UINT8",
                                   "data": [0] * (64 * 64 * 3)}], "parameters": {"slo_ms": slo_ms}}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/mobilenet_digits/infer", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.load(reply)


def stop(process: subprocess.Popen) -> tuple[int, str, str]:
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    return process.returncode, out, err


# --- the protocol ------------------------------------------------------------------------------

@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notifier_sends_one_datagram_to_a_path_or_an_abstract_socket(tmp_path, abstract):
    name = f"@edge-agent-test-{os.getpid()}" if abstract else str(tmp_path / "notify")
    manager = Manager(notify_address(name))
    try:
        notifier = Notifier({"NOTIFY_SOCKET": name})
        assert notifier.send("READY=1", "STATUS=serving m on http://x")
        _, message = manager.wait_for(lambda m: True, timeout=5)
        assert message == "READY=1\nSTATUS=serving m on http://x"
        notifier.close()
    finally:
        manager.close()


def test_notifier_without_a_socket_does_nothing_and_bad_ones_are_named():
    assert not Notifier({}).send("READY=1")
    with pytest.raises(ValueError, match="NOTIFY_SOCKET = 'relative/path'"):
        Notifier({"NOTIFY_SOCKET": "relative/path"})
    with pytest.raises(ValueError, match="KEY=VALUE"):
        Notifier({"NOTIFY_SOCKET": "/nonexistent"}).send("STATUS=two\nlines")
    # A manager that went away: the send fails quietly, the agent goes on.
    assert not Notifier({"NOTIFY_SOCKET": "/nonexistent/notify"}).send("STATUS=x")


def test_watchdog_interval_is_half_the_period_for_this_process_only():
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, pid=4242) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, pid=4242) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def test_progress_watchdog_pings_only_when_the_heartbeat_moved(tmp_path):
    manager = Manager(str(tmp_path / "notify"))
    try:
        notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
        heartbeat = [0]
        watchdog = ProgressWatchdog(notifier, 10.0, lambda: heartbeat[0], now=0.0)
        heartbeat[0] += 1
        watchdog.tick(5.0)                       # not due yet
        watchdog.tick(10.0)                      # due, and the heartbeat moved: a ping
        watchdog.tick(20.0)                      # due, no progress: withheld
        watchdog.tick(30.0)                      # still none
        heartbeat[0] += 1
        watchdog.tick(40.0)                      # progress again: a ping
        notifier.send("STATUS=end")
        manager.wait_for(lambda m: m == "STATUS=end", timeout=5)
        assert [m for _, m in manager.received()] == ["WATCHDOG=1", "WATCHDOG=1", "STATUS=end"]
    finally:
        manager.close()


def test_drain_timeout_is_validated():
    base = {"config_version": 1, "models": [{"name": "m", "card": "demo:mobilenet_digits"}]}
    assert parse_config({**base, "agent": {"drain_timeout_s": 2.5}}).drain_timeout_s == 2.5
    with pytest.raises(ConfigError, match=r"agent.drain_timeout_s = -1: expected seconds in 0..600"):
        parse_config({**base, "agent": {"drain_timeout_s": -1}})


# --- edge-agent run under a notification socket ------------------------------------------------

def test_run_notifies_ready_status_watchdog_and_stopping(tmp_path, broker):
    config = write_config(tmp_path, {"host": "127.0.0.1", "port": broker.port}, drain_timeout_s=0.5)
    manager = Manager(str(tmp_path / "notify"))
    agent = start_agent(config, str(tmp_path / "notify"))
    try:
        t_ready, ready = manager.wait_for(lambda m: "READY=1" in m, timeout=90)
        status = status_of(ready)
        assert status.startswith(f"serving mobilenet_digits on mqtt://127.0.0.1:{broker.port}, http://127.0.0.1:")
        assert "degraded" not in status
        assert any(status_of(m) and status_of(m).startswith("loading") for t, m in manager.received() if t <= t_ready)
        # Requests served show up as load and goodput in a later STATUS line.
        port = http_port(status)
        for _ in range(5):
            assert infer_over_http(port)["outputs"][0]["name"] == "logits"
        _, line = manager.wait_for(lambda m: bool(re.search(r"load [\d.]+ req/s, goodput [1-9][\d.]*/s", m)),
                                   timeout=20, since=t_ready)
        assert "100.0% in SLO" in line
        # An idle but healthy scheduler earns its pings.
        manager.wait_for(is_ping, timeout=10 * PING_S, since=t_ready)
        t_term = time.monotonic()
        code, out, err = stop(agent)
        assert code == 0, err
        _, stopping = manager.wait_for(lambda m: "STOPPING=1" in m, timeout=5, since=t_term)
        assert "up to 0.5 s" in status_of(stopping)
    finally:
        if agent.poll() is None:
            agent.kill()
        manager.close()


def test_sigterm_drains_for_the_bound_then_answers_what_is_left_and_exits(tmp_path):
    """Requests that can never be served on their own (a fixed batch of 8 that two requests never
    fill) are queued when SIGTERM comes: STOPPING=1, the drain waits its bound
    (drain_timeout_s), each queued request is answered shutting_down, and the process exits 0.
    Without the bound the drain would wait for a batch that never forms."""
    config = write_config(tmp_path, {"enabled": False}, drain_timeout_s=1.0)
    config.write_text(config.read_text().replace("max_batch = 2", 'rule = "fixed"\nsize = 8\nmax_batch = 8'))
    manager = Manager(str(tmp_path / "notify"))
    agent = start_agent(config, str(tmp_path / "notify"))
    replies: list = []

    def infer(port: int) -> None:
        try:
            replies.append(infer_over_http(port, slo_ms=120_000))
        except urllib.error.HTTPError as exc:
            replies.append(json.loads(exc.read()))

    try:
        _, ready = manager.wait_for(lambda m: "READY=1" in m, timeout=90)
        port = http_port(status_of(ready))
        senders = [threading.Thread(target=infer, args=(port,)) for _ in range(2)]
        for sender in senders:
            sender.start()
        manager.wait_for(lambda m: "; 2 queued" in (status_of(m) or ""), timeout=30)
        t_term = time.monotonic()
        code, _, err = stop(agent)
        stopped_s = time.monotonic() - t_term
        for sender in senders:
            sender.join(10)
        assert code == 0, err
        manager.wait_for(lambda m: "STOPPING=1" in m, timeout=5, since=t_term)
        assert len(replies) == 2 and all("shutting_down" in r["error"] for r in replies), replies
        assert stopped_s >= 1.0           # it served (waited) for its bound before giving up
    finally:
        if agent.poll() is None:
            agent.kill()
        manager.close()


def test_a_stalled_scheduler_stops_the_pings_while_status_goes_on(tmp_path):
    name = f"@edge-agent-test-stall-{os.getpid()}"
    manager = Manager(notify_address(name))
    agent = start_agent(write_config(tmp_path, {"enabled": False}), name)
    try:
        t_ready, _ = manager.wait_for(lambda m: "READY=1" in m, timeout=90)
        manager.wait_for(is_ping, timeout=10 * PING_S, since=t_ready)          # healthy: pings
        agent.stdin.write("stall\n")                                            # take the scheduler's lock
        agent.stdin.flush()
        t_stall = time.monotonic()
        # One ping may already be on its way (its heartbeat read before the stall); none after.
        quiet_from = t_stall + PING_S + 0.5
        time.sleep(quiet_from + 2 * PING_S - time.monotonic())
        after = manager.received(since=quiet_from)
        assert not [m for _, m in after if is_ping(m)], after
        assert sum(1 for _, m in after if (status_of(m) or "").startswith("serving")) >= 2   # the run loop lives
        agent.kill()
        _, err = agent.communicate(timeout=30)
        assert "scheduler lock taken" in err and "watchdog pings withheld" in err
    finally:
        if agent.poll() is None:
            agent.kill()
        manager.close()


def test_degraded_start_serves_http_and_says_mqtt_is_missing_until_the_broker_comes(tmp_path):
    from edge_lab.broker import LocalBroker
    with socket.socket() as probe:          # a port nothing listens on (yet)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    manager = Manager(str(tmp_path / "notify"))
    agent = start_agent(write_config(tmp_path, {"host": "127.0.0.1", "port": port}), str(tmp_path / "notify"))
    try:
        t_ready, ready = manager.wait_for(lambda m: "READY=1" in m, timeout=90)
        status = status_of(ready)
        assert status.startswith(f"degraded: mqtt broker 127.0.0.1:{port} unreachable, retrying; serving mobilenet_digits")
        assert infer_over_http(http_port(status))["outputs"]             # HTTP serves meanwhile
        with LocalBroker(port=port):
            t_broker = time.monotonic()
            manager.wait_for(lambda m: (status_of(m) or "").startswith("serving mobilenet_digits on mqtt://"),
                             timeout=60, since=t_broker)
            code, _, err = stop(agent)
        assert code == 0, err
    finally:
        if agent.poll() is None:
            agent.kill()
        manager.close()


# --- the unit and its installer ----------------------------------------------------------------

def edge_agent(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=120)


def test_shipped_unit_is_the_installers_default():
    text = UNIT.read_text()
    assert text == render_unit()
    for setting in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "NoNewPrivileges=yes",
                    "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "User=edge-agent",
                    "DevicePolicy=closed", "DeviceAllow=/dev/apex_0 rw", "DeviceAllow=/dev/nvmap rw",
                    "DeviceAllow=/dev/nvhost-ctrl-gpu rw", "DeviceAllow=char-usb_device rw"):
        assert setting in text, setting


def test_service_install_writes_unit_config_and_user_commands_and_is_idempotent(tmp_path):
    source = ROOT / "firmware_configs" / "generic-linux.toml"
    first = edge_agent("service", "install", "--root", str(tmp_path), "--config", str(source))
    assert first.returncode == 0, first.stderr
    unit = tmp_path / "etc/systemd/system/edge-agent.service"
    config = tmp_path / "etc/edge-agent/agent.toml"
    assert f"unit {unit}: written" in first.stdout and f"config {config}: written" in first.stdout
    assert config.read_text() == source.read_text()
    exec_start = re.search(r"^ExecStart=(\S+) run --config /etc/edge-agent/agent.toml$", unit.read_text(), re.M).group(1)
    assert Path(exec_start).is_file() and os.access(exec_start, os.X_OK)     # the edge-agent running this
    # A staging root: the user is not created here, its command is printed.
    assert "would run: useradd --system" in first.stdout and "not created in a --root staging tree" in first.stdout
    second = edge_agent("service", "install", "--root", str(tmp_path), "--config", str(source))
    assert second.returncode == 0, second.stderr
    assert f"unit {unit}: unchanged" in second.stdout and f"config {config}: unchanged" in second.stdout
    # An operator's edit of the config survives a reinstall; the unit is put right.
    config.write_text(config.read_text() + "# edited on the board\n")
    unit.write_text(unit.read_text().replace("WatchdogSec=30", "WatchdogSec=1"))
    third = edge_agent("service", "install", "--root", str(tmp_path), "--config", str(source))
    assert f"config {config}: kept" in third.stdout and f"unit {unit}: updated" in third.stdout
    assert config.read_text().endswith("# edited on the board\n") and "WatchdogSec=30" in unit.read_text()


def device_allows(unit_text: str) -> set[str]:
    return set(re.findall(r"^DeviceAllow=(\S+) rw$", unit_text, re.M))


@pytest.mark.parametrize("board, allowed", [
    ("jetson-orin-nano", {"/dev/nvmap", "/dev/nvhost-ctrl-gpu", "/dev/nvhost-gpu"}),
    ("coral-devboard", {"/dev/apex_0"}),
    ("rpi-coral-usb", {"char-usb_device"}),
    ("generic-x86", set()),
])
def test_service_install_allows_only_the_boards_own_accelerator_nodes(tmp_path, board, allowed):
    out = edge_agent("service", "install", "--root", str(tmp_path), "--config", board, "--dry-run")
    assert out.returncode == 0, out.stderr
    text = render_unit(devices=board_devices(board))
    nodes = device_allows(text)
    assert allowed <= nodes and "DevicePolicy=closed" in text
    others = device_allows(render_unit()) - nodes              # every other board's nodes stay shut
    assert not any(node in nodes for node in others)
    if board.startswith("jetson"):
        assert nodes == set(JETSON_NODES)
    else:
        assert nodes == allowed
    assert f"DeviceAllow: board {board}:" in out.stdout
    # Written for real: the unit on disk is that rendering.
    written = edge_agent("service", "install", "--root", str(tmp_path), "--config", board)
    assert written.returncode == 0, written.stderr
    unit = (tmp_path / "etc/systemd/system/edge-agent.service").read_text()
    assert device_allows(unit) == nodes


def test_service_install_into_a_staging_tree_without_a_board_allows_every_boards_nodes(tmp_path):
    source = ROOT / "firmware_configs" / "generic-linux.toml"
    out = edge_agent("service", "install", "--root", str(tmp_path), "--config", str(source))
    assert out.returncode == 0, out.stderr
    assert "DeviceAllow: every supported board's accelerator nodes (name the board with --board" in out.stdout
    assert device_allows((tmp_path / "etc/systemd/system/edge-agent.service").read_text()) == device_allows(UNIT.read_text())
    # On the machine itself, with a Coral plugged into a generic board: its nodes too, no others.
    fake = tmp_path / "machine"
    (fake / "dev").mkdir(parents=True)
    (fake / "dev" / "apex_0").write_text("")
    usb = fake / "sys/bus/usb/devices/1-1"
    usb.mkdir(parents=True)
    (usb / "idVendor").write_text("18d1\n")
    (usb / "idProduct").write_text("9302\n")
    assert board_devices("generic-x86", fake) == ("apex", "usb")
    assert board_devices("jetson-orin-nano", tmp_path / "empty") == ("jetson",)
    with pytest.raises(ValueError, match="board = 'pi-zero'"):
        board_devices("pi-zero")


def test_service_install_refuses_a_bad_config_before_writing(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('config_version = 1\n[[models]]\nname = "m"\ninstances = 0\n')
    out = edge_agent("service", "install", "--root", str(tmp_path / "root"), "--config", str(bad))
    assert out.returncode == 2 and "models[0].instances = 0" in out.stderr
    assert not (tmp_path / "root").exists()


def test_systemd_analyze_verifies_the_unit_cleanly(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart's binary exists: the shipped unit names /usr/local/bin/edge-agent,
    # which a development machine lacks, so a copy names the interpreter running the tests instead.
    copy = tmp_path / "edge-agent.service"
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/edge-agent", sys.executable))
    out = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.stderr == "" and out.returncode == 0, out.stderr
    for devices in ((), ("jetson",)):          # a board's own rendering: fewer DeviceAllow= lines
        one = tmp_path / "-".join(devices or ("cpu",)) / "edge-agent.service"
        one.parent.mkdir()
        one.write_text(render_unit(sys.executable, devices=devices))
        out = subprocess.run([analyze, "verify", str(one)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert out.stderr == "" and out.returncode == 0, (devices, out.stderr)
    # verify exits 0 on bad values: only stderr tells, as this control shows.
    broken = tmp_path / "broken" / "edge-agent.service"
    broken.parent.mkdir()
    broken.write_text(copy.read_text().replace("WatchdogSec=30", "WatchdogSec=soon"))
    out = subprocess.run([analyze, "verify", str(broken)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert "WatchdogSec" in out.stderr or "soon" in out.stderr
