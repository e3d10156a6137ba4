"""The Open Inference Protocol codec (agent.intake.oip), without a server: request bodies in every
form tritonclient and curl send them, each bad field refused with its code, and replies that
tritonclient's own decoder reads back."""
import json

import numpy as np
import pytest
from tritonclient.http import InferResult

from agent.errors import (BAD_REQUEST, DEADLINE_MISSED, ERROR_CODES, INVALID_INPUT, REJECTED, SHUTTING_DOWN,
                          UNKNOWN_MODEL, InferenceError)
from agent.intake import oip
from agent.models.tensors import TensorSpec

INPUTS = (TensorSpec("frames", np.uint8, (None, 4, 4, 3)),)
OUTPUTS = (TensorSpec("logits", np.float32, (None, 10)), TensorSpec("features", np.float32, (None, 2)))
ITEM = 4 * 4 * 3


def frames(rows=1):
    return (np.arange(rows * ITEM) % 251).astype(np.uint8).reshape(rows, 4, 4, 3)


def binary_body(array, *, datatype="UINT8", shape=None, size=None, trailing=b"", **fields):
    """JSON header + raw bytes, as tritonclient's binary_data=True sends it."""
    data = array.tobytes()
    message = {"inputs": [{"name": "frames", "shape": list(array.shape if shape is None else shape),
                           "datatype": datatype,
                           "parameters": {"binary_data_size": len(data) if size is None else size}}]}
    message.update(fields)
    header = json.dumps(message).encode()
    return header + data + trailing, len(header)


def json_body(data, *, shape=(1, 4, 4, 3), datatype="UINT8", **fields):
    message = {"inputs": [{"name": "frames", "shape": list(shape), "datatype": datatype, "data": data}]}
    message.update(fields)
    return json.dumps(message).encode()


def parse(body, header_length=None):
    return oip.parse_infer_request("m", body, header_length, INPUTS, OUTPUTS)


def refused(body, header_length=None) -> InferenceError:
    with pytest.raises(InferenceError) as info:
        parse(body, header_length)
    return info.value


# --- requests that parse ------------------------------------------------------------------------

def test_binary_input_is_a_zero_copy_view_of_the_body():
    body, header_length = binary_body(frames())
    request = parse(body, header_length)
    array = request.inputs["frames"]
    assert array.shape == (1, 4, 4, 3) and array.dtype == np.uint8 and request.rows == 1
    np.testing.assert_array_equal(array, frames())
    assert np.shares_memory(array, np.frombuffer(body, np.uint8)) and not array.flags.writeable
    assert request.outputs == [("logits", False), ("features", False)]       # all outputs, JSON by default
    assert (request.id, request.slo_ms, request.priority) == (None, None, 0)


@pytest.mark.parametrize("data", [frames().ravel().tolist(), frames().tolist(), frames()[0].tolist()],
                         ids=["flat", "nested", "nested-item"])
def test_json_data_flat_or_nested(data):
    request = parse(json_body(data))
    np.testing.assert_array_equal(request.inputs["frames"], frames())
    assert request.inputs["frames"].dtype == np.uint8


def test_item_shape_without_the_batch_dimension_is_one_item():
    body, header_length = binary_body(frames(), shape=[4, 4, 3])
    request = parse(body, header_length)
    assert request.rows == 1 and request.inputs["frames"].shape == (1, 4, 4, 3)


def test_a_batch_of_rows():
    body, header_length = binary_body(frames(3))
    request = parse(body, header_length)
    assert request.rows == 3 and request.inputs["frames"].shape == (3, 4, 4, 3)


def test_float_input_from_json_integers_and_numbers():
    specs = (TensorSpec("x", np.float32, (None, 3)),)
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2.5, -3]}]}).encode()
    request = oip.parse_infer_request("m", body, None, specs, OUTPUTS)
    assert request.inputs["x"].dtype == np.float32
    np.testing.assert_array_equal(request.inputs["x"], [[1, 2.5, -3]])


def test_parameters_slo_timeout_priority_id_and_outputs():
    body, n = binary_body(frames(), id="req-7", parameters={"slo_ms": 12.5, "priority": 3, "timeout": 99},
                          outputs=[{"name": "features", "parameters": {"binary_data": True}}])
    request = parse(body, n)
    assert (request.id, request.slo_ms, request.priority) == ("req-7", 12.5, 3)   # slo_ms wins over timeout
    assert request.outputs == [("features", True)]
    body, n = binary_body(frames(), parameters={"timeout": 2500, "binary_data_output": True})
    request = parse(body, n)
    assert request.slo_ms == 2.5                                                  # Triton's microseconds
    assert request.outputs == [("logits", True), ("features", True)]
    body, n = binary_body(frames(), parameters={"timeout": 0})                    # 0 = none, as in Triton
    assert parse(body, n).slo_ms is None


def test_output_binary_flag_defaults_to_the_request_level_flag():
    body, n = binary_body(frames(), parameters={"binary_data_output": True},
                          outputs=[{"name": "logits"}, {"name": "features", "parameters": {"binary_data": False}}])
    assert parse(body, n).outputs == [("logits", True), ("features", False)]


# --- requests that are refused, each naming its field ---------------------------------------------

BAD = {
    "not_json": (lambda: (b"{not json", None), BAD_REQUEST, None, "does not parse"),
    "not_an_object": (lambda: (b"[1, 2]", None), BAD_REQUEST, None, "JSON object"),
    "no_inputs": (lambda: (b'{"inputs": []}', None), BAD_REQUEST, "inputs", "non-empty"),
    "header_longer_than_body": (lambda: (binary_body(frames())[0], 10 ** 6), BAD_REQUEST, None,
                                "Inference-Header-Content-Length"),
    "id_not_a_string": (lambda: binary_body(frames(), id=7), BAD_REQUEST, "id", "string"),
    "wrong_datatype": (lambda: binary_body(frames().astype(np.float32), datatype="FP32"), INVALID_INPUT,
                       "inputs.frames.datatype", "expected UINT8, got 'FP32'"),
    "bytes_datatype": (lambda: binary_body(frames(), datatype="BYTES"), INVALID_INPUT, "inputs.frames.datatype",
                       "not supported"),
    "wrong_shape": (lambda: binary_body(frames(), shape=[1, 4, 2, 6]), INVALID_INPUT, "inputs.frames.shape",
                    "expected [-1, 4, 4, 3]"),
    "zero_rows": (lambda: binary_body(frames()[:0]), INVALID_INPUT, "inputs.frames.shape", "N >= 1"),
    "binary_size_disagrees_with_shape": (lambda: binary_body(frames(), size=10), INVALID_INPUT,
                                         "inputs.frames.parameters.binary_data_size", f"needs {ITEM} bytes"),
    "bytes_left_over": (lambda: binary_body(frames(), trailing=b"xx"), BAD_REQUEST, None, "add up to"),
    "binary_past_the_end": (lambda: (lambda b, n: (b[:-5], n))(*binary_body(frames())), BAD_REQUEST,
                            "inputs.frames.parameters.binary_data_size", "past the end"),
    "json_too_few_values": (lambda: (json_body([1, 2, 3]), None), INVALID_INPUT, "inputs.frames.data",
                            f"has 3 values; its shape needs {ITEM}"),
    "json_float_for_uint8": (lambda: (json_body([0.5] * ITEM), None), INVALID_INPUT, "inputs.frames.data",
                             "UINT8 takes integers"),
    "json_out_of_range": (lambda: (json_body([300] * ITEM), None), INVALID_INPUT, "inputs.frames.data",
                          "do not fit UINT8"),
    "json_ragged": (lambda: (json_body([[1, 2], [3]]), None), INVALID_INPUT, "inputs.frames.data", "regular"),
    "no_data": (lambda: (json.dumps({"inputs": [{"name": "frames", "shape": [1, 4, 4, 3],
                                                 "datatype": "UINT8"}]}).encode(), None),
                INVALID_INPUT, "inputs.frames.data", "has no data"),
    "unknown_input": (lambda: (json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "UINT8",
                                                       "data": [1]}]}).encode(), None),
                      INVALID_INPUT, "inputs.image", "its inputs are ['frames']"),
    "unknown_output": (lambda: binary_body(frames(), outputs=[{"name": "probs"}]), INVALID_INPUT, "outputs.probs",
                       "its outputs are ['logits', 'features']"),
    "classification": (lambda: binary_body(frames(), outputs=[{"name": "logits",
                                                               "parameters": {"classification": 3}}]),
                       BAD_REQUEST, "outputs.logits.parameters.classification", "not supported"),
    "shared_memory": (lambda: binary_body(frames(), outputs=[{"name": "logits", "parameters": {
                          "shared_memory_region": "r", "shared_memory_byte_size": 40}}]),
                      BAD_REQUEST, "outputs.logits.parameters.shared_memory_region", "not supported"),
    "bad_slo": (lambda: binary_body(frames(), parameters={"slo_ms": 0}), BAD_REQUEST, "parameters.slo_ms", "> 0"),
    "bad_timeout": (lambda: binary_body(frames(), parameters={"timeout": "soon"}), BAD_REQUEST,
                    "parameters.timeout", "microseconds"),
    "bad_priority": (lambda: binary_body(frames(), parameters={"priority": 1.5}), BAD_REQUEST,
                     "parameters.priority", "-1000..1000"),
    "sequence": (lambda: binary_body(frames(), parameters={"sequence_id": 4}), BAD_REQUEST,
                 "parameters.sequence_id", "sequence batching"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_are_refused_naming_the_field(case):
    make, code, field, fragment = BAD[case]
    error = refused(*make())
    assert error.code == code, error
    assert error.field == field, error
    assert fragment in error.message, error
    assert oip.error_message(error).startswith(f"{code}: ")


def test_the_datatype_error_reads_like_the_protocol():
    error = refused(*binary_body(frames().astype(np.float32), datatype="FP32"))
    assert oip.error_message(error) == "invalid_input: inputs.frames.datatype: expected UINT8, got 'FP32' (model 'm')"
    assert oip.error_status(error) == 400


# --- replies ------------------------------------------------------------------------------------

def _reply(outputs_requested):
    body, n = binary_body(frames(2), id="r1", outputs=outputs_requested)
    request = parse(body, n)
    outputs = {"logits": np.linspace(-1, 1, 20, dtype=np.float32).reshape(2, 10),
               "features": np.array([[1.5, -2.25], [3, 4]], np.float32)}
    chunks, header_length = oip.infer_response(request, outputs, {"total_ms": 1.25})
    return outputs, b"".join(chunks), header_length


def test_binary_and_json_outputs_read_back_with_tritonclient():
    outputs, body, header_length = _reply([{"name": "logits", "parameters": {"binary_data": True}},
                                           {"name": "features", "parameters": {"binary_data": False}}])
    assert header_length is not None and header_length < len(body)
    result = InferResult.from_response_body(body, header_length=header_length)
    np.testing.assert_array_equal(result.as_numpy("logits").reshape(2, 10), outputs["logits"])
    np.testing.assert_array_equal(result.as_numpy("features").reshape(2, 2), outputs["features"])
    response = result.get_response()
    assert response["id"] == "r1" and response["model_name"] == "m" and response["model_version"] == "1"
    assert [o["name"] for o in response["outputs"]] == ["logits", "features"]
    assert response["outputs"][0] == {"name": "logits", "datatype": "FP32", "shape": [2, 10],
                                      "parameters": {"binary_data_size": 80}}
    assert response["parameters"] == {"total_ms": 1.25}


def test_all_json_reply_has_no_binary_part():
    outputs, body, header_length = _reply([{"name": "features"}])
    assert header_length is None
    response = json.loads(body)
    assert response["outputs"] == [{"name": "features", "datatype": "FP32", "shape": [2, 2],
                                    "data": [1.5, -2.25, 3.0, 4.0]}]


def test_all_binary_reply_reads_back_with_tritonclient_each_time():
    # The all-binary reply's JSON is partly encoded once per shape: replies after the first must
    # still carry their own id, parameters and bytes.
    for k, request_id in enumerate(("r1", None, 'quote"d')):
        fields = {"id": request_id} if request_id is not None else {}
        request = parse(*binary_body(frames(2), outputs=[{"name": "logits", "parameters": {"binary_data": True}},
                                                         {"name": "features", "parameters": {"binary_data": True}}],
                                     **fields))
        outputs = {"logits": np.full((2, 10), k, np.float32), "features": np.full((2, 2), -k, np.float32)}
        chunks, header_length = oip.infer_response(request, outputs, {"total_ms": k + 0.5} if k != 1 else None)
        body = b"".join(chunks)
        result = InferResult.from_response_body(body, header_length=header_length)
        np.testing.assert_array_equal(result.as_numpy("logits").reshape(2, 10), outputs["logits"])
        np.testing.assert_array_equal(result.as_numpy("features").reshape(2, 2), outputs["features"])
        response = result.get_response()
        assert response.get("id") == request_id and response["model_name"] == "m"
        assert response.get("parameters") == ({"total_ms": k + 0.5} if k != 1 else None)
        assert response["outputs"][1] == {"name": "features", "datatype": "FP32", "shape": [2, 2],
                                          "parameters": {"binary_data_size": 16}}


@pytest.mark.parametrize("parameters", [
    {"queue_ms": 0.1, "compute_ms": 2.5e-07, "total_ms": 12.375, "batch_size": 3},   # what the agent sends
    {"flag": True, "name": 'say "hi"', "nan": float("nan")},                          # what goes through json
    {"two words": 1, "x": -0.0},
])
def test_reply_parameters_are_json_with_their_exact_values(parameters):
    request = parse(*binary_body(frames(1), outputs=[{"name": "logits", "parameters": {"binary_data": True}}]))
    chunks, header_length = oip.infer_response(request, {"logits": np.zeros((1, 10), np.float32)}, parameters)
    sent = json.loads(chunks[0])["parameters"]
    assert sent.keys() == parameters.keys()
    for key, value in parameters.items():
        assert sent[key] == value or (value != value and sent[key] != sent[key]), key   # NaN == NaN here
        assert type(sent[key]) is type(value), key


def test_layout_cache_gives_the_same_request_and_this_bodys_bytes():
    cache = oip.LayoutCache()
    first = frames()
    body, header_length = binary_body(first, parameters={"slo_ms": 20, "priority": 2}, id="a")
    cold = oip.parse_infer_request("m", body, header_length, INPUTS, OUTPUTS, cache)
    assert len(cache) == 1
    second = 255 - first                                   # same header, other pixels
    body2, _ = binary_body(second, parameters={"slo_ms": 20, "priority": 2}, id="a")
    warm = oip.parse_infer_request("m", body2, header_length, INPUTS, OUTPUTS, cache)
    assert (warm.id, warm.rows, warm.slo_ms, warm.priority, warm.outputs) == \
        (cold.id, cold.rows, cold.slo_ms, cold.priority, cold.outputs)
    np.testing.assert_array_equal(warm.inputs["frames"], second)
    assert np.shares_memory(warm.inputs["frames"], np.frombuffer(body2, np.uint8))
    # A body of another size under the same header is checked afresh, and refused.
    with pytest.raises(InferenceError) as info:
        oip.parse_infer_request("m", body2 + b"x", header_length, INPUTS, OUTPUTS, cache)
    assert info.value.code == BAD_REQUEST and "after the JSON header" in info.value.message


def test_layout_cache_skips_json_data_and_stays_bounded():
    cache = oip.LayoutCache()
    oip.parse_infer_request("m", json_body(frames().ravel().tolist()), None, INPUTS, OUTPUTS, cache)
    assert len(cache) == 0                                 # the data is the header: nothing to reuse
    for k in range(oip.LAYOUT_CACHE_SIZE + 5):             # a fresh id per request
        oip.parse_infer_request("m", *binary_body(frames(), id=f"r{k}"), INPUTS, OUTPUTS, cache)
        assert len(cache) <= oip.LAYOUT_CACHE_SIZE


# --- errors, metadata ---------------------------------------------------------------------------

def test_every_error_code_has_an_http_status():
    assert set(oip.HTTP_STATUS) == set(ERROR_CODES)
    assert oip.HTTP_STATUS[UNKNOWN_MODEL] == 404
    assert oip.HTTP_STATUS[REJECTED] == 429
    assert oip.HTTP_STATUS[DEADLINE_MISSED] == 504
    assert oip.HTTP_STATUS[SHUTTING_DOWN] == 503


def test_error_body_is_the_protocols_error_object():
    body = oip.error_body(InferenceError(REJECTED, "deadline cannot be met: predicted finish in 3.0 ms"))
    assert json.loads(body) == {"error": "rejected: refused by admission control: deadline cannot be met: "
                                         "predicted finish in 3.0 ms"}


def test_model_metadata_and_config():
    meta = oip.model_metadata("m", "litert", INPUTS, OUTPUTS)
    assert meta["platform"] == "tensorflow_lite" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "frames", "datatype": "UINT8", "shape": [-1, 4, 4, 3]}]
    assert oip.model_metadata("m", "onnxruntime", INPUTS, OUTPUTS)["platform"] == "onnxruntime_onnx"
    config = oip.model_config("m", "onnxruntime", 8, INPUTS, OUTPUTS)
    assert config["max_batch_size"] == 8
    assert config["input"] == [{"name": "frames", "data_type": "TYPE_UINT8", "dims": [4, 4, 3]}]


@pytest.mark.parametrize("datatype", sorted(oip.DATATYPES))
def test_datatype_names_round_trip(datatype):
    dtype = oip.DATATYPES[datatype]
    assert oip.datatype_name(dtype) == datatype
    assert oip.datatype_name(dtype.newbyteorder("<")) == datatype
