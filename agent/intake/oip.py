"""The Open Inference Protocol (KServe v2, what NVIDIA Triton speaks over HTTP/REST), without sockets.

Pure functions between a request body and what :meth:`agent.api.Agent.submit` takes, and between a
:class:`~agent.scheduler.request.Result` (or an :class:`~agent.errors.InferenceError`) and a response
body; :mod:`agent.intake.http` puts them on the wire. Kept apart so the protocol can be tested, and
reused, without a server.

A request body is JSON, or JSON followed by raw tensor bytes (the *binary tensor data* extension:
the ``Inference-Header-Content-Length`` header says where the JSON ends, each input's
``parameters.binary_data_size`` how many of the bytes that follow are its own, in input order).
Binary tensors become read-only ``numpy.frombuffer`` views of the body (no copy: the batch assembly
copies each item once into its batch); JSON ``data``, flat or nested, row-major, is converted once.

Validation names the offending field in protocol terms (``inputs.frames.datatype``, ``UINT8``), and
every error message starts with the agent's error code (``invalid_input: ...``) so a client can tell
errors apart from the message alone, the only thing the protocol's error object carries.

What the protocol's fields mean here:

* ``parameters.slo_ms`` (number > 0): the request's latency objective. Triton's
  ``parameters.timeout`` (microseconds; what ``tritonclient``'s ``infer(..., timeout=)`` sends)
  stands in for it when ``slo_ms`` is absent (0 = none, as in Triton). Neither: the model's
  ``default_slo_ms``.
* ``parameters.priority`` (integer, -1000..1000): the agent's priority, higher first. (Triton counts
  1 as its highest level; edge-agent keeps one meaning of ``priority`` across its intakes.)
* ``parameters.min_accuracy`` (number in 0..1): the wire's ``min_accuracy`` (DESIGN.md): a
  multi-exit model answers at an exit accurate enough (``agent.scheduler.exit_rule``); the reply's
  ``parameters.exit`` names the exit that answered (a list, row by row, for several rows).
* The reply's ``parameters.served_by`` names the board that computed the request, and
  ``parameters.split`` the split point where a peer ran its tail (``full``: all of it; with
  ``served_by`` this board, the peer failed it and the board ran it itself): an MQTT reply's
  ``served_by``, flattened, as the protocol's parameters hold only strings, numbers and booleans
  (lists row by row for several rows).
* The batch dimension: a request may carry N >= 1 items (shape ``[N, *item]``, or the bare item
  shape for one); the intake submits each row as its own request, all with the request's SLO, and
  gathers the outputs along the first axis in row order (see :class:`InferRequest`).
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from agent.errors import (BAD_REQUEST, DEADLINE_MISSED, INTERNAL, INVALID_INPUT, REJECTED, SHUTTING_DOWN,
                          TOO_LARGE, UNKNOWN_MODEL, InferenceError)
from agent.models.tensors import TensorSpec

#: The protocol's tensor datatypes this agent carries, and their numpy dtypes (little-endian on the wire).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8), "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
_DATATYPE_OF: dict[np.dtype, str] = {dtype: name for name, dtype in DATATYPES.items()}
#: Protocol datatypes that exist but that no model of this agent takes or returns.
UNSUPPORTED_DATATYPES = ("BYTES", "BF16")

#: Triton's ``platform`` string for each backend kind of the config.
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "litert": "tensorflow_lite"}
#: Every model serves one version.
MODEL_VERSION = "1"

#: The HTTP status of each agent error code (README, "Serve the Open Inference Protocol").
HTTP_STATUS = {
    BAD_REQUEST: 400,
    INVALID_INPUT: 400,
    UNKNOWN_MODEL: 404,
    TOO_LARGE: 413,
    REJECTED: 429,          # refused at the door (admission control, full queue): back off or relax the SLO
    SHUTTING_DOWN: 503,
    DEADLINE_MISSED: 504,   # accepted, but no answer within the SLO
    INTERNAL: 500,
}

_JSON_SEPARATORS = (",", ":")


def datatype_name(dtype: np.dtype) -> str:
    """The protocol's name of a numpy dtype (``uint8`` -> ``UINT8``); ``ValueError`` if it has none."""
    name = _DATATYPE_OF.get(np.dtype(dtype).newbyteorder("="))
    if name is None:
        raise ValueError(f"numpy dtype {np.dtype(dtype).name} has no Open Inference Protocol datatype")
    return name


# --- errors -------------------------------------------------------------------------------------

def error_status(error: InferenceError) -> int:
    return HTTP_STATUS.get(error.code, 500)


def error_message(error: InferenceError) -> str:
    """``code: message``; a refusal by admission control says so, with the scheduler's reason."""
    if error.code == REJECTED:
        return f"{REJECTED}: refused by admission control: {error.message}"
    return f"{error.code}: {error.message}"


def error_body(error: InferenceError) -> bytes:
    """The protocol's error object, ``{"error": "<code>: <message>"}``."""
    return json.dumps({"error": error_message(error)}, separators=_JSON_SEPARATORS).encode()


# --- metadata -----------------------------------------------------------------------------------

def _shape(spec: TensorSpec) -> list[int]:
    return [-1 if d is None else int(d) for d in spec.shape]


def server_metadata(version: str, extensions: Sequence[str]) -> dict:
    return {"name": "edge-agent", "version": version, "extensions": list(extensions)}


def model_metadata(name: str, backend: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> dict:
    """``GET /v2/models/{name}``: tensors with protocol datatypes and -1 for the batch dimension."""
    return {
        "name": name,
        "versions": [MODEL_VERSION],
        "platform": PLATFORMS.get(backend, backend),
        "inputs": [{"name": s.name, "datatype": datatype_name(s.dtype), "shape": _shape(s)} for s in inputs],
        "outputs": [{"name": s.name, "datatype": datatype_name(s.dtype), "shape": _shape(s)} for s in outputs],
    }


def model_config(name: str, backend: str, max_batch: int, inputs: Sequence[TensorSpec],
                 outputs: Sequence[TensorSpec]) -> dict:
    """``GET /v2/models/{name}/config`` (Triton's model configuration extension), in Triton's JSON form:
    ``max_batch_size`` is the batching rule's largest batch, ``dims`` the item shape."""
    def tensors(specs):
        return [{"name": s.name, "data_type": f"TYPE_{datatype_name(s.dtype)}", "dims": list(s.item_shape())}
                for s in specs]
    return {"name": name, "platform": PLATFORMS.get(backend, backend), "backend": backend,
            "max_batch_size": int(max_batch), "input": tensors(inputs), "output": tensors(outputs)}


# --- requests -----------------------------------------------------------------------------------

@dataclass(slots=True)
class InferRequest:
    """A decoded, validated inference request: what the intake hands to ``Agent.submit``.

    ``inputs`` are shaped ``(rows, *item_shape)`` in the model's dtypes; a request of ``rows`` > 1 is
    submitted row by row (each row ``inputs[name][i:i+1]``, a view). ``outputs`` lists the outputs to
    return, in reply order, each with whether its data goes binary (after the JSON) or in the JSON.
    """

    model: str
    id: str | None
    inputs: dict[str, np.ndarray]
    rows: int
    slo_ms: float | None
    priority: int
    outputs: list[tuple[str, bool]]
    min_accuracy: float | None = None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: How many request layouts a :class:`LayoutCache` keeps before it starts over.
LAYOUT_CACHE_SIZE = 256


class LayoutCache(dict):
    """Validated layouts of all-binary requests, keyed by (JSON header bytes, body size).

    A client sends the same JSON header for every request of a model (only the tensor bytes after it
    change), and checking that header is most of the cost of parsing: a hit skips the JSON and the
    checks and only slices the body. Bounded: when full it is cleared, so a client that sends a new
    ``id`` with every request costs one insert each, nothing more.
    """

    def remember(self, key: tuple[bytes, int], layout: tuple) -> None:
        if len(self) >= LAYOUT_CACHE_SIZE:
            self.clear()
        self[key] = layout


def parse_infer_request(model: str, body: bytes, header_length: int | None,
                        input_specs: Sequence[TensorSpec], output_specs: Sequence[TensorSpec],
                        cache: LayoutCache | None = None) -> InferRequest:
    """A ``POST /v2/models/{model}/infer`` body to an :class:`InferRequest`, checked against the model's
    tensors (from its card). ``header_length`` is the ``Inference-Header-Content-Length`` header (``None``
    when absent: the whole body is JSON). Raises :class:`InferenceError` naming the first thing wrong.
    ``cache`` (one per model): remembers the layout of requests whose inputs are all binary."""
    size = len(body)
    if header_length is None:
        header_length = size
    elif not 0 < header_length <= size:
        raise InferenceError(BAD_REQUEST, f"Inference-Header-Content-Length = {header_length}: expected 1..{size} "
                                          f"(the body has {size} bytes)")
    header = body if header_length == size else body[:header_length]
    if cache is not None:
        layout = cache.get((header, size))
        if layout is not None:
            request_id, slo_ms, priority, min_accuracy, outputs, rows, tensors = layout
            inputs = {name: np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape(shape)
                      for name, dtype, count, offset, shape in tensors}
            return InferRequest(model, request_id, inputs, rows, slo_ms, priority, outputs, min_accuracy)
    try:
        message = json.loads(header)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InferenceError(BAD_REQUEST, f"the request's JSON does not parse ({exc})") from None
    except RecursionError:
        # Python's parser recurses once per nested array or object: a body of 5,000 "[" would
        # otherwise be an internal error (500), though the client sent it and can fix it.
        raise InferenceError(BAD_REQUEST, f"the request's JSON nests arrays or objects deeper than this server "
                                          f"parses (about {sys.getrecursionlimit()} levels)") from None
    if not isinstance(message, dict):
        raise InferenceError(BAD_REQUEST, f"the request must be a JSON object, got {type(message).__name__}")

    request_id = message.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InferenceError(BAD_REQUEST, f"id = {request_id!r}: expected a string", "id")
    parameters = message.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InferenceError(BAD_REQUEST, f"parameters = {parameters!r}: expected an object", "parameters")
    slo_ms, priority, binary_default = _request_parameters(parameters)
    min_accuracy = parameters.get("min_accuracy")
    if min_accuracy is not None and not (_number(min_accuracy) and 0 <= min_accuracy <= 1):
        raise InferenceError(BAD_REQUEST, f"parameters.min_accuracy = {min_accuracy!r}: expected a number in 0..1",
                             "parameters.min_accuracy")
    if min_accuracy is not None:
        min_accuracy = float(min_accuracy)

    inputs, rows, offset, layout = _inputs(model, message.get("inputs"), body, header_length, input_specs)
    if offset != size:
        raise InferenceError(BAD_REQUEST, f"the body has {size - header_length} bytes after the JSON header; "
                                          f"the inputs' binary_data_size add up to {offset - header_length}")
    outputs = _outputs(model, message.get("outputs"), output_specs, binary_default)
    if cache is not None and layout is not None:
        cache.remember((header, size), (request_id, slo_ms, priority, min_accuracy, outputs, rows, layout))
    return InferRequest(model, request_id, inputs, rows, slo_ms, priority, outputs, min_accuracy)


def _request_parameters(parameters: dict) -> tuple[float | None, int, bool]:
    slo_ms = parameters.get("slo_ms")
    if slo_ms is not None:
        if not (_number(slo_ms) and slo_ms > 0):
            raise InferenceError(BAD_REQUEST, f"parameters.slo_ms = {slo_ms!r}: expected a number > 0 (milliseconds)",
                                 "parameters.slo_ms")
        slo_ms = float(slo_ms)
    else:
        timeout_us = parameters.get("timeout")
        if timeout_us is not None:
            if not (_number(timeout_us) and timeout_us >= 0):
                raise InferenceError(BAD_REQUEST, f"parameters.timeout = {timeout_us!r}: expected microseconds "
                                                  f"(a number >= 0; 0 = none)", "parameters.timeout")
            slo_ms = timeout_us / 1000.0 if timeout_us > 0 else None
    priority = parameters.get("priority", 0)
    if not _is_int(priority) or not -1000 <= priority <= 1000:
        raise InferenceError(BAD_REQUEST, f"parameters.priority = {priority!r}: expected an integer in -1000..1000",
                             "parameters.priority")
    sequence_id = parameters.get("sequence_id")
    if sequence_id not in (None, 0, ""):
        raise InferenceError(BAD_REQUEST, f"parameters.sequence_id = {sequence_id!r}: sequence batching is not "
                                          f"supported by edge-agent (each request is independent)",
                             "parameters.sequence_id")
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InferenceError(BAD_REQUEST, f"parameters.binary_data_output = {binary_default!r}: expected true or false",
                             "parameters.binary_data_output")
    return slo_ms, priority, binary_default


def _shared_memory(parameters: dict, field: str) -> None:
    if "shared_memory_region" in parameters:
        raise InferenceError(BAD_REQUEST, f"{field}.parameters.shared_memory_region: the shared memory extensions are "
                                          f"not supported by edge-agent; send the data in the body",
                             f"{field}.parameters.shared_memory_region")


def _inputs(model: str, tensors: Any, body: bytes, offset: int,
            specs: Sequence[TensorSpec]) -> tuple[dict[str, np.ndarray], int, int, tuple | None]:
    """Each input checked against its spec and decoded; returns (arrays, rows, end of the binary data,
    layout): the layout, for a :class:`LayoutCache`, is where each input lies in the body, ``None``
    when some input came as JSON ``data`` (part of the header, so nothing worth remembering)."""
    if not isinstance(tensors, list) or not tensors:
        raise InferenceError(BAD_REQUEST, "inputs must be a non-empty list of tensors", "inputs")
    by_name = {s.name: s for s in specs}
    arrays: dict[str, np.ndarray] = {}
    layout: list | None = []
    rows: int | None = None
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, dict):
            raise InferenceError(BAD_REQUEST, f"inputs[{index}] must be an object with name, shape, datatype",
                                 f"inputs[{index}]")
        name = tensor.get("name")
        if not isinstance(name, str):
            raise InferenceError(BAD_REQUEST, f"inputs[{index}].name = {name!r}: expected a string",
                                 f"inputs[{index}].name")
        field = f"inputs.{name}"
        spec = by_name.get(name)
        if spec is None:
            raise InferenceError(INVALID_INPUT, f"model {model!r} has no input {name!r}; its inputs are "
                                                f"{list(by_name)}", field)
        if name in arrays:
            raise InferenceError(BAD_REQUEST, f"input {name!r} is given twice", field)
        parameters = tensor.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InferenceError(BAD_REQUEST, f"{field}.parameters: expected an object", f"{field}.parameters")
        _shared_memory(parameters, field)

        want = datatype_name(spec.dtype)
        datatype = tensor.get("datatype")
        if datatype != want:
            hint = " (not supported by edge-agent)" if datatype in UNSUPPORTED_DATATYPES else ""
            raise InferenceError(INVALID_INPUT, f"{field}.datatype: expected {want}, got {datatype!r}{hint} "
                                                f"(model {model!r})", f"{field}.datatype")
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise InferenceError(INVALID_INPUT, f"{field}.shape = {shape!r}: expected a list of non-negative integers",
                                 f"{field}.shape")
        item = spec.item_shape()
        if tuple(shape) == item:
            shape = [1, *item]           # one item without its batch dimension, as the MQTT wire allows
        elif len(shape) != len(item) + 1 or tuple(shape[1:]) != item or shape[0] < 1:
            raise InferenceError(INVALID_INPUT, f"{field}.shape: expected {_shape(spec)} (N >= 1 items of "
                                                f"{list(item)}), got {shape} (model {model!r})", f"{field}.shape")
        if rows is None:
            rows = shape[0]
        elif shape[0] != rows:
            raise InferenceError(INVALID_INPUT, f"{field}.shape = {shape}: {shape[0]} items, the other inputs "
                                                f"have {rows}", f"{field}.shape")
        dtype = spec.dtype
        count = math.prod(shape)
        binary_size = parameters.get("binary_data_size")
        if binary_size is not None:
            if "data" in tensor:
                raise InferenceError(BAD_REQUEST, f"{field} has both data and parameters.binary_data_size",
                                     f"{field}.data")
            if not _is_int(binary_size) or binary_size < 0:
                raise InferenceError(BAD_REQUEST, f"{field}.parameters.binary_data_size = {binary_size!r}: "
                                                  f"expected a byte count", f"{field}.parameters.binary_data_size")
            needed = count * dtype.itemsize
            if binary_size != needed:
                raise InferenceError(INVALID_INPUT, f"{field}.parameters.binary_data_size = {binary_size}: shape "
                                                    f"{shape} of {want} needs {needed} bytes",
                                     f"{field}.parameters.binary_data_size")
            if offset + binary_size > len(body):
                raise InferenceError(BAD_REQUEST, f"{field}: binary data runs past the end of the body "
                                                  f"({len(body) - offset} bytes left, {binary_size} declared)",
                                     f"{field}.parameters.binary_data_size")
            array = np.frombuffer(body, dtype=dtype.newbyteorder("<"), count=count, offset=offset)
            if layout is not None:
                layout.append((name, array.dtype, count, offset, tuple(shape)))
            offset += binary_size
        elif "data" in tensor:
            array = _from_json(tensor["data"], dtype, want, count, field)
            layout = None
        else:
            raise InferenceError(INVALID_INPUT, f"{field} has no data (give data, or parameters.binary_data_size "
                                                f"and the bytes after the JSON)", f"{field}.data")
        arrays[name] = array.reshape(shape)
    for spec in specs:
        if spec.name not in arrays:
            raise InferenceError(INVALID_INPUT, f"missing input {spec.name!r} of model {model!r}",
                                 f"inputs.{spec.name}")
    return arrays, rows or 1, offset, None if layout is None else tuple(layout)


_JSON_KINDS = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}   # target kind -> accepted kinds of JSON values
_KIND_WORDS = {"b": "true/false", "u": "integers", "i": "integers", "f": "numbers"}


def _from_json(data: Any, dtype: np.dtype, datatype: str, count: int, field: str) -> np.ndarray:
    """JSON ``data`` (flat or nested lists, row-major) to an array of ``dtype``; values must fit the
    datatype (a float for an integer tensor, or 300 for UINT8, is an error, not a silent cast)."""
    if not isinstance(data, list):
        raise InferenceError(INVALID_INPUT, f"{field}.data: expected a list of {_KIND_WORDS[dtype.kind]}",
                             f"{field}.data")
    try:
        values = np.asarray(data)
    except (ValueError, TypeError) as exc:    # ragged nesting
        raise InferenceError(INVALID_INPUT, f"{field}.data: not a regular (flat or nested) list ({exc})",
                             f"{field}.data") from None
    if values.size and values.dtype.kind not in _JSON_KINDS[dtype.kind]:
        raise InferenceError(INVALID_INPUT, f"{field}.data: {datatype} takes {_KIND_WORDS[dtype.kind]}, got "
                                            f"{values.dtype.name} values", f"{field}.data")
    if values.size != count:
        raise InferenceError(INVALID_INPUT, f"{field}.data has {values.size} values; its shape needs {count}",
                             f"{field}.data")
    if values.size and dtype.kind in "iu":
        info = np.iinfo(dtype)
        low, high = values.min(), values.max()
        if low < info.min or high > info.max:
            raise InferenceError(INVALID_INPUT, f"{field}.data: values from {low} to {high} do not fit {datatype} "
                                                f"({info.min}..{info.max})", f"{field}.data")
    return values.astype(dtype, copy=False).reshape(-1)


def _outputs(model: str, requested: Any, specs: Sequence[TensorSpec], binary_default: bool) -> list[tuple[str, bool]]:
    if requested is None or requested == []:
        return [(s.name, binary_default) for s in specs]
    if not isinstance(requested, list):
        raise InferenceError(BAD_REQUEST, "outputs must be a list of {name, parameters?}", "outputs")
    known = [s.name for s in specs]
    out: list[tuple[str, bool]] = []
    for index, tensor in enumerate(requested):
        name = tensor.get("name") if isinstance(tensor, dict) else None
        if not isinstance(name, str):
            raise InferenceError(BAD_REQUEST, f"outputs[{index}] must be an object with a name", f"outputs[{index}]")
        field = f"outputs.{name}"
        if name not in known:
            raise InferenceError(INVALID_INPUT, f"model {model!r} has no output {name!r}; its outputs are {known}", field)
        if any(name == seen for seen, _ in out):
            raise InferenceError(BAD_REQUEST, f"output {name!r} is requested twice", field)
        parameters = tensor.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InferenceError(BAD_REQUEST, f"{field}.parameters: expected an object", f"{field}.parameters")
        _shared_memory(parameters, field)
        if parameters.get("classification"):
            raise InferenceError(BAD_REQUEST, f"{field}.parameters.classification: the classification extension is "
                                              f"not supported by edge-agent; request the raw output",
                                 f"{field}.parameters.classification")
        binary = parameters.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise InferenceError(BAD_REQUEST, f"{field}.parameters.binary_data = {binary!r}: expected true or false",
                                 f"{field}.parameters.binary_data")
        out.append((name, binary))
    return out


# --- responses ----------------------------------------------------------------------------------

def infer_response(request: InferRequest, outputs: Mapping[str, np.ndarray],
                   parameters: dict | None = None) -> tuple[list[bytes], int | None]:
    """The response body for a served request: ``(chunks, header_length)``.

    ``chunks`` are the JSON header, then the binary outputs' bytes in output order (concatenate them
    for the body); ``header_length`` is the JSON's size for the ``Inference-Header-Content-Length``
    header, ``None`` when no output went binary (the body is all JSON). ``parameters`` (the agent's
    timing) go in the response's ``parameters``.
    """
    arrays = [(name, binary, outputs[name]) for name, binary in request.outputs]
    if all(binary for _, binary, _ in arrays):
        # The common case (what tritonclient and the bench ask for): every output binary. The JSON
        # up to the outputs is the same for every reply of a shape, so it is encoded once.
        key = (request.model, tuple((name, a.dtype, a.shape) for name, _, a in arrays))
        prefix = _BINARY_PREFIXES.get(key)
        if prefix is None:
            if len(_BINARY_PREFIXES) >= LAYOUT_CACHE_SIZE:
                _BINARY_PREFIXES.clear()
            prefix = _BINARY_PREFIXES[key] = json.dumps(
                {"model_name": request.model, "model_version": MODEL_VERSION,
                 "outputs": [{"name": name, "datatype": datatype_name(a.dtype), "shape": list(a.shape),
                              "parameters": {"binary_data_size": a.nbytes}} for name, _, a in arrays]},
                separators=_JSON_SEPARATORS).encode()[1:-1]
        head = [b"{"]
        if request.id is not None:
            head.append(b'"id":%s,' % json.dumps(request.id).encode())
        head.append(prefix)
        if parameters:
            head.append(b',"parameters":%s' % _parameters_json(parameters))
        head.append(b"}")
        header = b"".join(head)
        return [header, *(_little_endian_bytes(a) for _, _, a in arrays)], len(header)
    described = []
    binary_chunks: list[bytes] = []
    for name, binary, array in arrays:
        datatype = datatype_name(array.dtype)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            data = _little_endian_bytes(array)
            entry["parameters"] = {"binary_data_size": len(data)}
            binary_chunks.append(data)
        else:
            entry["data"] = array.ravel().tolist()
        described.append(entry)
    response: dict[str, Any] = {}
    if request.id is not None:
        response["id"] = request.id
    response["model_name"] = request.model
    response["model_version"] = MODEL_VERSION
    response["outputs"] = described
    if parameters:
        response["parameters"] = parameters
    header = json.dumps(response, separators=_JSON_SEPARATORS).encode()
    if not binary_chunks:
        return [header], None
    return [header, *binary_chunks], len(header)


# Encoded JSON of all-binary replies up to their outputs, per (model, outputs' names, dtypes, shapes):
# a handful of entries (a model's outputs have one shape per batch size a client sends), bounded anyway.
_BINARY_PREFIXES: dict[tuple, bytes] = {}


def _parameters_json(parameters: dict) -> bytes:
    """``parameters`` as compact JSON. Every reply carries the agent's timing (a flat map of numbers)
    and the board's name, and ``json.dumps`` is most of the cost of encoding a reply: numbers and
    plain ASCII strings are written directly (``repr`` of a finite float is valid JSON), anything
    else goes through ``json``."""
    parts = []
    for key, value in parameters.items():
        kind = type(value)
        if type(key) is not str or not key.isidentifier():
            return json.dumps(parameters, separators=_JSON_SEPARATORS).encode()
        if kind is float and math.isfinite(value):
            parts.append('"%s":%r' % (key, value))
        elif kind is int:
            parts.append('"%s":%d' % (key, value))
        elif kind is str and value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
            parts.append('"%s":"%s"' % (key, value))     # a device name: nothing to escape
        else:
            return json.dumps(parameters, separators=_JSON_SEPARATORS).encode()
    return ("{%s}" % ",".join(parts)).encode()


def _little_endian_bytes(array: np.ndarray) -> bytes:
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array).tobytes()
