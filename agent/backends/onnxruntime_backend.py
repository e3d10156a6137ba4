"""onnxruntime backend: one ``InferenceSession`` per model instance.

Session settings and why:

* one intra-op thread per session, inter-op 1, spinning off for both. onnxruntime's default pool
  spins waiting for work; on a 2-core board shared with the agent's own threads the spinning
  threads steal the cores the other instances need, at a large cost in goodput (BENCHMARKS.md,
  "Figures that were in docstrings"). The agent
  gets parallelism by running several sessions (instances) on separate executor threads instead.
* ``ORT_SEQUENTIAL`` execution: with one inter-op thread a parallel executor only adds overhead.
* all graph optimisations: load time is paid once, at start.
* memory patterns off (``enable_mem_pattern = False``). With patterns on, a session's first run
  at a shape allocates its intermediate tensors one by one from the session's arena and records a
  plan; from the second run at that shape on, the whole plan is taken as one block. That block does
  not fit in the chunks the first run left free, so the arena extends by a new region, never given
  back: resnet_digits' arena grows on its second full batch, after the full-batch warm-up at load
  (``agent.api.load_model``), which runs each shape once. With patterns off every run allocates
  tensor by tensor, and the chunks a full batch used are reused by any batch up to it: the arena
  stops growing once a full batch has run, and holds no block on top of those chunks. The per-run
  cost of the separate chunks did not show in timings (BENCHMARKS.md, issue 21's RSS target).

``run`` hands the caller's arrays to onnxruntime as they are: a C-contiguous array of the right
dtype is read in place, so the batch buffer the batch former filled is not copied again here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from agent.backends.base import Backend, BackendError
from agent.models.tensors import TensorSpec

__all__ = ["OnnxRuntimeBackend", "AUTO_PROVIDER_ORDER", "ort_type_to_dtype"]

# Providers "auto" tries, best first. CPU is always last and always present.
AUTO_PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

_PROVIDER_DEVICE = {
    "TensorrtExecutionProvider": "tensorrt",
    "CUDAExecutionProvider": "cuda",
    "CPUExecutionProvider": "cpu",
    "OpenVINOExecutionProvider": "openvino",
    "CoreMLExecutionProvider": "coreml",
    "DmlExecutionProvider": "directml",
    "ROCMExecutionProvider": "rocm",
    "MIGraphXExecutionProvider": "migraphx",
    "QNNExecutionProvider": "qnn",
    "XnnpackExecutionProvider": "xnnpack",
    "ACLExecutionProvider": "acl",
}

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(uint16)": np.uint16,
    "tensor(int16)": np.int16,
    "tensor(uint32)": np.uint32,
    "tensor(int32)": np.int32,
    "tensor(uint64)": np.uint64,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


def ort_type_to_dtype(ort_type: str, where: str = "") -> np.dtype:
    """Map an onnxruntime type string such as ``'tensor(uint8)'`` to a numpy dtype."""
    try:
        return np.dtype(_ORT_TYPES[ort_type])
    except KeyError:
        raise BackendError(
            f"{where}: onnxruntime type {ort_type!r} is not supported; expected one of {sorted(_ORT_TYPES)}"
        ) from None


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendError(
            f"onnxruntime is not importable ({exc}); install it with `pip install onnxruntime` "
            "(or onnxruntime-gpu / the board vendor's wheel for CUDA and TensorRT)"
        ) from exc
    # The agent sends nothing anywhere but its broker and its clients: onnxruntime's telemetry
    # events off (a board agent in the lab's network namespace, without DNS, took seconds to exit
    # while onnxruntime looked up its telemetry host).
    disable = getattr(onnxruntime, "disable_telemetry_events", None)
    if disable is not None:
        disable()
    return onnxruntime


def _resolve_providers(ort: Any, providers: str | Sequence[str], path: Path) -> list[str]:
    available = list(ort.get_available_providers())
    if isinstance(providers, str):
        if providers != "auto":
            providers = [providers]
        else:
            return [p for p in AUTO_PROVIDER_ORDER if p in available] or ["CPUExecutionProvider"]
    providers = list(providers)
    missing = [p for p in providers if p not in available]
    if not providers or missing:
        raise BackendError(
            f"{path.name}: execution provider(s) {missing or providers} not available in this "
            f"onnxruntime build; available: {available}"
        )
    return providers


class OnnxRuntimeBackend(Backend):
    """One onnxruntime session of one ``.onnx`` file.

    ``providers="auto"`` picks TensorRT, then CUDA, when this onnxruntime build has them, else the
    CPU; an explicit list is used as given (an unavailable provider is an error, not a silent
    fallback). ``device`` records the provider the session really runs on, which can differ from the
    request when a provider fails to initialise (onnxruntime then falls back to the next one).
    ``provider_options`` is passed to onnxruntime per provider name (for example a TensorRT
    engine cache directory).
    """

    kind = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        *,
        threads: int = 1,
        providers: str | Sequence[str] = "auto",
        provider_options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.path = Path(path)
        if not isinstance(threads, int) or threads < 1:
            raise BackendError(f"{self.path.name}: threads = {threads!r}, expected an int >= 1")
        if not self.path.is_file():
            raise BackendError(f"onnx model {self.path} does not exist")
        ort = _import_onnxruntime()
        chosen = _resolve_providers(ort, providers, self.path)

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_mem_pattern = False  # the arena stops growing after a full batch (module docstring)
        options.log_severity_level = 3  # errors only: provider fallbacks are reported via `device`

        per_provider = provider_options or {}
        try:
            self._session = ort.InferenceSession(
                str(self.path),
                sess_options=options,
                providers=chosen,
                provider_options=[per_provider.get(p, {}) for p in chosen],
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise BackendError(
                f"onnxruntime could not load {self.path} with providers {chosen}: {exc}"
            ) from exc

        self.providers = list(self._session.get_providers())
        self.device = _PROVIDER_DEVICE.get(self.providers[0], self.providers[0])
        where = str(self.path.name)
        self.inputs = [
            TensorSpec(i.name, ort_type_to_dtype(i.type, f"{where}: input {i.name!r}"), _dims(i.shape))
            for i in self._session.get_inputs()
        ]
        self.outputs = [
            TensorSpec(o.name, ort_type_to_dtype(o.type, f"{where}: output {o.name!r}"), _dims(o.shape))
            for o in self._session.get_outputs()
        ]
        self._output_names = [spec.name for spec in self.outputs]

    @property
    def session(self) -> Any:
        """The onnxruntime ``InferenceSession`` (for inspection: options, providers, profiling)."""
        if self._session is None:
            raise BackendError(f"{self.path.name}: session is closed")
        return self._session

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._session
        if session is None:
            raise BackendError(f"{self.path.name}: run() after close()")
        self._check_batch(batch)
        try:
            results = session.run(self._output_names, batch)
        except Exception as exc:
            raise BackendError(f"onnxruntime failed running {self.path.name} on {self.device}: {exc}") from exc
        return dict(zip(self._output_names, results))

    def close(self) -> None:
        # Dropping the last reference frees the session's memory (arena, provider state).
        self._session = None


def _dims(shape: Sequence[Any]) -> tuple[int | None, ...]:
    """onnxruntime reports a symbolic dim as a string ('N', 'batch') and an unknown one as None."""
    return tuple(d if isinstance(d, int) and d >= 0 else None for d in shape)
