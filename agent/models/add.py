"""``edge-agent model add FILE.onnx|.tflite``: a model card written from the file itself, and the
``[[models]]`` table that serves it.

Writing a card by hand (every input and output's name, dtype and shape, the file's sha256) was
the slowest step of serving a new model, and the one most likely to be wrong. Here the file is
loaded by the same backend the agent will load it with, so the card says exactly what the agent's
load-time check (``agent.api``) will compare against; the chosen defaults are written into the card
(``defaults``) and the table, each with why, so they can be changed knowingly.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import BackendError
from agent.models.card import CARD_VERSION, load_card
from agent.models.tensors import TensorSpec, shape_text

#: The config's own default largest batch, taken when the file's batch dimension is dynamic.
DYNAMIC_MAX_BATCH = 8
#: Runs timed per batch size for the default SLO (after two warm-up runs); the median counts.
TIMED_RUNS = 10

SUFFIX_BACKEND = {".onnx": ("onnxruntime", "onnx"), ".tflite": ("litert", "tflite")}


class AddError(ValueError):
    """A file ``model add`` cannot make a card for; the message names the file and what is wrong."""


@dataclass(frozen=True)
class AddedModel:
    """What ``model add`` wrote and chose."""

    name: str
    card_path: Path
    backend: str
    variant: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    sha256: str
    batch_dynamic: bool
    max_batch: int
    default_slo_ms: float
    latency_ms: dict[int, float]

    def models_table(self) -> str:
        """The ``[[models]]`` TOML table to paste into a config, with why each default was chosen."""
        why_batch = ("the file's batch dimension is dynamic: the config's usual largest batch"
                     if self.batch_dynamic else "the file's batch dimension is fixed: batches no larger than it")
        measured = ", ".join(f"b{b} {ms:.2f} ms" for b, ms in sorted(self.latency_ms.items()))
        return "\n".join([
            "[[models]]",
            f'name = "{self.name}"',
            f'card = "{self.card_path.as_posix()}"',
            f'backend = "{self.backend}"',
            f'file = "{self.variant}"',
            "instances = 1",
            f"default_slo_ms = {self.default_slo_ms:g}          # 4x a full batch here ({measured}), at least 20",
            "[models.batching]",
            'rule = "deadline_aware"          # the largest batch that still meets the first request\'s deadline',
            f"max_batch = {self.max_batch}                   # {why_batch}",
        ])


def _safe_name(stem: str) -> str:
    """A model name usable as an MQTT topic level and a URL path segment."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_.")
    return name or "model"


def _raw_batch_dims(path: Path, backend: str) -> list[int | None]:
    """The leading dimension of each input as the file declares it (None = dynamic)."""
    if backend == "onnxruntime":
        import onnxruntime
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        dims = []
        for entry in session.get_inputs():
            first = entry.shape[0] if entry.shape else None
            dims.append(first if isinstance(first, int) and first > 0 else None)
        return dims
    from agent.backends.litert_backend import import_interpreter_module
    interpreter = import_interpreter_module().Interpreter(model_path=str(path))
    dims = []
    for detail in interpreter.get_input_details():
        signature = detail.get("shape_signature")
        shape = signature if signature is not None and len(signature) else detail["shape"]
        first = int(shape[0]) if len(shape) else -1
        dims.append(first if first > 0 else None)
    return dims


def _median_ms(backend: Any, specs: tuple[TensorSpec, ...], batch: int) -> float:
    from agent.profiler.measure import time_runs, zeros_batch
    return 1000.0 * statistics.median(time_runs(backend, zeros_batch(specs, batch), repeats=TIMED_RUNS, warmup=2))


def default_slo_ms(full_batch_ms: float) -> float:
    """Four times a full batch's time, rounded up to 10 ms, at least 20 ms: a request may wait out
    one full batch ahead of it and run in the next, with as much again for a busy board."""
    return float(max(20, 10 * math.ceil(4 * full_batch_ms / 10)))


def add_model(file: str | Path, out: str | Path | None = None, name: str | None = None,
              force: bool = False) -> AddedModel:
    """Read ``file``'s inputs and outputs through the agent's backend, time it, write its card
    (``FILE.json`` beside it, or ``out``) and return what was chosen. Never overwrites a card unless
    ``force``."""
    from agent.backends import load_backend

    path = Path(file).expanduser().resolve()
    if path.suffix.lower() not in SUFFIX_BACKEND:
        raise AddError(f"{file}: expected a .onnx or .tflite file")
    if not path.is_file():
        raise AddError(f"{file}: no such file")
    backend_kind, variant = SUFFIX_BACKEND[path.suffix.lower()]
    card_path = Path(out).expanduser().resolve() if out else path.with_suffix(".json")
    if card_path.exists() and not force:
        raise AddError(f"{card_path} exists: give --out for another card, or --force to replace it")
    name = name or _safe_name(path.stem)
    if not name or any(c in name for c in "/+#"):
        raise AddError(f"--name {name!r}: expected a non-empty name without '/', '+' or '#' (an MQTT topic level)")

    try:
        backend = load_backend(backend_kind, path, threads=1)
    except BackendError as exc:
        raise AddError(f"{file}: {backend_kind} cannot load it: {exc}") from None
    try:
        inputs, outputs = tuple(backend.inputs), tuple(backend.outputs)
        for kind, specs in (("input", inputs), ("output", outputs)):
            for spec in specs:
                try:
                    spec.item_shape()
                except BackendError as exc:
                    raise AddError(f"{file}: {kind} {spec.name!r} {shape_text(spec.shape)}: the agent batches items "
                                   f"of a fixed shape ({exc}); export it with fixed dimensions after the batch") from None
        fixed = sorted({d for d in _raw_batch_dims(path, backend_kind) if d is not None})
        if fixed and backend_kind == "onnxruntime" and fixed != [1]:
            raise AddError(f"{file}: its batch dimension is fixed at {fixed}; the agent forms batches of any size up "
                           "to max_batch, so export it with a dynamic batch dimension (or a fixed batch of 1)")
        batch_dynamic = not fixed
        max_batch = DYNAMIC_MAX_BATCH if batch_dynamic else fixed[0]
        latency = {1: _median_ms(backend, inputs, 1)}
        if max_batch > 1:
            latency[max_batch] = _median_ms(backend, inputs, max_batch)
    except BackendError as exc:
        raise AddError(f"{file}: {backend_kind} cannot run it on zero inputs: {exc}") from None
    finally:
        backend.close()

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    slo = default_slo_ms(latency[max_batch])
    try:
        relative = path.relative_to(card_path.parent).as_posix()
    except ValueError:
        relative = str(path)
    card = {
        "card_version": CARD_VERSION,
        "name": name,
        "inputs": [_spec_json(s) for s in inputs],
        "outputs": [_spec_json(s) for s in outputs],
        "files": {variant: {"path": relative, "sha256": digest, "bytes": path.stat().st_size}},
        "defaults": {
            "backend": backend_kind, "file": variant, "batch_dynamic": batch_dynamic, "max_batch": max_batch,
            "default_slo_ms": slo, "rule": "deadline_aware",
            "why": "max_batch: 8 where the batch dimension is dynamic, else the fixed batch; default_slo_ms: 4x a "
                   "full batch as timed by `edge-agent model add`, rounded up to 10 ms, at least 20",
        },
        "provenance": {
            "tool": "edge-agent model add",
            # Per image, as the demo cards have it: `edge-agent selftest` compares the board with it.
            "latency_ms_per_image_1thread_build_host": {f"{variant}_b{b}": round(ms / b, 4) for b, ms in latency.items()},
        },
    }
    card_path.parent.mkdir(parents=True, exist_ok=True)
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    load_card(card_path)   # what the agent will read: fail here, not at `edge-agent run`
    return AddedModel(name, card_path, backend_kind, variant, inputs, outputs, digest, batch_dynamic, max_batch,
                      slo, latency)


def _spec_json(spec: TensorSpec) -> dict:
    return {"name": spec.name, "dtype": np.dtype(spec.dtype).name, "shape": [-1, *spec.item_shape()]}
