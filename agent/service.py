"""An agent with its intakes, started and stopped in the order that loses no reply.

Start: models load (and are profiled) before any intake subscribes. Stop: intakes stop taking
requests, the agent serves or answers everything it accepted, then the intakes disconnect (with
the ``offline`` status) so the last replies still reach their clients.
"""
from __future__ import annotations

import logging

from agent.api import Agent
from agent.config import Config
from agent.intake.mqtt import MqttIntake

log = logging.getLogger(__name__)


class Service:
    def __init__(self, config: Config, *, grace_s: float = 1.0) -> None:
        self.config = config
        self.agent = Agent(config, grace_s=grace_s)
        self.mqtt: MqttIntake | None = None
        try:
            if config.mqtt.enabled:
                self.mqtt = MqttIntake(self.agent, config.mqtt.host, config.mqtt.port).start()
        except Exception:
            self.agent.close()
            raise

    def close(self) -> None:
        if self.mqtt is not None:
            self.mqtt.stop_taking()
        self.agent.close()
        if self.mqtt is not None:
            self.mqtt.stop()

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
