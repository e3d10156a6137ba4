"""Split points: every shipped head then tail computes the full model on the test set; the card's
files and digests are the ones shipped; the card API says clearly what is wrong with a bad entry;
the split tool's separator check rejects a tensor a skip connection crosses."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from agent.backends import load_backend
from agent.models.card import DEMO_DIR, CardError, load_card
from agent.models.digits import card_test_set

ROOT = Path(__file__).resolve().parents[1]


def cards_with_split_points():
    cards = [load_card(path) for path in sorted(DEMO_DIR.glob("*.json"))]
    return [card for card in cards if card.split_points]


def split_cases():
    return [pytest.param(card.source, point.name, id=f"{card.name}-{point.name}")
            for card in cards_with_split_points() for point in card.split_points]


#: Items checked per model where the whole test set would take too long here (the camera-sized model
#: costs ~10 ms an item; tools/split_models.py checked every item when it cut the files).
TEST_ITEMS = {"camera_digits": 96}


@lru_cache(maxsize=None)
def full_outputs(source: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frames, labels, the full model's outputs) of a card's test set, computed once per card."""
    card = load_card(source)
    frames, labels = card_test_set(card.raw["dataset"], card.source.parent)
    items = TEST_ITEMS.get(card.name, len(labels))
    frames, labels = frames[:items], labels[:items]
    full = load_backend("onnxruntime", card.verify_file("onnx"), threads=2, providers=["CPUExecutionProvider"])
    try:
        expected = run_chunks(full, card.inputs[0].name, frames, sizes=(64,))[card.outputs[0].name]
    finally:
        full.close()
    return frames, labels, expected


def run_chunks(backend, name: str, x: np.ndarray, sizes=(64, 7)) -> dict[str, np.ndarray]:
    """Run x in chunks of varying size (the batch dimension is dynamic in every cut graph)."""
    parts: dict[str, list[np.ndarray]] = {}
    i, k = 0, 0
    while i < len(x):
        step = sizes[k % len(sizes)]
        for key, value in backend.run({name: np.ascontiguousarray(x[i:i + step])}).items():
            parts.setdefault(key, []).append(value)
        i, k = i + step, k + 1
    return {key: np.concatenate(v) for key, v in parts.items()}


def test_the_demo_models_ship_split_points():
    names = {card.name: [p.name for p in card.split_points] for card in cards_with_split_points()}
    assert len(names.get("resnet_digits", [])) >= 2 and len(names.get("mobilenet_digits", [])) >= 2
    assert len(names.get("camera_digits", [])) >= 2


def test_camera_frames_are_deterministic_per_seed_and_item():
    from agent.models.digits import camera_frames, load_test_set
    images, _ = load_test_set()
    a = camera_frames(images[:6], seed=5)
    assert a.shape == (6, 160, 160, 3) and a.dtype == np.uint8
    assert np.array_equal(camera_frames(images[:3], seed=5), a[:3])        # a prefix is the same frames
    assert not np.array_equal(camera_frames(images[:3], seed=6), a[:3])
    with pytest.raises(ValueError, match=r"expected shape \[N, 8, 8\]"):
        camera_frames(images[0], seed=5)


@pytest.mark.parametrize("source,split", split_cases())
def test_head_then_tail_equals_the_full_model_on_the_test_set(source, split):
    card = load_card(source)
    point = card.split_point(split)
    frames, labels, expected = full_outputs(card.source)
    (spec_in,), (spec_out,) = card.inputs, card.outputs
    head = load_backend("onnxruntime", point.verify_head(), threads=2, providers=["CPUExecutionProvider"])
    tail = load_backend("onnxruntime", point.verify_tail(), threads=2, providers=["CPUExecutionProvider"])
    try:
        # the interfaces the card promises: head = model inputs -> the tensor, tail = tensor -> model outputs
        assert [(s.name, s.dtype, s.shape) for s in head.inputs] == [(spec_in.name, spec_in.dtype, spec_in.shape)]
        assert [(s.name, s.dtype, s.shape) for s in head.outputs] == [(point.tensor, np.dtype("float32"), point.spec.shape)]
        assert [(s.name, s.dtype, s.shape) for s in tail.inputs] == [(point.tensor, np.dtype("float32"), point.spec.shape)]
        assert [(s.name, s.dtype) for s in tail.outputs] == [(spec_out.name, spec_out.dtype)]
        assert point.spec.shape[0] is None and point.bytes_per_item == 4 * int(np.prod(point.spec.shape[1:]))
        mid = run_chunks(head, spec_in.name, frames)[point.tensor]
        got = run_chunks(tail, point.tensor, mid, sizes=(64, 5))[spec_out.name]
    finally:
        for backend in (head, tail):
            backend.close()
    assert mid.shape == (len(frames), *point.spec.item_shape()) and mid.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert np.array_equal(got.argmax(1), expected.argmax(1))
    if len(labels) == card.raw["dataset"]["test_size"]:
        accuracy = float((got.argmax(1) == labels).mean())
        assert accuracy == pytest.approx(card.raw["files"]["onnx"]["accuracy"], abs=6e-4)


@pytest.mark.parametrize("source,split", split_cases())
def test_the_card_records_the_shipped_files_and_a_profile(source, split):
    card = load_card(source)
    point = card.split_point(split)
    raw = next(e for e in card.raw["split_points"] if e["name"] == split)
    for part, path, digest in (("head", point.head_path, point.head_sha256), ("tail", point.tail_path, point.tail_sha256)):
        assert path.parent == card.source.parent and path.name == f"{card.name}.{part}.{split}.onnx"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest == raw[part]["sha256"]
        assert raw[part]["bytes"] == path.stat().st_size
    profile = point.profile
    assert profile["batch_sizes"] == [1, 2, 4, 8] and profile["host"]
    for key in ("head_ms", "tail_ms", "full_ms"):
        assert len(profile[key]) == 4 and all(v > 0 for v in profile[key])


def test_split_point_lookup_names_the_known_points():
    card = load_card("demo:resnet_digits")
    assert card.split_point("stage2").tensor == "stage2_out"
    with pytest.raises(KeyError) as info:
        card.split_point("stage9")
    assert "stage9" in str(info.value) and "stage2" in str(info.value) and "resnet_digits" in str(info.value)


def test_a_card_without_split_points_has_an_empty_list(tmp_path):
    raw = json.loads((DEMO_DIR / "mobilenet_digits.json").read_text())
    del raw["split_points"]
    path = tmp_path / "card.json"
    path.write_text(json.dumps(raw))
    assert load_card(path).split_points == []


@pytest.fixture()
def card_copy(tmp_path: Path) -> Path:
    target = tmp_path / "models"
    shutil.copytree(DEMO_DIR, target, ignore=shutil.ignore_patterns("*.tflite"))
    return target / "resnet_digits.json"


def edit(path: Path, change) -> Path:
    raw = json.loads(path.read_text())
    change(raw["split_points"])
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize("change,field,expected", [
    (lambda sp: sp[0].pop("head"), "split_points[0]", "'head'"),
    (lambda sp: sp[1].update(bytes_per_item=123), "split_points[1].bytes_per_item = 123", "expected 65536"),
    (lambda sp: sp[0].update(dtype="uint8"), "split_points[0].dtype = 'uint8'", "float32"),
    (lambda sp: sp[0].update(shape=[1, 48, 32, 32]), "split_points[0].shape", "dynamic batch"),
    (lambda sp: sp[0]["tail"].update(sha256="abc"), "split_points[0].tail.sha256 = 'abc'", "64 lowercase hex"),
    (lambda sp: sp[1].update(name=sp[0]["name"]), "split_points[1].name = 'stage1'", "used twice"),
    (lambda sp: sp[0]["profile"].update(tail_ms=[1.0]), "split_points[0].profile.tail_ms = [1.0]", "one per batch size"),
])
def test_bad_split_entries_fail_naming_the_field(card_copy, change, field, expected):
    edit(card_copy, change)
    with pytest.raises(CardError) as info:
        load_card(card_copy)
    assert field in str(info.value) and expected in str(info.value) and str(card_copy) in str(info.value)


def test_a_damaged_or_missing_split_file_fails_verify(card_copy):
    point = load_card(card_copy).split_point("stage2")
    data = bytearray(point.tail_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    point.tail_path.write_bytes(bytes(data))
    assert point.verify_head() == point.head_path
    with pytest.raises(CardError, match=r"split 'stage2' tail: .*resnet_digits.tail.stage2.onnx has sha256"):
        point.verify_tail()
    point.head_path.unlink()
    with pytest.raises(CardError, match="does not exist"):
        point.verify_head()


def test_selftest_checks_the_split_files(card_copy, tmp_path):
    from agent.config import load_config
    from agent.ops.selftest import check_model

    config_path = tmp_path / "board.toml"
    config_path.write_text('config_version = 1\n[agent]\ndevice = "b"\n[mqtt]\nenabled = false\n'
                           f'[[models]]\nname = "resnet_digits"\ncard = "{card_copy}"\nbackend = "onnxruntime"\n'
                           'file = "onnx"\n')
    model = load_config(config_path).models[0]
    before = {c.name: c for c in check_model(model, None)}
    assert before["model resnet_digits: split files"].status == "ok"
    assert "4 head/tail files" in before["model resnet_digits: split files"].detail
    load_card(card_copy).split_point("stage1").head_path.write_bytes(b"not a model")
    after = {c.name: c for c in check_model(model, None)}
    row = after["model resnet_digits: split files"]
    assert row.status == "fail" and "resnet_digits.head.stage1.onnx" in row.detail and row.fix
    assert after["model resnet_digits: sha256"].status == "ok"        # the model file itself is fine


# ---- the split tool's separator check (pure Python; the tool needs onnx only to cut) -------------

def split_tool():
    spec = importlib.util.spec_from_file_location("split_models", ROOT / "tools" / "split_models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def residual_graph(tool):
    """x -> stem -> a; a -> conv1 -> b -> conv2 -> c; add(a, c) -> d; d -> pool -> y."""
    N = tool.Node
    return [N("stem", ("x", "w0"), ("a",)), N("conv1", ("a", "w1"), ("b",)), N("conv2", ("b", "w2"), ("c",)),
            N("add", ("a", "c"), ("d",)), N("pool", ("d",), ("y",))]


def test_the_separator_check_rejects_a_tensor_inside_a_residual_block():
    tool = split_tool()
    nodes = residual_graph(tool)
    why = tool.find_cut(nodes, ["x"], ["y"], "b")
    assert isinstance(why, str) and "'a'" in why and "'add'" in why and "skip" in why
    cut = tool.find_cut(nodes, ["x"], ["y"], "d")
    assert cut.head == [0, 1, 2, 3] and cut.tail == [4]
    cut = tool.find_cut(nodes, ["x"], ["y"], "a")             # before the block: the skip is inside the tail
    assert cut.head == [0] and cut.tail == [1, 2, 3, 4]
    assert "output of the model" in tool.find_cut(nodes, ["x"], ["y"], "y")
    assert "input of the model" in tool.find_cut(nodes, ["x"], ["y"], "x")
    assert "no node produces" in tool.find_cut(nodes, ["x"], ["y"], "nope")


def test_the_separator_check_rejects_a_tail_that_needs_the_input():
    tool = split_tool()
    N = tool.Node
    nodes = [N("f", ("x",), ("a",)), N("g", ("a", "x"), ("y",))]    # the model input skips over the cut
    why = tool.find_cut(nodes, ["x"], ["y"], "a")
    assert isinstance(why, str) and "model input" in why and "'x'" in why


def test_the_camera_model_passes_the_selftest_golden_check(tmp_path):
    """Its golden inputs are camera frames made from the test digits and the card's seed."""
    from agent.config import load_config
    from agent.ops.selftest import check_model

    config_path = tmp_path / "board.toml"
    config_path.write_text('config_version = 1\n[agent]\ndevice = "b"\n[mqtt]\nenabled = false\n'
                           '[[models]]\nname = "camera_digits"\ncard = "demo:camera_digits"\nbackend = "onnxruntime"\n'
                           'file = "onnx"\n')
    rows = {c.name: c for c in check_model(load_config(config_path).models[0], None)}
    assert rows["model camera_digits: golden"].status == "ok", rows["model camera_digits: golden"]
    assert rows["model camera_digits: split files"].status == "ok"
    card = load_card("demo:camera_digits")
    assert card.inputs[0].shape == (None, 160, 160, 3) and card.inputs[0].dtype == np.uint8
