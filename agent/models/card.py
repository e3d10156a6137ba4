"""Model cards: what a shipped model takes, returns, how accurate each file is, and where it may be split.

The card is the agent's source of truth for a model's interface: every request is checked against
it (``agent.models.tensors.check_inputs``) before it is queued, and every loaded backend instance is
checked against it at start, so a file that does not match its card fails at load time, not on the
first request.

A card may also carry golden outputs (``golden``, :class:`Golden`): a few fixed inputs, the
outputs the reference file gave on them when the model was built (``tools/golden_outputs.py``),
and how close each file variant must come. The self-test (``edge-agent selftest``) runs them on
the board's backend, so a file that loads but computes something else (a runtime build or a
delegate that miscomputes) is caught before it serves.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
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
    split_points: tuple[dict, ...]
    source: Path
    raw: dict[str, Any]
    golden: "Golden | None" = None

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
    ``{"dataset": FILE, "array": KEY, "indices": [...], "preprocess": "digits_frames" | "none"}``
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


GOLDEN_PREPROCESS = ("digits_frames", "none")


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
    return ModelCard(
        name=str(raw["name"]),
        inputs=tuple(_spec(e, f"{path}: inputs[{i}]") for i, e in enumerate(raw["inputs"])),
        outputs=outputs,
        files=files,
        labels=tuple(raw.get("labels", ())),
        split_points=tuple(raw.get("split_points", ())),
        source=path,
        raw=raw,
        golden=_parse_golden(raw["golden"], path, outputs) if "golden" in raw else None,
    )
