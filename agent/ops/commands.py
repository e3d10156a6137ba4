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
or after ``timeout_s``), ``resume`` (take requests again), and the model and key changes:
``load-model`` (args: one ``[[models]]`` table, validated as a config file's), ``unload-model``,
``set-batching``, ``set-slo-default``, ``set-policy`` (args: ``policy``, the learned one's
``policy_path``: the card is checked first, a refused one leaves the old policy deciding),
``set-offload`` (args: keys of ``[offload]``, the plan's: ``peer``, ``split``, ``share``,
``models``, ``planner``, ``margin_ms``; checked as the config file's table, and what only a
restart changes, a peer or split not loaded at start among them, refused ``needs_restart``),
``reload-config`` (the config file again: its models' changes
applied through the same operations, all or nothing; what only a restart changes refused
``needs_restart``), ``selftest`` (:func:`agent.ops.selftest.run_selftest`, its report in the ack)
and ``rotate-key`` (trust a new operator key, revoke old ones, on disk). Each changes the agent
while it serves: no accepted request is lost or answered twice (each change is made under the
live loop's lock, between two scheduler decisions: ``agent.api.Agent.add_model`` and its
neighbours). After each change the retained status is published again.

A slow command (a model loaded and profiled, a queue served before its model is unloaded, a
self-test) holds the one worker: later commands wait behind it, in order, and are answered after.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

from paho.mqtt.client import MQTTMessage
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.api import Agent
from agent.config import Config, ConfigError, offload_table, parse_batching, parse_model_entry, parse_offload
from agent.ops.keys import Keyring, KeyFileError, fingerprint, install_key, parse_public_key
from agent.ops.signing import Verifier, encode_ack, make_ack
from agent.transport.connection import MqttTransport
from agent.transport.paho_client import reply_address
from agent.transport.topics import cmd_topic, fleet_cmd_topic, publish_topic_problem

__all__ = ["CommandChannel", "CommandArgsError", "CommandFailed", "SELFTEST_DEFAULT_GROUPS"]

log = logging.getLogger(__name__)

#: Command messages waiting for the worker; more are refused ``busy`` (never queued without bound).
QUEUE_CAPACITY = 256
#: An unanswerable command is logged at most once per this many seconds.
UNANSWERABLE_LOG_INTERVAL_S = 10.0
#: ``drain``'s wait for the board to empty, when its args give no ``timeout_s``, and the most they may.
DRAIN_TIMEOUT_S = 10.0
MAX_DRAIN_TIMEOUT_S = 120.0
#: The self-test's groups a ``selftest`` command runs unless its args name others: all but
#: ``models``, which loads every model a second time and runs it dozens of times on the cores that
#: serve (requests slow down meanwhile, and its drift figures would measure that contention).
SELFTEST_DEFAULT_GROUPS = ("core", "files", "accelerators", "broker", "headroom")
#: What ``reload-config`` may change while serving, per model: the rest of a model's table (its
#: card, file, backend, instances, threads, queue) means unload-model and load-model, or a restart.
LIVE_MODEL_FIELDS = ("batching", "default_slo_ms")


class CommandFailed(Exception):
    """A command that could not be carried out: answered with ``code`` and ``reason`` (and
    ``result``, what the operator needs to act on it)."""

    def __init__(self, code: str, reason: str, result: Any = None) -> None:
        super().__init__(reason)
        self.code, self.reason, self.result = code, reason, result


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
            "load-model": self._load_model, "unload-model": self._unload_model,
            "set-batching": self._set_batching, "set-slo-default": self._set_slo_default,
            "set-policy": self._set_policy, "set-offload": self._set_offload,
            "selftest": self._selftest, "reload-config": self._reload_config, "rotate-key": self._rotate_key,
        }
        self.answered = 0
        self.unanswerable = 0
        self._current = None      # the command the worker runs (for log lines and notes)
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
        response_topic, correlation = reply_address(message)
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
            self._current = command
            try:
                result = handler(command.args)
                ack = make_ack(command.command_id, True, "ok", f"{command.command} done", result)
            except CommandArgsError as exc:
                ack = make_ack(command.command_id, False, "bad_args", str(exc))
            except CommandFailed as exc:
                ack = make_ack(command.command_id, False, exc.code, exc.reason, exc.result)
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


    # --- models: load, unload, batching, SLO ------------------------------------------------------

    def _load_model(self, args: dict) -> dict:
        try:
            config = parse_model_entry(args, "args")
        except ConfigError as exc:
            raise CommandArgsError(_args_error(exc)) from None
        if not (config.card.startswith("demo:") or Path(config.card).is_absolute()):
            raise CommandArgsError(f"card = {config.card!r}: expected an absolute path on the board, or demo:NAME")
        if config.name in self.agent.models:
            raise CommandFailed("model_loaded", f"model {config.name!r} is loaded already: unload-model it first, "
                                                f"or change its batching with set-batching")
        started = time.perf_counter()
        try:
            loaded = self.agent.add_model(config)
        except ValueError as exc:
            raise CommandFailed("load_failed", f"model {config.name!r}: {exc}") from None
        except Exception as exc:
            raise CommandFailed("load_failed", f"model {config.name!r}: {type(exc).__name__}: {exc}") from None
        self._publish_status()
        return {"model": config.name, "backend": config.backend, "file": config.file, "instances": config.instances,
                "batching": {"rule": config.batching.rule, **loaded.rule.describe()}, "default_slo_ms": config.default_slo_ms,
                "latency_ms": dict(zip(loaded.latency.batch_sizes.tolist(),
                                       (1000 * loaded.latency.latencies_s).round(3).tolist())),
                "load_s": round(time.perf_counter() - started, 3)}

    def _unload_model(self, args: dict) -> dict:
        _no_args(args, {"model", "timeout_s"})
        name = self._model_arg(args)
        timeout_s = _seconds_arg(args, "timeout_s", DRAIN_TIMEOUT_S)
        result = self.agent.remove_model(name, timeout_s)
        self._publish_status()
        return {"model": name, **result}

    def _set_batching(self, args: dict) -> dict:
        name = self._model_arg(args)
        table = {k: v for k, v in args.items() if k != "model"}
        if not table:
            raise CommandArgsError("no batching settings: give rule, max_batch, max_wait_ms, ... (as in a "
                                   "config's [models.batching] table)")
        current = self.agent.models[name].config.batching
        if "rule" not in table:     # change these keys of the current table
            merged = dataclasses.asdict(current)
            merged["preferred_sizes"] = list(merged["preferred_sizes"])
            if "size" not in table and isinstance(table.get("max_batch"), int):
                merged["size"] = max(1, min(merged["size"], table["max_batch"]))
            table = {**merged, **table}
        try:
            batching = parse_batching(table, "args")
        except ConfigError as exc:
            raise CommandArgsError(_args_error(exc)) from None
        try:
            result = self.agent.set_batching(name, batching)
        except ValueError as exc:
            raise CommandFailed("cannot_apply_live", str(exc)) from None
        self._publish_status()
        return result

    def _set_policy(self, args: dict) -> dict:
        _no_args(args, {"policy", "policy_path"})
        policy, path = args.get("policy"), args.get("policy_path")
        if not isinstance(policy, str) or not policy:
            raise CommandArgsError(f"policy = {policy!r}: expected a policy's name (rules, learned, ...)")
        if path is not None and (not isinstance(path, str) or not path):
            raise CommandArgsError(f"policy_path = {path!r}: expected a policy directory on the board")
        try:
            result = self.agent.set_policy(policy, path)
        except ValueError as exc:
            raise CommandFailed("cannot_apply_live", str(exc)) from None
        self._publish_status()
        return result

    def _set_offload(self, args: dict) -> dict:
        if not args:
            raise CommandArgsError(f"no offload settings: give some of {list(Agent.LIVE_OFFLOAD_FIELDS)} (keys of a "
                                   f"config's [offload] table)")
        table = offload_table(self.agent.config.offload)
        for key, value in args.items():
            if value is None and key in ("peer", "models"):       # nil: no peer, every model
                table.pop(key, None)
            else:
                table[key] = "none" if value is None and key == "split" else value
        try:
            offload = parse_offload(table, self.agent.config.models, "args")
        except ConfigError as exc:
            raise CommandArgsError(_args_error(exc)) from None
        needs = self.agent.offload_restart_needs(offload)
        if needs:
            raise CommandFailed("needs_restart", "these offload settings change only when the agent restarts, so "
                                "nothing was changed: " + "; ".join(needs), {"needs_restart": needs})
        try:
            result = self.agent.set_offload(offload)
        except ValueError as exc:
            raise CommandFailed("cannot_apply_live", str(exc)) from None
        self._publish_status()
        return result

    def _set_slo_default(self, args: dict) -> dict:
        _no_args(args, {"model", "all", "slo_ms"})
        if ("model" in args) == bool(args.get("all")):
            raise CommandArgsError("give model (a loaded model's name) or all (every loaded model), not both")
        slo_ms = args.get("slo_ms")
        if (not isinstance(slo_ms, (int, float)) or isinstance(slo_ms, bool) or not 0 < slo_ms <= 3_600_000):
            raise CommandArgsError(f"slo_ms = {slo_ms!r}: expected milliseconds in (0, 3600000]")
        names = [self._model_arg(args)] if "model" in args else sorted(self.agent.models)
        was = {name: self.agent.set_default_slo(name, slo_ms) for name in names}
        self._publish_status()
        return {"default_slo_ms": float(slo_ms), "was": was}

    def _model_arg(self, args: dict) -> str:
        name = args.get("model")
        if not isinstance(name, str):
            raise CommandArgsError(f"model = {name!r}: expected the name of a loaded model "
                                   f"({sorted(self.agent.models)})")
        if name not in self.agent.models:
            raise CommandFailed("unknown_model", f"no model {name!r} is loaded; loaded: {sorted(self.agent.models)}")
        return name

    # --- the config file again ----------------------------------------------------------------------

    def _reload_config(self, args: dict) -> dict:
        """The difference between the config file and the running config, applied all or nothing:
        models added (loaded and profiled first: one that fails to load undoes the others), batching
        and default SLOs changed, models removed (their queues served first), the offload plan
        (``set-offload``'s fields). Anything else that differs is refused ``needs_restart`` and
        nothing is applied."""
        _no_args(args, set())
        if self.agent.config_source is None:
            raise CommandFailed("unavailable", "this agent was not started from a config file "
                                               "(edge-agent run --config FILE): nothing to reload")
        try:
            new = self.agent.config_source()
        except ConfigError as exc:
            raise CommandFailed("bad_config", f"{exc}: nothing was applied") from None
        running = self.agent.config
        restart = [line for f in dataclasses.fields(Config) if f.name not in ("models", "offload")
                   for line in _differences(f.name, getattr(running, f.name), getattr(new, f.name))]
        restart += self.agent.offload_restart_needs(new.offload)     # the offload plan changes live
        old_models = {m.name: m for m in running.models}
        new_models = {m.name: m for m in new.models}
        changed: dict[str, dict] = {}
        for name in sorted(old_models.keys() & new_models.keys()):
            old, fresh = old_models[name], new_models[name]
            for f in dataclasses.fields(old):
                if f.name in LIVE_MODEL_FIELDS:
                    if getattr(old, f.name) != getattr(fresh, f.name):
                        changed.setdefault(name, {})[f.name] = getattr(fresh, f.name)
                elif getattr(old, f.name) != getattr(fresh, f.name):
                    restart.append(f"models.{name}.{f.name}: {getattr(old, f.name)!r} -> {getattr(fresh, f.name)!r} "
                                   f"(unload-model and load-model it, or restart)")
            batching = changed.get(name, {}).get("batching")
            if batching is not None and (batching.rule == "fifo") != (old.batching.rule == "fifo"):
                restart.append(f"models.{name}.batching.rule: {old.batching.rule!r} -> {batching.rule!r} "
                               f"(to or from fifo: unload-model and load-model it, or restart)")
        if restart:
            raise CommandFailed("needs_restart", "these settings change only when the agent restarts, so nothing "
                                "was applied: " + "; ".join(restart), {"needs_restart": restart})
        added = [new_models[n] for n in new_models if n not in old_models]
        removed = [n for n in old_models if n not in new_models]
        loaded: list[str] = []
        for config in added:
            try:
                self.agent.add_model(config)
            except Exception as exc:
                for name in reversed(loaded):
                    self.agent.remove_model(name, DRAIN_TIMEOUT_S)
                self._publish_status()
                raise CommandFailed("load_failed", f"model {config.name!r}: {type(exc).__name__}: {exc}; the models "
                                                   f"loaded before it were unloaded again: nothing was applied") from None
            loaded.append(config.name)
        for name, fields in changed.items():
            if "batching" in fields:
                self.agent.set_batching(name, fields["batching"])
            if "default_slo_ms" in fields:
                self.agent.set_default_slo(name, fields["default_slo_ms"])
        unloaded = {name: self.agent.remove_model(name, DRAIN_TIMEOUT_S) for name in removed}
        offload = self.agent.set_offload(new.offload)["offload"] if new.offload != running.offload else None
        self._publish_status()
        return {"added": loaded, "removed": unloaded, "changed": {n: sorted(f) for n, f in changed.items()},
                "models": sorted(self.agent.models), "offload": offload}

    # --- the self-test ------------------------------------------------------------------------------

    def _selftest(self, args: dict) -> dict:
        from agent.ops.selftest import GROUPS, run_selftest
        _no_args(args, {"groups"})
        groups = args.get("groups", list(SELFTEST_DEFAULT_GROUPS))
        if (not isinstance(groups, list) or not groups or not all(isinstance(g, str) for g in groups)
                or set(groups) - set(GROUPS)):
            raise CommandArgsError(f"groups = {groups!r}: expected a list of some of {list(GROUPS)} "
                                   f"(default {list(SELFTEST_DEFAULT_GROUPS)})")
        report = run_selftest(self.agent.config, groups=[g for g in GROUPS if g in groups],
                              config_source="the running config")
        return {**report.to_dict(), "groups": [g for g in GROUPS if g in groups],
                "skipped_groups": [g for g in GROUPS if g not in groups]}

    # --- operator keys --------------------------------------------------------------------------------

    def _rotate_key(self, args: dict) -> dict:
        _no_args(args, {"key_id", "public_key", "revoke"})
        if "key_id" not in args or "public_key" not in args:
            raise CommandArgsError("give key_id (the new key's id) and public_key (PEM text or 32 raw bytes); "
                                   "revoke (a key id or a list of them) is optional")
        revoke = args.get("revoke", [])
        revoke = [revoke] if isinstance(revoke, str) else revoke
        if not isinstance(revoke, list) or not all(isinstance(r, str) for r in revoke):
            raise CommandArgsError(f"revoke = {args.get('revoke')!r}: expected a key id or a list of key ids")
        directory = self.agent.config.control.keyring
        if directory is None:
            raise CommandFailed("unavailable", "this board's keyring is not a directory it can write "
                                               "([control] keyring)")
        command = self._current
        try:
            public_key = parse_public_key(args["public_key"])
            keyring = install_key(directory, args["key_id"], public_key, tuple(revoke),
                                  note=f"rotate-key {command.command_id} by {command.key_id}" if command else "")
        except KeyFileError as exc:
            raise CommandArgsError(str(exc)) from None
        self.verifier.keyring = keyring            # the next command is checked against it
        log.warning("keyring %s: trusting key %r (%s)%s", directory, args["key_id"], fingerprint(public_key),
                    f", revoked {revoke}" if revoke else "")
        return {"installed": args["key_id"], "fingerprint": fingerprint(public_key), "revoked": revoke,
                "trusted": sorted(k for k in keyring.keys if keyring.lookup(k)[0] is not None)}


def _differences(where: str, old: Any, new: Any) -> list[str]:
    """``where.field: old -> new`` for each field that differs (into nested config sections)."""
    if dataclasses.is_dataclass(old) and dataclasses.is_dataclass(new):
        return [line for f in dataclasses.fields(old)
                for line in _differences(f"{where}.{f.name}", getattr(old, f.name), getattr(new, f.name))]
    return [] if old == new else [f"{where}: {old!r} -> {new!r}"]


def _args_error(exc: ConfigError) -> str:
    return str(exc).removeprefix("config: ")


def _seconds_arg(args: dict, key: str, default: float) -> float:
    value = args.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= MAX_DRAIN_TIMEOUT_S:
        raise CommandArgsError(f"{key} = {value!r}: expected seconds in 0..{MAX_DRAIN_TIMEOUT_S:g}")
    return float(value)


def _no_args(args: dict, allowed: set[str]) -> None:
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise CommandArgsError(f"unknown args {unknown}; this command takes {sorted(allowed) or 'none'}")
