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
(``InferenceSession.run`` and ``Interpreter.invoke`` run native code without the GIL; on the
development machine two threads on two interpreters finish in about the time of one: BENCHMARKS.md,
"Figures that were in docstrings"), so two instances really run on two cores while the Python side
stays in one process with one copy of the scheduler state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from agent.errors import BackendError
from agent.models.tensors import TensorSpec, shape_text

__all__ = ["Backend", "BackendError"]


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

        Requests are checked against the card long before this (``agent.models.tensors.check_inputs``);
        this check is the last line that turns a programming error into a :class:`BackendError`
        naming the tensor, instead of a crash deep in native code.
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
                    f"expected {shape_text(spec.shape)}"
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
