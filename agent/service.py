"""An agent with its transport and intakes, started and stopped in the order that loses no reply.

Start: models load (and are profiled) before any intake subscribes or listens (the Prometheus
endpoint, which only reads counters, listens first); the MQTT intake
registers its topics on the agent's one MQTT connection (:mod:`agent.transport`) before that
connects, so the retained ``online`` status never precedes the subscription. Stop: intakes stop
taking requests (MQTT unsubscribes; HTTP answers new requests 503), the agent serves or answers
everything it accepted, then the connections close (MQTT with the ``offline`` status, HTTP after
writing the last replies) so the last replies still reach their clients. With a persistent MQTT
session the intake holds its topic instead of unsubscribing, so requests that arrive while the
agent is away wait in the broker for its next run.

Readiness (:meth:`Service.ready`, and HTTP's ``/v2/health/ready``) includes the MQTT connection:
down, or its network thread dead, or its client id taken over, and the agent is not ready.

Between the two, the heap built at start-up (models, runtimes, numpy, the intakes' tables: tens of
thousands of objects that live as long as the process) is moved out of the cyclic garbage
collector's reach (``gc.freeze``). A full collection otherwise walks all of them and stops every
Python thread, the intakes' event loop and the workers' hand-offs included, for many times longer
than with the heap frozen (BENCHMARKS.md, "Side by side with a real Triton", sixth session).

Before the models load, glibc's mmap threshold is fixed (:mod:`agent.ops.allocator`), so a big
request buffer never stays in a thread's heap once freed.

A degraded start (``mqtt_retry=True``, what ``edge-agent run`` asks): when the broker cannot be
reached but HTTP serves, the agent serves HTTP and the MQTT connection keeps trying in the
background (paho's reconnect loop; on connecting it subscribes and publishes the status as on any
reconnect). :meth:`Service.missing` says what is not serving, for the operator (systemd's
``STATUS=``). With MQTT the only intake there is nothing to serve, and the start fails as before.
"""
from __future__ import annotations

import gc
import logging
from typing import Callable

from agent.api import Agent
from agent.config import Config
from agent.intake.http import HttpIntake
from agent.ops.allocator import pin_mmap_threshold
from agent.ops.prometheus import PrometheusEndpoint
from agent.ops.telemetry_publisher import TelemetryPublisher
from agent.transport.connection import MqttTransport
from agent.transport.subscribers import Subscriber, build_subscriber

log = logging.getLogger(__name__)


class Service:
    def __init__(self, config: Config, *, grace_s: float | None = None, mqtt_retry: bool = False,
                 config_source: Callable[[], Config] | None = None) -> None:
        """``grace_s``: how long stopping serves what is queued (default: the config's
        ``[agent] drain_timeout_s``). ``mqtt_retry``: a broker that cannot be reached while HTTP
        serves makes a degraded start (module docstring) instead of an error. ``config_source``
        re-reads the config (``reload-config``)."""
        self.config = config
        pin_mmap_threshold()
        self.agent = Agent(config, grace_s=config.drain_timeout_s if grace_s is None else grace_s,
                           config_source=config_source)
        gc.collect()
        gc.freeze()
        self.transport: MqttTransport | None = None
        self.pool_transport: MqttTransport | None = None     # [mqtt] pools
        self.subscribers: dict[str, Subscriber] = {}     # [mqtt] subscribers, by name
        self.http: HttpIntake | None = None
        self.prometheus: PrometheusEndpoint | None = None
        self.telemetry_publisher: TelemetryPublisher | None = None
        try:
            if config.telemetry.prometheus_port:
                self.prometheus = PrometheusEndpoint(self.agent, config.telemetry.prometheus_host,
                                                     config.telemetry.prometheus_port).start()
            if config.http.enabled:
                self.http = HttpIntake(self.agent, config.http.host, config.http.port).start()
                self.agent.models_changed.append(self._refresh_http_models)
            if config.mqtt.enabled:
                mqtt = config.mqtt
                self.transport = MqttTransport(config.device, mqtt.host, mqtt.port, status=self.agent.status,
                                               keepalive_s=mqtt.keepalive_s, session_expiry_s=mqtt.session_expiry_s,
                                               max_inflight_messages=mqtt.max_inflight_messages,
                                               max_queued_messages=mqtt.max_queued_messages,
                                               reconnect_max_delay_s=mqtt.reconnect_max_delay_s,
                                               security=mqtt.security())
                if mqtt.tls_insecure:
                    log.warning("[mqtt] tls_insecure = true: the broker's certificate is not checked against "
                                "its host name %s (the chain still is): for a lab only", mqtt.host)
                for name in config.mqtt.subscribers:
                    self.subscribers[name] = build_subscriber(name, self.agent, self.transport).start()
                if self.agent.offload is not None:      # the board's side of offload: replies, peers
                    self.agent.offload.attach(self.transport)
                if mqtt.pools and self.mqtt is not None:
                    # [mqtt] pools: a connection of their own, clean session, no will (MqttIntake.attach_pools)
                    self.pool_transport = MqttTransport(config.device, mqtt.host, mqtt.port,
                                                        client_id=f"edge-agent-{config.device}-pool",
                                                        keepalive_s=mqtt.keepalive_s, session_expiry_s=0,
                                                        max_inflight_messages=mqtt.max_inflight_messages,
                                                        max_queued_messages=mqtt.max_queued_messages,
                                                        reconnect_max_delay_s=mqtt.reconnect_max_delay_s,
                                                        security=mqtt.security(), will=False)
                    self.mqtt.attach_pools(self.pool_transport)
                try:
                    self.transport.connect()
                except (ConnectionError, TimeoutError) as exc:
                    # Only a broker not reached: one that refused the subscriptions is an error.
                    if not (mqtt_retry and self.http is not None) or self.transport.connected:
                        raise
                    log.warning("serving HTTP only until the broker answers: %s", exc)
                    self.transport.connect_in_background()
                if self.pool_transport is not None:
                    if self.transport.connected:
                        self.pool_transport.connect()
                    else:
                        self.pool_transport.connect_in_background()
                if config.telemetry.interval_s > 0:
                    self.telemetry_publisher = TelemetryPublisher(self.agent, self.transport,
                                                                  config.telemetry.interval_s).start()
            if self.http is not None and self.transport is not None:
                self.http.also_ready = self.transport.healthy     # /v2/health/ready: MQTT up too
        except Exception:
            self.close()
            raise

    def missing(self) -> list[str]:
        """What is configured but not serving now (empty when all is well): the MQTT broker not
        connected (at a degraded start, or lost since; paho keeps reconnecting)."""
        if self.transport is not None and not self.transport.connected:
            return [f"mqtt broker {self.transport.host}:{self.transport.port} unreachable, retrying"]
        if self.pool_transport is not None and not self.pool_transport.connected:
            return [f"mqtt pool connection to {self.pool_transport.host}:{self.pool_transport.port} down, retrying"]
        return []

    def _refresh_http_models(self) -> None:
        """A model loaded, unloaded or re-batched while serving (agent.ops.commands): the HTTP
        intake's per-model views follow."""
        if self.http is not None:
            self.http.refresh_models()

    @property
    def mqtt(self):
        """The MQTT inference intake (``agent.intake.mqtt.MqttIntake``), if it runs."""
        return self.subscribers.get("infer")

    def ready(self) -> bool:
        """The agent takes requests on every intake it runs: HTTP listening and taking, MQTT
        connected with its network thread alive and no takeover of its client id going on."""
        if self.http is not None and not self.http.taking:
            return False
        return ((self.transport is None or self.transport.healthy())
                and (self.pool_transport is None or self.pool_transport.healthy()))

    def close(self) -> None:
        if self.telemetry_publisher is not None:
            self.telemetry_publisher.stop()
        for intake in (*self.subscribers.values(), self.http):
            if intake is not None:
                intake.stop_taking()
        self.agent.close()
        if self.pool_transport is not None:
            self.pool_transport.stop()
        if self.transport is not None:
            self.transport.stop()
        if self.http is not None:
            self.http.stop()
        if self.prometheus is not None:     # last: a scrape during the drain still reads the counters
            self.prometheus.stop()

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
