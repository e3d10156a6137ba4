"""The front door: :class:`Agent` loads the configured models and serves ``submit() -> Future``.

Every intake (MQTT, the Open Inference Protocol over HTTP) turns bytes into a call of
:meth:`Agent.submit`; nothing else reaches the scheduler. A refused request (unknown model, bad
input, full queue, shutting down) raises :class:`~agent.errors.InferenceError` at once: nothing was
accepted. An accepted request's future resolves exactly once: a :class:`Result`, or an
``InferenceError`` (``deadline_missed``, ``internal``, ``shutting_down``).
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from agent.backends import load_backend
from agent.backends.base import Backend
from agent.config import BatchingConfig, Config, ModelConfig, OffloadConfig
from agent.core import LatencyTable
from agent.errors import BAD_REQUEST, REJECTED, SHUTTING_DOWN, UNKNOWN_MODEL, InferenceError
from agent.exits.online import OnlineAllocation
from agent.exits.survivors import first_stage_instances, survivor_lanes
from agent.models.card import ModelCard, load_card
from agent.models.tensors import check_inputs
from agent.profiler import Profile, load_profile, measure_latency_table
from agent.profiler.measure import measure_stage_times, zeros_batch
from agent.runtime.live import LiveLoop
from agent.runtime.local_executor import InstanceSet, LocalExecutor
from agent.scheduler.dispatcher import Dispatch, Scheduler
from agent.scheduler.exit_rule import ExitChoice, ExitPlan, choose_exit, exit_plan
from agent.scheduler.policy import LOCAL
from agent.scheduler.request import Request, Result
from agent.scheduler.rules import build_lane, build_rule
from agent.telemetry import Telemetry

log = logging.getLogger(__name__)

__all__ = ["Agent", "LoadedModel", "Result", "InferenceError"]


@dataclass
class LoadedModel:
    config: ModelConfig
    card: ModelCard
    backends: list[Backend]
    latency: LatencyTable
    rule: object
    # A multi-exit model served stage by stage (config exit_mode "fixed" or "confidence"): its exit
    # plan and, per instance, its stage sessions; None for a whole-graph model.
    exits: ExitPlan | None = None
    stages: list[list[Backend]] | None = None
    # exit_allocation on: the online exit allocation that admits by class under overload.
    allocation: OnlineAllocation | None = None

    def instance_set(self) -> InstanceSet:
        """The executor's view of its instances (batch buffers, and stages for a staged model; the
        first stage alone with ``exit_rebatch``, ``agent.exits.survivors``)."""
        if self.config.exit_rebatch and self.stages is not None:
            return first_stage_instances(self.config.name, self)
        return InstanceSet(self.backends, self.card.inputs, self.rule.max_batch, self.stages, self.exits,
                           self.card.exits if self.exits is not None else ())

    def close(self) -> None:
        for backend in [*self.backends, *(b for stages in self.stages or () for b in stages)]:
            backend.close()


def _latency_ms(table: LatencyTable) -> dict[int, float]:
    """A latency table as a status carries it: ``{batch size: ms}`` (what a peer reads back,
    ``agent.offload.view.table_from_ms``)."""
    return dict(zip(table.batch_sizes.tolist(), (1000 * table.latencies_s).round(3).tolist()))


def _check_backend_matches_card(card: ModelCard, backend: Backend, path) -> None:
    """A file that disagrees with its card fails at load, not on the first request."""
    for kind, want, got in (("input", card.inputs, backend.inputs), ("output", card.outputs, backend.outputs)):
        got_by_name = {spec.name: spec for spec in got}
        for spec in want:
            have = got_by_name.get(spec.name)
            if have is None:
                raise ValueError(f"{path}: card of {card.name!r} names {kind} {spec.name!r}, the file has {sorted(got_by_name)}")
            if have.dtype != spec.dtype or have.item_shape() != spec.item_shape():
                raise ValueError(
                    f"{path}: {kind} {spec.name!r} is {have.dtype.name}{list(have.item_shape())} in the file, "
                    f"{spec.dtype.name}{list(spec.item_shape())} in the card")


def _profiled_table(profile: Profile, config: ModelConfig) -> LatencyTable | None:
    """The profile's table for this model, if the profile measured it with the same backend and file."""
    if config.name not in profile.model_names:
        log.warning("profile %s has no model %r: measuring it at start", profile.source, config.name)
        return None
    entry = profile.model(config.name)
    if (entry.get("backend"), entry.get("file")) != (config.backend, config.file):
        log.warning("profile %s measured %r as %s/%s, the config runs %s/%s: measuring it at start", profile.source,
                    config.name, entry.get("backend"), entry.get("file"), config.backend, config.file)
        return None
    return profile.latency_table(config.name)


def load_model(config: ModelConfig, profile: Profile | None = None) -> LoadedModel:
    """Load a model's instances, check them against its card, and take its batch latency from the
    board's profile file when it has the model, else measure it here."""
    card = load_card(config.card)
    path = card.verify_file(config.file)
    backends = [load_backend(config.backend, path, threads=config.threads) for _ in range(config.instances)]
    for backend in backends:
        _check_backend_matches_card(card, backend, path)
    max_batch = config.batching.max_batch if config.batching.rule != "fixed" else config.batching.size
    latency = _profiled_table(profile, config) if profile is not None else None
    if latency is None:
        latency = measure_latency_table(backends[0], card.inputs, max_batch)
    for backend in backends[1:] if profile is None else backends:  # warm every instance at full batch
        backend.run(zeros_batch(card.inputs, max_batch))
    exits = stages = None
    try:
        if exit_plan(card, config.exit_mode) is not None:     # checks the mode against the card
            if config.backend != "onnxruntime":
                raise ValueError(f"model {config.name!r}: exit_mode = {config.exit_mode!r} runs the card's ONNX stage "
                                 f"graphs: expected backend 'onnxruntime', the config has {config.backend!r}")
            stages = [[load_backend(config.backend, point.verify_stage(), threads=config.threads)
                       for point in card.exits] for _ in range(config.instances)]
            for instance in stages[1:]:      # warm: the first run of a session is slow
                for backend, point in zip(instance, card.exits):
                    backend.run(zeros_batch((point.stage_input,), max_batch))
            # Each stage's share of a run, measured here (the first instance's, warming it): what an
            # early exit saves on this board, which admission prices requests by.
            exits = exit_plan(card, config.exit_mode, measure_stage_times(
                stages[0], [point.stage_input for point in card.exits], max_batch))
    except Exception:
        for backend in [*backends, *(b for instance in stages or () for b in instance)]:
            backend.close()
        raise
    allocation = OnlineAllocation(config.name, exits, processors=config.instances) if config.exit_allocation else None
    return LoadedModel(config, card, backends, latency, build_rule(config.batching, latency), exits, stages,
                       allocation)


def _lane(name: str, loaded: LoadedModel):
    """The scheduler's lane of a loaded model (a multi-exit one prices requests by their exit)."""
    lane = build_lane(name, loaded.rule, loaded.config, loaded.latency)
    lane.exits = loaded.exits
    if loaded.exits is not None:     # shed only what even the first exit cannot answer in time
        lane.min_latency_s *= loaded.exits.fraction(0, 1)
    return lane


def _whole_graph_exit(loaded: LoadedModel) -> dict:
    """What ``served_by`` says of a multi-exit model's whole-graph batch (``exit_mode`` off): its
    answer is the last exit's."""
    if loaded.exits is None and loaded.card.exits:
        return {"exit": loaded.card.exits[-1].name}
    return {}


def _exit_choice(loaded: LoadedModel, model: str, min_accuracy: float | None) -> ExitChoice | None:
    """Where a request leaves a multi-exit model (``agent.scheduler.exit_rule``); refused when its
    ``min_accuracy`` is above every exit's (with ``exit_mode`` off too: the whole graph answers with
    the last exit). A model without exits takes ``min_accuracy`` as a hint it has no choice to make."""
    if loaded.exits is not None:
        return choose_exit(loaded.exits, model, min_accuracy)
    if min_accuracy is not None and loaded.card.exits:
        last = loaded.card.exits[-1]
        if min_accuracy > last.accuracy:
            raise InferenceError(REJECTED, (
                f"min_accuracy = {min_accuracy:g}: no exit of model {model!r} reaches it (the most accurate, "
                f"{last.name!r}, has {last.accuracy:.4f} top-1 on its card's test set)"), "min_accuracy")
    return None


class Agent:
    """Serves the configured models on this board.

    >>> with Agent(Config.demo()) as agent:               # doctest: +SKIP
    ...     result = agent.infer("mobilenet_digits", {"frames": frame}, slo_ms=50)
    """

    def __init__(self, config: Config, *, grace_s: float = 1.0,
                 config_source: Callable[[], Config] | None = None) -> None:
        self.config = config
        # Reads the config again as the agent was started with it (its file, the command line's
        # overrides): what the ``reload-config`` command compares the running config with.
        self.config_source = config_source
        self.grace_s = grace_s
        self.clock = time.monotonic     # scheduler time: never wall time (agent.runtime.live)
        # Replaced, never changed in place, when a model is added or removed while serving: the
        # intakes read it without a lock.
        self.models: dict[str, LoadedModel] = {}
        self.profile = profile = load_profile(config.profile) if config.profile else None
        self._changes = threading.Lock()    # one model change at a time (add, remove, rule, SLO)
        # Called (on the changing thread, no lock held) after a model was added or removed or its
        # batching changed: an intake that keeps views of the models refreshes them (Service).
        self.models_changed: list[Callable[[], None]] = []
        try:
            for model_config in config.models:
                log.info("loading %s (%s, %s x%d)", model_config.name, model_config.backend, model_config.file,
                         model_config.instances)
                self.models[model_config.name] = load_model(model_config, profile)
        except Exception:
            for loaded in self.models.values():
                loaded.close()
            raise
        # The peer role ([offload] serve): each split point's tail is a lane of its own,
        # ``<model>@<split>`` (agent.offload.tails), queued and admitted beside the models. Requests
        # reach them only through :meth:`submit_offload` (the offload subscriber), not the intakes.
        self.tails: dict[str, LoadedModel] = {}
        self.offload = None     # the board's side (agent.runtime.offload_executor.OffloadClient)
        try:
            if config.offload.serve:
                from agent.offload.tails import load_tails
                self.tails = load_tails(self.models, config.offload.splits)
            if config.offload.targets:
                from agent.runtime.offload_executor import OffloadClient
                self.offload = OffloadClient(config, self.models, self.clock)
        except Exception:
            for loaded in (*self.models.values(), *self.tails.values()):
                for backend in loaded.backends:
                    backend.close()
            raise
        lanes = {**self.models, **self.tails}
        # exit_rebatch: a multi-exit model's later stages, lanes of their own (agent.exits.survivors);
        # lane -> the model it belongs to (replies are counted under the model, each lane's batches
        # under the lane: they are executions of their own).
        self._lane_model: dict[str, str] = {}
        survivors = [(name, *entry) for name, m in self.models.items() if m.config.exit_rebatch
                     for entry in survivor_lanes(name, m)]
        self._lane_model.update({lane_name: name for name, lane_name, *_ in survivors})
        self.telemetry = Telemetry([*lanes, *self._lane_model])
        self.scheduler = Scheduler(
            [*(_lane(name, m) for name, m in lanes.items()), *(lane for _, _, lane, _ in survivors)],
            max_concurrent=config.worker_count, hold_fraction=config.hold_fraction,
            lookahead=config.admission_lookahead, edf_horizon_s=config.edf_horizon_s, policy=config.policy,
            policy_options={"offload": config.offload, "policy_path": config.policy_path,
                            "offload_view": self.offload.view() if self.offload is not None else None},
        )
        self.executor = LocalExecutor({**{name: m.instance_set() for name, m in lanes.items()},
                                       **{lane_name: instances for _, lane_name, _, instances in survivors}})
        self._served_by = {
            name: [{"device": config.device, "backend": b.kind, "accelerator": b.device, "instance": i,
                    **({"split": name.partition("@")[2]} if name in self.tails else {}),
                    **_whole_graph_exit(m)}
                   for i, b in enumerate(m.backends)]
            for name, m in lanes.items()
        }
        for name, lane_name, *_ in survivors:
            self._served_by[lane_name] = self._served_by[name]
        self._ids = itertools.count(1)
        # Every batch passes the telemetry's counting wrapper (Triton's execution count, the batch sizes).
        executors = {LOCAL: self.telemetry.counting(self.executor)}
        if self.offload is not None:
            self.offload.local = self.executor
            executors[LOCAL] = self.offload.metered(executors[LOCAL])
            executors.update({peer: self.telemetry.counting(self.offload.executor(peer))
                              for peer in config.offload.targets})
        self.loop = LiveLoop(self.scheduler, executors, self.clock,
                             config.worker_count, served_by=self._dispatch_served_by, on_reply=self._record,
                             worker_nice=config.worker_nice)
        if self.offload is not None:
            self.offload.driver = self.loop.driver
        self.executor.answer_part = self.loop.driver.answer_part
        self.executor.hand_on = self.loop.driver.hand_on
        self.loop.start()
        self._closed = False
        # An operator's drain (agent.ops.commands): new requests are refused ``shutting_down``, what
        # was accepted is served; resume takes requests again. A flag read without a lock: a request
        # racing the command lands on one side of it, and is answered either way.
        self.draining = False

    # --- serving -------------------------------------------------------------------------------

    def submit(self, model: str, inputs: Mapping[str, np.ndarray], *, slo_ms: float | None = None,
               deadline: float | None = None, priority: int = 0, client_id: str | None = None,
               min_accuracy: float | None = None) -> "Future[Result]":
        """Queue one request; its future resolves to a :class:`Result` or an ``InferenceError``.

        ``slo_ms`` is relative to now; ``deadline`` is unix seconds (wall clock, as on the wire).
        With neither, the model's ``default_slo_ms`` applies. ``min_accuracy`` (0..1): the top-1
        accuracy the answer must have (a multi-exit model answers at an exit that gives it,
        ``agent.scheduler.exit_rule``; refused when none does). Raises ``InferenceError`` if refused.
        """
        request, _ = self._accept(model, inputs, slo_ms, deadline, priority, client_id, None, wake_worker=True,
                                  min_accuracy=min_accuracy)
        return request.reply

    def infer(self, model: str, inputs: Mapping[str, np.ndarray], *, slo_ms: float | None = None,
              deadline: float | None = None, priority: int = 0, client_id: str | None = None,
              min_accuracy: float | None = None) -> Result:
        """Blocking: like ``submit(...).result()``, but the calling thread runs batches itself while
        it waits (when an execution slot is free), saving two thread hand-offs per request."""
        request, _ = self._accept(model, inputs, slo_ms, deadline, priority, client_id, None, wake_worker=False,
                                  min_accuracy=min_accuracy)
        self.loop.run_while_pending(request)
        return request.reply.result()

    def submit_inline(self, model: str, inputs: Mapping[str, np.ndarray], on_done: Callable[[Future], None], *,
                      slo_ms: float | None = None, deadline: float | None = None, priority: int = 0,
                      client_id: str | None = None, min_accuracy: float | None = None) -> "Future[Result]":
        """For an intake on an event loop (HTTP): ``submit``, with ``on_done`` attached to the future
        before the request can run, and, on an idle board, the request run on the calling thread
        before this returns (``LiveLoop.submit``'s ``alone``): its reply leaves from inside
        ``set_result``, ahead of the scheduler's bookkeeping for the batch, and crosses no thread."""
        request, started = self._accept(model, inputs, slo_ms, deadline, priority, client_id, on_done,
                                       wake_worker=True, alone=True, min_accuracy=min_accuracy)
        if started is not None:
            self.loop.run_alone(started)
        return request.reply

    def submit_offload(self, lane: str, inputs: Mapping[str, np.ndarray], *, deadline: float, priority: int = 0,
                       client_id: str | None = None) -> "Future[Result]":
        """A peer's item (the offload subscriber, ``agent.offload.peer``): like :meth:`submit` with a
        ``deadline`` (unix seconds), into a tail lane ``<model>@<split>`` or a model's own lane (full
        offload). Raises ``InferenceError`` if refused (``unknown_model`` for a lane this agent does
        not serve, ``rejected`` by admission)."""
        request, _ = self._accept(lane, inputs, None, deadline, priority, client_id, None, wake_worker=True,
                                  tails=True)
        return request.reply

    def _accept(self, model: str, inputs: Mapping[str, np.ndarray], slo_ms: float | None, deadline: float | None,
                priority: int, client_id: str | None, on_done: Callable[[Future], None] | None, *,
                wake_worker: bool, alone: bool = False, tails: bool = False,
                min_accuracy: float | None = None) -> tuple[Request, Dispatch | None]:
        """Check and queue a request, or with ``alone`` start it on an idle board: the ``Request``
        (its ``reply`` is the future) and the ``Dispatch`` started for the caller to run, else ``None``.
        ``tails``: the offload tail lanes may be named too."""
        now = self.clock()
        loaded = self.models.get(model)
        if loaded is None and tails:
            loaded = self.tails.get(model)
        if loaded is None:
            raise InferenceError(UNKNOWN_MODEL, f"no model {model!r} is loaded; loaded: {sorted(self.models)}", "model")
        deadline_at = None
        try:
            if self.draining:
                raise InferenceError(SHUTTING_DOWN, f"device {self.config.device!r} is draining (an operator's "
                                                    f"command): not taking new requests until it resumes")
            arrays = check_inputs(model, loaded.card.inputs, inputs)
            choice = _exit_choice(loaded, model, min_accuracy)
            if deadline is not None:
                if slo_ms is not None:
                    raise InferenceError(BAD_REQUEST, "give slo_ms or deadline, not both", "deadline")
                deadline_at = now + (deadline - time.time())
            else:
                slo = loaded.config.default_slo_ms if slo_ms is None else slo_ms
                if not slo > 0:
                    raise InferenceError(BAD_REQUEST, f"slo_ms = {slo_ms!r}: expected a number > 0", "slo_ms")
                deadline_at = now + slo / 1000.0
            if loaded.allocation is not None and choice is not None:
                loaded.allocation.admit(choice.fixed, 1000.0 * (deadline_at - now))
            future: Future = Future()
            if on_done is not None:
                future.add_done_callback(on_done)
            request = Request(next(self._ids), model, arrays, now, deadline_at, priority, future, client_id,
                              min_accuracy, choice)
            started = self.loop.submit(request, wake_worker=wake_worker, alone=alone)
        except InferenceError as exc:
            # Admission's refusals (and a full queue) count against the request's SLO class.
            self.telemetry.refused(model, exc.code, None if deadline_at is None else deadline_at - now)
            raise
        self.telemetry.accepted(model)
        return request, started

    def _dispatch_served_by(self, dispatch: Dispatch) -> dict:
        return self._served_by[dispatch.model][dispatch.instance]

    def _record(self, request: Request, result: Result | None, error: InferenceError | None) -> None:
        slo_s = request.deadline - request.arrival
        model = self._lane_model.get(request.model, request.model)
        if result is not None:
            self.telemetry.record(model, slo_s, result.total_ms, result.queue_ms, result.compute_ms,
                                  result.batch_size, None)
        else:
            self.telemetry.record(model, slo_s, None, None, None, None, error.code)

    # --- models added, changed and removed while serving (agent.ops.commands) -------------------
    # Each change is made under the live loop's lock, between two scheduler decisions, so a batch
    # is formed under one rule or the other and every accepted request is answered exactly once.

    def add_model(self, config: ModelConfig) -> LoadedModel:
        """Load ``config``'s model, profile it as start-up does (the profile file's table, else
        measured here), and serve it. Slow: call it off the intakes' threads. Raises ``ValueError``
        for a name in use, and whatever loading raises (nothing is served then)."""
        with self._changes:
            name = config.name
            if name in self.models:
                raise ValueError(f"model {name!r} is loaded already (unload-model it first, or set-batching)")
            if name in self.scheduler.lanes:
                raise ValueError(f"model {name!r} is still being unloaded")
            log.info("loading %s while serving (%s, %s x%d)", name, config.backend, config.file, config.instances)
            loaded = load_model(config, self.profile)
            try:
                lane = _lane(name, loaded)
                instances = loaded.instance_set()
                survivors = survivor_lanes(name, loaded) if config.exit_rebatch else []
            except Exception:
                loaded.close()
                raise
            served_by = [{"device": self.config.device, "backend": b.kind, "accelerator": b.device, "instance": i,
                          **_whole_graph_exit(loaded)}
                         for i, b in enumerate(loaded.backends)]
            self.telemetry.add_model(name)
            for lane_name, *_ in survivors:
                self.telemetry.add_model(lane_name)
            with self.loop.lock:
                self.executor.models = {**self.executor.models, name: instances,
                                        **{lane_name: inst for lane_name, _, inst in survivors}}
                self._served_by = {**self._served_by, name: served_by,
                                   **{lane_name: served_by for lane_name, *_ in survivors}}
                self._lane_model.update({lane_name: name for lane_name, *_ in survivors})
                for _, survivor_lane, _ in survivors:
                    self.scheduler.add_lane(survivor_lane)
                self.scheduler.add_lane(lane)
                self.models = {**self.models, name: loaded}
                self.config = dataclasses.replace(
                    self.config, models=(*(m for m in self.config.models if m.name != name), config))
            self._notify_models_changed()
            return loaded

    def remove_model(self, name: str, timeout_s: float = 10.0) -> dict:
        """Stop serving ``name``: from now on its new requests are refused ``unknown_model``; what
        was queued is served for up to ``timeout_s``, then what is still queued is answered
        ``shutting_down``; once no batch runs on its instances they are released. Returns the counts.
        Raises ``KeyError`` for a model not loaded."""
        with self._changes:
            if name not in self.models:
                raise KeyError(name)
            lock = self.loop.lock
            with lock:
                self.scheduler.close_lane(name)
                lane = self.scheduler.lanes[name]
                queued, running = len(lane.queue), lane.instances - len(lane.free_instances)
                loaded = self.models[name]
                self.models = {n: m for n, m in self.models.items() if n != name}
                self.config = dataclasses.replace(
                    self.config, models=tuple(m for m in self.config.models if m.name != name))
            self._notify_models_changed()
            deadline = time.monotonic() + timeout_s
            leftover = self._retire_lane(name, deadline, f"model {name!r} was unloaded before this request ran "
                                                         f"({timeout_s:g} s to serve its queue ran out)")
            unserved = len(leftover)
            # exit_rebatch: the survivors handed on wait in the later stages' lanes; each is served
            # in turn (stage by stage, nothing more arrives) within the same time, then removed.
            for lane_name in [n for n, m in self._lane_model.items() if m == name]:
                leftover += self._retire_lane(lane_name, deadline, f"model {name!r} was unloaded before this "
                                                                   f"request's next stage ran ({timeout_s:g} s to "
                                                                   f"serve its queue ran out)")
            # A worker may still be sending the last batch's replies: _served_by keeps the entry
            # (a few dicts; replaced if the model is loaded again).
            loaded.close()
            log.info("unloaded %s: %d queued and %d batches running at the command, %d answered shutting_down",
                     name, queued, running, len(leftover))
            return {"queued_at_unload": queued, "running_at_unload": running, "served": queued - unserved,
                    "answered_shutting_down": len(leftover)}

    def _retire_lane(self, lane_name: str, deadline: float, why: str) -> list[Request]:
        """Serve what waits in ``lane_name`` until ``deadline``, answer the rest ``shutting_down``
        (``why``), then remove the lane once no batch runs on it; returns what was answered so."""
        lock = self.loop.lock
        while time.monotonic() < deadline:
            with lock:
                if not len(self.scheduler.lanes[lane_name].queue):
                    break
            time.sleep(0.005)
        with lock:
            self.scheduler.close_lane(lane_name)
            leftover = self.scheduler.cancel_lane(lane_name)
        for request in leftover:
            self.loop.driver.fail(request, InferenceError(SHUTTING_DOWN, why))
        while True:            # the batches running finish (a batch cannot be stopped)
            with lock:
                if self.scheduler.lane_idle(lane_name):
                    self.scheduler.remove_lane(lane_name)
                    self.executor.models = {n: s for n, s in self.executor.models.items() if n != lane_name}
                    self._lane_model = {n: m for n, m in self._lane_model.items() if n != lane_name}
                    return leftover
            time.sleep(0.005)

    def set_batching(self, name: str, batching: BatchingConfig) -> dict:
        """Form ``name``'s batches by ``batching`` from the next scheduler decision on. Raises
        ``KeyError`` for a model not loaded, ``ValueError`` for a change that cannot be made live
        (to or from ``fifo``)."""
        with self._changes:
            loaded = self.models[name]
            config = dataclasses.replace(loaded.config, batching=batching)
            rule = build_rule(batching, loaded.latency)
            template = _lane(name, dataclasses.replace(loaded, config=config, rule=rule))
            instances = self.executor.models[name]
            buffer = next(iter(instances.buffers[0].values()), None) if instances.buffers else None
            if buffer is not None and len(buffer) < rule.max_batch:   # batches may grow: bigger buffers
                instances = dataclasses.replace(loaded, rule=rule).instance_set()
            changed = dataclasses.replace(loaded, config=config, rule=rule)
            survivors = survivor_lanes(name, changed) if config.exit_rebatch else []
            with self.loop.cond:
                self.scheduler.swap_rule(name, template)
                for lane_name, survivor_lane, survivor_instances in survivors:
                    self.scheduler.swap_rule(lane_name, survivor_lane)
                    self.executor.models = {**self.executor.models, lane_name: survivor_instances}
                self.executor.models = {**self.executor.models, name: instances}
                self.models = {**self.models, name: changed}
                self._replace_model_config(config)
                self.loop.cond.notify_all()    # a batch the old rule held for may leave now
            self._notify_models_changed()
            return {"model": name, "batching": {"rule": batching.rule, **rule.describe()},
                    "was": {"rule": loaded.config.batching.rule, **loaded.rule.describe()}}

    def set_policy(self, policy: str, policy_path: str | None = None) -> dict:
        """Decide every dispatch by ``policy`` (a name of ``agent.scheduler.policies``) from the next
        decision on, ``policy_path`` the learned policy's directory; nothing queued or running is
        lost. Raises ``ValueError`` naming what is wrong (an unknown name, a card refused: the old
        policy goes on deciding)."""
        from agent.scheduler.policy import policy_names
        if policy not in policy_names():
            raise ValueError(f"policy = {policy!r}: expected one of {policy_names()}")
        path = policy_path if policy_path is not None else (self.config.policy_path if policy == "learned" else None)
        if policy == "learned" and path is None:
            raise ValueError("policy 'learned' needs a policy directory (policy_path)")
        with self._changes:
            with self.loop.cond:
                was = self.scheduler.policy.name
                self.scheduler.set_policy(policy, {"policy_path": path})
                self.config = dataclasses.replace(self.config, policy=policy, policy_path=path)
                self.loop.cond.notify_all()    # what the old policy held may leave now
            log.info("dispatch policy %s -> %s%s", was, policy, f" ({path})" if path else "")
            return {"policy": policy, "policy_path": path, "was": was}

    #: ``[offload]`` fields :meth:`set_offload` changes while serving: the plan. The others decide
    #: what is loaded, subscribed or measured at start (peers, splits, the peer role, the codec, the
    #: probe, the status cadence): a restart changes them.
    LIVE_OFFLOAD_FIELDS = ("peer", "split", "share", "models", "planner", "margin_ms")

    def offload_restart_needs(self, offload: OffloadConfig) -> list[str]:
        """What in ``offload`` differs from the running ``[offload]`` in a way only a restart makes
        (``field: old -> new``, one line each); empty when :meth:`set_offload` can take it."""
        running = self.config.offload
        needs = [f"offload.{f}: {getattr(running, f)!r} -> {getattr(offload, f)!r}"
                 for f in OffloadConfig.__dataclass_fields__
                 if f not in self.LIVE_OFFLOAD_FIELDS and getattr(running, f) != getattr(offload, f)]
        if self.offload is None:
            if offload != running:
                needs.append("offload: this board sends to no peer ([offload] peers is empty): set peers and restart")
            return needs
        if offload.peer is not None and offload.peer not in running.targets:
            needs.append(f"offload.peer: {offload.peer!r} is not one of this board's peers {list(running.targets)} "
                         f"(add it to [offload] peers and restart)")
        if (offload.split, offload.models) == (running.split, running.models):
            return needs
        loaded = self.offload.loaded_splits()
        # Every model it may offload: those named, else each one the client loaded (onnxruntime's).
        for model in ([m for m in self.models if m in loaded] if offload.models is None else offload.models):
            if offload.split not in loaded.get(model, []):
                needs.append(f"offload.split: {offload.split or 'none'!r} for {model} is not loaded on this board "
                             f"(loaded: {[s or 'none' for s in loaded.get(model, [])]}; [offload] splits, then restart)")
        return needs

    def set_offload(self, offload: OffloadConfig) -> dict:
        """Offload by ``offload`` (the running ``[offload]`` with its plan changed: peer, split,
        share, models, planner, margin_ms) from the next decision on. The dispatch policy is built
        again with it (the policies that offload read the plan when built); nothing queued or running
        is lost, and a batch out on a peer comes back as before. Raises ``ValueError`` naming each
        field only a restart changes (:meth:`offload_restart_needs`); nothing changes then."""
        with self._changes:
            needs = self.offload_restart_needs(offload)
            if needs:
                raise ValueError("; ".join(needs))
            was = self.config.offload
            with self.loop.cond:
                self.scheduler.set_policy(self.config.policy, {"offload": offload})
                if self.offload is not None:
                    self.offload.settings = offload        # margin_ms: read per batch sent
                self.config = dataclasses.replace(self.config, offload=offload)
                self.loop.cond.notify_all()
            plan, was_plan = ({f: getattr(o, f) for f in self.LIVE_OFFLOAD_FIELDS} for o in (offload, was))
            log.info("offload plan %s -> %s (policy %s)", was_plan, plan, self.config.policy)
            return {"offload": plan, "was": was_plan, "policy": self.config.policy}

    def set_default_slo(self, name: str, slo_ms: float) -> float:
        """Requests for ``name`` that give no SLO get ``slo_ms`` from now on; returns the old one."""
        if not (isinstance(slo_ms, (int, float)) and not isinstance(slo_ms, bool) and slo_ms > 0
                and slo_ms < float("inf")):
            raise ValueError(f"slo_ms = {slo_ms!r}: expected a number > 0")
        with self._changes:
            loaded = self.models[name]
            config = dataclasses.replace(loaded.config, default_slo_ms=float(slo_ms))
            self.models = {**self.models, name: dataclasses.replace(loaded, config=config)}
            self._replace_model_config(config)
            return loaded.config.default_slo_ms

    def _notify_models_changed(self) -> None:
        for callback in self.models_changed:
            try:
                callback()
            except Exception:
                log.exception("a models_changed callback failed")

    def _replace_model_config(self, config: ModelConfig) -> None:
        self.config = dataclasses.replace(
            self.config, models=tuple(config if m.name == config.name else m for m in self.config.models))

    # --- life cycle ----------------------------------------------------------------------------

    def status(self) -> dict:
        """Capabilities and load, as published on ``edge/v1/<device>/status``."""
        return {
            "device": self.config.device,
            "state": "draining" if self.draining else "online",
            "models": {
                name: {"inputs": [{"name": s.name, "dtype": s.dtype.name, "shape": list(s.item_shape())}
                                  for s in m.card.inputs],
                       "backend": m.config.backend, "instances": m.config.instances,
                       "batching": {"rule": m.config.batching.rule, **m.rule.describe()},
                       "default_slo_ms": m.config.default_slo_ms,
                       "latency_ms": _latency_ms(m.latency),
                       "queued": self._queued(name),
                       "admission": self._admission_status(name),
                       **({"exit_allocation": m.allocation.status()} if m.allocation is not None else {})}
                for name, m in self.models.items()
            },
            **({"offload": offload} if (offload := self.offload_status()) is not None else {}),
        }

    def offload_status(self) -> dict | None:
        """What this agent offers peers (``[offload] serve``), for its retained status: the models
        and split points, each lane's queue delay (queued work over its instances, from the batch
        latency table) and batch times (its latency table), the execution slots and those free, and
        the codecs; and the board side's counters."""
        out: dict = {}
        if self.config.offload.serve:
            offers = {}
            for name, m in self.models.items():
                offers[name] = {"full": True, "splits": sorted(t.partition("@")[2] for t in self.tails
                                                              if t.partition("@")[0] == name)}
            queue_ms = {}
            for name, m in {**self.models, **self.tails}.items():
                queued = self._queued(name)
                per_item = m.latency.predict(m.rule.max_batch) / m.rule.max_batch
                queue_ms[name] = round(1000 * queued * per_item / max(1, min(m.config.instances,
                                                                             self.config.worker_count)), 3)
            from agent.offload.wire import CODECS
            latency_ms = {name: _latency_ms(m.latency) for name, m in {**self.models, **self.tails}.items()}
            out["serve"] = {"models": offers, "queue_ms": queue_ms, "codecs": list(CODECS), "latency_ms": latency_ms,
                            "slots": self.scheduler.max_concurrent,
                            "free_slots": max(0, self.scheduler.max_concurrent - self.scheduler.in_flight),
                            "status_interval_s": self.config.offload.status_interval_s, "at": time.time()}
        if self.offload is not None:
            out["client"] = self.offload.status()
        return out or None

    def _queued(self, model: str) -> int:
        lane = self.scheduler.lanes.get(model)     # None: unloaded while this status was read
        return len(lane.queue) if lane is not None else 0

    def _admission_status(self, model: str) -> dict | None:
        """What admission control has learned: the slowdown of a batch here over the profile
        (observed / profiled), what it adds to a batch of one (``excess_ms``), and how many batches
        overran the prediction (``None`` when the model runs without admission)."""
        lane = self.scheduler.lanes.get(model)     # None: unloaded while this status was read
        admission = lane.admission if lane is not None else None
        if admission is None:
            return None
        return {"excess_ms": round(1000 * (admission.batch_s(1) - admission.table.predict(1)), 3),
                "slowdown": round(admission.slowdown, 3),
                "overruns": admission.overruns}

    def pending(self) -> tuple[int, int]:
        """``(queued requests, batches running)``: what a drain waits for."""
        with self.loop.lock:
            return self.scheduler.queued(), self.scheduler.in_flight

    def close(self) -> None:
        """Serve what is queued for up to ``grace_s``, answer the rest ``shutting_down``, release backends."""
        if self._closed:
            return
        self._closed = True
        self.loop.stop(self.grace_s)
        if self.offload is not None:
            self.offload.close(self.grace_s)
        self.executor.close()

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
