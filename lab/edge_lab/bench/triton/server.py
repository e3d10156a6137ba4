"""A real NVIDIA Triton Inference Server to compare edge-agent with.

The ``tritonserver`` binary (2.51, python backend only) ships inside the ``nvidia-pytriton`` wheel.
We drive that binary directly, with a model repository whose models run onnxruntime inside the
python backend's stub (``model.py`` beside this file), rather than through pytriton's
``Triton().bind()`` API: that API adds a zmq hop from the stub to the user's process on every
batch, which would make Triton look slower than it is. The comparison should be with Triton at its
best on this board.

pytriton pins numpy < 2, so it lives in its own virtualenv (``.venv-triton``); this module imports
only the standard library, numpy and the model card reader, and finds the binary at run time, so
the repository writer also runs (and is tested) where Triton is not installed.

* :class:`TritonSetting`: Triton's scheduling knobs (dynamic batcher, instances, queue policy).
* :func:`write_model_repository`: a repository for some model cards under one setting.
* :class:`TritonServer`: start / health-wait / stop of the server process tree.
"""
from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from agent.models.card import CardError, ModelCard, load_card

__all__ = [
    "TritonSetting",
    "TritonError",
    "TritonServer",
    "write_model_repository",
    "model_config_text",
    "find_tritonserver",
    "session_pids",
    "MODEL_PY",
    "NO_DEFAULT_TIMEOUT_US",
]

#: The python-backend model copied into every model version directory.
MODEL_PY = Path(__file__).resolve().parent / "model.py"

INSTALL_HINT = (
    "install the lab's triton extra into its own virtualenv (nvidia-pytriton pins numpy < 2): "
    "`bash tools/dev.sh triton`, or `python3 -m venv .venv-triton && "
    ".venv-triton/bin/pip install -e . -e './lab[triton]'` from the source tree"
)

_TRITON_TYPES = {
    np.dtype(np.bool_): "TYPE_BOOL",
    np.dtype(np.uint8): "TYPE_UINT8",
    np.dtype(np.uint16): "TYPE_UINT16",
    np.dtype(np.uint32): "TYPE_UINT32",
    np.dtype(np.uint64): "TYPE_UINT64",
    np.dtype(np.int8): "TYPE_INT8",
    np.dtype(np.int16): "TYPE_INT16",
    np.dtype(np.int32): "TYPE_INT32",
    np.dtype(np.int64): "TYPE_INT64",
    np.dtype(np.float16): "TYPE_FP16",
    np.dtype(np.float32): "TYPE_FP32",
    np.dtype(np.float64): "TYPE_FP64",
}


#: The default queue timeout written when a setting has none: one hour.
NO_DEFAULT_TIMEOUT_US = 3_600_000_000


class TritonError(RuntimeError):
    """Triton is not installed, would not start, or a model repository could not be written."""


@dataclass(frozen=True)
class TritonSetting:
    """Triton's own scheduling knobs for every model of a repository.

    ``queue_timeout_us``: the default queue policy's timeout (None: an hour, in effect none). A
    request may carry a shorter ``timeout`` of its own (microseconds); one still queued when its
    timeout has expired is rejected (``timeout_action: REJECT``) when the batcher next looks at the
    queue. That is the nearest Triton has to a per-request deadline: it covers queueing only, never
    a batch already running.
    """

    max_batch_size: int = 8
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    instances: int = 2
    queue_timeout_us: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.max_batch_size, int) and self.max_batch_size >= 1):
            raise ValueError(f"TritonSetting.max_batch_size = {self.max_batch_size!r}: expected an integer >= 1")
        object.__setattr__(self, "preferred_batch_sizes", tuple(self.preferred_batch_sizes))
        for size in self.preferred_batch_sizes:
            if not (isinstance(size, int) and 1 <= size <= self.max_batch_size):
                raise ValueError(
                    f"TritonSetting.preferred_batch_sizes = {self.preferred_batch_sizes!r}: "
                    f"expected integers in 1..max_batch_size ({self.max_batch_size})"
                )
        if not (isinstance(self.max_queue_delay_us, int) and self.max_queue_delay_us >= 0):
            raise ValueError(f"TritonSetting.max_queue_delay_us = {self.max_queue_delay_us!r}: expected an integer >= 0")
        if not (isinstance(self.instances, int) and self.instances >= 1):
            raise ValueError(f"TritonSetting.instances = {self.instances!r}: expected an integer >= 1")
        if self.queue_timeout_us is not None and not (
            isinstance(self.queue_timeout_us, int) and self.queue_timeout_us > 0
        ):
            raise ValueError(
                f"TritonSetting.queue_timeout_us = {self.queue_timeout_us!r}: expected None or an integer > 0"
            )

    def describe(self) -> str:
        """One line for tables and logs, e.g. ``2 instances, max batch 8, preferred [4,8], delay 500 us``."""
        parts = [f"{self.instances} instance{'s' if self.instances != 1 else ''}", f"max batch {self.max_batch_size}"]
        if self.preferred_batch_sizes:
            parts.append(f"preferred [{','.join(map(str, self.preferred_batch_sizes))}]")
        parts.append(f"delay {self.max_queue_delay_us} us")
        if self.queue_timeout_us is not None:
            parts.append(f"queue timeout {self.queue_timeout_us} us")
        return ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["preferred_batch_sizes"] = list(self.preferred_batch_sizes)
        return data


# --- model repository ---------------------------------------------------------------------------

def _card_for(path: Path) -> ModelCard:
    """A card JSON, or an ONNX file with its card beside it (same stem, ``.json``)."""
    path = Path(path)
    if path.suffix == ".onnx":
        card_path = path.with_suffix(".json")
        if not card_path.is_file():
            raise TritonError(f"{path}: expected its model card beside it at {card_path} (inputs, outputs, dtypes)")
        return load_card(card_path)
    return load_card(path)


def _onnx_path(path: Path, card: ModelCard) -> Path:
    if Path(path).suffix == ".onnx":
        return Path(path).resolve()
    return card.verify_file("onnx")


def _tensor_block(kind: str, specs) -> str:
    entries = []
    for spec in specs:
        try:
            data_type = _TRITON_TYPES[np.dtype(spec.dtype)]
        except KeyError:
            raise TritonError(f"tensor {spec.name!r}: dtype {spec.dtype} has no Triton type here") from None
        dims = ", ".join(str(d) for d in spec.shape[1:])     # without the batch dim: max_batch_size > 0
        entries.append(f'  {{ name: "{spec.name}" data_type: {data_type} dims: [ {dims} ] }}')
    return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"


def model_config_text(name: str, card: ModelCard, onnx_path: Path, setting: TritonSetting) -> str:
    """The ``config.pbtxt`` of one model under ``setting`` (protobuf text format)."""
    preferred = ", ".join(map(str, setting.preferred_batch_sizes))
    # Triton takes a request's own timeout only when it is below the default one
    # (PolicyQueue::Enqueue: override != 0 && override < default), and 0 means "no timeout", so
    # "no default timeout" is written as a default no request will reach.
    timeout_us = setting.queue_timeout_us or NO_DEFAULT_TIMEOUT_US
    return (
        f'name: "{name}"\n'
        'backend: "python"\n'
        f"max_batch_size: {setting.max_batch_size}\n"
        + _tensor_block("input", card.inputs)
        + _tensor_block("output", card.outputs)
        + "dynamic_batching {\n"
        + (f"  preferred_batch_size: [ {preferred} ]\n" if preferred else "")
        + f"  max_queue_delay_microseconds: {setting.max_queue_delay_us}\n"
        "  default_queue_policy {\n"
        "    timeout_action: REJECT\n"
        f"    default_timeout_microseconds: {timeout_us}\n"
        "    allow_timeout_override: true\n"
        "  }\n"
        "}\n"
        f"instance_group [ {{ count: {setting.instances} kind: KIND_CPU }} ]\n"
        f'parameters {{ key: "onnx_path" value: {{ string_value: "{onnx_path}" }} }}\n'
    )


def write_model_repository(root: Path, models: Sequence[tuple[str, Path]], setting: TritonSetting) -> Path:
    """Write a Triton model repository under ``root``: per model, ``<name>/config.pbtxt`` and
    ``<name>/1/model.py``. ``models`` pairs a Triton model name with a model card JSON or an ONNX
    file (its card beside it); the card gives tensor names, dtypes and item shapes. Returns ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for name, path in models:
        try:
            card = _card_for(Path(path))
            onnx_path = _onnx_path(Path(path), card)
        except CardError as exc:
            raise TritonError(f"model {name!r}: {exc}") from None
        model_dir = root / name
        (model_dir / "1").mkdir(parents=True, exist_ok=True)
        (model_dir / "config.pbtxt").write_text(model_config_text(name, card, onnx_path, setting))
        shutil.copyfile(MODEL_PY, model_dir / "1" / "model.py")
    return root


# --- the server ---------------------------------------------------------------------------------

def _pytriton_dir() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonError(f"tritonserver not found: the nvidia-pytriton package is not installed; {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def find_tritonserver() -> Path:
    """The ``tritonserver`` binary inside the installed nvidia-pytriton wheel."""
    binary = _pytriton_dir() / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise TritonError(f"tritonserver not found at {binary} (broken nvidia-pytriton install?); {INSTALL_HINT}")
    return binary


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


class TritonServer:
    """``tritonserver`` on a loopback HTTP port, serving one model repository.

    The server runs in a session of its own so that :meth:`stop` can signal the whole tree: the
    python backend runs each model instance in a ``triton_python_backend_stub`` child process.

    The stubs embed the Python that runs this module and see its virtualenv (numpy, onnxruntime):
    as pytriton does, the environment's ``bin`` goes first on ``PATH`` (the embedded interpreter
    finds ``python3`` there, hence ``pyvenv.cfg`` and the venv's site-packages), and that Python's
    ``LIBDIR`` goes on ``LD_LIBRARY_PATH`` (the stub links ``libpython3.X.so``; without it the
    loader may pick a system libpython of another build).
    """

    def __init__(self, repository: Path, http_port: int = 0, log_path: Path | None = None) -> None:
        self.repository = Path(repository).resolve()
        self.requested_port = http_port
        self.log_path = Path(log_path) if log_path is not None else None
        self.http_port: int | None = None
        self._process: subprocess.Popen | None = None
        self._workspace: Path | None = None
        self._log: Path | None = None
        self.shm_prefix = f"edge-agent-triton-{os.getpid()}-{secrets.token_hex(4)}-"
        self.startup_s: float | None = None

    # -- properties --------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def url(self) -> str:
        """``127.0.0.1:PORT``, as ``tritonclient.http.InferenceServerClient`` takes it."""
        if self.http_port is None:
            raise TritonError("the server is not started")
        return f"127.0.0.1:{self.http_port}"

    @property
    def models(self) -> list[str]:
        return sorted(p.name for p in self.repository.iterdir() if (p / "config.pbtxt").is_file())

    # -- command line ------------------------------------------------------------------------
    def _backend_directory(self, workspace: Path) -> Path:
        """pytriton keeps one stub per Python version; the python backend wants the stub beside
        ``libtriton_python.so``. Like pytriton, assemble a backend directory with the stub that
        matches this Python (links, not copies)."""
        dist = find_tritonserver().parent.parent
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise TritonError(f"nvidia-pytriton has no python backend stub for Python {version} (looked at {stub})")
        backend = workspace / "backends" / "python"
        backend.mkdir(parents=True)
        for item in (dist / "backends" / "python").iterdir():
            if item.name != "__pycache__":
                (backend / item.name).symlink_to(item)
        (backend / "triton_python_backend_stub").symlink_to(stub)
        return workspace / "backends"

    def command(self, backend_directory: Path, port: int) -> list[str]:
        """HTTP on loopback only (the benchmark's clients speak HTTP/KServe v2); gRPC and metrics
        off, so the server spends no thread or core on endpoints nobody calls."""
        return [
            str(find_tritonserver()),
            "--model-repository", str(self.repository),
            "--backend-directory", str(backend_directory),
            "--backend-config", f"python,shm-region-prefix-name={self.shm_prefix}",
            "--http-address", "127.0.0.1",
            "--http-port", str(port),
            "--allow-grpc", "false",
            "--allow-metrics", "false",
            "--disable-auto-complete-config",      # the configs are complete: no stub launch to ask
            "--pinned-memory-pool-byte-size", "0",  # CPU only: no CUDA pinned pool to try for
            "--exit-timeout-secs", "5",
            "--log-verbose", "0",
        ]

    def environment(self) -> dict[str, str]:
        """This process's environment plus what the server and its stubs need to load (see the
        class docstring): pytriton's bundled libraries and this Python's LIBDIR, its venv first on
        PATH."""
        env = dict(os.environ)
        libs = [str(_pytriton_dir().parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR") or ""]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(p for p in libs if p)
        env["PATH"] = f"{Path(sys.prefix) / 'bin'}:{env.get('PATH', '')}"
        env.pop("PYTHONHOME", None)
        return env

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout_s: float = 60.0) -> "TritonServer":
        """Start the server and wait until it and every model of the repository are ready.
        Raises :class:`TritonError` with the log's tail if it exits or is not ready in time."""
        if self._process is not None:
            raise TritonError("the server is already started")
        models = self.models
        if not models:
            raise TritonError(f"{self.repository}: no model (no */config.pbtxt) to serve")
        began = time.monotonic()
        self._workspace = Path(tempfile.mkdtemp(prefix="edge-agent-triton-"))
        log_path = self.log_path or self._workspace / "tritonserver.log"
        try:
            backend_directory = self._backend_directory(self._workspace)
            # A port picked by _free_port can be taken before tritonserver binds it: try a few.
            for attempt in range(3):
                port = self.requested_port or _free_port()
                self._launch(backend_directory, port, log_path)
                try:
                    self._wait_ready(models, began + timeout_s)
                    break
                except TritonError as exc:
                    self._terminate()
                    in_use = "already in use" in str(exc)
                    if self.requested_port or attempt == 2 or not in_use:
                        raise
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - began
        return self

    def _launch(self, backend_directory: Path, port: int, log_path: Path) -> None:
        self.http_port = port
        self._log = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:
            self._process = subprocess.Popen(
                self.command(backend_directory, port),
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_ready(self, models: list[str], deadline: float) -> None:
        base = f"http://{self.url}"
        while True:
            code = self._process.poll()
            if code is not None:
                raise TritonError(f"tritonserver exited with status {code} before it was ready; log tail:\n{self.log_tail()}")
            if _http_status(f"{base}/v2/health/ready") == 200 and all(
                _http_status(f"{base}/v2/models/{name}/ready") == 200 for name in models
            ):
                return
            if time.monotonic() > deadline:
                raise TritonError(f"tritonserver not ready after the start timeout; log tail:\n{self.log_tail()}")
            time.sleep(0.1)

    def _terminate(self, grace_s: float = 8.0) -> None:
        """SIGTERM to tritonserver alone: it unloads its models, which finalizes and ends the
        stubs (signalling the stubs too would kill them mid-finalize). Whatever of the session is
        left after ``grace_s`` (a server hung mid-shutdown, orphaned stubs) gets SIGKILL."""
        process, self._process = self._process, None
        if process is None:
            return
        session = process.pid
        if process.poll() is None and grace_s > 0:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (process.poll() is None or session_pids(session)):
            time.sleep(0.05)
        if process.poll() is None or session_pids(session):
            try:
                os.killpg(session, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()
        deadline = time.monotonic() + 2.0
        while session_pids(session) and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self, grace_s: float = 8.0) -> None:
        """Stop the server tree, then remove the workspace (the default log with it) and any
        shared-memory region the stubs left in /dev/shm.

        A graceful stop takes about 3 s on the reference board (the python backend needs ~2.5 s to
        unload a model's stubs), longer while a client keeps an HTTP connection open: tritonserver
        waits for open connections up to its exit timeout (5 s), so close clients first.
        ``grace_s=0`` kills the tree at once (models are not finalized)."""
        self._terminate(grace_s)
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)
        if self._workspace is not None:
            shutil.rmtree(self._workspace, ignore_errors=True)
            self._workspace = None

    def __enter__(self) -> "TritonServer":
        return self.start() if self._process is None else self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- introspection -----------------------------------------------------------------------
    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self._log.read_text(errors="replace") if self._log else ""
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def tree_pids(self) -> list[int]:
        """tritonserver and its stubs: every process of the server's session."""
        return session_pids(self.pid) if self.pid is not None else []


def session_pids(session: int) -> list[int]:
    """Live processes (not zombies) whose session id is ``session``, from /proc (Linux)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()   # after "pid (comm) ": state ppid pgrp session
        if fields[0] != "Z" and int(fields[3]) == session:
            pids.append(int(entry.name))
    return sorted(pids)
