"""An agent with its transport and intakes, started and stopped in the order that loses no reply.

Start: models load (and are profiled) before any intake subscribes or listens; the MQTT intake
registers its topics on the agent's one MQTT connection (:mod:`agent.transport`) before that
connects, so the retained ``online`` status never precedes the subscription. Stop: intakes stop
taking requests (MQTT unsubscribes; HTTP answers new requests 503), the agent serves or answers
everything it accepted, then the connections close (MQTT with the ``offline`` status, HTTP after
writing the last replies) so the last replies still reach their clients.

Between the two, the heap built at start-up (models, runtimes, numpy, the intakes' tables: tens of
thousands of objects that live as long as the process) is moved out of the cyclic garbage
collector's reach (``gc.freeze``). A full collection otherwise walks all of them and stops every
Python thread, the intakes' event loop and the workers' hand-offs included, for many times longer
than with the heap frozen (BENCHMARKS.md, "Side by side with a real Triton", sixth session).
"""
from __future__ import annotations

import gc
import logging
from typing import Callable

from agent.api import Agent
from agent.config import Config
from agent.intake.http import HttpIntake
from agent.transport.connection import MqttTransport
from agent.transport.subscribers import Subscriber, build_subscriber

log = logging.getLogger(__name__)


class Service:
    def __init__(self, config: Config, *, grace_s: float = 1.0,
                 config_source: Callable[[], Config] | None = None) -> None:
        self.config = config
        self.agent = Agent(config, grace_s=grace_s, config_source=config_source)
        gc.collect()
        gc.freeze()
        self.transport: MqttTransport | None = None
        self.subscribers: dict[str, Subscriber] = {}     # [mqtt] subscribers, by name
        self.http: HttpIntake | None = None
        try:
            if config.http.enabled:
                self.http = HttpIntake(self.agent, config.http.host, config.http.port).start()
                self.agent.models_changed.append(self._refresh_http_models)
            if config.mqtt.enabled:
                self.transport = MqttTransport(config.device, config.mqtt.host, config.mqtt.port,
                                               status=self.agent.status, keepalive_s=config.mqtt.keepalive_s)
                for name in config.mqtt.subscribers:
                    self.subscribers[name] = build_subscriber(name, self.agent, self.transport).start()
                self.transport.connect()
        except Exception:
            self.close()
            raise

    def _refresh_http_models(self) -> None:
        """A model loaded, unloaded or re-batched while serving (agent.ops.commands): the HTTP
        intake's per-model views (metadata, config, readiness) follow. The intake builds them once at
        start; its dict is replaced whole, so its event loop reads the old one or the new one."""
        from agent.intake.http import _ModelView
        http = self.http
        if http is not None:
            http._models = {name: _ModelView(name, loaded) for name, loaded in self.agent.models.items()}

    @property
    def mqtt(self):
        """The MQTT inference intake (``agent.intake.mqtt.MqttIntake``), if it runs."""
        return self.subscribers.get("infer")

    def close(self) -> None:
        for intake in (*self.subscribers.values(), self.http):
            if intake is not None:
                intake.stop_taking()
        self.agent.close()
        if self.transport is not None:
            self.transport.stop()
        if self.http is not None:
            self.http.stop()

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
