"""The Triton side-by-side harness: the model repository it writes, and a real tritonserver.

The repository tests are pure and run everywhere. The server test needs the ``triton`` extra
(nvidia-pytriton, which pins numpy < 2), so it runs from ``.venv-triton`` and is skipped elsewhere.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from agent.models.card import DEMO_DIR
from agent.models.digits import frames_from_digits, load_test_set
from edge_lab.bench.triton.server import (
    MODEL_PY,
    NO_DEFAULT_TIMEOUT_US,
    TritonServer,
    TritonSetting,
    session_pids,
    write_model_repository,
)

TRITON_SKIP_REASON = (
    "nvidia-pytriton (tritonserver) is not installed here; install the lab's triton extra into its own "
    "venv: bash tools/dev.sh triton, then run .venv-triton/bin/python -m pytest tests/test_triton_harness.py"
)


def _field(text: str, name: str) -> str:
    match = re.search(rf"\b{name}: *([^\n]+)", text)
    assert match, f"{name} missing from config.pbtxt:\n{text}"
    return match.group(1).strip()


def test_config_pbtxt_has_what_the_setting_says(tmp_path):
    setting = TritonSetting(
        max_batch_size=16, preferred_batch_sizes=(4, 8), max_queue_delay_us=500, instances=3, queue_timeout_us=20_000
    )
    root = write_model_repository(
        tmp_path / "repo",
        [("mobilenet_digits", DEMO_DIR / "mobilenet_digits.json"), ("resnet", DEMO_DIR / "resnet_digits.onnx")],
        setting,
    )
    assert sorted(p.name for p in root.iterdir()) == ["mobilenet_digits", "resnet"]
    for name, onnx in (("mobilenet_digits", "mobilenet_digits.onnx"), ("resnet", "resnet_digits.onnx")):
        text = (root / name / "config.pbtxt").read_text()
        assert _field(text, "name") == f'"{name}"'
        assert _field(text, "backend") == '"python"'
        assert _field(text, "max_batch_size") == "16"
        # item shapes without the batch dim (Triton adds it when max_batch_size > 0)
        assert 'name: "frames" data_type: TYPE_UINT8 dims: [ 64, 64, 3 ]' in text
        assert 'name: "logits" data_type: TYPE_FP32 dims: [ 10 ]' in text
        assert _field(text, "preferred_batch_size") == "[ 4, 8 ]"
        assert _field(text, "max_queue_delay_microseconds") == "500"
        assert _field(text, "timeout_action") == "REJECT"
        assert _field(text, "default_timeout_microseconds") == "20000"
        assert _field(text, "allow_timeout_override") == "true"
        assert "count: 3 kind: KIND_CPU" in text
        assert f'string_value: "{(DEMO_DIR / onnx).resolve()}"' in text
        assert (root / name / "1" / "model.py").read_text() == MODEL_PY.read_text()


def test_no_default_timeout_still_lets_requests_set_one(tmp_path):
    """Triton honours a request's timeout only below the default, and 0 means none: so "no default"
    must be written as a large default, or per-request timeouts would be silently ignored."""
    root = write_model_repository(tmp_path, [("m", DEMO_DIR / "mobilenet_digits.json")], TritonSetting())
    text = (root / "m" / "config.pbtxt").read_text()
    assert _field(text, "default_timeout_microseconds") == str(NO_DEFAULT_TIMEOUT_US)
    assert "preferred_batch_size" not in text
    assert _field(text, "max_queue_delay_microseconds") == "0"
    assert "count: 2 kind: KIND_CPU" in text


def test_setting_describe_and_validation():
    setting = TritonSetting(preferred_batch_sizes=(4, 8), max_queue_delay_us=500)
    assert setting.describe() == "2 instances, max batch 8, preferred [4,8], delay 500 us"
    assert setting.as_dict()["preferred_batch_sizes"] == [4, 8]
    with pytest.raises(ValueError, match=r"preferred_batch_sizes = \(16,\): expected integers in 1..max_batch_size \(8\)"):
        TritonSetting(preferred_batch_sizes=(16,))
    with pytest.raises(ValueError, match="instances = 0"):
        TritonSetting(instances=0)


def test_an_onnx_file_without_a_card_beside_it_is_refused(tmp_path):
    lonely = tmp_path / "model.onnx"
    lonely.write_bytes((DEMO_DIR / "mobilenet_digits.onnx").read_bytes())
    with pytest.raises(Exception, match="expected its model card beside it"):
        write_model_repository(tmp_path / "repo", [("m", lonely)], TritonSetting())


def _direct_logits(onnx_path: Path, frames: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"frames": frames})[0]


def test_real_tritonserver_serves_the_demo_models(tmp_path):
    pytest.importorskip("pytriton", reason=TRITON_SKIP_REASON)
    httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")

    images, labels = load_test_set()
    frames = frames_from_digits(images[:40])
    models = ("mobilenet_digits", "resnet_digits")
    root = write_model_repository(
        tmp_path / "repo", [(m, DEMO_DIR / f"{m}.json") for m in models], TritonSetting(instances=1)
    )
    server = TritonServer(root, log_path=tmp_path / "tritonserver.log").start(timeout_s=60)
    try:
        pids = server.tree_pids()
        assert server.pid in pids and len(pids) == 1 + len(models), pids     # server + one stub per instance
        client = httpclient.InferenceServerClient(server.url)
        try:
            assert client.is_server_ready()
            for model in models:
                metadata = client.get_model_metadata(model)
                assert metadata["inputs"] == [{"name": "frames", "datatype": "UINT8", "shape": [-1, 64, 64, 3]}]
                assert metadata["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
                served = []
                for batch in (frames[:8], frames[8:9], frames[9:16]):
                    request = httpclient.InferInput("frames", list(batch.shape), "UINT8")
                    request.set_data_from_numpy(batch, binary_data=True)
                    served.append(client.infer(model, [request]).as_numpy("logits"))
                served = np.concatenate(served)
                direct = _direct_logits(DEMO_DIR / f"{model}.onnx", frames[:16])
                np.testing.assert_array_equal(served.argmax(axis=1), direct.argmax(axis=1))
                np.testing.assert_allclose(served, direct, atol=1e-4)
                assert (served.argmax(axis=1) == labels[:16]).mean() >= 0.9
        finally:
            client.close()
    finally:
        session = server.pid
        server.stop()
    assert session_pids(session) == []
    assert not list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))
