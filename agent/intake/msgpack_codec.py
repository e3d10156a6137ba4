"""The MQTT wire's codec (msgpack, wire format v1, DESIGN.md): requests, tensors and replies.

Both sides use it: the agent's MQTT intake decodes requests and encodes replies, an application
(``agent.client``, the load generator) encodes requests and decodes replies.

Validation order matters: size is checked before a byte is decoded, the map's fields next, the
model's interface last (``agent.models.tensors.check_inputs``, in ``Agent.submit``), so each error
names the first thing wrong. Decoded tensors are zero-copy views of the payload
(``numpy.frombuffer``); the batch assembly copies them once into the batch.
"""
from __future__ import annotations

import math
import reprlib
import threading
from dataclasses import dataclass
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from agent.errors import BAD_REQUEST, INVALID_INPUT, TOO_LARGE, InferenceError

if TYPE_CHECKING:   # an application's side imports the codec without the agent's scheduler
    from agent.scheduler.request import Result

WIRE_VERSION = 1


@dataclass(slots=True)
class WireRequest:
    """A decoded, validated request: what an intake hands to ``Agent.submit``."""

    id: str
    inputs: dict[str, np.ndarray]
    slo_ms: float | None
    deadline: float | None        # unix seconds
    priority: int
    min_accuracy: float | None


#: How an error message shows a value the client sent: bounded in depth and length, so a deeply nested
#: or huge value neither overflows ``repr``'s recursion (``RecursionError``) nor makes a huge reply.
_shown = reprlib.Repr()
_shown.maxlevel, _shown.maxdict, _shown.maxlist, _shown.maxstring, _shown.maxother, _shown.maxlong = 3, 6, 8, 80, 80, 40


def _show(value: Any) -> str:
    return _shown.repr(value)


# --- tensors ------------------------------------------------------------------------------------

def encode_tensor(array: np.ndarray) -> dict:
    """``{dtype, shape, data}``: C order, little-endian bytes."""
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    dtype = array.dtype
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = dtype.name
        if len(_DTYPE_NAMES) < 64:
            _DTYPE_NAMES[dtype] = name
    return {"dtype": name, "shape": list(array.shape), "data": array.tobytes()}


# ``dtype.name`` is computed in Python by numpy each time it is read (most of a reply's tensor
# encoding); the numeric dtypes a model answers with are a handful.
_DTYPE_NAMES: dict[np.dtype, str] = {}


def decode_tensor(tensor: Any, field: str) -> np.ndarray:
    """A wire tensor to a read-only numpy view; errors name the tensor's field."""
    if not isinstance(tensor, Mapping):
        raise InferenceError(INVALID_INPUT, f"{field} must be a map with dtype, shape, data; got {type(tensor).__name__}", field)
    for key in ("dtype", "shape", "data"):
        if key not in tensor:
            raise InferenceError(INVALID_INPUT, f"{field} has no {key!r}", f"{field}.{key}")
    codec = tensor.get("codec")
    if codec not in (None, "", "raw"):
        raise InferenceError(INVALID_INPUT, f"{field}.codec = {_show(codec)}: this agent accepts raw tensors only", f"{field}.codec")
    try:
        dtype = np.dtype(tensor["dtype"]) if isinstance(tensor["dtype"], str) else None
    except Exception:   # numpy's parser raises TypeError, ValueError, SyntaxError... on what it cannot read
        dtype = None
    if dtype is None or dtype.kind not in "biuf":
        raise InferenceError(INVALID_INPUT, f"{field}.dtype = {_show(tensor['dtype'])} is not a numeric numpy dtype name", f"{field}.dtype")
    shape = tensor["shape"]
    if (not isinstance(shape, (list, tuple)) or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise InferenceError(INVALID_INPUT, f"{field}.shape = {_show(shape)}: expected a list of non-negative ints", f"{field}.shape")
    data = tensor["data"]
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InferenceError(INVALID_INPUT, f"{field}.data must be bytes (msgpack bin), got {type(data).__name__}", f"{field}.data")
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise InferenceError(
            INVALID_INPUT,
            f"{field}.data has {len(data)} bytes; shape {list(shape)} of {dtype.name} needs {expected}",
            f"{field}.data",
        )
    array = np.frombuffer(data, dtype=dtype.newbyteorder("<"))
    try:
        return array.reshape(shape)
    except ValueError:   # an empty tensor whose other dimensions numpy cannot hold, e.g. [2**63, 0]
        raise InferenceError(INVALID_INPUT, f"{field}.shape = {list(shape)}: a dimension exceeds what an array "
                                            f"can hold", f"{field}.shape") from None


# --- requests -----------------------------------------------------------------------------------

def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def decode_request(payload: bytes, max_payload_bytes: int) -> WireRequest:
    """Bytes to a :class:`WireRequest` with its tensors decoded (not yet checked against a model).

    Raises :class:`InferenceError`; the caller replies with it. The request id, when it could be
    read, is on the exception as ``request_id`` so the error reply can carry it.
    """
    if len(payload) > max_payload_bytes:
        raise InferenceError(TOO_LARGE, f"payload of {len(payload)} bytes exceeds the limit of {max_payload_bytes} bytes")
    try:
        message = msgpack.unpackb(payload, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise InferenceError(BAD_REQUEST, f"payload is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(message, dict):
        raise InferenceError(BAD_REQUEST, f"request must be a msgpack map, got {type(message).__name__}")
    request_id = message.get("id")
    try:
        return _fields(message)
    except InferenceError as exc:
        exc.request_id = request_id if isinstance(request_id, str) else None
        raise


def _fields(message: dict) -> WireRequest:
    request_id = message.get("id")
    if not isinstance(request_id, str) or not request_id:
        raise InferenceError(BAD_REQUEST, f"id must be a non-empty string, got {_show(request_id)}", "id")
    slo_ms, deadline = message.get("slo_ms"), message.get("deadline")
    if slo_ms is not None and deadline is not None:
        raise InferenceError(BAD_REQUEST, "give slo_ms or deadline, not both", "deadline")
    if slo_ms is not None and not (_number(slo_ms) and slo_ms > 0):
        raise InferenceError(BAD_REQUEST, f"slo_ms = {_show(slo_ms)}: expected a number > 0 (milliseconds)", "slo_ms")
    if deadline is not None and not (_number(deadline) and deadline > 0):
        raise InferenceError(BAD_REQUEST, f"deadline = {_show(deadline)}: expected unix seconds (a number > 0)", "deadline")
    priority = message.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool) or not -1000 <= priority <= 1000:
        raise InferenceError(BAD_REQUEST, f"priority = {_show(priority)}: expected an integer in -1000..1000", "priority")
    min_accuracy = message.get("min_accuracy")
    if min_accuracy is not None and not (_number(min_accuracy) and 0 <= min_accuracy <= 1):
        raise InferenceError(BAD_REQUEST, f"min_accuracy = {_show(min_accuracy)}: expected a number in 0..1", "min_accuracy")
    inputs = message.get("inputs")
    if not isinstance(inputs, dict) or not inputs:
        raise InferenceError(BAD_REQUEST, "inputs must be a non-empty map of name -> tensor", "inputs")
    tensors = {}
    for name, tensor in inputs.items():
        if not isinstance(name, str):
            raise InferenceError(BAD_REQUEST, f"input names must be strings, got {_show(name)}", "inputs")
        tensors[name] = decode_tensor(tensor, f"inputs.{name}")
    return WireRequest(
        id=request_id, inputs=tensors,
        slo_ms=None if slo_ms is None else float(slo_ms),
        deadline=None if deadline is None else float(deadline),
        priority=priority,
        min_accuracy=None if min_accuracy is None else float(min_accuracy),
    )


_packers = threading.local()


def pack(obj: Any) -> bytes:
    """``msgpack.packb(obj, use_bin_type=True)``, by a packer kept per thread: ``packb`` builds a
    packer, and allocates its 256 KiB buffer, for every message, and an agent packs one per reply
    (BENCHMARKS.md, eighteenth session). A packer is not thread-safe, hence one per thread; it
    resets itself after each message, and after a message it could not pack."""
    packer = getattr(_packers, "packer", None)
    if packer is None:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(obj)


def encode_request(request_id: str, inputs: Mapping[str, np.ndarray], *, slo_ms: float | None = None,
                   deadline: float | None = None, priority: int | None = None,
                   min_accuracy: float | None = None) -> bytes:
    """The client side: what an application publishes to ``edge/v1/<device>/infer/<model>``."""
    message: dict[str, Any] = {"id": request_id, "inputs": {k: encode_tensor(v) for k, v in inputs.items()}}
    if slo_ms is not None:
        message["slo_ms"] = slo_ms
    if deadline is not None:
        message["deadline"] = deadline
    if priority is not None:
        message["priority"] = priority
    if min_accuracy is not None:
        message["min_accuracy"] = min_accuracy
    return pack(message)


# --- replies ------------------------------------------------------------------------------------

def result_reply(result: Result, request_id: str | None) -> dict:
    """The reply map of a served request (outputs still numpy; :func:`encode_reply` packs them)."""
    return {
        "id": request_id, "status": "ok", "outputs": result.outputs,
        "timing": {"queue_ms": result.queue_ms, "compute_ms": result.compute_ms, "total_ms": result.total_ms},
        "batch_size": result.batch_size, "served_by": result.served_by,
    }


def encode_reply(reply: dict) -> bytes:
    """A reply map (:func:`result_reply`, :func:`error_reply`) to bytes; numpy outputs become wire tensors."""
    outputs = reply.get("outputs")
    if outputs is not None:
        reply = dict(reply, outputs={k: encode_tensor(v) for k, v in outputs.items()})
    return pack(reply)


def error_reply(request_id: str | None, error: InferenceError, timing: dict | None = None) -> dict:
    reply: dict[str, Any] = {"id": request_id, "status": "error", "error": error.as_dict()}
    if timing is not None:
        reply["timing"] = timing
    return reply


def decode_reply(payload: bytes) -> dict:
    """The client side: a reply's bytes to a map whose outputs are numpy arrays."""
    reply = msgpack.unpackb(payload, raw=False)
    if reply.get("outputs"):
        reply["outputs"] = {k: decode_tensor(v, f"outputs.{k}") for k, v in reply["outputs"].items()}
    return reply
