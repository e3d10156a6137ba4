"""``edge-agent service install``: run the agent as the board's systemd service.

Three things, each printed as it is done, each left alone when already right (a second run says
``unchanged``):

* the unit, ``/etc/systemd/system/edge-agent.service``: rendered here (:func:`render_unit`) so a
  board that installed only the wheel has it; ``firmware_configs/systemd/edge-agent.service`` is
  its default rendering, kept equal by a test. ``ExecStart`` names the ``edge-agent`` that runs
  the install, ``User=`` the service user, ``DeviceAllow=`` the accelerator nodes of the board it
  is installed for only (a Jetson's GPU nodes, a Coral's ``/dev/apex_0`` or USB, none on a generic
  board: :data:`BOARD_DEVICES`), the board named (``--board``, ``--config BOARD``) or detected;
* the config, ``/etc/edge-agent/agent.toml``, copied from ``--config`` (validated first) or from the
  board's shipped config (``--config auto``'s choice, agent.ops.boards); an existing config that differs is kept, never
  overwritten (the operator may have edited it);
* the system user (``useradd --system``, skipped if it exists), added to the groups that own the
  accelerator nodes the unit allows, those that exist (``apex`` for the Coral PCIe/M.2 Edge TPU,
  ``plugdev`` for the USB stick, ``video`` and ``render`` for the Jetson GPU nodes): the unit's
  ``DeviceAllow=`` lets the service reach those nodes, their file modes still ask for the group.

``--root DIR`` installs into a staging tree (an image being built, the tests): files go under DIR,
and users are not created (the commands are printed, to run on the board).
"""
from __future__ import annotations

import grp
import os
import pwd
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["render_unit", "board_devices", "install", "UNIT_NAME", "DEFAULT_USER", "BOARD_DEVICES", "DEVICE_GROUPS"]

UNIT_NAME = "edge-agent.service"
DEFAULT_USER = "edge-agent"
DEFAULT_EXEC = "/usr/local/bin/edge-agent"
UNIT_DIR = Path("etc/systemd/system")
CONFIG_PATH = Path("etc/edge-agent/agent.toml")
#: The groups that own accelerator nodes on the supported boards; the user joins those that exist.
ACCELERATOR_GROUPS = ("apex", "plugdev", "video", "render")
#: The groups that own each device group's nodes (:data:`DEVICE_GROUPS`).
DEVICE_GROUP_OWNERS = {"apex": ("apex",), "usb": ("plugdev",), "jetson": ("video", "render")}

#: The Jetson nodes CUDA / TensorRT open through onnxruntime (L4T: nvmap and the nvhost family).
JETSON_NODES = ("/dev/nvmap", "/dev/nvhost-ctrl", "/dev/nvhost-ctrl-gpu", "/dev/nvhost-prof-gpu",
                "/dev/nvhost-gpu", "/dev/nvhost-as-gpu", "/dev/nvhost-dbg-gpu", "/dev/nvhost-tsg-gpu",
                "/dev/nvhost-sched-gpu", "/dev/nvhost-ctxsw-gpu", "/dev/nvhost-vic",
                "/dev/nvhost-ctrl-nvdla0", "/dev/nvhost-ctrl-nvdla1", "/dev/nvhost-nvdla0", "/dev/nvhost-nvdla1")

_UNIT = """\
# edge-agent as a systemd service: written by `edge-agent service install` (agent/ops/systemd.py).
[Unit]
Description=edge-agent: on-device DNN inference with SLO-aware batching
After=network-online.target mosquitto.service
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_start} run --config {config}
User={user}
Group={user}
Environment=PYTHONUNBUFFERED=1
# READY=1 comes once the models are loaded and profiled and the intakes listen.
TimeoutStartSec=300
# The agent pings at half this, only while its scheduler makes progress (agent/ops/supervisor.py).
WatchdogSec=30
Restart=on-failure
RestartSec=5
# SIGTERM: STOPPING=1, then [agent] drain_timeout_s of serving what is queued, then the exit.
TimeoutStopSec=30
StateDirectory=edge-agent

NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
LockPersonality=yes

# Devices: the standard pseudo-devices (DevicePolicy=closed) and the accelerators only.
DevicePolicy=closed
{devices}
"""

#: The accelerator nodes a service may be let open, in groups: the comment the unit carries and
#: the ``DeviceAllow=`` entries.
DEVICE_GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "apex": ("Coral Edge TPU, PCIe / M.2 (gasket/apex driver).", ("/dev/apex_0",)),
    "usb": ("Coral USB Accelerator: libusb opens /dev/bus/usb/* (it re-enumerates after its firmware loads).",
            ("char-usb_device",)),
    "jetson": ("NVIDIA Jetson: nvmap and the nvhost nodes (GPU, VIC, DLA).", JETSON_NODES),
}
#: The groups each shipped board kind needs (agent.ops.boards); a generic board needs none, unless
#: an Edge TPU is found on the machine being installed (then its group too).
BOARD_DEVICES: dict[str, tuple[str, ...]] = {
    "jetson-orin-nano": ("jetson",), "jetson-xavier-nx": ("jetson",), "coral-devboard": ("apex",),
    "rpi-coral-usb": ("usb",), "generic-x86": (), "generic-arm64": (),
}


def render_unit(exec_start: str = DEFAULT_EXEC, user: str = DEFAULT_USER,
                config: str = "/" + str(CONFIG_PATH), devices: tuple[str, ...] | None = None) -> str:
    """The unit's text; the defaults give ``firmware_configs/systemd/edge-agent.service``.
    ``devices``: the :data:`DEVICE_GROUPS` the service may open (None: every one, the shipped
    unit's choice, for whatever board it lands on; empty: none, the CPU only)."""
    for name, value in (("exec_start", exec_start), ("config", config)):
        if not value.startswith("/") or any(c.isspace() for c in value):
            raise ValueError(f"{name} = {value!r}: expected an absolute path without spaces")
    if not user or not all(c.isalnum() or c in "-_" for c in user):
        raise ValueError(f"user = {user!r}: expected a user name of letters, digits, '-' and '_'")
    unknown = sorted(set(devices or ()) - set(DEVICE_GROUPS))
    if unknown:
        raise ValueError(f"devices = {unknown}: expected some of {list(DEVICE_GROUPS)}")
    groups = [g for g in DEVICE_GROUPS if devices is None or g in devices]
    blocks = ["\n".join([f"# {DEVICE_GROUPS[g][0]}", *(f"DeviceAllow={node} rw" for node in DEVICE_GROUPS[g][1])])
              for g in groups]
    text = "\n".join(blocks) or "# No accelerator nodes: this board runs its models on the CPU."
    return _UNIT.format(exec_start=exec_start, config=config, user=user, devices=text)


def board_devices(board: str, root: Path | None = None) -> tuple[str, ...]:
    """The device groups ``board`` needs; with ``root`` (the running machine being installed), an
    Edge TPU found there too (a Coral on a generic board: its node, not every board's)."""
    if board not in BOARD_DEVICES:
        raise ValueError(f"board = {board!r}: expected one of {sorted(BOARD_DEVICES)}")
    groups = list(BOARD_DEVICES[board])
    if root is not None:
        from agent.ops.boards import coral_usb_devices
        if "apex" not in groups and any((root / "dev").glob("apex_*")):
            groups.append("apex")
        if "usb" not in groups and coral_usb_devices(root):
            groups.append("usb")
    return tuple(g for g in DEVICE_GROUPS if g in groups)


def default_exec() -> str:
    """The ``edge-agent`` that runs now: beside this interpreter (a virtualenv), else on PATH."""
    beside = Path(sys.executable).parent / "edge-agent"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("edge-agent") or DEFAULT_EXEC


@dataclass
class Step:
    what: str          # the thing, e.g. "unit /etc/systemd/system/edge-agent.service"
    outcome: str       # "written", "updated", "unchanged", "kept", "created", "skipped", "would ..."

    def __str__(self) -> str:
        return f"{self.what}: {self.outcome}"


def _write(path: Path, text: str, shown: str, *, replace: bool, dry_run: bool) -> Step:
    if path.exists():
        current = path.read_text()
        if current == text:
            return Step(shown, "unchanged")
        if not replace:
            return Step(shown, "kept (it differs from the source: edit it, or remove it and install again)")
        outcome = "updated"
    else:
        outcome = "written"
    if dry_run:
        return Step(shown, f"would be {outcome}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    os.replace(tmp, path)        # a unit or config is never seen half-written
    return Step(shown, outcome)


def _run(command: list[str], dry_run: bool) -> str:
    if dry_run:
        return "would run: " + shlex.join(command)
    subprocess.run(command, check=True, capture_output=True, text=True)
    return "ran: " + shlex.join(command)


def _user_steps(user: str, staging: bool, dry_run: bool, devices: tuple[str, ...] | None = None) -> list[Step]:
    """Create the user and add it to the groups that own the nodes of ``devices`` (None: every
    accelerator group), those that exist here."""
    wanted = ACCELERATOR_GROUPS if devices is None else {o for d in devices for o in DEVICE_GROUP_OWNERS[d]}
    groups = [g for g in ACCELERATOR_GROUPS if g in wanted and _group_exists(g)]
    member_of = {g.gr_name for g in grp.getgrall() if user in g.gr_mem}
    try:
        pwd.getpwnam(user)
        exists = True
    except KeyError:
        exists = False
    steps = []
    # A staging tree's users are the image's, not this machine's: print, do not run.
    dry = dry_run or staging
    if exists:
        steps.append(Step(f"user {user}", "unchanged (exists)"))
    else:
        # A group of the user's name left by an earlier install is taken as the user's group.
        group = ["--gid", user] if _group_exists(user) else ["--user-group"]
        command = ["useradd", "--system", *group, "--no-create-home", "--home-dir", "/var/lib/edge-agent",
                   "--shell", "/usr/sbin/nologin", "--comment", "edge-agent inference service", user]
        steps.append(Step(f"user {user}", _run(command, dry)))
    to_join = [g for g in groups if g not in member_of]
    if to_join:
        steps.append(Step(f"user {user} groups", _run(["usermod", "--append", "--groups", ",".join(to_join), user], dry)))
    elif groups:
        steps.append(Step(f"user {user} groups", f"unchanged (member of {', '.join(groups)})"))
    if staging:
        steps.append(Step(f"user {user}", "not created in a --root staging tree: run the commands above on the board"))
    return steps


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def install(root: Path = Path("/"), *, user: str = DEFAULT_USER, config_source: Path | str | None = None,
            exec_start: str | None = None, dry_run: bool = False, board: str | None = None) -> list[Step]:
    """Install the unit, the config and the user under ``root``; the steps, as done (or, with
    ``dry_run``, as they would be). Raises ``ValueError`` (a bad user name or board, no config to
    copy) or ``agent.config.ConfigError`` (the config does not validate) before anything is written.

    ``config_source``: a file, a shipped board's name (``jetson-orin-nano``: its config), or None /
    ``auto`` (this machine's, detected). ``board``: whose accelerator nodes the unit lets the service
    open (:func:`board_devices`); by default the board named or detected for the config, else, on
    the machine itself, the one detected here; a staging tree with no board named gets every
    board's nodes (the shipped unit's choice) and a step that says so."""
    from agent.config import load_config
    from agent.ops.boards import AUTO, BOARD_CONFIGS, CONFIG_DIR, detect_board

    root = Path(root)
    staging = root.resolve() != Path("/")
    steps: list[Step] = []
    if board is not None and board not in BOARD_DEVICES:
        raise ValueError(f"board = {board!r}: expected one of {sorted(BOARD_DEVICES)}")
    if config_source is None or str(config_source) == AUTO:
        choice = detect_board()
        config_source = choice.config
        board = board or choice.board
        steps.append(Step(f"config source {config_source}", "chosen: " + "; ".join(choice.reasons)))
    elif str(config_source) in BOARD_CONFIGS and not Path(config_source).exists():
        board = board or str(config_source)
        config_source = CONFIG_DIR / BOARD_CONFIGS[str(config_source)]
    load_config(config_source)      # a config that would not start the agent is not installed
    if board is None and not staging:
        choice = detect_board()
        board = choice.board
        steps.append(Step(f"board {board}", "detected: " + "; ".join(choice.reasons)))
    devices = None if board is None else board_devices(board, None if staging else root)
    steps.append(Step("DeviceAllow", "every supported board's accelerator nodes (name the board with --board "
                                    "to allow only its own)" if devices is None else
                      f"board {board}: " + (", ".join(devices) + " nodes" if devices else
                                            "no accelerator nodes (the CPU only)")))
    exec_path = exec_start or default_exec()
    unit_text = render_unit(exec_path, user, "/" + str(CONFIG_PATH), devices)
    unit_path, config_path = root / UNIT_DIR / UNIT_NAME, root / CONFIG_PATH
    steps.append(_write(config_path, Path(config_source).read_text(), f"config {config_path}",
                        replace=False, dry_run=dry_run))
    steps.append(_write(unit_path, unit_text, f"unit {unit_path}", replace=True, dry_run=dry_run))
    if exec_path.startswith(("/root/", "/home/")):
        steps.append(Step(f"ExecStart {exec_path}", "warning: under a home directory, which ProtectHome=yes hides "
                                                    "from the service: install the agent elsewhere (e.g. a "
                                                    "virtualenv in /opt/edge-agent) and run this again from there"))
    steps.extend(_user_steps(user, staging, dry_run, devices))
    changed = any(s.outcome in ("written", "updated") for s in steps if s.what.startswith("unit"))
    if not staging and changed and Path("/run/systemd/system").is_dir():
        steps.append(Step("systemd", _run(["systemctl", "daemon-reload"], dry_run)))
    return steps
