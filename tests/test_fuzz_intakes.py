"""Fuzz both intakes of a real agent (issue 21): no single message takes an intake down.

A real agent (the demo config, both demo models, a real Mosquitto) takes a few hundred fuzzed
requests per intake, valid and hostile ones (``edge_lab.fuzz``: wrong dtypes and shapes, huge
declared shapes, truncated and garbage bytes, wrong field types, deep nesting, oversize, unknown
models, odd MQTT v5 properties; bad JSON, bad framing, pipelining, compression, odd headers over
HTTP). Hypothesis draws each case's seed, so a failure shrinks to one seed that replays the same
request. The promises checked:

* every MQTT request with a response topic it can publish to gets exactly one reply, with its
  correlation data and its id, and one without (none, or a wildcard) is counted, not answered;
* every HTTP request gets exactly one response, or, where the framing is lost, the response and a close;
* the answer is the one its mutation calls for, never ``internal`` (500) for bad input;
* afterwards the agent still serves a valid request on each intake, and every thread it had is alive.

The long run, with RSS, is ``edge-agent bench fuzz --count 10000``.
"""
from __future__ import annotations

import itertools
import random
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from agent.intake.msgpack_codec import decode_reply, encode_request
from agent.service import Service
from edge_lab.fuzz import (MAX_PAYLOAD, MODELS, HttpCase, HttpExpect, MqttCase, MqttFuzzer, Tally, check_http,
                           fuzz_config, http_case, http_exchange, mqtt_case)

LIMIT = MAX_PAYLOAD
SEEDS = st.integers(min_value=0, max_value=2 ** 64 - 1)
# No shrinking: a smaller seed makes another request, not a simpler one; the failing seed is the reproducer
# (replay it with mqtt_case / http_case(random.Random(seed), MAX_PAYLOAD)).
FUZZ = settings(max_examples=250, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def service(broker):
    with Service(fuzz_config(broker.host, broker.port, LIMIT)) as svc:
        yield svc


@pytest.fixture(scope="module")
def threads(service):
    """The agent's threads once it serves: each must still be alive after the fuzzing."""
    return [t for t in threading.enumerate() if t is not threading.main_thread()]


def _assert_threads_alive(threads):
    dead = [t.name for t in threads if not t.is_alive()]
    assert not dead, f"threads died: {dead}"


def _valid_frame():
    return np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def test_fuzzed_mqtt_requests_are_each_answered_once_and_the_intake_lives(broker, service, threads):
    fuzzer = MqttFuzzer(broker.host, broker.port, service.config.device, f"fuzz-{time.monotonic_ns()}")
    sent: list[tuple[object, int]] = []
    numbers = itertools.count()
    unanswerable_before = service.mqtt.unanswerable
    try:
        @FUZZ
        @given(seed=SEEDS)
        def one_request(seed):
            case = mqtt_case(random.Random(seed), LIMIT)
            n = next(numbers)
            counted = service.mqtt.unanswerable
            fuzzer.send(case, n)
            sent.append((case, n))
            assert fuzzer.disconnects == 0, "the broker dropped the fuzzer (a case that is not valid MQTT)"
            if case.answerable:
                assert fuzzer.wait_for(fuzzer.topic_of(case, n), 15), f"no reply to {case.kind} (seed {seed})"
                tally = Tally()
                fuzzer.check(case, n, tally)
                assert not tally.problems, (seed, tally.problems)
            else:
                end = time.monotonic() + 10
                while service.mqtt.unanswerable == counted and time.monotonic() < end:
                    time.sleep(0.002)
                assert service.mqtt.unanswerable == counted + 1, f"{case.kind} to {case.response} not counted"

        one_request()
        time.sleep(1.0)           # a duplicate reply would have arrived by now
        tally = Tally()
        for case, n in sent:
            fuzzer.check(case, n, tally)
        assert not tally.problems, tally.problems
        assert tally.replies[2] == 0 and tally.replies[0] == 0
        assert service.mqtt.unanswerable - unanswerable_before == tally.unanswerable_expected
        assert "internal" not in tally.codes

        # Still serving: a valid request on each model.
        for model in MODELS:
            case = MqttCase("after", model, encode_request(f"after-{model}", {"frames": _valid_frame()}, slo_ms=5000),
                            expect=frozenset({"ok"}), echo_id=f"after-{model}")
            n = next(numbers)
            fuzzer.send(case, n)
            assert fuzzer.wait_for(fuzzer.topic_of(case, n), 30)
            reply = decode_reply(fuzzer.replies[fuzzer.topic_of(case, n)][0][1])
            assert reply["status"] == "ok" and reply["outputs"]["logits"].shape == (1, 10)
    finally:
        fuzzer.close()
    _assert_threads_alive(threads)


def test_fuzzed_http_requests_are_each_answered_once_and_the_intake_lives(service, threads):
    port = service.http.port
    tally = Tally()
    numbers = itertools.count()

    @FUZZ
    @given(seed=SEEDS)
    def one_connection(seed):
        case = http_case(random.Random(seed), LIMIT)
        n = next(numbers)
        responses, closed = http_exchange("127.0.0.1", port, case)
        problems = len(tally.problems)
        check_http(case, n, responses, closed, tally)
        assert len(tally.problems) == problems, (seed, tally.problems[problems:])

    one_connection()
    assert "internal" not in tally.codes and 500 not in tally.codes

    # Still serving: a valid binary request on each model, on one keep-alive connection.
    body = b'{"inputs":[{"name":"frames","datatype":"UINT8","shape":[1,64,64,3],"parameters":{"binary_data_size":12288}}]}'
    data = b"".join(b"POST /v2/models/%s/infer HTTP/1.1\r\nContent-Length: %d\r\nInference-Header-Content-Length: %d"
                    b"\r\n\r\n" % (m.encode(), len(body) + 12288, len(body)) + body + _valid_frame().tobytes()
                    for m in MODELS)
    case = HttpCase("after", data, [HttpExpect("POST", frozenset({200}))] * len(MODELS))
    responses, _ = http_exchange("127.0.0.1", port, case)
    assert [r.status for r in responses] == [200] * len(MODELS), responses
    _assert_threads_alive(threads)
