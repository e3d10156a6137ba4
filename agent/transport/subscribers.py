"""The handlers of the agent's MQTT topics, one subscriber each, chosen by ``[mqtt] subscribers``.

The transport (:mod:`agent.transport.connection`) owns the one connection; each subscriber registers
its topic filters with it and handles what arrives there: the inference intake today, offload from
peers, signed control commands and the pool topic as they come. A subscriber is a class built as
``Class(agent, transport)`` with ``start() -> self`` (register its filters) and ``stop_taking()``
(take no new messages while the agent drains; replies still go out). A new topic handler is a module
of its own, its name in :data:`SUBSCRIBERS`, and that name in a config's ``[mqtt] subscribers``.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from agent.api import Agent
    from agent.transport.connection import MqttTransport

#: name in the config -> ``module:Class``, imported only when a config names it.
SUBSCRIBERS: dict[str, str] = {
    "infer": "agent.intake.mqtt:MqttIntake",     # edge/v1/<device>/infer/+
    "cmd": "agent.ops.commands:CommandChannel",  # edge/v1/<device>/cmd/+ and edge/v1/fleet/cmd/+ (signed)
    "offload": "agent.offload.peer:PeerHandler",  # edge/v1/<device>/offload/+ (the peer role; [offload] serve)
}
#: What an agent subscribes to when its config says nothing.
DEFAULT_SUBSCRIBERS: tuple[str, ...] = ("infer",)


class Subscriber(Protocol):
    def start(self) -> "Subscriber":
        """Register this subscriber's topic filters with the transport."""

    def stop_taking(self) -> None:
        """Take no new messages (the agent is draining); replies still go out."""


def build_subscriber(name: str, agent: "Agent", transport: "MqttTransport") -> Subscriber:
    """The subscriber ``name`` of :data:`SUBSCRIBERS`, for ``agent`` on ``transport`` (not started)."""
    if name not in SUBSCRIBERS:
        raise ValueError(f"subscriber {name!r}: expected one of {sorted(SUBSCRIBERS)}")
    module, _, cls = SUBSCRIBERS[name].partition(":")
    return getattr(importlib.import_module(module), cls)(agent, transport)
