"""Wire format v1: every kind of bad input is refused with the right code and names its field."""
import math

import msgpack
import numpy as np
import pytest

from agent.errors import BAD_REQUEST, INVALID_INPUT, TOO_LARGE, InferenceError
from agent.intake.msgpack_codec import (decode_reply, decode_request, encode_reply, encode_request, encode_tensor,
                                        result_reply)
from agent.models.tensors import TensorSpec, check_inputs
from agent.scheduler.request import Result

SPECS = (TensorSpec("frames", np.uint8, (None, 4, 4, 3)),)
LIMIT = 64 * 1024


def frame(dtype=np.uint8, shape=(4, 4, 3)):
    return (np.arange(math.prod(shape)) % 251).astype(dtype).reshape(shape)


def request(**overrides) -> dict:
    message = {"id": "r1", "inputs": {"frames": encode_tensor(frame())}, "slo_ms": 50}
    message.update(overrides)
    return message


def pack(message) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def test_round_trip_request():
    payload = encode_request("r1", {"frames": frame()}, slo_ms=20, priority=3)
    decoded = decode_request(payload, LIMIT)
    assert (decoded.id, decoded.slo_ms, decoded.priority, decoded.deadline) == ("r1", 20.0, 3, None)
    arrays = check_inputs("m", SPECS, decoded.inputs)
    assert arrays["frames"].shape == (1, 4, 4, 3)
    np.testing.assert_array_equal(arrays["frames"][0], frame())


def test_reply_round_trip():
    logits = np.linspace(0, 1, 10, dtype=np.float32).reshape(1, 10)
    payload = encode_reply({"id": "r1", "status": "ok", "outputs": {"logits": logits}, "batch_size": 2})
    reply = decode_reply(payload)
    np.testing.assert_array_equal(reply["outputs"]["logits"], logits)
    assert reply["batch_size"] == 2


def test_result_reply_is_wire_format_v1():
    logits = np.arange(10, dtype=np.float32).reshape(1, 10)
    result = Result({"logits": logits}, queue_ms=1.5, compute_ms=2.0, total_ms=3.75, batch_size=4,
                    served_by={"device": "b1", "instance": 0})
    reply = decode_reply(encode_reply(result_reply(result, "r7")))
    assert set(reply) == {"id", "status", "outputs", "timing", "batch_size", "served_by"}
    assert (reply["id"], reply["status"], reply["batch_size"]) == ("r7", "ok", 4)
    assert reply["timing"] == {"queue_ms": 1.5, "compute_ms": 2.0, "total_ms": 3.75}
    assert reply["served_by"] == {"device": "b1", "instance": 0}
    np.testing.assert_array_equal(reply["outputs"]["logits"], logits)


def test_oversize_is_refused_before_decoding():
    with pytest.raises(InferenceError) as info:
        decode_request(b"\xc1" * (LIMIT + 1), LIMIT)   # not msgpack either: size is checked first
    assert info.value.code == TOO_LARGE
    assert str(LIMIT) in info.value.message


@pytest.mark.parametrize("payload, code, field", [
    (b"\xc1\xc1garbage", BAD_REQUEST, None),
    (pack([1, 2, 3]), BAD_REQUEST, None),
    (pack(request(id=None)), BAD_REQUEST, "id"),
    (pack(request(id=7)), BAD_REQUEST, "id"),
    (pack(request(slo_ms=-5)), BAD_REQUEST, "slo_ms"),
    (pack(request(slo_ms="fast")), BAD_REQUEST, "slo_ms"),
    (pack(request(deadline=1.0e9)), BAD_REQUEST, "deadline"),        # both slo_ms and deadline
    (pack(request(priority=1.5)), BAD_REQUEST, "priority"),
    (pack(request(min_accuracy=2)), BAD_REQUEST, "min_accuracy"),
    (pack(request(inputs=[])), BAD_REQUEST, "inputs"),
    (pack(request(inputs={"frames": {"dtype": "uint8", "shape": [4, 4, 3]}})), INVALID_INPUT, "inputs.frames.data"),
    (pack(request(inputs={"frames": dict(encode_tensor(frame()), dtype="complex64")})), INVALID_INPUT, "inputs.frames.dtype"),
    (pack(request(inputs={"frames": dict(encode_tensor(frame()), dtype="nonsense")})), INVALID_INPUT, "inputs.frames.dtype"),
    (pack(request(inputs={"frames": dict(encode_tensor(frame()), dtype="(1000000000,1000000000)f4")})), INVALID_INPUT,
     "inputs.frames.dtype"),
    (pack(request(inputs={"frames": dict(encode_tensor(frame()), dtype="(2,)f4")})), INVALID_INPUT, "inputs.frames.dtype"),
    (pack(request(inputs={"frames": dict(encode_tensor(frame()), shape=[4, "x"])})), INVALID_INPUT, "inputs.frames.shape"),
    (pack(request(inputs={"frames": dict(encode_tensor(frame()), data=b"short")})), INVALID_INPUT, "inputs.frames.data"),
    (pack(request(inputs={"frames": dict(encode_tensor(frame()), codec="zstd")})), INVALID_INPUT, "inputs.frames.codec"),
])
def test_malformed_requests(payload, code, field):
    with pytest.raises(InferenceError) as info:
        decode_request(payload, LIMIT)
    assert info.value.code == code
    assert info.value.field == field


def test_request_id_survives_on_errors():
    with pytest.raises(InferenceError) as info:
        decode_request(pack(request(slo_ms=0)), LIMIT)
    assert info.value.request_id == "r1"


@pytest.mark.parametrize("inputs, field, fragment", [
    ({"frames": frame(np.float32)}, "inputs.frames.dtype", "expects uint8"),
    ({"frames": frame(shape=(4, 4, 1))}, "inputs.frames.shape", "expects [4, 4, 3]"),
    ({"frames": frame(shape=(2, 4, 4, 3))}, "inputs.frames.shape", "one item"),
    ({"image": frame()}, "inputs.image", "its inputs are ['frames']"),
    ({}, "inputs.frames", "missing input"),
    ({"frames": [[1, 2]]}, "inputs.frames", "numpy array"),
])
def test_inputs_checked_against_the_model(inputs, field, fragment):
    with pytest.raises(InferenceError) as info:
        check_inputs("m", SPECS, inputs)
    assert info.value.code == INVALID_INPUT
    assert info.value.field == field
    assert fragment in info.value.message


def test_decoded_tensor_is_a_zero_copy_view():
    payload = encode_request("r", {"frames": frame()}, slo_ms=5)
    decoded = decode_request(payload, LIMIT)
    assert not decoded.inputs["frames"].flags.owndata


def test_the_per_thread_packer_packs_what_packb_packs_even_after_a_message_it_could_not_pack():
    """``pack`` keeps one packer per thread (``packb`` builds one, and its buffer, per message):
    its bytes must be packb's, on every thread, and a message it refuses must leave nothing behind
    in its buffer for the next one."""
    import threading

    from agent.intake.msgpack_codec import pack
    message = {"v": 1, "id": "apps/a/replies#7", "status": "ok", "x": [1, 2.5, "s", b"\x00b", None]}
    with pytest.raises(TypeError):
        pack({"id": "x", "bad": object()})
    assert pack(message) == msgpack.packb(message, use_bin_type=True)
    got = []
    threads = [threading.Thread(target=lambda k=k: got.extend(pack({**message, "k": k}) for _ in range(200)))
               for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(set(got)) == sorted(msgpack.packb({**message, "k": k}, use_bin_type=True) for k in range(4))
