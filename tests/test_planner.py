"""The split planner (agent.offload.planner): Neurosurgeon's argmin on an idle board, the queue's
weight under a backlog, reservations that spread batches over the board and its peer, and a split
point that moves with the link."""
from __future__ import annotations

import math

from agent.offload.planner import LOCAL, PeerState, Planner, SplitCost


class Linear:
    """A batch time ``fixed + per_item x b`` (seconds)."""

    def __init__(self, fixed: float, per_item: float) -> None:
        self.fixed, self.per_item = fixed, per_item

    def predict(self, b: int) -> float:
        return self.fixed + self.per_item * b


# A model whose full run is 10 ms an item here, on a 160x160 camera frame (76,800 bytes); three
# split points: early (a big tensor, a small head), middle, late (a small tensor, most of the work
# in the head); the peer twice as fast as this board.
FULL = Linear(0.0, 0.010)
SPLITS = {
    None: (None, 0.0, 76_800),              # full offload: the uint8 frame
    "early": (Linear(0.0, 0.001), 0.9, 32_768),
    "middle": (Linear(0.0, 0.003), 0.7, 8_192),
    "late": (Linear(0.0, 0.006), 0.4, 2_048),
}


def costs(peer_speed: float = 2.0) -> list[SplitCost]:
    out = []
    for name, (head, tail_share, nbytes) in SPLITS.items():
        tail = Linear(0.0, 0.010 * (1.0 if name is None else tail_share) / peer_speed)
        out.append(SplitCost(name, head, tail, nbytes))
    return out


def planner(mbit: float, rtt_ms: float, queue_ms: float = 0.0) -> Planner:
    peer = PeerState("peer", rtt_ms / 1000.0, mbit * 1e6 / 8, {"m": queue_ms / 1000.0}, {"m": costs()})
    return Planner({"peer": peer})


def by_hand(p: Planner, b: int, split) -> float:
    """The finish time of one option, computed from the module docstring's formula, at now = 0."""
    peer = p.peers["peer"]
    head, tail_share, nbytes = SPLITS[split]
    local_s = head.predict(b) if head else 0.0
    sent = local_s + b * nbytes / peer.bandwidth_Bps
    tail = b * 0.010 * (1.0 if split is None else tail_share) / 2.0
    return sent + 0.5 * peer.rtt_s + max(0.0, peer.queue_s["m"] - (sent + 0.5 * peer.rtt_s)) + tail + 0.5 * peer.rtt_s


def test_an_idle_board_takes_the_option_that_ends_first():
    """Nothing queued: Neurosurgeon's argmin over local and every split point."""
    for mbit, rtt in ((1000, 1), (100, 10), (10, 50), (1, 100)):
        p = planner(mbit, rtt)
        choice = p.choose("m", 4, 0.0, math.inf, FULL)
        finishes = {o.split if o.target != LOCAL else LOCAL: o.finish for o in p.options("m", 4, 0.0, FULL)}
        assert choice.finish == min(finishes.values())
        for split in SPLITS:
            assert math.isclose(finishes[split], by_hand(p, 4, split), rel_tol=1e-9)


def test_the_split_point_moves_with_the_link():
    """As the bandwidth falls, the choice moves from sending the whole frame to later and later
    split points (smaller tensors, more of the work here) and at last to running here: idle, and
    under a backlog (where it offloads down to slower links)."""
    order = [None, "early", "middle", "late", LOCAL]
    for backlog_s in (0.0, 0.5):
        chosen = []
        for mbit in (1000, 300, 100, 30, 10, 3, 1):
            c = planner(mbit, 10).choose("m", 4, 0.0, 0.1, FULL, backlog_s=backlog_s)
            chosen.append(LOCAL if c.target == LOCAL else c.split)
        ranks = [order.index(c) for c in chosen]
        assert ranks == sorted(ranks), chosen
        assert chosen[0] is None and chosen[-1] == LOCAL and len(set(chosen)) >= 3, chosen


def test_a_backlog_sends_work_away_that_an_idle_board_keeps():
    """On a link where the batch alone ends sooner here, a queue behind it makes the planner free
    the slot: it offloads while that still meets the deadline."""
    p = planner(10, 20)
    alone = p.choose("m", 4, 0.0, math.inf, FULL)
    assert alone.target == LOCAL
    busy = p.choose("m", 4, 0.0, 1.0, FULL, backlog_s=0.5)
    assert busy.target == "peer" and busy.local_s < alone.local_s and busy.finish <= 1.0


def test_an_offload_that_misses_the_deadline_is_not_taken_while_local_meets_it():
    p = planner(10, 20)
    local_finish = FULL.predict(4)
    choice = p.choose("m", 4, 0.0, local_finish + 1e-6, FULL, backlog_s=10.0)
    assert choice.target == LOCAL


def test_reservations_spread_a_backlog_over_the_board_and_its_peer():
    """A backlog of 60 batches planned one after another, the slot free again once each local part
    is done: the uplink and the peer fill up, so some batches stay here, and all of them end well
    before they would on either side alone (the peer is twice as fast as the board: together they
    could do 3x the board's work); answered batches free the peer again."""
    p = planner(100, 10)
    n, b = 60, 4
    now, placements = 0.0, []
    for i in range(n):
        choice = p.choose("m", b, now, math.inf, FULL, backlog_s=(n - 1 - i) * FULL.predict(b))
        p.commit(choice)
        placements.append(choice)
        now += choice.local_s
    targets = [c.target for c in placements]
    assert targets.count("peer") > n / 3 and targets.count(LOCAL) > n / 10
    makespan = max(c.finish for c in placements)
    all_here = n * FULL.predict(b)
    assert makespan < 0.5 * all_here
    peer = p.peers["peer"]
    assert peer.outstanding_s > 0 and peer.link_free_at > 0
    for c in placements:
        p.answered(c.target, c.peer_s)
    assert math.isclose(peer.outstanding_s, 0.0, abs_tol=1e-9)


def test_no_option_without_a_local_model_or_a_peer():
    assert Planner().choose("m", 1, 0.0, 1.0, None) is None
    assert Planner().choose("m", 1, 0.0, 1.0, FULL).target == LOCAL


def test_this_boards_work_in_the_peers_advertised_queue_is_counted_once():
    """The peer's status counts the batches this board sent it; ``outstanding_s`` counts them too.
    Priced once: a peer whose whole queue is this board's work waits as long as that work, and
    other boards' work in the queue still counts."""
    from agent.offload.planner import PeerSnapshot
    p = Planner()
    tail = Linear(0.0, 0.005)
    offers = {"m": [SplitCost(None, None, tail, 76_800)]}

    def status(queue_ms: float, at: float) -> PeerSnapshot:
        return PeerSnapshot("peer", 0.0, 1e12, {"m": queue_ms / 1000.0}, offers, status_at=at)

    p.refresh([status(0.0, at=1.0)])
    for _ in range(4):                       # four batches of 8 sent: 0.16 s of the peer's work
        p.commit(p.options("m", 8, 0.0, None)[0])
    assert math.isclose(p.peers["peer"].outstanding_s, 0.16)
    # the peer's next status: those 0.16 s in its queue (nothing of anyone else's)
    p.refresh([status(160.0, at=2.0)])
    [option] = p.options("m", 8, 0.0, None)
    assert math.isclose(option.finish, 0.16 + 0.04), option        # waits 0.16 s, not 0.32
    # the same status read again (no new one) keeps its reading: two batches answered since
    p.answered("peer", 0.08)
    p.refresh([status(160.0, at=2.0)])
    [option] = p.options("m", 8, 0.0, None)
    assert math.isclose(option.finish, 0.08 + 0.04), option
    # another board's 0.1 s in the queue besides this board's 0.08 s: both count
    p.refresh([status(180.0, at=3.0)])
    [option] = p.options("m", 8, 0.0, None)
    assert math.isclose(option.finish, 0.1 + 0.08 + 0.04), option
