"""The peer role: partial work from other boards on ``edge/v1/<device>/offload/<model>``.

A transport subscriber (``[mqtt] subscribers`` gets ``offload`` with ``[offload] serve = true``),
thin as the inference intake: on paho's network thread it decodes and checks the message
(``agent.offload.wire``), and hands each item to the agent as one request into the tail's lane
(``<model>@<split>``, ``agent.offload.tails``; the model's own lane for full offload) with its own
deadline: the tails are queued, admitted and batched by this agent's scheduler beside its local
requests, so a peer under load refuses an item (``rejected``, admission's reason) instead of
answering it late. An item's input is its row of the message's batch tensor, a view of the payload
(no copy). The reply, one per message, goes when every item is answered, from the thread that
answered the last one (a worker), on the response topic with the correlation data.

Exactly once: the same message delivered again (a QoS 1 re-send after a reconnect) is dropped by
(response topic, correlation data) until its last deadline plus ``[mqtt] dedup_grace_s``, as the
inference intake does (``SeenRequests``, ``request_key``). A malformed message gets an error
reply naming the field; one without a response topic is counted and dropped.

What the peer offers is in its retained status (``Agent.offload_status``), refreshed every
``[offload] status_interval_s`` by this subscriber so that boards see its queue delays and drop it
when it stops refreshing; the refresh carries this subscriber's counters too (``offload.serve.counters``).

Boards' link probes (``agent.offload.probe``) arrive on ``edge/v1/<device>/probe``, a topic of their
own: answered at once on the network thread (:class:`~agent.offload.probe.ProbeAnswerer`), never
queued behind this agent's work and never mistaken for a batch.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future

import numpy as np
from paho.mqtt.client import MQTTMessage

from agent.errors import INTERNAL, UNKNOWN_MODEL, InferenceError
from agent.intake.mqtt import SeenRequests, request_key
from agent.offload import wire
from agent.offload.probe import ANSWER_COUNTERS, ProbeAnswerer
from agent.offload.splits import lane_name
from agent.telemetry import Counters
from agent.transport.paho_client import PublishProperties, reply_address
from agent.transport.topics import offload_topic, publish_topic_problem

log = logging.getLogger(__name__)

COUNTERS = ("messages", "items", "duplicates", "replied", "refused_messages", "unanswerable", *ANSWER_COUNTERS)


class _Gather:
    """One offload message's items being answered; the last answer sends the reply."""

    def __init__(self, handler: "PeerHandler", batch: str, n: int, response_topic: str, correlation, received: float,
                 split: str | None) -> None:
        self.handler = handler
        self.batch = batch
        self.response_topic, self.correlation = response_topic, correlation
        self.received = received
        self.split = split
        self.results: list = [None] * n
        self.errors: list[InferenceError | None] = [None] * n
        self._left = n
        self._lock = threading.Lock()

    def done(self, i: int, result=None, error: InferenceError | None = None) -> None:
        self.results[i], self.errors[i] = result, error
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self.handler._send(self)

    def callback(self, i: int):
        def on_done(future: Future) -> None:
            error = future.exception()
            if error is None:
                self.done(i, future.result())
            else:
                self.done(i, error=error if isinstance(error, InferenceError)
                          else InferenceError(INTERNAL, f"{type(error).__name__}: {error}"))
        return on_done


class PeerHandler:
    """Serves other boards' offloaded batches through this agent's scheduler."""

    def __init__(self, agent, transport) -> None:
        self.agent = agent
        self.transport = transport
        self.device = agent.config.device
        self.topic_filter = offload_topic(self.device)
        self.max_payload = agent.config.max_payload_bytes
        self.dedup_grace_s = agent.config.mqtt.dedup_grace_s
        self._seen = SeenRequests(agent.config.mqtt.dedup_max)
        self.counters = Counters(*COUNTERS)
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        self.probes = ProbeAnswerer(transport, self.device, self.max_payload, self.counters)

    def start(self, timeout: float = 10.0) -> "PeerHandler":
        self.transport.subscribe(self.topic_filter, self._on_message, qos=1, timeout=timeout)
        self.transport.subscribe(self.probes.topic, self.probes.on_message, qos=1, timeout=timeout)
        self._refresher = threading.Thread(target=self._refresh, name="offload-status", daemon=True)
        self._refresher.start()
        log.info("serving offload on %s: tails %s", self.topic_filter, sorted(self.agent.tails))
        return self

    def _refresh(self) -> None:
        """Publish the retained status every ``status_interval_s`` (queue delays, free slots)."""
        interval = self.agent.config.offload.status_interval_s
        while not self._stop.wait(interval):
            if self.transport.connected:
                try:
                    status = self.agent.status()
                    serve = status.get("offload", {}).get("serve")
                    if isinstance(serve, dict):
                        serve["counters"] = self.counters.snapshot()
                    self.transport.publish_status(status)
                except Exception:
                    log.exception("could not refresh the status")

    # --- network thread -------------------------------------------------------------------------

    def _on_message(self, message: MQTTMessage) -> None:
        response_topic, correlation = reply_address(message)
        if publish_topic_problem(response_topic) is not None:
            self.counters.add("unanswerable")
            log.warning("offload message on %s without a usable response topic: dropped", message.topic)
            return
        now = time.monotonic()
        key = request_key(response_topic, correlation) if correlation is not None else None
        if key is not None and self._seen.seen(key, now):
            self.counters.add("duplicates")
            return
        self.counters.add("messages")
        model = message.topic.rsplit("/", 1)[-1]
        try:
            request = wire.decode_request(message.payload, self.max_payload)
        except InferenceError as exc:
            if key is not None:
                self._seen.add(key, now + self.dedup_grace_s, now)
            self._refuse(response_topic, correlation, getattr(exc, "batch", None), exc)
            return
        if key is not None:
            self._seen.add(key, now + max(0.0, max(request.deadlines) - time.time()) + self.dedup_grace_s, now)
        lane = lane_name(model, request.split)
        if model not in self.agent.models or (request.split is not None and lane not in self.agent.tails):
            offered = sorted(t.partition("@")[2] for t in self.agent.tails if t.partition("@")[0] == model)
            what = (f"no model {model!r} is loaded here" if model not in self.agent.models
                    else f"model {model!r} is not served split at {request.split!r} here; split points served: {offered}")
            self._refuse(response_topic, correlation, request.batch,
                         InferenceError(UNKNOWN_MODEL, what, "split" if model in self.agent.models else "model"))
            return
        n = request.size
        self.counters.add("items", n)
        gather = _Gather(self, request.batch, n, response_topic, correlation, now, request.split)
        for i in range(n):
            inputs = {name: array[i:i + 1] for name, array in request.inputs.items()}
            try:
                future = self.agent.submit_offload(lane, inputs, deadline=request.deadlines[i],
                                                   priority=request.priority,
                                                   client_id=f"{request.origin}/{request.batch}/{i}")
            except InferenceError as exc:
                gather.done(i, error=exc)
                continue
            except Exception as exc:    # never let one message take the network thread down
                log.exception("offload item %d of batch %s from %s failed", i, request.batch, request.origin)
                gather.done(i, error=InferenceError(INTERNAL, f"{type(exc).__name__}: {exc}"))
                continue
            future.add_done_callback(gather.callback(i))

    def _refuse(self, response_topic: str, correlation, batch: str | None, error: InferenceError) -> None:
        self.counters.add("refused_messages")
        self._publish(response_topic, correlation, wire.encode_reply(batch, error=error))

    # --- the thread that answered the last item -------------------------------------------------

    def _send(self, gather: _Gather) -> None:
        try:
            payload = self._encode(gather)
        except Exception as exc:
            log.exception("offload reply to batch %s could not be encoded", gather.batch)
            payload = wire.encode_reply(gather.batch, error=InferenceError(INTERNAL, f"{type(exc).__name__}: {exc}"))
        self._publish(gather.response_topic, gather.correlation, payload)

    def _encode(self, gather: _Gather) -> bytes:
        ok = [r for r in gather.results if r is not None]
        outputs = {}
        if ok:
            for name, first in ok[0].outputs.items():    # a row per item, zeros where one failed
                first = np.asarray(first)
                outputs[name] = np.concatenate([np.asarray(r.outputs[name]).reshape(first.shape) if r is not None
                                          else np.zeros_like(first) for r in gather.results])
        timing = {"queue_ms": max((r.queue_ms for r in ok), default=0.0),
                  "compute_ms": max((r.compute_ms for r in ok), default=0.0),
                  "total_ms": 1000.0 * (time.monotonic() - gather.received)}
        served_by = dict(ok[0].served_by) if ok else {"device": self.device}
        served_by["split"] = gather.split
        return wire.encode_reply(gather.batch, outputs=outputs, errors=gather.errors, timing=timing,
                                 served_by=served_by)

    def _publish(self, response_topic: str, correlation, payload: bytes) -> None:
        props = PublishProperties()
        if correlation is not None:
            props.CorrelationData = correlation
        try:
            self.transport.publish(response_topic, payload, qos=1, properties=props)
            self.counters.add("replied")
        except Exception:
            self.counters.add("unanswerable")
            log.exception("offload reply to %s not published", response_topic)

    def stop_taking(self) -> None:
        self._stop.set()
        self.transport.unsubscribe(self.probes.topic)     # a probe is never worth keeping for later
        if self.transport.session_expiry_s > 0:
            self.transport.hold(self.topic_filter)
        else:
            self.transport.unsubscribe(self.topic_filter)


__all__ = ["PeerHandler"]
