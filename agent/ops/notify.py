"""The systemd notification protocol (``sd_notify(3)``), written out: a datagram of
``KEY=VALUE`` lines sent to the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``.

It is a few lines, so the agent does not depend on ``systemd-python`` or ``sdnotify`` (neither ships
as a wheel for every board). ``$NOTIFY_SOCKET`` is a file system path (``/run/systemd/notify``) or,
starting with ``@``, a name in the abstract namespace (the ``@`` stands for a leading NUL byte).
Without ``$NOTIFY_SOCKET`` (not started by systemd, or ``Type=simple``) every send is a no-op, so
``edge-agent run`` behaves the same from a shell.

A failed send is logged once and otherwise ignored: the manager being away must never stop the
agent serving. The watchdog's period comes from ``$WATCHDOG_USEC`` (``sd_watchdog_enabled(3)``),
honoured only by the process ``$WATCHDOG_PID`` names when that is set.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Mapping

log = logging.getLogger(__name__)

__all__ = ["Notifier", "notify_address", "watchdog_interval"]


def notify_address(value: str) -> str | bytes:
    """The socket address ``$NOTIFY_SOCKET`` names: a path, or ``@name`` -> ``b"\\0name"`` (abstract)."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    raise ValueError(f"NOTIFY_SOCKET = {value!r}: expected an absolute path or @abstract-name")


class Notifier:
    """Sends state changes to the service manager; a no-op where ``$NOTIFY_SOCKET`` is unset.

    ``Notifier().send("READY=1", "STATUS=serving 2 models")`` sends one datagram with both lines,
    which systemd applies together (``READY=1`` with the status that says what became ready).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        value = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = notify_address(value) if value else None
        self._socket: socket.socket | None = None
        self._failed = False
        if self.address is not None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, *lines: str) -> bool:
        """Send ``lines`` (``KEY=VALUE`` each, no newline inside) as one datagram; True if sent."""
        if self._socket is None:
            return False
        for line in lines:
            if "\n" in line or "=" not in line:
                raise ValueError(f"notification line {line!r}: expected KEY=VALUE without a newline")
        try:
            self._socket.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            if not self._failed:    # once: a manager that went away would otherwise flood the log
                log.warning("could not notify the service manager at %r: %s", self.address, exc)
                self._failed = True
            return False
        self._failed = False
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between watchdog pings (half of ``$WATCHDOG_USEC``, as ``sd_watchdog_enabled(3)``
    advises), or None when no watchdog is asked of this process: unset, not a positive integer,
    or ``$WATCHDOG_PID`` naming another process (a child that inherited the environment)."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    try:
        period_us = int(usec)
    except ValueError:
        log.warning("WATCHDOG_USEC = %r: expected a positive integer (microseconds); no watchdog pings", usec)
        return None
    if period_us <= 0:
        return None
    watched = env.get("WATCHDOG_PID", "")
    if watched:
        try:
            if int(watched) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            log.warning("WATCHDOG_PID = %r: expected a process id; no watchdog pings", watched)
            return None
    return period_us / 2e6
