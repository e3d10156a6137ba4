"""The command channel: signed control commands on ``edge/v1/<device>/cmd/+`` and ``edge/v1/fleet/cmd/+``.

A subscriber of the agent's transport (``"cmd"`` in ``[mqtt] subscribers``, keys in
``[control] keyring``). Each command message is answered exactly once, on its MQTT v5 response
topic with its correlation data, with an acknowledgement (:func:`agent.ops.signing.make_ack`):
``{command_id, ok, code, reason, result}``, and ``device``, the board's id (a fleet command gets an
ack from each board). A message without a response topic one can publish to
cannot be answered: it is counted and logged, and not run (as the inference intake does).

Threads: the handler runs on paho's network thread, which must never block, so it only reads the
properties and hands the message to one command worker (a bounded queue; when it is full the
message is refused ``busy`` at once, from the network thread, since publishing does not block).
The worker verifies (:class:`agent.ops.signing.Verifier`: signature, device, time, replay), runs
the command, records its ack (a repeat of its command id gets that ack again, not a second run)
and publishes it. One worker: commands run one at a time, in arrival order, so no two commands
interleave their changes to the agent and a repeat always finds its first's ack recorded.

Commands here: ``status`` (the board's status and counters), ``drain`` (new requests are refused
``shutting_down``; what was accepted is served; the ack comes when nothing is queued or running,
or after ``timeout_s``), ``resume`` (take requests again). Each changes the agent while it serves:
no accepted request is lost or answered twice (the drain flag only decides, at acceptance, whether
a new request is taken). After drain and resume the retained status is published again.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from typing import Any, Callable

from paho.mqtt.client import MQTTMessage
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.api import Agent
from agent.ops.keys import Keyring
from agent.ops.signing import Verifier, encode_ack, make_ack
from agent.transport.connection import MqttTransport
from agent.transport.topics import cmd_topic, fleet_cmd_topic, publish_topic_problem

__all__ = ["CommandChannel", "CommandArgsError"]

log = logging.getLogger(__name__)

#: Command messages waiting for the worker; more are refused ``busy`` (never queued without bound).
QUEUE_CAPACITY = 256
#: An unanswerable command is logged at most once per this many seconds.
UNANSWERABLE_LOG_INTERVAL_S = 10.0
#: ``drain``'s wait for the board to empty, when its args give no ``timeout_s``, and the most they may.
DRAIN_TIMEOUT_S = 10.0
MAX_DRAIN_TIMEOUT_S = 120.0


class CommandArgsError(ValueError):
    """A command's args are wrong: answered ``bad_args`` with this message."""


class CommandChannel:
    """Takes signed commands from the agent's transport, runs them, and answers each once."""

    def __init__(self, agent: Agent, transport: MqttTransport, *, verifier: Verifier | None = None) -> None:
        self.agent = agent
        self.transport = transport
        self.device = agent.config.device
        control = agent.config.control
        if verifier is None:
            if control.keyring is None:
                raise ValueError("the command channel needs [control] keyring: a directory of trusted public keys")
            verifier = Verifier(self.device, Keyring.from_dir(control.keyring), max_ttl_s=control.max_ttl_s,
                                clock_skew_s=control.clock_skew_s)
        self.verifier = verifier
        self.topic_filters = (cmd_topic(self.device), fleet_cmd_topic())
        self.handlers: dict[str, Callable[[dict], Any]] = {
            "status": self._status, "drain": self._drain, "resume": self._resume,
        }
        self.answered = 0
        self.unanswerable = 0
        self._lock = threading.Lock()
        self._logged_at = -math.inf
        self._queue: queue.Queue = queue.Queue(QUEUE_CAPACITY)
        self._worker = threading.Thread(target=self._run, name="edge-agent-commands", daemon=True)

    def start(self, timeout: float = 10.0) -> "CommandChannel":
        self._worker.start()
        for topic_filter in self.topic_filters:
            self.transport.subscribe(topic_filter, self._on_message, qos=1, timeout=timeout)
        log.info("taking signed commands on %s (%d trusted keys)", " and ".join(self.topic_filters),
                 len(self.verifier.keyring.keys))
        return self

    def stop_taking(self, timeout: float = 15.0) -> None:
        """Unsubscribe, then answer the commands already queued (their acks go out before the
        transport stops) and end the worker."""
        for topic_filter in self.topic_filters:
            self.transport.unsubscribe(topic_filter)
        if self._worker.is_alive():
            self._queue.put(None)
            self._worker.join(timeout)

    # --- network thread: hand over, return ---------------------------------------------------------

    def _on_message(self, message: MQTTMessage) -> None:
        props = message.properties
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        problem = publish_topic_problem(response_topic) if response_topic else "no response topic"
        if problem is not None:
            self._unanswerable(message.topic, problem)
            return
        try:
            self._queue.put_nowait((message.topic, message.payload, response_topic, correlation))
        except queue.Full:
            self._publish(response_topic, correlation, make_ack(
                None, False, "busy", f"{QUEUE_CAPACITY} commands are waiting already: send it again later"))

    # --- the command worker ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            topic, payload, response_topic, correlation = item
            try:
                ack = self._handle(topic, payload)
            except Exception as exc:   # never let one command end the worker
                log.exception("command on %s failed unexpectedly", topic)
                ack = make_ack(None, False, "failed", f"{type(exc).__name__}: {exc}")
            self._publish(response_topic, correlation, ack)

    def _handle(self, topic: str, payload: bytes) -> dict:
        verdict = self.verifier.verify(payload, expect_command=topic.rsplit("/", 1)[-1])
        if verdict.repeat:
            return verdict.first_ack
        if not verdict.accepted:
            return verdict.refusal_ack()
        command = verdict.command
        handler = self.handlers.get(command.command)
        if handler is None:
            ack = make_ack(command.command_id, False, "unknown_command",
                           f"this board runs {sorted(self.handlers)}; not {command.command!r}")
        else:
            started = time.perf_counter()
            try:
                result = handler(command.args)
                ack = make_ack(command.command_id, True, "ok", f"{command.command} done", result)
            except CommandArgsError as exc:
                ack = make_ack(command.command_id, False, "bad_args", str(exc))
            except Exception as exc:
                log.exception("command %s (%s) failed", command.command, command.command_id)
                ack = make_ack(command.command_id, False, "failed", f"{type(exc).__name__}: {exc}")
            log.info("command %s (id %s, key %s): %s in %.1f ms", command.command, command.command_id,
                     command.key_id, ack["code"], 1000 * (time.perf_counter() - started))
        self.verifier.record(command.command_id, ack)
        return ack

    def _publish(self, response_topic: str, correlation: bytes | None, ack: dict) -> None:
        props = Properties(PacketTypes.PUBLISH)
        try:
            if correlation is not None:
                props.CorrelationData = correlation
            self.transport.publish(response_topic, encode_ack(dict(ack, device=self.device)), qos=1, properties=props)
            with self._lock:
                self.answered += 1
        except Exception as exc:
            self._unanswerable(response_topic, f"ack not published: {type(exc).__name__}: {exc}")

    def _unanswerable(self, where: str, why: str) -> None:
        now = time.monotonic()
        with self._lock:
            self.unanswerable += 1
            if now - self._logged_at < UNANSWERABLE_LOG_INTERVAL_S:
                return
            self._logged_at = now
            total = self.unanswerable
        log.warning("command on %s not answered: %s (%d unanswerable so far)", where, why, total)

    # --- the commands --------------------------------------------------------------------------------

    def _status(self, args: dict) -> dict:
        _no_args(args, set())
        status = self.agent.status()
        queued, running = self.agent.pending()
        status.update(draining=self.agent.draining, queued=queued, running=running,
                      telemetry=self.agent.telemetry.snapshot(),
                      commands={"answered": self.answered, "unanswerable": self.unanswerable,
                                "refusals": dict(self.verifier.refusals),
                                "remembered": len(self.verifier.store)})
        return status

    def _drain(self, args: dict) -> dict:
        _no_args(args, {"timeout_s"})
        timeout_s = args.get("timeout_s", DRAIN_TIMEOUT_S)
        if (not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool)
                or not 0 <= timeout_s <= MAX_DRAIN_TIMEOUT_S):
            raise CommandArgsError(f"timeout_s = {timeout_s!r}: expected seconds in 0..{MAX_DRAIN_TIMEOUT_S:g}")
        self.agent.draining = True
        self._publish_status()
        queued_at_drain, running_at_drain = self.agent.pending()
        deadline = time.monotonic() + timeout_s
        queued, running = queued_at_drain, running_at_drain
        while (queued or running) and time.monotonic() < deadline:
            time.sleep(0.01)
            queued, running = self.agent.pending()
        return {"draining": True, "queued_at_drain": queued_at_drain, "running_at_drain": running_at_drain,
                "queued": queued, "running": running, "empty": not (queued or running)}

    def _resume(self, args: dict) -> dict:
        _no_args(args, set())
        was = self.agent.draining
        self.agent.draining = False
        self._publish_status()
        return {"draining": False, "was_draining": was}

    def _publish_status(self) -> None:
        try:
            self.transport.publish_status(self.agent.status())
        except Exception:
            log.exception("could not publish the status after a command")


def _no_args(args: dict, allowed: set[str]) -> None:
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise CommandArgsError(f"unknown args {unknown}; this command takes {sorted(allowed) or 'none'}")
