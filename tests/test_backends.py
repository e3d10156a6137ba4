"""Backends against the shipped demo models, run by the real runtimes (onnxruntime, LiteRT).

The only thing not exercised for real on a machine without one is the Edge TPU; that test skips
with the reason, and on a Coral board it runs a compiled model through the delegate.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from agent.backends import (
    BACKEND_KINDS,
    Backend,
    BackendError,
    available_backends,
    edgetpu_available,
    load_backend,
)
from agent.models.card import DEMO_DIR, load_card
from agent.models.tensors import TensorSpec

DEMO_MODELS = ("mobilenet_digits", "resnet_digits")
VARIANTS = {"onnx": "onnxruntime", "tflite": "litert", "tflite_int8": "litert"}
CASES = [(model, variant) for model in DEMO_MODELS for variant in VARIANTS]
CASE_IDS = [f"{model}-{variant}" for model, variant in CASES]


@pytest.fixture(scope="module")
def backends():
    """One loaded backend per (model, variant), shared by the module's tests, closed at the end."""
    loaded: dict[tuple[str, str], Backend] = {}

    def get(model: str, variant: str) -> Backend:
        if (model, variant) not in loaded:
            card = load_card(f"demo:{model}")
            loaded[(model, variant)] = load_backend(VARIANTS[variant], card.verify_file(variant))
        return loaded[(model, variant)]

    yield get
    for backend in loaded.values():
        backend.close()


def _logits(backend: Backend, frames: np.ndarray, batch: int = 64) -> np.ndarray:
    return np.concatenate(
        [backend.run({"frames": frames[i : i + batch]})["logits"] for i in range(0, len(frames), batch)]
    )


# ---- the interface ------------------------------------------------------------------------


def test_importing_agent_backends_loads_no_runtime():
    code = (
        "import sys, agent.backends; "
        "loaded = [m for m in ('onnxruntime', 'ai_edge_litert', 'tflite_runtime') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_available_backends_reports_versions():
    available = available_backends()
    assert set(available) == set(BACKEND_KINDS)
    import onnxruntime

    assert available["onnxruntime"].startswith(onnxruntime.__version__)
    assert not available["litert"].startswith("unavailable"), available["litert"]


def test_unknown_kind_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"'torch'.*\['onnxruntime', 'litert'\]"):
        load_backend("torch", DEMO_DIR / "mobilenet_digits.onnx")


@pytest.mark.parametrize("kind", BACKEND_KINDS)
def test_missing_file_is_named(kind, tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(BackendError, match="nope.model"):
        load_backend(kind, missing)


def test_tensor_spec_item_shape():
    spec = TensorSpec("frames", "uint8", (None, 64, 64, 3))
    assert spec.dtype == np.dtype(np.uint8)
    assert spec.item_shape() == (64, 64, 3)
    assert spec == TensorSpec("frames", np.uint8, [None, 64, 64, 3])
    with pytest.raises(BackendError, match=r"'tokens'.*dimension\(s\) \[1\]"):
        TensorSpec("tokens", np.int64, (None, None)).item_shape()


# ---- every demo model, every file ---------------------------------------------------------


def test_demo_models_are_shipped():
    for model in DEMO_MODELS:
        card = load_card(f"demo:{model}")
        for variant in VARIANTS:
            card.verify_file(variant)  # exists and matches the card's sha256


@pytest.mark.parametrize("model, variant", CASES, ids=CASE_IDS)
def test_specs_match_the_card(backends, model, variant):
    backend = backends(model, variant)
    card = load_card(f"demo:{model}")
    assert backend.kind == VARIANTS[variant]
    assert backend.inputs == list(card.inputs)
    assert backend.outputs == list(card.outputs)
    assert backend.inputs[0].item_shape() == (64, 64, 3)


@pytest.mark.parametrize("model, variant", CASES, ids=CASE_IDS)
def test_runs_batch_1_and_batch_5(backends, digits, model, variant):
    backend = backends(model, variant)
    frames = digits[0][:5]
    one = backend.run({"frames": frames[:1]})["logits"]
    five = backend.run({"frames": frames})["logits"]
    assert one.shape == (1, 10) and five.shape == (5, 10)
    assert one.dtype == five.dtype == np.float32
    # An item's result does not depend on the batch it rides in.
    np.testing.assert_allclose(five[:1], one, atol=1e-4)


@pytest.mark.parametrize("model", DEMO_MODELS)
def test_onnx_and_tflite_float_agree(backends, digits, model):
    frames = digits[0][:128]
    onnx_logits = _logits(backends(model, "onnx"), frames)
    tflite_logits = _logits(backends(model, "tflite"), frames)
    np.testing.assert_allclose(tflite_logits, onnx_logits, atol=2e-3, rtol=0)
    assert (tflite_logits.argmax(1) == onnx_logits.argmax(1)).all()


@pytest.mark.parametrize("model, variant", CASES, ids=CASE_IDS)
def test_accuracy_matches_the_card(backends, digits, model, variant):
    frames, labels = digits
    recorded = load_card(f"demo:{model}").file(variant).accuracy
    accuracy = float((_logits(backends(model, variant), frames).argmax(1) == labels).mean())
    assert accuracy >= recorded - 0.01, f"{model} {variant}: {accuracy:.4f} < card {recorded:.4f} - 0.01"


@pytest.mark.parametrize("model", DEMO_MODELS)
def test_int8_model_takes_uint8_frames_and_returns_float32_logits(backends, digits, model):
    int8 = backends(model, "tflite_int8")
    frames = digits[0][:128]
    assert int8.inputs[0].dtype == np.uint8 and int8.outputs[0].dtype == np.float32
    quantised = _logits(int8, frames)
    assert quantised.dtype == np.float32
    float_logits = _logits(backends(model, "onnx"), frames)
    assert (quantised.argmax(1) == float_logits.argmax(1)).mean() >= 0.95


def test_wrong_input_is_a_backend_error_naming_the_tensor(backends):
    backend = backends("mobilenet_digits", "tflite")
    with pytest.raises(BackendError, match=r"'frames' has dtype float32, expected uint8"):
        backend.run({"frames": np.zeros((1, 64, 64, 3), np.float32)})
    with pytest.raises(BackendError, match=r"'frames' has shape \[1, 32, 32, 3\]"):
        backend.run({"frames": np.zeros((1, 32, 32, 3), np.uint8)})
    with pytest.raises(BackendError, match=r"expected exactly \['frames'\]"):
        backend.run({"image": np.zeros((1, 64, 64, 3), np.uint8)})


# ---- onnxruntime specifics ----------------------------------------------------------------


def test_onnxruntime_auto_provider_picks_the_best_available():
    import onnxruntime

    backend = load_backend("onnxruntime", DEMO_DIR / "mobilenet_digits.onnx", providers="auto")
    available = onnxruntime.get_available_providers()
    if "TensorrtExecutionProvider" in available or "CUDAExecutionProvider" in available:
        assert backend.device in ("tensorrt", "cuda")
    else:  # this machine and CI: no GPU
        assert backend.device == "cpu"
        assert backend.providers == ["CPUExecutionProvider"]


def test_onnxruntime_session_uses_one_thread_without_spinning():
    backend = load_backend("onnxruntime", DEMO_DIR / "mobilenet_digits.onnx", threads=1)
    options = backend.session.get_session_options()
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    import onnxruntime

    assert options.execution_mode == onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    assert options.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL


_ARENA_GROWTH = """
import ctypes, sys
import numpy as np
from agent.backends import load_backend
from agent.models.card import DEMO_DIR

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
backend = load_backend("onnxruntime", DEMO_DIR / "resnet_digits.onnx")
run = lambda n: backend.run({"frames": np.zeros((n, 64, 64, 3), np.uint8)})
run(8)                                   # what load_model's warm-up does: one full batch
before = libc.mallinfo2().hblkhd         # the arena's regions are malloc'd apart (mmap), counted here
for n in (8, 1, 8, 1, 7, 2, 7, 2, 8):
    run(n)
print((libc.mallinfo2().hblkhd - before) / 2 ** 20)
"""


def test_onnxruntime_arena_stops_growing_after_a_full_batch():
    """Issue 21's RSS target: once a session has run a full batch, batches up to that size do not
    extend its arena. With onnxruntime's memory patterns on, the second run of a shape takes its
    planned block as one piece and the arena grew by a new 8 MB region for resnet_digits."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("needs glibc's mallinfo2 (glibc 2.33 or later) to see the arena's regions")
    out = subprocess.run([sys.executable, "-c", _ARENA_GROWTH], check=True, capture_output=True, text=True)
    grown_mb = float(out.stdout.split()[-1])
    assert grown_mb < 2.0, f"the session's arena grew by {grown_mb:.1f} MB after its first full batch"
    options = load_backend("onnxruntime", DEMO_DIR / "mobilenet_digits.onnx").session.get_session_options()
    assert options.enable_mem_pattern is False


def test_onnxruntime_unavailable_provider_is_an_error():
    with pytest.raises(BackendError, match=r"NoSuchExecutionProvider.*available: \["):
        load_backend(
            "onnxruntime", DEMO_DIR / "mobilenet_digits.onnx", providers=["NoSuchExecutionProvider"]
        )


# ---- LiteRT specifics ---------------------------------------------------------------------


def test_litert_keeps_a_bounded_cache_of_interpreters_by_batch_size(digits):
    frames = digits[0][:8]
    backend = load_backend("litert", DEMO_DIR / "mobilenet_digits.tflite", max_interpreters=3)
    reference = backend.run({"frames": frames})["logits"]
    for size in (1, 2, 3, 8, 2, 5, 1):
        logits = backend.run({"frames": frames[:size]})["logits"]
        np.testing.assert_allclose(logits, reference[:size], atol=1e-4)
        assert len(backend.cached_batch_sizes) <= 3
        assert backend.cached_batch_sizes[-1] == size  # most recently used last
    assert backend.cached_batch_sizes == [2, 5, 1]

    in_place = load_backend("litert", DEMO_DIR / "mobilenet_digits.tflite", max_interpreters=1)
    for size in (3, 1, 8):
        np.testing.assert_allclose(in_place.run({"frames": frames[:size]})["logits"], reference[:size], atol=1e-4)
        assert in_place.cached_batch_sizes == [size]


def test_litert_instances_on_two_threads_give_the_sequential_results(digits):
    """Concurrent instances (one thread each, invoke releases the GIL) compute the same thing."""
    frames = digits[0][:64]
    instances = [load_backend("litert", DEMO_DIR / "mobilenet_digits.tflite") for _ in range(2)]
    expected = _logits(instances[0], frames, batch=8)
    results: list[np.ndarray | None] = [None, None]

    def serve(slot: int) -> None:
        results[slot] = _logits(instances[slot], frames, batch=8)

    threads = [threading.Thread(target=serve, args=(slot,)) for slot in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        np.testing.assert_array_equal(result, expected)


def test_litert_missing_runtime_says_how_to_install(monkeypatch):
    from agent.backends import litert_backend

    # Simulate a board without either wheel: a None entry makes `import` raise ImportError.
    for name in ("ai_edge_litert", "ai_edge_litert.interpreter", "tflite_runtime", "tflite_runtime.interpreter"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(BackendError, match=r"pip install 'edge-agent\[tflite\]'"):
        litert_backend.LiteRTBackend(DEMO_DIR / "mobilenet_digits.tflite")
    assert available_backends()["litert"].startswith("unavailable:")


def test_litert_delegate_auto_on_an_uncompiled_model_runs_on_the_cpu():
    backend = load_backend("litert", DEMO_DIR / "mobilenet_digits_int8.tflite", delegate="auto")
    assert backend.device == "xnnpack" and backend.delegate == "none"


# ---- Edge TPU ----------------------------------------------------------------------------


def _edgetpu_model(tmp_path) -> Path:
    """A demo model compiled for the Edge TPU: shipped, or compiled here by edgetpu_compiler."""
    shipped = DEMO_DIR / "mobilenet_digits_int8_edgetpu.tflite"
    if shipped.is_file():
        return shipped
    compiler = shutil.which("edgetpu_compiler")
    if compiler is None:
        pytest.skip("Edge TPU present but no compiled model: ship "
                    f"{shipped.name} or install edgetpu_compiler (Coral apt repo) to compile one")
    subprocess.run([compiler, "-s", "-o", str(tmp_path), str(DEMO_DIR / "mobilenet_digits_int8.tflite")], check=True)
    return tmp_path / "mobilenet_digits_int8_edgetpu.tflite"


def test_edgetpu_runs_a_compiled_model_through_the_delegate(tmp_path, digits):
    present, reason = edgetpu_available()
    if not present:
        pytest.skip(f"no Edge TPU: {reason}")
    path = _edgetpu_model(tmp_path)
    backend = load_backend("litert", path, delegate="edgetpu")
    assert backend.device == "edgetpu"
    frames, labels = digits
    accuracy = float((_logits(backend, frames, batch=5).argmax(1) == labels).mean())
    recorded = load_card("demo:mobilenet_digits").file("tflite_int8").accuracy
    assert accuracy >= recorded - 0.02


def test_edgetpu_demanded_but_absent_names_the_library_and_apt_repo():
    present, _ = edgetpu_available()
    if present:
        pytest.skip("an Edge TPU is attached: the missing-TPU error cannot be produced here")
    with pytest.raises(BackendError, match=r"libedgetpu\.so\.1.*coral-edgetpu-stable"):
        load_backend("litert", DEMO_DIR / "mobilenet_digits_int8.tflite", delegate="edgetpu")


# ---- quantised inputs and outputs ----------------------------------------------------------
# The demo int8 files keep uint8 frames in and float32 logits out (quantisation is inside the
# graph). Models with int8 tensors at the boundary (the usual full-integer and Edge TPU layout)
# must still meet the card's interface: this builds such a model, small but real, with the
# flatbuffers schema that ships with LiteRT, and runs it in the real interpreter.


def _write_int8_io_model(path: Path, input_quant: tuple[float, int], output_quant: tuple[float, int],
                         weights: np.ndarray, bias: np.ndarray, fixed_batch: int | None = None) -> None:
    """frames int8 [N,64,64,3] -> DEQUANTIZE -> MEAN(H,W) -> FULLY_CONNECTED -> QUANTIZE -> int8 [N,10].

    ``fixed_batch``: a model whose batch is fixed at that size (as Edge TPU models are) instead of
    dynamic."""
    flatbuffers = pytest.importorskip("flatbuffers")
    schema = pytest.importorskip("ai_edge_litert.schema_py_generated")
    buffers, tensors, opcodes, operators = [schema.BufferT()], [], [], []

    def tensor(name, shape, tensor_type, data=None, signature=None, quant=None):
        buffer = schema.BufferT()
        if data is not None:
            buffer.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
        buffers.append(buffer)
        t = schema.TensorT()
        t.name, t.shape, t.type, t.buffer = name, list(shape), tensor_type, len(buffers) - 1
        if signature is not None:
            t.shapeSignature = list(signature)
        if quant is not None:
            t.quantization = schema.QuantizationParametersT()
            t.quantization.scale, t.quantization.zeroPoint = [quant[0]], [quant[1]]
        tensors.append(t)
        return len(tensors) - 1

    def operator(code, inputs, outputs, options_type=0, options=None):
        opcode = schema.OperatorCodeT()
        opcode.builtinCode = opcode.deprecatedBuiltinCode = code
        opcode.version = 1
        opcodes.append(opcode)
        op = schema.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = len(opcodes) - 1, inputs, outputs
        if options is not None:
            op.builtinOptionsType, op.builtinOptions = options_type, options
        operators.append(op)

    types, ops = schema.TensorType, schema.BuiltinOperator
    n = fixed_batch or 1
    dim0 = fixed_batch or -1
    frames = tensor("frames", [n, 64, 64, 3], types.INT8, signature=[dim0, 64, 64, 3], quant=input_quant)
    real = tensor("real", [n, 64, 64, 3], types.FLOAT32, signature=[dim0, 64, 64, 3])
    operator(ops.DEQUANTIZE, [frames], [real])
    axes = tensor("axes", [2], types.INT32, data=np.array([1, 2], np.int32))
    pooled = tensor("pooled", [n, 3], types.FLOAT32, signature=[dim0, 3])
    reducer = schema.ReducerOptionsT()
    reducer.keepDims = False
    operator(ops.MEAN, [real, axes], [pooled], schema.BuiltinOptions.ReducerOptions, reducer)
    w = tensor("w", [10, 3], types.FLOAT32, data=weights.astype(np.float32))
    b = tensor("b", [10], types.FLOAT32, data=bias.astype(np.float32))
    dense = tensor("dense", [n, 10], types.FLOAT32, signature=[dim0, 10])
    operator(ops.FULLY_CONNECTED, [pooled, w, b], [dense], schema.BuiltinOptions.FullyConnectedOptions,
             schema.FullyConnectedOptionsT())
    logits = tensor("logits", [n, 10], types.INT8, signature=[dim0, 10], quant=output_quant)
    operator(ops.QUANTIZE, [dense], [logits])

    subgraph = schema.SubGraphT()
    subgraph.tensors, subgraph.operators = tensors, operators
    subgraph.inputs, subgraph.outputs = [frames], [logits]
    model = schema.ModelT()
    model.version, model.operatorCodes, model.subgraphs, model.buffers = 3, opcodes, [subgraph], buffers
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(builder.Output())


@pytest.mark.parametrize(
    "input_quant, fixed_batch",
    [((1.0, -128), None), ((2.0, -100), None), ((1.0, -128), 2)],
    ids=["shift", "affine", "fixed-batch-2"],
)
def test_litert_int8_boundary_tensors_meet_the_uint8_in_float32_out_interface(
    tmp_path, digits, input_quant, fixed_batch
):
    rng = np.random.default_rng(0)
    weights, bias = rng.normal(0, 0.02, (10, 3)), rng.normal(0, 0.5, 10)
    output_quant = (0.05, 3)
    path = tmp_path / "int8_io.tflite"
    _write_int8_io_model(path, input_quant, output_quant, weights, bias, fixed_batch)

    backend = load_backend("litert", path)
    assert backend.inputs == [TensorSpec("frames", np.uint8, (None, 64, 64, 3))]
    assert backend.outputs == [TensorSpec("logits", np.float32, (None, 10))]
    frames = digits[0][:5]  # with a fixed batch of 2: invokes of 2, 2 and a padded 1
    logits = backend.run({"frames": frames})["logits"]
    assert logits.dtype == np.float32 and logits.shape == (5, 10)
    np.testing.assert_array_equal(backend.run({"frames": frames[:1]})["logits"], logits[:1])
    if fixed_batch:
        assert backend.cached_batch_sizes == [fixed_batch]  # never resized, run in chunks

    # The same computation in numpy: the frame value u is the real input value.
    scale, zero = input_quant
    q = np.clip(np.rint(frames.astype(np.float64) / scale + zero), -128, 127)
    pooled = ((q - zero) * scale).mean(axis=(1, 2))
    expected = pooled @ weights.T + bias
    np.testing.assert_allclose(logits, expected, atol=output_quant[0])  # one output step


def test_loading_an_onnx_model_turns_onnxruntime_telemetry_off(monkeypatch):
    """The agent talks to its broker and its clients only: loading a model turns onnxruntime's
    telemetry events off (seen looking up its telemetry host at exit, inside the lab's namespaces)."""
    import onnxruntime
    calls = []
    monkeypatch.setattr(onnxruntime, "disable_telemetry_events", lambda: calls.append(True), raising=False)
    load_backend("onnxruntime", DEMO_DIR / "mobilenet_digits.onnx").close()
    assert calls
