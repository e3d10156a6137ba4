"""`edge-agent model add`: a card written from the file, and the printed [[models]] table serves it."""
import hashlib
import io
import json
import shutil
import signal
import subprocess
import sys
import tomllib
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from agent.cli import main
from agent.models.add import AddError, add_model
from agent.models.card import DEMO_DIR, load_card


def _add(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["model", "add", *argv])
    return code, out.getvalue(), err.getvalue()


def test_model_add_writes_the_card_and_the_printed_table_serves_it_over_http(tmp_path, digits):
    frames, labels = digits
    model_file = tmp_path / "models" / "my digits.onnx"
    model_file.parent.mkdir()
    shutil.copy(DEMO_DIR / "mobilenet_digits.onnx", model_file)

    code, table, said = _add(str(model_file))
    assert code == 0, said
    card_path = model_file.with_suffix(".json")
    card = load_card(card_path)
    assert card.name == "my_digits"                                  # a name usable as a topic level
    assert card.file("onnx").sha256 == hashlib.sha256(model_file.read_bytes()).hexdigest()
    demo = load_card("demo:mobilenet_digits")                        # the hand-written card agrees
    assert card.inputs == demo.inputs and card.outputs == demo.outputs
    raw = json.loads(card_path.read_text())
    assert raw["defaults"]["batch_dynamic"] is True and raw["defaults"]["max_batch"] == 8
    assert raw["defaults"]["default_slo_ms"] >= 20
    assert "wrote" in said and "sha256" in said

    config = tmp_path / "agent.toml"                                 # the table pasted, as printed
    config.write_text('config_version = 1\n[agent]\ndevice = "byo-board"\nworkers = 1\n\n' + table)
    entry = tomllib.loads(config.read_text())["models"][0]
    assert (entry["name"], entry["backend"], entry["file"]) == ("my_digits", "onnxruntime", "onnx")
    assert Path(entry["card"]) == card_path

    process = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config), "--no-mqtt",
                                "--http-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = process.stdout.readline()
        assert "serving ['my_digits'] on http://127.0.0.1:" in line, line + process.stdout.read()
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        import tritonclient.http as triton
        with triton.InferenceServerClient(f"127.0.0.1:{port}") as client:
            frames_in = triton.InferInput("frames", [4, 64, 64, 3], "UINT8")
            frames_in.set_data_from_numpy(frames[:4])
            # a generous SLO: what is tested is the card, not this loaded machine's timing
            logits = client.infer("my_digits", [frames_in], parameters={"slo_ms": 5000}).as_numpy("logits")
        assert list(np.argmax(logits, axis=1)) == list(labels[:4])
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
    assert process.returncode == 0, out


def test_model_add_reads_a_tflite_file_through_litert(tmp_path):
    pytest.importorskip("ai_edge_litert")
    model_file = tmp_path / "digits_int8.tflite"
    shutil.copy(DEMO_DIR / "mobilenet_digits_int8.tflite", model_file)
    added = add_model(model_file, out=tmp_path / "cards" / "digits.json", name="digits")
    card = load_card(added.card_path)
    assert (added.backend, added.variant) == ("litert", "tflite")
    assert card.file("tflite").path == model_file.resolve()          # relative to the card, resolved
    assert [s.dtype.name for s in card.inputs] == ["uint8"] and card.inputs[0].item_shape() == (64, 64, 3)
    assert 'backend = "litert"' in added.models_table()


def test_model_add_refuses_what_it_cannot_card(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(AddError, match="expected a .onnx or .tflite file"):
        add_model(text)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    code, _, said = _add(str(broken))
    assert code == 2 and "broken.onnx: onnxruntime cannot load it" in said
    model_file = tmp_path / "m.onnx"
    shutil.copy(DEMO_DIR / "mobilenet_digits.onnx", model_file)
    model_file.with_suffix(".json").write_text("{}")
    code, _, said = _add(str(model_file))                             # an existing card is never replaced
    assert code == 2 and "exists" in said and model_file.with_suffix(".json").read_text() == "{}"
