"""Offload's parts without processes: the [offload] config (errors name the field), the example
configs of the README, the peer table (a will or a stale status forgets a peer), and the fixed
policy's share."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.config import CONFIG_VERSION, ConfigError, load_config, parse_config
from agent.core import FixedBatch
from agent.offload.peers import PeerTable
from agent.scheduler.dispatcher import Scheduler
from tests.scheduling import req

ROOT = Path(__file__).resolve().parent.parent


def _config(**offload):
    return parse_config({"config_version": CONFIG_VERSION, "offload": offload,
                         "models": [{"name": "resnet_digits", "card": "demo:resnet_digits"}]})


def test_offload_defaults_and_serve_adds_the_subscriber():
    config = _config()
    assert (config.offload.serve, config.offload.peer, config.offload.split, config.offload.share) == (False, None, None, 0.5)
    assert config.offload.splits is None and config.offload.targets == () and "offload" not in config.mqtt.subscribers
    served = _config(serve=True, peers=["b", "c"], peer="d", split="stage2", splits=["stage2"])
    assert "offload" in served.mqtt.subscribers and served.offload.targets == ("b", "c", "d")
    assert served.offload.split == "stage2" and served.offload.splits == ("stage2",)


@pytest.mark.parametrize("offload, field", [
    ({"serve": "yes"}, "offload.serve"),
    ({"share": 1.5}, "offload.share"),
    ({"peer": "a/b"}, "offload.peer"),
    ({"peers": ["ok", "+"]}, "offload.peers"),
    ({"models": ["nope"]}, "offload.models"),
    ({"splits": "stage2"}, "offload.splits"),
    ({"status_interval_s": 0}, "offload.status_interval_s"),
    ({"colour": "red"}, "offload.colour"),
])
def test_a_bad_offload_setting_is_named(offload, field):
    with pytest.raises(ConfigError) as info:
        _config(**offload)
    assert info.value.field == field


def test_the_readme_example_configs_load():
    peer = load_config(ROOT / "examples" / "offload" / "peer.toml")
    board = load_config(ROOT / "examples" / "offload" / "board.toml")
    assert peer.offload.serve and "offload" in peer.mqtt.subscribers
    assert board.policy == "offload_fixed" and board.offload.targets == ("board-b",)
    split = load_config(ROOT / "examples" / "offload" / "board-split.toml")
    assert split.policy == "split" and split.offload.targets == ("board-b",) and split.offload.planner == "queue"


def _status(device, state="online", **serve):
    body = {"device": device, "state": state}
    if serve is not None:
        body["offload"] = {"serve": {"models": {"m": {"full": True, "splits": ["s1"]}}, "queue_ms": {"m": 1.5},
                                     "free_slots": 2, "codecs": ["raw"], **serve}}
    return f"edge/v1/{device}/status", json.dumps(body).encode()


def test_the_peer_table_keeps_serving_peers_and_forgets_them_on_their_will_or_silence():
    now = [100.0]
    table = PeerTable("me", stale_s=5.0, clock=lambda: now[0])
    table.on_status(*_status("b"))
    table.on_status(*_status("me"))                          # itself: never a peer
    serves_nothing = json.dumps({"device": "c", "state": "online"}).encode()
    assert table.on_status("edge/v1/c/status", serves_nothing) is None
    info = table.live("b")
    assert info is not None and info.offers_split("m", "s1") and info.offers_split("m", None)
    assert not info.offers_split("m", "s9") and table.live("me") is None and table.live("c") is None
    table.observe("b", 0.004, 4000)
    table.observe("b", 0.002, 4000)
    assert table.rtt_s("b") == 0.002 and table.live("b").samples == 2    # one size: the smallest sample
    # its will: forgotten, and named (what it was sent it will not answer)
    assert table.on_status("edge/v1/b/status", json.dumps({"device": "b", "state": "offline"}).encode()) == "b"
    assert table.live("b") is None
    table.on_status(*_status("b"))
    assert table.live("b").rtt_s is not None                 # the link's measure outlives an absence
    now[0] += 6.0                                            # no refresh for longer than stale_s
    assert table.live("b") is None and table.snapshot() == {}
    table.on_status(*_status("b"), retained=False)
    table.on_status("edge/v1/b/status", b"not json")        # what it cannot read forgets it too
    assert table.live("b") is None


def test_the_fixed_policy_sends_its_share_of_batches_to_the_peer():
    from agent.config import OffloadConfig
    plan = OffloadConfig(peer="board-b", split="stage2", share=0.5)
    scheduler = Scheduler([Scheduler.lane("m", FixedBatch(1), 1, 64)], max_concurrent=1, policy="offload_fixed",
                          policy_options={"offload": plan})
    targets = []
    for _ in range(8):
        scheduler.enqueue(req("m", 0.0, 10.0))
        dispatch = scheduler.poll(0.0).dispatch
        targets.append((dispatch.action.target, dispatch.action.split))
        scheduler.release(dispatch)
    assert targets.count(("board-b", "stage2")) == 4 and targets.count(("local", None)) == 4
    none = Scheduler([Scheduler.lane("m", FixedBatch(1), 1, 64)], max_concurrent=1, policy="offload_fixed")
    none.enqueue(req("m", 0.0, 10.0))
    assert none.poll(0.0).dispatch.action.target == "local"   # no peer configured: all here


def test_the_link_fit_tells_latency_from_bandwidth():
    """Round trips of batches of different sizes over a 100 Mbit/s link with 20 ms of round trip
    (and a little noise): the fit finds both, where one sample's bytes over its time would call it
    a slow link without delay."""
    import random

    from agent.offload.peers import LinkFit
    rng = random.Random(1)
    fit = LinkFit()
    for _ in range(200):
        nbytes = rng.choice((4_096, 32_768, 65_536, 262_144))
        fit.add(nbytes, (0.020 + nbytes / 12.5e6) * rng.uniform(0.97, 1.03))
    rtt, bandwidth = fit.estimate()
    assert 0.017 < rtt < 0.023 and 10e6 < bandwidth < 15e6
    naive = 65_536 / (0.020 + 65_536 / 12.5e6)
    assert naive < 3e6          # what bytes over time alone would have said


def _board_by_hand(device: str):
    """A board agent in this process whose offload client's parts a test drives by hand (offload
    to ``board-p`` configured, MQTT off: nothing is sent), its config, resnet_digits' card and two
    of its test frames."""
    from agent.api import Agent
    from agent.models.card import load_card
    from agent.models.digits import card_test_set
    card = load_card("demo:resnet_digits")
    frames = card_test_set(card.raw["dataset"], card.source.parent)[0][:2]
    config = parse_config({"config_version": CONFIG_VERSION, "agent": {"device": device, "workers": 1},
                           "mqtt": {"enabled": False}, "offload": {"peer": "board-p"},
                           "models": [{"name": "resnet_digits", "card": "demo:resnet_digits",
                                       "default_slo_ms": 5000}]})
    return Agent(config), config, card, frames


def test_items_the_peer_refused_run_here_only_while_this_board_has_room():
    """A peer's refusal (its scheduler's ``rejected`` or ``deadline_missed``) is run on the board's
    fallback only with CPU to spare, an empty queue and a free slot; on a busy board the peer's
    answer is the request's (``refusals_passed_on``), given at the reply without a hand-off to the
    fallback thread, and no time is kept back for a rescue when a batch is sent. A peer that failed
    otherwise (``internal``) is still covered."""
    from agent.errors import DEADLINE_MISSED, INTERNAL, REJECTED, InferenceError
    from agent.offload.cpu import CpuGauge
    from agent.runtime.offload_executor import _Pending
    from agent.scheduler.dispatcher import Dispatch
    from agent.scheduler.policy import Action

    agent, config, card, frames = _board_by_hand("board-r")
    with agent:
        client, scheduler = agent.offload, agent.loop.driver.scheduler

        def rescue(errors, at_reply=False):
            done = []
            now = client.clock()
            requests = [req("resnet_digits", now, 5.0) for _ in range(2)]
            dispatch = Dispatch("resnet_digits", 0, requests, now, Action("resnet_digits", 2, target="board-p"))
            pending = _Pending("b-1", "board-p", dispatch, lambda d, outcome: done.append(outcome), None,
                               {card.inputs[0].name: frames}, now + 5.0, now, 0, 0.0, True)
            partial = ([0, 1], [None, None], errors, None, 0.0)
            if not at_reply:
                client._rescue(pending, partial, None)
                return done[0].item_errors
            client._fall_back(pending, partial, None)           # as the reply's handler does
            answered_at_once = bool(done)
            client._fallback_pool.submit(lambda: None).result()   # the fallback thread's queue is done
            return done[0].item_errors, answered_at_once

        clock, used = [0.0], [0.0]                                   # the agent's CPU, as the test says
        client.cpu = CpuGauge(1.0, window_s=0.1, clock=lambda: clock[0], cpu=lambda: used[0])
        refused = [InferenceError(REJECTED, "deadline cannot be met"), InferenceError(DEADLINE_MISSED, "late")]
        assert rescue(refused) == [None, None]                       # an idle board: run here
        assert client.counters["item_fallbacks"] == 1
        assert rescue(refused, at_reply=True) == ([None, None], False)   # run on the fallback thread
        split, now = client._splits[("resnet_digits", None)], client.clock()
        deadlines = [now + 0.15, now + 0.2]
        # Room to rescue: the peer has until the earliest deadline less the local run of the batch.
        assert client._give_up(split, deadlines, now) == (pytest.approx(
            now + 0.15 - split.local_table.predict(2) - config.offload.margin_ms / 1000), True)
        clock[0], used[0] = 1.0, 0.9                                 # 90% of its CPU over the last second
        assert client._give_up(split, deadlines, now) == (now + 0.2, False)   # no room: all the time there is
        assert [e.code for e in rescue(refused)] == [REJECTED, DEADLINE_MISSED]
        assert client.counters["refusals_passed_on"] == 1
        # At the reply, a refusal passed on is answered there and then: no hand-off to the fallback thread.
        errors, answered_at_once = rescue(refused, at_reply=True)
        assert [e.code for e in errors] == [REJECTED, DEADLINE_MISSED] and answered_at_once
        assert client.counters["refusals_passed_on"] == 2
        clock[0] = 2.0                                               # idle again
        with agent.loop.lock:                                        # no worker polls meanwhile
            busy = req("resnet_digits", client.clock(), 5.0)
            scheduler.enqueue(busy)                                  # something queued: no room
            try:
                assert [e.code for e in rescue(refused)] == [REJECTED, DEADLINE_MISSED]
                assert client.counters["refusals_passed_on"] == 3
                failed = [InferenceError(INTERNAL, "the peer's session failed")] * 2
                assert rescue(failed) == [None, None]                # not a verdict on time: run here
                assert client.counters["item_fallbacks"] == 3
            finally:
                scheduler.lanes["resnet_digits"].queue.cancel(busy.rid)
                del scheduler.lanes["resnet_digits"].pending[busy.rid]


def test_the_watcher_gives_up_on_a_batch_with_an_earlier_give_up_sent_after_a_later_one():
    """The watcher sleeps until the earliest give-up it knows, and is woken only by a batch that
    becomes the earliest: a batch sent later with an earlier give-up is still given up at its own
    time, not at the one the watcher slept toward; one with a later give-up waits its turn."""
    import time

    from agent.runtime.offload_executor import _Pending
    from agent.scheduler.dispatcher import Dispatch
    from agent.scheduler.policy import Action

    agent, _, card, frames = _board_by_hand("board-w")
    frames = frames[:1]
    with agent:
        client = agent.offload
        done: dict[str, float] = {}
        start = client.clock()

        def out(name, give_up_in_s):
            request = req("resnet_digits", start, 10.0)
            dispatch = Dispatch("resnet_digits", 0, [request], start, Action("resnet_digits", 1, target="board-p"))
            pending = _Pending(name, "board-p", dispatch, lambda d, outcome: done.setdefault(name, client.clock()),
                               None, {card.inputs[0].name: frames}, start + give_up_in_s, start, 0, 0.0, True)
            client._await_reply(pending)

        out("late", 1.5)          # the watcher sleeps toward it
        time.sleep(0.05)
        out("early", 0.2)         # earlier: it must wake the watcher
        out("last", 1.6)          # later than the earliest: no need to
        end = time.monotonic() + 10.0
        while len(done) < 3 and time.monotonic() < end:
            time.sleep(0.02)
        assert sorted(done, key=done.get) == ["early", "late", "last"]
        assert done["early"] - start < 1.5                    # at its own give-up, not the one slept toward
        assert done["late"] - start >= 1.5 and done["last"] - start >= 1.6


def test_the_cpu_gauge_is_the_process_cpu_time_over_wall_time_as_a_share_of_its_budget():
    import os

    from agent.config import cpu_budget
    from agent.offload.cpu import CpuGauge
    clock, cpu = [0.0], [0.0]
    gauge = CpuGauge(0.5, window_s=0.25, clock=lambda: clock[0], cpu=lambda: cpu[0])
    assert gauge.load() == 0.0
    clock[0], cpu[0] = 0.1, 0.05
    assert gauge.load() == 0.0                          # the window is not over: the last one's figure
    clock[0], cpu[0] = 0.5, 0.2                         # 0.2 s of CPU in 0.5 s on half a core: 80%
    assert gauge.load() == pytest.approx(0.8)
    clock[0], cpu[0] = 1.5, 0.2                         # idle for a second
    assert gauge.load() == pytest.approx(0.0)
    assert 0 < cpu_budget() <= (len(os.sched_getaffinity(0)) or 1)
    with pytest.raises(ValueError, match="budget"):
        CpuGauge(0.0)
