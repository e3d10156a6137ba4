"""Offload in the simulator (agent.sim.offload): one reply per request, pipelining (a batch's slot is
free once its head is done), the FIFO link, what a fast or a slow link does to fixed plans, and the
split policy's choices moving with the link.

Synthetic tables use binary fractions where a test compares times with ``==``.
"""
from __future__ import annotations

import random

import numpy as np
import pytest

import agent.sim.engine as engine
from agent.config import OffloadConfig
from agent.core import DeadlineAwareBatch, FixedBatch, LatencyTable
from agent.models.card import load_card
from agent.sim import SimModel, SimOffloadModel, SimPeerSpec, SimSplit, simulate
from agent.workload.trace import TraceRow

SIZES = (1, 2, 4, 8)
BOARD = LatencyTable(np.array(SIZES, dtype=np.int64), np.array([0.25, 0.5, 1.0, 2.0]))  # 0.25 s per item
# One split point half-way: head and tail each half of the full run; 1024 bytes per item.
HALF = SimSplit("s1", 1024.0, SIZES, (1.0, 2.0, 4.0, 8.0), (1.0, 2.0, 4.0, 8.0), (2.0, 4.0, 8.0, 16.0))
MODEL = SimOffloadModel("m", 512.0, (HALF,))


def row(t_s: float, slo_ms: float = 100_000.0, model: str = "m") -> TraceRow:
    return TraceRow(t_s, "app", model, slo_ms, 0)


def poisson(rate: float, duration_s: float, seed: int, slo_ms: float, model: str = "m") -> list[TraceRow]:
    rng = random.Random(seed)
    rows, t = [], rng.expovariate(rate)
    while t < duration_s:
        rows.append(row(t, slo_ms, model))
        t += rng.expovariate(rate)
    return rows


def lane(rule=None, table=BOARD, name="m", admission=False, jitter=0.0) -> SimModel:
    rule = rule if rule is not None else FixedBatch(1)
    return SimModel(name, rule, 1, 64, table, min_latency_s=table.predict(1), admission=admission, jitter=jitter)


def goodput(result) -> int:
    return sum(1 for r in result.records if r.within_slo)


# --- mechanics --------------------------------------------------------------------------------


def test_the_slot_is_free_once_the_head_is_done_and_tensors_queue_on_the_link():
    # Two requests at t=0, one slot, every batch split at s1 to a 2x peer over a 1024 B/s link with
    # 0.25 s one way: head(1) = 0.125 s here, the tensor 1 s on the wire, tail(1) = 0.0625 s there.
    peer = SimPeerSpec("p", speed=2.0, bandwidth_Bps=1024.0, delay_s=0.25, reply_bytes_per_item=0)
    result = simulate([row(0.0), row(0.0)], [lane()], workers=1, policy="offload_fixed", peers=[peer],
                      offload=OffloadConfig(peer="p", split="s1", share=1.0), offload_models=[MODEL])
    first, second = result.records
    assert (first.status, second.status) == ("ok", "ok")
    # Pipelining: the second batch took the slot when the first's head ended, not at its reply.
    assert second.queue_ms == 125.0
    # first: head 0..0.125, link 0.125..1.125, peer at 1.375, tail to 1.4375, reply at 1.6875.
    assert first.finish_s == 1.6875
    # second: head 0.125..0.25, but the link is busy with the first tensor until 1.125 (FIFO).
    assert second.finish_s == 2.6875
    assert result.placements == {"p:s1": 2}
    assert result.offload["peers"]["p"]["bytes_sent"] == 2048.0


def test_full_offload_sends_the_raw_input_and_frees_the_slot_at_once():
    peer = SimPeerSpec("p", speed=2.0, bandwidth_Bps=512.0, delay_s=0.0, reply_bytes_per_item=0)
    result = simulate([row(0.0), row(0.0)], [lane()], workers=1, policy="offload_fixed", peers=[peer],
                      offload=OffloadConfig(peer="p", split=None, share=1.0), offload_models=[MODEL])
    first, second = result.records
    assert second.queue_ms == 0.0               # no head: released as it started
    assert first.finish_s == 1.0 + 0.125        # 512 B at 512 B/s, then the whole model at 2x
    assert second.finish_s == 2.0 + 0.125       # behind the first on the link
    assert result.placements == {"p:full": 2}


def test_a_background_loaded_peer_runs_tails_slower():
    peer = SimPeerSpec("p", speed=2.0, bandwidth_Bps=512.0, delay_s=0.0, background=0.5, reply_bytes_per_item=0)
    result = simulate([row(0.0)], [lane()], workers=1, policy="offload_fixed", peers=[peer],
                      offload=OffloadConfig(peer="p", split=None, share=1.0), offload_models=[MODEL])
    assert result.records[0].finish_s == 1.0 + 0.25


def test_every_request_gets_exactly_one_reply_with_offload(monkeypatch):
    answers: dict[int, int] = {}
    real_result, real_exception = engine._Reply.set_result, engine._Reply.set_exception

    def counted(real):
        def answer(self, value):
            answers[self.record.index] = answers.get(self.record.index, 0) + 1
            real(self, value)
        return answer

    monkeypatch.setattr(engine._Reply, "set_result", counted(real_result))
    monkeypatch.setattr(engine._Reply, "set_exception", counted(real_exception))
    fast = LatencyTable(np.array(SIZES, dtype=np.int64), np.array([0.002, 0.004, 0.008, 0.016]))
    rng = random.Random(5)
    rows = sorted((row(rng.uniform(0, 1.0), rng.choice([5.0, 20.0, 60.0])) for _ in range(2000)), key=lambda r: r.t_s)
    peers = [SimPeerSpec("p", speed=2.0, bandwidth_Bps=2e6, delay_s=0.004, queue="edf"),
             SimPeerSpec("q", speed=1.0, bandwidth_Bps=1e6, delay_s=0.001, slots=2, background=0.3)]
    for split in ("s1", None):
        answers.clear()
        result = simulate(rows, [lane(DeadlineAwareBatch(fast, 8), fast, admission=True, jitter=0.3)], workers=2,
                          cores=1, seed=2, policy="offload_fixed", peers=peers,
                          offload=OffloadConfig(peer="p", split=split, share=0.5), offload_models=[MODEL])
        counts = result.status_counts()
        assert "unanswered" not in counts and counts.get("ok", 0) > 0, counts
        for rec in result.records:
            assert rec.finish_s is not None and rec.finish_s >= rec.arrival_s
            if rec.status == "rejected":
                assert rec.finish_s == rec.arrival_s
            else:
                assert answers.get(rec.index) == 1, rec
            if rec.status == "ok":
                assert rec.latency_ms <= rec.slo_ms + 1e-9
        placed = result.placements
        assert placed.get("local", 0) > 0 and placed.get(f"p:{split or 'full'}", 0) > 0, placed
        assert result.offload["peers"]["p"].get("ran", 0) > 0


def test_without_peers_or_with_unused_peers_the_run_is_the_same():
    rows = poisson(rate=10, duration_s=5.0, seed=3, slo_ms=1500.0)
    rule = lambda: DeadlineAwareBatch(BOARD, 8)   # noqa: E731 (a fresh rule per run)
    plain = simulate(rows, [lane(rule(), admission=True)], workers=1)
    unused = simulate(rows, [lane(rule(), admission=True)], workers=1, peers=[SimPeerSpec("p")],
                      offload_models=[MODEL])
    as_tuple = lambda r: (r.status, r.finish_s, r.batch_size, r.queue_ms)   # noqa: E731
    assert [as_tuple(r) for r in plain.records] == [as_tuple(r) for r in unused.records]
    assert unused.placements == {"local": plain.batches}


# --- fixed plans under load -------------------------------------------------------------------


def test_a_fast_link_to_a_2x_peer_raises_goodput_under_overload():
    rows = poisson(rate=12, duration_s=20.0, seed=1, slo_ms=1500.0)     # 3x what the board runs alone
    fast_link = SimPeerSpec("p", speed=2.0, bandwidth_Bps=1e9, delay_s=0.001)
    alone = simulate(rows, [lane(DeadlineAwareBatch(BOARD, 8), admission=True)], workers=1)
    helped = simulate(rows, [lane(DeadlineAwareBatch(BOARD, 8), admission=True)], workers=1,
                      policy="offload_fixed", peers=[fast_link],
                      offload=OffloadConfig(peer="p", split=None, share=0.5), offload_models=[MODEL])
    # Every other batch leaves whole: the board does half the work per request (bound: 2x).
    assert goodput(helped) > 1.5 * goodput(alone), (goodput(helped), goodput(alone))


def test_a_slow_link_makes_full_offload_miss_deadlines():
    rows = poisson(rate=2, duration_s=20.0, seed=2, slo_ms=1000.0)
    slow_link = SimPeerSpec("p", speed=2.0, bandwidth_Bps=1e6, delay_s=0.5)   # a round trip is the SLO
    local = simulate(rows, [lane(DeadlineAwareBatch(BOARD, 8))], workers=1)
    full = simulate(rows, [lane(DeadlineAwareBatch(BOARD, 8))], workers=1, policy="offload_fixed",
                    peers=[slow_link], offload=OffloadConfig(peer="p", split=None, share=1.0), offload_models=[MODEL])
    assert goodput(local) > 0.9 * len(rows)
    assert goodput(full) == 0
    assert full.status_counts() == {"deadline_missed": len(rows)}
    assert full.offload["peers"]["p"]["refused"] > 0     # the peer does not spend its time on what is late


# --- the split policy -------------------------------------------------------------------------

RESNET = "demo:resnet_digits"


def _resnet():
    card = load_card(RESNET)
    model = SimOffloadModel.from_card(card)
    profile = card.split_points[0].profile
    table = LatencyTable(np.array(profile["batch_sizes"], dtype=np.int64), np.array(profile["full_ms"]) / 1000.0)
    return model, table


def _split_run(rows, bandwidth_Bps: float, delay_s: float, policy: str = "split", offload=None):
    model, table = _resnet()
    lanes = [lane(DeadlineAwareBatch(table, 8), table, name=model.name, admission=True)]
    return simulate(rows, lanes, workers=1, policy=policy,
                    peers=[SimPeerSpec("p", speed=2.0, bandwidth_Bps=bandwidth_Bps, delay_s=delay_s)],
                    offload=offload or OffloadConfig(peers=("p",)), offload_models=[model])


def test_the_split_policy_places_batches_by_the_link():
    rows = poisson(rate=600, duration_s=2.0, seed=4, slo_ms=100.0, model="resnet_digits")
    slow = _split_run(rows, 10e6 / 8, 0.050)
    fast = _split_run(rows, 1e9 / 8, 0.001)
    assert set(slow.placements) == {"local"}, slow.placements     # a round trip is most of the SLO
    sent = sum(n for k, n in fast.placements.items() if k != "local")
    assert sent > 0.25 * sum(fast.placements.values()), fast.placements
    assert goodput(fast) > 1.5 * goodput(slow), (goodput(fast), goodput(slow))


def test_the_split_policy_beats_local_and_full_offload_on_100mbit_10ms():
    """Overload, a 2x peer 10 ms away: the board and the peer together, the board serving the
    urgent requests and the peer those with time to spare, beat either alone."""
    rows = poisson(rate=700, duration_s=2.0, seed=4, slo_ms=100.0, model="resnet_digits")
    ours = _split_run(rows, 100e6 / 8, 0.010)
    local = _split_run(rows, 100e6 / 8, 0.010, policy="rules")
    full = _split_run(rows, 100e6 / 8, 0.010, policy="offload_fixed",
                      offload=OffloadConfig(peer="p", split=None, share=1.0))
    assert goodput(ours) > goodput(local) and goodput(ours) > goodput(full), (goodput(ours), goodput(local),
                                                                              goodput(full))


# --- the benchmark's matrix -------------------------------------------------------------------


def test_the_offload_matrix_runs_every_policy_on_every_link_shape():
    from edge_lab.bench.offload_sim import LINK_SHAPES, format_matrix, simulate_offload_matrix

    model, table = _resnet()
    rows = poisson(rate=400, duration_s=0.5, seed=6, slo_ms=100.0, model="resnet_digits")

    def lanes(unbatched: bool):
        return [lane(DeadlineAwareBatch(table, 1 if unbatched else 8), table, name=model.name, admission=True)]

    out = simulate_offload_matrix(rows, lanes, LINK_SHAPES, offload_models=[model], duration_s=0.5)
    policies = ["local", "full", "neurosurgeon", "fixed:stage1", "fixed:stage2", "split"]
    assert [(r["link"], r["policy"]) for r in out] == [(s.name, p) for s in LINK_SHAPES for p in policies]
    for r in out:
        assert sum(r["statuses"].values()) == len(rows)
        if r["policy"] == "local":
            assert set(r["placements"]) == {"local"}
        if r["policy"].startswith("fixed:"):
            assert set(r["placements"]) == {f"peer:{r['policy'][6:]}"}
        if r["policy"] == "neurosurgeon":
            assert r["mean_batch"] == 1.0
    text = format_matrix(out)
    assert "neurosurgeon" in text and "1Gbit/1ms" in text


def test_bench_offload_sim_prints_every_policy_on_every_link(capsys):
    """``edge-agent bench offload --sim``: the table of every policy per link shape, no root."""
    from agent.cli import main
    assert main(["bench", "offload", "--sim", "--duration", "1"]) == 0
    out = capsys.readouterr().out
    for policy in ("local", "full", "neurosurgeon", "fixed:stage1", "split"):
        assert policy in out
    assert "100Mbit/10ms" in out and "1Gbit/1ms" in out
