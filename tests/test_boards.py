"""Board detection (`--config auto`) on fake root trees, and the shipped board configs themselves."""
import io
import subprocess
import sys
from contextlib import redirect_stderr
from pathlib import Path

import pytest

from agent.cli import main
from agent.config import load_config
from agent.models.card import load_card
from agent.ops.boards import BOARD_CONFIGS, CONFIG_DIR, detect_board, resolve_config_arg

ROOT = Path(__file__).resolve().parents[1]


def fake_board(root: Path, model: str | None = None, tegra_release: str | None = None, apex: bool = False,
               usb: tuple[str, str] | None = None, compatible: str | None = None) -> Path:
    """A root tree with only the files a board of that kind shows (device-tree strings end in NUL)."""
    if model is not None or compatible is not None:
        (root / "proc/device-tree").mkdir(parents=True)
        if model is not None:
            (root / "proc/device-tree/model").write_bytes(model.encode() + b"\x00")
        if compatible is not None:
            (root / "proc/device-tree/compatible").write_bytes(compatible.encode() + b"\x00")
    if tegra_release is not None:
        (root / "etc").mkdir(parents=True)
        (root / "etc/nv_tegra_release").write_text(tegra_release)
    if apex:
        (root / "dev").mkdir(parents=True)
        (root / "dev/apex_0").touch()
    usb_root = root / "sys/bus/usb/devices"
    usb_root.mkdir(parents=True)
    hub = usb_root / "usb1"                   # a root hub: present everywhere, never a Coral
    hub.mkdir()
    (hub / "idVendor").write_text("1d6b\n")
    (hub / "idProduct").write_text("0002\n")
    if usb is not None:
        device = usb_root / "1-1.2"
        device.mkdir()
        (device / "idVendor").write_text(usb[0] + "\n")
        (device / "idProduct").write_text(usb[1] + "\n")
    return root


ORIN_RELEASE = "# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, EABI: aarch64, DATE: Fri Jul 19\n"
XAVIER_RELEASE = "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug 1\n"


@pytest.mark.parametrize("board, machine, tree, expect_in_reasons", [
    ("jetson-orin-nano", "aarch64",
     dict(model="NVIDIA Jetson Orin Nano Developer Kit", tegra_release=ORIN_RELEASE), "Orin Nano"),
    ("jetson-xavier-nx", "aarch64",
     dict(model="NVIDIA Jetson Xavier NX Developer Kit", tegra_release=XAVIER_RELEASE), "Xavier NX"),
    # A carrier board that renamed the model: the L4T release alone still says Jetson (R36 = Orin).
    ("jetson-orin-nano", "aarch64", dict(model="Acme Vision Box", tegra_release=ORIN_RELEASE), "R36"),
    ("jetson-xavier-nx", "aarch64", dict(compatible="nvidia,p3668-0001\x00nvidia,tegra194"), "tegra194"),
    ("coral-devboard", "aarch64", dict(model="Freescale i.MX8MQ Phanbeach", apex=True), "apex_0"),
    ("rpi-coral-usb", "aarch64", dict(model="Raspberry Pi 4 Model B Rev 1.4", usb=("18d1", "9302")), "18d1:9302"),
    ("rpi-coral-usb", "aarch64", dict(model="Raspberry Pi 5 Model B Rev 1.0", usb=("1a6e", "089a")), "1a6e:089a"),
    ("generic-arm64", "aarch64", dict(model="Raspberry Pi 5 Model B Rev 1.0"), "no Coral USB"),
    ("generic-x86", "x86_64", dict(), "x86_64"),
    ("generic-arm64", "aarch64", dict(), "aarch64"),
    # A Coral USB on an x86 box: named in the reasons, but no shipped config pairs it with that host.
    ("generic-x86", "x86_64", dict(usb=("18d1", "9302")), "Coral USB accelerator at 1-1.2 18d1:9302"),
], ids=lambda v: v if isinstance(v, str) and not v.startswith(("aarch", "x86")) else None)
def test_detects_each_board_from_a_fake_tree(tmp_path, board, machine, tree, expect_in_reasons):
    choice = detect_board(fake_board(tmp_path, **tree), machine=machine)
    assert choice.board == board, choice.describe()
    assert choice.config == CONFIG_DIR / BOARD_CONFIGS[board]
    assert choice.config.is_file(), choice.config
    assert any(expect_in_reasons in reason for reason in choice.reasons), choice.reasons


def test_the_jetson_wins_over_the_architecture_and_an_unknown_jetson_says_so(tmp_path):
    choice = detect_board(fake_board(tmp_path, tegra_release="# R32 (release), REVISION: 7.4\n"), machine="aarch64")
    assert choice.board == "jetson-xavier-nx"
    assert "R32" in choice.describe() and "neither the device-tree model" in choice.describe()


def test_every_shipped_config_has_a_board_and_every_board_a_config():
    shipped = {p.name for p in (ROOT / "firmware_configs").glob("*.toml")}
    assert set(BOARD_CONFIGS.values()) == shipped
    # The package's own copy (what an installed agent reads) is the same folder's files.
    assert {p.name for p in CONFIG_DIR.glob("*.toml")} == shipped


@pytest.mark.parametrize("name", sorted(BOARD_CONFIGS.values()))
def test_every_board_config_loads_and_names_files_its_cards_have(name):
    config = load_config(CONFIG_DIR / name)
    assert config.models
    for model in config.models:
        entry = load_card(model.card).file(model.file)     # the variant exists in the card
        assert entry.path.is_file(), (name, model.name, entry.path)


def test_resolve_takes_auto_a_board_name_or_a_path(tmp_path):
    path, choice = resolve_config_arg("auto", root=fake_board(tmp_path, model="Raspberry Pi 4 Model B"),
                                      machine="aarch64")
    assert choice is not None and Path(path) == CONFIG_DIR / "generic-arm64.toml"
    assert resolve_config_arg("jetson-xavier-nx") == (str(CONFIG_DIR / "jetson-xavier-nx.toml"), None)
    assert resolve_config_arg("my/board.toml") == ("my/board.toml", None)


def test_config_auto_prints_its_choice_and_why():
    """`selftest --config auto` on this machine: the detected config is loaded and the choice said."""
    expected = detect_board()
    stderr = io.StringIO()
    with redirect_stderr(stderr):
        code = main(["selftest", "--config", "auto", "--no-mqtt", "--quiet", "--json",
                     "--skip", "core", "files", "models", "accelerators", "headroom"])
    assert code == 0, stderr.getvalue()
    said = stderr.getvalue()
    assert f"--config auto: board {expected.board!r} ({expected.config})" in said, said
    assert expected.reasons[-1] in said


def test_run_config_auto_names_the_board_before_serving():
    """The real command: `edge-agent run --config auto` says which config before it loads models
    (here it stops at once: no intake, since MQTT is off and no HTTP port is given)."""
    process = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", "auto", "--no-mqtt"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "--config auto: board '" in process.stderr and "CPU architecture" in process.stderr, process.stderr
    assert process.returncode == 2 and "no intake" in process.stderr
