"""Transport security against a real Mosquitto on loopback (issue 22, item 4): TLS with client
certificates made in the test (a CA, a server certificate for 127.0.0.1, client certificates whose
CN is the identity), the shipped ACL (firmware_configs/mosquitto/acl), and a password file.

What it proves: the agent connects over TLS with its certificate and serves an application that
connects the same way; a client without the right identity is refused at the handshake; an
application cannot publish a command (PUBACK 0x87, never delivered); a board cannot read another
board's requests; an operator's signed command is acknowledged, from the library and from
`edge-agent ctl`; a username with a password file connects and a wrong password does not; the
sample broker config parses with its TLS section switched on.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.client import InferenceClient
from agent.config import CONFIG_VERSION, ConfigError, load_config, parse_config
from agent.ops.ctl import send_command
from agent.ops.keys import generate_key_pair, load_signing_key
from agent.ops.signing import sign
from agent.service import Service
from agent.transport import topics
from agent.transport.paho_client import MqttSecurity, SecurityError, connect, make_client
from edge_lab.broker import BrokerTls, LocalBroker, MosquittoNotFound, check_config
from edge_lab.certs import CertificateAuthority

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_ACL = ROOT / "firmware_configs" / "mosquitto" / "acl"
SAMPLE_CONF = ROOT / "firmware_configs" / "mosquitto" / "edge-agent.conf"
BOARD, OTHER_BOARD, APP, OPERATOR = "board-1", "board-2", "app-cam", "op-alice"   # identities of the sample ACL
MODEL = "mobilenet_digits"
NOT_AUTHORIZED = 0x87


def _mosquitto_or_skip():
    try:
        LocalBroker()
    except MosquittoNotFound as exc:
        pytest.skip(f"mosquitto not installed: {exc}")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    base = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(base / "ca")
    rogue_ca = CertificateAuthority(base / "rogue", name="another CA")
    return {"ca": ca, "server": ca.server(), "rogue": rogue_ca.client(BOARD),
            **{name: ca.client(name) for name in (BOARD, OTHER_BOARD, APP, OPERATOR)}}


def _security(pki, identity: str | None) -> MqttSecurity:
    pair = pki[identity] if identity else None
    return MqttSecurity(tls=True, ca_file=pki["ca"].ca_file, cert_file=pair.cert_file if pair else None,
                        key_file=pair.key_file if pair else None)


@pytest.fixture(scope="module")
def tls_broker(pki):
    _mosquitto_or_skip()
    server = pki["server"]
    with LocalBroker(tls=BrokerTls(pki["ca"].ca_file, server.cert_file, server.key_file),
                     acl_file=str(SAMPLE_ACL)) as broker:
        yield broker


@pytest.fixture(scope="module")
def operator_key(tmp_path_factory):
    ops, ring = tmp_path_factory.mktemp("ops"), tmp_path_factory.mktemp("ring")
    generate_key_pair(ops, "alice")
    shutil.copy(ops / "alice.pub", ring / "alice.pub")
    return {"key_file": ops / "alice.key", "key": load_signing_key(ops / "alice.key"), "ring": ring}


@pytest.fixture(scope="module")
def board(tls_broker, pki, operator_key, tmp_path_factory):
    """The agent as board-1, over TLS with its certificate, serving requests and commands. Its
    config names the certificate files relative to itself, as a board's would."""
    directory = tmp_path_factory.mktemp("board")
    for name, source in (("ca.crt", pki["ca"].ca_file), ("board.crt", pki[BOARD].cert_file),
                         ("board.key", pki[BOARD].key_file)):
        shutil.copy(source, directory / name)
    (directory / "agent.toml").write_text(
        f'config_version = 1\n[agent]\ndevice = "{BOARD}"\nworkers = 1\n'
        f'[mqtt]\nhost = "{tls_broker.host}"\nport = {tls_broker.port}\nsubscribers = ["infer", "cmd"]\n'
        f'tls_ca = "ca.crt"\ntls_cert = "board.crt"\ntls_key = "board.key"\n'
        f'[control]\nkeyring = "{operator_key["ring"]}"\n'
        f'[telemetry]\ninterval_s = 0\n'
        f'[[models]]\nname = "{MODEL}"\ncard = "demo:{MODEL}"\n')
    config = load_config(directory / "agent.toml")
    assert config.mqtt.tls and config.mqtt.tls_cert == str(directory / "board.crt")
    with Service(config) as service:
        yield service


class Recorder:
    """A raw paho client that records what arrives, and the broker's PUBACK and SUBACK codes."""

    def __init__(self, broker, security: MqttSecurity, client_id: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.pubacks: dict[int, object] = {}
        self.subacks: dict[int, list] = {}
        self.cond = threading.Condition()
        self.client = make_client(client_id, security=security)
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        connect(self.client, broker.host, broker.port)

    def _on_message(self, client, userdata, message) -> None:
        with self.cond:
            self.messages.append((message.topic, message.payload))
            self.cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self.cond:
            self.pubacks[mid] = reason_code
            self.cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self.cond:
            self.subacks[mid] = list(reason_codes)
            self.cond.notify_all()

    def subscribe(self, topic_filter: str) -> list:
        _, mid = self.client.subscribe(topic_filter, qos=1)
        with self.cond:
            assert self.cond.wait_for(lambda: mid in self.subacks, 10), f"no SUBACK for {topic_filter}"
            return self.subacks[mid]

    def publish(self, topic: str, payload: bytes, properties: Properties | None = None):
        info = self.client.publish(topic, payload, qos=1, properties=properties)
        with self.cond:
            assert self.cond.wait_for(lambda: info.mid in self.pubacks, 10), f"no PUBACK for {topic}"
            return self.pubacks[info.mid]

    def wait_for(self, topic: str, timeout: float = 10.0) -> bytes:
        with self.cond:
            assert self.cond.wait_for(lambda: any(t == topic for t, _ in self.messages), timeout), \
                f"nothing arrived on {topic}; got {[t for t, _ in self.messages]}"
            return next(p for t, p in self.messages if t == topic)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture()
def recorders(tls_broker, pki):
    made: list[Recorder] = []

    def make(identity: str, client_id: str | None = None) -> Recorder:
        made.append(Recorder(tls_broker, _security(pki, identity), client_id or f"{identity}-{time.monotonic_ns()}"))
        return made[-1]

    yield make
    for recorder in made:
        recorder.close()


def _frame() -> dict:
    return {"frames": np.zeros((1, 64, 64, 3), np.uint8)}


# --- serving over TLS ---------------------------------------------------------------------------

def test_the_agent_serves_an_application_over_tls_with_client_certificates(board, tls_broker, pki):
    assert board.transport.connected and board.transport.security.tls
    app = InferenceClient(tls_broker.host, tls_broker.port, BOARD, APP, security=_security(pki, APP))
    try:
        reply = app.infer(MODEL, _frame(), slo_ms=5000, timeout=30)
    finally:
        app.close()
    assert reply["status"] == "ok", reply
    assert reply["outputs"]


def test_a_client_without_the_right_identity_is_refused(tls_broker, pki):
    ca = pki["ca"].ca_file
    rogue = pki["rogue"]
    refused = {
        "no certificate": MqttSecurity(tls=True, ca_file=ca),
        "a certificate from another CA": MqttSecurity(tls=True, ca_file=ca, cert_file=rogue.cert_file,
                                                      key_file=rogue.key_file),
        "plain TCP": MqttSecurity(),
    }
    for what, security in refused.items():
        client = make_client(f"intruder-{time.monotonic_ns()}", security=security)
        with pytest.raises(ConnectionError) as caught:
            connect(client, tls_broker.host, tls_broker.port, timeout=10)
        assert f"{tls_broker.host}:{tls_broker.port}" in str(caught.value), what
    # And the client checks the broker: a CA that did not sign the broker's certificate.
    rogue_ca = str(Path(rogue.cert_file).parent / "ca.crt")
    client = make_client(f"trusting-{time.monotonic_ns()}",
                         security=MqttSecurity(tls=True, ca_file=rogue_ca, cert_file=pki[APP].cert_file,
                                               key_file=pki[APP].key_file))
    with pytest.raises(ConnectionError, match="certificate verify failed"):
        connect(client, tls_broker.host, tls_broker.port, timeout=10)


# --- the ACL ------------------------------------------------------------------------------------

def test_an_application_cannot_publish_a_command(tls_broker, recorders):
    spy = recorders(BOARD)              # the board's identity: it may read its own and the fleet's commands
    assert not spy.subscribe(topics.cmd_topic(BOARD, "#"))[0].is_failure
    assert not spy.subscribe(topics.fleet_cmd_topic("#"))[0].is_failure
    app, operator = recorders(APP), recorders(OPERATOR)
    for topic in (topics.cmd_topic(BOARD, "drain"), topics.fleet_cmd_topic("drain")):
        code = app.publish(topic, b"from an application")
        assert code.value == NOT_AUTHORIZED, (topic, code)
    # The operator's publish, after the application's, arrives: the application's never did.
    for topic in (topics.cmd_topic(BOARD, "probe"), topics.fleet_cmd_topic("probe")):
        assert not operator.publish(topic, b"from the operator").is_failure
        assert spy.wait_for(topic) == b"from the operator"
    assert all(payload != b"from an application" for _, payload in spy.messages), spy.messages


def test_a_board_cannot_read_another_boards_requests(tls_broker, recorders):
    first, second = recorders(BOARD), recorders(OTHER_BOARD)
    assert not first.subscribe(topics.infer_topic(BOARD))[0].is_failure
    stolen = second.subscribe(topics.infer_topic(BOARD))[0]      # refused, or granted and never delivered
    assert not second.subscribe(topics.infer_topic(OTHER_BOARD))[0].is_failure
    app = recorders(APP)
    assert not app.publish(topics.infer_topic(BOARD, "m"), b"for board-1").is_failure
    assert not app.publish(topics.infer_topic(OTHER_BOARD, "m"), b"for board-2").is_failure
    assert first.wait_for(topics.infer_topic(BOARD, "m")) == b"for board-1"
    assert second.wait_for(topics.infer_topic(OTHER_BOARD, "m")) == b"for board-2"
    assert stolen.is_failure or all(t != topics.infer_topic(BOARD, "m") for t, _ in second.messages), second.messages


def test_a_board_cannot_be_made_to_publish_a_command_through_a_response_topic(board, tls_broker, recorders):
    """An application names another board's command topic as its response topic: the agent's reply
    there is refused by the broker (a board writes only reply topics), so nothing arrives."""
    spy = recorders(OTHER_BOARD)
    assert not spy.subscribe(topics.cmd_topic(OTHER_BOARD, "#"))[0].is_failure
    app = recorders(APP, APP)
    assert not app.subscribe(f"apps/{APP}/#")[0].is_failure
    from agent.intake.msgpack_codec import encode_request
    for response_topic in (topics.cmd_topic(OTHER_BOARD, "drain"), f"apps/{APP}/replies"):
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = response_topic
        props.CorrelationData = response_topic.encode()
        assert not app.publish(topics.infer_topic(BOARD, MODEL), encode_request("x", _frame(), slo_ms=5000),
                               props).is_failure
    app.wait_for(f"apps/{APP}/replies", timeout=30)     # the second was answered: the first was handled before it
    time.sleep(0.2)
    assert not spy.messages, spy.messages


# --- commands -----------------------------------------------------------------------------------

def test_the_operators_signed_command_over_tls_is_acked_and_an_application_is_refused(board, tls_broker, pki,
                                                                                      operator_key):
    envelope = sign("status", {}, BOARD, operator_key["key"])
    from agent.ops.signing import decode_envelope
    command_id = decode_envelope(envelope)[0].command_id
    acks = send_command(tls_broker.host, tls_broker.port, BOARD, "status", envelope, command_id, timeout_s=20,
                        security=_security(pki, OPERATOR))
    assert len(acks) == 1 and acks[0]["ok"], acks
    with pytest.raises(PermissionError, match="refused"):
        send_command(tls_broker.host, tls_broker.port, BOARD, "status", sign("status", {}, BOARD, operator_key["key"]),
                     "x", timeout_s=5, security=_security(pki, APP))


def test_edge_agent_ctl_connects_with_a_client_certificate(board, tls_broker, pki, operator_key):
    operator = pki[OPERATOR]
    run = subprocess.run([sys.executable, "-m", "agent.cli", "ctl", "--device", BOARD, "--key",
                          str(operator_key["key_file"]), "--host", tls_broker.host, "--port", str(tls_broker.port),
                          "--tls-ca", pki["ca"].ca_file, "--tls-cert", operator.cert_file, "--tls-key",
                          operator.key_file, "--timeout", "20", "--compact", "status"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert '"ok": true' in run.stdout, run.stdout
    # A certificate without its key is named before anything is sent.
    run = subprocess.run([sys.executable, "-m", "agent.cli", "ctl", "--device", BOARD, "--key",
                          str(operator_key["key_file"]), "--tls-ca", pki["ca"].ca_file, "--tls-cert",
                          operator.cert_file, "status"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--tls-key" in run.stderr, run.stderr


# --- username and password ----------------------------------------------------------------------

def _mosquitto_passwd() -> str:
    found = shutil.which("mosquitto_passwd")
    if not found:
        pytest.skip("mosquitto_passwd not installed (it comes with the mosquitto package)")
    return found


def test_a_username_with_a_password_file(tmp_path):
    _mosquitto_or_skip()
    passwd = tmp_path / "passwd"
    subprocess.run([_mosquitto_passwd(), "-c", "-b", str(passwd), BOARD, "s3cret board"], check=True,
                   capture_output=True)
    secret = tmp_path / "board.password"
    secret.write_text("s3cret board\n")
    os.chmod(secret, 0o600)
    wrong = tmp_path / "wrong.password"
    wrong.write_text("guess\n")
    os.chmod(wrong, 0o600)
    with LocalBroker(password_file=str(passwd), acl_file=str(SAMPLE_ACL)) as broker:
        base = {"config_version": CONFIG_VERSION, "agent": {"device": BOARD, "workers": 1},
                "models": [{"name": MODEL, "card": f"demo:{MODEL}"}], "telemetry": {"interval_s": 0}}
        config = parse_config({**base, "mqtt": {"host": broker.host, "port": broker.port, "username": BOARD,
                                                "password_file": "board.password"}}, base_dir=tmp_path)
        with Service(config) as service:
            assert service.transport.connected
        for security in (MqttSecurity(username=BOARD, password_file=str(wrong)), MqttSecurity()):
            client = make_client(f"guesser-{time.monotonic_ns()}", security=security)
            with pytest.raises(ConnectionError, match="refused the connection"):
                connect(client, broker.host, broker.port)
    os.chmod(secret, 0o644)
    with pytest.raises(ConfigError, match=r"mqtt\.password_file.*only its owner may read.*0644"):
        parse_config({**base, "mqtt": {"username": BOARD, "password_file": str(secret)}})


# --- configuration ------------------------------------------------------------------------------

def test_tls_settings_are_validated_at_load(tmp_path, pki):
    base = {"config_version": CONFIG_VERSION, "models": [{"name": MODEL}]}

    def load(**mqtt):
        return parse_config({**base, "mqtt": mqtt}, base_dir=tmp_path)

    shutil.copy(pki["ca"].ca_file, tmp_path / "ca.crt")
    config = load(tls_ca="ca.crt")
    assert config.mqtt.tls and config.mqtt.port == 8883 and config.mqtt.tls_ca == str(tmp_path / "ca.crt")
    assert not config.mqtt.tls_insecure
    assert load().mqtt.port == 1883 and not load().mqtt.security().enabled
    with pytest.raises(ConfigError, match=r"mqtt\.tls_ca = .*missing\.crt"):
        load(tls_ca="missing.crt")
    with pytest.raises(ConfigError, match=r"mqtt\.tls_key .*tls_cert and tls_key together"):
        load(tls_ca="ca.crt", tls_cert=pki[BOARD].cert_file)
    with pytest.raises(ConfigError, match=r"mqtt\.tls_cert = .*matching"):        # another identity's key
        load(tls_ca="ca.crt", tls_cert=pki[BOARD].cert_file, tls_key=pki[APP].key_file)
    with pytest.raises(ConfigError, match=r"mqtt\.tls = False"):
        load(tls=False, tls_ca="ca.crt")
    with pytest.raises(ConfigError, match=r"mqtt\.password = '\(hidden\)'.*password_file"):
        load(username="u", password="p")
    with pytest.raises(ConfigError, match=r"mqtt\.password_file .*username"):
        (tmp_path / "pw").write_text("x\n")
        os.chmod(tmp_path / "pw", 0o600)
        load(password_file="pw")
    with pytest.raises(SecurityError):
        MqttSecurity(tls=False, insecure=True)


def test_the_sample_broker_config_parses_with_tls_and_the_acl(tmp_path, pki):
    """firmware_configs/mosquitto/edge-agent.conf with its TLS section switched on (the `#directive`
    lines uncommented, the plain listener off), the site paths pointed at this test's files."""
    _mosquitto_or_skip()
    server = pki["server"]
    paths = {"cafile": pki["ca"].ca_file, "certfile": server.cert_file, "keyfile": server.key_file,
             "acl_file": str(SAMPLE_ACL), "persistence_location": f"{tmp_path}/"}
    lines = []
    for line in SAMPLE_CONF.read_text().splitlines():
        if line.startswith(("listener 1883", "allow_anonymous true", "log_dest")):
            continue                                    # the lab's plain listener; logs to our pipe
        match = re.match(r"^#(\w+)( .*)?$", line)       # a commented-out directive, not "# prose"
        if match:
            line = line[1:]
        key = line.split(" ", 1)[0]
        if key in paths:
            line = f"{key} {paths[key]}"
        elif key == "listener":
            line = f"listener {_free_port()} 127.0.0.1"
        lines.append(line)
    text = "\n".join(lines + ["log_dest stdout"] + (["user root"] if os.geteuid() == 0 else [])) + "\n"
    assert "require_certificate true" in text and "use_identity_as_username true" in text
    conf = tmp_path / "edge-agent.conf"
    conf.write_text(text)
    log = check_config(conf, seconds=1.0)
    assert "running" in log, log


def _free_port() -> int:
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
