"""The board's side of offload: run a batch's head here, send the rest to a peer, answer every
request exactly once whatever the peer does.

One :class:`OffloadClient` per agent (built when ``[offload]`` names peers), with an executor per
peer (``OffloadClient.executor(peer)``) registered under the peer's device id as an action target
(``Driver.executors``). A batch whose action names a peer:

1. **On the worker thread**: if the peer is not in the live peer table (``agent.offload.peers``),
   or does not offer that model and split point, or the MQTT connection is down, the batch runs
   here at once on the local executor (its slot and instance are still held). Otherwise it gathers
   the batch, runs the head up to the split point on this board's head session for that instance
   (none for full offload), encodes the tensor (``agent.offload.wire``), releases the slot and
   instance (``Driver.release_early``), and publishes QoS 1 to ``edge/v1/<peer>/offload/<model>``
   with its own ``edge/v1/<board>/offload-reply/<model>`` as response topic and the batch id as
   correlation data. Then it returns: the worker runs the next batch's head while this tensor is on
   the wire and on the peer (BPS's pipelining). The release comes before the publish, so a reply
   can never find the batch still holding its slot.
2. **Waiting** holds no thread: the batch waits in ``pending`` until its reply or its give-up time,
   the last moment from which this board could still finish the tail (or the whole model) itself
   before the batch's earliest deadline: earliest deadline less the local time of the rest (the
   latency table measured at start for the tail, the model's own table for full offload) less
   ``[offload] margin_ms``. Where even that moment has passed when the batch is sent, or the board
   has no room to run a rescue (its CPU short, its queue not empty: :meth:`OffloadClient._give_up`),
   there is no local rescue to keep time for, and the board waits until the batch's last deadline.
   The deadlines given to the peer are that give-up time (or each item's own deadline, if earlier)
   less half the measured round trip: an answer later than that is of no use here, so the peer's
   admission refuses at once what it cannot make, and the board falls back early.
3. **A reply** (network thread): decoded (strictly: a malformed reply counts ``bad_replies`` and
   falls back), the round trip measured into the peer table, and the batch answered from the peer's
   outputs there and then (decoding is views of the payload; the driver's answers are cheap). Items
   the peer failed are run here if time allows, else answered with the peer's error; those its
   scheduler refused or let miss, only while this board has room (:meth:`OffloadClient._rescue`).
4. **Giving up** (the watcher thread): the batch leaves ``pending`` and its rest runs on a fallback
   thread with this board's own tail (or whole-model) session, unless even that cannot finish in
   time: then each request is answered ``deadline_missed``.

Exactly once: a batch is in ``pending`` until one of the reply and the give-up takes it out (under
one lock); whatever comes after (a late reply, a second copy) finds nothing, is dropped and counted
(``late_replies``, ``duplicate_replies``) in the status (``offload.client``).

Sessions: heads and fallbacks are small extra onnxruntime sessions (same options as the model's),
loaded only for the split points the config names (``[offload] splits``; default: every one whose
files the card ships). A head session per model instance (a head runs on the batch's instance), one
fallback session per split point and model.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
from paho.mqtt.enums import MQTTErrorCode

from agent.backends import load_backend
from agent.core import gather_into, scatter_rows
from agent.errors import DEADLINE_MISSED, REJECTED, SHUTTING_DOWN, InferenceError
from agent.models.card import CardError
from agent.offload import wire
from agent.offload.codecs import nominal_ratio
from agent.offload.cpu import CpuGauge
from agent.offload.peers import PeerTable
from agent.offload.planner import learn_slowdown
from agent.offload.probe import Prober, default_probe_bytes
from agent.offload.splits import chosen
from agent.profiler.measure import measure_latency_table
from agent.runtime.executor import BatchOutcome, OnDone
from agent.scheduler.dispatcher import NO_INSTANCE, Dispatch
from agent.telemetry import Counters
from agent.transport.paho_client import PublishProperties, reply_address
from agent.transport.topics import offload_reply_topic, offload_topic, status_topic

if TYPE_CHECKING:
    from agent.offload.planner import OffloadView

log = logging.getLogger(__name__)

#: What the board side counts (``OffloadClient.counters``; the status's ``offload.client``).
COUNTERS = ("sent", "answered_by_peer", "peer_gone", "fallback_local", "fallback_missed", "item_fallbacks",
            "late_replies", "duplicate_replies", "bad_replies", "send_failed", "rescued_at_reconnect",
            "rescued_at_will", "refusals_passed_on", "sent_without_rescue")
#: Batches whose end is remembered (to tell a late reply from a duplicate one).
REMEMBERED = 4096
#: Weight of a new batch in a split's bytes and codec time per item (EWMAs).
SENT_ALPHA = 0.2
#: Half a round trip assumed before the first one is measured.
DEFAULT_RETURN_S = 0.005
#: Weight of a new fallback run in the slowdown its predictions are priced with (:meth:`OffloadClient._rescue`).
RESCUE_ALPHA = 0.2
#: The share of its CPU budget below which this board runs what a peer refused (:meth:`OffloadClient._rescue`).
SPARE_CPU = 0.8


@dataclass
class _Split:
    """What this board holds for one (model, split point): head sessions and a fallback tail."""

    tensor: str | None                  # the split tensor (None: full offload)
    heads: list                          # one per model instance
    fallback: object                     # the tail session (full offload: a whole-model session)
    fallback_inputs: list[str]
    local_table: object                  # LatencyTable of the fallback
    head_table: object = None            # LatencyTable of the head here (None: full offload, no head)
    bytes_per_item: int = 0              # what one item sends: the split tensor, or the model's inputs
    # Measured from this board's own sends (EWMA): what an item puts on the wire after the codec,
    # and the codec's time per item here (the split policy prices options with them).
    sent_bytes_per_item: float = 0.0
    codec_s_per_item: float = 0.0

    def sent(self, n: int, nbytes: int, codec_s: float) -> None:
        a = SENT_ALPHA
        self.sent_bytes_per_item += a * (nbytes / n - self.sent_bytes_per_item)
        self.codec_s_per_item += a * (codec_s / n - self.codec_s_per_item)


@dataclass(eq=False)
class _Pending:
    batch: str
    peer: str
    dispatch: Dispatch
    on_done: OnDone
    split: str | None
    rest: dict[str, np.ndarray]          # what the fallback runs on: the split tensor, or the inputs
    give_up_at: float                    # scheduler clock
    sent_at: float
    sent_bytes: int
    head_s: float
    can_rescue: bool                     # a local run could still finish when it gives up
    outputs: list = field(default_factory=list)


class OffloadClient:
    """The board's offload machinery, shared by its per-peer executors (module docstring)."""

    def __init__(self, config, models: dict, clock: Callable[[], float]) -> None:
        self.device = config.device
        self.settings = config.offload
        self.models = models
        self.clock = clock
        self.local = None           # the agent's LocalExecutor (set by Agent)
        self.driver = None          # the live loop's Driver (set by Agent): release_early
        self.transport = None       # set by attach()
        self.peers = PeerTable(self.device, self.settings.peer_stale_s)
        self.counters = Counters(*COUNTERS)
        self._splits: dict[tuple[str, str | None], _Split] = {}
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._pending: dict[str, _Pending] = {}
        self._overlap = {"busy_s": 0.0, "overlapped_s": 0.0}
        self._heap: list[tuple[float, str]] = []
        self._ended: OrderedDict[str, str] = OrderedDict()     # batch -> "answered" | "gave_up" | "late"
        self._ids = itertools.count(1)
        self._run = f"{time.time_ns():x}"    # batch ids differ across this board's restarts
        self._closing = False
        try:
            self._load(config)
        except Exception:
            self._close_sessions()
            raise
        probe_bytes = self.settings.probe_bytes
        if probe_bytes is None:
            probe_bytes = default_probe_bytes(s.sent_bytes_per_item for s in self._splits.values())
        self.prober = Prober(self.peers, self.device, self.settings.targets, self.settings.probe_idle_s, probe_bytes)
        self._fallback_pool = ThreadPoolExecutor(1, thread_name_prefix="offload-fallback")
        #: Per split, the fallback's runs' time over its table's (an EWMA; 1 until one ran).
        self._rescue_slowdown: dict[tuple[str, str | None], float] = {}
        self.cpu = CpuGauge()
        self._watcher = threading.Thread(target=self._watch, name="offload-watch", daemon=True)
        self._watcher.start()

    # --- start-up -------------------------------------------------------------------------------

    def _load(self, config) -> None:
        wanted = self.settings.models
        for name, loaded in self.models.items():
            if wanted is not None and name not in wanted:
                continue
            mc = loaded.config
            if mc.backend != "onnxruntime":
                log.warning("offload: model %s runs on %s: offloaded only on onnxruntime", name, mc.backend)
                continue
            max_batch = loaded.rule.max_batch
            full = load_backend("onnxruntime", loaded.card.verify_file(mc.file), threads=mc.threads)
            input_bytes = sum(int(np.prod(s.item_shape())) * s.dtype.itemsize for s in loaded.card.inputs)
            self._splits[(name, None)] = _Split(None, [], full, [s.name for s in loaded.card.inputs], loaded.latency,
                                                None, input_bytes, float(input_bytes))
            for sp in chosen(loaded.card, self.settings.splits):
                try:
                    head_path, tail_path = sp.verify_head(), sp.verify_tail()
                except CardError as exc:
                    if self.settings.splits is not None:
                        raise
                    log.info("offload: %s: split point %s not loaded (%s)", name, sp.name, exc)
                    continue
                heads = [load_backend("onnxruntime", head_path, threads=mc.threads) for _ in range(mc.instances)]
                tail = load_backend("onnxruntime", tail_path, threads=mc.threads)
                split = _Split(sp.tensor, heads, tail, [s.name for s in tail.inputs], None)
                split.local_table = measure_latency_table(tail, tail.inputs, max_batch)
                split.head_table = measure_latency_table(heads[0], heads[0].inputs, max_batch)
                split.bytes_per_item = int(np.prod(sp.spec.item_shape())) * sp.spec.dtype.itemsize
                split.sent_bytes_per_item = split.bytes_per_item / nominal_ratio(self.settings.codec)
                self._splits[(name, sp.name)] = split
                log.info("offload: %s split at %s: head x%d and a fallback tail loaded", name, sp.name, mc.instances)

    def attach(self, transport) -> None:
        """Take replies and peers' statuses on the agent's MQTT connection (before it connects)."""
        self.transport = transport
        transport.subscribe(offload_reply_topic(self.device), self._on_reply, qos=1)
        transport.subscribe(status_topic("+"), self._on_status, qos=1)
        transport.on_session(self._on_session)
        self.prober.attach(transport)      # the idle link probe (agent.offload.probe)

    def view(self) -> "OffloadView":
        """What the split policy reads (``agent.offload.planner.OffloadView``): this board's tables
        and its live peers with what each offers."""
        from agent.offload.view import LiveOffloadView
        return LiveOffloadView(self)

    def executor(self, peer: str) -> "PeerExecutor":
        """The executor of the action target ``peer``."""
        return PeerExecutor(self, peer)

    def status(self) -> dict:
        with self._lock:
            waiting = len(self._pending)
            overlap = dict(self._overlap)
        busy = overlap["busy_s"]
        return {"peers": self.peers.snapshot(), "waiting": waiting, **self.counters.snapshot(),
                "probes": self.prober.status(),
                "pipelining": {**{k: round(v, 6) for k, v in overlap.items()},
                               "overlap": round(overlap["overlapped_s"] / busy, 4) if busy > 0 else None}}

    def computed(self, seconds: float, while_waiting: bool) -> None:
        """This board computed ``seconds`` (a head, or a local batch: :class:`MeteredExecutor`),
        ``while_waiting``: with at least one batch out on a peer then (BPS's pipelining: the board
        does not idle while a tail runs elsewhere). The status's ``pipelining.overlap`` is the
        share of this board's compute that overlapped."""
        with self._lock:
            self._overlap["busy_s"] += seconds
            if while_waiting:
                self._overlap["overlapped_s"] += seconds

    def loaded_splits(self) -> dict[str, list[str | None]]:
        """Per model, what it can send a peer: ``None`` (whole inputs) and each split point whose
        head and fallback tail were loaded at start (``set-offload`` may choose only among them)."""
        out: dict[str, list[str | None]] = {}
        for model, split in self._splits:
            out.setdefault(model, []).append(split)
        return out

    def waiting_on_peers(self) -> bool:
        return bool(self._pending)

    def metered(self, executor) -> "MeteredExecutor":
        """``executor`` (the local one), its batches' compute counted in the overlap."""
        return MeteredExecutor(self, executor)

    # --- worker thread: head, send, release -----------------------------------------------------

    def start(self, peer: str, dispatch: Dispatch, on_done: OnDone) -> None:
        action = dispatch.action
        split_key = (dispatch.model, action.split)
        split = self._splits.get(split_key)
        info = self.peers.live(peer)
        transport = self.transport
        if (split is None or info is None or not info.offers_split(dispatch.model, action.split)
                or transport is None or not transport.connected or self._closing):
            self.counters.add("peer_gone")      # nothing is sent: the batch runs here, now
            if dispatch.instance == NO_INSTANCE:
                self._run_here(peer, dispatch, on_done)
            else:
                self.local.start(dispatch, on_done)
            return
        requests = dispatch.requests
        n = len(requests)
        try:
            overlapping = bool(self._pending)
            t0 = time.perf_counter()
            batch = self._gather(dispatch)
            if split.tensor is None:
                rest = batch
            else:
                rest = {split.tensor: split.heads[dispatch.instance].run(batch)[split.tensor]}
            head_s = time.perf_counter() - t0
            self.computed(head_s, overlapping)
            now = self.clock()
            deadlines = [r.deadline for r in requests]
            give_up_at, can_rescue = self._give_up(split, deadlines, now)
            back_s = (self.peers.rtt_s(peer) or 2 * DEFAULT_RETURN_S) / 2
            wall = time.time() - now
            batch_id = f"{self._run}-{next(self._ids)}"
            # A split tensor travels by the configured codec where the peer reads it; inputs as they are.
            codec = self.settings.codec if split.tensor is not None and self.settings.codec in info.codecs else "raw"
            t1 = time.perf_counter()
            payload = wire.encode_request(wire.OffloadRequest(
                origin=self.device, batch=batch_id, split=action.split, inputs=rest,
                deadlines=[wall + min(d, give_up_at) - back_s for d in deadlines],
                priority=max(r.priority for r in requests)), codec)
            split.sent(n, len(payload), time.perf_counter() - t1)
        except Exception as exc:       # a head that fails answers the batch internal, as a local run would
            log.exception("offload: head of %s at %s failed", dispatch.model, action.split)
            on_done(dispatch, BatchOutcome(None, 0.0, exc))
            return
        if split.tensor is None and n > 1 and dispatch.instance != NO_INSTANCE:
            rest = {k: v.copy() for k, v in rest.items()}   # the instance's buffers go with its release
        pending = _Pending(batch_id, peer, dispatch, on_done, action.split, rest, give_up_at, self.clock(),
                           len(payload), head_s, can_rescue)
        self.driver.release_early(dispatch)
        self._await_reply(pending)
        props = PublishProperties()
        props.ResponseTopic = offload_reply_topic(self.device, dispatch.model)
        props.CorrelationData = batch_id.encode()
        try:
            info = transport.publish(offload_topic(peer, dispatch.model), payload, qos=1, properties=props)
            failed = info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE
        except Exception:
            log.exception("offload: publishing batch %s to %s failed", batch_id, peer)
            failed = True
        if failed:
            self.counters.add("send_failed")
            taken = self._take(batch_id, "gave_up")
            if taken is not None:
                self._fallback_pool.submit(self._rescue, taken, None, None)
            return
        self.counters.add("sent")
        if not pending.can_rescue:
            self.counters.add("sent_without_rescue")
        self.peers.sent(peer)              # the link is in use: no idle probe for now

    def _run_here(self, peer: str, dispatch: Dispatch, on_done: OnDone) -> None:
        """A batch that took no instance (``Scheduler.take_away``) whose peer is gone: its slot is
        freed, and the whole model runs on the fallback thread (its own session), or each request
        is answered ``deadline_missed`` there if it cannot finish in time."""
        rest = self._gather(dispatch)
        pending = _Pending(f"{self._run}-here-{next(self._ids)}", peer, dispatch, on_done, None, rest,
                           self.clock(), self.clock(), 0, 0.0, True)
        self.driver.release_early(dispatch)
        self._fallback_pool.submit(self._rescue, pending, None, None)

    def _gather(self, dispatch: Dispatch) -> dict[str, np.ndarray]:
        """The batch's inputs as ``[N, ...]`` arrays (the instance's buffers; a lone request's own;
        new arrays for a batch that took no instance)."""
        requests = dispatch.requests
        if len(requests) == 1:
            return requests[0].inputs
        if dispatch.instance == NO_INSTANCE:
            return {name: np.concatenate([r.inputs[name] for r in requests])
                    for name in self.local.models[dispatch.model].input_names}
        instances = self.local.models[dispatch.model]
        buffers = instances.buffers[dispatch.instance]
        out = {}
        for name in instances.input_names:
            gather_into(buffers[name], [r.inputs[name] for r in requests])
            out[name] = buffers[name][:len(requests)]
        return out

    # --- network thread: replies and statuses ---------------------------------------------------

    def _on_status(self, message) -> None:
        device = self.peers.on_status(message.topic, message.payload, bool(message.retain))
        if device is not None:
            self._rescue_all(lambda pending: pending.peer == device, "rescued_at_will",
                             f"peer {device} went offline (its last will, or a shutdown)")

    def _rescue_all(self, which: Callable[["_Pending"], bool], counter: str, why: str) -> None:
        """Run here now every batch out on a peer that ``which`` picks, earliest give-up first (the
        fallback thread takes them in that order), instead of each at its give-up time."""
        with self._lock:
            lost = sorted((b for b, p in self._pending.items() if which(p)), key=lambda b: self._pending[b].give_up_at)
        taken = [p for p in (self._take(b, "gave_up") for b in lost) if p is not None]
        if taken:
            self.counters.add(counter, len(taken))
            log.warning("offload: %s: %d batches out on peers run here now", why, len(taken))
        for pending in taken:
            self._fallback_pool.submit(self._rescue, pending, None, None)

    def _take(self, batch_id: str, why: str) -> _Pending | None:
        """Take a batch out of ``pending`` (once: None if the reply or the give-up took it)."""
        with self._lock:
            pending = self._pending.pop(batch_id, None)
            if pending is not None:
                self._ended[batch_id] = why
                while len(self._ended) > REMEMBERED:
                    self._ended.popitem(last=False)
            return pending

    def _give_up(self, split: "_Split", deadlines: list[float], now: float) -> tuple[float, bool]:
        """When to stop waiting for a batch with these ``deadlines`` sent ``now``, and whether a
        local rescue is kept time for (module docstring, 2): the earliest deadline less the rest's
        local time, when this board has room to run it then (:meth:`_board_has_room`); else the
        batch's last deadline, and the peer gets all the time there is. A board short of CPU would
        pass the peer's refusals on anyway, and a rescue there runs several times its table:
        keeping its time back cut the deadlines the peer's admission judged by (by the local time
        of a whole batch, half the SLO for a batch of 8 at the bench's quota) and the peer refused
        work it could have done (BENCHMARKS.md, eighteenth session)."""
        if self._board_has_room(sending=1):
            give_up_at = min(deadlines) - split.local_table.predict(len(deadlines)) - self.settings.margin_ms / 1000.0
            if give_up_at > now:
                return give_up_at, True
        return max(deadlines), False

    def _await_reply(self, pending: _Pending) -> None:
        """``pending`` is out: it waits for its reply or its give-up (the watcher's heap). The
        watcher sleeps until the earliest give-up at most, so only a new earliest wakes it: a
        wake-up per batch sent was a thread hand-off each, CPU a board at its quota needs for
        forwarding (BENCHMARKS.md, eighteenth session)."""
        with self._cond:
            self._pending[pending.batch] = pending
            heapq.heappush(self._heap, (pending.give_up_at, pending.batch))
            if self._heap[0][1] == pending.batch:
                self._cond.notify()

    def _on_reply(self, message) -> None:
        correlation = reply_address(message)[1]
        batch_id = correlation.decode(errors="replace") if isinstance(correlation, (bytes, bytearray)) else None
        arrived = self.clock()
        pending = self._take(batch_id, "answered") if batch_id else None
        if pending is None:
            with self._lock:
                ended = self._ended.get(batch_id) if batch_id else None
                if ended == "gave_up":
                    self._ended[batch_id] = "late"
            self.counters.add("late_replies" if ended == "gave_up" else "duplicate_replies")
            return
        n = len(pending.dispatch.requests)
        try:
            reply = wire.decode_reply(message.payload, n)
        except InferenceError as exc:
            self.counters.add("bad_replies")
            log.warning("offload: reply of %s to batch %s not understood (%s): running it here", pending.peer,
                        batch_id, exc.message)
            self._fallback_pool.submit(self._rescue, pending, None, None)
            return
        peer_ms = float(reply.timing.get("total_ms", 0.0))
        self.peers.observe(pending.peer, arrived - pending.sent_at - peer_ms / 1000.0,
                           pending.sent_bytes + len(message.payload))
        if reply.error is not None:
            log.info("offload: %s refused batch %s (%s: %s): falling back", pending.peer, batch_id,
                     reply.error.code, reply.error.message)
            self._fall_back(pending, None, reply.error)
            return
        served_by = {**reply.served_by, "split": pending.split}
        rows = {name: scatter_rows(array, n) for name, array in reply.outputs.items()}
        outputs = [None if err is not None else {name: r[i] for name, r in rows.items()}
                   for i, err in enumerate(reply.errors)]
        compute_s = pending.head_s + float(reply.timing.get("compute_ms", 0.0)) / 1000.0
        failed = [i for i, err in enumerate(reply.errors) if err is not None]
        if failed:
            self._fall_back(pending, (failed, outputs, reply.errors, served_by, compute_s), None)
            return
        self.counters.add("answered_by_peer")
        pending.on_done(pending.dispatch, BatchOutcome(outputs, compute_s, served_by=served_by))

    def _on_session(self, session_present: bool) -> None:
        """After a reconnect, every batch sent before it runs here now, earliest give-up first,
        instead of each at its give-up time: then the batches the outage caught all give up within
        a few milliseconds of each other and their rescues queue on the one fallback thread, the
        later ones past their deadlines. Whether a reply would still come cannot be known here: a
        broker that lost this board's session (``session_present`` False) lost the replies queued
        for it, and one killed between autosaves comes back with a session but without the replies
        published after its last save; a peer also reconnects on its own backoff, seconds after this
        board. A reply that comes after all is late and dropped. (The first connect finds nothing
        pending.)"""
        self._rescue_all(lambda pending: True, "rescued_at_reconnect",
                         f"reconnected to the broker (session {'resumed' if session_present else 'lost'})")

    # --- giving up, and the local rest ----------------------------------------------------------

    def _watch(self) -> None:
        """Give up on each batch at its time: the rest runs here (or is answered late)."""
        while True:
            due = []
            with self._cond:
                if self._closing and not self._pending:
                    return
                now = self.clock()
                while self._heap and self._heap[0][0] <= now:
                    _, batch_id = heapq.heappop(self._heap)
                    if batch_id in self._pending:
                        due.append(batch_id)
                if not due:
                    timeout = self._heap[0][0] - now if self._heap else 0.5
                    self._cond.wait(min(max(timeout, 0.001), 0.5))
                    continue
            for batch_id in due:
                pending = self._take(batch_id, "gave_up")
                if pending is not None:
                    log.info("offload: no reply from %s for batch %s in time: running its rest here",
                             pending.peer, batch_id)
                    self._fallback_pool.submit(self._rescue, pending, None, None)

    def _board_has_room(self, sending: int = 0) -> bool:
        """Whether this board has CPU to spare (its agent below ``SPARE_CPU`` of its budget,
        ``agent.offload.cpu``) and its own scheduler has nothing queued and a slot free, not
        counting the ``sending`` batches still holding theirs until they are sent (read without
        its lock: a hint, stale by a batch at most)."""
        if self.cpu.load() >= SPARE_CPU:
            return False
        driver = self.driver
        if driver is None:
            return True
        scheduler = driver.scheduler
        return scheduler.in_flight - sending < scheduler.max_concurrent and not scheduler.queued()

    def _fall_back(self, pending: _Pending, partial, peer_error: InferenceError | None) -> None:
        """What the peer refused or failed (on the network thread, at its reply): answered at once
        where no model needs to run (:meth:`_rescue` with ``run`` False: passed on, or too late),
        else handed to the fallback thread. A peer at its capacity refuses about half of what a
        saturated board sends it, and a hand-off per refused batch only to pass its answer on was
        CPU the board's forwarding needed (BENCHMARKS.md, eighteenth session)."""
        if self._rescue(pending, partial, peer_error, run=False):
            return
        self._fallback_pool.submit(self._rescue, pending, partial, peer_error)

    def _rescue(self, pending: _Pending, partial, peer_error: InferenceError | None, run: bool = True) -> bool:
        """On the fallback thread: run the rest of ``pending`` here for every item (``partial`` None)
        or for the items the peer failed (``partial``: (failed indexes, outputs, errors, served_by,
        compute_s)); items that cannot finish in time any more (the table's time scaled by what the
        fallback's own runs took: a board at its CPU quota runs them several times slower) are
        answered ``deadline_missed`` (or with the peer's error). Items the peer's scheduler refused
        or let miss (``rejected``, ``deadline_missed``) run here only when this board has room
        (:meth:`_board_has_room`: CPU to spare, an empty queue and a free slot): otherwise the
        peer's answer is theirs. Run outside the slots, they took the CPU that the board's own
        batches and its forwarding needed (bench offload: 30% of a saturated board's busy samples
        in full offload, and more of what it forwarded reached the peer too late: BENCHMARKS.md,
        seventeenth session); the simulator's peer answers a refused batch the same way
        (agent.sim.offload). ``run`` False: answer only what needs no model run, and return False
        (nothing answered) where the rest would run here. True once the batch is answered."""
        try:
            requests = pending.dispatch.requests
            n = len(requests)
            if partial is None:
                items, outputs, errors, served_by, compute_s = list(range(n)), [None] * n, [None] * n, None, pending.head_s
            else:
                items, outputs, errors, served_by, compute_s = partial
                errors = list(errors)
            key = (pending.dispatch.model, pending.split)
            split = self._splits[key]
            now = self.clock()
            table_s = split.local_table.predict(len(items))
            local_s = table_s * self._rescue_slowdown.get(key, 1.0)
            # The peer's answer per item, where it gave one.
            verdicts = ([peer_error] * len(items) if peer_error is not None
                        else [partial[2][i] for i in items] if partial is not None else [])
            refused = bool(verdicts) and all(e is not None and e.code in (REJECTED, DEADLINE_MISSED) for e in verdicts)
            if refused and not self._board_has_room():
                # The peer's scheduler refused these (or let them miss): run here, outside the slots,
                # they would take the CPU this board's own batches and the requests it forwards
                # need, and a board that sent work away is short of it (module docstring).
                self.counters.add("refusals_passed_on")
                for i, verdict in zip(items, verdicts):
                    errors[i] = verdict
            elif now + local_s > max(requests[i].deadline for i in items):
                self.counters.add("fallback_missed")
                for i in items:
                    errors[i] = (peer_error or (partial[2][i] if partial is not None else None)
                                 or InferenceError(DEADLINE_MISSED, f"peer {pending.peer} did not answer in time and "
                                                                    f"the rest of the model cannot finish here "
                                                                    f"before the deadline"))
            else:
                if not run:
                    return False
                self.counters.add("fallback_local" if partial is None else "item_fallbacks")
                index = np.asarray(items)
                batch = {name: np.ascontiguousarray(pending.rest[name][index]) for name in split.fallback_inputs}
                t0 = time.perf_counter()
                result = split.fallback.run(batch)
                took = time.perf_counter() - t0
                compute_s += took
                learn_slowdown(self._rescue_slowdown, key, took, table_s, RESCUE_ALPHA)
                rows = {name: scatter_rows(array, len(items)) for name, array in result.items()}
                for k, i in enumerate(items):
                    outputs[i] = {name: r[k] for name, r in rows.items()}
                    errors[i] = None
                if served_by is None:
                    served_by = {"device": self.device, "offload": "fallback", "peer": pending.peer,
                                 "split": pending.split}
            pending.on_done(pending.dispatch, BatchOutcome(outputs, compute_s, item_errors=errors,
                                                           served_by=served_by))
        except Exception as exc:     # the batch is answered whatever happens
            log.exception("offload: local rest of batch %s failed", pending.batch)
            pending.on_done(pending.dispatch, BatchOutcome(None, 0.0, exc))
        return True

    # --- life cycle -----------------------------------------------------------------------------

    def close(self, grace_s: float = 1.0) -> None:
        """Wait up to ``grace_s`` past the last give-up for what is out, answer anything left
        ``shutting_down``, and free the sessions."""
        self.prober.close()
        end = self.clock() + grace_s
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while self._pending and self.clock() < end:
                self._cond.wait(0.02)
            left = list(self._pending)
        for batch_id in left:
            pending = self._take(batch_id, "gave_up")
            if pending is not None:
                error = InferenceError(SHUTTING_DOWN, f"the agent shut down while peer {pending.peer} had this request")
                pending.on_done(pending.dispatch, BatchOutcome([None] * len(pending.dispatch.requests), 0.0,
                                                               item_errors=[error] * len(pending.dispatch.requests)))
        with self._cond:
            self._cond.notify_all()
        self._watcher.join(2.0)
        self._fallback_pool.shutdown(wait=True)
        self._close_sessions()

    def _close_sessions(self) -> None:
        for split in self._splits.values():
            for backend in (*split.heads, split.fallback):
                try:
                    backend.close()
                except Exception:
                    pass


class MeteredExecutor:
    """The local executor, each batch's compute counted in the board's pipelining overlap
    (:meth:`OffloadClient.computed`). Its own runs only: a fallback's time is not counted."""

    def __init__(self, client: OffloadClient, executor) -> None:
        self.client = client
        self.executor = executor

    def start(self, dispatch: Dispatch, on_done: OnDone) -> None:
        overlapping = self.client.waiting_on_peers()
        t0 = time.perf_counter()
        self.executor.start(dispatch, on_done)
        self.client.computed(time.perf_counter() - t0, overlapping)

    def __getattr__(self, name):
        return getattr(self.executor, name)


class PeerExecutor:
    """The executor of one peer target (``agent.runtime.executor.Executor``)."""

    def __init__(self, client: OffloadClient, peer: str) -> None:
        self.client = client
        self.peer = peer

    def start(self, dispatch: Dispatch, on_done: OnDone) -> None:
        self.client.start(self.peer, dispatch, on_done)

    def close(self) -> None:
        pass


__all__ = ["OffloadClient", "PeerExecutor", "COUNTERS"]
