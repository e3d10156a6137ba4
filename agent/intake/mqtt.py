"""MQTT v5 intake: ``edge/v1/<device>/infer/<model>`` in, a reply on the request's response topic.

One subscriber of the agent's transport (:class:`agent.transport.connection.MqttTransport`), which
owns the connection, the status and the last will. Thin by design (handlers run on paho's network
thread, which reads every request): decode, validate, ``Agent.submit_inline``, return. The reply is
published by the worker that finished the batch (queued there; the network thread writes it, joined
with the others waiting: ``DirectClient``); on an idle board (nothing queued or running, no
request for a moment: ``Scheduler.start_alone``) the network thread runs the request itself and its
reply leaves with the read's acknowledgements, as the HTTP intake does: no thread hand-off. Every
request that carries a response topic gets exactly one reply, an error reply included; one without
a response topic that can be published to (none, or a wildcard) cannot be answered, so it is
counted and logged (rate-limited), not run.

Exactly once to the application: the wire is at-least-once (QoS 1; a broker re-sends what it has
no acknowledgement for after a reconnect, and an application re-sends its unacknowledged requests
too), so the intake remembers each request by (response topic, correlation data) until its
deadline plus ``[mqtt] dedup_grace_s`` and drops a second copy (counted in ``duplicates``): a
request is answered once however often it arrives. The memory is bounded (``[mqtt] dedup_max``;
the entry nearest its expiry goes first, counted in ``dedup_evicted``). An application must not
reuse correlation data on one response topic within that time for a different request.

Pools (``[mqtt] pools``): the same handler also takes ``edge/v1/pool/<group>/infer/<model>`` through
the shared subscription ``$share/<group>/...``; the broker gives each request to one board of the
group. Every reply, a refusal included, names the board in ``served_by.device``, so an application
that published to a pool learns which board answered or refused.

While the agent drains (``stop_taking``) a persistent session holds the topic instead of
unsubscribing: requests that arrive then stay with the broker, unacknowledged, for the next run.
"""
from __future__ import annotations

import hashlib
import heapq
import logging
import threading
import time
from concurrent.futures import Future

from paho.mqtt.client import MQTTMessage
from paho.mqtt.enums import MQTTErrorCode

from agent.api import Agent
from agent.errors import InferenceError
from agent.intake.msgpack_codec import decode_request, encode_reply, error_reply, result_reply
from agent.telemetry import Counters
from agent.transport.connection import MqttTransport
from agent.transport.paho_client import PublishProperties, reply_address
from agent.transport.topics import infer_topic, pool_infer_topic, publish_topic_problem, shared

log = logging.getLogger(__name__)

#: An unanswerable request is logged at most once per this many seconds (with the count since).
UNANSWERABLE_LOG_INTERVAL_S = 10.0
#: What the intake counts (``MqttIntake.counters``): distinct requests taken, second copies
#: dropped, replies handed to the transport, requests that got none, remembered requests evicted.
COUNTERS = ("taken", "duplicates", "replied", "unanswerable", "dedup_evicted")


def request_key(response_topic: str, correlation: bytes) -> bytes:
    """What a request is remembered by: a 16-byte digest of its response topic and correlation
    data, not the two themselves (a client may send 64 KiB of each: kept as they are, a full map
    would hold gigabytes; the digest bounds an entry to a couple of hundred bytes)."""
    digest = hashlib.blake2b(response_topic.encode(), digest_size=16)
    digest.update(b"\0")
    digest.update(correlation)
    return digest.digest()


class SeenRequests:
    """The requests seen lately, by key, each until its own expiry: a bounded map whose entries
    leave at their expiry, or the one nearest its expiry first when the map is full."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # Added to on the network thread, read by operators and tests from theirs.
        self._lock = threading.Lock()
        self._expiry: dict[bytes, float] = {}
        # (expiry, key), stale entries skipped. No tie-break counter: keys (request_key digests) are
        # bytes and order ties themselves, and a counter was a fifth of an entry's memory, which
        # counts: the window holds an entry per request for its deadline plus the grace
        # (BENCHMARKS.md, issue 21's RSS target).
        self._heap: list[tuple[float, bytes]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, key: object) -> bool:
        return key in self._expiry

    def seen(self, key: bytes, now: float) -> bool:
        """Whether ``key`` was added and has not expired at ``now``."""
        with self._lock:
            expiry = self._expiry.get(key)
        return expiry is not None and expiry > now

    def add(self, key: bytes, expiry: float, now: float) -> int:
        """Remember ``key`` until ``expiry``; returns how many live entries had to be evicted."""
        with self._lock:
            return self._add(key, expiry, now)

    def _add(self, key: bytes, expiry: float, now: float) -> int:
        evicted = 0
        heap = self._heap
        while heap and (heap[0][0] <= now or len(self._expiry) >= self.capacity):
            when, old = heapq.heappop(heap)
            if self._expiry.get(old) == when:
                del self._expiry[old]
                evicted += when > now
        self._expiry[key] = expiry
        heapq.heappush(heap, (expiry, key))
        if len(heap) > 4 * self.capacity:       # re-added keys left stale entries behind: rebuild
            self._heap = [(when, k) for k, when in self._expiry.items()]
            heapq.heapify(self._heap)
        return evicted

    def keys(self) -> list:
        with self._lock:
            return list(self._expiry)


class MqttIntake:
    """Takes the agent's inference requests from its transport and answers every one."""

    def __init__(self, agent: Agent, transport: MqttTransport) -> None:
        self.agent = agent
        self.transport = transport
        self.device = agent.config.device
        self.topic_filter = infer_topic(self.device)      # edge/v1/<device>/infer/+
        # $share/<group>/edge/v1/pool/<group>/infer/+ for each pool the board serves, taken on a
        # connection of their own (attach_pools)
        self.pool_filters = tuple(shared(g, pool_infer_topic(g)) for g in agent.config.mqtt.pools)
        self.pool_transport: MqttTransport | None = None
        self.max_payload = agent.config.max_payload_bytes
        mqtt = agent.config.mqtt
        self.dedup_grace_s = mqtt.dedup_grace_s
        self._seen = SeenRequests(mqtt.dedup_max)     # touched on the network thread only
        self.counters = Counters(*COUNTERS)
        self._lock = threading.Lock()
        self._logged_at = -UNANSWERABLE_LOG_INTERVAL_S
        self._unlogged = 0

    @property
    def unanswerable(self) -> int:
        """Requests without a response topic one can publish to, or whose reply was not published."""
        return self.counters["unanswerable"]

    @property
    def remembered(self) -> int:
        """Requests remembered now (a second copy of one within its window is dropped)."""
        return len(self._seen)

    def seen_keys(self) -> set[bytes]:
        """The :func:`request_key` of each request remembered now (the broker-restart bench tells
        with it which requests reached the agent)."""
        return set(self._seen.keys())

    def start(self, timeout: float = 10.0) -> "MqttIntake":
        """Subscribe to the agent's inference topics. Before the transport connects this registers
        (the transport's connect waits for the broker's acknowledgement); after, it returns once the
        broker has acknowledged: from then on no request published to them is missed."""
        self.transport.subscribe(self.topic_filter, self._on_message, qos=1, timeout=timeout)
        log.info("taking requests for %s on %s", sorted(self.agent.models), self.topic_filter)
        return self

    def attach_pools(self, transport: MqttTransport, timeout: float = 10.0) -> "MqttIntake":
        """Take the pools' requests (``[mqtt] pools``) on ``transport``: a connection with a clean
        session, apart from the board's own. Why apart: the broker keeps handing a shared
        subscription's messages to a member whose session outlives it, so a dead board with the
        persistent session of its own topic would park a share of the pool's requests until it
        returns; with a clean session the broker forgets it at once and the living boards take
        the pool. Replies still go out on the board's own connection."""
        self.pool_transport = transport
        for topic_filter in self.pool_filters:
            transport.subscribe(topic_filter, self._on_message, qos=1, timeout=timeout)
        if self.pool_filters:
            log.info("taking pooled requests on %s", ", ".join(self.pool_filters))
        return self

    # --- network thread: decode, validate, submit, return --------------------------------------

    def _on_message(self, message: MQTTMessage) -> None:
        response_topic, correlation = reply_address(message)
        problem = publish_topic_problem(response_topic) if response_topic else "no response topic"
        if problem is not None:
            self._unanswerable(message.topic, problem)
            return
        model = message.topic.rsplit("/", 1)[-1]
        now = time.monotonic()
        key = request_key(response_topic, correlation) if correlation is not None else None
        if key is not None and self._seen.seen(key, now):
            self.counters.add("duplicates")     # answered (or being answered) already
            return
        self.counters.add("taken")
        request_id = None
        expiry = now + self.dedup_grace_s       # a request that does not decode: answered once too
        try:
            try:
                request = decode_request(message.payload, self.max_payload)
            except Exception:
                if key is not None:
                    self._remember(key, expiry, now)
                raise
            request_id = request.id
            if key is not None:                 # until its deadline (plus the grace)
                self._remember(key, expiry + self._budget_s(model, request), now)
            # On an idle board the request runs here, on the network thread, and its reply is
            # written with the read's acknowledgements (Agent.submit_inline, as HTTP does).
            self.agent.submit_inline(model, request.inputs,
                                     lambda f: self._reply(f, response_topic, correlation, request.id),
                                     slo_ms=request.slo_ms, deadline=request.deadline, priority=request.priority,
                                     client_id=request.id, min_accuracy=request.min_accuracy)
        except InferenceError as exc:
            if request_id is None:
                request_id = getattr(exc, "request_id", None)
            self._publish(response_topic, correlation, self._error_reply(request_id, exc))
            return
        except Exception as exc:  # never let one request take down the network thread
            log.exception("unexpected failure on %s", message.topic)
            self._publish(response_topic, correlation,
                          self._error_reply(request_id, InferenceError("internal", f"{type(exc).__name__}: {exc}")))
            return

    def _budget_s(self, model: str, request) -> float:
        """Seconds from now to the request's deadline (as the agent will read it)."""
        if request.deadline is not None:
            return max(0.0, request.deadline - time.time())
        if request.slo_ms is not None:
            return max(0.0, float(request.slo_ms) / 1000.0)
        loaded = self.agent.models.get(model)
        return loaded.config.default_slo_ms / 1000.0 if loaded is not None else 0.0

    def _remember(self, key: bytes, expiry: float, now: float) -> None:
        evicted = self._seen.add(key, expiry, now)
        if evicted:
            self.counters.add("dedup_evicted", evicted)

    # --- worker threads: the reply -------------------------------------------------------------

    def _reply(self, future: Future, response_topic: str, correlation: bytes | None, request_id: str) -> None:
        error = future.exception()
        if error is None:
            reply = result_reply(future.result(), request_id)
        elif isinstance(error, InferenceError):
            reply = self._error_reply(request_id, error)
        else:
            reply = self._error_reply(request_id, InferenceError("internal", f"{type(error).__name__}: {error}"))
        self._publish(response_topic, correlation, reply)

    def _error_reply(self, request_id: str | None, error: InferenceError) -> dict:
        """An error reply that names this board (``served_by.device``: which board of a pool refused)."""
        reply = error_reply(request_id, error)
        reply["served_by"] = {"device": self.device}
        return reply

    def _publish(self, response_topic: str, correlation: bytes | None, reply: dict) -> None:
        """Publish a reply; a failure is counted and logged, never raised into the calling thread
        (paho's network thread, or the worker that finished the batch)."""
        props = PublishProperties()     # paho's Properties, a tenth of their cost on the worker
        try:
            if correlation is not None:
                props.CorrelationData = correlation
            info = self.transport.publish(response_topic, encode_reply(reply), qos=1, properties=props)
        except Exception as exc:
            self._unanswerable(response_topic, f"reply not published: {type(exc).__name__}: {exc}")
            return
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            self._unanswerable(response_topic, "reply dropped: the outgoing queue is full (broker away too long)")
        else:
            self.counters.add("replied")

    def _unanswerable(self, where: str, why: str) -> None:
        """Count a request that gets no reply; log it, at most once per UNANSWERABLE_LOG_INTERVAL_S."""
        now = time.monotonic()
        total = self.counters.add("unanswerable")
        with self._lock:
            if now - self._logged_at < UNANSWERABLE_LOG_INTERVAL_S:
                self._unlogged += 1
                return
            self._logged_at, unlogged, self._unlogged = now, self._unlogged, 0
        log.warning("request on %s not answered: %s (%d unanswerable so far, %d not logged since the last)",
                    where, why, total, unlogged)

    def stop_taking(self) -> None:
        """Take no new request while the agent drains (replies still go out). With a persistent
        session the topic is held: what arrives now stays with the broker, unacknowledged, and is
        delivered to the agent's next run; with a clean session it is unsubscribed. A pool's shared
        subscription is always dropped: the broker then hands the group's requests to its other boards."""
        if self.transport.session_expiry_s > 0:
            self.transport.hold(self.topic_filter)
        else:
            self.transport.unsubscribe(self.topic_filter)
        if self.pool_transport is not None:     # a pool's: the group's other boards take them
            for topic_filter in self.pool_filters:
                self.pool_transport.unsubscribe(topic_filter)
