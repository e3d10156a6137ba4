"""The one interface every inference runtime is seen through.

A :class:`Backend` is ONE loaded instance of a model: one onnxruntime session, or one LiteRT
interpreter. Concurrency (several instances of a model serving at once, as BCEdge does) is
obtained by loading several backend objects and driving each from its own executor thread, never
by sharing one object between threads:

* a LiteRT interpreter keeps its input/output tensors inside the interpreter and is not safe to
  call from two threads at once;
* an onnxruntime session could be shared, but with one intra-op thread per session (spinning off,
  see :mod:`agent.backends.onnxruntime_backend`) the only way to use a second core is a second
  session, and one object per instance keeps the cost of an instance measurable and its
  failures contained.

Threads (not processes) are enough because both runtimes release the GIL while they compute
(``InferenceSession.run`` and ``Interpreter.invoke`` run native code without the GIL; measured on
the development machine: two threads on two interpreters finish in about the time of one), so two
instances really run on two cores while the Python side stays in one process with one copy of the
scheduler state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Backend", "BackendError", "TensorSpec"]


class BackendError(RuntimeError):
    """A model could not be loaded or run; the message names the file, the provider and what failed."""


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
        if cached is not None:   # asked once per request by the wire's input check
            return cached
        if not self.shape:
            raise BackendError(
                f"tensor {self.name!r} is a scalar (shape ()); expected a leading batch dimension"
            )
        rest = self.shape[1:]
        dynamic = [i + 1 for i, d in enumerate(rest) if d is None]
        if dynamic:
            raise BackendError(
                f"tensor {self.name!r} has shape {_shape_text(self.shape)}: dimension(s) "
                f"{dynamic} are dynamic; only the leading batch dimension may be dynamic"
            )
        item = tuple(int(d) for d in rest)  # type: ignore[arg-type]
        object.__setattr__(self, "_item_shape", item)
        return item

    def __str__(self) -> str:
        return f"{self.name}: {self.dtype.name}{_shape_text(self.shape)}"


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "[" + ",".join("N" if d is None else str(d) for d in shape) + "]"


class Backend(ABC):
    """One loaded instance of a model, used by one thread at a time.

    ``run`` takes arrays with a leading batch dimension ``b`` (the same ``b`` for every input) and
    returns every output with the leading dimension ``b``. Arrays are passed to the runtime without
    copies where the runtime allows it; callers must not mutate an input buffer while ``run`` is
    in progress, and returned arrays belong to the caller.
    """

    kind: str  # "onnxruntime" | "litert"
    device: str  # "cpu" | "cuda" | "tensorrt" | "edgetpu" | "xnnpack" ...
    path: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @abstractmethod
    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; returns ``{output name: array}`` with the batch's leading dimension."""

    @abstractmethod
    def close(self) -> None:
        """Release the session or interpreter. Idempotent; ``run`` after ``close`` raises."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.kind}/{self.device} {self.path.name} "
            f"in={[str(s) for s in self.inputs]} out={[str(s) for s in self.outputs]}>"
        )

    def _check_batch(self, batch: dict[str, np.ndarray]) -> int:
        """Validate input names, dtypes and item shapes; return the batch size.

        The wire codec validates requests long before this; this check is the last line that turns
        a programming error into a :class:`BackendError` naming the tensor, instead of a crash
        deep in native code.
        """
        expected = {spec.name for spec in self.inputs}
        if set(batch) != expected:
            raise BackendError(
                f"{self.path.name}: inputs {sorted(batch)} given, expected exactly {sorted(expected)}"
            )
        batch_size: int | None = None
        for spec in self.inputs:
            array = batch[spec.name]
            if not isinstance(array, np.ndarray):
                raise BackendError(
                    f"{self.path.name}: input {spec.name!r} is {type(array).__name__}, expected numpy.ndarray"
                )
            if array.dtype != spec.dtype:
                raise BackendError(
                    f"{self.path.name}: input {spec.name!r} has dtype {array.dtype}, expected {spec.dtype}"
                )
            if array.ndim != len(spec.shape) or any(
                want is not None and got != want for got, want in zip(array.shape, spec.shape)
            ):
                raise BackendError(
                    f"{self.path.name}: input {spec.name!r} has shape {list(array.shape)}, "
                    f"expected {_shape_text(spec.shape)}"
                )
            if batch_size is None:
                batch_size = int(array.shape[0])
            elif array.shape[0] != batch_size:
                raise BackendError(
                    f"{self.path.name}: input {spec.name!r} has batch {array.shape[0]}, "
                    f"other inputs have {batch_size}"
                )
        if not batch_size:
            raise BackendError(f"{self.path.name}: empty batch (batch size 0)")
        return batch_size
