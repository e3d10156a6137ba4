"""Periodic telemetry on ``edge/v1/<device>/telemetry``: the board's counters pushed to its fleet.

A board behind NAT or on a cellular link cannot be scraped; its MQTT connection is the one way out.
So every ``[telemetry] interval_s`` the agent publishes one JSON object on its telemetry topic, on
the connection it already has (:class:`agent.transport.connection.MqttTransport`): the same
counters the Prometheus endpoint reports (:mod:`agent.ops.prometheus`), cumulative since start (a
reader takes differences between two samples), with the recent latency percentiles and the
scheduler's gauges.

QoS 1, not retained, and skipped while the connection is down: a sample the broker accepted reaches
a subscriber that lags (at QoS 0 the broker drops what overflows a client's queue, silently), and
none piles up in paho's queue during an outage to take the places the replies need (the samples are
cumulative: a skipped one loses nothing but its timestamp). The retained status
(``edge/v1/<device>/status``) is what a late subscriber reads first.

The payload (``TELEMETRY_VERSION`` 1)::

    {"v": 1, "device": "...", "ts": <unix s>, "uptime_s": ..., "interval_s": ..., "state": "online",
     "models": {"<model>": {"accepted", "ok", "errors": {code: n}, "refusals": {code: n},
                            "slo_attainment", "p50_ms", "p99_ms", "mean_batch",
                            "inference_count", "exec_count", "request_us", "queue_us", "compute_us",
                            "batches": {size: n}, "classes": {slo_ms: {"requests", "met", "attainment"}},
                            "queued", "slack_ms": {slo_ms: ms}, "slowdown"}}}
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import TYPE_CHECKING

from agent.transport.topics import telemetry_topic

if TYPE_CHECKING:
    from agent.api import Agent
    from agent.transport.connection import MqttTransport

__all__ = ["TelemetryPublisher", "telemetry_payload", "TELEMETRY_VERSION"]

log = logging.getLogger(__name__)

TELEMETRY_VERSION = 1


def telemetry_payload(agent: "Agent", *, started: float, interval_s: float) -> dict:
    """One sample of the board's telemetry (the module docstring's fields)."""
    models = agent.telemetry.snapshot()
    for name, figures in models.items():
        lane = agent.scheduler.lanes[name]
        figures["queued"] = len(lane.queue)
        if lane.admission is not None:
            label_of = agent.telemetry.class_labels(name)
            figures["slack_ms"] = {label_of.get(key, f"{1000 * 2.0 ** (key / 16):.4g}"): 1000 * seconds
                                   for key, seconds in sorted(lane.admission.slack_by_class().items())}
            figures["slowdown"] = lane.admission.slowdown
    status = "draining" if agent.draining else "online"
    return {"v": TELEMETRY_VERSION, "device": agent.config.device, "ts": time.time(),
            "uptime_s": time.monotonic() - started, "interval_s": interval_s, "state": status, "models": models}


class TelemetryPublisher:
    """A thread that publishes :func:`telemetry_payload` every ``interval_s`` seconds on the
    transport's connection until :meth:`stop`. A sample that cannot be computed or published is
    logged and the next one is tried as usual: no single failure ends the thread."""

    def __init__(self, agent: "Agent", transport: "MqttTransport", interval_s: float) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s = {interval_s!r}: expected seconds > 0")
        self.agent = agent
        self.transport = transport
        self.interval_s = interval_s
        self.topic = telemetry_topic(agent.config.device)
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edge-agent-telemetry", daemon=True)

    def start(self) -> "TelemetryPublisher":
        self._thread.start()
        return self

    def publish_once(self) -> bool:
        """Publish one sample; False (nothing sent) while the connection is down."""
        if not self.transport.connected:
            return False
        payload = telemetry_payload(self.agent, started=self._started, interval_s=self.interval_s)
        self.transport.publish(self.topic, json.dumps(payload).encode(), qos=1)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.publish_once()
            except Exception:
                log.exception("could not publish the telemetry on %s", self.topic)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
