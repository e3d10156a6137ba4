"""The idle link probe: a board measures its link to a peer when no offload traffic does.

The peer table (``agent.offload.peers``) learns a link from this board's own batches. A board that
sends a peer nothing (its split policy chose to run here because the link looked slow, or the peer
was just discovered) would never learn that the link got better, or what it is at all. So when a
live peer (one of ``[offload] peers``/``peer``) has had no batch from this board, and no reply, for
``[offload] probe_idle_s``, the board probes it:

* **A round** is two probes, one after the other (at most one outstanding per peer): a *small* one
  (about a hundred bytes each way) and, when ``[offload] probe_bytes`` > 0, a *big* one carrying
  ``probe_bytes`` of random padding to the peer (sized like a split tensor; the answer stays small).
  The first probe of a round finds both ends idle (threads asleep, caches cold) and the second
  right behind it does not; measured on loopback the first was the slower by about as much as
  64 KiB take there, which would bias the fit if the small one always went first. So the order
  alternates from round to round, and the bias falls on both sizes alike.
  Rounds repeat every ``probe_idle_s`` while the peer stays idle; a batch or its reply puts them off.
* **What is measured**: each answered probe's time on the network, ``network_s`` = answer arrived
  here - probe published here - the time the peer says it held the probe (``held_ms``, from its
  arrival on the peer's network thread to its answer's publish), against the bytes it carried both
  ways (the probe's payload and its answer's). Both go into the same exponentially weighted fit as
  the batches' round trips, ``network_s = rtt + bytes / bandwidth`` (``LinkFit``): the small probe
  pins the intercept (the round trip), the big one the slope (so the bandwidth is the board-to-peer
  direction's, through the broker, with the padding's bytes, less the small probe's round trip,
  over its time). With ``probe_bytes = 0`` only round trips are probed; the bandwidth then comes
  from traffic alone. Every probe (and its answer) passes the broker twice like a batch, so the
  broker's own forwarding time is part of the round trip, as it is for a batch.
* **What it can see** (``edge-agent bench probe``, figures in BENCHMARKS.md): the round trip
  closely on every link shape; the bandwidth only as well as the big probe's size allows. A link
  that lets a burst through at its line rate (a token bucket, a radio's aggregation) carries a
  probe no bigger than its burst faster than its rate, so the estimate errs on the fast side;
  a probe much smaller than what the link moves in a millisecond or two drowns in the jitter.
  The default size, one item's split tensor after the codec, is what one item of a batch weighs:
  the link as an idle board's first batch finds it. Erring fast is the side the board wants
  (``agent.offload.view``: an optimistic estimate gets a batch sent, and the batches' own round
  trips then correct it; a pessimistic one would keep the board from ever trying); a larger
  ``probe_bytes`` measures the sustained rate, at the cost of the link's time while it is idle
  (the big probe holds a slow link for its whole transfer, and a batch sent then waits behind it).
* **Bounded**: one probe outstanding per peer; an answer not back within ``probe_timeout_s``
  (``max(2 s, 2 x probe_idle_s)``) is counted ``lost`` and the next round may start; an answer
  after that, or one for no probe of ours, is counted ``late`` and dropped. A peer that is
  forgotten (its will, a stale status) is not probed, and its outstanding probe is dropped.

The wire (msgpack, v1, QoS 1 both ways, as the batches and every reply go: a probe then takes
the batches' own path through the broker; a board that reconnects drops its outstanding probes
(:meth:`Prober.on_session`), so an answer held across the outage is counted ``late`` and never
measures it): a probe on ``edge/v1/<peer>/probe`` is
``{v: 1, origin, probe: id, pad?: bytes}``, with an MQTT v5 response topic (the board's
``edge/v1/<board>/probe-reply``) and correlation data ``probe:<id>``; the answer is ``{v: 1, probe:
id, status: "ok", held_ms, bytes}`` (``bytes``: the probe payload's size as received) or ``{v: 1,
probe: id|nil, status: "error", error: {code, message, field}}``. Probes have their own topics, so
neither side's batch handling ever sees one: the peer answers on its network thread at once, busy
or not, with no model run (:class:`ProbeAnswerer`); the board's answers arrive on a handler of their
own, apart from the batches' ``offload-reply`` (the batches' exactly-once accounting never sees a
probe). A malformed probe gets an error answer naming the field; one without a usable response
topic is counted and dropped; neither stops a thread.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from paho.mqtt.enums import MQTTErrorCode

from agent.errors import ERROR_CODES, InferenceError
from agent.intake.msgpack_codec import _show, pack
from agent.offload.peers import PeerTable
from agent.offload.wire import _bad, _name, check_size, unpack_map
from agent.telemetry import Counters, RateLimitedLog
from agent.transport.paho_client import PublishProperties, reply_address
from agent.transport.topics import probe_reply_topic, probe_topic, publish_topic_problem

log = logging.getLogger(__name__)

PROBE_WIRE_VERSION = 1
#: Correlation data of a probe: this prefix and the probe's id.
CORRELATION_PREFIX = b"probe:"
#: What the board side counts (the status's ``offload.client.probes``).
COUNTERS = ("sent", "answered", "lost", "late", "bad_answers", "refused", "send_failed", "dropped")
#: What the peer side counts (``PeerHandler.counters``).
ANSWER_COUNTERS = ("probes", "bad_probes", "unanswerable_probes")
#: A probe's answer is given up after ``max(this, 2 x probe_idle_s)``.
MIN_PROBE_TIMEOUT_S = 2.0
#: The default big probe's padding is one item's split tensor (after the codec), within these.
DEFAULT_PROBE_BYTES_RANGE = (4 * 1024, 1024 * 1024)


def default_probe_bytes(sent_bytes_per_item: Iterable[float]) -> int:
    """``[offload] probe_bytes`` left out: the most one item puts on the wire at any split point this
    board loaded (its whole input for full offload), so the big probe weighs about what an item of a
    batch does; within :data:`DEFAULT_PROBE_BYTES_RANGE`."""
    low, high = DEFAULT_PROBE_BYTES_RANGE
    return int(min(high, max([low, *(float(b) for b in sent_bytes_per_item)])))


# --- the wire ----------------------------------------------------------------------------------------

@dataclass(slots=True)
class Probe:
    origin: str
    probe: str
    pad_bytes: int


@dataclass(slots=True)
class ProbeAnswer:
    probe: str | None
    error: InferenceError | None
    held_ms: float = 0.0
    received_bytes: int = 0


def encode_probe(origin: str, probe: str, pad: bytes = b"") -> bytes:
    """What a board publishes to ``edge/v1/<peer>/probe``."""
    message: dict[str, Any] = {"v": PROBE_WIRE_VERSION, "origin": origin, "probe": probe}
    if pad:
        message["pad"] = pad
    return pack(message)


def decode_probe(payload: bytes, max_payload_bytes: int) -> Probe:
    """Bytes to a :class:`Probe`, every field checked; raises ``InferenceError`` naming the field
    (with the probe's id on it as ``probe`` when it could be read)."""
    check_size(payload, max_payload_bytes, "probe payload")
    message = unpack_map(payload, "probe")
    probe = message.get("probe")
    try:
        if message.get("v") != PROBE_WIRE_VERSION:
            raise _bad(f"v = {_show(message.get('v'))}: expected {PROBE_WIRE_VERSION}", "v")
        for key in ("origin", "probe"):
            if not _name(message.get(key)):
                raise _bad(f"{key} = {_show(message.get(key))}: expected a non-empty string", key)
        pad = message.get("pad", b"")
        if not isinstance(pad, bytes):
            raise _bad(f"pad = {_show(pad)}: expected bytes", "pad")
    except InferenceError as exc:
        exc.probe = probe if _name(probe) else None
        raise
    return Probe(message["origin"], probe, len(pad))


def encode_probe_answer(probe: str | None, *, held_ms: float = 0.0, received_bytes: int = 0,
                        error: InferenceError | None = None) -> bytes:
    """The peer's answer: ``ok`` with its hold time and the bytes it received, or ``error``."""
    message: dict[str, Any] = {"v": PROBE_WIRE_VERSION, "probe": probe}
    if error is not None:
        message["status"] = "error"
        message["error"] = error.as_dict()
    else:
        message.update(status="ok", held_ms=float(held_ms), bytes=int(received_bytes))
    return pack(message)


def decode_probe_answer(payload: bytes) -> ProbeAnswer:
    """The board's side: a peer's answer, checked; raises ``InferenceError`` naming the field."""
    message = unpack_map(payload, "probe answer")
    if message.get("v") != PROBE_WIRE_VERSION:
        raise _bad(f"v = {_show(message.get('v'))}: expected {PROBE_WIRE_VERSION}", "v")
    probe = message.get("probe") if _name(message.get("probe")) else None
    status = message.get("status")
    if status == "error":
        error = message.get("error")
        if (not isinstance(error, dict) or error.get("code") not in ERROR_CODES
                or not isinstance(error.get("message"), str)):
            raise _bad(f"error = {_show(error)}: expected {{code, message}} with a code of {ERROR_CODES}", "error")
        field = error.get("field") if isinstance(error.get("field"), str) else None
        return ProbeAnswer(probe, InferenceError(error["code"], error["message"], field))
    if status != "ok":
        raise _bad(f"status = {_show(status)}: expected 'ok' or 'error'", "status")
    held = message.get("held_ms")
    if not isinstance(held, (int, float)) or isinstance(held, bool) or not math.isfinite(held) or held < 0:
        raise _bad(f"held_ms = {_show(held)}: expected a number >= 0", "held_ms")
    received = message.get("bytes")
    if not isinstance(received, int) or isinstance(received, bool) or received < 0:
        raise _bad(f"bytes = {_show(received)}: expected an integer >= 0", "bytes")
    return ProbeAnswer(probe, None, float(held), received)


# --- the peer: answer at once ----------------------------------------------------------------------

class ProbeAnswerer:
    """Answers probes on ``edge/v1/<device>/probe`` on the network thread: no queue, no model."""

    def __init__(self, transport, device: str, max_payload_bytes: int, counters: Counters) -> None:
        self.transport = transport
        self.topic = probe_topic(device)
        self.max_payload = max_payload_bytes
        self.counters = counters
        self._refused_log = RateLimitedLog(log)

    def on_message(self, message) -> None:
        received = time.monotonic()
        response_topic, correlation = reply_address(message)
        if publish_topic_problem(response_topic) is not None:
            self.counters.add("unanswerable_probes")
            log.debug("probe on %s without a usable response topic: dropped", message.topic)
            return
        try:
            probe = decode_probe(message.payload, self.max_payload)
            payload = encode_probe_answer(probe.probe, held_ms=1000.0 * (time.monotonic() - received),
                                          received_bytes=len(message.payload))
            self.counters.add("probes")
        except InferenceError as exc:
            self.counters.add("bad_probes")
            self._refused_log(logging.INFO, "probe on %s refused: %s", message.topic, exc.message)
            payload = encode_probe_answer(getattr(exc, "probe", None), error=exc)
        answer = PublishProperties()
        if correlation is not None:
            answer.CorrelationData = correlation
        try:
            self.transport.publish(response_topic, payload, qos=1, properties=answer)
        except Exception:
            self.counters.add("unanswerable_probes")
            log.exception("probe answer to %s not published", response_topic)


# --- the board: probe idle peers -------------------------------------------------------------------

@dataclass
class _Out:
    probe: str
    sent_at: float
    nbytes: int
    big: bool
    first: bool                          # the round's first probe (its second follows the answer)


@dataclass
class _PeerProbes:
    round_at: float = -math.inf          # when the last round began
    rounds: int = 0
    outstanding: _Out | None = None
    then: bool | None = None             # the round's first probe is answered: its second next (big?)
    sent: int = 0
    answered: int = 0


class Prober:
    """The board's idle probe of its live peers (module docstring). ``idle_s`` 0: off."""

    def __init__(self, peers: PeerTable, device: str, targets: Iterable[str], idle_s: float, probe_bytes: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.peers = peers
        self.device = device
        self.targets = frozenset(targets)
        self.idle_s = float(idle_s)
        self.probe_bytes = int(probe_bytes)
        self.timeout_s = max(MIN_PROBE_TIMEOUT_S, 2.0 * self.idle_s)
        self.clock = clock
        self.counters = Counters(*COUNTERS)
        self.transport = None
        self._answer_log = RateLimitedLog(log, 60.0)     # a peer refusing every big probe says so once a minute
        self._pad = os.urandom(self.probe_bytes) if self.probe_bytes > 0 else b""
        self._lock = threading.Lock()
        self._state: dict[str, _PeerProbes] = {}
        self._by_id: dict[str, str] = {}            # outstanding probe id -> peer
        self._ids = itertools.count(1)
        self._run = f"{time.time_ns():x}"
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.idle_s > 0 and bool(self.targets)

    def attach(self, transport) -> None:
        """Take probe answers on the agent's connection and start probing (before it connects)."""
        if not self.enabled:
            return
        self.transport = transport
        transport.subscribe(probe_reply_topic(self.device), self._on_answer, qos=1)
        transport.on_session(self.on_session)
        self._thread = threading.Thread(target=self._loop, name="offload-probe", daemon=True)
        self._thread.start()

    def status(self) -> dict:
        with self._lock:
            peers = {device: {"sent": st.sent, "answered": st.answered, "outstanding": st.outstanding is not None}
                     for device, st in self._state.items()}
        return {"idle_s": self.idle_s, "probe_bytes": self.probe_bytes, **self.counters.snapshot(), "peers": peers}

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(2.0)

    def on_session(self, session_present: bool) -> None:
        """After a (re)connect: a probe out before it would time the outage, not the link; each is
        dropped (counted ``dropped``) and its answer, if the broker kept it, comes ``late``."""
        with self._lock:
            for st in self._state.values():
                if st.outstanding is not None:
                    self._by_id.pop(st.outstanding.probe, None)
                    st.outstanding, st.then = None, None
                    self.counters.add("dropped")

    # --- the probe thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        tick = min(0.25, max(0.02, self.idle_s / 4))
        while not self._stop.is_set():
            self._wake.wait(tick)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._step()
            except Exception:    # one bad round never ends the probing
                log.exception("offload probe round failed")

    def _step(self) -> None:
        now = self.clock()
        live = {info.device for info in self.peers.live_peers() if info.device in self.targets}
        transport = self.transport
        connected = transport is not None and transport.connected
        idle = {device: self.peers.idle_s(device) for device in live}
        sends = []
        with self._lock:
            for device in [d for d in self._state if d not in live]:     # forgotten: no more probes
                st = self._state.pop(device)
                if st.outstanding is not None:
                    self._by_id.pop(st.outstanding.probe, None)
                    self.counters.add("dropped")
            for device in live:
                st = self._state.setdefault(device, _PeerProbes())
                if st.outstanding is not None:
                    if now - st.outstanding.sent_at < self.timeout_s:
                        continue
                    self._by_id.pop(st.outstanding.probe, None)
                    st.outstanding, st.then = None, None
                    self.counters.add("lost")
                if not connected:
                    continue
                if st.then is not None:                 # the round's second probe
                    big, first, st.then = st.then, False, None
                elif min(idle[device], now - st.round_at) >= self.idle_s:
                    # Alternate which size goes first (module docstring); no big one: small only.
                    big, first = self.probe_bytes > 0 and st.rounds % 2 == 1, True
                    st.round_at, st.rounds = now, st.rounds + 1
                else:
                    continue
                probe_id = f"{self._run}-{next(self._ids)}"
                payload = encode_probe(self.device, probe_id, self._pad if big else b"")
                out = _Out(probe_id, now, len(payload), big, first)
                st.outstanding = out
                st.sent += 1
                self._by_id[probe_id] = device
                sends.append((device, out, payload))
        for device, out, payload in sends:
            self._send(device, out, payload)

    def _send(self, device: str, out: _Out, payload: bytes) -> None:
        props = PublishProperties()
        props.ResponseTopic = probe_reply_topic(self.device)
        props.CorrelationData = CORRELATION_PREFIX + out.probe.encode()
        out.sent_at = self.clock()
        try:
            info = self.transport.publish(probe_topic(device), payload, qos=1, properties=props)
            failed = info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS
        except Exception:
            log.exception("offload probe to %s not published", device)
            failed = True
        if failed:
            self.counters.add("send_failed")
            with self._lock:
                self._by_id.pop(out.probe, None)
                st = self._state.get(device)
                if st is not None and st.outstanding is out:
                    st.outstanding = None
            return
        self.counters.add("sent")

    # --- the network thread: answers --------------------------------------------------------------

    def _on_answer(self, message) -> None:
        arrived = self.clock()
        correlation = reply_address(message)[1]
        probe_id = (bytes(correlation[len(CORRELATION_PREFIX):]).decode(errors="replace")
                    if isinstance(correlation, (bytes, bytearray)) and correlation.startswith(CORRELATION_PREFIX)
                    else None)
        with self._lock:
            device = self._by_id.pop(probe_id, None) if probe_id is not None else None
            st = self._state.get(device) if device is not None else None
            out = st.outstanding if st is not None else None
            if out is None or out.probe != probe_id:
                self.counters.add("late")
                return
            st.outstanding = None
        try:
            answer = decode_probe_answer(message.payload)
        except InferenceError as exc:
            self.counters.add("bad_answers")
            self._answer_log(logging.WARNING, "offload: answer of %s to a probe not understood: %s", device,
                             exc.message)
            return
        if answer.error is not None or answer.probe != probe_id:
            self.counters.add("refused")
            self._answer_log(logging.WARNING, "offload: %s refused a probe: %s", device,
                             answer.error.message if answer.error is not None else f"answered for {answer.probe!r}")
            return
        self.peers.observe(device, arrived - out.sent_at - answer.held_ms / 1000.0,
                           out.nbytes + len(message.payload), source="probe")
        self.counters.add("answered")
        second = out.first and self.probe_bytes > 0
        with self._lock:
            st.answered += 1
            if second and self._state.get(device) is st:
                st.then = not out.big
        if second:
            self._wake.set()


__all__ = ["Probe", "ProbeAnswer", "ProbeAnswerer", "Prober", "default_probe_bytes", "encode_probe", "decode_probe",
           "encode_probe_answer", "decode_probe_answer", "PROBE_WIRE_VERSION", "COUNTERS", "ANSWER_COUNTERS"]
