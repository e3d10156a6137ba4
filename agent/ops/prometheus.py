"""The Prometheus endpoint: ``GET /metrics`` in the text format, Triton's names where Triton has one.

A dashboard or alert written against NVIDIA Triton (``nv_inference_request_success{model="x",
version="1"}`` and the rest, on Triton's port 8002) reads an edge-agent board unchanged: the
families below carry Triton's exact names, types, meanings and ``model``/``version`` labels. What
Triton has no name for is ours, prefixed ``edge_``: SLO attainment per SLO class, refusals by
reason, failures after acceptance by code, the batch size histogram, admission's learned slack and
slowdown.

Triton's counters have no ``_total`` suffix, and ``prometheus_client`` appends one to every counter
it writes in either format, so Triton's families are written here by hand (a few lines of the text
format: ``# HELP``, ``# TYPE name counter``, samples); ours go through ``prometheus_client`` (a
collector on a private registry, ``generate_latest``), with the library's ``_total`` names as
Prometheus's own conventions want. Both are computed at scrape time from one copy of the agent's
counters (:meth:`agent.telemetry.Telemetry.counters`): a scrape costs the request path nothing.

What differs from Triton, on purpose:

* A request is one item: the HTTP intake submits each row of a batch-N request as its own request
  (``agent.intake.oip``), so ``nv_inference_request_success`` counts items where Triton counts
  requests; ``nv_inference_count`` and ``nv_inference_exec_count`` mean what Triton's do (items in
  executed batches, and the batches), so their ratio is the mean batch size, as in Triton.
* Durations are summed over successful requests (Triton's too: it counts a failure's duration
  apart), so ``nv_inference_request_duration_us / nv_inference_request_success`` is the mean
  latency. ``nv_inference_compute_infer_duration_us`` is the batch's whole run on the backend
  (batch assembly included), added once per request of the batch as Triton does; there is no
  ``compute_input`` or ``compute_output`` split to report.
* ``nv_inference_request_failure`` has Triton's ``reason`` label (``REJECTED``, ``CANCELED``,
  ``BACKEND``, ``OTHER``): admission's ``rejected`` and ``deadline_missed`` (expired, shed or late:
  Triton's queue-policy rejections) are ``REJECTED``, ``internal`` is ``BACKEND``, the rest
  (malformed requests, shutting down) ``OTHER``. Our exact codes are in ``edge_refusals_total`` and
  ``edge_failures_total``.
"""
from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from agent import errors
from agent.intake.oip import MODEL_VERSION
from agent.telemetry import ModelStats

if TYPE_CHECKING:
    from agent.api import Agent

__all__ = ["PrometheusEndpoint", "metrics_text", "TRITON_FAILURE_REASONS", "CONTENT_TYPE", "TRITON_PORT"]

log = logging.getLogger(__name__)

#: Triton's metrics port (its ``--metrics-port`` default); ours is off unless configured.
TRITON_PORT = 8002
#: The classic text format, the one Triton serves and every Prometheus reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Triton's ``reason`` label of ``nv_inference_request_failure``, for each of our error codes.
TRITON_FAILURE_REASONS = {
    errors.REJECTED: "REJECTED", errors.DEADLINE_MISSED: "REJECTED", errors.INTERNAL: "BACKEND",
    errors.BAD_REQUEST: "OTHER", errors.UNKNOWN_MODEL: "OTHER", errors.INVALID_INPUT: "OTHER",
    errors.TOO_LARGE: "OTHER", errors.SHUTTING_DOWN: "OTHER",
}
_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")

#: (name, type, help, value of a model's counters): Triton's per-model families, in Triton's order.
_TRITON_FAMILIES = (
    ("nv_inference_request_success", "counter",
     "Number of successful inference requests, all batch sizes", lambda s: s.ok),
    ("nv_inference_count", "counter",
     "Number of inferences performed (does not include cached requests)", lambda s: s.inference_count),
    ("nv_inference_exec_count", "counter",
     "Number of model executions performed (does not include cached requests)", lambda s: s.exec_count),
    ("nv_inference_request_duration_us", "counter",
     "Cumulative inference request duration in microseconds (includes cached requests)", lambda s: s.request_us),
    ("nv_inference_queue_duration_us", "counter",
     "Cumulative inference queuing duration in microseconds (includes cached requests)", lambda s: s.queue_us),
    ("nv_inference_compute_infer_duration_us", "counter",
     "Cumulative compute inference duration in microseconds (does not include cached requests)",
     lambda s: s.compute_us),
)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


def _triton_text(models: dict[str, ModelStats], queued: dict[str, int]) -> str:
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: Iterable[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{{{labels}}} {_number(value)}" for labels, value in samples)

    def labels(model: str, **extra: str) -> str:
        pairs = {"model": model, **extra, "version": MODEL_VERSION}
        return ",".join(f'{key}="{_label(value)}"' for key, value in pairs.items())

    name, kind, help_text, value = _TRITON_FAMILIES[0]
    family(name, kind, help_text, ((labels(m), value(s)) for m, s in models.items()))
    failures = []
    for model, stats in models.items():
        by_reason = dict.fromkeys(_REASONS, 0)
        for code, n in stats.errors.items():
            by_reason[TRITON_FAILURE_REASONS.get(code, "OTHER")] += n
        failures.extend((labels(model, reason=reason), n) for reason, n in by_reason.items())
    family("nv_inference_request_failure", "counter", "Number of failed inference requests, all batch sizes", failures)
    for name, kind, help_text, value in _TRITON_FAMILIES[1:]:
        family(name, kind, help_text, ((labels(m), value(s)) for m, s in models.items()))
    family("nv_inference_pending_request_count", "gauge",
           "Instantaneous number of pending requests awaiting execution per-model.",
           ((labels(m), queued.get(m, 0)) for m in models))
    return "\n".join(lines) + "\n"


class _EdgeCollector:
    """Our families, for ``prometheus_client``: a collector over one scrape's figures."""

    def __init__(self) -> None:
        self.figures: dict | None = None

    def collect(self) -> Iterable[Metric]:
        figures = self.figures or {"models": {}, "max_batch": {}, "slack": {}, "slowdown": {}}
        models: dict[str, ModelStats] = figures["models"]
        version = MODEL_VERSION
        accepted = CounterMetricFamily("edge_requests_accepted", "Requests admitted to a model's queue",
                                       labels=["model", "version"])
        refusals = CounterMetricFamily("edge_refusals", "Requests refused at arrival, by reason (our error code): "
                                       "rejected is admission control's", labels=["model", "version", "reason"])
        failures = CounterMetricFamily("edge_failures", "Admitted requests answered with an error, by code",
                                       labels=["model", "version", "code"])
        slo_requests = CounterMetricFamily("edge_slo_requests", "Answered requests per SLO class (slo_ms: the "
                                           "class's SLO), refusals at admission included",
                                           labels=["model", "version", "slo_ms"])
        slo_met = CounterMetricFamily("edge_slo_met", "Requests answered ok, so within their deadline, per SLO class",
                                      labels=["model", "version", "slo_ms"])
        attainment = GaugeMetricFamily("edge_slo_attainment", "Share of a class's answered requests met since start "
                                       "(edge_slo_met / edge_slo_requests)", labels=["model", "version", "slo_ms"])
        batch_size = HistogramMetricFamily("edge_batch_size", "Requests per batch executed",
                                           labels=["model", "version"])
        slack = GaugeMetricFamily("edge_admission_slack_seconds", "Admission control's learned slack per SLO class "
                                  "(added to the predicted finish before admitting)",
                                  labels=["model", "version", "slo_ms"])
        slowdown = GaugeMetricFamily("edge_admission_slowdown", "Observed batch time over the profiled one, as "
                                     "admission control learned it", labels=["model", "version"])
        for model, stats in models.items():
            accepted.add_metric([model, version], stats.accepted)
            for code, n in sorted(stats.refusals.items()):
                refusals.add_metric([model, version, code], n)
            for code in sorted(stats.errors):
                after = stats.errors[code] - stats.refusals.get(code, 0)
                if after:
                    failures.add_metric([model, version, code], after)
            for cls in stats.classes.values():
                slo_requests.add_metric([model, version, cls.label], cls.requests)
                slo_met.add_metric([model, version, cls.label], cls.met)
                if cls.requests:
                    attainment.add_metric([model, version, cls.label], cls.attainment)
            bounds = _batch_bounds(figures["max_batch"].get(model, max(stats.batches, default=1)))
            cumulative, buckets = 0, []
            for bound in bounds:
                cumulative = sum(n for size, n in stats.batches.items() if size <= bound)
                buckets.append((floatToGoString(bound), cumulative))   # le="1.0", as the library writes it
            buckets.append(("+Inf", stats.exec_count))
            batch_size.add_metric([model, version], buckets, sum_value=stats.inference_count)
            labels_by_key = {key: cls.label for key, cls in stats.classes.items()}
            for key, seconds in sorted(figures["slack"].get(model, {}).items()):
                slack.add_metric([model, version, labels_by_key.get(key, f"{1000 * 2.0 ** (key / 16):.4g}")], seconds)
            if model in figures["slowdown"]:
                slowdown.add_metric([model, version], figures["slowdown"][model])
        return [accepted, refusals, failures, slo_requests, slo_met, attainment, batch_size, slack, slowdown]


def _batch_bounds(max_batch: int) -> list[int]:
    """The histogram's upper bounds: every size up to 16, then powers of two, and ``max_batch``."""
    bounds = {b for b in range(1, min(max_batch, 16) + 1)}
    b = 32
    while b < max_batch:
        bounds.add(b)
        b *= 2
    bounds.add(max_batch)
    return sorted(bounds)


def scrape_figures(agent: "Agent") -> dict:
    """One consistent copy of what a scrape reports: the counters, and the scheduler's gauges."""
    figures: dict = {"models": agent.telemetry.counters(), "queued": {}, "max_batch": {}, "slack": {}, "slowdown": {}}
    for name, loaded in agent.models.items():
        lane = agent.scheduler.lanes[name]
        figures["queued"][name] = len(lane.queue)
        figures["max_batch"][name] = loaded.rule.max_batch
        if lane.admission is not None:
            figures["slack"][name] = lane.admission.slack_by_class()
            figures["slowdown"][name] = lane.admission.slowdown
    return figures


def metrics_text(agent: "Agent") -> bytes:
    """The whole ``/metrics`` body: Triton's families, then ours."""
    figures = scrape_figures(agent)
    collector = _EdgeCollector()
    collector.figures = figures
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return _triton_text(figures["models"], figures["queued"]).encode() + generate_latest(registry)


class PrometheusEndpoint:
    """``GET /metrics`` on ``host:port`` (``port`` 0: any free one, :attr:`port` says which), served
    by a thread per scrape; anything else is 404. Started by the service when ``[telemetry]
    prometheus_port`` is set."""

    def __init__(self, agent: "Agent", host: str = "127.0.0.1", port: int = TRITON_PORT) -> None:
        self.agent = agent
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path.split("?", 1)[0] != "/metrics":
                    self._send(404, b"not found: the metrics are at GET /metrics\n", "text/plain; charset=utf-8")
                    return
                try:
                    body = metrics_text(endpoint.agent)
                except Exception:
                    log.exception("could not compute the metrics for a scrape")
                    self._send(500, b"internal: see the agent's log\n", "text/plain; charset=utf-8")
                    return
                self._send(200, body, CONTENT_TYPE)

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args) -> None:  # scrapes every few seconds: not worth a line
                log.debug("scrape from %s: " + format, self.address_string(), *args)

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:   # say which endpoint: the HTTP intake may be listening too
            raise OSError(exc.errno, f"[telemetry] prometheus endpoint {host}:{port}: {exc.strerror}") from exc
        self._server.daemon_threads = True
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="edge-agent-prometheus", daemon=True)

    def start(self) -> "PrometheusEndpoint":
        self._thread.start()
        log.info("Prometheus metrics on http://%s:%d/metrics", self.host, self.port)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
