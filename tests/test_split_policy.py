"""The split policy (agent.scheduler.policies.split): the rules' batch, placed by the planner.

By hand on the scheduler with a view of one peer: an idle board keeps what ends sooner here, a
backlog sends batches away (ours) where Neurosurgeon's latency argmin keeps them, a batch sent
reserves the peer and its answer returns the reservation, no peer means every batch stays; and with
real parts (a peer agent process, a real Mosquitto), requests placed by the policy get the outputs
of a local run, exactly once each.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from agent.config import OffloadConfig
from agent.core import FixedBatch, LatencyTable
from agent.offload.planner import LOCAL, PeerSnapshot, SplitCost
from agent.scheduler.policy import Action
from agent.scheduler.dispatcher import Scheduler
from tests.scheduling import req

# The board: 10 ms an item here. The peer: twice as fast, 20 ms away; the input 76,800 bytes.
HERE = LatencyTable(np.array([1, 2, 4]), np.array([0.010, 0.020, 0.040]))
THERE = LatencyTable(np.array([1, 2, 4]), np.array([0.005, 0.010, 0.020]))


class View:
    def __init__(self, peers=True, rtt_s=0.020, bandwidth_Bps=12.5e6) -> None:
        self.peers = peers
        self.rtt_s, self.bandwidth_Bps = rtt_s, bandwidth_Bps

    def local_table(self, model):
        return HERE

    def peer_snapshots(self, now):
        if not self.peers:
            return []
        return [PeerSnapshot("peer", self.rtt_s, self.bandwidth_Bps, {}, {"m": [SplitCost(None, None, THERE, 76_800)]})]


def scheduler(view, planner="queue", max_batch=4) -> Scheduler:
    lane = Scheduler.lane("m", FixedBatch(max_batch), 1, 256)
    return Scheduler([lane], max_concurrent=1, policy="split",
                     policy_options={"offload": OffloadConfig(planner=planner), "offload_view": view})


def placements(s: Scheduler, n_requests: int, slo: float) -> list[str]:
    for _ in range(n_requests):
        s.enqueue(req("m", 0.0, slo))
    targets, now = [], 0.0
    while s.queued():
        decision = s.poll(now)
        dispatch = decision.dispatch
        assert dispatch is not None
        targets.append(dispatch.action.target)
        s.release(dispatch, now)
        now += 0.001
    return targets


def test_an_idle_board_keeps_what_ends_sooner_here():
    # One batch of 4: 40 ms here, 6 ms to send + 20 ms round trip + 20 ms there = 46 ms away.
    assert placements(scheduler(View()), 4, 1.0) == [LOCAL]


def test_a_backlog_sends_batches_away_where_the_latency_argmin_keeps_them():
    ours = placements(scheduler(View(), "queue"), 40, 1.0)
    neurosurgeon = placements(scheduler(View(), "latency"), 40, 1.0)
    assert neurosurgeon == [LOCAL] * 10
    assert ours.count("peer") >= 3 and ours.count(LOCAL) >= 1


def test_without_peers_every_batch_stays():
    assert set(placements(scheduler(View(peers=False)), 20, 1.0)) == {LOCAL}
    assert set(placements(scheduler(None), 20, 1.0)) == {LOCAL}


def test_a_batch_sent_reserves_the_peer_until_it_is_answered():
    s = scheduler(View())
    for _ in range(40):
        s.enqueue(req("m", 0.0, 1.0))
    decision = s.poll(0.0)
    while decision.dispatch.action.target == LOCAL:
        s.release(decision.dispatch, 0.0)
        decision = s.poll(0.0)
    peer = s.policy.planner.peers["peer"]
    assert peer.outstanding_s == pytest.approx(THERE.predict(4))
    s.release(decision.dispatch, 0.0)
    s.observe(decision.dispatch, 0.1)
    assert peer.outstanding_s == pytest.approx(0.0)


def test_live_requests_placed_by_the_policy_get_a_local_runs_outputs_exactly_once(broker, digits, tmp_path):
    """A peer agent process and a board with ``policy = "split"``: a burst that queues up on the
    board's one worker; every request answered once with the outputs a local run gives, some of
    them by the peer, and the board measured the link."""
    from agent.config import CONFIG_VERSION, parse_config
    from agent.service import Service
    from tests.test_offload import MODEL, PeerProcess, Replies, _local_logits, _wait
    frames, _ = digits
    peer = PeerProcess(tmp_path, broker, "board-s")
    board = app = None
    try:
        board = Service(parse_config({
            "config_version": CONFIG_VERSION,
            "agent": {"device": "board-split", "workers": 1, "policy": "split"},
            "mqtt": {"host": broker.host, "port": broker.port, "session_expiry_s": 0},
            "telemetry": {"interval_s": 0},
            "offload": {"peers": ["board-s"], "splits": ["stage2"]},
            "models": [{"name": MODEL, "card": f"demo:{MODEL}", "default_slo_ms": 1000,
                        "batching": {"max_batch": 4}}],
        }))
        _wait(lambda: board.agent.offload.peers.live("board-s") is not None, 60.0, "the peer's status")
        app = Replies(broker, board.config.device, "app-split")
        for frame in frames[:48]:
            app.send(frame, slo_ms=5000)
        replies = app.check_exactly_once()
        assert all(r["status"] == "ok" for r in replies), [r for r in replies if r["status"] != "ok"]
        got = np.concatenate([r["outputs"]["logits"] for r in replies])
        expected = _local_logits(f"demo:{MODEL}", frames[:48])
        np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))
        np.testing.assert_allclose(got, expected, atol=0.05)       # split tensors travel int8 (the default codec)
        devices = {r["served_by"]["device"] for r in replies}
        assert "board-s" in devices, board.agent.scheduler.policy.placed
        assert board.agent.offload.peers.live("board-s").samples >= 1
    finally:
        if app is not None:
            app.close()
        if board is not None:
            board.close()
        peer.close()


def test_local_work_is_priced_at_what_this_boards_batches_really_take():
    """Batches here that take 3x their table's time (a CPU quota the start-up profile did not see)
    teach the policy to price local work 3x: the batch the idle board kept here now goes away."""
    s = scheduler(View())
    assert placements(s, 4, 1.0) == [LOCAL]
    now = 1.0
    for _ in range(60):                               # local batches of 4, each 3x its table's 40 ms
        for _ in range(4):
            s.enqueue(req("m", now, 10.0))
        dispatch = s.poll(now).dispatch
        if dispatch.action.target == LOCAL:
            s.release(dispatch, now + 0.12)
            s.observe(dispatch, now + 0.12)
        else:
            s.release(dispatch, now)
            s.observe(dispatch, now + 0.05)
        now += 1.0
    assert 2.5 < s.policy.slowdown["m"] < 3.5
    for _ in range(4):
        s.enqueue(req("m", now, 1.0))
    assert s.poll(now).dispatch.action.target == "peer"


def test_what_this_board_refuses_a_peer_takes_and_the_policy_sends_it_there():
    """Admission here refuses a burst beyond this board's capacity; what the peer can still finish
    in time is admitted for it and sent to it whole, ahead of the batches here; the rest is refused
    with admission's reason. Without a peer, the same burst is refused beyond the board's share."""
    from agent.errors import InferenceError
    from agent.scheduler.admission import AdmissionControl

    def board(view):
        lane = Scheduler.lane("m", FixedBatch(4), 1, 256, admission=AdmissionControl(HERE, 4, 0.0))
        return Scheduler([lane], max_concurrent=1, policy="split",
                         policy_options={"offload": OffloadConfig(planner="queue"), "offload_view": view})

    def burst(s):
        admitted = refused = 0
        for _ in range(60):
            try:
                s.enqueue(req("m", 0.0, 0.2))
                admitted += 1
            except InferenceError as exc:
                assert exc.code == "rejected"
                refused += 1
        return admitted, refused

    alone_admitted, _ = burst(board(View(peers=False)))
    s = board(View())
    admitted, refused = burst(s)
    assert admitted > alone_admitted + 4 and refused > 0
    # The board's one slot and instance busy with a batch: what was admitted for the peer is still
    # sent at once, whole, taking no instance, and its slot only until released.
    from agent.scheduler.dispatcher import NO_INSTANCE
    assert s.poll(0.0).dispatch is not None and s.lanes["m"].free_instances == []
    away = s.take_away(0.0)
    assert away is not None and away.instance == NO_INSTANCE
    assert away.action.target == "peer" and away.action.split is None
    assert away.requests and all(r.rid in away.action.requests for r in away.requests)
    s.release(away, 0.0)
    assert s.lanes["m"].free_instances == [] and s.in_flight == 1


def test_requests_admitted_for_a_peer_that_miss_make_the_next_admissions_for_it_stricter():
    """The peer's slack: each request admitted for it and answered late raises it (so fewer are
    admitted for that peer), each one in time lowers it, never below 0."""
    from agent.scheduler.dispatcher import Dispatch
    s = scheduler(View())
    policy = s.policy
    late = [req("m", 0.0, 0.1) for _ in range(5)]
    policy.observe(Dispatch("m", -1, late, 0.0, Action("m", 5, target="peer", requests=tuple(r.rid for r in late))), 0.5)
    raised = policy.away_slack["peer"]
    assert raised > 0.04
    on_time = [req("m", 0.0, 0.1) for _ in range(5)]
    policy.observe(Dispatch("m", -1, on_time, 0.0, Action("m", 5, target="peer", requests=tuple(r.rid for r in on_time))), 0.05)
    assert 0 < policy.away_slack["peer"] < raised


def test_a_peers_advertised_queue_drains_while_its_status_ages():
    """The live view gives the planner the peer's queue as its last status said, less the time since
    (the peer works it off meanwhile): a status one second old with 0.3 s queued means no wait."""
    from types import SimpleNamespace
    from agent.offload.peers import PeerInfo
    from agent.offload.view import LiveOffloadView
    info = PeerInfo(device="peer", offers={"m": {"full": True, "splits": []}}, queue_ms={"m": 300.0}, free_slots=0,
                    codecs=["raw"], seen_at=10.0, rtt_s=0.001, bandwidth_bps=1e9)
    held = SimpleNamespace(head_table=None, local_table=THERE, sent_bytes_per_item=None, bytes_per_item=76_800,
                           codec_s_per_item=0.0)
    client = SimpleNamespace(models={}, _splits={("m", None): held},
                             peers=SimpleNamespace(live_peers=lambda: [info]))
    view = LiveOffloadView(client)
    assert [s.queue_s["m"] for s in view.peer_snapshots(10.0)] == [0.3]
    assert math.isclose(view.peer_snapshots(10.2)[0].queue_s["m"], 0.1)
    assert view.peer_snapshots(11.0)[0].queue_s["m"] == 0.0


def test_a_peers_slack_fades_so_a_spell_of_misses_does_not_shut_it_out_for_good():
    """Misses raise the slack and only requests admitted for the peer in time lower it, so a slack
    raised high enough to admit none would stay: it fades with time instead (AWAY_DECAY_S)."""
    from agent.scheduler.dispatcher import Dispatch
    from agent.scheduler.policies.split import AWAY_DECAY_S
    s = scheduler(View())
    policy = s.policy
    late = [req("m", 0.0, 0.1) for _ in range(100)]
    policy.observe(Dispatch("m", -1, late, 0.0, Action("m", 100, target="peer", requests=tuple(r.rid for r in late))),
                   0.5)
    raised = policy._away_slack("peer", 0.5)
    assert raised > 0.9
    assert math.isclose(policy._away_slack("peer", 0.5 + AWAY_DECAY_S), raised / math.e)
    assert policy._away_slack("peer", 0.5 + 10 * AWAY_DECAY_S) < 0.01 * raised
    # the raised slack refuses a request for the peer (its 31 ms round trip and run, plus 90% of its
    # 100 ms SLO); once the slack has faded the same request is admitted for it
    lane = s.lanes["m"]
    assert not policy.admit_elsewhere(lane, req("m", 0.5, 0.1))
    assert policy.admit_elsewhere(lane, req("m", 0.5 + 10 * AWAY_DECAY_S, 0.1))
