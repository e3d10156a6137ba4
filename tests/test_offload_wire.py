"""The offload wire (agent.offload.wire): a batch and its per-item deadlines survive the trip, a
reply's per-item statuses and rows come back, and every malformed field is named, never a crash."""
from __future__ import annotations

import msgpack
import numpy as np
import pytest

from agent.errors import BAD_REQUEST, INVALID_INPUT, REJECTED, TOO_LARGE, InferenceError
from agent.offload import wire


def _request(**changes) -> dict:
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    message = {"v": 1, "origin": "board-a", "batch": "b-1", "split": "stage2",
               "inputs": {"stage2_out": wire.encode_batch_tensor(x)}, "deadlines": [1.7e9, 1.7e9 + 0.01]}
    message.update(changes)
    return message


def test_a_batch_round_trips_with_its_deadlines_split_and_origin():
    x = np.random.default_rng(0).standard_normal((3, 8, 2, 2)).astype(np.float32)
    payload = wire.encode_request(wire.OffloadRequest("board-a", "b-7", "stage1", {"t": x}, [1.7e9, 1.8e9, 1.9e9], 3))
    got = wire.decode_request(payload, 1 << 20)
    assert (got.origin, got.batch, got.split, got.priority, got.size) == ("board-a", "b-7", "stage1", 3, 3)
    assert got.deadlines == [1.7e9, 1.8e9, 1.9e9]
    np.testing.assert_array_equal(got.inputs["t"], x)
    assert msgpack.unpackb(payload)["inputs"]["t"]["codec"] == "raw"
    full = wire.decode_request(wire.encode_request(wire.OffloadRequest("a", "b", None, {"frames": x}, [1.0] * 3)), 1 << 20)
    assert full.split is None


def test_a_split_tensor_travels_by_its_codec_and_a_uint8_input_as_it_is():
    x = np.maximum(np.random.default_rng(1).standard_normal((4, 8, 3, 3)), 0).astype(np.float32)
    payload = wire.encode_request(wire.OffloadRequest("a", "b", "s", {"t": x}, [1.0] * 4), "int8")
    assert msgpack.unpackb(payload)["inputs"]["t"]["codec"] == "int8"
    got = wire.decode_request(payload, 1 << 20).inputs["t"]
    scale = x.max(axis=(0, 2, 3)) / 255
    assert np.all(np.abs(got - x) <= 1.001 * scale[None, :, None, None])
    frames = np.zeros((2, 4, 4, 3), np.uint8)
    sent = wire.encode_request(wire.OffloadRequest("a", "b", None, {"frames": frames}, [1.0] * 2), "int8")
    assert msgpack.unpackb(sent)["inputs"]["frames"]["codec"] == "raw"


@pytest.mark.parametrize("changes, field", [
    ({"v": 2}, "v"),
    ({"origin": ""}, "origin"),
    ({"batch": 5}, "batch"),
    ({"split": 3}, "split"),
    ({"deadlines": "soon"}, "deadlines"),
    ({"deadlines": []}, "deadlines"),
    ({"deadlines": [1.7e9, float("nan")]}, "deadlines"),
    ({"deadlines": [1.7e9, True]}, "deadlines"),
    ({"priority": 10 ** 6}, "priority"),
    ({"inputs": {}}, "inputs"),
    ({"inputs": {"t": {"dtype": "float32", "shape": [2], "data": b"x"}}}, "inputs.t.data"),
    ({"inputs": {"t": {"dtype": "float32", "shape": [2], "data": b"\0" * 8, "codec": "lz9"}}}, "inputs.t.codec"),
    ({"deadlines": [1.7e9]}, "inputs.stage2_out.shape"),     # 2 rows, 1 deadline
    ({"inputs": {"t": {"dtype": "float32", "shape": [1, 2, 2], "data": b"\0" * 3, "codec": "int8"}}},
     "inputs.t.data"),                                        # an int8 payload too short for its shape
    ({"inputs": {"t": {"dtype": "float32", "shape": [2 ** 40], "data": b"", "codec": "int8+zstd"}}},
     "inputs.t.shape"),                                       # refused before anything is allocated
])
def test_each_malformed_field_is_named(changes, field):
    payload = msgpack.packb(_request(**changes), use_bin_type=True)
    with pytest.raises(InferenceError) as info:
        wire.decode_request(payload, 1 << 20)
    assert info.value.field == field and info.value.code in (BAD_REQUEST, INVALID_INPUT)
    if field != "batch":
        assert info.value.batch == "b-1"      # the error reply can still name the batch


@pytest.mark.parametrize("payload", [b"\xc1", msgpack.packb([1, 2]), msgpack.packb("x")])
def test_what_is_not_a_map_is_a_bad_request(payload):
    with pytest.raises(InferenceError) as info:
        wire.decode_request(payload, 1 << 20)
    assert info.value.code == BAD_REQUEST


def test_a_payload_over_the_limit_is_refused_before_decoding():
    with pytest.raises(InferenceError) as info:
        wire.decode_request(b"\0" * 2048, 1024)
    assert info.value.code == TOO_LARGE


def test_a_reply_carries_each_items_status_and_its_row():
    logits = np.arange(30, dtype=np.float32).reshape(3, 10)
    errors = [None, InferenceError(REJECTED, "queue too long"), None]
    payload = wire.encode_reply("b-1", outputs={"logits": logits}, errors=errors,
                                timing={"queue_ms": 1, "compute_ms": 2, "total_ms": 4},
                                served_by={"device": "board-b", "split": "stage2"})
    reply = wire.decode_reply(payload, 3)
    assert reply.batch == "b-1" and reply.error is None
    assert [e if e is None else e.code for e in reply.errors] == [None, REJECTED, None]
    np.testing.assert_array_equal(reply.outputs["logits"], logits)
    assert reply.timing["total_ms"] == 4.0 and reply.served_by["device"] == "board-b"
    refused = wire.decode_reply(wire.encode_reply("b-2", error=InferenceError(BAD_REQUEST, "no", "deadlines")))
    assert refused.error.code == BAD_REQUEST and refused.error.field == "deadlines"


@pytest.mark.parametrize("message, field", [
    ({"v": 1, "batch": "b", "status": "ok", "items": [{"status": "ok"}], "outputs": {}}, "outputs"),
    ({"v": 1, "batch": "b", "status": "ok", "items": [{"status": "maybe"}], "outputs": {}}, "items[0]"),
    ({"v": 1, "batch": "b", "status": "ok", "items": [], "outputs": {}}, "items"),
    ({"v": 1, "batch": "b", "status": "error", "error": {"code": "nope", "message": "x"}}, "error"),
    ({"v": 1, "batch": "b", "status": "fine"}, "status"),
])
def test_a_malformed_reply_is_named_too(message, field):
    with pytest.raises(InferenceError) as info:
        wire.decode_reply(msgpack.packb(message, use_bin_type=True), 1)
    assert info.value.field == field
