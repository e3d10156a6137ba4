"""A real Mosquitto broker on a loopback port, for tests, the demo and the benchmarks.

``LocalBroker`` writes a small config into a temporary directory and runs ``mosquitto -c`` on it:
anonymous access on 127.0.0.1 only, no persistence unless asked (``persistence=True``: the
sessions and their queued QoS 1 messages are saved in the broker's directory, every
``autosave_interval_s`` and when it stops on SIGTERM, and loaded again when it restarts), and ``set_tcp_nodelay true`` because with
Nagle's algorithm on, a loopback request/reply waits for delayed ACKs (measured: 88 ms per round
trip with Nagle, 0.5 ms without). Mosquitto need not be installed as a service: the package's
binary is enough, and it is looked up on PATH and in the sbin directories Debian installs it to.

Securing it (README, "Securing the broker"): ``tls=BrokerTls(...)`` makes the listener TLS (by
default it requires a client certificate signed by the CA and takes its CN as the username),
``acl_file`` and ``password_file`` are Mosquitto's own files; anonymous clients are then refused.
:func:`check_config` runs ``mosquitto -c`` on a config file briefly, to show it parses.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LocalBroker", "BrokerTls", "MosquittoNotFound", "BrokerError", "find_mosquitto", "check_config",
           "SBIN_DIRS"]

#: Searched after PATH: Debian installs the broker as /usr/sbin/mosquitto, which is not on a
#: normal user's PATH.
SBIN_DIRS: tuple[str, ...] = ("/usr/local/sbin", "/usr/sbin", "/sbin")


class MosquittoNotFound(FileNotFoundError):
    """The ``mosquitto`` binary is not installed (or not on PATH nor in an sbin directory)."""


class BrokerError(RuntimeError):
    """The broker did not start or stop as expected; the message carries the end of its log."""


def find_mosquitto() -> str:
    """Path of the ``mosquitto`` binary; raises :class:`MosquittoNotFound` saying how to install it."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for directory in SBIN_DIRS:
        candidate = Path(directory) / "mosquitto"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise MosquittoNotFound(
        "mosquitto (the MQTT broker) was not found on PATH or in "
        f"{', '.join(SBIN_DIRS)}; install it with `sudo apt-get install mosquitto` (Debian/Ubuntu; "
        "`brew install mosquitto` on macOS). It need not run as a service: the agent and the tests "
        "start their own broker from the binary"
    )


@dataclass(frozen=True)
class BrokerTls:
    """The broker's TLS listener: its CA (which signs the clients' certificates too), its own
    certificate and key (PEM), whether a client must show a certificate, and whether the
    certificate's CN is the client's username for the ACL (``use_identity_as_username``)."""

    ca_file: str
    cert_file: str
    key_file: str
    require_certificate: bool = True
    use_identity_as_username: bool = True

    def lines(self) -> list[str]:
        return [f"cafile {self.ca_file}", f"certfile {self.cert_file}", f"keyfile {self.key_file}",
                f"require_certificate {str(self.require_certificate).lower()}",
                f"use_identity_as_username {str(self.use_identity_as_username).lower()}"]


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class LocalBroker:
    """Runs ``mosquitto`` on ``host:port`` (``port=0``: a free port) until :meth:`stop`.

    Use as a context manager. ``restart()`` stops and starts it on the same port, which is how tests
    check that clients survive a broker restart: gracefully (SIGTERM: a persistent broker saves its
    sessions first) or not (``graceful=False``: SIGKILL, what a power cut does; a persistent broker
    comes back with its last autosave). ``max_packet_bytes`` sets Mosquitto's ``max_packet_size``
    (the broker then drops a client that sends a larger packet). ``tls``, ``acl_file`` and
    ``password_file`` secure it (module docstring); ``allow_anonymous`` defaults to true only on a
    plain listener without a password file.
    """

    START_TIMEOUT_S = 10.0
    STOP_TIMEOUT_S = 5.0

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, max_packet_bytes: int | None = None,
                 persistence: bool = False, autosave_interval_s: int = 1, extra_config: tuple[str, ...] = (),
                 tls: BrokerTls | None = None, acl_file: str | None = None, password_file: str | None = None,
                 allow_anonymous: bool | None = None) -> None:
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port = {port!r}, expected an int in 0..65535 (0 picks a free port)")
        if max_packet_bytes is not None and (not isinstance(max_packet_bytes, int) or max_packet_bytes < 20):
            raise ValueError(f"max_packet_bytes = {max_packet_bytes!r}, expected None or an int >= 20")
        self.host = host
        self.port = port
        self.max_packet_bytes = max_packet_bytes
        if not isinstance(autosave_interval_s, int) or autosave_interval_s < 1:
            raise ValueError(f"autosave_interval_s = {autosave_interval_s!r}, expected an int >= 1")
        self.persistence = bool(persistence)
        self.extra_config = tuple(extra_config)   # mosquitto.conf lines after ours (a later one wins)
        self.autosave_interval_s = autosave_interval_s
        self.tls = tls
        self.acl_file = acl_file
        self.password_file = password_file
        self.allow_anonymous = (tls is None and password_file is None) if allow_anonymous is None else allow_anonymous
        self._binary = find_mosquitto()
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> "LocalBroker":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def log_path(self) -> Path:
        return self._dir / "mosquitto.log"

    @property
    def pid(self) -> int | None:
        """The broker process's pid while it runs (benchmarks meter its CPU and memory)."""
        return self._process.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def _dir(self) -> Path:
        if self._workdir is None:
            # Readable by the `mosquitto` user: run as root, mosquitto drops to that user.
            self._workdir = tempfile.TemporaryDirectory(prefix="edge-agent-mosquitto-")
            os.chmod(self._workdir.name, 0o755)
        return Path(self._workdir.name)

    def start(self) -> "LocalBroker":
        """Start the broker; returns once its port accepts TCP connections."""
        if self.running:
            return self
        pick_port = self.port == 0
        for attempt in range(5):
            if pick_port:
                self.port = _free_port(self.host)
            try:
                self._start_once()
                return self
            except BrokerError:
                # Another process may have taken the picked port between probe and bind: retry.
                if not pick_port or attempt == 4 or "in use" not in self._log_tail():
                    raise
        raise AssertionError("unreachable")

    def _start_once(self) -> None:
        conf = self._dir / "mosquitto.conf"
        lines = [
            f"listener {self.port} {self.host}",
            *(self.tls.lines() if self.tls is not None else []),
            f"allow_anonymous {str(self.allow_anonymous).lower()}",
            *([f"acl_file {self.acl_file}"] if self.acl_file else []),
            *([f"password_file {self.password_file}"] if self.password_file else []),
            "set_tcp_nodelay true",
            *(["persistence true", f"persistence_location {self._dir}/",
               f"autosave_interval {self.autosave_interval_s}"] if self.persistence else ["persistence false"]),
            # A persistent client (the agent) may hold many requests while it restarts: the default
            # of 1000 queued messages per client would drop the rest silently.
            "max_queued_messages 100000",
            # QoS 1 both ways: Mosquitto's default window of 20 unacknowledged messages per client
            # made a camera's requests queue up behind its acknowledgements once the cores were busy.
            "max_inflight_messages 1000",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            # Stay root instead of dropping to `mosquitto`, which could not write our log file.
            lines.append("user root")
        if self.max_packet_bytes is not None:
            lines.append(f"max_packet_size {self.max_packet_bytes}")
        lines.extend(self.extra_config)
        conf.write_text("\n".join(lines) + "\n")
        with open(self._dir / "stderr.log", "wb") as stderr:
            self._process = subprocess.Popen(
                [self._binary, "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # a Ctrl-C in a test run reaches pytest, which stops us cleanly
            )
        deadline = time.monotonic() + self.START_TIMEOUT_S
        while True:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise BrokerError(
                    f"mosquitto exited with status {code} while starting on {self.host}:{self.port}; "
                    f"log:\n{self._log_tail()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self._terminate()
                raise BrokerError(
                    f"mosquitto did not accept connections on {self.host}:{self.port} within "
                    f"{self.START_TIMEOUT_S:.0f} s; log:\n{self._log_tail()}"
                )
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``). Keeps the port for restart."""
        self._terminate()

    def kill(self) -> None:
        """Kill the broker (SIGKILL): no DISCONNECT to its clients, no last save of its sessions."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def restart(self, graceful: bool = True) -> "LocalBroker":
        """Stop (SIGTERM, or SIGKILL when not ``graceful``) and start again on the same port
        (clients see a dropped connection)."""
        if graceful:
            self.stop()
        else:
            self.kill()
        return self.start()

    def close(self) -> None:
        """Stop the broker and remove its temporary directory."""
        self._terminate()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=self.STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _log_tail(self, lines: int = 20) -> str:
        text = ""
        for name in ("mosquitto.log", "stderr.log"):
            path = self._dir / name
            if path.is_file():
                text += path.read_text(errors="replace")
        return "\n".join(text.strip().splitlines()[-lines:]) or "(empty log)"

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<LocalBroker {self.host}:{self.port} {state}>"


def check_config(path: str | Path, *, seconds: float = 1.0) -> str:
    """Run ``mosquitto -c path`` for up to ``seconds`` and return its log: raises :class:`BrokerError`
    with the log when it exits at once (a config it cannot parse, a file it cannot open). Mosquitto
    2.0 has no "test the config" switch; a broker still running after ``seconds`` took the file."""
    process = subprocess.Popen([find_mosquitto(), "-c", str(path)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            output, _ = process.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        return output.decode(errors="replace")
    raise BrokerError(f"mosquitto -c {path} exited with status {process.returncode}:\n"
                      f"{output.decode(errors='replace').strip()}")
