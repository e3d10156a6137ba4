"""The Prometheus endpoint of a real agent (the demo model on onnxruntime), scraped over a real
socket and parsed with prometheus_client's own parser: Triton's names, types and labels, with
values that match what was sent and answered, and ours beside them."""
import socket
import urllib.error
import urllib.request
from concurrent.futures import wait

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.config import CONFIG_VERSION, parse_config
from agent.errors import DEADLINE_MISSED, INVALID_INPUT, REJECTED, InferenceError
from agent.service import Service

MODEL = "mobilenet_digits"
LATE = "mobilenet_late"      # the same model without admission: an unmeetable SLO is answered deadline_missed
OK_SLO_MS = 5000.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int, path: str = "/metrics") -> tuple[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.headers["Content-Type"], response.read().decode()


def _samples(text: str) -> dict:
    """{family name: (type, [(sample name, labels, value)])}."""
    return {f.name: (f.type, [(s.name, s.labels, s.value) for s in f.samples])
            for f in text_string_to_metric_families(text)}


def _value(families: dict, family: str, sample: str | None = None, **labels) -> float:
    """One sample's value. The parser names a counter's samples ``<family>_total`` whatever the text
    said (its OpenMetrics form); the text's own names are checked on the text itself."""
    kind, samples = families[family]
    sample = sample or (f"{family}_total" if kind == "counter" else family)
    found = [v for name, lab, v in samples if name == sample and all(lab.get(k) == str(x) for k, x in labels.items())]
    assert len(found) == 1, (family, sample, labels, families[family])
    return found[0]


@pytest.fixture(scope="module")
def served(digits):
    """A service with the endpoint on; a burst of ok requests, admission refusals, malformed
    requests and requests answered deadline_missed; then one scrape."""
    port = _free_port()
    config = parse_config({
        "config_version": CONFIG_VERSION, "agent": {"device": "prom-board", "workers": 2},
        "mqtt": {"enabled": False}, "telemetry": {"prometheus_port": port},
        "models": [{"name": MODEL, "card": f"demo:{MODEL}", "instances": 2,
                    "batching": {"rule": "deadline_aware", "max_batch": 8}},
                   {"name": LATE, "card": f"demo:{MODEL}",
                    "batching": {"rule": "deadline_aware", "max_batch": 8, "admission": False}}]})
    frames, _ = digits
    with Service(config) as service:
        agent = service.agent
        futures = [agent.submit(MODEL, {"frames": frames[i]}, slo_ms=OK_SLO_MS) for i in range(40)]
        refused = {REJECTED: 0, INVALID_INPUT: 0}
        for i in range(5):
            for inputs, slo_ms in (({"frames": frames[i]}, 0.001), ({"frames": frames[i].astype(np.float32)}, OK_SLO_MS)):
                with pytest.raises(InferenceError) as info:
                    agent.submit(MODEL, inputs, slo_ms=slo_ms)
                refused[info.value.code] += 1
        late = [agent.submit(LATE, {"frames": frames[i]}, slo_ms=0.001) for i in range(3)]
        done, _ = wait(futures + late, timeout=60)
        assert len(done) == len(futures) + len(late)
        results = [f.result() for f in futures]
        assert all(f.exception() is not None and f.exception().code == DEADLINE_MISSED for f in late)
        # The slack admission control learned for a class (it learns from admitted requests that miss).
        lane = agent.scheduler.lanes[MODEL]
        lane.admission.calibrate(True, OK_SLO_MS / 1000)
        content_type, text = _scrape(service.prometheus.port)
        yield {"results": results, "refused": refused, "late": len(late), "text": text, "content_type": content_type,
               "families": _samples(text), "slack_s": lane.admission.slack_s(OK_SLO_MS / 1000),
               "slowdown": lane.admission.slowdown, "port": service.prometheus.port}


def test_tritons_names_are_exact_counters_with_model_and_version(served):
    families = served["families"]
    assert served["content_type"].startswith("text/plain; version=0.0.4")
    for name in ("nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
                 "nv_inference_exec_count", "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
                 "nv_inference_compute_infer_duration_us"):
        kind, samples = families[name]
        assert kind == "counter", name
        assert {s[1]["model"] for s in samples} == {MODEL, LATE}
        assert all(s[1]["version"] == "1" for s in samples)
        # In the text: Triton's exact name on the TYPE line and on every sample, no _total.
        assert f"\n# TYPE {name} counter\n" in served["text"]
        lines = [line for line in served["text"].splitlines() if line.startswith(name) and not line.startswith("#")]
        assert len(lines) == len(samples) and all(line.startswith(name + "{") for line in lines), lines
    assert families["nv_inference_pending_request_count"][0] == "gauge"
    assert f'nv_inference_request_success{{model="{MODEL}",version="1"}} 40\n' in served["text"]


def test_tritons_counts_match_what_was_sent(served):
    families, results, refused = served["families"], served["results"], served["refused"]
    batches = round(sum(1 / r.batch_size for r in results))       # every request of a batch answered ok
    assert _value(families, "nv_inference_request_success", model=MODEL) == len(results)
    assert _value(families, "nv_inference_count", model=MODEL) == len(results)        # items in executed batches
    assert _value(families, "nv_inference_exec_count", model=MODEL) == batches
    assert batches < len(results)          # the burst was batched: Triton's inference / exec = mean batch size
    failures = {reason: _value(families, "nv_inference_request_failure", model=MODEL, reason=reason)
                for reason in ("REJECTED", "CANCELED", "BACKEND", "OTHER")}
    assert failures == {"REJECTED": refused[REJECTED], "CANCELED": 0, "BACKEND": 0, "OTHER": refused[INVALID_INPUT]}
    assert _value(families, "nv_inference_request_failure", model=LATE, reason="REJECTED") == served["late"]
    assert _value(families, "nv_inference_request_success", model=LATE) == 0
    assert _value(families, "nv_inference_pending_request_count", model=MODEL) == 0


def test_tritons_durations_are_the_replies_times_summed_in_microseconds(served):
    families, results = served["families"], served["results"]
    request_us = _value(families, "nv_inference_request_duration_us", model=MODEL)
    queue_us = _value(families, "nv_inference_queue_duration_us", model=MODEL)
    compute_us = _value(families, "nv_inference_compute_infer_duration_us", model=MODEL)
    assert request_us == pytest.approx(1000 * sum(r.total_ms for r in results), rel=1e-9)
    assert queue_us == pytest.approx(1000 * sum(r.queue_ms for r in results), rel=1e-9)
    assert compute_us == pytest.approx(1000 * sum(r.compute_ms for r in results), rel=1e-9)
    assert 0 < compute_us and 0 <= queue_us
    assert queue_us + compute_us <= request_us * (1 + 1e-9)    # queued, then computed, within the whole


def test_our_families_attainment_refusals_batches_slack(served):
    families, results, refused = served["families"], served["results"], served["refused"]
    slo = f"{OK_SLO_MS:g}"
    assert _value(families, "edge_slo_attainment", model=MODEL, slo_ms=slo) == 1.0
    assert _value(families, "edge_slo_met", model=MODEL, slo_ms=slo) == len(results)
    assert _value(families, "edge_slo_attainment", model=MODEL, slo_ms="0.001") == 0.0      # refusing is never free
    assert _value(families, "edge_slo_requests", model=MODEL, slo_ms="0.001") == refused[REJECTED]
    assert _value(families, "edge_slo_attainment", model=LATE, slo_ms="0.001") == 0.0
    for code, n in refused.items():
        assert _value(families, "edge_refusals", model=MODEL, reason=code) == n
    assert _value(families, "edge_failures", model=LATE, code=DEADLINE_MISSED) == served["late"]
    assert _value(families, "edge_requests_accepted", model=MODEL) == len(results)

    kind, _ = families["edge_batch_size"]
    assert kind == "histogram"
    sizes = [r.batch_size for r in results]
    batches_of = {b: round(sum(1 / s for s in sizes if s == b)) for b in set(sizes)}
    for bound in range(1, 9):
        assert _value(families, "edge_batch_size", "edge_batch_size_bucket", model=MODEL, le=f"{bound}.0") == \
            sum(n for b, n in batches_of.items() if b <= bound), bound
    assert _value(families, "edge_batch_size", "edge_batch_size_bucket", model=MODEL, le="+Inf") == sum(batches_of.values())
    assert _value(families, "edge_batch_size", "edge_batch_size_count", model=MODEL) == sum(batches_of.values())
    assert _value(families, "edge_batch_size", "edge_batch_size_sum", model=MODEL) == len(results)

    assert served["slack_s"] > 0
    assert _value(families, "edge_admission_slack_seconds", model=MODEL, slo_ms=slo) == pytest.approx(served["slack_s"])
    assert _value(families, "edge_admission_slowdown", model=MODEL) == pytest.approx(served["slowdown"])
    assert not [s for s in families["edge_admission_slowdown"][1] if s[1]["model"] == LATE]   # no admission there


def test_only_metrics_is_served(served):
    with pytest.raises(urllib.error.HTTPError) as info:
        _scrape(served["port"], "/v2/health/live")
    assert info.value.code == 404


def test_the_endpoint_is_off_by_default_and_its_config_is_checked():
    from agent.config import ConfigError
    base = {"config_version": CONFIG_VERSION, "models": [{"name": MODEL}]}
    assert parse_config(base).telemetry.prometheus_port == 0
    for key, bad in (("prometheus_port", 70000), ("prometheus_port", "8002"), ("interval_s", 0.01), ("nope", 1)):
        with pytest.raises(ConfigError) as info:
            parse_config({**base, "telemetry": {key: bad}})
        assert info.value.field == f"telemetry.{key}"


def test_a_taken_port_is_named_at_start(served):
    from agent.ops.prometheus import PrometheusEndpoint
    with pytest.raises(OSError) as info:
        PrometheusEndpoint(None, "127.0.0.1", served["port"])
    assert f"prometheus endpoint 127.0.0.1:{served['port']}" in str(info.value)
