"""Two (or more) boards on one machine: a network namespace, a CPU quota and a shaped link each.

Why: collaborative offload (issue 23) needs a board short of compute, a faster peer, and a link
between them with a bandwidth and a delay, and this machine has one kernel, two cores and no
netem. So each board is a network namespace (its own interfaces and addresses) in a cgroup with a
CPU quota; the link is a veth pair whose two ends each carry a ``tc`` tbf (the rate, one per
direction), and the delay is added by :mod:`edge_lab.relay`, a delaying TCP proxy, a process of
its own, in front of the broker.

Layout of one lab (``<id>``: six hex digits, new per lab, so two labs or a stale leftover never
collide)::

    root namespace                                   namespace ealab-<id>-board (cgroup, quota)
      bridge eal<id>br 10.231.N.1/24  --veth eal<id>0h ==== eal<id>0n 10.231.N.2  (tbf both ends)
        Mosquitto on 10.231.N.1:<port>               namespace ealab-<id>-peer (cgroup, quota)
        relay 10.231.N.1:<p0> -> broker  --veth eal<id>1h ==== eal<id>1n 10.231.N.3
        (relays, broker: cgroup ealab-<id>-infra, no quota)

Use::

    from edge_lab.netlab import Lab, Link

    with Lab(board_cpu=0.5, peer_cpu=1.0, link=Link(mbit=100, delay_ms=10)) as lab:
        host, port = lab.broker_address_for("board")   # through the board's relay: delayed
        agent = lab.spawn("board", [sys.executable, "-m", "agent", ...], env=env)  # -> Popen
        peer = lab.spawn("peer", [...])                 # the peer reaches the broker directly
        ...
        lab.set_link("board", Link(mbit=10, delay_ms=50))   # re-shape between runs, no rebuild

``Lab(boards=[BoardSpec("board", cpu=0.5, link=Link(...)), BoardSpec("peer", cpu=1.0)])`` says
the same board by board (any number, any names). A board whose link is ``None`` is not shaped
and reaches the broker directly; a board built with a :class:`Link` gets a relay, so its delay
and rate can be changed later with :meth:`Lab.set_link`. ``lab.forward(board, (host, port))``
adds one more relay with the board's delay towards any other server (the benchmark's echo
server, an HTTP intake), and ``lab.run(board, argv)`` is ``spawn`` then wait. Everything spawned
runs in the board's namespace and cgroup, children included (the launcher joins the cgroup, then
enters the namespace, then execs).

Teardown always happens: on leaving the ``with``, at exit (atexit), and on SIGTERM or Ctrl-C (the
lab's handler only raises :class:`KeyboardInterrupt` in the main thread, so the ``with`` unwinds;
no work is done inside the handler, and a signal during the teardown is held until its end). It
kills what was spawned, the relays and the broker, then
removes the cgroups, veths, bridge and namespaces; it is idempotent. After a SIGKILL of the
owning process, :func:`cleanup` (``edge-agent bench netlab --cleanup``) removes whatever carries
the ``ealab-`` / ``eal<hex>`` names: processes in those namespaces and cgroups, relays, links,
namespaces, cgroups. The relays also exit by themselves when their owner dies (their stdin closes).

Requires root, iproute2 (``ip``, ``tc``), ``nsenter`` (util-linux), and a cgroup CPU controller:
v1 (``/sys/fs/cgroup/cpu/<group>/cpu.cfs_quota_us``) or v2 (``cpu.max``), whichever is mounted.
:func:`check_support` says what is missing, for tests to skip with that reason.
"""

from __future__ import annotations

import atexit
import dataclasses
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .broker import LocalBroker

__all__ = ["Lab", "Link", "BoardSpec", "LabError", "cleanup", "leftovers", "check_support", "cgroup_root", "PREFIX"]

#: Names of everything a lab makes start with this (namespaces, cgroups) or ``LINK_PREFIX`` + hex.
PREFIX = "ealab-"
LINK_PREFIX = "eal"
_LINK_RE = re.compile(r"^eal[0-9a-f]{6}(br|\d+[hn])$")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,15}$")
_SUBNET_BASE = "10.231"
#: tbf's smallest bucket: ten full frames. tbf cuts a GSO packet larger than its bucket into
#: segments, so the bucket need not hold one; a larger floor (two 64 KiB GSO packets) let a 10 Mbit/s
#: link carry 10.3-10.7 Mbit/s over a second, this one 9.75.
_BURST_FLOOR = 10 * 1514


class LabError(RuntimeError):
    """A lab could not be built or changed; the message names the command and what it said."""


@dataclass(frozen=True)
class Link:
    """A board's link to the broker: ``mbit`` Mbit/s each way (None: not rate-limited) and
    ``delay_ms`` added one way, each way (the round trip grows by twice that)."""

    mbit: float | None = None
    delay_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.mbit is not None and (not isinstance(self.mbit, (int, float)) or not 0.01 <= self.mbit <= 100_000):
            raise ValueError(f"Link.mbit = {self.mbit!r}: expected None or a number in 0.01..100000 (Mbit/s)")
        if not isinstance(self.delay_ms, (int, float)) or not 0 <= self.delay_ms <= 60_000:
            raise ValueError(f"Link.delay_ms = {self.delay_ms!r}: expected a number in 0..60000 (ms, one way)")

    def __str__(self) -> str:
        rate = "unlimited" if self.mbit is None else f"{self.mbit:g} Mbit/s"
        return f"{rate}, {self.delay_ms:g} ms one way"


@dataclass(frozen=True)
class BoardSpec:
    """One board: its name (``board``, ``peer``...), CPU quota in cores (None: none) and link."""

    name: str
    cpu: float | None = None
    link: Link | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(f"BoardSpec.name = {self.name!r}: expected lower-case letters, digits, _ (1-16)")
        if self.cpu is not None and (not isinstance(self.cpu, (int, float)) or not 0.01 <= self.cpu <= 1024):
            raise ValueError(f"BoardSpec.cpu = {self.cpu!r}: expected None or cores in 0.01..1024")


# ---- system helpers ----------------------------------------------------------------------------


def _sh(argv: Sequence[str], *, check: bool = True, timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]}: not installed ({exc})") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"`{' '.join(argv)}` did not finish within {timeout:g} s") from None
    if check and done.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed ({done.returncode}): {(done.stderr or done.stdout).strip()}")
    return done


@dataclass(frozen=True)
class _Cgroups:
    """Where CPU cgroups live: v1 (``cpu`` hierarchy) or v2 (unified, ``cpu.max``)."""

    root: Path
    version: int

    def path(self, name: str) -> Path:
        return self.root / name

    def create(self, name: str, cpu: float | None) -> Path:
        path = self.path(name)
        path.mkdir(exist_ok=True)
        self.set_cpu(name, cpu)
        return path

    def set_cpu(self, name: str, cpu: float | None) -> None:
        path = self.path(name)
        period = 100_000
        if self.version == 1:
            (path / "cpu.cfs_period_us").write_text(f"{period}\n")
            quota = -1 if cpu is None else max(1000, round(cpu * period))
            (path / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        else:
            quota = "max" if cpu is None else str(max(1000, round(cpu * period)))
            (path / "cpu.max").write_text(f"{quota} {period}\n")

    def procs(self, name: str) -> list[int]:
        try:
            return [int(line) for line in (self.path(name) / "cgroup.procs").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            return []

    def throttled(self, name: str) -> dict[str, int]:
        """``cpu.stat`` of the group: nr_periods, nr_throttled, throttled time (v1 ns / v2 usec)."""
        stat: dict[str, int] = {}
        try:
            for line in (self.path(name) / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if value.strip().isdigit():
                    stat[key] = int(value)
        except FileNotFoundError:
            pass
        return stat

    def remove(self, name: str, timeout: float = 5.0) -> bool:
        """Kill what is left in the group, then remove it; False if it could not be removed."""
        path = self.path(name)
        if not path.exists():
            return True
        deadline = time.monotonic() + timeout
        while True:
            for pid in self.procs(name):
                _kill(pid, signal.SIGKILL)
            try:
                path.rmdir()
                return True
            except FileNotFoundError:
                return True
            except OSError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.02)

    def names(self) -> list[str]:
        try:
            return sorted(p.name for p in self.root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))
        except FileNotFoundError:
            return []


def cgroup_root() -> _Cgroups | None:
    """The CPU cgroup hierarchy to use, or None: v1's ``cpu`` controller where mounted, else a v2
    unified hierarchy with ``cpu`` available (enabled for children here if it is not yet)."""
    for candidate in (Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/cpu,cpuacct")):
        if (candidate / "cpu.cfs_quota_us").exists():
            return _Cgroups(candidate, 1)
    unified = Path("/sys/fs/cgroup")
    controllers = unified / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        subtree = unified / "cgroup.subtree_control"
        if "cpu" not in subtree.read_text().split():
            try:
                subtree.write_text("+cpu\n")
            except OSError:
                return None
        return _Cgroups(unified, 2)
    return None


def check_support() -> str | None:
    """None when a lab can be built here, else why not (for a test's skip, or the bench's error)."""
    if os.geteuid() != 0:
        return "the network lab needs root (network namespaces, tc, cgroups)"
    for tool in ("ip", "tc", "nsenter"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian: apt-get install iproute2 util-linux)"
    if cgroup_root() is None:
        return "no cgroup CPU controller (neither v1 /sys/fs/cgroup/cpu nor v2 cpu.max) is available"
    probe = f"{PREFIX}probe-{os.getpid()}"
    done = _sh(["ip", "netns", "add", probe], check=False)
    if done.returncode != 0:
        return f"`ip netns add` does not work here: {done.stderr.strip()}"
    _sh(["ip", "netns", "del", probe], check=False)
    return None


def signal_group(process: subprocess.Popen, signum: int) -> None:
    """``signum`` to ``process``'s process group (what it spawned too), or to it alone when the
    group cannot be signalled."""
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        try:
            process.send_signal(signum)
        except ProcessLookupError:
            pass


def stop_groups(processes: list[subprocess.Popen], timeout_s: float) -> None:
    """SIGTERM each running process's group, wait for all within ``timeout_s`` together, SIGKILL
    the groups of those still running."""
    for process in processes:
        if process.poll() is None:
            signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in processes:
        try:
            process.wait(timeout=max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            signal_group(process, signal.SIGKILL)
            process.wait()


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:   # a zombie is dead for us
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []


def _tbf(dev: str, mbit: float | None, netns: str | None = None) -> None:
    """Put a tbf of ``mbit`` on ``dev``'s egress (replace what is there), or remove it (None)."""
    tc = ["tc"] + (["-n", netns] if netns else [])
    if mbit is None:
        _sh(tc + ["qdisc", "del", "dev", dev, "root"], check=False)
        return
    rate_bps = mbit * 1e6
    # Burst: what the bucket lets through at once; 5 ms at the rate (a timer tick's worth and then
    # some: below that tbf cannot reach its rate), at least _BURST_FLOOR.
    burst = max(_BURST_FLOOR, int(rate_bps / 8 * 0.005))
    # Queue: 50 ms at the rate, at least the burst: enough that TCP reaches the rate, bounded so a
    # bulk transfer adds at most about 50 ms of queueing to a small message behind it.
    limit = max(burst + 3000, int(rate_bps / 8 * 0.05))
    _sh(tc + ["qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{int(rate_bps)}bit",
              "burst", str(burst), "limit", str(limit)])


# ---- the lab -----------------------------------------------------------------------------------


@dataclass
class _Board:
    spec: BoardSpec
    index: int
    netns: str
    cgroup: str
    host_dev: str
    ns_dev: str
    address: str
    link: Link | None
    relays: list["_RelayProc"] = dataclasses.field(default_factory=list)


class _RelayProc:
    """A relay process (edge_lab.relay) and the pipe that commands it."""

    def __init__(self, lab: "Lab", listen_host: str, upstream: tuple[str, int], delay_ms: float,
                 cgroup: str | None) -> None:
        self.upstream = upstream
        argv = [sys.executable, "-m", "edge_lab.relay", "--listen", f"{listen_host}:0",
                "--upstream", f"{upstream[0]}:{upstream[1]}", "--delay-ms", f"{delay_ms:g}",
                "--tag", lab.id]
        self.process = lab._launch(argv, netns=None, cgroup=cgroup, stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self._lock = threading.Lock()
        line = self._read_line(10.0)
        if not line.startswith("listening "):
            self.stop()
            raise LabError(f"relay to {upstream[0]}:{upstream[1]} did not start: {line or 'no output'}")
        host, _, port = line.split()[1].rpartition(":")
        self.address = (host, int(port))

    def _read_line(self, timeout: float) -> str:
        assert self.process.stdout is not None
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        return result[0].strip() if result else ""

    def command(self, line: str, timeout: float = 10.0) -> str:
        with self._lock:
            if self.process.poll() is not None:
                raise LabError(f"relay {self.address} exited ({self.process.returncode})")
            assert self.process.stdin is not None
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
            answer = self._read_line(timeout)
        if not answer or answer.startswith("error"):
            raise LabError(f"relay {self.address}: `{line}` -> {answer or 'no answer'}")
        return answer

    def stop(self) -> None:
        process = self.process
        if process.poll() is None:
            try:
                if process.stdin is not None:
                    process.stdin.close()    # the relay exits on EOF
            except OSError:
                pass
            try:
                process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for stream in (process.stdin, process.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass


class Lab:
    """Builds the boards, the broker and the relays; a context manager (module docstring)."""

    def __init__(self, boards: Sequence[BoardSpec] | None = None, *, board_cpu: float | None = 0.5,
                 peer_cpu: float | None = 1.0, link: Link | None = Link(mbit=100, delay_ms=10),
                 peer_link: Link | None = None, broker: bool = True, stop_timeout_s: float = 3.0) -> None:
        if boards is None:
            boards = [BoardSpec("board", board_cpu, link), BoardSpec("peer", peer_cpu, peer_link)]
        boards = list(boards)
        if not boards or len({b.name for b in boards}) != len(boards):
            raise ValueError(f"boards = {[b.name for b in boards]}: expected at least one, names unique")
        if len(boards) > 200:
            raise ValueError(f"{len(boards)} boards: at most 200")
        self.specs = boards
        self.want_broker = broker
        self.stop_timeout_s = stop_timeout_s   # SIGTERM to what was spawned, then SIGKILL after this
        self.id = PREFIX + secrets.token_hex(3)
        self._hex = self.id[len(PREFIX):]
        self.boards: dict[str, _Board] = {}
        self.broker: LocalBroker | None = None
        self.bridge = f"{LINK_PREFIX}{self._hex}br"
        self.bridge_address = ""
        self.infra_cgroup = f"{self.id}-infra"
        self._cgroups: _Cgroups | None = None
        self._spawned: list[subprocess.Popen] = []
        self._netns: list[str] = []
        self._links: list[str] = []
        self._made_cgroups: list[str] = []
        self._closed = False
        self._closing = False
        self._started = False
        self._old_handlers: dict[int, object] = {}
        self._deferred_signal: int | None = None

    # ---- building ------------------------------------------------------------------------

    def __enter__(self) -> "Lab":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> "Lab":
        """Build everything (see the module docstring); on failure, tear down what was built."""
        if self._started:
            return self
        reason = check_support()
        if reason is not None:
            raise LabError(f"cannot build the network lab: {reason}")
        self._started = True
        atexit.register(self.close)
        self._install_signals()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        self._cgroups = cgroup_root()
        assert self._cgroups is not None
        network = self._pick_subnet()
        hosts = list(network.hosts())
        self.bridge_address = str(hosts[0])
        _sh(["ip", "link", "add", self.bridge, "type", "bridge"])
        self._links.append(self.bridge)
        _sh(["ip", "addr", "add", f"{self.bridge_address}/{network.prefixlen}", "dev", self.bridge])
        _sh(["ip", "link", "set", self.bridge, "up"])
        self._cgroups.create(self.infra_cgroup, None)
        self._made_cgroups.append(self.infra_cgroup)
        for index, spec in enumerate(self.specs):
            board = _Board(spec, index, netns=f"{self.id}-{spec.name}", cgroup=f"{self.id}-{spec.name}",
                           host_dev=f"{LINK_PREFIX}{self._hex}{index}h", ns_dev=f"{LINK_PREFIX}{self._hex}{index}n",
                           address=str(hosts[index + 1]), link=spec.link)
            self.boards[spec.name] = board
            _sh(["ip", "netns", "add", board.netns])
            self._netns.append(board.netns)
            _sh(["ip", "link", "add", board.host_dev, "type", "veth", "peer", "name", board.ns_dev])
            self._links.append(board.host_dev)
            _sh(["ip", "link", "set", board.ns_dev, "netns", board.netns])
            _sh(["ip", "link", "set", board.host_dev, "master", self.bridge])
            _sh(["ip", "link", "set", board.host_dev, "up"])
            _sh(["ip", "-n", board.netns, "addr", "add", f"{board.address}/{network.prefixlen}", "dev", board.ns_dev])
            _sh(["ip", "-n", board.netns, "link", "set", board.ns_dev, "up"])
            _sh(["ip", "-n", board.netns, "link", "set", "lo", "up"])
            _sh(["ip", "-n", board.netns, "route", "add", "default", "via", self.bridge_address])
            self._cgroups.create(board.cgroup, spec.cpu)
            self._made_cgroups.append(board.cgroup)
            if spec.link is not None:
                self._shape(board, spec.link)
        if self.want_broker:
            self.broker = LocalBroker(host=self.bridge_address)
            self.broker.start()
            self._cgroups_join(self.infra_cgroup, self.broker.pid)
            for board in self.boards.values():
                if board.link is not None:
                    board.relays.append(self._relay(board, (self.bridge_address, self.broker.port)))

    def _pick_subnet(self) -> ipaddress.IPv4Network:
        used = _sh(["ip", "-4", "-o", "addr", "show"]).stdout + _sh(["ip", "-4", "route", "show"]).stdout
        start = int(self._hex[:2], 16)
        for step in range(256):
            third = (start + step) % 256
            prefix = f"{_SUBNET_BASE}.{third}."
            if prefix not in used:
                return ipaddress.IPv4Network(f"{prefix}0/24")
        raise LabError(f"no free /24 left in {_SUBNET_BASE}.0.0/16 (stale labs? run `edge-agent bench netlab --cleanup`)")

    def _cgroups_join(self, cgroup: str, pid: int | None) -> None:
        if pid is not None and self._cgroups is not None:
            (self._cgroups.path(cgroup) / "cgroup.procs").write_text(f"{pid}\n")

    def _shape(self, board: _Board, link: Link) -> None:
        _tbf(board.host_dev, link.mbit)                    # broker -> board
        _tbf(board.ns_dev, link.mbit, netns=board.netns)   # board -> broker

    def _relay(self, board: _Board, upstream: tuple[str, int]) -> _RelayProc:
        delay = board.link.delay_ms if board.link is not None else 0.0
        return _RelayProc(self, self.bridge_address, upstream, delay, self.infra_cgroup)

    def _install_signals(self) -> None:
        """SIGTERM (where nobody handles it) and SIGINT (where Python's default does) raise
        KeyboardInterrupt in the main thread, so the ``with`` unwinds; during the teardown they
        are only noted (a second Ctrl-C must not stop it half-way) and raised once it is done."""
        if threading.current_thread() is not threading.main_thread():
            return

        def on_signal(signum: int, frame: object) -> None:
            # No work here: raise (the `with` unwinds and __exit__ tears down), or note during teardown.
            if self._closing:
                self._deferred_signal = signum
                return
            raise KeyboardInterrupt(f"signal {signum}")

        for signum, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)):
            if signal.getsignal(signum) is default:
                self._old_handlers[signum] = signal.signal(signum, on_signal)

    # ---- using ---------------------------------------------------------------------------

    def _board(self, name: str) -> _Board:
        try:
            return self.boards[name]
        except KeyError:
            raise LabError(f"no board {name!r} in this lab (boards: {', '.join(self.boards)})") from None

    def address_of(self, board: str) -> str:
        """The board's own address (in its namespace)."""
        return self._board(board).address

    def netns(self, board: str) -> str:
        """The board's network namespace name (``ip netns exec NAME ...``)."""
        return self._board(board).netns

    def cgroup_path(self, board: str) -> Path:
        assert self._cgroups is not None
        return self._cgroups.path(self._board(board).cgroup)

    def cpu_stat(self, board: str) -> dict[str, int]:
        """The board cgroup's ``cpu.stat`` (nr_periods, nr_throttled, ...)."""
        assert self._cgroups is not None
        return self._cgroups.throttled(self._board(board).cgroup)

    def pids(self, board: str) -> list[int]:
        """The processes now in ``board``'s cgroup (what runs on the board)."""
        assert self._cgroups is not None
        return self._cgroups.procs(self._board(board).cgroup)

    def broker_address_for(self, board: str) -> tuple[str, int]:
        """(host, port) the board connects to for the broker: its relay if its link is shaped."""
        spec = self._board(board)
        if self.broker is None:
            raise LabError("this lab was built with broker=False")
        if spec.relays:
            return spec.relays[0].address
        return (self.bridge_address, self.broker.port)

    def forward(self, board: str, upstream: tuple[str, int]) -> tuple[str, int]:
        """Start one more relay with ``board``'s delay towards ``upstream`` (a server reachable from
        the root namespace); returns the address the board connects to. Follows :meth:`set_link`."""
        spec = self._board(board)
        relay = self._relay(spec, upstream)
        spec.relays.append(relay)
        return relay.address

    def link_of(self, board: str) -> Link | None:
        return self._board(board).link

    def set_link(self, board: str, link: Link) -> None:
        """Re-shape ``board``'s link (rate both ways, delay in all its relays) without rebuilding.
        Only for a board built with a link (it has relays); the new delay applies to what is sent
        from now on."""
        spec = self._board(board)
        if spec.link is None:
            raise LabError(f"board {board!r} was built without a link: give it Link() at construction to re-shape it")
        if not isinstance(link, Link):
            raise TypeError(f"link = {link!r}: expected a Link")
        self._shape(spec, link)
        for relay in spec.relays:
            relay.command(f"delay {link.delay_ms:g}")
        spec.link = link

    def set_cpu(self, board: str, cpu: float | None) -> None:
        """Change the board's CPU quota (cores; None: no quota)."""
        assert self._cgroups is not None
        self._cgroups.set_cpu(self._board(board).cgroup, cpu)

    def relay_stats(self, board: str) -> list[dict[str, object]]:
        """Each of the board's relays' counters (connections, bytes each way, its CPU seconds)."""
        import json
        return [json.loads(relay.command("stats")) for relay in self._board(board).relays]

    def relay_pids(self) -> list[int]:
        return [relay.process.pid for board in self.boards.values() for relay in board.relays]

    def command_for(self, board: str, argv: Sequence[str], *, cgroup: bool = True) -> list[str]:
        """The argv that runs ``argv`` in ``board``'s cgroup (unless ``cgroup=False``) and namespace."""
        spec = self._board(board)
        return self._wrap(list(argv), spec.netns, spec.cgroup if cgroup else None)

    def _wrap(self, argv: list[str], netns: str | None, cgroup: str | None) -> list[str]:
        inner = argv
        if netns is not None:
            inner = ["nsenter", f"--net=/run/netns/{netns}", "--", *argv]
        if cgroup is None:
            return inner
        assert self._cgroups is not None
        procs = str(self._cgroups.path(cgroup) / "cgroup.procs")
        # Join the cgroup first (ip netns exec / nsenter do not hide /sys/fs/cgroup, but the order
        # keeps it independent of that), then enter the namespace, then exec the command.
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, *inner]

    def _launch(self, argv: list[str], *, netns: str | None, cgroup: str | None, **popen: object) -> subprocess.Popen:
        popen.setdefault("start_new_session", True)   # Ctrl-C reaches us, and we stop it
        process = subprocess.Popen(self._wrap(argv, netns, cgroup), **popen)  # type: ignore[call-overload]
        self._spawned.append(process)
        return process

    def spawn(self, board: str, argv: Sequence[str], env: Mapping[str, str] | None = None, *,
              cgroup: bool = True, **popen: object) -> subprocess.Popen:
        """Start ``argv`` in ``board``'s namespace and cgroup (children too); returns its Popen.
        Extra keywords go to Popen (stdout=..., cwd=...). The lab stops it at teardown."""
        spec = self._board(board)
        if env is not None:
            popen["env"] = dict(env)
        return self._launch(list(argv), netns=spec.netns, cgroup=spec.cgroup if cgroup else None, **popen)

    def run(self, board: str, argv: Sequence[str], *, timeout: float = 60.0, cgroup: bool = True,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in ``board`` to completion; returns its output (text)."""
        process = self.spawn(board, argv, env, cgroup=cgroup, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            raise LabError(f"`{' '.join(argv)}` in {board} did not finish within {timeout:g} s: {err.strip()}")
        return subprocess.CompletedProcess(list(argv), process.returncode, out, err)

    # ---- teardown ------------------------------------------------------------------------

    def close(self) -> None:
        """Tear everything down (idempotent; safe after a partial build)."""
        if self._closed or not self._started:
            return
        self._closing = True
        errors: list[str] = []
        try:
            stop_groups(self._spawned, self.stop_timeout_s)
            for board in self.boards.values():
                for relay in board.relays:
                    relay.stop()
            if self.broker is not None:
                self.broker.close()
            if self._cgroups is not None:
                for name in self._made_cgroups:
                    if not self._cgroups.remove(name):
                        errors.append(f"cgroup {name} could not be removed")
            for netns in self._netns:
                for pid in _netns_pids(netns):
                    _kill(pid, signal.SIGKILL)
            for link in reversed(self._links):
                done = _sh(["ip", "link", "del", link], check=False)
                if done.returncode != 0 and "Cannot find" not in done.stderr:
                    errors.append(f"link {link}: {done.stderr.strip()}")
            for netns in self._netns:
                done = _sh(["ip", "netns", "del", netns], check=False)
                if done.returncode != 0 and "No such file" not in done.stderr:
                    errors.append(f"netns {netns}: {done.stderr.strip()}")
        finally:
            self._closed = True
            atexit.unregister(self.close)
            if threading.current_thread() is threading.main_thread():
                for signum, handler in self._old_handlers.items():
                    signal.signal(signum, handler)  # type: ignore[arg-type]
                self._old_handlers.clear()
        if self._deferred_signal is not None:
            raise KeyboardInterrupt(f"signal {self._deferred_signal} (during the lab's teardown)")
        if errors:
            raise LabError("teardown left: " + "; ".join(errors) + " (run `edge-agent bench netlab --cleanup`)")

    def __repr__(self) -> str:
        boards = ", ".join(f"{b.spec.name}={b.address} cpu={b.spec.cpu} link={b.link}" for b in self.boards.values())
        return f"<Lab {self.id} {boards}>"


def _netns_pids(netns: str) -> list[int]:
    done = _sh(["ip", "netns", "pids", netns], check=False)
    return [int(word) for word in done.stdout.split() if word.isdigit()]


def _prefixes(lab_id: str | None) -> tuple[str, re.Pattern[str]]:
    """The name prefix and link pattern of one lab (``ealab-3f9a2c``), or of every lab (None)."""
    if lab_id is None:
        return PREFIX, _LINK_RE
    match = re.fullmatch(re.escape(PREFIX) + r"([0-9a-f]{6})", lab_id)
    if match is None:
        raise ValueError(f"lab_id = {lab_id!r}: expected {PREFIX} and six hex digits")
    return lab_id + "-", re.compile(rf"^{LINK_PREFIX}{match.group(1)}(br|\d+[hn])$")


def _netns_names(prefix: str) -> list[str]:
    return [line.split()[0] for line in _sh(["ip", "netns", "list"], check=False).stdout.splitlines()
            if line.split() and line.split()[0].startswith(prefix)]


def _link_names(pattern: re.Pattern[str]) -> list[str]:
    names = []
    for line in _sh(["ip", "-o", "link", "show"], check=False).stdout.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            name = parts[1].strip().split("@")[0]
            if pattern.match(name):
                names.append(name)
    return names


def leftovers(lab_id: str | None = None) -> list[str]:
    """What labs left here (one lab's, given its id): namespaces, links, cgroups, relay processes,
    and processes still in those cgroups and namespaces."""
    prefix, pattern = _prefixes(lab_id)
    found = [f"netns {name}" for name in _netns_names(prefix)]
    found += [f"process {pid} (in {name})" for name in _netns_names(prefix) for pid in _netns_pids(name)]
    found += [f"link {name}" for name in _link_names(pattern)]
    groups = cgroup_root()
    if groups is not None:
        for name in groups.names():
            if name.startswith(prefix):
                found.append(f"cgroup {name}")
                found += [f"process {pid} (in cgroup {name})" for pid in groups.procs(name)]
    found += [f"process {pid} (relay)" for pid in _relay_pids(prefix)]
    return found


def _relay_pids(prefix: str = PREFIX) -> list[int]:
    pids = []
    tag = prefix.rstrip("-")
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            argv = _cmdline(int(entry.name))
            if "edge_lab.relay" in argv and any(a.startswith(tag) for a in argv) and _alive(int(entry.name)):
                pids.append(int(entry.name))
    return pids


def cleanup(lab_id: str | None = None, *, timeout: float = 5.0) -> list[str]:
    """Remove everything labs left behind (after a SIGKILL, say), or one lab's (its ``Lab.id``):
    processes in the labs' namespaces and cgroups, relays, links, namespaces, cgroups. Returns
    what it removed; raises :class:`LabError` naming what it could not. Idempotent: a second
    call returns []. Without ``lab_id`` it also removes the labs of runs still going."""
    prefix, pattern = _prefixes(lab_id)
    removed: list[str] = []
    for pid in _relay_pids(prefix):
        _kill(pid, signal.SIGKILL)
        removed.append(f"process {pid} (relay)")
    netns_names = _netns_names(prefix)
    for netns in netns_names:
        for pid in _netns_pids(netns):
            _kill(pid, signal.SIGKILL)
            removed.append(f"process {pid} (in {netns})")
    groups = cgroup_root()
    problems: list[str] = []
    if groups is not None:
        for name in groups.names():
            if not name.startswith(prefix):
                continue
            pids = groups.procs(name)
            if groups.remove(name, timeout):
                removed += [f"process {pid} (in cgroup {name})" for pid in pids]
                removed.append(f"cgroup {name}")
            else:
                problems.append(f"cgroup {name}")
    for name in _link_names(pattern):
        done = _sh(["ip", "link", "del", name], check=False)
        if done.returncode == 0:
            removed.append(f"link {name}")
        elif "Cannot find" not in done.stderr:   # its veth peer went first
            problems.append(f"link {name}: {done.stderr.strip()}")
    for netns in netns_names:
        done = _sh(["ip", "netns", "del", netns], check=False)
        if done.returncode == 0:
            removed.append(f"netns {netns}")
        else:
            problems.append(f"netns {netns}: {done.stderr.strip()}")
    if problems:
        raise LabError("cleanup could not remove: " + "; ".join(problems))
    return removed


def wait_gone(pids: Iterable[int], timeout: float = 5.0) -> bool:
    """True once none of ``pids`` is alive (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    pids = list(pids)
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
