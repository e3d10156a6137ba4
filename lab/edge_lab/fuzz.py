"""Hostile and valid requests for both intakes, and the drivers that send them and check each answer.

Issue 21: no single message may take an intake down, and every request that can be answered is
answered exactly once. The generators here make one request each from a ``random.Random``: the
test suite draws their seeds from hypothesis (``st.integers``), so a failure shrinks to one seed
that replays the same request, and ``edge-agent bench fuzz`` draws thousands from one seeded
``Random``. Each case carries what it may be answered with (``expect``), derived from how it was
made, so a check is more than "something came back": a valid request gets a result (or a refusal
under load), a bad one the error its mutation calls for, and never ``internal``.

MQTT cases are msgpack payloads (wire format v1, DESIGN.md) with MQTT v5 properties; HTTP cases are
the raw bytes of one connection (the Open Inference Protocol, one request or several pipelined),
since a client library would not send most of them.
"""
from __future__ import annotations

import gzip
import json
import random
import socket
import string
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field

import msgpack
import numpy as np

MODELS = ("mobilenet_digits", "resnet_digits")      # the demo config's models
INPUT = "frames"
ITEM_SHAPE = (64, 64, 3)
ITEM_BYTES = 64 * 64 * 3
#: The fuzzed agent's payload limit: a frame as JSON (up to ~60 kB nested) and a few binary rows fit,
#: and oversize cases stay cheap to send.
MAX_PAYLOAD = 256 * 1024
#: What a valid request may be answered with: served, refused at the door, or expired under load.
VALID = frozenset({"ok", "rejected", "deadline_missed"})
#: Every code a request may get that is not an answer for bad input (used where a mutation's exact
#: code cannot be told in advance, random garbage that happens to decode, say).
ANY_BAD = frozenset({"bad_request", "invalid_input", "unknown_model", "too_large"})


# --- shared pieces ------------------------------------------------------------------------------

def _frame(rng: random.Random) -> bytes:
    return rng.randbytes(ITEM_BYTES)


def _request_id(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.7:
        return f"fz-{rng.getrandbits(40):x}"
    if kind < 0.85:
        return "".join(rng.choice("αβγ🙂\u200b\\\"'{}/ \t") for _ in range(rng.randint(1, 12)))
    return "x" * rng.randint(100, 3000)


def _junk_text(rng: random.Random, n: int) -> str:
    alphabet = string.ascii_letters + string.digits + string.punctuation + " \t\n\x00é中🙂"
    return "".join(rng.choice(alphabet) for _ in range(n))


def _mqtt_text(text: str) -> str:
    """``text`` as an MQTT UTF-8 string may hold it: Mosquitto drops a client that sends a null or a
    control character in a topic or a property (MQTT v5, 1.5.4), so the fuzzer would lose its own
    connection; the agent never sees those."""
    return "".join(c for c in text if c >= " " and not "\x7f" <= c <= "\x9f")


def _weighted(rng: random.Random, table: dict) -> str:
    return rng.choices(list(table), weights=list(table.values()))[0]


# --- MQTT ---------------------------------------------------------------------------------------

@dataclass
class MqttCase:
    """One MQTT request. ``response`` is how its response topic is made (the driver gives each case
    a topic of its own): ``valid`` (``suffix`` appended), ``plus`` / ``hash`` (a wildcard: it cannot
    be answered, only counted) or ``missing``. ``correlation`` ``None`` = no correlation data."""

    kind: str
    model: str
    payload: bytes
    expect: frozenset[str]
    echo_id: str | None              # the id the reply must carry (None: the request's id was unreadable)
    response: str = "valid"
    suffix: str = ""
    correlation: bytes | None = b""
    user_properties: list[tuple[str, str]] = field(default_factory=list)
    content_type: str | None = None

    @property
    def answerable(self) -> bool:
        return self.response == "valid"


def _tensor(rng: random.Random) -> dict:
    shape = list(ITEM_SHAPE) if rng.random() < 0.6 else [1, *ITEM_SHAPE]
    tensor = {"dtype": "uint8", "shape": shape, "data": _frame(rng)}
    if rng.random() < 0.1:
        tensor["codec"] = rng.choice(["raw", "", None])
    return tensor


def _valid_message(rng: random.Random, request_id: str) -> dict:
    message: dict = {"id": request_id, "inputs": {INPUT: _tensor(rng)}}
    timing = rng.random()
    if timing < 0.6:
        message["slo_ms"] = rng.choice([rng.uniform(50, 5000), rng.randint(100, 10000)])
    elif timing < 0.8:
        message["deadline"] = time.time() + rng.uniform(1, 30)
    if rng.random() < 0.3:
        message["priority"] = rng.randint(-1000, 1000)
    if rng.random() < 0.2:
        message["min_accuracy"] = rng.choice([0, 1, 0.5, rng.random()])
    return message


def _pack(message) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


# The wrong values of each request field, with the code each must be answered with.
_BAD_FIELDS: dict[str, tuple[list, str]] = {
    "id": ([None, "", 7, 1.5, True, [], {}, b"bytes-id", ["a"]], "bad_request"),
    "inputs": ([None, [], {}, "frames", 3, [{"dtype": "uint8"}], {1: {"dtype": "uint8"}}], "bad_request"),
    "slo_ms": ([0, -1, -0.0, "10", True, float("nan"), float("inf"), float("-inf"), [], {}, b"1"], "bad_request"),
    "deadline": ([0, -5, "soon", False, float("nan"), float("inf"), [1]], "bad_request"),
    "priority": ([None, 1.5, "high", True, 1001, -1001, 2 ** 63, -(2 ** 63), [1]], "bad_request"),
    "min_accuracy": ([-0.1, 1.5, "0.9", True, float("nan"), [0.5]], "bad_request"),
}
# Wrong values of a tensor's fields; each is invalid_input.
_BAD_TENSOR_FIELDS: dict[str, list] = {
    "dtype": [None, 8, 1.0, b"uint8", ["uint8"], {"a": 1}, True],
    "shape": [None, "64,64,3", 64, [64.0, 64, 3], [True, 64, 3], [-64, -64, 3], [64, 64, "3"], [None],
              {"0": 64}, [[64], 64, 3], [1] * 9 + [64, 64, 3]],
    "data": [None, "x" * ITEM_BYTES, list(range(10)), 12288, {"b": b""}, True],
    "codec": ["zstd", "gzip", 1, ["raw"], b"raw"],
}
_NUMERIC_DTYPES = ["int8", "uint16", "int16", "float16", "float32", "float64", "int32", "uint32", "int64",
                   "uint64", "bool", ">u2", "<f4", "i1", "f2", "b"]
_ODD_DTYPES = ["", "uint8[", "(", ")", "O", "object", "U10", "S5", "V8", "M8", "m8[ns]", "c8", "complex64",
               "(2,)u1", "(64,64,3)u1", "u1,u1", "[('a','u1')]", "uint8 ", " uint8", "UINT8", "uint9", "float128x",
               "i" * 1000, "\x00", "🙂", "a" * 300, "<" * 50, "f8,f8,f8", "u1" * 5,
               "'", "\"", "{'names':['a'],'formats':['u1']}", "()u1", "(0,)u1", "(1000000000,1000000000)u1"]


def _not_uint8_dtype(text: str) -> bool:
    try:
        return np.dtype(text) != np.uint8
    except Exception:
        return True


def mqtt_case(rng: random.Random, max_payload: int) -> MqttCase:
    """One MQTT request, valid or hostile, for an agent serving the demo models with payloads up to
    ``max_payload`` bytes."""
    model = rng.choice(MODELS)
    request_id = _request_id(rng)
    message = _valid_message(rng, request_id)
    tensor = message["inputs"][INPUT]
    kind = _weighted(rng, {
        "valid": 20, "extra_fields": 5, "extreme_values": 5, "past_deadline": 2, "wrong_dtype": 5,
        "odd_dtype": 6, "wrong_shape": 5, "huge_shape": 5, "data_length": 5, "tensor_field": 6,
        "field_type": 10, "missing_field": 3, "truncated": 5, "garbage": 5, "not_a_map": 3, "nested": 3,
        "bomb": 3, "bad_utf8": 2, "ext_type": 2, "oversize": 2, "unknown_model": 4,
    })
    expect, payload = VALID, None
    if kind == "extra_fields":
        for _ in range(rng.randint(1, 5)):
            message[_junk_text(rng, rng.randint(1, 20))] = rng.choice([None, 1, "x", [1, 2], {"a": b"b"}, 2.5])
        tensor[rng.choice(["scale", "layout", "zero_point"])] = rng.choice([1, "NHWC", None])
    elif kind == "extreme_values":   # valid, at the edge of what each field allows
        message.pop("deadline", None)
        choice = rng.randrange(4)
        if choice == 0:
            message["slo_ms"] = rng.choice([1e308, 1e18, 2 ** 63 - 1, 2 ** 64 - 1, 5e-324, 1e-9])
        elif choice == 1:
            message.pop("slo_ms", None)
            message["deadline"] = rng.choice([1e308, 1e18, 2 ** 64 - 1, 4102444800.0])
        elif choice == 2:
            message["priority"] = rng.choice([-1000, 1000, 0])
        else:
            message["min_accuracy"] = rng.choice([0, 1, 0.0, 1.0, 5e-324])
    elif kind == "past_deadline":
        message.pop("slo_ms", None)
        message["deadline"] = rng.choice([time.time() - rng.uniform(0, 1e6), 1e-300, 1, 0.5])
        expect = frozenset({"rejected", "deadline_missed"})
    elif kind == "wrong_dtype":
        dtype = np.dtype(rng.choice(_NUMERIC_DTYPES))
        items = int(np.prod(tensor["shape"]))
        tensor.update(dtype=dtype.str if rng.random() < 0.5 else dtype.name,
                      data=rng.randbytes(items * dtype.itemsize))
        expect = frozenset({"invalid_input"})
    elif kind == "odd_dtype":
        text = rng.choice(_ODD_DTYPES + [_junk_text(rng, rng.randint(1, 30))])
        tensor["dtype"] = text if _not_uint8_dtype(text) else "uint8["
        expect = frozenset({"invalid_input"})
    elif kind == "wrong_shape":
        shape = rng.choice([[], [1], [64, 64], [64, 3, 64], [3, 64, 64], [2, 64, 64, 3], [1, 1, 64, 64, 3],
                            [0, 64, 64, 3], [0], [64, 64, 3, 1], [4096, 3], [12288]])
        tensor.update(shape=shape, data=rng.randbytes(int(np.prod(shape))) if int(np.prod(shape)) <= 2 * ITEM_BYTES
                      else b"")
        expect = frozenset({"invalid_input"})
    elif kind == "huge_shape":
        big = rng.choice([10 ** 9, 2 ** 31, 2 ** 32, 2 ** 62, 2 ** 63 - 1, 2 ** 64 - 1])
        shape = rng.choice([[big, big, 3], [big] * rng.randint(1, 8), [1, big, 64, 3], [big, 0], [0, big, big]])
        tensor.update(shape=shape, data=rng.choice([b"", tensor["data"], b"\0" * rng.randint(1, 100)]))
        expect = frozenset({"invalid_input"})
    elif kind == "data_length":
        delta = rng.choice([-ITEM_BYTES, -1, 1, rng.randint(2, 1000), -rng.randint(2, ITEM_BYTES - 1)])
        tensor["data"] = tensor["data"][:ITEM_BYTES + delta] if delta < 0 else tensor["data"] + b"\0" * delta
        expect = frozenset({"invalid_input"})
    elif kind == "tensor_field":
        name = rng.choice(list(_BAD_TENSOR_FIELDS))
        if rng.random() < 0.2:
            del tensor[name if name != "codec" else "data"]
        else:
            tensor[name] = rng.choice(_BAD_TENSOR_FIELDS[name])
        if rng.random() < 0.2:   # the whole tensor of the wrong type, or a second, unknown input
            message["inputs"] = rng.choice([{INPUT: rng.choice([None, 1, "t", [tensor], b"x"])},
                                            {INPUT: tensor, "extra_input": _tensor(rng)}, {"image": tensor}])
        expect = frozenset({"invalid_input"})
    elif kind == "field_type":
        name = rng.choice(list(_BAD_FIELDS))
        values, code = _BAD_FIELDS[name]
        if name == "deadline":
            message.pop("slo_ms", None)
        if name == "slo_ms":
            message.pop("deadline", None)
        message[name] = rng.choice(values)
        expect = frozenset({code})
        if name == "inputs" and isinstance(message[name], list) and message[name]:
            expect = frozenset({"bad_request"})
    elif kind == "missing_field":
        name = rng.choice(["id", "inputs", "both_timings"])
        if name == "both_timings":
            message["slo_ms"], message["deadline"] = 100, time.time() + 10
        else:
            del message[name]
        expect = frozenset({"bad_request"})
    elif kind == "truncated":
        whole = _pack(message)
        payload = whole[:rng.randrange(len(whole))]
        expect = frozenset({"bad_request"})
    elif kind == "garbage":
        payload = rng.randbytes(rng.randint(0, 300))
        expect = _garbage_expectation(payload)
    elif kind == "not_a_map":
        payload = _pack(rng.choice([None, 1, -1, 2.5, "text", b"bytes", [1, 2], [message], True, []]))
        expect = frozenset({"bad_request"})
    elif kind == "nested":
        depth = rng.choice([10, 100, 500, 1000, 5000, 100000])
        nest = b"\x91" * depth + b"\xc0" if rng.random() < 0.5 else b"\x81\xa1a" * depth + b"\xc0"
        where = rng.choice(["id", "inputs", "slo_ms", "top"])
        if where == "top":
            payload = nest
            expect = frozenset({"bad_request"})
        else:
            rest = {k: v for k, v in message.items() if k != where}
            payload = _map_header(len(rest) + 1) + b"".join(
                _pack(k) + _pack(v) for k, v in rest.items()) + _pack(where) + nest
            # nested maps as the inputs are a tensor named "a" without dtype, shape, data
            expect = frozenset({"bad_request", "invalid_input"} if where == "inputs" else {"bad_request"})
    elif kind == "bomb":
        payload = rng.choice([b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff",
                              b"\xdb\xff\xff\xff\xffabc", b"\x81\xa6inputs\xdf\x7f\xff\xff\xff",
                              b"\x82\xa2id\xa1x\xa6inputs\x81\xa6frames\x83\xa5dtype\xa5uint8\xa5shape\x93\x40\x40\x03"
                              b"\xa4data\xc6\x7f\xff\xff\xff"])
        expect = frozenset({"bad_request"})
    elif kind == "bad_utf8":
        bad = b"\xa3\xff\xfe\xfd"
        payload = rng.choice([_map_header(1) + bad + b"\x01", _map_header(2) + _pack("id") + bad + _pack("inputs") + b"\x80"])
        expect = frozenset({"bad_request"})
    elif kind == "ext_type":   # an application type (1), a timestamp (-1), a timestamp of an invalid length
        ext = rng.choice([b"\xd5\x01ab", b"\xd6\xff\x00\x00\x00\x01", b"\xd4\xff\x00", b"\xc7\x03\xff\x00\x00\x00"])
        where = rng.choice(["id", "slo_ms", "inputs", "top"])
        if where == "top":
            payload = ext
        else:
            rest = {k: v for k, v in message.items() if k != where}
            payload = _map_header(len(rest) + 1) + b"".join(_pack(k) + _pack(v) for k, v in rest.items()) + \
                _pack(where) + ext
        expect = frozenset({"bad_request"})
    elif kind == "oversize":
        message["padding"] = b"\0" * (max_payload + rng.randint(1, 1000))
        expect = frozenset({"too_large"})
    elif kind == "unknown_model":
        model = rng.choice(["", "MOBILENET_DIGITS", "mobilenet_digits ", "resnet", "ümlaut", "a" * 300,
                            _mqtt_text(_junk_text(rng, rng.randint(1, 20))).replace("/", "").replace("+", "")
                            .replace("#", "") or "zz"])
        if model in MODELS:
            model = "nope"
        expect = frozenset({"unknown_model"})
    if payload is None:
        payload = _pack(message)
    if len(payload) > max_payload:
        expect = frozenset({"too_large"})
    case = MqttCase(kind=kind, model=model, payload=payload, expect=expect, echo_id=_readable_id(payload, max_payload))
    _mqtt_properties(rng, case)
    return case


def _map_header(n: int) -> bytes:
    return bytes([0x80 | n]) if n < 16 else b"\xde" + n.to_bytes(2, "big")


def _readable_id(payload: bytes, max_payload: int) -> str | None:
    """The id a reply must echo: the request's, wherever the payload is a readable map (msgpack's
    defaults) with a string id; none where the payload is too large to read or unreadable."""
    if len(payload) > max_payload:
        return None
    try:
        message = msgpack.unpackb(payload, raw=False)
    except Exception:
        return None
    request_id = message.get("id") if isinstance(message, dict) else None
    return request_id if isinstance(request_id, str) else None


def _garbage_expectation(payload: bytes) -> frozenset[str]:
    try:
        message = msgpack.unpackb(payload, raw=False)
    except Exception:
        return frozenset({"bad_request"})
    return ANY_BAD if isinstance(message, dict) else frozenset({"bad_request"})


def _mqtt_properties(rng: random.Random, case: MqttCase) -> None:
    case.response = _weighted(rng, {"valid": 84, "missing": 6, "plus": 5, "hash": 5})
    if rng.random() < 0.15:
        case.suffix = rng.choice(["/deeper/levels", "/ü/🙂", "/" + "L" * rng.randint(100, 2000), "/ /sp ace", "//"])
    case.correlation = rng.choices(
        [None, b"", rng.randbytes(rng.randint(1, 16)), rng.randbytes(rng.randint(17, 256)),
         rng.randbytes(rng.randint(1000, 16000))], weights=[10, 8, 60, 12, 10])[0]
    if rng.random() < 0.2:
        case.user_properties = [(_mqtt_text(_junk_text(rng, 5)), _mqtt_text(_junk_text(rng, 20)))
                                for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.1:
        case.content_type = rng.choice(["application/msgpack", "text/plain", "", "é" * 50])


# --- HTTP ---------------------------------------------------------------------------------------

#: What a valid inference request over HTTP may be answered with: 200, or a refusal / expiry under load.
HTTP_VALID = frozenset({200, 429, 504})


@dataclass
class HttpExpect:
    """What one request on a connection may be answered with, and whether the server closes after it."""

    method: str
    statuses: frozenset[int]
    closes: bool = False


@dataclass
class HttpCase:
    """The bytes of one connection. ``requests`` lists the answers expected, in order; ``complete``
    False: the bytes end inside a request, so the server rightly waits for more and the client gives
    up (no answer expected, only that the server lives on)."""

    kind: str
    data: bytes
    requests: list[HttpExpect]
    complete: bool = True


def _infer_json(rng: random.Random, request_id: str | None, rows: int = 1, binary: bool = True) -> tuple[dict, bytes]:
    """A valid OIP request's JSON and the bytes after it (binary tensor data) or b""."""
    shape = [rows, *ITEM_SHAPE] if rows > 1 or rng.random() < 0.7 else list(ITEM_SHAPE)
    data = rng.randbytes(rows * ITEM_BYTES)
    tensor: dict = {"name": INPUT, "datatype": "UINT8", "shape": shape}
    if binary:
        tensor["parameters"] = {"binary_data_size": len(data)}
        tail = data
    else:
        tensor["data"] = list(data) if rng.random() < 0.5 else np.frombuffer(data, np.uint8).reshape(shape).tolist()
        tail = b""
    message: dict = {"inputs": [tensor]}
    if request_id is not None:
        message["id"] = request_id
    parameters: dict = {}
    if rng.random() < 0.5:
        parameters["slo_ms"] = rng.uniform(100, 5000)
    elif rng.random() < 0.3:
        parameters["timeout"] = rng.randint(100_000, 5_000_000)
    if rng.random() < 0.3:
        parameters["priority"] = rng.randint(-1000, 1000)
    if rng.random() < 0.3:
        parameters["binary_data_output"] = rng.random() < 0.5
    if parameters:
        message["parameters"] = parameters
    if rng.random() < 0.3:
        message["outputs"] = [{"name": "logits", "parameters": {"binary_data": rng.random() < 0.5}}]
    return message, tail


def _post(path: str, body: bytes, header_length: int | None = None, extra: list[str] | None = None,
          version: str = "HTTP/1.1") -> bytes:
    lines = [f"POST {path} {version}", "Host: fuzz", f"Content-Length: {len(body)}"]
    if header_length is not None:
        lines.append(f"Inference-Header-Content-Length: {header_length}")
    lines += extra or []
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


def _get(path: str, method: str = "GET", extra: list[str] | None = None) -> bytes:
    return ("\r\n".join([f"{method} {path} HTTP/1.1", "Host: fuzz", *(extra or [])]) + "\r\n\r\n").encode(
        "utf-8", "surrogateescape")


def _infer_path(rng: random.Random, model: str) -> str:
    return rng.choice([f"/v2/models/{model}/infer", f"/v2/models/{model}/versions/1/infer",
                       f"/v2/models/{model}/infer?x=1", f"/v2/models/{model}/infer/"])


def _valid_infer(rng: random.Random, model: str | None = None) -> bytes:
    model = model or rng.choice(MODELS)
    binary = rng.random() < 0.6
    message, tail = _infer_json(rng, _request_id(rng) if rng.random() < 0.8 else None,
                                rows=rng.choice([1, 1, 1, 2, 3]) if binary else 1, binary=binary)
    header = json.dumps(message).encode()
    return _post(_infer_path(rng, model), header + tail, len(header) if tail else None)


def _bad_infer_body(rng: random.Random) -> tuple[str, bytes, int | None, frozenset[int]]:
    """A body the protocol refuses: (mutation, body, Inference-Header-Content-Length, statuses)."""
    message, tail = _infer_json(rng, _request_id(rng), binary=rng.random() < 0.5)
    tensor = message["inputs"][0]
    bad = frozenset({400})
    kind = rng.choice(["bad_json", "not_object", "deep_json", "datatype", "shape_mismatch", "huge_shape",
                       "binary_size", "field_type", "header_length", "unknown_output", "bad_utf8"])
    header_length = None
    if kind == "bad_json":
        text = json.dumps(message).encode()
        body = rng.choice([text[:rng.randrange(len(text))], b"{", b"", b"{'a': 1}", b"{\"inputs\": [NaN]}",
                           rng.randbytes(rng.randint(1, 200)), b"\x00" * 10, text + b"}", b"[" * 10])
        return kind, body, None, bad
    if kind == "not_object":
        return kind, json.dumps(rng.choice([[], 1, "x", None, [message]])).encode(), None, bad
    if kind == "deep_json":
        depth = rng.choice([100, 1000, 5000, 20000])
        nest = rng.choice(["[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth])
        where = rng.choice(["top", "parameters", "outputs", "id"])
        if where == "parameters":   # nested maps there are unknown parameters, which are ignored: lists only
            nest = "[" * depth + "]" * depth
        if where == "top":
            return kind, nest.encode(), None, bad
        body = json.dumps(dict(message, **{where: "@@"})).replace('"@@"', nest)
        return kind, body.encode(), None, bad
    if kind == "datatype":
        tensor["datatype"] = rng.choice(["FP32", "BYTES", "BF16", "uint8", "UINT9", "", None, 8, ["UINT8"]])
    elif kind == "shape_mismatch":
        tensor["shape"] = rng.choice([[1, 64, 64], [2, 64, 64, 3], [64, 64, 3, 1], [0, 64, 64, 3], [], [12288],
                                      [1, 64, 64, 3.0], [-1, 64, 64, 3], ["1", 64, 64, 3], None, "1,64,64,3"])
        if tensor["shape"] == [2, 64, 64, 3] and "data" not in tensor:
            tensor["parameters"]["binary_data_size"] = 2 * ITEM_BYTES     # declares 2 rows, sends 1
    elif kind == "huge_shape":
        big = rng.choice([10 ** 6, 2 ** 31, 2 ** 63, 10 ** 30])
        tensor["shape"] = rng.choice([[big, 64, 64, 3], [1, big, 64, 3], [big] * 4])
        if "parameters" in tensor:
            tensor["parameters"]["binary_data_size"] = rng.choice([big * ITEM_BYTES, ITEM_BYTES])
    elif kind == "binary_size":
        if "data" in tensor:
            tensor["parameters"] = {"binary_data_size": rng.choice([ITEM_BYTES, -1, 1.5, "x"])}
        else:
            tensor["parameters"]["binary_data_size"] = rng.choice([ITEM_BYTES - 1, ITEM_BYTES + 1, 0, -1, "1", None, 2 ** 64])
            if tensor["parameters"]["binary_data_size"] is None:
                tensor["parameters"] = {}
    elif kind == "field_type":
        name = rng.choice(["id", "parameters", "inputs", "outputs", "slo_ms", "priority", "timeout", "name",
                           "tensor_parameters", "sequence_id", "shared_memory", "classification"])
        if name in ("id", "parameters", "inputs", "outputs"):
            message[name] = rng.choice({"id": [7, [], {}, True], "parameters": [7, "x", True, [1]],
                                        "inputs": [7, [], {}, "x", True, [1]], "outputs": [7, {}, "x", True, [1]]}[name])
        elif name in ("slo_ms", "priority", "timeout"):
            message["parameters"] = {name: rng.choice({"slo_ms": [0, -1, "5", True, [], -1e9],
                                                       "timeout": [-1, "5", True, [], -1e9],
                                                       "priority": [1.5, "5", True, [], 1001, -1001, 2 ** 70]}[name])}
        elif name == "name":
            tensor["name"] = rng.choice([None, 1, "image", ""])
        elif name == "tensor_parameters":
            tensor["parameters"] = rng.choice([[1], "x", 1])   # [] and {} read as none
        elif name == "sequence_id":
            message["parameters"] = {"sequence_id": rng.randint(1, 100)}
        elif name == "shared_memory":
            tensor.setdefault("parameters", {})["shared_memory_region"] = "r"
        else:
            message["outputs"] = [{"name": "logits", "parameters": {"classification": 3}}]
    elif kind == "header_length":
        header = json.dumps(message).encode()
        header_length = rng.choice([0, len(header) + len(tail) + 1, len(header) - 1, 1])
        if not tail and header_length == len(header) + len(tail) + 1:
            header_length = 0
        return kind, header + tail, header_length, bad
    elif kind == "unknown_output":
        message["outputs"] = rng.choice([[{"name": "probs"}], [{"name": "logits"}, {"name": "logits"}], [{}], [1]])
    elif kind == "bad_utf8":
        return kind, b'{"id": "\xff\xfe", "inputs": []}', None, bad
    header = json.dumps(message).encode()
    if tail:
        header_length = len(header)
    return kind, header + tail, header_length, bad


def http_case(rng: random.Random, max_payload: int) -> HttpCase:
    """One connection's bytes, valid or hostile, for an agent serving the demo models over HTTP with
    bodies up to ``max_payload`` bytes."""
    kind = _weighted(rng, {
        "valid_infer": 20, "metadata": 6, "bad_body": 22, "unknown_model": 4, "bad_method": 4, "bad_path": 5,
        "pipelined": 8, "compressed": 5, "bad_content_length": 5, "chunked": 2, "oversize": 2,
        "malformed_head": 6, "odd_headers": 5, "connection_close": 3, "truncated": 3,
    })
    infer = HttpExpect("POST", HTTP_VALID)
    if kind == "valid_infer":
        return HttpCase(kind, _valid_infer(rng), [infer])
    if kind == "metadata":
        model = rng.choice(MODELS)
        path = rng.choice(["/v2", "/v2/", "/v2/health/live", "/v2/health/ready", f"/v2/models/{model}",
                           f"/v2/models/{model}/ready", f"/v2/models/{model}/config", f"/v2/models/{model}/versions/1",
                           f"/v2/models/{model}/versions/1/ready"])
        method = "HEAD" if rng.random() < 0.15 else "GET"
        return HttpCase(kind, _get(path, method), [HttpExpect(method, frozenset({200}))])
    if kind == "bad_body":
        mutation, body, header_length, statuses = _bad_infer_body(rng)
        return HttpCase(f"bad_body/{mutation}", _post(_infer_path(rng, rng.choice(MODELS)), body, header_length),
                        [HttpExpect("POST", statuses)])
    if kind == "unknown_model":
        name = rng.choice(["nope", "MOBILENET_DIGITS", "%00", "a" * 2000, "..", "%2e%2e", "ü", "mobilenet_digits%20"])
        path = rng.choice([f"/v2/models/{name}/infer", f"/v2/models/mobilenet_digits/versions/{name}/infer"])
        return HttpCase(kind, _post(path, json.dumps({"inputs": []}).encode()), [HttpExpect("POST", frozenset({404}))])
    if kind == "bad_method":
        method = rng.choice(["PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "BREW", "get", "POSTX"])
        path = rng.choice(["/v2", f"/v2/models/{MODELS[0]}/infer", "/v2/health/ready", f"/v2/models/{MODELS[0]}"])
        body = b"{}" if rng.random() < 0.5 else b""
        data = _get(path, method, [f"Content-Length: {len(body)}"]) + body
        return HttpCase(kind, data, [HttpExpect(method, frozenset({405, 404}))])
    if kind == "bad_path":
        path = rng.choice(["/", "/v1", "/v2/models", "/v2/models/", "/v2/health", "/v2/health/dead", "/v3/models/x",
                           "/v2/models/mobilenet_digits/versions", "/v2/models/mobilenet_digits/versions/2/infer",
                           "/v2/models/mobilenet_digits/infer/extra", "//v2", "/v2/%ff%fe", "*", "/v2/" + "x" * 8000,
                           "/v2/models/" + "%" * 50, "/v2/models/mobilenet_digits/stats", "/v2/\u00e9\u4e2d"])
        statuses = frozenset({404, 405, 400})
        return HttpCase(kind, _get(path), [HttpExpect("GET", statuses)])
    if kind == "pipelined":
        parts, expects = [], []
        for _ in range(rng.randint(2, 4)):
            choice = rng.random()
            if choice < 0.5:
                parts.append(_valid_infer(rng))
                expects.append(HttpExpect("POST", HTTP_VALID))
            elif choice < 0.8:
                _, body, header_length, statuses = _bad_infer_body(rng)
                parts.append(_post(_infer_path(rng, rng.choice(MODELS)), body, header_length))
                expects.append(HttpExpect("POST", statuses))
            else:
                parts.append(_get("/v2/health/ready"))
                expects.append(HttpExpect("GET", frozenset({200})))
        return HttpCase(kind, b"".join(parts), expects)
    if kind == "compressed":
        message, tail = _infer_json(rng, _request_id(rng), binary=rng.random() < 0.5)
        header = json.dumps(message).encode()
        raw = header + tail
        encoding = rng.choice(["gzip", "deflate", "br", "gzip-garbage", "gzip-bomb", "x-gzip", "gzip, deflate"])
        statuses = HTTP_VALID
        if encoding == "gzip":
            body = gzip.compress(raw)
        elif encoding == "deflate":
            body = zlib.compress(raw)
        elif encoding == "gzip-garbage":
            body, encoding, statuses = rng.randbytes(200), "gzip", frozenset({400})
        elif encoding == "gzip-bomb":
            body, encoding, statuses = gzip.compress(b"\0" * (max_payload * 4)), "gzip", frozenset({413})
        else:
            body, statuses = raw, frozenset({415})
        header_length = len(header) if tail and statuses == HTTP_VALID else None
        if statuses == frozenset({413}) or encoding == "gzip-garbage":
            header_length = None
        if len(body) > max_payload:
            return HttpCase(kind, _post(_infer_path(rng, rng.choice(MODELS)), body, header_length,
                                        [f"Content-Encoding: {encoding}"]), [HttpExpect("POST", frozenset({413}), True)])
        return HttpCase(f"compressed/{encoding}", _post(_infer_path(rng, rng.choice(MODELS)), body, header_length,
                                                        [f"Content-Encoding: {encoding}"]), [HttpExpect("POST", statuses)])
    if kind == "bad_content_length":
        body = json.dumps({"inputs": []}).encode()
        value = rng.choice(["-1", "abc", "1e3", "0x10", " ", "", "99999999999999999999999999", "+5", "5, 5", "١٢"])
        path = f"/v2/models/{MODELS[0]}/infer"
        if rng.random() < 0.3:   # two Content-Length headers that disagree
            data = (f"POST {path} HTTP/1.1\r\nContent-Length: {len(body)}\r\nContent-Length: {len(body) + 1}\r\n\r\n"
                    .encode() + body)
            return HttpCase("content_length/two", data, [HttpExpect("POST", frozenset({400}), True)])
        data = f"POST {path} HTTP/1.1\r\nContent-Length: {value}\r\n\r\n".encode() + body
        statuses = frozenset({400, 413})
        return HttpCase("content_length/bad", data, [HttpExpect("POST", statuses, True)])
    if kind == "chunked":
        body = json.dumps({"inputs": []}).encode()
        data = (f"POST /v2/models/{MODELS[0]}/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                f"{len(body):x}\r\n").encode() + body + b"\r\n0\r\n\r\n"
        return HttpCase(kind, data, [HttpExpect("POST", frozenset({411, 400}), True)])
    if kind == "oversize":
        length = max_payload + rng.randint(1, 10 ** 9)
        data = f"POST /v2/models/{MODELS[0]}/infer HTTP/1.1\r\nContent-Length: {length}\r\n\r\n".encode() + b"{" * 100
        return HttpCase(kind, data, [HttpExpect("POST", frozenset({413}), True)])
    if kind == "malformed_head":
        data = rng.choice([b"GARBAGE\r\n\r\n", b"GET /v2\r\n\r\n", b"GET /v2 HTTP/2.0\r\n\r\n", b"GET  /v2 HTTP/1.1\r\n\r\n",
                           b"GET /v2 HTTP/1.1\r\nNoColon\r\n\r\n", b"GET /v2 HTTP/1.1\r\nName : v\r\n\r\n",
                           b"GET /v2 HTTP/1.1\r\n folded\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
                           b"\r\n\r\n", rng.randbytes(100).replace(b"\r\n\r\n", b"") + b"\r\n\r\n",
                           b"GET / HTTP/1.1\r\n" + b"X-Long: " + b"a" * 70000 + b"\r\n\r\n",
                           b"GET " + b"/" * 70000 + b" HTTP/1.1\r\n\r\n"])
        return HttpCase(kind, data, [HttpExpect("?", frozenset({400, 431}), True)])
    if kind == "odd_headers":
        extra = rng.choice([["X-Null: a\x00b"], ["Expect: 100-continue"], ["Content-Type: text/plain"],
                            ["Accept-Encoding: gzip"], ["X-Many: " + "v" * 4000], [f"X-{i}: {i}" for i in range(300)],
                            ["Connection: keep-alive, Upgrade", "Upgrade: websocket"], ["Host: a", "Host: b"],
                            ["X-Ünïcode: é"], ["Inference-Header-Content-Length: 5"]])
        if extra == ["Inference-Header-Content-Length: 5"]:
            return HttpCase(kind, _post(_infer_path(rng, MODELS[0]), b'{"inputs": []}', None, extra),
                            [HttpExpect("POST", frozenset({400}))])
        message, tail = _infer_json(rng, _request_id(rng), binary=True)
        header = json.dumps(message).encode()
        return HttpCase(kind, _post(_infer_path(rng, rng.choice(MODELS)), header + tail, len(header), extra), [infer])
    if kind == "connection_close":
        if rng.random() < 0.5:
            return HttpCase(kind, _get("/v2/health/live", extra=["Connection: close"]) + _get("/v2"),
                            [HttpExpect("GET", frozenset({200}), True)])
        message, tail = _infer_json(rng, _request_id(rng), binary=True)
        header = json.dumps(message).encode()
        return HttpCase(kind, _post(_infer_path(rng, MODELS[0]), header + tail, len(header), version="HTTP/1.0"),
                        [HttpExpect("POST", HTTP_VALID, True)])
    # truncated: the connection ends inside a request; the server waits, the client gives up
    whole = _valid_infer(rng)
    return HttpCase(kind, whole[:rng.randrange(1, len(whole))], [], complete=False)


# --- drivers and the tally ------------------------------------------------------------------------

@dataclass
class Tally:
    """What a run saw: cases, answers per request, error codes, and every broken promise (``problems``)."""

    cases: int = 0
    replies: Counter = field(default_factory=Counter)      # answers per request: 0, 1, 2 (>1)
    codes: Counter = field(default_factory=Counter)        # "ok", error codes; HTTP: statuses
    kinds: Counter = field(default_factory=Counter)
    unanswerable_expected: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        if len(self.problems) < 1000:
            self.problems.append(text)


class MqttFuzzer:
    """A paho MQTT v5 client that publishes :class:`MqttCase` s to an agent, each with a response topic
    of its own, and collects every reply (QoS 1 both ways)."""

    def __init__(self, host: str, port: int, device: str, name: str) -> None:
        from agent.transport.paho_client import connect, make_client
        self.device = device
        self.prefix = f"fuzz/{name}/reply"
        self.replies: dict[str, list[tuple[bytes | None, bytes]]] = {}
        self._topics: dict[str, int] = {}
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self.disconnects = 0              # the broker dropped the fuzzer: its own cases were malformed MQTT
        self.client = make_client(name)
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        connect(self.client, host, port)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.subscribe(f"{self.prefix}/#", qos=1)
        if not subscribed.wait(10):
            raise RuntimeError("the fuzzer's reply subscription was not acknowledged")

    def _on_message(self, client, userdata, message) -> None:
        correlation = getattr(message.properties, "CorrelationData", None) if message.properties else None
        with self._arrived:
            self.replies.setdefault(message.topic, []).append((correlation, message.payload))
            self._arrived.notify_all()

    def _on_disconnect(self, *args) -> None:
        self.disconnects += 1

    def topic_of(self, case: MqttCase, n: int) -> str | None:
        if case.response == "missing":
            return None
        base = f"{self.prefix}/{n}"
        return {"valid": base + case.suffix, "plus": base + "/+", "hash": base + "/#"}[case.response]

    def send(self, case: MqttCase, n: int) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties
        props = Properties(PacketTypes.PUBLISH)
        topic = self.topic_of(case, n)
        if topic is not None:
            props.ResponseTopic = topic
        if case.correlation is not None:
            props.CorrelationData = case.correlation
        if case.user_properties:
            props.UserProperty = case.user_properties
        if case.content_type is not None:
            props.ContentType = case.content_type
        self.client.publish(f"edge/v1/{self.device}/infer/{case.model}", case.payload, qos=1, properties=props)

    def wait_for(self, topic: str, timeout: float) -> bool:
        """Block until ``topic`` has a reply, or ``timeout`` passes."""
        end = time.monotonic() + timeout
        with self._arrived:
            while topic not in self.replies:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._arrived.wait(left)
        return True

    def check(self, case: MqttCase, n: int, tally: Tally) -> None:
        """Tally one case's replies (call once no more can come) and note any broken promise."""
        tally.cases += 1
        tally.kinds[case.kind] += 1
        if not case.answerable:
            tally.unanswerable_expected += 1
            return
        topic = self.topic_of(case, n)
        with self._lock:
            replies = list(self.replies.get(topic, ()))
        tally.replies[min(len(replies), 2)] += 1
        if len(replies) != 1:
            tally.problem(f"mqtt #{n} {case.kind}: {len(replies)} replies, expected exactly 1")
        if not replies:
            return
        correlation, payload = replies[0]
        try:
            reply = msgpack.unpackb(payload, raw=False)
            outcome = reply["status"] if reply["status"] == "ok" else reply["error"]["code"]
        except Exception as exc:
            tally.problem(f"mqtt #{n} {case.kind}: reply does not decode ({type(exc).__name__}: {exc})")
            return
        tally.codes[outcome] += 1
        if outcome not in case.expect:
            message = reply.get("error", {}).get("message", "")
            tally.problem(f"mqtt #{n} {case.kind}: answered {outcome!r} ({message[:200]}), expected one of "
                          f"{sorted(case.expect)}")
        if (correlation or b"") != (case.correlation or b""):
            tally.problem(f"mqtt #{n} {case.kind}: correlation data {correlation!r:.60} is not the request's "
                          f"{case.correlation!r:.60}")
        if reply.get("id") != case.echo_id:
            tally.problem(f"mqtt #{n} {case.kind}: reply id {reply.get('id')!r:.80} is not {case.echo_id!r:.80}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class HttpResponse:
    status: int
    body: bytes


#: How long a client waits for the server to close after a response that must close the connection.
CLOSE_WAIT_S = 3.0


def http_exchange(host: str, port: int, case: HttpCase, timeout: float = 10.0) -> tuple[list[HttpResponse], bool]:
    """Send one case on a fresh connection; read the responses it expects (1xx interim ones
    skipped). Returns (responses, whether the server closed the connection). Raises nothing for
    a server that misbehaves: what came back is returned and checked by :func:`check_http`."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            sock.sendall(case.data)
        except OSError:                         # the server answered and closed before taking it all
            pass
        if not case.complete:
            return [], False
        responses: list[HttpResponse] = []
        buffer, closed = b"", False
        want = len(case.requests)
        end = time.monotonic() + timeout
        while not closed:
            while True:                         # every whole response in the buffer
                index = len(responses)
                head_only = index < want and case.requests[index].method == "HEAD"
                parsed = _parse_response(buffer, head_only)
                if parsed is None:
                    break
                response, buffer = parsed
                if 100 <= response.status < 200:
                    continue
                responses.append(response)
            last_closes = len(responses) >= want and (want == 0 or case.requests[want - 1].closes
                                                      or any(r.closes for r in case.requests[:len(responses)]))
            if len(responses) >= want and not last_closes:
                sock.settimeout(0.0)            # anything more already sent is a duplicate answer
            else:
                if len(responses) >= want:      # all answered: the close should follow at once
                    end = min(end, time.monotonic() + CLOSE_WAIT_S)
                left = end - time.monotonic()
                if left <= 0:
                    break
                sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except (BlockingIOError, socket.timeout, TimeoutError):
                break
            except OSError:                     # reset after the server's close
                closed = True
                break
            if not chunk:
                closed = True
            buffer += chunk
        while (parsed := _parse_response(buffer, False)) is not None:
            response, buffer = parsed
            if not 100 <= response.status < 200:
                responses.append(response)
        return responses, closed


def _parse_response(buffer: bytes, head_only: bool) -> tuple[HttpResponse, bytes] | None:
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buffer[:end].split(b"\r\n")
    try:
        status = int(lines[0].split(b" ")[1])
    except (IndexError, ValueError):
        status = -1
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if head_only or 100 <= status < 200:
        length = 0
    if len(buffer) < end + 4 + length:
        return None
    return HttpResponse(status, buffer[end + 4:end + 4 + length]), buffer[end + 4 + length:]


#: Statuses no request may get while the agent serves: internal errors, and 503 (it is not stopping).
HTTP_SERVER_FAULTS = frozenset({500, 502, 503})


def check_http(case: HttpCase, n: int, responses: list[HttpResponse], closed: bool, tally: Tally) -> None:
    """Tally one HTTP case and note any broken promise: each request answered once, in order, with a
    status its mutation calls for, an error body naming a code that is not ``internal``, and the
    connection closed where the framing is lost."""
    tally.cases += 1
    tally.kinds[case.kind] += 1
    expects = case.requests
    # The requests after one the server closes on are never read: they get no answer.
    answered_up_to = len(expects)
    for index, expect in enumerate(expects):
        if expect.closes:
            answered_up_to = index + 1
            break
    for index in range(len(expects)):
        got = 1 if index < len(responses) else 0
        if index < answered_up_to:
            tally.replies[got] += 1
    if len(responses) > answered_up_to:
        tally.replies[2] += 1
        tally.problem(f"http #{n} {case.kind}: {len(responses)} responses to {answered_up_to} requests")
    if len(responses) < answered_up_to:
        tally.problem(f"http #{n} {case.kind}: {len(responses)} responses to {answered_up_to} requests "
                      f"(server closed: {closed})")
    for index, response in enumerate(responses[:answered_up_to]):
        expect = expects[index]
        tally.codes[response.status] += 1
        code = None
        if response.status >= 400:
            try:
                code = json.loads(response.body)["error"].split(":", 1)[0]
            except Exception:
                if expect.method != "HEAD":
                    tally.problem(f"http #{n} {case.kind}: {response.status} without an error object: "
                                  f"{response.body[:100]!r}")
            if code is not None:
                tally.codes[code] += 1
        if response.status not in expect.statuses or response.status in HTTP_SERVER_FAULTS or code == "internal":
            tally.problem(f"http #{n} {case.kind} request {index}: status {response.status} "
                          f"({response.body[:200]!r}), expected one of {sorted(expect.statuses)}")
    if answered_up_to and expects[answered_up_to - 1].closes and len(responses) >= answered_up_to and not closed:
        tally.problem(f"http #{n} {case.kind}: the connection stayed open after a response that must close it")


def fuzz_config(mqtt_host: str | None, mqtt_port: int, max_payload: int = MAX_PAYLOAD, http_port: int = 0,
                device: str = "fuzz-board"):
    """The demo config (both demo models, deadline-aware batching) with the HTTP intake on, MQTT on
    ``mqtt_host:mqtt_port`` (``None``: off), and a payload limit small enough that oversize cases
    stay cheap to send."""
    import dataclasses

    from agent.config import Config
    config = Config.demo()
    return dataclasses.replace(
        config, device=device, max_payload_bytes=max_payload,
        mqtt=dataclasses.replace(config.mqtt, enabled=mqtt_host is not None, host=mqtt_host or "127.0.0.1",
                                 port=mqtt_port),
        http=dataclasses.replace(config.http, enabled=True, host="127.0.0.1", port=http_port))
