"""The self-test: it passes on a board that can serve the demo, and every failure names what broke
and what to do (a damaged model file, a card whose golden outputs the file does not reproduce, an
unreachable broker, a missing Edge TPU a config needs, a missing compiled core)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import agent.core.pure as pure
from agent.config import Config, load_config
from agent.models.card import DEMO_DIR
from agent.ops import selftest
from agent.ops.selftest import Report, check_broker, check_edgetpu, core_vector, run_selftest

ROOT = Path(__file__).resolve().parents[1]
FAST = ("core", "files", "accelerators", "headroom")   # groups that run no model and need no broker


def edge_agent(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=120, **kw)


def write_config(path: Path, *, port: int | None, models: str) -> Path:
    mqtt = f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\n' if port else "[mqtt]\nenabled = false\n"
    path.write_text(f'config_version = 1\n[agent]\ndevice = "selftest-board"\n{mqtt}{models}')
    return path


def model_table(name: str, card: str, backend: str = "onnxruntime", file: str = "onnx") -> str:
    return (f'[[models]]\nname = "{name}"\ncard = "{card}"\nbackend = "{backend}"\nfile = "{file}"\n'
            '[models.batching]\nrule = "deadline_aware"\nmax_batch = 4\n')


@pytest.fixture()
def model_copy(tmp_path: Path) -> Path:
    """The demo models and cards, copied where a test may damage them."""
    target = tmp_path / "models"
    shutil.copytree(DEMO_DIR, target)
    return target


def rows(report: dict | Report) -> dict[str, dict]:
    checks = report["checks"] if isinstance(report, dict) else [c.to_dict() for c in report.checks]
    return {c["check"]: c for c in checks}


def free_closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]      # closed again when the with block ends


def test_demo_config_passes_with_a_real_broker(broker, tmp_path):
    config = write_config(tmp_path / "board.toml", port=broker.port,
                          models=model_table("mobilenet_digits", "demo:mobilenet_digits")
                          + model_table("resnet_digits", "demo:resnet_digits"))
    out = edge_agent("selftest", "--config", str(config), "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] is True and report["counts"]["fail"] == 0
    by_name = rows(report)
    assert by_name["core"]["status"] == "ok" and by_name["core"]["figures"]["values_compared"] > 50
    for model in ("mobilenet_digits", "resnet_digits"):
        assert by_name[f"model {model}: sha256"]["status"] == "ok"
        golden = by_name[f"model {model}: golden"]
        assert golden["status"] == "ok" and golden["figures"]["max_abs_diff"] <= golden["figures"]["atol"]
        assert by_name[f"model {model}: latency"]["status"] in ("ok", "warn")      # drift only warns
        assert by_name[f"model {model}: latency"]["figures"]["measured_ms"]["1"] > 0
    broker_row = by_name["broker"]
    assert broker_row["status"] == "ok" and f"127.0.0.1:{broker.port}" in broker_row["detail"]
    assert len(broker_row["figures"]["round_trip_ms"]) == selftest.BROKER_ROUND_TRIPS
    assert {"edge tpu", "jetson gpu", "disk", "memory", "temperature", "policy", "profile"} <= set(by_name)
    assert "model resnet_digits" not in out.stderr      # stderr is a pipe here: no progress bar (agent.progress)


def test_tampered_model_file_fails_its_sha256_naming_the_file(model_copy, tmp_path):
    onnx = model_copy / "mobilenet_digits.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    config = write_config(tmp_path / "board.toml", port=None,
                          models=model_table("mobilenet_digits", str(model_copy / "mobilenet_digits.json")))
    out = edge_agent("selftest", "--config", str(config), "--json", "-q")
    assert out.returncode == 1, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] is False
    sha = rows(report)["model mobilenet_digits: sha256"]
    assert sha["status"] == "fail" and str(onnx) in sha["detail"] and "sha256" in sha["detail"]
    assert "copy mobilenet_digits.onnx again" in sha["fix"]
    assert rows(report)["model mobilenet_digits: golden"]["status"] == "skip"
    table = edge_agent("selftest", "--config", str(config), "-q")               # the table says the same
    assert table.returncode == 1 and "FAIL" in table.stdout and "selftest FAILED" in table.stdout


def test_altered_golden_output_fails_the_golden_check(model_copy, tmp_path):
    card_path = model_copy / "resnet_digits.json"
    card = json.loads(card_path.read_text())
    card["golden"]["outputs"]["logits"][3][6] += 0.01          # ten times the float files' atol
    card_path.write_text(json.dumps(card))
    config = load_config(write_config(tmp_path / "board.toml", port=None,
                                      models=model_table("resnet_digits", str(card_path))))
    report = run_selftest(config, groups=["models"])
    assert not report.ok and report.exit_code == 1
    golden = rows(report)["model resnet_digits: golden"]
    assert golden["status"] == "fail"
    assert "item 3" in golden["detail"] and "atol 0.001" in golden["detail"] and golden["fix"]
    assert rows(report)["model resnet_digits: sha256"]["status"] == "ok"


def test_int8_file_passes_within_its_own_looser_tolerance(tmp_path):
    pytest.importorskip("ai_edge_litert")
    config = load_config(write_config(tmp_path / "board.toml", port=None,
                                      models=model_table("mobilenet_digits", "demo:mobilenet_digits", "litert", "tflite_int8")))
    golden = rows(run_selftest(config, groups=["models"]))["model mobilenet_digits: golden"]
    assert golden["status"] == "ok", golden
    assert golden["figures"]["atol"] == 0.5 and golden["figures"]["max_abs_diff"] > 1e-3   # int8 is not exact


def test_drift_beyond_the_factor_warns_and_does_not_fail(model_copy, tmp_path):
    card_path = model_copy / "mobilenet_digits.json"
    card = json.loads(card_path.read_text())
    figures = card["provenance"]["latency_ms_per_image_1thread_build_host"]
    for key in figures:
        figures[key] /= 1000.0           # a board a thousand times faster than this one
    card_path.write_text(json.dumps(card))
    config = load_config(write_config(tmp_path / "board.toml", port=None,
                                      models=model_table("mobilenet_digits", str(card_path))))
    report = run_selftest(config, groups=["models"])
    latency = rows(report)["model mobilenet_digits: latency"]
    assert latency["status"] == "warn" and "beyond 2x" in latency["detail"] and "edge-agent profile" in latency["fix"]
    assert report.ok


def test_broker_on_a_closed_port_fails_naming_host_and_port():
    port = free_closed_port()
    check = check_broker(Config.demo(mqtt_port=port), timeout_s=5.0)
    assert check.status == "fail"
    assert f"127.0.0.1:{port}" in check.detail and f"127.0.0.1:{port}" in check.fix and "mosquitto" in check.fix


def test_broker_failure_sets_the_exit_code_and_no_mqtt_skips_it():
    port = free_closed_port()
    report = run_selftest(Config.demo(mqtt_port=port), groups=["broker"])
    assert report.exit_code == 1 and rows(report)["broker"]["status"] == "fail"
    out = edge_agent("selftest", "--no-mqtt", "--skip", "models", "--json", "-q")
    assert out.returncode == 0, out.stdout + out.stderr
    assert rows(json.loads(out.stdout))["broker"]["status"] == "skip"


def test_a_config_that_needs_an_edge_tpu_fails_without_one(model_copy, tmp_path):
    # A card whose file variant is an Edge TPU build: the config asks for the TPU, this machine has none.
    card_path = model_copy / "mobilenet_digits.json"
    card = json.loads(card_path.read_text())
    card["files"]["tflite_edgetpu"] = dict(card["files"]["tflite_int8"])
    card_path.write_text(json.dumps(card))
    needing = load_config(write_config(tmp_path / "tpu.toml", port=None, models=model_table(
        "mobilenet_digits", str(card_path), "litert", "tflite_edgetpu")))
    if selftest.find_edgetpus()["pcie"] or selftest.find_edgetpus()["usb"]:
        pytest.skip("this machine has an Edge TPU")
    check = check_edgetpu(needing)
    assert check.status == "fail" and "mobilenet_digits" in check.detail and "libedgetpu1-std" in check.fix
    assert check_edgetpu(Config.demo()).status == "skip"                  # not asked for: not a failure


def test_edgetpu_found_on_usb_and_pcie_from_sysfs(tmp_path):
    # This machine has no Edge TPU: a sysfs and /dev laid out as a board with one shows what is read.
    usb = tmp_path / "sys/bus/usb/devices/2-1"
    usb.mkdir(parents=True)
    (usb / "idVendor").write_text("1a6e\n")
    (usb / "idProduct").write_text("089a\n")
    pci = tmp_path / "sys/bus/pci/devices/0000:01:00.0"
    pci.mkdir(parents=True)
    (pci / "vendor").write_text("0x1ac1\n")
    (pci / "device").write_text("0x089a\n")
    (tmp_path / "dev").mkdir()
    found = selftest.find_edgetpus(tmp_path / "sys", tmp_path / "dev")
    assert found == {"pcie": [], "pcie_no_driver": ["0000:01:00.0"], "usb": ["2-1 1a6e:089a"]}
    (tmp_path / "dev/apex_0").touch()
    assert selftest.find_edgetpus(tmp_path / "sys", tmp_path / "dev")["pcie"] == [str(tmp_path / "dev/apex_0")]


def test_compiled_core_agrees_with_the_twin_and_a_difference_is_named():
    compiled = selftest._compiled_core()
    assert core_vector(compiled) == core_vector(pure)
    skewed = dict(vars(pure), FixedBatch=lambda size: pure.FixedBatch(size + 1))   # a core that miscomputes
    difference = selftest._first_difference(core_vector(type("Skewed", (), skewed)), core_vector(pure))
    assert difference and difference.startswith("plans.fixed")


def test_without_the_compiled_core_the_twin_is_a_warning(tmp_path):
    shutil.copytree(ROOT / "agent", tmp_path / "agent", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path), EDGE_AGENT_CORE="python")
    out = subprocess.run([sys.executable, "-m", "agent.cli", "selftest", "--skip", "models", "broker", "--json", "-q"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    core = rows(json.loads(out.stdout))["core"]
    assert core["status"] == "warn" and "does not load" in core["detail"] and "pip install -e ." in core["fix"]


def test_headroom_reads_thermal_zones_and_meminfo(tmp_path):
    zone = tmp_path / "thermal_zone0"
    zone.mkdir()
    (zone / "temp").write_text("47500\n")
    (zone / "type").write_text("cpu-thermal\n")
    (tmp_path / "thermal_zone1").mkdir()                       # a zone without a reading is left out
    assert selftest.read_thermal_zones(tmp_path) == {"cpu-thermal": 47.5}
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        1000 kB\nMemAvailable:     600 kB\nHugePages_Total:       0\n")
    assert selftest.read_meminfo(meminfo) == {"MemTotal": 1024000, "MemAvailable": 614400, "HugePages_Total": 0}
    report = run_selftest(Config.demo(), groups=FAST)
    for name in ("disk", "memory", "temperature"):
        assert rows(report)[name]["status"] in ("ok", "warn", "skip")    # absent is "not exposed", not a failure


def test_a_bad_config_exits_2_naming_the_field(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('config_version = 1\n[[models]]\nname = "m"\ninstances = 0\n')
    out = edge_agent("selftest", "--config", str(bad))
    assert out.returncode == 2 and "models[0].instances = 0" in out.stderr


def test_a_learned_policy_is_checked_and_a_damaged_one_fails_naming_its_weights(tmp_path):
    """[agent] policy = "learned": the shipped policy passes for the demo models; one whose weights
    were altered fails with the sha256 named (loading the config does not look at the card), and
    one trained for other models fails naming the lanes. The exit code says so."""
    models = (model_table("mobilenet_digits", "demo:mobilenet_digits")
              + model_table("resnet_digits", "demo:resnet_digits"))

    def config_with(policy_dir: Path, table: str = models) -> Path:
        path = tmp_path / f"{policy_dir.name}-{len(table)}.toml"
        path.write_text(f'config_version = 1\n[agent]\ndevice = "selftest-board"\npolicy = "learned"\n'
                        f'policy_path = "{policy_dir}"\n[mqtt]\nenabled = false\n{table}')
        return path

    shipped = ROOT / "policies" / "cpu-2core"
    good = rows(run_selftest(load_config(config_with(shipped)), groups=["files"]))["policy"]
    assert good["status"] == "ok" and "policy.npz matches its card" in good["detail"], good

    damaged = tmp_path / "damaged"
    shutil.copytree(shipped, damaged)
    weights = damaged / "policy.npz"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    out = edge_agent("selftest", "--config", str(config_with(damaged)), "--skip", "core", "models", "accelerators",
                     "headroom", "--json", "-q")
    assert out.returncode == 1, out.stdout + out.stderr
    row = rows(json.loads(out.stdout))["policy"]
    assert row["status"] == "fail" and "policy.npz have sha256" in row["detail"] and "policy_path" in row["fix"], row

    one_model = rows(run_selftest(load_config(config_with(shipped, model_table("mobilenet_digits",
                                                                                "demo:mobilenet_digits"))),
                                  groups=["files"]))["policy"]
    assert one_model["status"] == "fail" and "lanes" in one_model["detail"], one_model


def test_a_jetson_whose_onnxruntime_lacks_the_gpu_providers_is_warned_with_what_to_install(tmp_path):
    import onnxruntime
    if set(onnxruntime.get_available_providers()) & set(selftest.GPU_PROVIDERS):
        pytest.skip("this onnxruntime offers a GPU provider: the warning cannot show here")
    jetson = tmp_path / "jetson"
    (jetson / "etc").mkdir(parents=True)
    (jetson / "etc" / "nv_tegra_release").write_text("# R36 (release), REVISION: 3.0, GCID: 1, BOARD: generic\n")
    row = selftest.check_jetson_gpu(jetson)
    assert row.status == "warn" and "R36 (release)" in row.detail and "models run on the CPU" in row.detail
    assert "nvidia-jetpack" in row.fix and "onnxruntime-gpu" in row.fix
    elsewhere = selftest.check_jetson_gpu(tmp_path / "x86")
    assert elsewhere.status == "skip" and "not a Jetson" in elsewhere.detail
