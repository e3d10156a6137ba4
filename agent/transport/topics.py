"""The v1 topic names (DESIGN.md, "MQTT topics"), built in one place.

Every topic the agent, its peers and its applications use is spelled here, so a topic handler,
a client and a test cannot drift apart on a level's name. Each builder takes the last level as
an argument that defaults to ``+``: called without it, it gives the filter that subscribes to
every model (or command); called with it, the topic one message is published to.

A pool is served through an MQTT v5 shared subscription: every agent of the group subscribes to
``$share/<group>/edge/v1/pool/<group>/infer/+`` and the broker hands each request to one of
them. Messages still arrive on the plain topic, so a router matches them with :func:`unshared`.
"""
from __future__ import annotations

__all__ = [
    "ROOT", "SHARED_PREFIX",
    "infer_topic", "offload_topic", "offload_reply_topic", "probe_topic", "probe_reply_topic", "cmd_topic",
    "fleet_cmd_topic", "status_topic", "telemetry_topic",
    "pool_infer_topic", "shared", "unshared",
]

#: The first levels of every v1 topic.
ROOT = "edge/v1"
#: MQTT v5 shared subscriptions: ``$share/<group>/<filter>``.
SHARED_PREFIX = "$share/"


def infer_topic(device: str, model: str = "+") -> str:
    """Requests from applications to one board: ``edge/v1/<device>/infer/<model>``."""
    return f"{ROOT}/{device}/infer/{model}"


def offload_topic(device: str, model: str = "+") -> str:
    """Partial computations from a peer board: ``edge/v1/<device>/offload/<model>``."""
    return f"{ROOT}/{device}/offload/{model}"


def offload_reply_topic(device: str, model: str = "+") -> str:
    """Where a board takes its peers' offload replies (the response topic it gives them):
    ``edge/v1/<device>/offload-reply/<model>``."""
    return f"{ROOT}/{device}/offload-reply/{model}"


def probe_topic(device: str) -> str:
    """Link probes from a board to a peer that serves offload (``agent.offload.probe``):
    ``edge/v1/<device>/probe``. Answered at once, no model run, on the probe's response topic."""
    return f"{ROOT}/{device}/probe"


def probe_reply_topic(device: str) -> str:
    """Where a board takes the answers to its link probes (the response topic it gives them):
    ``edge/v1/<device>/probe-reply``. Apart from ``offload-reply``, so that an answer to a probe
    never reaches the batches' reply handler."""
    return f"{ROOT}/{device}/probe-reply"


def cmd_topic(device: str, command: str = "+") -> str:
    """Signed control commands to one board: ``edge/v1/<device>/cmd/<command>``."""
    return f"{ROOT}/{device}/cmd/{command}"


def fleet_cmd_topic(command: str = "+") -> str:
    """Signed control commands to every board: ``edge/v1/fleet/cmd/<command>``."""
    return f"{ROOT}/fleet/cmd/{command}"


def status_topic(device: str) -> str:
    """The board's retained status (and its last will, ``offline``): ``edge/v1/<device>/status``."""
    return f"{ROOT}/{device}/status"


def telemetry_topic(device: str) -> str:
    """The board's periodic metrics: ``edge/v1/<device>/telemetry``."""
    return f"{ROOT}/{device}/telemetry"


def pool_infer_topic(group: str, model: str = "+") -> str:
    """Requests to any board of a group: ``edge/v1/pool/<group>/infer/<model>``. An agent subscribes
    to ``shared(group, pool_infer_topic(group))``; an application publishes here."""
    return f"{ROOT}/pool/{group}/infer/{model}"


def shared(group: str, topic_filter: str) -> str:
    """The shared-subscription form of a filter: ``$share/<group>/<filter>``."""
    if not group or any(c in group for c in "/+#"):
        raise ValueError(f"group = {group!r}: expected a non-empty name without '/', '+' or '#'")
    return f"{SHARED_PREFIX}{group}/{topic_filter}"


def unshared(topic_filter: str) -> str:
    """The filter that a subscription's messages match: ``$share/<group>/x/+`` -> ``x/+``; any
    other filter unchanged."""
    if topic_filter.startswith(SHARED_PREFIX):
        _, _, rest = topic_filter[len(SHARED_PREFIX):].partition("/")
        return rest
    return topic_filter


#: MQTT's limit on a topic name, in UTF-8 bytes.
MAX_TOPIC_BYTES = 65535


def publish_topic_problem(topic: object) -> str | None:
    """Why ``topic`` cannot be published to (MQTT v5, 4.7: a non-empty UTF-8 string of at most
    65,535 bytes, without the wildcards ``+`` and ``#`` or the null character), or ``None`` if it can.
    Checked before a publish, so a response topic an application got wrong is an unanswerable
    request, not an exception on the thread that publishes."""
    if not isinstance(topic, str) or not topic:
        return f"response topic {topic!r}: expected a non-empty topic name"
    if "+" in topic or "#" in topic:
        return f"response topic {topic!r}: a wildcard ('+' or '#') cannot be published to"
    if "\x00" in topic:
        return f"response topic {topic!r}: contains the null character"
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        return f"response topic {topic!r}: not valid UTF-8"
    if size > MAX_TOPIC_BYTES:
        return f"response topic of {size} bytes: more than MQTT's {MAX_TOPIC_BYTES}"
    return None
