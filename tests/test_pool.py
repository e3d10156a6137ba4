"""Scale-out through the broker: three agents, real processes, serving one pool through an MQTT v5
shared subscription on a real Mosquitto (``[mqtt] pools``; DESIGN.md's pool topic).

What they prove: an application that publishes to ``edge/v1/pool/<group>/infer/<model>`` once per
request, knowing no board, gets exactly one reply per request with the load spread over the three;
a refusal says which board refused; when one board is killed mid-load the rest of the pool takes
the load at once (its pool connection has a clean session: the broker stops handing it requests),
and what the dead board held is counted and, with the client's re-send, answered once anyway.
"""
from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from agent.client import InferenceClient
from agent.config import CONFIG_VERSION
from tests.agent_process import AgentProcess
from tests.waiting import wait_for as _wait

MODEL = "resnet_digits"
GROUP = "cams"
DEVICES = ("pool-a", "pool-b", "pool-c")



class PoolAgent(AgentProcess):
    """``edge-agent run`` serving the pool, as its own process."""

    def __init__(self, tmp_path: Path, broker, device: str) -> None:
        super().__init__(tmp_path, device, f"""
config_version = {CONFIG_VERSION}
[agent]
device = "{device}"
workers = 1
[mqtt]
host = "{broker.host}"
port = {broker.port}
pools = ["{GROUP}"]
[telemetry]
interval_s = 0
[[models]]
name = "{MODEL}"
card = "demo:{MODEL}"
default_slo_ms = 2000
[models.batching]
max_batch = 4
""")


class PoolApp:
    """An application of the pool: every reply, by correlation."""

    def __init__(self, broker, name: str, resend_after_s: float | None = None) -> None:
        self.client = InferenceClient(broker.host, broker.port, "-", name, pool=GROUP, resend_after_s=resend_after_s)
        self.lock = threading.Lock()
        self.replies: dict[bytes, dict] = {}
        self.sent: list[tuple[bytes, float]] = []
        self.second_replies = 0

    def send(self, frame, slo_ms: float) -> None:
        box: list = []
        correlation = self.client.send(MODEL, {"frames": frame}, lambda reply, rtt: self._got(box, reply),
                                       slo_ms=slo_ms)
        with self.lock:
            box.append(correlation)
            self.sent.append((correlation, time.monotonic()))

    def _got(self, box, reply) -> None:
        _wait(lambda: box, 5.0, "the correlation")
        with self.lock:
            if box[0] in self.replies:
                self.second_replies += 1
            self.replies[box[0]] = reply

    def answered(self) -> int:
        with self.lock:
            return len(self.replies)

    def close(self) -> None:
        self.client.close()


@pytest.fixture(scope="module")
def pool(broker, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pool")
    agents = [PoolAgent(tmp, broker, device) for device in DEVICES]
    try:
        for agent in agents:
            _wait(agent.ready, 90.0, f"{agent.device} to take pooled requests")
        yield agents
    finally:
        for agent in agents:
            agent.close()


def _play(app: PoolApp, frames, n: int, rate_per_s: float, slo_ms: float, at=None) -> None:
    start = time.monotonic()
    for i in range(n):
        if at is not None and i in at:
            at[i]()
        app.send(frames[i % len(frames)][None], slo_ms)
        delay = start + (i + 1) / rate_per_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def test_the_pool_spreads_the_load_and_answers_each_request_once(pool, broker, digits):
    frames, labels = digits
    app = PoolApp(broker, "pool-app-spread")
    try:
        n = 180
        _play(app, frames, n, rate_per_s=60.0, slo_ms=3000)
        _wait(lambda: app.answered() == n, 60.0, "every reply")
        time.sleep(0.3)                                     # a second reply would arrive about now
        assert app.second_replies == 0 and app.client.duplicate_replies == 0
        replies = [app.replies[c] for c, _ in app.sent]
        assert all(r["status"] == "ok" for r in replies), Counter(r.get("error", {}).get("code") for r in replies)
        served = Counter(r["served_by"]["device"] for r in replies)
        assert set(served) == set(DEVICES), served          # each board took a share ...
        assert min(served.values()) >= n // 6, served       # ... a real one (the broker balances)
        predicted = np.array([int(np.argmax(r["outputs"]["logits"])) for r in replies])
        expected = np.array([labels[i % len(frames)] for i in range(n)])
        assert (predicted == expected).mean() > 0.9         # real outputs of the real model
    finally:
        app.close()


def test_a_refusal_in_the_pool_names_the_board_that_refused(pool, broker, digits):
    frames, _ = digits
    app = PoolApp(broker, "pool-app-refused")
    try:
        for i in range(12):
            app.send(frames[i][None], slo_ms=0.01)          # no board can answer in 10 microseconds
        _wait(lambda: app.answered() == 12, 30.0, "every refusal")
        replies = list(app.replies.values())
        assert {r["status"] for r in replies} == {"error"}
        codes = Counter(r["error"]["code"] for r in replies)
        print(f"\npool refusals: {dict(codes)}; {replies[0]['error']}")
        assert set(codes) <= {"rejected", "deadline_missed"}
        assert codes["rejected"] >= 1, codes                # admission control refused, and says so ...
        assert all("deadline cannot be met" in r["error"]["message"]    # ... with its reason
                   for r in replies if r["error"]["code"] == "rejected")
        assert {r["served_by"]["device"] for r in replies} <= set(DEVICES)
        assert len({r["served_by"]["device"] for r in replies}) >= 2
    finally:
        app.close()


def test_a_board_killed_mid_load_costs_only_what_it_held_and_a_resend_answers_that(pool, broker, digits):
    """One board stalls (SIGSTOP) halfway, so the broker hands it requests it never answers, then
    is killed (SIGKILL): what it held gets no reply from it; the client's re-send after
    ``resend_after_s`` reaches the living boards, so every request is answered exactly once;
    requests sent after the kill go to the living boards only."""
    frames, _ = digits
    victim = pool[-1]
    app = PoolApp(broker, "pool-app-kill", resend_after_s=1.5)
    killed_at: list[float] = []

    def stall_then_kill() -> None:
        victim.process.send_signal(signal.SIGSTOP)
        time.sleep(0.5)
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(10)
        killed_at.append(time.monotonic())

    def kill() -> None:
        threading.Thread(target=stall_then_kill, daemon=True).start()

    try:
        n = 320
        _play(app, frames, n, rate_per_s=80.0, slo_ms=1000, at={n // 2: kill})
        _wait(lambda: app.answered() == n, 60.0, "every reply")
        time.sleep(0.3)
        assert app.second_replies == 0                      # the client passes each on once
        replies = {c: app.replies[c] for c, _ in app.sent}
        by_device = Counter(r["served_by"]["device"] for r in replies.values())
        assert app.client.resent >= 1          # the stalled board held some: they were re-sent ...
        assert by_device[victim.device] < n // 3    # ... and answered by the living boards
        after = [replies[c] for c, t in app.sent if t > killed_at[0] + 0.5]
        assert after and all(r["served_by"]["device"] != victim.device for r in after)
        assert all(r["status"] == "ok" for r in after), Counter(r.get("error", {}).get("code") for r in after)
        print(f"\npool kill: {app.client.resent} requests re-sent after the kill "
              f"(held by {victim.device}), served by {dict(by_device)}")
    finally:
        app.close()


def test_the_pool_bench_config_is_one_the_agent_loads(tmp_path):
    """``bench pool`` writes its agents' configs itself: the agent's own loader must take them."""
    from agent.config import load_config
    from edge_lab.bench.pool import GROUP as BENCH_GROUP, agent_toml
    path = tmp_path / "a.toml"
    path.write_text(agent_toml("pool_a", MODEL, ("10.0.0.1", 1883), 200.0))
    config = load_config(path)
    assert config.mqtt.pools == (BENCH_GROUP,) and config.mqtt.session_expiry_s == 0
    assert config.models[0].name == MODEL
