"""The operator's side of the command channel: publish one signed command, collect its acks.

``edge-agent ctl`` uses it. The command is signed here (:func:`agent.ops.signing.sign`) and
published at QoS 1 with a response topic of this client's own and the command id as correlation
data; each board answers once there. A command to one board waits for its ack; a fleet command
collects the acks that arrive within the timeout (how many boards there are is not known here).
If no ack came within half the timeout, the same envelope is published once more: a board that
did run it answers the repeat with its first ack (same command id), so a retry never runs a
command twice. Each ack names the board that sent it (``device``).

A broker restart while the command is in flight: the client keeps a session for as long as it waits
(and ends it on leaving), subscribed again on every connect, so an ack published while it
reconnects waits for it in the broker; an ack that arrives twice (QoS 1 is at-least-once: a board
re-sends one the broker took but did not acknowledge before it went down) is counted once, one
per board.

Behind a secured broker ``security`` carries TLS and credentials (``edge-agent ctl --tls-ca ...``);
the sample ACL lets an operator's identity publish on ``edge/v1/+/cmd/#`` and read
``edge/v1/ctl/+/ack``, where this client's acks arrive.
"""
from __future__ import annotations

import math
import threading
import time
import uuid

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.ops.signing import FLEET, decode_ack
from agent.transport.paho_client import MqttSecurity, connect, make_client
from agent.transport.topics import cmd_topic, fleet_cmd_topic

__all__ = ["send_command"]

#: MQTT v5 reason code of a PUBACK the broker's ACL refused.
NOT_AUTHORIZED = 0x87
#: The session ctl asks the broker to keep outlives its wait by this much (seconds).
SESSION_SLACK_S = 30


def send_command(host: str, port: int, device: str, command: str, envelope: bytes, command_id: str, *,
                 timeout_s: float = 10.0, security: MqttSecurity | None = None) -> list[dict]:
    """Publish ``envelope`` (already signed for ``device``) and return the acks received: one from a
    board, or for :data:`FLEET` every one that arrived within ``timeout_s``. An empty list: none came.
    Raises ``PermissionError`` when the broker refuses the publish (its ACL: PUBACK "Not authorized")."""
    client_id = f"edge-agent-ctl-{uuid.uuid4().hex[:12]}"
    reply_topic = f"edge/v1/ctl/{client_id}/ack"
    correlation = command_id.encode()
    acks: list[dict] = []
    arrived = threading.Condition()
    subscribed = threading.Event()

    def on_message(client, userdata, message) -> None:
        props = message.properties
        if getattr(props, "CorrelationData", None) != correlation:
            return
        try:
            ack = decode_ack(message.payload)
        except Exception as exc:
            ack = {"command_id": command_id, "ok": False, "code": "bad_ack", "reason": str(exc), "result": None}
        with arrived:
            if all(seen.get("device") != ack.get("device") for seen in acks):
                acks.append(ack)            # the first from each board: a repeat is the same ack again
            arrived.notify_all()

    puback: dict[int, object] = {}
    client = make_client(client_id, security=security)
    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_publish = lambda client_, userdata, mid, reason_code, properties: puback.__setitem__(mid, reason_code)
    # Subscribed on every connect (a broker that lost the session lost the subscription with it).
    client.on_connect = lambda client_, userdata, flags, reason_code, properties: (
        reason_code.is_failure or client_.subscribe(reply_topic, qos=1))
    connect(client, host, port, session_expiry_s=int(math.ceil(timeout_s)) + SESSION_SLACK_S)
    try:
        if not subscribed.wait(5.0):
            raise TimeoutError(f"broker {host}:{port} did not acknowledge the subscription to {reply_topic}")
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_topic
        props.CorrelationData = correlation
        topic = fleet_cmd_topic(command) if device == FLEET else cmd_topic(device, command)
        start = time.monotonic()
        info = client.publish(topic, envelope, qos=1, properties=props)
        info.wait_for_publish(timeout_s)
        refused = puback.get(info.mid)
        if refused is not None and getattr(refused, "value", 0) == NOT_AUTHORIZED:
            raise PermissionError(f"broker {host}:{port} refused this client's command on {topic}: {refused} "
                                  "(its ACL does not let this identity publish commands)")
        deadline = start + timeout_s
        # Resent once to a single board (its repeat is answered with the first ack); a fleet's
        # boards that answered already would only answer again.
        resend_at = start + timeout_s / 2 if device != FLEET else math.inf
        with arrived:
            while True:
                now = time.monotonic()
                if now >= deadline or (acks and device != FLEET):
                    break
                if now >= resend_at:
                    client.publish(topic, envelope, qos=1, properties=props)
                    resend_at = math.inf
                arrived.wait(min(deadline, resend_at) - now)
        return list(acks)
    finally:
        end_session = Properties(PacketTypes.DISCONNECT)
        end_session.SessionExpiryInterval = 0       # nothing more to wait for: the broker may forget us
        client.disconnect(properties=end_session)
        client.loop_stop()
