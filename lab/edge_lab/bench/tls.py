"""What TLS to the broker costs (``edge-agent bench tls``): the connect (TCP, the TLS handshake with
a client certificate, MQTT CONNECT/CONNACK) and a request's round trip through the agent, plain
against TLS, on loopback Mosquitto brokers of its own.

Two brokers, one plain and one TLS with client certificates and the shipped ACL
(firmware_configs/mosquitto/acl), each with an agent serving the demo's small model at batch 1; the
requests go one at a time, alternating plain and TLS, so both see the same machine (the figures go
to BENCHMARKS.md). Certificates are made in a temporary directory (EC P-256, as edge_lab.certs does).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

from agent.config import CONFIG_VERSION, parse_config
from agent.transport.paho_client import MqttSecurity, connect, make_client

__all__ = ["bench_tls", "format_tls"]

MODEL = "mobilenet_digits"
ACL = Path(__file__).resolve().parents[3] / "firmware_configs" / "mosquitto" / "acl"


def _quantiles(samples_s: list[float]) -> dict:
    ms = sorted(s * 1e3 for s in samples_s)
    return {"n": len(ms), "p50_ms": statistics.median(ms), "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))]}


def rounds(requests: int = 500, connects: int = 50) -> int:
    """How many rounds :func:`bench_tls` runs (its ``tick`` calls): the connects, the requests and
    their warm-up tenth."""
    return connects + requests + requests // 10


def bench_tls(requests: int = 500, connects: int = 50, tick: Callable[[], None] = lambda: None) -> dict:
    """``tick`` is called after each round (a connect each way, or a request each way): a progress
    bar's step, :func:`rounds` of them in all."""
    from agent.client import InferenceClient
    from agent.service import Service
    from edge_lab.bench.overhead import _frame
    from edge_lab.broker import BrokerTls, LocalBroker
    from edge_lab.certs import CertificateAuthority
    with tempfile.TemporaryDirectory(prefix="edge-agent-bench-tls-") as tmp:
        ca = CertificateAuthority(tmp)
        server = ca.server()
        board, app = ca.client("board-1"), ca.client("app-bench")

        def security(pair) -> MqttSecurity:
            return MqttSecurity(tls=True, ca_file=ca.ca_file, cert_file=pair.cert_file, key_file=pair.key_file)

        def config(broker, tls: bool):
            mqtt = {"host": broker.host, "port": broker.port}
            if tls:
                mqtt.update(tls_ca=ca.ca_file, tls_cert=board.cert_file, tls_key=board.key_file)
            return parse_config({"config_version": CONFIG_VERSION, "agent": {"device": "board-1", "workers": 1},
                                 "mqtt": mqtt, "telemetry": {"interval_s": 0},
                                 "models": [{"name": MODEL, "card": f"demo:{MODEL}",
                                             "batching": {"rule": "deadline_aware", "max_batch": 1}}]})

        with LocalBroker() as plain_broker, \
                LocalBroker(tls=BrokerTls(ca.ca_file, server.cert_file, server.key_file), acl_file=str(ACL)) as tls_broker, \
                Service(config(plain_broker, False)), Service(config(tls_broker, True)):
            sides = {"plain": (plain_broker, None), "tls": (tls_broker, security(app))}
            connect_s: dict[str, list[float]] = {name: [] for name in sides}
            for i in range(connects):
                for name, (broker, sec) in sides.items():
                    client = make_client(f"app-bench-{name}-{i}", security=sec)
                    started = time.perf_counter()
                    connect(client, broker.host, broker.port)
                    connect_s[name].append(time.perf_counter() - started)
                    client.disconnect()
                    client.loop_stop()
                tick()
            clients = {name: InferenceClient(broker.host, broker.port, "board-1", "app-bench", security=sec)
                       for name, (broker, sec) in sides.items()}
            inputs = {"frames": _frame()}
            round_trip_s: dict[str, list[float]] = {name: [] for name in sides}
            try:
                for i in range(requests + requests // 10):
                    for name, client in clients.items():
                        started = time.perf_counter()
                        reply = client.infer(MODEL, inputs, slo_ms=1000)
                        elapsed = time.perf_counter() - started
                        if reply["status"] != "ok":
                            raise RuntimeError(f"bench tls: an error reply over {name}: {reply.get('error')}")
                        if i >= requests // 10:        # the first tenth warms up
                            round_trip_s[name].append(elapsed)
                    tick()
            finally:
                for client in clients.values():
                    client.close()
    return {"connect": {name: _quantiles(s) for name, s in connect_s.items()},
            "round_trip": {name: _quantiles(s) for name, s in round_trip_s.items()}}


def format_tls(figures: dict) -> str:
    lines = [f"{'':<28} {'plain p50 ms':>13} {'TLS p50 ms':>11} {'plain p99 ms':>13} {'TLS p99 ms':>11} {'n':>6}"]
    for key, label in (("connect", "connect (TCP+TLS+CONNACK)"), ("round_trip", "request round trip")):
        plain, tls = figures[key]["plain"], figures[key]["tls"]
        lines.append(f"{label:<28} {plain['p50_ms']:>13.3f} {tls['p50_ms']:>11.3f} {plain['p99_ms']:>13.3f} "
                     f"{tls['p99_ms']:>11.3f} {plain['n']:>6}")
    return "\n".join(lines)
