"""The offload wire (v1): one msgpack message per *batch* from a board to a peer, one reply back.

A board that offloads a batch publishes, QoS 1, to ``edge/v1/<peer>/offload/<model>`` with an MQTT v5
response topic (its own ``edge/v1/<board>/offload-reply/<model>``) and correlation data (the batch
id), as an application does for ``infer``. The request map:

* ``v``: 1;
* ``origin``: the board's device id; ``batch``: the board's id of the batch (unique per origin: with
  the origin it names the batch in logs, and the reply carries it back);
* ``split``: the model card's split point whose tail the peer runs, or nil for the whole model
  (full offload);
* ``inputs``: ``{name: tensor}``, each with the batch dimension first (``[N, ...]``) and a codec tag
  (``codec``; ``raw`` today, :func:`encode_batch_tensor`): for a split point the one intermediate
  tensor, named as the card names it; for full offload the model's own inputs;
* ``deadlines``: ``N`` absolute deadlines, unix seconds: the wall clock is what two boards share
  (each converts to its own monotonic scheduler clock at the edge, as ``agent.api`` does for a
  request's ``deadline``; boards are expected to run NTP); the board sends what it can use: the time
  by which the peer's answer must be *back*, not the application's deadline;
* ``priority`` (optional int, -1000..1000).

The reply map, exactly one per request message, on the response topic with the correlation data:

* ``v``, ``batch`` (echoed; nil if it could not be read), ``status``: ``ok`` when the message was
  taken (each item then has its own status), ``error`` when the whole message was refused
  (``error``: ``{code, message, field}``; nothing was run);
* ``items``: ``N`` maps ``{status: "ok"}`` or ``{status: "error", error: {code, message}}`` with the
  codes of the infer wire (``rejected`` by the peer's admission, ``deadline_missed``...);
* ``outputs``: ``{name: tensor [N, ...]}``, a row per item (zeros where an item failed);
* ``timing``: ``queue_ms`` (the longest queue wait), ``compute_ms`` (the peer's batch compute, the
  largest), ``total_ms`` (message received to reply sent on the peer: the board takes it off its
  round trip to estimate the link);
* ``served_by``: the peer's device, backend and instance, and the split point.

Decoding is strict: anything malformed is an :class:`~agent.errors.InferenceError` naming the
field; the peer answers it with an error reply, and the network thread goes on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import msgpack
import numpy as np

from agent.errors import BAD_REQUEST, ERROR_CODES, INTERNAL, INVALID_INPUT, TOO_LARGE, InferenceError
from agent.intake.msgpack_codec import _show, decode_tensor, encode_tensor, pack
from agent.offload import codecs

OFFLOAD_WIRE_VERSION = 1
#: What this agent's tensors travel as until the codecs (``agent.offload.codecs``) land.
CODECS = tuple(dict.fromkeys(("raw", *codecs.available_codecs())))
#: The largest decoded tensor an offload message may carry.
MAX_TENSOR_BYTES = 256 * 1024 * 1024
#: The most items one offload message may carry (a batch buffer is at most 1024 rows).
MAX_ITEMS = 1024


# --- tensors: the one place a codec is applied -----------------------------------------------------

def encode_batch_tensor(array: np.ndarray, codec: str = "raw") -> dict:
    """A batch tensor to its wire map, codec-tagged: float32 activations by ``codec``
    (``agent.offload.codecs``), anything else (a model's uint8 input, outputs) as it is."""
    if codec == "raw" or array.dtype != np.float32:
        tensor = encode_tensor(array)
        tensor["codec"] = "raw"
        return tensor
    return codecs.encode(np.ascontiguousarray(array), codec).to_wire()


def decode_batch_tensor(tensor: Any, where: str) -> np.ndarray:
    """A wire tensor (any codec this agent reads) to an array; errors name ``where``."""
    codec = tensor.get("codec") if isinstance(tensor, dict) else None
    if codec in (None, "", "raw"):
        return decode_tensor(tensor, where)
    try:
        return codecs.decode(codecs.EncodedTensor.from_wire(tensor, MAX_TENSOR_BYTES), MAX_TENSOR_BYTES)
    except codecs.CodecError as exc:
        field = f"{where}.{exc.field}" if getattr(exc, "field", None) else where
        raise InferenceError(INVALID_INPUT, f"{where}: {exc}", field) from None


# --- the request -----------------------------------------------------------------------------------

@dataclass(slots=True)
class OffloadRequest:
    origin: str
    batch: str
    split: str | None
    inputs: dict[str, np.ndarray]       # each [N, ...]
    deadlines: list[float]              # unix seconds, one per item
    priority: int = 0

    @property
    def size(self) -> int:
        return len(self.deadlines)


def encode_request(request: OffloadRequest, codec: str = "raw") -> bytes:
    """What a board publishes to ``edge/v1/<peer>/offload/<model>``."""
    message: dict[str, Any] = {
        "v": OFFLOAD_WIRE_VERSION, "origin": request.origin, "batch": request.batch, "split": request.split,
        "inputs": {name: encode_batch_tensor(array, codec) for name, array in request.inputs.items()},
        "deadlines": [float(d) for d in request.deadlines],
    }
    if request.priority:
        message["priority"] = request.priority
    return pack(message)


def _bad(message: str, field_name: str | None) -> InferenceError:
    return InferenceError(BAD_REQUEST, message, field_name)


def _name(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 256


def check_size(payload: bytes, max_payload_bytes: int, what: str) -> None:
    """Raise ``too_large`` naming ``what`` (an offload payload, a probe payload) when ``payload`` is
    longer than ``max_payload_bytes``: checked before anything is decoded."""
    if len(payload) > max_payload_bytes:
        raise InferenceError(TOO_LARGE, f"{what} of {len(payload)} bytes exceeds the limit of "
                                        f"{max_payload_bytes} bytes")


def unpack_map(payload: bytes, what: str) -> dict:
    """``payload`` as a msgpack map; raises ``bad_request`` naming ``what`` (an offload request, a
    reply, a probe) when it is not one."""
    try:
        message = msgpack.unpackb(payload, raw=False)
    except Exception as exc:
        raise _bad(f"{what} is not valid msgpack ({type(exc).__name__}: {exc})", None) from None
    if not isinstance(message, dict):
        raise _bad(f"{what} must be a msgpack map, got {type(message).__name__}", None)
    return message


def decode_request(payload: bytes, max_payload_bytes: int) -> OffloadRequest:
    """Bytes to an :class:`OffloadRequest`, every field checked; raises ``InferenceError`` naming
    the first wrong field (with the batch id on it as ``batch`` when it could be read)."""
    check_size(payload, max_payload_bytes, "offload payload")
    message = unpack_map(payload, "offload request")
    batch = message.get("batch")
    try:
        return _request_fields(message)
    except InferenceError as exc:
        exc.batch = batch if _name(batch) else None
        raise


def _request_fields(message: dict) -> OffloadRequest:
    version = message.get("v")
    if version != OFFLOAD_WIRE_VERSION:
        raise _bad(f"v = {_show(version)}: expected {OFFLOAD_WIRE_VERSION}", "v")
    for key in ("origin", "batch"):
        if not _name(message.get(key)):
            raise _bad(f"{key} = {_show(message.get(key))}: expected a non-empty string", key)
    split = message.get("split")
    if split is not None and not _name(split):
        raise _bad(f"split = {_show(split)}: expected a split point's name, or nil for the whole model", "split")
    deadlines = message.get("deadlines")
    if (not isinstance(deadlines, list) or not 1 <= len(deadlines) <= MAX_ITEMS
            or not all(isinstance(d, (int, float)) and not isinstance(d, bool) and math.isfinite(d) and d > 0
                       for d in deadlines)):
        raise _bad(f"deadlines = {_show(deadlines)}: expected 1..{MAX_ITEMS} unix times (numbers > 0), "
                   f"one per item", "deadlines")
    priority = message.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool) or not -1000 <= priority <= 1000:
        raise _bad(f"priority = {_show(priority)}: expected an integer in -1000..1000", "priority")
    inputs = message.get("inputs")
    if not isinstance(inputs, dict) or not inputs:
        raise _bad("inputs must be a non-empty map of name -> tensor", "inputs")
    arrays = {}
    for name, tensor in inputs.items():
        if not _name(name):
            raise _bad(f"input names must be non-empty strings, got {_show(name)}", "inputs")
        array = decode_batch_tensor(tensor, f"inputs.{name}")
        if array.ndim < 1 or array.shape[0] != len(deadlines):
            raise InferenceError("invalid_input", f"inputs.{name} has shape {list(array.shape)}: its first "
                                                  f"dimension must be the {len(deadlines)} items of deadlines",
                                 f"inputs.{name}.shape")
        arrays[name] = array
    return OffloadRequest(origin=message["origin"], batch=message["batch"], split=split, inputs=arrays,
                          deadlines=[float(d) for d in deadlines], priority=priority)


# --- the reply -------------------------------------------------------------------------------------

@dataclass(slots=True)
class OffloadReply:
    """A decoded reply: ``errors[i]`` is ``None`` where item ``i`` has its row of ``outputs``."""

    batch: str | None
    error: InferenceError | None                 # the whole message refused: nothing ran
    errors: list[InferenceError | None] = field(default_factory=list)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    timing: dict = field(default_factory=dict)
    served_by: dict = field(default_factory=dict)


def encode_reply(batch: str | None, *, outputs: Mapping[str, np.ndarray] | None = None,
                 errors: Sequence[InferenceError | None] = (), timing: Mapping[str, float] | None = None,
                 served_by: Mapping | None = None, error: InferenceError | None = None) -> bytes:
    """The peer's reply: either ``error`` (the message refused) or one status per item with the
    batch's ``outputs`` (``[N, ...]`` each)."""
    message: dict[str, Any] = {"v": OFFLOAD_WIRE_VERSION, "batch": batch}
    if error is not None:
        message["status"] = "error"
        message["error"] = error.as_dict()
    else:
        message["status"] = "ok"
        message["items"] = [{"status": "ok"} if e is None else {"status": "error", "error": e.as_dict()}
                            for e in errors]
        message["outputs"] = {name: encode_batch_tensor(array) for name, array in (outputs or {}).items()}
    if timing is not None:
        message["timing"] = {k: float(v) for k, v in timing.items()}
    if served_by is not None:
        message["served_by"] = dict(served_by)
    return pack(message)


def _error(value: Any, where: str) -> InferenceError:
    if not isinstance(value, dict) or value.get("code") not in ERROR_CODES or not isinstance(value.get("message"), str):
        raise _bad(f"{where} = {_show(value)}: expected {{code, message}} with a code of {ERROR_CODES}", where)
    return InferenceError(value["code"], value["message"], value.get("field") if isinstance(value.get("field"), str) else None)


def decode_reply(payload: bytes, expected_items: int | None = None) -> OffloadReply:
    """The board's side: a peer's reply, checked as strictly as a request (a peer is a program
    too). Raises ``InferenceError`` naming the field; ``expected_items``: the batch's size."""
    message = unpack_map(payload, "reply")
    if message.get("v") != OFFLOAD_WIRE_VERSION:
        raise _bad(f"v = {_show(message.get('v'))}: expected {OFFLOAD_WIRE_VERSION}", "v")
    batch = message.get("batch")
    batch = batch if _name(batch) else None
    timing = message.get("timing") or {}
    if not isinstance(timing, dict) or not all(isinstance(v, (int, float)) for v in timing.values()):
        raise _bad(f"timing = {_show(timing)}: expected a map of numbers", "timing")
    served_by = message.get("served_by") or {}
    if not isinstance(served_by, dict):
        raise _bad(f"served_by = {_show(served_by)}: expected a map", "served_by")
    status = message.get("status")
    if status == "error":
        return OffloadReply(batch, _error(message.get("error"), "error"), timing=timing, served_by=served_by)
    if status != "ok":
        raise _bad(f"status = {_show(status)}: expected 'ok' or 'error'", "status")
    items = message.get("items")
    if not isinstance(items, list) or (expected_items is not None and len(items) != expected_items):
        raise _bad(f"items: expected a list of {expected_items if expected_items is not None else 'N'} item "
                   f"statuses, got {_show(items)}", "items")
    errors: list[InferenceError | None] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or item.get("status") not in ("ok", "error"):
            raise _bad(f"items[{i}] = {_show(item)}: expected {{status: ok|error}}", f"items[{i}]")
        errors.append(None if item["status"] == "ok" else _error(item.get("error"), f"items[{i}].error"))
    outputs_raw = message.get("outputs")
    if not isinstance(outputs_raw, dict):
        raise _bad("outputs must be a map of name -> tensor", "outputs")
    outputs = {}
    for name, tensor in outputs_raw.items():
        array = decode_batch_tensor(tensor, f"outputs.{name}")
        if array.ndim < 1 or array.shape[0] != len(items):
            raise _bad(f"outputs.{name} has shape {list(array.shape)}: expected {len(items)} rows", f"outputs.{name}")
        outputs[name] = array
    if any(e is None for e in errors) and not outputs:
        raise InferenceError(INTERNAL, "reply has items ok but no outputs", "outputs")
    return OffloadReply(batch, None, errors, outputs, timing, served_by)


__all__ = ["OFFLOAD_WIRE_VERSION", "CODECS", "OffloadRequest", "OffloadReply", "encode_request", "decode_request",
           "encode_reply", "decode_reply", "encode_batch_tensor", "decode_batch_tensor"]
