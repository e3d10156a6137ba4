"""``edge-agent push-plan``: a plan written by ``edge-agent plan`` made the running agents' models
with signed commands. A real Mosquitto, a real ``edge-agent run`` process serving other models
than the plan gives its board (one the plan does not want, one at other settings), the real CLI
of both commands: after the push the board serves exactly the plan's models at the plan's
settings and answers requests for them; a second push finds nothing to do; a board of the plan
that runs no agent is reported by name, not waited on for ever.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest

from agent.client import InferenceClient
from agent.fleet.push import _steps_for, planned_boards
from agent.ops.keys import generate_key_pair, load_signing_key
from agent.ops.ctl import send_command
from agent.ops.signing import decode_envelope, sign

ROOT = Path(__file__).resolve().parents[1]
APPS = """apps_version = 1
[fleet]
cpu-2core = 1
[[apps]]
name = "door"
model = "mobilenet_digits"
rate_per_s = 40
slo_ms = 100
[[apps]]
name = "plate"
model = "resnet_digits"
rate_per_s = 10
slo_ms = 300
"""


@pytest.fixture(scope="module")
def plan(tmp_path_factory, broker):
    tmp = tmp_path_factory.mktemp("push")
    (tmp / "apps.toml").write_text(APPS)
    out = tmp / "plan"
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "plan", "--apps", str(tmp / "apps.toml"),
                           "--out", str(out), "--duration", "2", "--search-budget", "1",
                           "--broker", f"{broker.host}:{broker.port}"],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    ops = tmp_path_factory.mktemp("ops")
    ring = tmp_path_factory.mktemp("ring")
    generate_key_pair(ops, "op")
    shutil.copy(ops / "op.pub", ring / "op.pub")
    return {"key": ops / "op.key", "ring": ring}


@pytest.fixture(scope="module")
def board(plan, keys, broker, tmp_path_factory):
    """The plan's one board, running an agent that serves mobilenet_digits at other settings than
    the plan's and camera_digits, which the plan does not give it; resnet_digits it lacks."""
    (device,) = planned_boards(plan)
    planned = {m["name"]: m for m in planned_boards(plan)[device]}
    instances = planned["mobilenet_digits"]["instances"]      # the same: kept, changed in place
    config = tmp_path_factory.mktemp("agent") / "agent.toml"
    config.write_text(f'config_version = 1\n[agent]\ndevice = "{device}"\nworkers = 2\n'
                      f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nsubscribers = ["infer", "cmd"]\n'
                      f'[control]\nkeyring = "{keys["ring"]}"\n[telemetry]\ninterval_s = 0\n'
                      f'[[models]]\nname = "mobilenet_digits"\ncard = "demo:mobilenet_digits"\n'
                      f'instances = {instances}\ndefault_slo_ms = 5000\n[models.batching]\nrule = "fixed"\nsize = 1\nmax_batch = 1\n'
                      f'[[models]]\nname = "camera_digits"\ncard = "demo:camera_digits"\n')
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config), "--http-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    for line in proc.stdout:
        seen.append(line)
        if "serving" in line:
            break
    assert seen and "serving" in seen[-1], "".join(seen)
    drain = threading.Thread(target=lambda: [seen.append(line) for line in proc.stdout], daemon=True)
    drain.start()
    yield device
    proc.terminate()
    proc.wait(timeout=30)
    drain.join(5)
    assert proc.returncode == 0, "".join(seen)


def status(broker, keys, device: str) -> dict:
    envelope = sign("status", {}, device, load_signing_key(keys["key"]), ttl_s=60)
    acks = send_command(broker.host, broker.port, device, "status", envelope, decode_envelope(envelope)[0].command_id,
                        timeout_s=30)
    assert acks and acks[0]["ok"], acks
    return acks[0]["result"]["models"]


def push(plan: Path, keys, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", "push-plan", "--plan", str(plan), "--key",
                           str(keys["key"]), *extra], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_push_makes_the_running_board_serve_the_plans_models(plan, keys, broker, board, digits):
    before = status(broker, keys, board)
    assert set(before) == {"mobilenet_digits", "camera_digits"}
    planned = {m["name"]: m for m in tomllib.loads((plan / "configs" / f"{board}.toml").read_text())["models"]}
    assert set(planned) == {"mobilenet_digits", "resnet_digits"}

    proc = push(plan, keys)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"{board}: unload-model {json.dumps({'model': 'camera_digits'})} -> ok" in out
    assert f"{board}: load-model" in out and '"name": "resnet_digits"' in out
    assert "set-batching" in out and "set-slo-default" in out        # mobilenet kept, its settings the plan's
    assert "1 of 1 boards serve the plan" in out
    # unloads come before loads (the board's memory and slots free first)
    assert out.index("unload-model") < out.index("load-model")

    after = status(broker, keys, board)
    assert set(after) == set(planned)
    for name, table in planned.items():
        assert after[name]["instances"] == table["instances"]
        assert after[name]["batching"]["rule"] == table["batching"]["rule"]
        assert after[name]["batching"]["max_batch"] == table["batching"]["max_batch"]
        assert after[name]["default_slo_ms"] == table["default_slo_ms"]

    frames, _ = digits
    client = InferenceClient(broker.host, broker.port, board, "push-app")
    try:
        reply = client.infer("resnet_digits", {"frames": frames[:1]}, slo_ms=5000, timeout=30)
        assert reply["status"] == "ok", reply
        gone = client.infer("camera_digits", {"frames": frames[:1]}, slo_ms=5000, timeout=30)
        assert gone["status"] == "error" and gone["error"]["code"] == "unknown_model", gone
    finally:
        client.close()

    again = push(plan, keys)                                 # the board serves the plan: nothing to send
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{board}: serves the plan's models already" in again.stdout
    assert "load-model" not in again.stdout and "unload-model" not in again.stdout


def test_a_board_of_the_plan_without_an_agent_is_named_and_skipped(plan, keys, broker, tmp_path):
    copy = tmp_path / "plan"
    shutil.copytree(plan, copy)
    (source,) = planned_boards(plan)
    text = (copy / "configs" / f"{source}.toml").read_text().replace(f'device = "{source}"', 'device = "nobody-1"')
    (copy / "configs" / "nobody-1.toml").write_text(text)
    proc = push(copy, keys, "--device", "nobody-1", "--timeout", "2")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "nobody-1: status {} -> no acknowledgement" in proc.stdout and "no answer from ['nobody-1']" in proc.stdout
    bad = push(copy, keys, "--device", "elsewhere-1", "--timeout", "2")
    assert bad.returncode == 2 and "elsewhere-1" in bad.stderr and "nobody-1" in bad.stderr


def test_the_steps_for_a_board_by_hand():
    """What the push sends, from a status and the plan's tables: unloads first, a model whose
    instances differ is reloaded, one whose batching or SLO differ is changed in place, and
    --keep-others keeps what the plan does not mention."""
    serving = {"a": {"instances": 2, "batching": {"rule": "deadline_aware", "max_batch": 8}, "default_slo_ms": 50.0},
               "b": {"instances": 1, "batching": {"rule": "fixed", "max_batch": 1}, "default_slo_ms": 100.0},
               "old": {"instances": 1, "batching": {"rule": "fixed", "max_batch": 1}, "default_slo_ms": 100.0}}
    a = {"name": "a", "instances": 2, "batching": {"rule": "deadline_aware", "max_batch": 8}, "default_slo_ms": 50.0}
    b = {"name": "b", "instances": 3, "batching": {"rule": "deadline_aware", "max_batch": 4}, "default_slo_ms": 80.0}
    c = {"name": "c", "instances": 1, "batching": {"rule": "deadline_aware", "max_batch": 2}, "default_slo_ms": 30.0}
    assert _steps_for(serving, [a, b, c], keep_others=False) == [
        ("unload-model", {"model": "old"}), ("unload-model", {"model": "b"}),
        ("load-model", b), ("load-model", c)]
    b_same = {**b, "instances": 1}
    assert _steps_for(serving, [a, b_same], keep_others=True) == [
        ("set-batching", {"model": "b", "rule": "deadline_aware", "max_batch": 4}),
        ("set-slo-default", {"model": "b", "slo_ms": 80.0})]
    assert _steps_for(serving, [], keep_others=False) == [
        ("unload-model", {"model": "a"}), ("unload-model", {"model": "b"}), ("unload-model", {"model": "old"})]
