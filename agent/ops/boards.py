"""Which shipped board config fits this machine: ``edge-agent run --config auto``.

A board says what it is in a few places, none of them everywhere: the device tree's model string
(``/proc/device-tree/model``: Jetsons, the Coral Dev Board, Raspberry Pis), NVIDIA's L4T release
file (``/etc/nv_tegra_release``: every Jetson, even one whose device tree a vendor renamed), the
Edge TPU's PCIe node (``/dev/apex_0``) and its USB ids, and the CPU architecture. Detection reads
them under a root directory, so the tests point it at fake trees, and returns the config it chose
with every reason, so a wrong guess is visible and can be overridden with an explicit ``--config``.

The configs themselves are ``firmware_configs/*.toml`` at the repository's root; the wheel carries
them as package data (``agent/firmware_configs`` links to that folder in the source tree), so an
installed agent finds them beside its own code.
"""
from __future__ import annotations

import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

#: Where the shipped board configs are: package data in the wheel, a link to ``firmware_configs/``
#: in the source tree.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "firmware_configs"

#: The word ``--config`` takes to detect the board instead of naming a file.
AUTO = "auto"

# The Edge TPU's USB ids: Global Unichip before its firmware is loaded, Google after.
CORAL_USB_IDS = (("1a6e", "089a"), ("18d1", "9302"))

X86_MACHINES = ("x86_64", "amd64", "i686", "i386")
ARM64_MACHINES = ("aarch64", "arm64", "armv8l")

#: Board name -> config file name; one TOML per board kind.
BOARD_CONFIGS = {
    "jetson-orin-nano": "jetson-orin-nano.toml",
    "jetson-xavier-nx": "jetson-xavier-nx.toml",
    "coral-devboard": "coral-devboard.toml",
    "rpi-coral-usb": "rpi-coral-usb.toml",
    "generic-x86": "generic-linux.toml",
    "generic-arm64": "generic-arm64.toml",
}


@dataclass(frozen=True)
class BoardChoice:
    """The board kind detection settled on, its config file, and what led there (in order)."""

    board: str
    config: Path
    reasons: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        """One line for people: ``board 'x' (path): reason; reason``."""
        return f"board {self.board!r} ({self.config}): " + "; ".join(self.reasons)


def _read(path: Path) -> str:
    try:
        # Device-tree strings end in NUL, and a list (``compatible``) is NUL-separated.
        return path.read_bytes().decode("utf-8", "replace").replace("\x00", " ").strip()
    except OSError:
        return ""


def coral_usb_devices(root: Path = Path("/")) -> list[str]:
    """Edge TPUs on USB: ``bus-port vendor:product`` for each ``/sys/bus/usb/devices/*`` with a Coral id."""
    found = []
    for device in sorted((root / "sys/bus/usb/devices").glob("*")):
        ids = (_read(device / "idVendor").lower(), _read(device / "idProduct").lower())
        if ids in CORAL_USB_IDS:
            found.append(f"{device.name} {ids[0]}:{ids[1]}")
    return found


def _jetson(model: str, compatible: str, release: str) -> tuple[str, str] | None:
    """(board, reason) for a Jetson, from its device-tree model, compatible list or L4T release."""
    lowered = model.lower()
    if "orin" in lowered:
        if "nano" in lowered:
            return "jetson-orin-nano", f"/proc/device-tree/model is {model!r}"
        return "jetson-orin-nano", (f"/proc/device-tree/model is {model!r}: an Orin other than the Nano gets the "
                                    "smallest Orin's config (a larger module has room for more instances)")
    if "xavier" in lowered:
        if "nx" in lowered:
            return "jetson-xavier-nx", f"/proc/device-tree/model is {model!r}"
        return "jetson-xavier-nx", (f"/proc/device-tree/model is {model!r}: a Xavier other than the NX gets the "
                                    "Xavier NX's config")
    # The SoC in the compatible list: tegra234 is Orin, tegra194 Xavier (a vendor carrier board may
    # rename the model but keeps the SoC).
    if "tegra234" in compatible:
        return "jetson-orin-nano", "/proc/device-tree/compatible names nvidia,tegra234 (an Orin)"
    if "tegra194" in compatible:
        return "jetson-xavier-nx", "/proc/device-tree/compatible names nvidia,tegra194 (a Xavier)"
    if release:
        line = release.splitlines()[0].lstrip("# ").strip()
        found = re.match(r"R(\d+)", line)
        # L4T R36 (JetPack 6) runs only on Orin; R35 and older also on Xavier and earlier modules.
        if found and int(found.group(1)) >= 36:
            return "jetson-orin-nano", f"/etc/nv_tegra_release says {line!r}: L4T R36 and later run on Orin only"
        return "jetson-xavier-nx", (f"/etc/nv_tegra_release says {line!r} but neither the device-tree model nor its "
                                    "SoC names the module: the Xavier NX's config, the smaller of the two Jetsons "
                                    "shipped")
    if "jetson" in lowered or "nvidia,tegra" in compatible:
        return "jetson-xavier-nx", (f"/proc/device-tree/model is {model!r}, a Jetson of no known module: the Xavier "
                                    "NX's config, the smaller of the two Jetsons shipped")
    return None


def detect_board(root: Path | str = Path("/"), machine: str | None = None) -> BoardChoice:
    """The shipped config that fits the board under ``root`` (``/`` on the board itself).

    ``machine`` is the CPU architecture (``platform.machine()`` by default). First match wins: a
    Jetson (device tree or L4T release), a Coral Dev Board (its device tree, or an Edge TPU on PCIe
    on an ARM64 board), a Raspberry Pi with a Coral USB accelerator, then the generic config of the
    architecture.
    """
    root = Path(root)
    machine = (machine if machine is not None else platform.machine()).lower()
    model = _read(root / "proc/device-tree/model")
    compatible_text = _read(root / "proc/device-tree/compatible").lower()
    release = _read(root / "etc/nv_tegra_release")
    apex = sorted(p.name for p in (root / "dev").glob("apex_*"))
    usb = coral_usb_devices(root)
    reasons: list[str] = []

    def choose(board: str) -> BoardChoice:
        return BoardChoice(board, CONFIG_DIR / BOARD_CONFIGS[board], tuple(reasons))

    jetson = _jetson(model, compatible_text, release)
    if jetson is not None:
        reasons.append(jetson[1])
        return choose(jetson[0])
    lowered = model.lower()
    if "coral" in lowered or "phanbeach" in lowered:
        reasons.append(f"/proc/device-tree/model is {model!r}")
        reasons.append(f"Edge TPU on PCIe: /dev/{apex[0]}" if apex else
                       "no /dev/apex_0 yet: the Edge TPU needs the gasket-dkms driver (edge-agent selftest says how)")
        return choose("coral-devboard")
    if apex and machine in ARM64_MACHINES:
        reasons.append(f"an Edge TPU on PCIe (/dev/{apex[0]}) on an ARM64 board"
                       + (f" ({model!r})" if model else "") + ": the Coral Dev Board's config")
        return choose("coral-devboard")
    if lowered.startswith("raspberry pi"):
        reasons.append(f"/proc/device-tree/model is {model!r}")
        if usb:
            reasons.append(f"Coral USB accelerator at {', '.join(usb)}")
            return choose("rpi-coral-usb")
        reasons.append("no Coral USB accelerator (no USB device 1a6e:089a or 18d1:9302): the CPU-only ARM64 config")
        return choose("generic-arm64")
    # A machine no shipped config names: the generic config of its architecture, saying what else was seen.
    if model:
        reasons.append(f"/proc/device-tree/model is {model!r}, not a board with a config of its own")
    if apex:
        reasons.append(f"an Edge TPU on PCIe (/dev/{apex[0]}) is present; the generic config runs models on the CPU "
                       "(coral-devboard.toml shows the Edge TPU settings)")
    if usb:
        reasons.append(f"a Coral USB accelerator at {', '.join(usb)} is present; the generic config runs models on "
                       "the CPU (rpi-coral-usb.toml shows the Edge TPU settings)")
    if machine in ARM64_MACHINES:
        reasons.append(f"CPU architecture {machine}: the generic ARM64 config")
        return choose("generic-arm64")
    if machine in X86_MACHINES:
        reasons.append(f"CPU architecture {machine}: the generic x86 config")
    else:
        reasons.append(f"CPU architecture {machine or 'unknown'} has no config of its own: the generic Linux config")
    return choose("generic-x86")


def resolve_config_arg(value: str, root: Path | str = Path("/"), machine: str | None = None) -> tuple[str, BoardChoice | None]:
    """``--config``'s value as a file path: ``auto`` detects the board (the choice comes back too);
    a board name (``jetson-orin-nano``) names its shipped config; anything else is a path, as given."""
    if value == AUTO:
        choice = detect_board(root, machine)
        return str(choice.config), choice
    if value in BOARD_CONFIGS and not Path(value).exists():
        return str(CONFIG_DIR / BOARD_CONFIGS[value]), None
    return value, None
