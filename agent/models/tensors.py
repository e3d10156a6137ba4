"""A model's tensors as the agent sees them: :class:`TensorSpec` (name, dtype, shape) and
:func:`check_inputs`, the check of one request's tensors against the model's card.

Both belong to the model's side, not to a runtime or a wire: the card declares the specs, every
backend instance is checked against them at load, and every intake (MQTT msgpack, the Open
Inference Protocol, the in-process API) hands a request's arrays to ``check_inputs`` through
``Agent.submit`` before it is queued.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from agent.errors import BAD_REQUEST, INVALID_INPUT, BackendError, InferenceError

__all__ = ["TensorSpec", "check_inputs", "shape_text"]


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type and shape of one model input or output.

    ``shape`` holds ``None`` for a dynamic dimension. Only the leading (batch) dimension may be
    dynamic for a model the agent serves: the batch former needs a fixed per-item shape to lay
    requests side by side in a preallocated buffer.
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]

    def __post_init__(self) -> None:
        # Normalise so that specs compare equal whatever the caller passed (np.uint8, "uint8", ...).
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        object.__setattr__(self, "shape", tuple(None if d is None else int(d) for d in self.shape))

    def item_shape(self) -> tuple[int, ...]:
        """The shape of one item: ``shape`` without the batch dimension.

        Raises :class:`BackendError` when the tensor has no batch dimension or a dimension other
        than the batch one is dynamic, because then one item has no fixed size.
        """
        cached = self.__dict__.get("_item_shape")
        if cached is not None:   # asked once per request by check_inputs
            return cached
        if not self.shape:
            raise BackendError(
                f"tensor {self.name!r} is a scalar (shape ()); expected a leading batch dimension"
            )
        rest = self.shape[1:]
        dynamic = [i + 1 for i, d in enumerate(rest) if d is None]
        if dynamic:
            raise BackendError(
                f"tensor {self.name!r} has shape {shape_text(self.shape)}: dimension(s) "
                f"{dynamic} are dynamic; only the leading batch dimension may be dynamic"
            )
        item = tuple(int(d) for d in rest)  # type: ignore[arg-type]
        object.__setattr__(self, "_item_shape", item)
        return item

    def __str__(self) -> str:
        return f"{self.name}: {self.dtype.name}{shape_text(self.shape)}"


def shape_text(shape: tuple[int | None, ...]) -> str:
    """``[N,64,64,3]``: a shape as error messages print it, ``N`` for a dynamic dimension."""
    return "[" + ",".join("N" if d is None else str(d) for d in shape) + "]"


def check_inputs(model: str, specs: Sequence[TensorSpec], inputs: Any) -> dict[str, np.ndarray]:
    """Check a request's tensors against the model's card: names, dtype, rank and shape.

    One request carries one item: each tensor has the model's item shape, with or without a leading
    batch dimension of 1. Returns C-contiguous arrays shaped ``(1, *item_shape)`` in the model's dtype
    (a strided view, a slice of a bigger frame say, is copied here, once: batch assembly and a batch of
    one run on contiguous rows).
    """
    if type(inputs) is not dict and not isinstance(inputs, Mapping):
        raise InferenceError(BAD_REQUEST, f"inputs must be a map of name -> tensor, got {type(inputs).__name__}", "inputs")
    expected_names = [s.name for s in specs]
    for name in inputs:
        if name not in expected_names:
            raise InferenceError(
                INVALID_INPUT, f"model {model!r} has no input {name!r}; its inputs are {expected_names}", f"inputs.{name}")
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        field = f"inputs.{spec.name}"
        if spec.name not in inputs:
            raise InferenceError(INVALID_INPUT, f"missing input {spec.name!r} of model {model!r}", field)
        array = inputs[spec.name]
        if not isinstance(array, np.ndarray):
            raise InferenceError(INVALID_INPUT, f"{field} must be a numpy array, got {type(array).__name__}", field)
        if array.dtype != spec.dtype:
            raise InferenceError(
                INVALID_INPUT, f"{field} has dtype {array.dtype.name}; model {model!r} expects {spec.dtype.name}",
                f"{field}.dtype")
        item = spec.item_shape()
        if array.shape == item:
            array = array.reshape((1, *item))
        elif array.shape != (1, *item):
            raise InferenceError(
                INVALID_INPUT,
                f"{field} has shape {list(array.shape)}; model {model!r} expects {list(item)} (or [1, ...] with one item)",
                f"{field}.shape")
        out[spec.name] = array if array.flags.c_contiguous else np.ascontiguousarray(array)
    return out
