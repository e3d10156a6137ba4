"""Inference backends behind one interface (:class:`agent.backends.base.Backend`).

``load_backend("onnxruntime" | "litert", path, threads=1, **options)`` loads ONE instance of a
model; the agent loads several for concurrency and drives each from its own thread.

Imports are lazy: importing ``agent.backends`` loads neither onnxruntime nor LiteRT, so the CLI
and the simulator start fast and a board that lacks one runtime still runs the other.
Board-specific parts (the Edge TPU delegate, the TensorRT/CUDA providers) are detected at load time;
:func:`available_backends` and :func:`edgetpu_available` let the self-test say what the board has.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from agent.backends.base import Backend, BackendError

__all__ = [
    "Backend",
    "BackendError",
    "BACKEND_KINDS",
    "load_backend",
    "available_backends",
    "edgetpu_available",
]

#: kind -> (module, class). The module is imported only when that kind is loaded.
_BACKENDS = {
    "onnxruntime": ("agent.backends.onnxruntime_backend", "OnnxRuntimeBackend"),
    "litert": ("agent.backends.litert_backend", "LiteRTBackend"),
}
BACKEND_KINDS = tuple(_BACKENDS)


def load_backend(kind: str, path: str | Path, *, threads: int = 1, **options: Any) -> Backend:
    """Load one instance of the model at ``path`` with the runtime ``kind``.

    ``options`` go to the backend: ``providers=`` (onnxruntime), ``delegate=``,
    ``max_interpreters=`` (litert). Raises ValueError for an unknown kind, BackendError when the
    runtime is missing or cannot load the file.
    """
    try:
        module_name, class_name = _BACKENDS[kind]
    except (KeyError, TypeError):
        raise ValueError(f"backend kind {kind!r} is unknown; expected one of {list(BACKEND_KINDS)}") from None
    backend_class = getattr(importlib.import_module(module_name), class_name)
    return backend_class(path, threads=threads, **options)


def available_backends() -> dict[str, str]:
    """kind -> runtime version, or ``"unavailable: <reason>"`` (what to install)."""
    result: dict[str, str] = {}
    try:
        import onnxruntime

        providers = ",".join(onnxruntime.get_available_providers())
        result["onnxruntime"] = f"{onnxruntime.__version__} ({providers})"
    except ImportError as exc:
        result["onnxruntime"] = f"unavailable: {exc}; pip install onnxruntime"
    try:
        from agent.backends.litert_backend import import_interpreter_module

        module = import_interpreter_module()
        package = module.__name__.split(".")[0]
        version = getattr(importlib.import_module(package), "__version__", "unknown version")
        result["litert"] = f"{version} ({package})"
    except BackendError as exc:
        result["litert"] = f"unavailable: {exc}"
    return result


def edgetpu_available() -> tuple[bool, str]:
    """Whether the Edge TPU delegate loads here (library present and a TPU attached), and why not."""
    from agent.backends.litert_backend import EDGETPU_LIBRARY, load_edgetpu_delegate

    try:
        delegate = load_edgetpu_delegate()
    except BackendError as exc:
        return False, str(exc)
    del delegate
    return True, f"{EDGETPU_LIBRARY} loaded"
