"""Model cards: what a shipped model takes, returns, how accurate each file is, and where it may be split.

The card is the agent's source of truth for a model's interface: every request is checked against
it (``agent.models.tensors.check_inputs``) before it is queued, and every loaded backend instance is
checked against it at start, so a file that does not match its card fails at load time, not on the
first request.
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
    return ModelCard(
        name=str(raw["name"]),
        inputs=tuple(_spec(e, f"{path}: inputs[{i}]") for i, e in enumerate(raw["inputs"])),
        outputs=tuple(_spec(e, f"{path}: outputs[{i}]") for i, e in enumerate(raw["outputs"])),
        files=files,
        labels=tuple(raw.get("labels", ())),
        split_points=tuple(raw.get("split_points", ())),
        source=path,
        raw=raw,
    )
