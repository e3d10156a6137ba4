"""Collaborative offload in the simulator: simulated peers, the links to them, and the executor
that sends a batch's rest there, so that a split policy is compared on the same virtual clock as
everything else (``simulate(..., peers=[SimPeerSpec(...)])``).

What it models, per peer (:class:`SimPeerSpec`):

* **The board's side** (:class:`SimOffloadExecutor`, the driver's executor of the peer's device id,
  as ``agent.runtime.offload_executor`` is live). A batch sent at split point ``k`` runs its head
  on the board's :class:`~agent.sim.executor.SimExecutor` (processor sharing with the local
  batches), for the split point's profiled head time scaled to this board's own full-model table
  (``head(b) = head_ms(b) / full_ms(b) x table.predict(b)``: the card's profile was measured on the
  host that cut the files, the table on this board), plus the codec's encoding. Then the slot is
  released (``Driver.release_early``: the next batch's head may run while this tensor travels) and
  the tensor goes on the link. Full offload (``split=None``) has no head: the slot is released at
  once and the raw input (the card's input bytes per item) is sent. A dispatch naming a model or a
  split point the peer does not offer runs here at once, as live (``peer_gone``).
* **The link** (:class:`SimLink`): one uplink per board and peer, tensors serialised on it FIFO at
  ``bandwidth_Bps``, each reaching the peer ``delay_s`` after its last byte left. Replies (small:
  ``reply_bytes_per_item``) take ``delay_s`` plus their bytes at the same bandwidth on their own
  downlink, without contention.
* **The peer** (:class:`SimPeer`): ``slots`` execution slots at ``speed`` times this board's
  speed (a tail takes this board's tail time / ``speed``; the full model this board's table /
  ``speed``), less the share ``background`` its own work takes (every run is ``1 / (1 -
  background)`` longer), a FIFO or EDF queue of tail batches (EDF: by the batch's earliest
  deadline). As the live peer's admission does, it refuses a batch (each item answered
  ``deadline_missed``, the reply returns at once) that is predicted, on arrival or when a slot
  takes it, to reach the board after every item's deadline: a peer under load does not spend its
  compute on what can only be late.

What it leaves out: the live board's give-up and local rescue of a batch whose peer is slow or
refused (here a refused or late batch is answered ``deadline_missed``), lost messages, a peer's
own requests (``background`` stands in for them), and link estimates that are learned (the view
gives the policy the configured round trip and bandwidth).

The policy reads the world through :class:`SimOffloadView` (``agent.offload.planner.OffloadView``):
``local_table`` is the board's table; ``peer_snapshots`` the peers with their configured round
trip and bandwidth, their split points priced from the card's profile (:class:`SplitCost`: head on
this board, tail on the peer) and the queue delay the peer would advertise, sampled every
``[offload] status_interval_s`` as the live peer's retained status is refreshed (one queue here,
so every lane of the peer, ``model`` and ``model@split``, advertises the same delay).
"""
from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from agent.config import OffloadConfig
from agent.core import LatencyTable
from agent.errors import DEADLINE_MISSED, InferenceError
from agent.offload.planner import PeerSnapshot, SplitCost
from agent.offload.splits import lane_name
from agent.runtime.executor import BatchOutcome, OnDone
from agent.scheduler.dispatcher import Dispatch
from agent.sim.executor import SimExecutor

#: A refused tail's items, one shared error (the simulator records only the code).
_REFUSED = InferenceError(DEADLINE_MISSED, "the peer refused: it could not answer before the deadline")
_NO_OUTPUTS: dict = {}
FULL = "full"       # the placement key of a full offload ("<peer>:full")


@dataclass(frozen=True)
class SimPeerSpec:
    """One simulated peer and the link to it.

    ``speed``: its compute relative to this board's; ``slots``: batches it runs at once;
    ``bandwidth_Bps``, ``delay_s``: the link (bytes per second, one way); ``queue``: ``"fifo"`` or
    ``"edf"``; ``background``: the share of its capacity its own work takes (0 <= x < 1);
    ``codec_ratio``, ``codec_s_per_item``: the intermediate tensors' codec (uncompressed size /
    size on the wire; encoding here plus decoding there, seconds per item; the raw input of a full
    offload is sent as is); ``reply_bytes_per_item``: a reply's size."""

    device: str
    speed: float = 2.0
    slots: int = 1
    bandwidth_Bps: float = 12.5e6
    delay_s: float = 0.010
    queue: str = "fifo"
    background: float = 0.0
    codec_ratio: float = 1.0
    codec_s_per_item: float = 0.0
    reply_bytes_per_item: int = 64

    def __post_init__(self) -> None:
        checks = (("speed", self.speed > 0 and math.isfinite(self.speed), "a finite number > 0"),
                  ("slots", isinstance(self.slots, int) and self.slots >= 1, "an integer >= 1"),
                  ("bandwidth_Bps", self.bandwidth_Bps > 0, "a number > 0"),
                  ("delay_s", self.delay_s >= 0 and math.isfinite(self.delay_s), "a finite number >= 0"),
                  ("queue", self.queue in ("fifo", "edf"), "'fifo' or 'edf'"),
                  ("background", 0 <= self.background < 1, "a number in [0, 1)"),
                  ("codec_ratio", self.codec_ratio > 0 and math.isfinite(self.codec_ratio), "a finite number > 0"),
                  ("codec_s_per_item", self.codec_s_per_item >= 0, "a number >= 0"),
                  ("reply_bytes_per_item", self.reply_bytes_per_item >= 0, "a number >= 0"))
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"SimPeerSpec({self.device!r}).{name} = {getattr(self, name)!r}: expected {expected}")

    @property
    def rtt_s(self) -> float:
        return 2.0 * self.delay_s


@dataclass(frozen=True)
class SimSplit:
    """One split point of a model as the simulator needs it: the tensor's bytes per item and the
    card's profile (ms per batch at ``batch_sizes``: head, tail and the full model, measured
    together on one host)."""

    name: str
    bytes_per_item: float
    batch_sizes: tuple[int, ...]
    head_ms: tuple[float, ...]
    tail_ms: tuple[float, ...]
    full_ms: tuple[float, ...]

    @classmethod
    def from_split_point(cls, point: Any) -> "SimSplit":
        """From a card's ``agent.models.card.SplitPoint`` (it needs the profile)."""
        profile = point.profile
        if not profile:
            raise ValueError(f"split point {point.name!r} of {point.model!r} has no profile (tools/split_models.py "
                             "measures it): the simulator times heads and tails from it")
        return cls(point.name, float(point.bytes_per_item), tuple(int(b) for b in profile["batch_sizes"]),
                   tuple(map(float, profile["head_ms"])), tuple(map(float, profile["tail_ms"])),
                   tuple(map(float, profile["full_ms"])))

    def scaled(self, part: str, board: LatencyTable, factor: float = 1.0) -> LatencyTable:
        """The ``part`` (``"head_ms"`` or ``"tail_ms"``) on a board whose full model takes
        ``board``: at each profiled size, its share of the profiled full run times ``board``'s
        time, times ``factor``."""
        values = getattr(self, part)
        return LatencyTable(np.array(self.batch_sizes, dtype=np.int64),
                            np.array([v / f * board.predict(b) * factor
                                      for b, v, f in zip(self.batch_sizes, values, self.full_ms)], dtype=np.float64))


@dataclass(frozen=True)
class SimOffloadModel:
    """What the simulator needs to offload one model: its input's bytes per item (what a full
    offload sends) and its split points."""

    name: str
    input_bytes_per_item: float
    splits: tuple[SimSplit, ...] = ()

    @classmethod
    def from_card(cls, card: Any, splits: Iterable[str] | None = None) -> "SimOffloadModel":
        """From a model card (``agent.models.card.load_card``): every split point with a profile,
        or those named in ``splits``."""
        wanted = None if splits is None else set(splits)
        points = [p for p in card.split_points if (wanted is None or p.name in wanted) and p.profile]
        if wanted is not None and wanted - {p.name for p in points}:
            raise ValueError(f"model {card.name!r}: split points {sorted(wanted - {p.name for p in points})} "
                             f"not in its card with a profile (it has {[p.name for p in card.split_points]})")
        size = sum(int(np.prod(s.item_shape())) * s.dtype.itemsize for s in card.inputs)
        return cls(card.name, float(size), tuple(SimSplit.from_split_point(p) for p in points))


def full_table(board: LatencyTable, factor: float) -> LatencyTable:
    """``board``'s table times ``factor`` (the full model on a peer)."""
    return LatencyTable(board.batch_sizes, board.latencies_s * factor)


class SimLink:
    """The uplink from this board to one peer: tensors serialised FIFO, each arriving ``delay_s``
    after its last byte left."""

    def __init__(self, bandwidth_Bps: float, delay_s: float) -> None:
        self.bandwidth_Bps = bandwidth_Bps
        self.delay_s = delay_s
        self.free_at = -math.inf
        self.bytes_sent = 0.0

    def send(self, now: float, nbytes: float) -> float:
        """Queue ``nbytes`` at ``now``; returns when they reach the other end."""
        leaves = max(now, self.free_at)
        self.free_at = leaves + nbytes / self.bandwidth_Bps
        self.bytes_sent += nbytes
        return self.free_at + self.delay_s

    def reply(self, now: float, nbytes: float) -> float:
        """A reply of ``nbytes`` sent back at ``now`` (its own downlink): when it arrives."""
        return now + nbytes / self.bandwidth_Bps + self.delay_s


class _Job:
    """One offloaded batch, from its head to its reply."""

    __slots__ = ("dispatch", "on_done", "executor", "split", "size", "run_s", "head_s", "bytes",
                 "first_deadline", "last_deadline", "stage", "seq", "started", "refused")

    def __init__(self, dispatch: Dispatch, on_done: OnDone, executor: "SimOffloadExecutor", split: str | None,
                 run_s: float, nbytes: float, seq: int) -> None:
        deadlines = [r.deadline for r in dispatch.requests]
        self.dispatch = dispatch
        self.on_done = on_done
        self.executor = executor
        self.split = split
        self.size = len(deadlines)
        self.run_s = run_s                 # the rest's run on the peer (its speed, background and decoding)
        self.head_s = 0.0
        self.bytes = nbytes
        self.first_deadline = min(deadlines)
        self.last_deadline = max(deadlines)
        self.stage = "head"
        self.seq = seq
        self.started = 0.0
        self.refused = False

    def head_done(self, _payload: Any, outcome: BatchOutcome) -> None:
        self.head_s = outcome.compute_s
        self.executor.send(self)


class SimPeer:
    """A simulated peer: its slots, its queue of tail batches (module docstring)."""

    def __init__(self, spec: SimPeerSpec, clock: Any, post: Callable[[float, Any, Any], None]) -> None:
        self.spec = spec
        self.clock = clock
        self.post = post
        self.link = SimLink(spec.bandwidth_Bps, spec.delay_s)
        self._queue: list = []
        self._queued_s = 0.0
        self.running: list[_Job] = []      # with their finish times in ``_ends``
        self._ends: dict[int, float] = {}
        self.counters = Counter()

    def backlog_s(self, now: float) -> float:
        """How long a batch arriving now waits for a slot (the work queued and left running, per slot)."""
        left = sum(max(0.0, end - now) for end in self._ends.values())
        return (self._queued_s + left) / self.spec.slots if len(self.running) >= self.spec.slots or self._queue else 0.0

    def complete(self, job: _Job, now: float) -> None:
        """A tensor reached the peer (stage ``link``) or a tail ended there (stage ``tail``)."""
        if job.stage == "link":
            back = job.executor.reply_s(job)
            if now + self.backlog_s(now) + job.run_s + back > job.last_deadline:
                self._refuse(job, now)
                return
            self.counters["arrived"] += 1
            job.stage = "queued"
            key = job.first_deadline if self.spec.queue == "edf" else 0.0
            heapq.heappush(self._queue, (key, job.seq, job))
            self._queued_s += job.run_s
            self._fill(now)
        else:                              # a tail ended
            self.running.remove(job)
            del self._ends[job.seq]
            self.counters["ran"] += 1
            job.stage = "reply"
            self.post(self.link.reply(now, job.size * self.spec.reply_bytes_per_item), job.executor, job)
            self._fill(now)

    def _fill(self, now: float) -> None:
        while self._queue and len(self.running) < self.spec.slots:
            _, _, job = heapq.heappop(self._queue)
            self._queued_s -= job.run_s
            if now + job.run_s + job.executor.reply_s(job) > job.last_deadline:
                self._refuse(job, now)
                continue
            job.stage = "tail"
            job.started = now
            self.running.append(job)
            end = now + job.run_s
            self._ends[job.seq] = end
            self.post(end, self, job)
        if not self._queue:
            self._queued_s = 0.0           # no rounding left behind

    def _refuse(self, job: _Job, now: float) -> None:
        self.counters["refused"] += 1
        job.refused = True
        job.stage = "reply"
        self.post(self.link.reply(now, 0.0), job.executor, job)


class SimOffloadExecutor:
    """The driver's executor of one peer's device id (module docstring)."""

    def __init__(self, offload: "SimOffload", peer: SimPeer) -> None:
        self.offload = offload
        self.peer = peer
        spec = peer.spec
        self.device = spec.device
        self._factor = 1.0 / (spec.speed * (1.0 - spec.background))
        # (model, split) -> (head table on the board or None, rest's table on the peer, bytes per item)
        self.plans: dict[tuple[str, str | None], tuple[LatencyTable | None, LatencyTable, float]] = {}
        for name, model in offload.models.items():
            board = offload.tables.get(name)
            if board is None:
                continue
            self.plans[(name, None)] = (None, full_table(board, self._factor), model.input_bytes_per_item)
            for split in model.splits:
                self.plans[(name, split.name)] = (split.scaled("head_ms", board), split.scaled("tail_ms", board, self._factor),
                                                  split.bytes_per_item / spec.codec_ratio)

    def start(self, dispatch: Dispatch, on_done: OnDone) -> None:
        offload = self.offload
        model, split = dispatch.model, dispatch.action.split
        plan = self.plans.get((model, split))
        if plan is None:                   # not offered: it runs here, now, as live
            offload.counters["peer_gone"] += 1
            offload.local.start(dispatch, on_done)
            return
        head, rest, per_item = plan
        b = len(dispatch.requests)
        spec = self.peer.spec
        codec_half = 0.0 if split is None else 0.5 * spec.codec_s_per_item * b   # encode here, decode there
        job = _Job(dispatch, on_done, self, split, rest.predict(b) + codec_half / (1.0 - spec.background),
                   b * per_item, next(offload.ids))
        offload.sent(self.device, model, split, b)
        if head is None:
            self.send(job)
        else:
            offload.local.start_part(dispatch, model, b, head.predict(b) + codec_half, job.head_done)

    def send(self, job: _Job) -> None:
        """The head is done (or there is none): free the slot, put the tensor on the link."""
        offload = self.offload
        offload.driver.release_early(job.dispatch)
        offload.outstanding += 1
        job.stage = "link"
        self.offload.post(self.peer.link.send(offload.clock.now, job.bytes), self.peer, job)

    def reply_s(self, job: _Job) -> float:
        """How long the reply of ``job`` takes to reach the board."""
        return job.size * self.peer.spec.reply_bytes_per_item / self.peer.spec.bandwidth_Bps + self.peer.spec.delay_s

    def complete(self, job: _Job, now: float) -> None:
        """The reply reached the board: answer the batch (the driver answers late items deadline_missed)."""
        self.offload.outstanding -= 1
        served_by = {"device": self.device, "split": job.split}
        if job.refused:
            outcome = BatchOutcome([None] * job.size, job.head_s, item_errors=[_REFUSED] * job.size,
                                   served_by=served_by)
        else:
            outcome = BatchOutcome([_NO_OUTPUTS] * job.size, job.head_s + job.run_s, served_by=served_by)
        job.on_done(job.dispatch, outcome)


class SimOffloadView:
    """The split policy's view of the simulated world (``agent.offload.planner.OffloadView``)."""

    def __init__(self, offload: "SimOffload", status_interval_s: float) -> None:
        self.offload = offload
        self.status_interval_s = status_interval_s
        self._next_status = -math.inf
        self._queue_s: dict[str, float] = {}
        self._status_at = -math.inf
        self._offers: dict[str, dict[str, list[SplitCost]]] = {}
        for device, executor in offload.executors.items():
            offers: dict[str, list[SplitCost]] = {}
            spec = executor.peer.spec
            advertised = 1.0 / spec.speed        # the peer advertises its tail times unloaded
            for name, model in offload.models.items():
                board = offload.tables.get(name)
                if board is None:
                    continue
                costs = [SplitCost(None, None, full_table(board, advertised), model.input_bytes_per_item)]
                for split in model.splits:
                    costs.append(SplitCost(split.name, split.scaled("head_ms", board),
                                           split.scaled("tail_ms", board, advertised),
                                           split.bytes_per_item / spec.codec_ratio, spec.codec_s_per_item))
                offers[name] = costs
            self._offers[device] = offers

    def local_table(self, model: str) -> LatencyTable | None:
        return self.offload.tables.get(model)

    def peer_snapshots(self, now: float) -> list[PeerSnapshot]:
        if now >= self._next_status:       # each peer's status refreshed: its queue as of now
            self._next_status = now + self.status_interval_s
            self._status_at = now
            self._queue_s = {device: ex.peer.backlog_s(now) for device, ex in self.offload.executors.items()}
        snaps = []
        for device, executor in self.offload.executors.items():
            spec = executor.peer.spec
            offers = self._offers[device]
            queue = max(0.0, self._queue_s.get(device, 0.0) - (now - self._status_at))   # drained since, as live
            lanes = {lane_name(model, cost.split): queue for model, costs in offers.items() for cost in costs}
            snaps.append(PeerSnapshot(device, spec.rtt_s, spec.bandwidth_Bps, lanes, offers, spec.slots,
                                      status_at=self._status_at))
        return snaps


class SimOffload:
    """The offload model of one simulated run: peers, links, executors, the view; built by
    ``agent.sim.engine.simulate`` when it is given peers."""

    def __init__(self, peers: Sequence[SimPeerSpec], tables: Mapping[str, LatencyTable],
                 models: Sequence[SimOffloadModel] | Mapping[str, SimOffloadModel], local: SimExecutor,
                 clock: Any, post: Callable[[float, Any, Any], None]) -> None:
        devices = [p.device for p in peers]
        if len(set(devices)) != len(devices):
            raise ValueError(f"peer devices must be unique, got {devices}")
        if "local" in devices:
            raise ValueError("a peer cannot be called 'local' (the target of this board)")
        self.tables = dict(tables)
        self.models = dict(models) if isinstance(models, Mapping) else {m.name: m for m in models}
        self.local = local
        self.clock = clock
        self.post = post
        self.driver = None                 # set by the engine once the driver exists
        self.ids = itertools.count(1)
        self.outstanding = 0               # batches released and not answered yet
        self.batches = 0
        self.counters: Counter = Counter()
        self._placements: Counter = Counter()
        self.peers = {spec.device: SimPeer(spec, clock, post) for spec in peers}
        self.executors = {device: SimOffloadExecutor(self, peer) for device, peer in self.peers.items()}
        self.view: SimOffloadView | None = None

    def policy_options(self, offload: OffloadConfig | None) -> dict:
        """What the scheduler's policy reads: ``{"offload": config, "offload_view": view}``."""
        config = offload if offload is not None else OffloadConfig(peers=tuple(self.peers))
        self.view = SimOffloadView(self, config.status_interval_s)
        return {"offload": config, "offload_view": self.view}

    def sent(self, device: str, model: str, split: str | None, size: int) -> None:
        self.batches += 1
        self._placements[f"{device}:{split or FULL}"] += 1
        self.local.histogram.setdefault(model, Counter())[size] += 1

    def placements(self, local_batches: int) -> dict[str, int]:
        out = {"local": local_batches} if local_batches else {}
        return {**out, **dict(sorted(self._placements.items()))}

    def stats(self) -> dict:
        return {"peer_gone": self.counters["peer_gone"],
                "peers": {device: {"bytes_sent": peer.link.bytes_sent, **dict(peer.counters)}
                          for device, peer in self.peers.items()}}


__all__ = ["FULL", "SimLink", "SimOffload", "SimOffloadExecutor", "SimOffloadModel", "SimOffloadView", "SimPeer",
           "SimPeerSpec", "SimSplit"]
