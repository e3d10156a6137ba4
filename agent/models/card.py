"""Model cards: what a shipped model takes, returns, how accurate each file is, and where it may be split.

The card is the agent's source of truth for a model's interface: every request is checked against
it (``agent.models.tensors.check_inputs``) before it is queued, and every loaded backend instance is
checked against it at start, so a file that does not match its card fails at load time, not on the
first request.

A card may list split points (``split_points``, :class:`SplitPoint`): tensors where the graph is cut
into a head (the model's inputs -> that tensor) and a tail (that tensor -> the model's outputs), each
a file beside the card with its sha256, and the head/tail run times per batch size measured when
they were cut (``tools/split_models.py``). Collaborative offload runs the head here and the tail on
a peer; the card is what both sides agree on.

A card may list early exits (``exits``, :class:`ExitPoint`), earliest first: each exit names the
model output holding its logits, its top-1 accuracy on the test set, its confidence calibration on a
held-out calibration split (:mod:`agent.models.exits`), and the stage graph that ends at it (a file
beside the card with its sha256): stage 1 takes the model's input and gives (exit 1's logits, its
features); stage k takes stage k-1's features; the last gives the final logits. A batch runs stage by
stage and items leave at their exit; the stage times per batch size are what a scheduler prices.

A card may also carry golden outputs (``golden``, :class:`Golden`): a few fixed inputs, the
outputs the reference file gave on them when the model was built (``tools/golden_outputs.py``),
and how close each file variant must come. The self-test (``edge-agent selftest``) runs them on
the board's backend, so a file that loads but computes something else (a runtime build or a
delegate that miscomputes) is caught before it serves.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.models.tensors import TensorSpec

CARD_VERSION = 1
DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_PREFIX = "demo:"


class CardError(ValueError):
    """A model card that is missing, unreadable or inconsistent; the message names the card and field."""


@dataclass(frozen=True)
class ModelFile:
    variant: str          # "onnx" | "tflite" | "tflite_int8" | ...
    path: Path
    sha256: str
    accuracy: float | None


@dataclass(frozen=True)
class ModelCard:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    files: dict[str, ModelFile]
    labels: tuple[str, ...]
    split_points: "list[SplitPoint]"
    source: Path
    raw: dict[str, Any]
    golden: "Golden | None" = None
    exits: "list[ExitPoint]" = field(default_factory=list)

    def file(self, variant: str) -> ModelFile:
        """The file for one variant; the error lists the variants the card has."""
        try:
            return self.files[variant]
        except KeyError:
            raise CardError(
                f"model {self.name!r} has no {variant!r} file; its card {self.source} lists {sorted(self.files)}"
            ) from None

    def verify_file(self, variant: str) -> Path:
        """Check the file exists and matches the card's sha256, so a stale or truncated file fails loudly."""
        entry = self.file(variant)
        if not entry.path.is_file():
            raise CardError(f"model {self.name!r}: file {entry.path} named by {self.source} does not exist")
        if entry.sha256:
            digest = hashlib.sha256(entry.path.read_bytes()).hexdigest()
            if digest != entry.sha256:
                raise CardError(
                    f"model {self.name!r}: {entry.path} has sha256 {digest[:12]}..., card says {entry.sha256[:12]}..."
                )
        return entry.path

    def exit_point(self, name: str) -> "ExitPoint":
        """The exit called ``name``; the KeyError lists the ones the card has."""
        for point in self.exits:
            if point.name == name:
                return point
        raise KeyError(f"model {self.name!r} has no exit {name!r}; its card {self.source} lists "
                       f"{[p.name for p in self.exits]}")

    def split_point(self, name: str) -> "SplitPoint":
        """The split point called ``name``; the KeyError lists the ones the card has."""
        for point in self.split_points:
            if point.name == name:
                return point
        raise KeyError(f"model {self.name!r} has no split point {name!r}; its card {self.source} lists "
                       f"{[p.name for p in self.split_points]}")


def _verify_digest(path: Path, sha256: str, what: str) -> Path:
    if not path.is_file():
        raise CardError(f"{what}: file {path} does not exist")
    if sha256:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != sha256:
            raise CardError(f"{what}: {path} has sha256 {digest[:12]}..., card says {sha256[:12]}...")
    return path


@dataclass(frozen=True)
class SplitPoint:
    """One place a model is cut: the head runs the model's inputs to ``tensor``, the tail runs
    ``tensor`` (float32 ``[N, ...]``, ``spec``) to the model's outputs, so head then tail computes the
    whole model. ``bytes_per_item`` is what one item's tensor weighs uncompressed (what a codec
    shrinks); ``profile`` holds the head, tail and full run times per batch size measured when the
    files were cut (``{"host", "batch_sizes", "head_ms", "tail_ms", "full_ms"}``), or None."""

    name: str
    tensor: str
    spec: TensorSpec
    bytes_per_item: int
    head_path: Path
    tail_path: Path
    head_sha256: str
    tail_sha256: str
    profile: dict | None
    model: str = ""

    def verify_head(self) -> Path:
        """Check the head file exists and matches the card's sha256; returns its path."""
        return _verify_digest(self.head_path, self.head_sha256, f"model {self.model!r} split {self.name!r} head")

    def verify_tail(self) -> Path:
        """Check the tail file exists and matches the card's sha256; returns its path."""
        return _verify_digest(self.tail_path, self.tail_sha256, f"model {self.model!r} split {self.name!r} tail")


PROFILE_SERIES = ("head_ms", "tail_ms", "full_ms")


def _parse_split_point(entry: Any, where: str, base: Path, model: str) -> SplitPoint:
    if not isinstance(entry, dict):
        raise CardError(f"{where} = {entry!r}: expected a map with name, onnx_tensor, shape, dtype, "
                        "bytes_per_item, head, tail")
    for key in ("name", "onnx_tensor", "shape", "dtype", "bytes_per_item", "head", "tail"):
        if key not in entry:
            raise CardError(f"{where}: missing field {key!r} (tools/split_models.py writes it)")
    name, tensor = entry["name"], entry["onnx_tensor"]
    for key, value in (("name", name), ("onnx_tensor", tensor)):
        if not isinstance(value, str) or not value:
            raise CardError(f"{where}.{key} = {value!r}: expected a non-empty string")
    spec = _spec({"name": tensor, "dtype": entry["dtype"], "shape": entry["shape"]}, f"{where}")
    if spec.dtype != np.float32:
        raise CardError(f"{where}.dtype = {entry['dtype']!r}: expected 'float32' (a tail takes a float32 tensor)")
    size = int(np.prod(spec.item_shape())) * spec.dtype.itemsize
    per_item = entry["bytes_per_item"]
    if not isinstance(per_item, int) or isinstance(per_item, bool) or per_item != size:
        raise CardError(f"{where}.bytes_per_item = {per_item!r}: expected {size} "
                        f"({spec.dtype.name} {list(spec.item_shape())})")
    paths, digests = {}, {}
    for part in ("head", "tail"):
        sub = entry[part]
        if not (isinstance(sub, dict) and isinstance(sub.get("path"), str) and sub["path"]):
            raise CardError(f"{where}.{part} = {sub!r}: expected a map with path, sha256, bytes")
        digest = sub.get("sha256")
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise CardError(f"{where}.{part}.sha256 = {digest!r}: expected 64 lowercase hex digits")
        paths[part] = (base / sub["path"]).resolve()
        digests[part] = digest
    profile = entry.get("profile")
    if profile is not None:
        if not isinstance(profile, dict):
            raise CardError(f"{where}.profile = {profile!r}: expected a map with host, batch_sizes, "
                            f"{', '.join(PROFILE_SERIES)}")
        sizes = profile.get("batch_sizes")
        if not (isinstance(sizes, list) and sizes and all(isinstance(b, int) and b >= 1 for b in sizes)):
            raise CardError(f"{where}.profile.batch_sizes = {sizes!r}: expected a non-empty list of integers >= 1")
        for key in PROFILE_SERIES:
            series = profile.get(key)
            if not (isinstance(series, list) and len(series) == len(sizes)
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in series)):
                raise CardError(f"{where}.profile.{key} = {series!r}: expected {len(sizes)} times in ms >= 0, "
                                f"one per batch size {sizes}")
    return SplitPoint(name=name, tensor=tensor, spec=spec, bytes_per_item=size, head_path=paths["head"],
                      tail_path=paths["tail"], head_sha256=digests["head"], tail_sha256=digests["tail"],
                      profile=profile, model=model)


def _parse_split_points(raw: Any, path: Path, model: str) -> list[SplitPoint]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise CardError(f"{path}: split_points = {raw!r}: expected a list of split points")
    points = [_parse_split_point(e, f"{path}: split_points[{i}]", path.parent, model) for i, e in enumerate(raw)]
    seen: set[str] = set()
    for i, point in enumerate(points):
        if point.name in seen:
            raise CardError(f"{path}: split_points[{i}].name = {point.name!r}: the name is used twice")
        seen.add(point.name)
    return points


@dataclass(frozen=True)
class ExitCalibration:
    """One exit's confidence calibration (:func:`agent.models.exits.calibrate`): on the calibration
    split, the accuracy and coverage of the items whose softmax confidence is ``>= grid[i]``, and the
    confidence threshold per accuracy target (None: the exit never reaches that target). Thresholds
    are non-decreasing in the target (the card is refused otherwise)."""

    grid: tuple[float, ...]
    accuracy: tuple[float | None, ...]
    coverage: tuple[float, ...]
    targets: tuple[float, ...]
    threshold: tuple[float | None, ...]

    def threshold_for(self, min_accuracy: float) -> float | None:
        """The threshold for the smallest listed target ``>= min_accuracy`` (None where there is none
        or the exit does not reach it: the item must go on)."""
        for target, threshold in zip(self.targets, self.threshold):
            if target >= min_accuracy:
                return threshold
        return None


@dataclass(frozen=True)
class ExitPoint:
    """One exit of a multi-exit model and the stage that ends at it.

    ``output`` is the model output holding this exit's logits (the whole file computes every exit);
    the stage file runs ``stage_input`` (the model's input for the first stage, else the previous
    stage's ``stage_output``) to (this exit's logits, named ``output``, and ``stage_output``, None
    for the last exit). ``accuracy``: top-1 on the card's test set. ``stage_ms``: the stage's time
    per batch size (``batch_sizes``), or None when it was not measured."""

    name: str
    output: str
    accuracy: float
    stage_path: Path
    stage_sha256: str
    stage_input: TensorSpec
    stage_output: TensorSpec | None
    calibration: ExitCalibration
    batch_sizes: tuple[int, ...] | None
    stage_ms: tuple[float, ...] | None
    model: str = ""

    def verify_stage(self) -> Path:
        """Check the stage file exists and matches the card's sha256; returns its path."""
        return _verify_digest(self.stage_path, self.stage_sha256, f"model {self.model!r} exit {self.name!r} stage")


def _number_list(value: Any, where: str, count: int | None, low: float, high: float,
                 nullable: bool = False) -> tuple:
    ok = isinstance(value, list) and (count is None or len(value) == count) and all(
        (v is None and nullable) or (isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high)
        for v in value)
    if not ok:
        size = f"{count} " if count is not None else ""
        raise CardError(f"{where} = {value!r}: expected a list of {size}numbers in {low:g}..{high:g}"
                        + (" (or null)" if nullable else ""))
    return tuple(None if v is None else float(v) for v in value)


def _parse_calibration(raw: Any, where: str) -> ExitCalibration:
    if not isinstance(raw, dict):
        raise CardError(f"{where} = {raw!r}: expected a map with grid, accuracy, coverage, targets, threshold")
    for key in ("grid", "accuracy", "coverage", "targets", "threshold"):
        if key not in raw:
            raise CardError(f"{where}: missing field {key!r}")
    grid = _number_list(raw["grid"], f"{where}.grid", None, 0.0, 1.0)
    if not grid or list(grid) != sorted(set(grid)):
        raise CardError(f"{where}.grid = {raw['grid']!r}: expected increasing thresholds in 0..1")
    accuracy = _number_list(raw["accuracy"], f"{where}.accuracy", len(grid), 0.0, 1.0, nullable=True)
    coverage = _number_list(raw["coverage"], f"{where}.coverage", len(grid), 0.0, 1.0)
    targets = _number_list(raw["targets"], f"{where}.targets", None, 0.0, 1.0)
    if not targets or list(targets) != sorted(set(targets)):
        raise CardError(f"{where}.targets = {raw['targets']!r}: expected increasing accuracy targets in 0..1")
    threshold = _number_list(raw["threshold"], f"{where}.threshold", len(targets), 0.0, 1.0, nullable=True)
    reached = [t for t in threshold if t is not None]
    if threshold.count(None) != len(threshold) - len(reached) or any(
            t is None for t in threshold[:len(reached)]) or reached != sorted(reached):
        raise CardError(f"{where}.threshold = {raw['threshold']!r}: expected thresholds non-decreasing in the "
                        f"target {list(targets)} (null only after the last one reached: a stricter target never "
                        "lets more items out)")
    return ExitCalibration(grid, accuracy, coverage, targets, threshold)


def _parse_exit(entry: Any, where: str, base: Path, model: str) -> ExitPoint:
    if not isinstance(entry, dict):
        raise CardError(f"{where} = {entry!r}: expected a map with name, output, accuracy, stage, stage_input, "
                        "stage_output, calibration")
    for key in ("name", "output", "accuracy", "stage", "stage_input", "stage_output", "calibration"):
        if key not in entry:
            raise CardError(f"{where}: missing field {key!r} (tools/build_models.py writes it)")
    for key in ("name", "output"):
        if not isinstance(entry[key], str) or not entry[key]:
            raise CardError(f"{where}.{key} = {entry[key]!r}: expected a non-empty string")
    accuracy = entry["accuracy"]
    if not isinstance(accuracy, (int, float)) or isinstance(accuracy, bool) or not 0.0 <= accuracy <= 1.0:
        raise CardError(f"{where}.accuracy = {accuracy!r}: expected a top-1 accuracy in 0..1")
    stage = entry["stage"]
    if not (isinstance(stage, dict) and isinstance(stage.get("path"), str) and stage["path"]):
        raise CardError(f"{where}.stage = {stage!r}: expected a map with path, sha256, bytes")
    digest = stage.get("sha256")
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise CardError(f"{where}.stage.sha256 = {digest!r}: expected 64 lowercase hex digits")
    stage_input = _spec(entry["stage_input"], f"{where}.stage_input")
    stage_output = None if entry["stage_output"] is None else _spec(entry["stage_output"], f"{where}.stage_output")
    if stage_output is not None and stage_output.dtype != np.float32:
        raise CardError(f"{where}.stage_output.dtype = {stage_output.dtype.name!r}: expected 'float32'")
    calibration = _parse_calibration(entry["calibration"], f"{where}.calibration")
    return ExitPoint(name=entry["name"], output=entry["output"], accuracy=float(accuracy),
                     stage_path=(base / stage["path"]).resolve(), stage_sha256=digest, stage_input=stage_input,
                     stage_output=stage_output, calibration=calibration, batch_sizes=None,
                     stage_ms=None, model=model)


def _parse_exits(raw: dict, path: Path, model: str, inputs: tuple[TensorSpec, ...],
                 outputs: tuple[TensorSpec, ...]) -> list[ExitPoint]:
    entries = raw.get("exits")
    if entries is None:
        return []
    if not isinstance(entries, list) or len(entries) < 2:
        raise CardError(f"{path}: exits = {entries!r}: expected a list of two or more exits, earliest first")
    points = [_parse_exit(e, f"{path}: exits[{i}]", path.parent, model) for i, e in enumerate(entries)]
    output_names = [o.name for o in outputs]
    profile = raw.get("exit_profile")
    sizes = None
    if profile is not None:
        sizes = profile.get("batch_sizes") if isinstance(profile, dict) else None
        if not (isinstance(sizes, list) and sizes and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1
                                                          for b in sizes)):
            raise CardError(f"{path}: exit_profile.batch_sizes = {sizes!r}: expected a non-empty list of integers >= 1")
    seen: set[str] = set()
    for i, point in enumerate(points):
        where = f"{path}: exits[{i}]"
        if point.name in seen:
            raise CardError(f"{where}.name = {point.name!r}: the name is used twice")
        seen.add(point.name)
        if point.output not in output_names:
            raise CardError(f"{where}.output = {point.output!r}: the card has no such output; outputs: {output_names}")
        if i == 0:
            if len(inputs) != 1 or (point.stage_input.name, point.stage_input.dtype, point.stage_input.shape) != (
                    inputs[0].name, inputs[0].dtype, inputs[0].shape):
                raise CardError(f"{where}.stage_input = {entries[i]['stage_input']!r}: the first stage takes the "
                                f"model's input {[(s.name, s.dtype.name, list(s.shape)) for s in inputs]}")
        else:
            before = points[i - 1].stage_output
            if before is None or (point.stage_input.name, point.stage_input.shape) != (before.name, before.shape):
                raise CardError(f"{where}.stage_input = {entries[i]['stage_input']!r}: expected exits[{i - 1}]"
                                f".stage_output {entries[i - 1]['stage_output']!r} (a stage continues the one before)")
        last = i == len(points) - 1
        if last != (point.stage_output is None):
            raise CardError(f"{where}.stage_output = {entries[i]['stage_output']!r}: expected "
                            + ("null (the last stage ends the model)" if last else "the features the next stage takes"))
        stage_ms = entries[i].get("stage_ms")
        if stage_ms is not None or sizes is not None:
            if sizes is None:
                raise CardError(f"{where}.stage_ms: needs exit_profile.batch_sizes")
            times = _number_list(stage_ms, f"{where}.stage_ms", len(sizes), 0.0, float("inf"))
            points[i] = ExitPoint(**{**point.__dict__, "batch_sizes": tuple(sizes), "stage_ms": times})
    return points


@dataclass(frozen=True)
class GoldenTolerance:
    """How close one file variant must come to the golden outputs: every value within ``atol``,
    and, with ``top1``, the same arg-max per item (an int8 file's logits move by a quantisation
    step or two, its decisions must not)."""

    atol: float
    top1: bool


@dataclass(frozen=True)
class Golden:
    """Fixed inputs and the outputs the reference file gave on them, with per-variant tolerances.

    ``inputs`` says how to make the inputs, so a card need not carry megabytes of frames:
    ``{"dataset": FILE, "array": KEY, "indices": [...], "preprocess": "digits_frames" | "camera_frames" | "none"}``
    (``camera_frames`` also takes ``seed`` and ``frame_size``)
    (rows of an ``.npz`` beside the card) or ``{"random": SEED, "count": N}`` (numpy's PCG64,
    uniform over the input's dtype). ``input_sha256`` is the digest of the inputs the outputs were
    computed on: where it differs, the board made other inputs, and a mismatch is not the model's.
    """

    reference: str                           # the file variant the outputs came from
    inputs: dict[str, Any]
    input_sha256: str
    outputs: dict[str, np.ndarray]           # output name -> [N, ...] expected values
    tolerance: dict[str, GoldenTolerance]    # file variant -> tolerance

    def tolerance_for(self, variant: str) -> GoldenTolerance | None:
        return self.tolerance.get(variant)


GOLDEN_PREPROCESS = ("digits_frames", "camera_frames", "none")


def _parse_golden(raw: Any, path: Path, outputs: tuple[TensorSpec, ...]) -> Golden:
    where = f"{path}: golden"
    if not isinstance(raw, dict):
        raise CardError(f"{where} = {raw!r}: expected a map with reference, inputs, outputs, tolerance")
    for key in ("reference", "inputs", "outputs", "tolerance"):
        if key not in raw:
            raise CardError(f"{where}: missing field {key!r}")
    inputs = raw["inputs"]
    if isinstance(inputs, dict) and "dataset" in inputs:
        indices = inputs.get("indices")
        if not (isinstance(indices, list) and indices and all(isinstance(i, int) and i >= 0 for i in indices)):
            raise CardError(f"{where}.inputs.indices = {indices!r}: expected a non-empty list of row numbers >= 0")
        if inputs.get("preprocess", "none") not in GOLDEN_PREPROCESS:
            raise CardError(f"{where}.inputs.preprocess = {inputs.get('preprocess')!r}: expected one of {GOLDEN_PREPROCESS}")
        if inputs.get("preprocess") == "camera_frames" and not isinstance(inputs.get("seed"), int):
            raise CardError(f"{where}.inputs.seed = {inputs.get('seed')!r}: camera_frames needs the integer seed")
        count = len(indices)
    elif isinstance(inputs, dict) and "random" in inputs:
        count = inputs.get("count")
        if not isinstance(inputs["random"], int) or not (isinstance(count, int) and count >= 1):
            raise CardError(f"{where}.inputs = {inputs!r}: expected an integer seed 'random' and a 'count' >= 1")
    else:
        raise CardError(f"{where}.inputs = {inputs!r}: expected {{dataset, array, indices, preprocess}} or {{random, count}}")
    expected: dict[str, np.ndarray] = {}
    specs = {spec.name: spec for spec in outputs}
    if not isinstance(raw["outputs"], dict) or not raw["outputs"]:
        raise CardError(f"{where}.outputs = {raw['outputs']!r}: expected a map output name -> values")
    for name, values in raw["outputs"].items():
        spec = specs.get(name)
        if spec is None:
            raise CardError(f"{where}.outputs.{name}: the card has no output {name!r}; outputs: {sorted(specs)}")
        try:
            array = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise CardError(f"{where}.outputs.{name}: expected nested lists of numbers") from None
        if array.shape != (count, *spec.item_shape()):
            raise CardError(f"{where}.outputs.{name} has shape {list(array.shape)}: expected "
                            f"{[count, *spec.item_shape()]} ({count} inputs)")
        expected[name] = array
    tolerance: dict[str, GoldenTolerance] = {}
    if not isinstance(raw["tolerance"], dict):
        raise CardError(f"{where}.tolerance = {raw['tolerance']!r}: expected a map file variant -> {{atol, top1}}")
    for variant, entry in raw["tolerance"].items():
        atol = entry.get("atol") if isinstance(entry, dict) else None
        if not isinstance(atol, (int, float)) or isinstance(atol, bool) or not atol >= 0:
            raise CardError(f"{where}.tolerance.{variant}.atol = {atol!r}: expected a number >= 0")
        tolerance[variant] = GoldenTolerance(float(atol), bool(entry.get("top1", False)))
    return Golden(reference=str(raw["reference"]), inputs=dict(inputs), input_sha256=str(raw.get("input_sha256", "")),
                  outputs=expected, tolerance=tolerance)


def golden_inputs(card: ModelCard) -> dict[str, np.ndarray]:
    """The card's golden inputs as a batch ``{input name: [N, ...]}`` (CardError naming what is wrong)."""
    if card.golden is None:
        raise CardError(f"model {card.name!r}: its card {card.source} has no golden outputs")
    return make_inputs(card.golden.inputs, card.inputs, card.source.parent, f"{card.source}: golden.inputs")


def make_inputs(source: dict[str, Any], specs: tuple[TensorSpec, ...], base_dir: Path,
                where: str = "golden.inputs") -> dict[str, np.ndarray]:
    """Inputs from a golden ``inputs`` entry (:class:`Golden`): a batch ``{input name: [N, ...]}``.

    A dataset source fills the one input from rows of an ``.npz`` in ``base_dir``; a random source
    fills every input from one seeded generator, in ``specs`` order.
    """
    if "dataset" in source:
        if len(specs) != 1:
            raise CardError(f"{where}: a dataset fills one input, the card has {len(specs)}; use random")
        spec = specs[0]
        dataset = base_dir / str(source["dataset"])
        key = str(source.get("array", "images"))
        try:
            with np.load(dataset, allow_pickle=False) as archive:
                rows = np.asarray(archive[key])[source["indices"]]
        except FileNotFoundError:
            raise CardError(f"{where}.dataset: {dataset} does not exist") from None
        except (KeyError, IndexError, ValueError, OSError) as exc:
            raise CardError(f"{where}: cannot take rows {source['indices']} of {key!r} in {dataset}: {exc}") from None
        if source.get("preprocess", "none") == "digits_frames":
            from agent.models.digits import frames_from_digits
            rows = frames_from_digits(rows)
        elif source.get("preprocess") == "camera_frames":
            # frame i depends on (seed, i): rows 0..k-1 of the test set give its first k frames
            from agent.models.digits import CAMERA_SIZE, camera_frames
            rows = camera_frames(rows, int(source["seed"]), int(source.get("frame_size", CAMERA_SIZE)))
        batch = {spec.name: np.ascontiguousarray(rows, dtype=spec.dtype)}
    else:
        rng = np.random.default_rng(int(source["random"]))
        count = int(source["count"])
        batch = {}
        for spec in specs:
            shape = (count, *spec.item_shape())
            if np.issubdtype(spec.dtype, np.integer):
                info = np.iinfo(spec.dtype)
                batch[spec.name] = rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=spec.dtype)
            else:
                batch[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    for spec in specs:
        if batch[spec.name].shape[1:] != spec.item_shape():
            raise CardError(f"{where}: made {spec.name!r} of shape {list(batch[spec.name].shape)}, "
                            f"the card's input is {list(spec.item_shape())} per item")
    return batch


def golden_input_digest(batch: dict[str, np.ndarray]) -> str:
    """sha256 over the inputs in name order: what ``golden.input_sha256`` records."""
    digest = hashlib.sha256()
    for name in sorted(batch):
        digest.update(name.encode() + b"\0" + np.ascontiguousarray(batch[name]).tobytes())
    return digest.hexdigest()


def resolve_card_path(ref: str | Path) -> Path:
    """``demo:NAME`` names a card shipped in the package; anything else is a path to a card JSON."""
    text = str(ref)
    if text.startswith(DEMO_PREFIX):
        return DEMO_DIR / f"{text[len(DEMO_PREFIX):]}.json"
    return Path(text).expanduser().resolve()


def demo_model_names() -> list[str]:
    return sorted(p.stem for p in DEMO_DIR.glob("*.json"))


def _spec(entry: Any, where: str) -> TensorSpec:
    if not isinstance(entry, dict):
        raise CardError(f"{where}: expected a map with name, dtype, shape, got {entry!r}")
    try:
        name = str(entry["name"])
        dtype = np.dtype(entry["dtype"])
        shape = tuple(None if int(d) < 0 else int(d) for d in entry["shape"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CardError(f"{where}: {exc!r} (expected name, numpy dtype, shape with -1 for the batch)") from None
    if not shape or shape[0] is not None or any(d is None for d in shape[1:]):
        raise CardError(f"{where}.shape = {entry['shape']}: expected a dynamic batch dim (-1) first, then fixed dims")
    return TensorSpec(name=name, dtype=dtype, shape=shape)


def load_card(ref: str | Path) -> ModelCard:
    """Read and validate a model card (``demo:NAME`` or a path)."""
    path = resolve_card_path(ref)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        hint = f"; shipped demo models: {demo_model_names()}" if str(ref).startswith(DEMO_PREFIX) else ""
        raise CardError(f"model card {path} does not exist{hint}") from None
    except json.JSONDecodeError as exc:
        raise CardError(f"model card {path} is not valid JSON: {exc}") from None
    if raw.get("card_version") != CARD_VERSION:
        raise CardError(f"{path}: card_version = {raw.get('card_version')!r}, expected {CARD_VERSION}")
    for key in ("name", "inputs", "outputs", "files"):
        if key not in raw:
            raise CardError(f"{path}: missing field {key!r}")
    files = {}
    for variant, entry in raw["files"].items():
        files[variant] = ModelFile(
            variant=variant,
            path=(path.parent / entry["path"]).resolve(),
            sha256=str(entry.get("sha256", "")),
            accuracy=entry.get("accuracy"),
        )
    outputs = tuple(_spec(e, f"{path}: outputs[{i}]") for i, e in enumerate(raw["outputs"]))
    inputs = tuple(_spec(e, f"{path}: inputs[{i}]") for i, e in enumerate(raw["inputs"]))
    return ModelCard(
        name=str(raw["name"]),
        inputs=inputs,
        outputs=outputs,
        files=files,
        labels=tuple(raw.get("labels", ())),
        split_points=_parse_split_points(raw.get("split_points"), path, str(raw["name"])),
        source=path,
        raw=raw,
        golden=_parse_golden(raw["golden"], path, outputs) if "golden" in raw else None,
        exits=_parse_exits(raw, path, str(raw["name"]), inputs, outputs),
    )
