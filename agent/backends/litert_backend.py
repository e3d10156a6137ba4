"""LiteRT backend: ``.tflite`` models on the CPU (XNNPACK) or on a Coral Edge TPU.

The interpreter comes from ``ai_edge_litert`` (``pip install 'edge-agent[tflite]'``), else from the
older ``tflite_runtime`` wheel that some board images ship. Neither is a hard dependency of the agent.

**Dynamic batch.** An interpreter holds one input shape at a time; serving batch ``b`` means
``resize_tensor_input`` + ``allocate_tensors`` and, on the next ``invoke``, XNNPACK re-plans its
operators for the new shape. The backend can keep an LRU of interpreters keyed by batch size
(``max_interpreters``); when the LRU is full the least recently used one is resized, not rebuilt.
The default is 1, i.e. resize only when the batch size changes, because on the demo models
(2-core x86, XNNPACK, one thread) a resize costs a small fraction of an invoke, while cached
interpreters add much to an instance's memory and a random mix of batch sizes ran no faster
(BENCHMARKS.md, "Figures that were in docstrings"). Raise it for a delegate whose re-planning is
costly.

**Quantised models.** Callers always see the model card's interface: uint8 frames in, float32
logits out, whichever file variant is loaded. The demo ``*_int8.tflite`` files (PT2E static int8)
already have that interface, their quantisation lives inside the graph; full-integer models (and
Edge TPU ones) have int8 tensors at the boundary, and for those the backend converts. For an int8 input with quantisation parameters
(scale ``s``, zero point ``z``) the backend exposes a uint8 input and quantises
``q = clip(rint(u / s + z), -128, 127)`` where ``u`` is the frame value, the value the float demo
model sees after its own cast (for ``s = 1, z = -128`` that is an exact ``u - 128``). A uint8
input is passed through unchanged, whatever its quantisation parameters say, as TFLite callers
always do. Quantised int8/uint8 outputs are dequantised to float32, ``(q - z) * s``.

**Edge TPU.** ``delegate="auto"`` uses the Edge TPU when ``libedgetpu.so.1`` loads (the library
is present and a TPU is attached) and the file was compiled by ``edgetpu_compiler`` (it holds the
``edgetpu-custom-op``); a model that is not compiled for the TPU would run entirely on the CPU
beside the delegate, so it is reported as the CPU it runs on. ``delegate="edgetpu"`` demands both
and fails with an error that says what is missing. Compiled models have a fixed batch size; a
larger batch runs as consecutive invokes of that size.

**Threads.** ``Interpreter.invoke`` releases the GIL while the kernels run (with the demo models on
2 cores, two interpreters invoked from two threads run nearly in parallel, and a pure-Python thread
keeps its full speed during an invoke: BENCHMARKS.md, "Figures that were in docstrings"), so the
agent's concurrent instances are backend objects driven from separate threads.
"""

from __future__ import annotations

import collections
import ctypes
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from agent.backends.base import Backend, BackendError
from agent.models.tensors import TensorSpec

__all__ = [
    "LiteRTBackend",
    "EDGETPU_LIBRARY",
    "EDGETPU_INSTALL_HINT",
    "DEFAULT_MAX_INTERPRETERS",
    "import_interpreter_module",
    "load_edgetpu_delegate",
    "is_edgetpu_model",
]

EDGETPU_LIBRARY = "libedgetpu.so.1"
EDGETPU_INSTALL_HINT = (
    "install the Edge TPU runtime from Coral's apt repository on the board "
    "(its coral-edgetpu-stable suite: sudo apt-get install libedgetpu1-std) and attach the TPU"
)
TFLITE_INSTALL_HINT = "pip install 'edge-agent[tflite]'"
_EDGETPU_CUSTOM_OP = b"edgetpu-custom-op"

#: Interpreters kept per backend instance, one per recently used batch size. 1 = resize on change:
#: a resize is cheap next to an invoke, a cached interpreter is not cheap in memory (module docstring).
DEFAULT_MAX_INTERPRETERS = 1


def import_interpreter_module() -> ModuleType:
    """``ai_edge_litert.interpreter``, else ``tflite_runtime.interpreter``, else a BackendError."""
    errors = []
    try:
        from ai_edge_litert import interpreter as module

        return module
    except ImportError as exc:
        errors.append(f"ai_edge_litert: {exc}")
    try:
        from tflite_runtime import interpreter as module  # type: ignore[no-redef]

        return module
    except ImportError as exc:
        errors.append(f"tflite_runtime: {exc}")
    raise BackendError(
        f"no LiteRT interpreter is importable ({'; '.join(errors)}); install it with {TFLITE_INSTALL_HINT}"
    )


def load_edgetpu_delegate(module: ModuleType | None = None, device: str | None = None) -> Any:
    """Load the Edge TPU delegate; raises BackendError saying why not (no library, no TPU attached).

    ``device`` selects one TPU when several are attached (``":0"``, ``"usb:0"``, ``"pci:0"``).
    """
    module = module or import_interpreter_module()
    options = {"device": device} if device else None
    try:
        # dlopen first: a missing library is the common case off a Coral board, and failing here
        # gives the plain loader message without the interpreter module's noisy half-built Delegate.
        ctypes.CDLL(EDGETPU_LIBRARY)
    except OSError as exc:
        raise BackendError(f"{EDGETPU_LIBRARY} not loadable ({exc}); {EDGETPU_INSTALL_HINT}") from None
    try:
        return module.load_delegate(EDGETPU_LIBRARY, options)
    except Exception as exc:  # ValueError (library or device missing) or OSError, by version
        message = " ".join(str(exc).split())  # the delegate's message spans lines
        raise BackendError(
            f"{EDGETPU_LIBRARY} loaded but no Edge TPU delegate ({message}): is a TPU attached? "
            f"{EDGETPU_INSTALL_HINT}"
        ) from exc


def is_edgetpu_model(path: str | Path) -> bool:
    """True when the file was compiled by ``edgetpu_compiler`` (it names the Edge TPU custom op)."""
    return _EDGETPU_CUSTOM_OP in Path(path).read_bytes()


@dataclass
class _Port:
    """How one model tensor meets the caller: spec seen outside, index and dtype inside, conversion."""

    spec: TensorSpec
    index: int
    model_dtype: np.dtype
    scale: float = 0.0
    zero_point: int = 0
    convert: str = "none"  # inputs: "none" | "uint8_to_int8_shift" | "uint8_to_int8"; outputs: "none" | "dequantize"


@dataclass
class _Instance:
    """One interpreter, allocated for one batch size, with its quantisation scratch buffers."""

    interpreter: Any
    batch_size: int
    scratch: dict[str, np.ndarray] = field(default_factory=dict)


class LiteRTBackend(Backend):
    """One model instance on the LiteRT interpreter (see the module docstring for the policies)."""

    kind = "litert"

    def __init__(
        self,
        path: str | Path,
        *,
        threads: int = 1,
        delegate: str = "auto",
        max_interpreters: int = DEFAULT_MAX_INTERPRETERS,
        edgetpu_device: str | None = None,
    ) -> None:
        self.path = Path(path)
        if not isinstance(threads, int) or threads < 1:
            raise BackendError(f"{self.path.name}: threads = {threads!r}, expected an int >= 1")
        if delegate not in ("auto", "none", "edgetpu"):
            raise BackendError(
                f"{self.path.name}: delegate = {delegate!r}, expected 'auto', 'none' or 'edgetpu'"
            )
        if not isinstance(max_interpreters, int) or max_interpreters < 1:
            raise BackendError(
                f"{self.path.name}: max_interpreters = {max_interpreters!r}, expected an int >= 1"
            )
        if not self.path.is_file():
            raise BackendError(f"tflite model {self.path} does not exist")
        self._module = import_interpreter_module()
        self._threads = threads
        self._edgetpu_device = edgetpu_device
        self._use_edgetpu = self._decide_edgetpu(delegate)
        self.device = "edgetpu" if self._use_edgetpu else "xnnpack"
        self.delegate = "edgetpu" if self._use_edgetpu else "none"

        first = self._new_interpreter()
        input_details = first.get_input_details()
        output_details = first.get_output_details()
        signature_names = _signature_names(first)
        self._inputs = [self._input_port(d, signature_names) for d in input_details]
        self._outputs = [self._output_port(d, signature_names) for d in output_details]
        self.inputs = [p.spec for p in self._inputs]
        self.outputs = [p.spec for p in self._outputs]

        # A batch dim of -1 in every input's shape signature: the interpreter can be resized.
        # Otherwise (Edge TPU models, most converted models) the batch is fixed at shape[0] and a
        # larger batch runs in chunks of that size.
        self._dynamic_batch = all(
            len(_signature(d)) > 0 and _signature(d)[0] == -1 for d in input_details
        )
        fixed = {int(d["shape"][0]) for d in input_details if len(d["shape"])}
        self._fixed_batch = min(fixed) if fixed else 1
        self._max_interpreters = max_interpreters if self._dynamic_batch else 1
        self._instances: collections.OrderedDict[int, _Instance] = collections.OrderedDict()
        first.allocate_tensors()
        self._instances[self._fixed_batch] = _Instance(first, self._fixed_batch)
        self._closed = False

    # ---- loading ----------------------------------------------------------------------------

    def _decide_edgetpu(self, delegate: str) -> bool:
        if delegate == "none":
            return False
        compiled = is_edgetpu_model(self.path)
        if delegate == "edgetpu":
            # Raises with the library / device / install hint when the delegate cannot load.
            load_edgetpu_delegate(self._module, self._edgetpu_device)
            if not compiled:
                raise BackendError(
                    f"{self.path} is not compiled for the Edge TPU (no {_EDGETPU_CUSTOM_OP.decode()}): "
                    "compile the int8 model with `edgetpu_compiler`, or load it with delegate='auto' "
                    "or 'none' to run it on the CPU"
                )
            return True
        # "auto": the TPU when the model is compiled for it and the delegate loads.
        if not compiled:
            return False
        try:
            load_edgetpu_delegate(self._module, self._edgetpu_device)
        except BackendError as exc:
            raise BackendError(
                f"{self.path} is compiled for the Edge TPU and cannot run without it: {exc}"
            ) from exc
        return True

    def _new_interpreter(self) -> Any:
        # One delegate per interpreter: a delegate instance is bound to the interpreter it is
        # applied to (this is also how Coral's own tooling builds interpreters).
        delegates = (
            [load_edgetpu_delegate(self._module, self._edgetpu_device)] if self._use_edgetpu else None
        )
        try:
            return self._module.Interpreter(
                model_path=str(self.path), num_threads=self._threads, experimental_delegates=delegates
            )
        except Exception as exc:
            raise BackendError(f"LiteRT could not load {self.path} ({self.device}): {exc}") from exc

    def _input_port(self, detail: dict[str, Any], signature_names: dict[int, str]) -> _Port:
        name = signature_names.get(int(detail["index"]), str(detail["name"]))
        model_dtype = np.dtype(detail["dtype"])
        scale, zero_point = _per_tensor_quantization(detail, self.path)
        shape = _spec_shape(detail)
        if model_dtype == np.int8 and scale > 0:
            exact_shift = scale == 1.0 and zero_point == -128
            return _Port(
                TensorSpec(name, np.dtype(np.uint8), shape), int(detail["index"]), model_dtype,
                scale, zero_point, "uint8_to_int8_shift" if exact_shift else "uint8_to_int8",
            )
        return _Port(TensorSpec(name, model_dtype, shape), int(detail["index"]), model_dtype)

    def _output_port(self, detail: dict[str, Any], signature_names: dict[int, str]) -> _Port:
        name = signature_names.get(int(detail["index"]), str(detail["name"]))
        model_dtype = np.dtype(detail["dtype"])
        scale, zero_point = _per_tensor_quantization(detail, self.path)
        shape = _spec_shape(detail)
        if model_dtype in (np.int8, np.uint8) and scale > 0:
            return _Port(
                TensorSpec(name, np.dtype(np.float32), shape), int(detail["index"]), model_dtype,
                scale, zero_point, "dequantize",
            )
        return _Port(TensorSpec(name, model_dtype, shape), int(detail["index"]), model_dtype)

    # ---- running ----------------------------------------------------------------------------

    def _instance_for(self, batch_size: int) -> _Instance:
        """An interpreter allocated for ``batch_size``: cached, else a new one, else the LRU resized."""
        instances = self._instances
        instance = instances.get(batch_size)
        if instance is not None:
            instances.move_to_end(batch_size)
            return instance
        if len(instances) < self._max_interpreters:
            instance = _Instance(self._new_interpreter(), batch_size)
        else:
            _, instance = instances.popitem(last=False)
            instance.batch_size = batch_size
            instance.scratch.clear()
        interpreter = instance.interpreter
        try:
            for port in self._inputs:
                shape = list(port.spec.shape)
                shape[0] = batch_size
                interpreter.resize_tensor_input(port.index, shape, strict=False)
            interpreter.allocate_tensors()
        except Exception as exc:
            raise BackendError(f"LiteRT could not resize {self.path.name} to batch {batch_size}: {exc}") from exc
        instances[batch_size] = instance
        return instance

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._closed:
            raise BackendError(f"{self.path.name}: run() after close()")
        batch_size = self._check_batch(batch)
        if self._dynamic_batch or batch_size == self._fixed_batch:
            instance = self._instance_for(batch_size)
            return self._invoke(instance, batch)
        return self._run_in_chunks(batch, batch_size)

    def _run_in_chunks(self, batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
        """A fixed-batch model: consecutive invokes of its batch size, the last one zero-padded."""
        step = self._fixed_batch
        instance = self._instances[step]
        results = {
            p.spec.name: np.empty((batch_size, *p.spec.item_shape()), p.spec.dtype) for p in self._outputs
        }
        for start in range(0, batch_size, step):
            stop = min(start + step, batch_size)
            if stop - start == step:
                chunk = {name: array[start:stop] for name, array in batch.items()}
            else:
                chunk = {}
                for name, array in batch.items():
                    padded = np.zeros((step, *array.shape[1:]), array.dtype)
                    padded[: stop - start] = array[start:stop]
                    chunk[name] = padded
            for name, array in self._invoke(instance, chunk).items():
                results[name][start:stop] = array[: stop - start]
        return results

    def _invoke(self, instance: _Instance, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        interpreter = instance.interpreter
        try:
            for port in self._inputs:
                interpreter.set_tensor(port.index, self._to_model(port, batch[port.spec.name], instance))
            interpreter.invoke()
            return {
                port.spec.name: self._from_model(port, interpreter.get_tensor(port.index))
                for port in self._outputs
            }
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"LiteRT failed running {self.path.name} on {self.device}: {exc}") from exc

    @staticmethod
    def _to_model(port: _Port, array: np.ndarray, instance: _Instance) -> np.ndarray:
        if port.convert == "none":
            return array
        # Quantise into a per-instance scratch buffer: no allocation per batch.
        out = instance.scratch.get(port.spec.name)
        if out is None or out.shape != array.shape:
            out = instance.scratch[port.spec.name] = np.empty(array.shape, np.int8)
        if port.convert == "uint8_to_int8_shift":  # u - 128, exact, as a bit flip
            np.bitwise_xor(array, np.uint8(0x80), out=out.view(np.uint8))
            return out
        real = array.astype(np.float32)
        real *= np.float32(1.0 / port.scale)
        real += np.float32(port.zero_point)
        np.rint(real, out=real)
        np.clip(real, -128, 127, out=real)
        out[...] = real
        return out

    @staticmethod
    def _from_model(port: _Port, array: np.ndarray) -> np.ndarray:
        if port.convert == "none":
            return array  # get_tensor returns a copy the caller owns
        real = array.astype(np.float32)
        real -= np.float32(port.zero_point)
        real *= np.float32(port.scale)
        return real

    def close(self) -> None:
        self._closed = True
        self._instances.clear()

    @property
    def cached_batch_sizes(self) -> list[int]:
        """Batch sizes with an allocated interpreter, least recently used first (for tests and bench)."""
        return list(self._instances)


def _signature_names(interpreter: Any) -> dict[int, str]:
    """Tensor index -> the name the model's signature gives it.

    Converters name the tensors themselves after the signature and the graph
    (``serving_default_frames``, ``serving_default_logits_output``); the signature keeps the names
    the model was written with (``frames``, ``logits``), which are the names on the model card and
    the ONNX file. A model without a signature (older converters, edgetpu_compiler output) keeps its
    tensor names.
    """
    try:
        signatures = interpreter.get_signature_list()
    except (AttributeError, ValueError):
        return {}
    if "serving_default" in signatures:
        key = "serving_default"
    elif len(signatures) == 1:
        key = next(iter(signatures))
    else:
        return {}
    try:
        runner = interpreter.get_signature_runner(key)
    except (AttributeError, ValueError):
        return {}
    if getattr(runner, "_subgraph_index", 0) != 0:
        return {}  # the signature runs another subgraph; its indices are not the interpreter's
    names: dict[int, str] = {}
    for details in (runner.get_input_details(), runner.get_output_details()):
        names.update({int(detail["index"]): str(name) for name, detail in details.items()})
    return names


def _signature(detail: dict[str, Any]) -> list[int]:
    signature = detail.get("shape_signature")
    if signature is None or len(signature) == 0:
        signature = detail["shape"]
    return [int(d) for d in signature]


def _spec_shape(detail: dict[str, Any]) -> tuple[int | None, ...]:
    """Batch dim always dynamic to callers (fixed-batch models run in chunks); -1 elsewhere -> None."""
    dims = _signature(detail)
    return tuple(None if i == 0 or d < 0 else d for i, d in enumerate(dims))


def _per_tensor_quantization(detail: dict[str, Any], path: Path) -> tuple[float, int]:
    params = detail.get("quantization_parameters") or {}
    scales = np.asarray(params.get("scales", []))
    zero_points = np.asarray(params.get("zero_points", []))
    if scales.size > 1:
        raise BackendError(
            f"{path.name}: tensor {detail['name']!r} has per-axis quantisation ({scales.size} scales); "
            "model inputs and outputs must be quantised per tensor"
        )
    if scales.size == 1:
        return float(scales[0]), int(zero_points[0]) if zero_points.size else 0
    scale, zero_point = detail.get("quantization", (0.0, 0))
    return float(scale), int(zero_point)
