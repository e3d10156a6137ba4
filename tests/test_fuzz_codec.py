"""The MQTT wire's codec under fuzzed payloads (issue 21), without a broker: decoding any payload
either gives a request or raises the ``InferenceError`` its mutation calls for, carrying the
request's id where the payload is a readable map; never another exception (which the intake
would answer ``internal``). Thousands of cases in a few seconds; ``test_fuzz_intakes`` sends
fewer through a real agent."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import InferenceError
from agent.intake.msgpack_codec import decode_request
from edge_lab.fuzz import MAX_PAYLOAD, mqtt_case

LIMIT = MAX_PAYLOAD


def _decode_as_expected(seed: int) -> None:
    case = mqtt_case(random.Random(seed), LIMIT)
    try:
        request = decode_request(case.payload, LIMIT)
    except InferenceError as exc:
        assert exc.code in case.expect, (case.kind, exc)
        assert getattr(exc, "request_id", None) == case.echo_id, (case.kind, exc)
        return
    # Decoded: the mutation's error, if any, comes from the model check in Agent.submit (or the topic).
    assert case.expect & {"ok", "invalid_input", "unknown_model", "rejected"}, (case.kind, case.expect)
    assert request.id == case.echo_id


@settings(max_examples=2000, deadline=None, database=None)
@given(seed=st.integers(min_value=0, max_value=2 ** 64 - 1))
def test_decoding_a_fuzzed_payload_raises_nothing_but_the_named_error(seed):
    _decode_as_expected(seed)


# Outside hypothesis, which raises the recursion limit while a test runs: paho's network thread runs
# under the interpreter's default, where the second one failed.
@pytest.mark.parametrize("seed", [
    154548,   # an empty tensor of shape [0, 2**62, 2**62]: numpy's reshape raised ValueError
    674,      # an id nested 1000 lists deep: repr() in the error message raised RecursionError
])
def test_the_payloads_that_found_codec_bugs(seed):
    _decode_as_expected(seed)
