"""The multi-exit model (issue 24, item 1): its stages continue one another, and its card says true things.

``camera_exits`` (tools/build_models.py --models camera_exits) has three exits; its card lists each
exit's stage file, test accuracy and confidence calibration. These tests run the shipped files with
onnxruntime on the card's own test set (the 8x8 test digits drawn as camera frames with the card's
seed) and its shipped calibration digits, so a stale file, a wrong figure or a stage that does not
continue the one before fails here.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from agent.backends import load_backend
from agent.models.card import CardError, load_card
from agent.models.digits import camera_frames, card_test_set, load_test_set
from agent.models.exits import calibrate, softmax_confidence, threshold_for_target

MODEL = "demo:camera_exits"


def run_batched(path: Path, batch: dict[str, np.ndarray], size: int = 64) -> dict[str, np.ndarray]:
    backend = load_backend("onnxruntime", path, threads=2, providers=["CPUExecutionProvider"])
    try:
        (name, data), = batch.items()
        parts = [backend.run({name: np.ascontiguousarray(data[i:i + size])}) for i in range(0, len(data), size)]
    finally:
        backend.close()
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


@pytest.fixture(scope="module")
def card():
    return load_card(MODEL)


@pytest.fixture(scope="module")
def test_set(card):
    return card_test_set(card.raw["dataset"], card.source.parent)


@pytest.fixture(scope="module")
def whole(card, test_set):
    """Every exit's logits from the whole model file on the test set."""
    frames, _ = test_set
    return run_batched(card.verify_file("onnx"), {card.inputs[0].name: frames})


def test_stages_in_sequence_equal_the_whole_model_at_every_exit(card, test_set, whole):
    frames, _ = test_set
    assert len(card.exits) >= 3
    feed = {card.exits[0].stage_input.name: frames}
    for point in card.exits:
        out = run_batched(point.verify_stage(), feed)
        expected = whole[point.output]
        np.testing.assert_allclose(out[point.output], expected, atol=1e-4, rtol=0, err_msg=point.name)
        assert (out[point.output].argmax(1) == expected.argmax(1)).all(), point.name
        if point.stage_output is not None:
            features = out[point.stage_output.name]
            assert features.shape[1:] == point.stage_output.item_shape()
            feed = {point.stage_output.name: features}


def test_survivors_continue_alone_with_what_the_first_stage_made(card, test_set, whole):
    """What early exit does with a batch: the items that leave are dropped, the rest (any subset, any
    batch size) go on through stage 2 from stage 1's features and get the whole model's answer."""
    frames, _ = test_set
    first, second = card.exits[0], card.exits[1]
    out = run_batched(first.verify_stage(), {first.stage_input.name: frames[:40]})
    confidence = softmax_confidence(out[first.output])
    survivors = np.flatnonzero(confidence < np.median(confidence))
    assert 0 < len(survivors) < 40
    features = out[first.stage_output.name][survivors]
    for size in (1, 3, len(survivors)):
        got = run_batched(second.verify_stage(), {second.stage_input.name: features}, size=size)
        np.testing.assert_allclose(got[second.output], whole[second.output][survivors], atol=1e-4, rtol=0)


def test_card_accuracies_are_what_the_shipped_files_give(card, test_set, whole):
    _, labels = test_set
    accuracies = []
    for point in card.exits:
        measured = float((whole[point.output].argmax(1) == labels).mean())
        assert abs(measured - point.accuracy) <= 1e-9, (point.name, measured, point.accuracy)
        accuracies.append(measured)
    # the point of exits: the early ones are measurably less accurate (more than 3 of the 360 items)
    assert all(a < b for a, b in zip(accuracies, accuracies[1:])), accuracies
    assert accuracies[-1] - accuracies[0] > 3 / len(labels), accuracies


def test_card_calibration_is_reproduced_from_the_shipped_calibration_split(card):
    calib = card.raw["dataset"]["calibration"]
    images, labels = load_test_set(card.source.parent / calib["file"])
    size = int(card.raw["dataset"]["frame_size"])
    frames = np.concatenate([camera_frames(images, seed, size, hard=calib["hard"]) for seed in calib["seeds"]])
    labels = np.concatenate([labels] * len(calib["seeds"]))
    assert len(labels) == calib["size"]
    out = run_batched(card.verify_file("onnx"), {card.inputs[0].name: frames})
    for point, entry in zip(card.exits, card.raw["exits"]):
        logits = out[point.output]
        got = calibrate(softmax_confidence(logits), logits.argmax(1) == labels, point.calibration.grid,
                        point.calibration.targets, entry["calibration"]["min_support"])
        shipped = entry["calibration"]
        for key in ("accuracy", "coverage", "coverage_at_threshold"):
            assert got[key] == pytest.approx(shipped[key], abs=1e-6), (point.name, key)
        assert got["threshold"] == pytest.approx(shipped["threshold"], abs=1e-6), point.name


def test_calibrated_thresholds_rise_with_the_target(card):
    for point in card.exits:
        cal = point.calibration
        reached = [t for t in cal.threshold if t is not None]
        assert reached == sorted(reached), point.name
        assert cal.threshold[:len(reached)] == tuple(reached), point.name  # None only after the last reached
        # the lookup a scheduler makes: a stricter requirement never gets a lower threshold
        previous = 0.0
        for wanted in np.linspace(0.5, 1.0, 26):
            t = cal.threshold_for(float(wanted))
            t = 2.0 if t is None else t
            assert t >= previous
            previous = t


def test_threshold_for_target_on_hand_checked_items():
    # confidences high to low; correct except the 3rd and the 7th most confident
    conf = np.array([0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91, 0.90])
    ok = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], dtype=bool)
    # sets of >= 2 items: top2 1.0, top3 .667, top4 .75, top5 .8, top6 .833, top7 .714, top8 .75, top9 .778, top10 .8
    assert threshold_for_target(conf, ok, 0.95, min_support=2) == 0.98      # only the top two
    assert threshold_for_target(conf, ok, 0.6, min_support=2) == 0.90       # every set is >= 0.667
    # the top 6 alone are 0.833 accurate, but the top 3 (a higher threshold) are not 0.7: 0.98 it is
    assert threshold_for_target(conf, ok, 0.7, min_support=2) == 0.98
    # sets of >= 4 items: top4 .75, top5 .8, top6 .833, then top7 .714 misses
    assert threshold_for_target(conf, ok, 0.75, min_support=4) == 0.94
    assert threshold_for_target(conf, ok, 0.95, min_support=3) is None      # top3 is already below
    with pytest.raises(ValueError, match="target"):
        threshold_for_target(conf, ok, 1.5)


def test_thresholds_are_monotone_in_the_target_on_random_items():
    rng = np.random.default_rng(5)
    for _ in range(50):
        conf = rng.uniform(0.1, 1.0, size=200)
        ok = rng.uniform(size=200) < conf
        thresholds = [threshold_for_target(conf, ok, a, min_support=10) for a in np.linspace(0.5, 1.0, 11)]
        values = [np.inf if t is None else t for t in thresholds]
        assert values == sorted(values)


@pytest.fixture
def card_copy(tmp_path, card):
    """A writable copy of the card (stage files beside it as links are not needed: parsing only)."""
    def write(mutate) -> Path:
        raw = json.loads(card.source.read_text())
        mutate(raw)
        path = tmp_path / "camera_exits.json"
        path.write_text(json.dumps(raw))
        return path
    return write


@pytest.mark.parametrize("mutate, field", [
    (lambda r: r["exits"][0]["calibration"].__setitem__("threshold", [0.9, 0.8, 0.95, 0.97, 0.98, 0.99]),
     r"exits\[0\]\.calibration\.threshold"),
    (lambda r: r["exits"][1]["calibration"].__setitem__("threshold", [0.5, None, 0.9, None, None, None]),
     r"exits\[1\]\.calibration\.threshold"),
    (lambda r: r["exits"][0].__setitem__("accuracy", 1.5), r"exits\[0\]\.accuracy"),
    (lambda r: r["exits"][0].__setitem__("output", "nope"), r"exits\[0\]\.output"),
    (lambda r: r["exits"][1]["stage_input"].__setitem__("name", "stage9_out"), r"exits\[1\]\.stage_input"),
    (lambda r: r["exits"][0]["stage_input"].__setitem__("dtype", "float32"), r"exits\[0\]\.stage_input"),
    (lambda r: r["exits"][2].__setitem__("stage_output", r["exits"][1]["stage_output"]), r"exits\[2\]\.stage_output"),
    (lambda r: r["exits"][0]["stage"].__setitem__("sha256", "abc"), r"exits\[0\]\.stage\.sha256"),
    (lambda r: r["exits"][0].pop("calibration"), r"exits\[0\]: missing field 'calibration'"),
    (lambda r: r["exits"][0].__setitem__("stage_ms", [1.0]), r"exits\[0\]\.stage_ms"),
    (lambda r: r["exits"][1].__setitem__("name", "exit1"), r"exits\[1\]\.name = 'exit1': the name is used twice"),
    (lambda r: r["exits"][0]["calibration"].__setitem__("coverage", [0.5]), r"exits\[0\]\.calibration\.coverage"),
    (lambda r: r.__setitem__("exits", r["exits"][:1]), r"exits = .*two or more exits"),
])
def test_card_validation_names_the_field(card_copy, mutate, field):
    with pytest.raises(CardError, match=field):
        load_card(card_copy(mutate))


def test_a_stage_file_that_is_not_the_cards_fails_its_check(tmp_path, card):
    shutil.copy(card.source, tmp_path / card.source.name)
    for point in card.exits:
        (tmp_path / point.stage_path.name).write_bytes(b"not the stage")
    copy = load_card(tmp_path / card.source.name)
    with pytest.raises(CardError, match="exit 'exit1' stage"):
        copy.exits[0].verify_stage()
