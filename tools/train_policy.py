#!/usr/bin/env python3
"""Train a learned dispatch policy in the simulator and distil it into the board's small network.

    .venv/bin/pip install -e '.[train]'                 # torch 2.13 (CPU), gymnasium; the lab brings matplotlib
    .venv/bin/python tools/train_policy.py train --board cpu-2core --seed 0 --out policies/cpu-2core
    .venv/bin/python tools/train_policy.py evaluate --board cpu-2core --policy policies/cpu-2core

``train`` runs, all seeded, on the simulator driving the agent's own ``Scheduler`` with the
board's profile (``BOARDS``) and the ``edge`` contender's lanes (deadline-aware rule, shedding,
admission control: ``--lanes edge``, the default; ``LANES`` for the variants without admission on
some lanes): only the dispatch decision is learned.

1. **Bootstrap.** Episodes under the ``rules`` policy, each decision mapped into the learned action
   space, give the feature normalisation and a behaviour-cloned start for the actor.
2. **Teacher.** Discrete soft actor-critic (maximum entropy, twin Q, automatic temperature, the
   mask on every softmax): episodes on generated traces (kinds poisson, bursty, diurnal; rates and
   seeds drawn from the seed), gradient steps between episodes on a replay buffer of the logged
   transitions (``agent.learned.transitions``: reward from our utility's parts; discounted by the
   time to the next decision, ``exp(-dt / tau)``: decisions are irregular in time). The critic is
   warmed up on the cloned actor before the actor moves; the actor's loss keeps a cross-entropy to
   the rules' actions (``--bc-weight``). The actor kept is the best on validation traces, the clone
   included. Checkpoints each ``--checkpoint-every`` episodes.
3. **Student.** A 2x32 MLP distilled from the teacher's greedy choices by imitation with DAgger:
   the first dataset is the teacher's own visited states, each later round adds the states the
   student reaches itself, relabelled by the teacher. Agreement on held-out states (traces of seeds
   and shapes not trained on) goes in the card.
4. **Export.** ``policy.npz`` and ``card.json`` into ``--out``; the learning curve (PNG) and the
   transition log of the last episode into ``--work``.

``evaluate`` replays held-out traces (three kinds, seeds and shapes not used in training) under
every contender in the simulator and prints utility, goodput, miss rate and p99 per policy.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.config import load_config                                   # noqa: E402
from agent.core import LatencyTable                                    # noqa: E402
from agent.learned.actions import IDLE, ActionSpace, action_names      # noqa: E402
from agent.learned.card import write_policy                            # noqa: E402
from agent.learned.features import BATCH_BUCKETS, FEATURE_SCHEMA_VERSION, feature_names  # noqa: E402
from agent.learned.transitions import TransitionLog                    # noqa: E402
from agent.progress import Progress                                    # noqa: E402
from agent.scheduler.policies.rules import RulePolicy                  # noqa: E402
from agent.sim import sim_models_from_config, simulate                 # noqa: E402
from agent.workload.generators import DEMO_APPS, generate              # noqa: E402

# --- the board and its traces -----------------------------------------------------------------------

MODELS = ("mobilenet_digits", "resnet_digits")


def _card_profile_ms(model: str) -> list[float]:
    card = json.loads((REPO / "agent" / "models" / "demo" / f"{model}.json").read_text())
    return [float(x) for x in card["split_points"][0]["profile"]["full_ms"]]


def _jetson_like_ms(batch1_ms: float) -> list[float]:
    """A GPU-like batch curve derived from published shapes (batching pays: a batch of 8 costs about
    2.2 batches of 1), scaled to a batch-1 time. Labelled as derived, not measured."""
    return [batch1_ms * f for f in (1.0, 1.15, 1.45, 2.2)]


@dataclass(frozen=True)
class Board:
    name: str
    description: str
    profile_ms: dict            # model -> [ms at batch 1, 2, 4, 8]
    workers: int
    cores: int
    rates: tuple[float, float]  # training arrival rates (per second), drawn uniformly


BOARDS = {
    "cpu-2core": Board(
        "cpu-2core", "this machine's class: 2 CPU cores, onnxruntime 1 intra-op thread; batch times are the model "
                     "cards' build-host figures (full_ms, median of 40 runs; batching does not pay)",
        {m: _card_profile_ms(m) for m in MODELS}, workers=2, cores=2, rates=(300.0, 1100.0)),
    "gpu-jetson-like": Board(
        "gpu-jetson-like", "a Jetson-like GPU board, DERIVED not measured: batch-1 times of the cards' build host, "
                           "batch curve 1, 1.15, 1.45, 2.2 x batch 1 at b = 1, 2, 4, 8 (the shape published for "
                           "small CNNs on Jetson-class GPUs); 2 execution slots sharing one accelerator",
        {m: _jetson_like_ms(_card_profile_ms(m)[0]) for m in MODELS}, workers=2, cores=1, rates=(400.0, 1600.0)),
}
KINDS = ("poisson", "bursty", "diurnal")
# Held out: seeds never drawn in training, shapes other than the training defaults.
HELD_OUT = (("poisson", {}), ("bursty", {"burst_factor": 6.0, "mean_on_s": 0.5, "mean_off_s": 2.0}),
            ("diurnal", {"peak_to_trough": 6.0}))
HELD_OUT_SEED = 900_000


_board: "Board | None" = None   # the board being trained (train sets it; edge_config's default)


def tables(board: Board) -> dict[str, LatencyTable]:
    return {m: LatencyTable(np.array([1, 2, 4, 8], dtype=np.int64), np.array(ms, dtype=np.float64) / 1000.0)
            for m, ms in board.profile_ms.items()}


#: The lanes a policy is trained and run on: the ``edge`` contender's (deadline-aware rule, shedding,
#: admission control on every lane); ``shed``: the same without admission (the policy alone decides
#: what a backlog costs; what can no longer finish is still shed); or ``shed_cheapest``: admission on
#: every lane but the cheapest model's (by profiled per-item time), which is shed only. Why the last:
#: admission predicts a request's finish as if the slots served every lane in EDF order, counting
#: the expensive model's queued work ahead of a cheap request; under a burst it refused many of the
#: cheap model's requests that the dispatch (which serves the cheap lane between expensive
#: batches) would have answered in time, while without admission anywhere the expensive model's
#: backlog is shed late and counted as admitted misses. Admission on the expensive lanes turns those
#: late sheds into refusals at arrival; the cheap lane's requests are admitted and served or shed.
LANES = ("edge", "shed", "shed_cheapest")
_lanes = "edge"


def admission_off(lanes: str, board: "Board | None" = None) -> list[str]:
    """The models whose lanes run without admission under ``lanes`` (``LANES``) on ``board``."""
    if lanes == "edge":
        return []
    if lanes == "shed":
        return list(MODELS)
    if lanes == "shed_cheapest":
        profile = (board or BOARDS["cpu-2core"]).profile_ms
        per_item = {m: min(ms[k] / b for k, b in enumerate(BATCH_BUCKETS)) for m, ms in profile.items()}
        return [min(MODELS, key=lambda m: (per_item[m], m))]
    raise ValueError(f"lanes = {lanes!r}: expected one of {list(LANES)}")


def edge_config(lanes: str | None = None, board: "Board | None" = None):
    from edge_lab.bench.contenders import apply_contender
    config = apply_contender(load_config(REPO / "firmware_configs" / "generic-linux.toml"), "edge")
    off = admission_off(lanes or _lanes, board or _board)
    if off:
        config = dataclasses.replace(config, models=tuple(
            dataclasses.replace(m, batching=dataclasses.replace(m.batching, admission=False)) if m.name in off else m
            for m in config.models))
    return config


def run(board: Board, trace, policy: str = "rules", config=None, on_reply=None, **options):
    """Simulate ``trace`` on ``board`` under ``config`` (default: the edge lanes) and ``policy``."""
    config = config or edge_config()
    return simulate(trace, sim_models_from_config(config, tables(board)), board.workers, cores=board.cores,
                    hold_fraction=config.hold_fraction, lookahead=config.admission_lookahead,
                    edf_horizon_s=config.edf_horizon_s, policy=policy, policy_options=options or None,
                    on_reply=on_reply)


def training_trace(board: Board, rng: np.random.Generator, duration_s: float):
    kind = KINDS[int(rng.integers(len(KINDS)))]
    rate = float(rng.uniform(*board.rates))
    seed = int(rng.integers(0, HELD_OUT_SEED))
    return generate(kind, rate_per_s=rate, duration_s=duration_s, apps=DEMO_APPS, seed=seed), \
        {"kind": kind, "rate_per_s": round(rate, 1), "seed": seed}


def held_out_traces(board: Board, duration_s: float, per_kind: int = 2):
    lo, hi = board.rates
    out = []
    for k, (kind, shape) in enumerate(HELD_OUT):
        for j in range(per_kind):
            rate = lo + (hi - lo) * (0.5 + 0.4 * j / max(1, per_kind - 1))
            seed = HELD_OUT_SEED + 10 * k + j
            out.append(({"kind": kind, "shape": shape, "rate_per_s": round(rate, 1), "seed": seed},
                        generate(kind, rate_per_s=rate, duration_s=duration_s, apps=DEMO_APPS, seed=seed, **shape)))
    return out


# --- choosers: what decides inside the learned policy during training ---------------------------------

class RulesChooser:
    """The rules policy's decision, mapped into the action space (for the bootstrap)."""

    def __init__(self, space: ActionSpace) -> None:
        self.space = space
        self.rules = None
        self.scheduler = None

    def bind(self, scheduler) -> None:
        self.scheduler = scheduler
        self.rules = RulePolicy(scheduler)

    def __call__(self, features, mask, now) -> int:
        action, _ = self.rules.decide(self.scheduler, now)
        if action is None:
            return IDLE
        lane = self.space.lanes.index(action.model)
        base = 1 + lane * len(self.space.buckets)
        best = None
        for j, b in enumerate(self.space.buckets):
            if mask[base + j]:
                best = base + j
                if b >= action.batch_size:
                    break
        return IDLE if best is None else best


class NumpyNet:
    """A torch MLP's forward in numpy (rollouts without torch per decision); normalisation inside."""

    def __init__(self, layers, mean, std, sample: bool, rng: np.random.Generator) -> None:
        self.layers = layers
        self.mean, self.inv_std = mean, 1.0 / std
        self.sample, self.rng = sample, rng

    def logits(self, x):
        h = (x - self.mean) * self.inv_std
        for k, (w, b) in enumerate(self.layers):
            h = h @ w + b
            if k < len(self.layers) - 1:
                h = np.maximum(h, 0.0)
        return h

    def __call__(self, features, mask, now) -> int:
        z = np.where(mask, self.logits(features), -np.inf)
        if not self.sample:
            return int(np.argmax(z))
        p = np.exp(z - z.max())
        p /= p.sum()
        return int(self.rng.choice(len(p), p=p))


# --- torch parts ----------------------------------------------------------------------------------

def torch_parts():
    import torch
    from torch import nn
    torch.set_num_threads(1)

    class MLPNet(nn.Module):
        def __init__(self, n_in, n_out, hidden, mean, std):
            super().__init__()
            self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
            self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
            self.body = nn.Sequential(nn.Linear(n_in, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], hidden[1]), nn.ReLU(),
                                      nn.Linear(hidden[1], n_out))

        def forward(self, x):
            return self.body((x - self.mean) / self.std)

        def numpy_layers(self):
            linear = [m for m in self.body if isinstance(m, nn.Linear)]
            return [(m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy()) for m in linear]

    return torch, nn, MLPNet


def masked(logits, mask):
    return logits.masked_fill(~mask, -1e9)


class SAC:
    """Discrete soft actor-critic (Christodoulou 2019) with action masks."""

    def __init__(self, n_in, n_out, mean, std, seed, hidden=(128, 128), gamma=0.97, lr=3e-4, tau=0.01,
                 target_entropy_frac=0.3) -> None:
        torch, nn, MLPNet = torch_parts()
        torch.manual_seed(seed)
        self.torch = torch
        self.actor = MLPNet(n_in, n_out, hidden, mean, std)
        self.q1, self.q2 = MLPNet(n_in, n_out, hidden, mean, std), MLPNet(n_in, n_out, hidden, mean, std)
        self.q1t, self.q2t = copy.deepcopy(self.q1), copy.deepcopy(self.q2)
        self.log_alpha = torch.tensor(math.log(0.05), requires_grad=True)
        self.opt_actor = torch.optim.Adam(self.actor.parameters(), lr=lr)
        self.opt_q = torch.optim.Adam(list(self.q1.parameters()) + list(self.q2.parameters()), lr=lr)
        self.opt_alpha = torch.optim.Adam([self.log_alpha], lr=lr)
        self.gamma, self.tau, self.frac = gamma, tau, target_entropy_frac

    def clone(self, states, masks, actions, epochs=30, batch=512, rng=None):
        """Behaviour cloning of the actor (cross-entropy on the masked logits)."""
        torch = self.torch
        s, m, a = (torch.as_tensor(states), torch.as_tensor(masks), torch.as_tensor(actions))
        n = len(a)
        for _ in range(epochs):
            order = torch.as_tensor(rng.permutation(n))
            for i in range(0, n, batch):
                idx = order[i:i + batch]
                loss = torch.nn.functional.cross_entropy(masked(self.actor(s[idx]), m[idx]), a[idx])
                self.opt_actor.zero_grad()
                loss.backward()
                self.opt_actor.step()
        with torch.no_grad():
            return float((masked(self.actor(s), m).argmax(1) == a).float().mean())

    def update(self, b, actor_too: bool = True, bc=None, bc_weight: float = 0.0) -> dict:
        torch = self.torch
        F = torch.nn.functional
        s, a, r, s2, m, m2, d, g = b
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            lp2 = F.log_softmax(masked(self.actor(s2), m2), dim=1)
            p2 = lp2.exp()
            qt = torch.min(self.q1t(s2), self.q2t(s2))
            v2 = (p2 * (qt - alpha * lp2)).masked_fill(~m2, 0.0).sum(1)
            # Semi-Markov: decisions are irregular in time, so the discount is by the time to the next.
            y = r + g * (1.0 - d) * v2
        q1 = self.q1(s).gather(1, a[:, None]).squeeze(1)
        q2 = self.q2(s).gather(1, a[:, None]).squeeze(1)
        loss_q = F.mse_loss(q1, y) + F.mse_loss(q2, y)
        self.opt_q.zero_grad()
        loss_q.backward()
        self.opt_q.step()
        out = {"loss_q": float(loss_q.detach())}
        if actor_too:
            lp = F.log_softmax(masked(self.actor(s), m), dim=1)
            p = lp.exp()
            with torch.no_grad():
                q = torch.min(self.q1(s), self.q2(s))
            loss_pi = (p * (alpha * lp - q)).masked_fill(~m, 0.0).sum(1).mean()
            if bc is not None and bc_weight > 0:
                # Kept near the rules where the critic has nothing better to say (TD3+BC's idea).
                bs, bm, ba = bc
                loss_pi = loss_pi + bc_weight * F.cross_entropy(masked(self.actor(bs), bm), ba)
            self.opt_actor.zero_grad()
            loss_pi.backward()
            self.opt_actor.step()
            entropy = -(p * lp).masked_fill(~m, 0.0).sum(1).detach()
            target = self.frac * torch.log(m.sum(1).float())
            loss_alpha = (self.log_alpha * (entropy - target)).mean()
            self.opt_alpha.zero_grad()
            loss_alpha.backward()
            self.opt_alpha.step()
            out.update(loss_pi=float(loss_pi), alpha=float(alpha), entropy=float(entropy.mean()))
        with torch.no_grad():
            for net, targ in ((self.q1, self.q1t), (self.q2, self.q2t)):
                for p_, pt in zip(net.parameters(), targ.parameters()):
                    pt.mul_(1 - self.tau).add_(self.tau * p_)
        return out

    def state_dict(self):
        return {"actor": self.actor.state_dict(), "q1": self.q1.state_dict(), "q2": self.q2.state_dict(),
                "q1t": self.q1t.state_dict(), "q2t": self.q2t.state_dict(), "log_alpha": float(self.log_alpha)}


class Replay:
    def __init__(self, n_in, n_out, capacity=400_000) -> None:
        self.s = np.zeros((capacity, n_in), np.float32)
        self.s2 = np.zeros((capacity, n_in), np.float32)
        self.m = np.zeros((capacity, n_out), bool)
        self.m2 = np.zeros((capacity, n_out), bool)
        self.a = np.zeros(capacity, np.int64)
        self.r = np.zeros(capacity, np.float32)
        self.d = np.zeros(capacity, np.float32)
        self.g = np.zeros(capacity, np.float32)     # the discount to the next decision: exp(-dt / tau)
        self.n = self.i = 0
        self.capacity = capacity

    def add(self, t: dict, reward_scale: float, tau_s: float) -> None:
        n = len(t["action"])
        times = t["time"]
        dt = np.append(times[1:] - times[:-1], 0.0) if n else times
        idx = (self.i + np.arange(n)) % self.capacity
        self.s[idx], self.s2[idx], self.m[idx], self.m2[idx] = t["state"], t["next_state"], t["mask"], t["next_mask"]
        self.a[idx], self.r[idx], self.d[idx] = t["action"], t["reward"] * reward_scale, t["done"]
        self.g[idx] = np.exp(-np.maximum(dt, 0.0) / tau_s)
        self.i = int((self.i + n) % self.capacity)
        self.n = min(self.n + n, self.capacity)

    def sample(self, torch, rng, batch):
        idx = rng.integers(0, self.n, batch)
        return (torch.as_tensor(self.s[idx]), torch.as_tensor(self.a[idx]), torch.as_tensor(self.r[idx]),
                torch.as_tensor(self.s2[idx]), torch.as_tensor(self.m[idx]), torch.as_tensor(self.m2[idx]),
                torch.as_tensor(self.d[idx]), torch.as_tensor(self.g[idx]))


# --- scoring --------------------------------------------------------------------------------------

def score(result) -> dict:
    from edge_lab.metrics import summarize
    o = summarize(result.records, result.duration_s)["overall"]
    return {k: o[k] for k in ("utility", "goodput_per_s", "deadline_miss_rate", "p99_ms", "slo_attainment")}


def chooser_run(board, trace, chooser, space_lanes, log=False):
    n_in, n_out = len(feature_names(space_lanes)), len(action_names(space_lanes))
    rec = TransitionLog(chooser, n_in, n_out) if log else chooser
    result = run(board, trace, "learned", learned_chooser=rec, learned_lanes=space_lanes)
    return result, rec


# --- train ----------------------------------------------------------------------------------------

def train(args) -> None:
    global _lanes, _board
    _lanes = args.lanes
    torch, nn, MLPNet = torch_parts()
    board = _board = BOARDS[args.board]
    lanes = MODELS
    space = ActionSpace(lanes)
    n_in, n_out = len(feature_names(lanes)), space.size
    rng = np.random.default_rng(args.seed)
    work = Path(args.work or REPO / "runs" / args.board)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    traces_used = []
    total = args.bootstrap + args.episodes + args.dagger + 2
    progress = Progress(total, desc=f"train {args.board}", unit="stage")

    # 1. bootstrap under the rules policy
    boot_s, boot_m, boot_a = [], [], []
    replay = Replay(n_in, n_out)
    rules_curve = []
    for k in range(args.bootstrap):
        progress.step(f"bootstrap {k + 1}/{args.bootstrap}")
        trace, meta = training_trace(board, rng, args.duration)
        traces_used.append(meta)
        result, rec = chooser_run(board, trace, RulesChooser(space), lanes, log=True)
        t = rec.transitions(result.records, args.miss_penalty)
        boot_s.append(t["state"]); boot_m.append(t["mask"]); boot_a.append(t["action"])
        replay.add(t, reward_scale=len(trace), tau_s=args.tau_ms / 1000.0)
        rules_curve.append(score(result)["utility"])
    states = np.concatenate(boot_s)
    mean = states.mean(0).astype(np.float32)
    std = states.std(0).astype(np.float32)
    std[std < 1e-3] = 1.0
    sac = SAC(n_in, n_out, mean, std, args.seed, target_entropy_frac=args.target_entropy)
    bc_acc = sac.clone(states, np.concatenate(boot_m), np.concatenate(boot_a), epochs=args.bc_epochs, rng=rng)
    progress.write(f"bootstrap: {len(states)} rules decisions, actor cloned to {100 * bc_acc:.1f}% agreement, "
                   f"rules utility {np.mean(rules_curve):.3f} on the bootstrap traces", sys.stderr)
    for _ in range(args.critic_warmup):
        sac.update(replay.sample(torch, rng, args.batch), actor_too=False)

    # 2. teacher: discrete SAC; the actor kept is the best on validation traces (the clone included)
    curve = []
    val_rng = np.random.default_rng(args.seed + 77_777)
    validation = [training_trace(board, val_rng, args.duration)[0] for _ in range(args.validation)]
    val_rules = float(np.mean([score(run(board, tr))["utility"] for tr in validation]))

    def validate() -> float:
        net = NumpyNet(sac.actor.numpy_layers(), mean, std, False, rng)
        return float(np.mean([score(chooser_run(board, tr, net, lanes)[0])["utility"] for tr in validation]))

    best = (validate(), copy.deepcopy(sac.actor.state_dict()), -1)
    progress.write(f"validation ({args.validation} traces): rules {val_rules:.4f}, cloned actor {best[0]:.4f}", sys.stderr)
    bc_s, bc_m, bc_a = (torch.as_tensor(states), torch.as_tensor(np.concatenate(boot_m)),
                        torch.as_tensor(np.concatenate(boot_a)))
    for ep in range(args.episodes):
        progress.step(f"sac {ep + 1}/{args.episodes}")
        trace, meta = training_trace(board, rng, args.duration)
        traces_used.append(meta)
        actor = NumpyNet(sac.actor.numpy_layers(), mean, std, sample=True, rng=rng)
        result, rec = chooser_run(board, trace, actor, lanes, log=True)
        t = rec.transitions(result.records, args.miss_penalty)
        replay.add(t, reward_scale=len(trace), tau_s=args.tau_ms / 1000.0)
        rules = score(run(board, trace))["utility"]
        got = score(result)["utility"]
        stats = {}
        for _ in range(max(1, int(len(t["action"]) * args.updates_per_step))):
            idx = torch.as_tensor(rng.integers(0, len(bc_a), args.batch))
            stats = sac.update(replay.sample(torch, rng, args.batch), bc=(bc_s[idx], bc_m[idx], bc_a[idx]),
                               bc_weight=args.bc_weight)
        greedy = score(chooser_run(board, trace, NumpyNet(sac.actor.numpy_layers(), mean, std, False, rng), lanes)[0])["utility"]
        curve.append({"episode": ep, **meta, "sampled_utility": got, "greedy_utility": greedy, "rules_utility": rules,
                      **stats, "wall_s": time.perf_counter() - started})
        progress.write(f"episode {ep}: {meta['kind']} {meta['rate_per_s']}/s utility sampled {got:.3f} greedy "
                       f"{greedy:.3f} rules {rules:.3f} alpha {stats.get('alpha', 0):.4f} H {stats.get('entropy', 0):.2f}",
                       sys.stderr)
        if (ep + 1) % args.checkpoint_every == 0 or ep == args.episodes - 1:
            torch.save({**sac.state_dict(), "mean": mean, "std": std, "episode": ep}, work / f"teacher_ep{ep + 1}.pt")
        if (ep + 1) % args.validate_every == 0 or ep == args.episodes - 1:
            value = validate()
            curve[-1]["validation_utility"] = value
            progress.write(f"validation after episode {ep}: {value:.4f} (rules {val_rules:.4f}, best {best[0]:.4f})",
                           sys.stderr)
            if value > best[0]:
                best = (value, copy.deepcopy(sac.actor.state_dict()), ep)
    rec.save(work / "transitions_last_episode.npz", result.records,
             {"feature_schema": FEATURE_SCHEMA_VERSION, "features": feature_names(lanes), "actions": space.names,
              "board": board.name, "trace": traces_used[-1], "miss_penalty": args.miss_penalty})
    if args.keep_best:
        sac.actor.load_state_dict(best[1])
    teacher_layers = sac.actor.numpy_layers()
    teacher = NumpyNet(teacher_layers, mean, std, sample=False, rng=rng)
    torch.save({**sac.state_dict(), "mean": mean, "std": std}, work / "teacher_final.pt")

    # 3. student: DAgger distillation into 2x32
    student = MLPNet(n_in, n_out, (32, 32), mean, std)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    data_s, data_m, data_a = [], [], []

    def collect(chooser, trace):
        _, rec = chooser_run(board, trace, chooser, lanes, log=True)
        s, m = rec.states[:rec.n].copy(), rec.masks[:rec.n].copy()
        labels = np.array([teacher(s[i], m[i], 0.0) for i in range(len(s))], dtype=np.int64)
        return s, m, labels

    def fit(epochs):
        s = torch.as_tensor(np.concatenate(data_s)); m = torch.as_tensor(np.concatenate(data_m))
        a = torch.as_tensor(np.concatenate(data_a))
        for _ in range(epochs):
            order = torch.as_tensor(rng.permutation(len(a)))
            for i in range(0, len(a), 512):
                idx = order[i:i + 512]
                loss = torch.nn.functional.cross_entropy(masked(student(s[idx]), m[idx]), a[idx])
                opt.zero_grad(); loss.backward(); opt.step()

    for k in range(args.dagger):
        progress.step(f"dagger {k + 1}/{args.dagger}")
        trace, meta = training_trace(board, rng, args.duration)
        traces_used.append(meta)
        chooser = teacher if k == 0 else NumpyNet(student.numpy_layers(), mean, std, False, rng)
        s, m, a = collect(chooser, trace)
        data_s.append(s); data_m.append(m); data_a.append(a)
        fit(args.student_epochs)

    # 4. held-out agreement and export
    progress.step("held-out agreement")
    agree = []
    for meta, trace in held_out_traces(board, args.duration, per_kind=1):
        s, m, a = collect(NumpyNet(student.numpy_layers(), mean, std, False, rng), trace)
        with torch.no_grad():
            pred = masked(student(torch.as_tensor(s)), torch.as_tensor(m)).argmax(1).numpy()
        agree.append((int((pred == a).sum()), len(a)))
    agreement = sum(x for x, _ in agree) / max(1, sum(n for _, n in agree))
    progress.step("export")
    layers = student.numpy_layers()
    weights = {"w1": layers[0][0], "b1": layers[0][1], "w2": layers[1][0], "b2": layers[1][1],
               "w3": layers[2][0], "b3": layers[2][1]}
    training = {
        "board": board.name, "profile": {"description": board.description, "batch_ms": board.profile_ms,
                                         "batch_sizes": [1, 2, 4, 8], "workers": board.workers, "cores": board.cores},
        "lanes": args.lanes,
        "admission_off": admission_off(args.lanes, board),
        "lanes_config": "firmware_configs/generic-linux.toml under the 'edge' contender (deadline_aware, shedding, "
                        + {"edge": "admission)", "shed": "admission off: lanes 'shed')",
                           "shed_cheapest": "admission on every lane but those in admission_off: lanes "
                                            "'shed_cheapest')"}[args.lanes],
        "seed": args.seed, "traces": {"apps": "agent.workload.generators.DEMO_APPS", "duration_s": args.duration,
                                      "episodes": traces_used},
        "teacher": {"algorithm": "discrete SAC (max entropy, twin Q, auto temperature, masked), actor cloned from "
                                 "the rules policy first", "hidden": [128, 128], "episodes": args.episodes,
                    "bootstrap_episodes": args.bootstrap, "bc_agreement": bc_acc, "miss_penalty": args.miss_penalty,
                    "kept": (f"best greedy utility on {args.validation} validation traces: episode {best[2]} "
                             f"(-1: the actor cloned from the rules)") if args.keep_best else "last",
                    "validation": {"rules_utility": val_rules, "teacher_utility": best[0]},
                    "bc_weight": args.bc_weight, "target_entropy": args.target_entropy,
                    "discount": f"exp(-dt / {args.tau_ms:g} ms) to the next decision (semi-Markov)"},
        "student": {"hidden": [32, 32], "dagger_rounds": args.dagger, "epochs_per_round": args.student_epochs},
        "teacher_agreement": {"held_out_states": sum(n for _, n in agree), "agreement": agreement,
                              "traces": [m for m, _ in held_out_traces(board, args.duration, per_kind=1)]},
        "reproduce": f"python tools/train_policy.py train --board {board.name} --seed {args.seed} --lanes {args.lanes} "
                     f"--episodes {args.episodes} --bootstrap {args.bootstrap} --dagger {args.dagger} "
                     f"--duration {args.duration:g} --validation {args.validation} --miss-penalty {args.miss_penalty:g} "
                     f"--out {args.out}",
        "wall_s": round(time.perf_counter() - started, 1),
    }
    card = write_policy(args.out, weights, lanes=lanes, buckets=BATCH_BUCKETS, mean=mean, std=std, idle_tick_ms=1.0,
                        training=training)
    progress.close()
    (work / "curve.json").write_text(json.dumps(curve, indent=1))
    _plot(curve, work / "learning_curve.png", board.name, val_rules)
    print(f"student agrees with the teacher on {100 * agreement:.1f}% of {sum(n for _, n in agree)} held-out states")
    print(f"wrote {card} and {Path(args.out) / 'policy.npz'} ({(Path(args.out) / 'policy.npz').stat().st_size} bytes); "
          f"curve {work / 'learning_curve.png'}; {time.perf_counter() - started:.0f} s")


def _plot(curve, path, name, rules_validation: float | None = None) -> None:
    """Two panels: utility per episode (its trace's: teacher sampled and greedy, the rules on the
    same trace; the greedy teacher on the validation traces), and the greedy teacher's margin over
    the rules on each episode's trace with its moving average over 5 episodes."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ep = np.array([c["episode"] for c in curve])
    ax.plot(ep, [c["sampled_utility"] for c in curve], label="teacher, sampled", alpha=0.6)
    ax.plot(ep, [c["greedy_utility"] for c in curve], label="teacher, greedy", alpha=0.6)
    ax.plot(ep, [c["rules_utility"] for c in curve], label="rules, same trace", linestyle="--", alpha=0.6)
    val = [(c["episode"], c["validation_utility"]) for c in curve if "validation_utility" in c]
    if val:
        ax.plot(*zip(*val), marker="o", color="C3", label="teacher, greedy, validation traces")
    if rules_validation is not None:
        ax.axhline(rules_validation, color="C3", linestyle=":", label="rules, validation traces")
    ax.set_ylabel("utility")
    ax.set_title(f"discrete SAC in the simulator: {name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    margin = np.array([c["greedy_utility"] - c["rules_utility"] for c in curve])
    bx.bar(ep, margin, color="C1", alpha=0.5, label="greedy teacher - rules, episode's trace")
    if len(margin) >= 5:
        bx.plot(ep[4:], np.convolve(margin, np.ones(5) / 5, mode="valid"), color="C0", label="moving average (5)")
    bx.axhline(0, color="black", linewidth=0.8)
    bx.set_xlabel("episode")
    bx.set_ylabel("utility margin")
    bx.grid(alpha=0.3)
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- evaluate -------------------------------------------------------------------------------------

def goodput_bound(board: Board, trace, window_s: float = 1.0) -> float:
    """An upper bound on the requests any scheduler could answer in time on ``trace`` with the board's
    compute (a clairvoyant relaxation, computed offline from the profile).

    Relaxations, each only raising what can be served: every request costs its model's cheapest
    per-item time over the profiled batch sizes (perfect batching, no batch waits for another);
    the ``workers`` slots run at full speed side by side (``cores`` of them at once at most) with
    no switching cost; and a request needs only to be computed between its arrival and the end of
    the window of arrivals it belongs to plus the largest SLO in that window. Then the requests
    answered in time among those arriving in a window ``[t0, t1)`` need at most ``min(workers,
    cores) x (t1 - t0 + max SLO)`` seconds of compute, and the most requests that fit a budget
    are the cheapest first: summed over disjoint windows, a bound on the total. Returns requests
    per second over the trace's span (as goodput is reported)."""
    if not len(trace):
        return 0.0
    per_item = _per_item_s(board)
    cost = np.array([per_item[r.model] for r in trace])
    total = sum(int(np.searchsorted(np.cumsum(np.sort(cost[sel])), budget, side="right"))
                for sel, budget in _window_budgets(board, trace, window_s))
    return total / max(max(r.t_s for r in trace), 1e-9)


def _per_item_s(board: Board) -> dict[str, float]:
    """Each model's least time per request over the profiled batch sizes (perfect batching)."""
    return {m: min(ms[k] / b for k, b in enumerate((1, 2, 4, 8))) / 1000.0 for m, ms in board.profile_ms.items()}


def _window_budgets(board: Board, trace, window_s: float):
    """The bounds' windows: per window of arrivals ``[t0, t0 + window_s)`` with any, the selection
    of its requests and the compute they can have at most (:func:`goodput_bound`)."""
    t = np.array([r.t_s for r in trace])
    slo = np.array([r.slo_ms for r in trace]) / 1000.0
    speed = min(board.workers, board.cores)
    for start in np.arange(0.0, t.max() + window_s, window_s):
        sel = (t >= start) & (t < start + window_s)
        if sel.any():
            yield sel, speed * (window_s + slo[sel].max())


def utility_bound(board: Board, trace, window_s: float = 1.0) -> float:
    """An upper bound on the utility (``edge_lab.metrics.utility``) any scheduler could reach on
    ``trace`` with the board's compute: :func:`goodput_bound`'s relaxations, with each request in
    time worth what it adds to the utility rather than 1.

    The utility is the mean over SLO classes c (model, SLO) of ``in_time_c / sent_c x min(1,
    SLO_c / p99_c)``; the tail factor is at most 1, so it is at most ``sum_c in_time_c / (C x
    sent_c)``, a request of class c in time worth ``1 / (C x sent_c)``. The same window budgets
    bind as in :func:`goodput_bound` (each window's requests in time need at most that compute, so
    any real schedule is feasible for them), and the most value a budget holds is a fractional
    knapsack: classes in order of value per second of compute, the last one cut. Summed over the
    windows: a bound on the utility. Why beside the goodput bound: the two part where classes
    differ in cost and count, and a scheduler's target ratio over ``edge``'s utility is only within
    reach if this bound leaves room for it."""
    if not len(trace):
        return 0.0
    per_item = _per_item_s(board)
    keys = [(r.model, r.slo_ms) for r in trace]
    classes = sorted(set(keys))
    index = {c: i for i, c in enumerate(classes)}
    cls = np.array([index[k] for k in keys])
    sent = np.bincount(cls, minlength=len(classes)).astype(float)
    value = 1.0 / (len(classes) * sent)                          # per request in time, by class
    cost = np.array([per_item[m] for m, _ in classes])
    order = np.argsort(-value / cost)                            # most utility per second first
    total = 0.0
    for sel, budget in _window_budgets(board, trace, window_s):
        counts = np.bincount(cls[sel], minlength=len(classes))
        for c in order:
            take = min(float(counts[c]), budget / cost[c])
            total += take * value[c]
            budget -= take * cost[c]
            if budget <= 0:
                break
    return float(min(total, 1.0))


def evaluate(args) -> None:
    from edge_lab.bench.contenders import apply_contender
    from edge_lab.bench.run import slo_floor_by_model
    board = BOARDS[args.board]
    base = load_config(REPO / "firmware_configs" / "generic-linux.toml")
    rows = []
    policy_lanes = json.loads((Path(args.policy) / "card.json").read_text())["training"].get("lanes", "edge")
    teacher = None
    if args.teacher:
        torch, _, MLPNet = torch_parts()
        state = torch.load(args.teacher, weights_only=False)
        n_in, n_out = len(feature_names(MODELS)), len(action_names(MODELS))
        actor = MLPNet(n_in, n_out, (128, 128), state["mean"], state["std"])
        actor.load_state_dict(state["actor"])
        teacher = NumpyNet(actor.numpy_layers(), state["mean"], state["std"], False, None)
        args.contenders += ",teacher"

    bounds, u_bounds = {}, {}
    for meta, trace in held_out_traces(board, args.duration, per_kind=args.per_kind):
        bounds.setdefault(meta["kind"], []).append(goodput_bound(board, trace))
        u_bounds.setdefault(meta["kind"], []).append(utility_bound(board, trace))
        floors = slo_floor_by_model(trace)
        for name in args.contenders.split(","):
            if name == "learned":
                result = run(board, trace, "learned", config=edge_config(policy_lanes, board), policy_path=args.policy)
            elif name == "teacher":
                result = run(board, trace, "learned", config=edge_config(policy_lanes, board),
                             learned_chooser=teacher, learned_lanes=MODELS)
            elif name == "shed":      # the rules on the lanes without admission
                result = run(board, trace, "rules", config=edge_config("shed"))
            elif name == "rules_lanes":   # the rules on the card's lanes
                result = run(board, trace, "rules", config=edge_config(policy_lanes, board))
            else:
                config = apply_contender(base, name, slo_ms_by_model=floors)
                result = simulate(trace, sim_models_from_config(config, tables(board)),
                                  config.workers or board.workers, cores=board.cores,
                                  hold_fraction=config.hold_fraction, lookahead=config.admission_lookahead,
                                  edf_horizon_s=config.edf_horizon_s)
            rows.append({**meta, "policy": name, **score(result)})
    by = {}
    for r in rows:
        by.setdefault((r["kind"], r["policy"]), []).append(r)
    print(f"held-out traces in the simulator, board {board.name} ({args.per_kind} per kind, {args.duration:g} s each; "
          f"mean over traces)")
    print("bound: upper bounds on the utility and the goodput any scheduler could reach with the same compute "
          "(utility_bound, goodput_bound); its 'vs edge' is the most any policy could gain over edge")
    print(f"learned: the card's lanes ({policy_lanes}); rules_lanes: the rules on them; "
          f"shed: the rules on the edge lanes without admission")
    print(f"{'kind':<8} {'policy':<11} {'utility':>8} {'goodput/s':>10} {'miss %':>7} {'p99 ms':>7} {'vs edge':>8} "
          f"{'of bound':>8} {'of U bound':>10}")
    for kind, _ in HELD_OUT:
        edge_u = np.mean([r["utility"] for r in by.get((kind, "edge"), [{"utility": np.nan}])])
        bound, u_bound = float(np.mean(bounds[kind])), float(np.mean(u_bounds[kind]))
        print(f"{kind:<8} {'bound':<11} {u_bound:8.3f} {bound:10.1f} {'':>7} {'':>7} {u_bound / edge_u:8.3f}")
        for name in args.contenders.split(","):
            group = by[(kind, name)]
            u = np.mean([r["utility"] for r in group])
            p99 = [r["p99_ms"] for r in group if r["p99_ms"] is not None]
            print(f"{kind:<8} {name:<11} {u:8.3f} {np.mean([r['goodput_per_s'] for r in group]):10.1f} "
                  f"{100 * np.mean([r['deadline_miss_rate'] or 0 for r in group]):7.2f} "
                  f"{np.mean(p99) if p99 else float('nan'):7.1f} {u / edge_u:8.3f} "
                  f"{np.mean([r['goodput_per_s'] for r in group]) / bound:8.3f} {u / u_bound:10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


# --- record and offline ---------------------------------------------------------------------------

def record(args) -> None:
    """Replay a trace file under a policy in the simulator and write its transitions (.npz)."""
    from agent.workload.trace import read_trace
    global _lanes, _board
    board = _board = BOARDS[args.board]
    trace = read_trace(args.trace)
    space = ActionSpace(MODELS)
    if args.policy == "rules":
        _lanes = args.lanes
        chooser = RulesChooser(space)
    else:
        from agent.learned.card import load_policy
        loaded = load_policy(args.policy, MODELS)
        _lanes = loaded.card["training"].get("lanes", "edge")
        chooser = lambda features, mask, now: loaded.net.act(features, mask)     # noqa: E731
    result, rec = chooser_run(board, trace, chooser, MODELS, log=True)
    rec.save(args.out, result.records, {"feature_schema": FEATURE_SCHEMA_VERSION, "features": feature_names(MODELS),
                                        "actions": space.names, "board": board.name, "trace": str(args.trace),
                                        "policy": args.policy, "lanes": _lanes, "miss_penalty": 0.5})
    print(f"{rec.n} transitions under {args.policy} ({_lanes} lanes), utility {score(result)['utility']:.3f}: {args.out}")


def offline(args) -> None:
    """Implicit Q-learning (IQL, discrete) from logged transitions straight into the 2x32 student:
    an expectile value V, a Q fitted to r + discount x V(s'), and the student by advantage-weighted
    imitation of the logged actions (exp(beta x (Q - V)), capped). No simulator: what a board's
    recorded runs can train."""
    torch, nn, MLPNet = torch_parts()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    data = [np.load(path) for path in args.transitions]
    headers = [json.loads(str(d["header"])) for d in data]
    names = feature_names(MODELS)
    for path, header in zip(args.transitions, headers):
        if header.get("features") != names:
            raise SystemExit(f"{path}: feature names differ from schema {FEATURE_SCHEMA_VERSION}'s for {list(MODELS)}")
    cat = {k: np.concatenate([d[k] for d in data]) for k in ("state", "action", "reward", "next_state", "mask",
                                                             "next_mask", "done", "time")}
    n = len(cat["action"])
    dt = np.concatenate([np.append(d["time"][1:] - d["time"][:-1], 0.0) for d in data])
    g = np.exp(-np.maximum(dt, 0) / (args.tau_ms / 1000.0)).astype(np.float32)
    scale = float(np.mean([len(d["action"]) for d in data]))      # rewards per decision to about 1 an answer
    mean = cat["state"].mean(0).astype(np.float32)
    std = cat["state"].std(0).astype(np.float32)
    std[std < 1e-3] = 1.0
    n_in, n_out = len(names), len(action_names(MODELS))
    q, v = MLPNet(n_in, n_out, (128, 128), mean, std), MLPNet(n_in, 1, (128, 128), mean, std)
    q_target = copy.deepcopy(q)
    student = MLPNet(n_in, n_out, (32, 32), mean, std)
    opt_q, opt_v = torch.optim.Adam(q.parameters(), lr=3e-4), torch.optim.Adam(v.parameters(), lr=3e-4)
    opt_pi = torch.optim.Adam(student.parameters(), lr=1e-3)
    T = {k: torch.as_tensor(x) for k, x in cat.items()}
    T["g"] = torch.as_tensor(g)
    T["reward"] = T["reward"].float() * scale
    F = torch.nn.functional
    progress = Progress(args.steps, desc="offline IQL", unit="step")
    for step in range(args.steps):
        if step % 500 == 0:
            progress.advance_to(step)
        idx = torch.as_tensor(rng.integers(0, n, args.batch))
        s, a, r, s2, m = T["state"][idx], T["action"][idx], T["reward"][idx], T["next_state"][idx], T["mask"][idx]
        d, gg = T["done"][idx].float(), T["g"][idx]
        with torch.no_grad():
            q_sa = q_target(s).gather(1, a[:, None]).squeeze(1)
        diff = q_sa - v(s).squeeze(1)
        weight = torch.abs(args.expectile - (diff < 0).float())
        loss_v = (weight * diff ** 2).mean()
        opt_v.zero_grad(); loss_v.backward(); opt_v.step()
        with torch.no_grad():
            y = r + gg * (1 - d) * v(s2).squeeze(1)
        loss_q = F.mse_loss(q(s).gather(1, a[:, None]).squeeze(1), y)
        opt_q.zero_grad(); loss_q.backward(); opt_q.step()
        with torch.no_grad():
            for p_, pt in zip(q.parameters(), q_target.parameters()):
                pt.mul_(0.995).add_(0.005 * p_)
            adv = q_target(s).gather(1, a[:, None]).squeeze(1) - v(s).squeeze(1)
            w = torch.clamp(torch.exp(args.beta * adv), max=100.0)
        loss_pi = (w * F.cross_entropy(masked(student(s), m), a, reduction="none")).mean()
        opt_pi.zero_grad(); loss_pi.backward(); opt_pi.step()
    progress.close()
    with torch.no_grad():
        agree = float((masked(student(T["state"]), T["mask"]).argmax(1) == T["action"]).float().mean())
    layers = student.numpy_layers()
    weights = {"w1": layers[0][0], "b1": layers[0][1], "w2": layers[1][0], "b2": layers[1][1],
               "w3": layers[2][0], "b3": layers[2][1]}
    lanes = {h.get("lanes", "edge") for h in headers}
    training = {"board": headers[0].get("board"), "lanes": lanes.pop() if len(lanes) == 1 else "edge",
                "offline": {"algorithm": "discrete IQL (expectile V, Q, advantage-weighted imitation)",
                            "transitions": [str(p) for p in args.transitions], "decisions": n,
                            "expectile": args.expectile, "beta": args.beta, "steps": args.steps,
                            "tau_ms": args.tau_ms, "seed": args.seed,
                            "agreement_with_logged_actions": agree},
                "profile": {"batch_ms": BOARDS[headers[0].get("board", "cpu-2core")].profile_ms},
                "teacher_agreement": {"agreement": agree, "of": "the logged actions (no teacher offline)"}}
    card = write_policy(args.out, weights, lanes=MODELS, buckets=BATCH_BUCKETS, mean=mean, std=std,
                        idle_tick_ms=1.0, training=training)
    print(f"offline IQL on {n} transitions: the student takes the logged action on {100 * agree:.1f}% of them; {card}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="teacher (discrete SAC) and student (DAgger) for a board; export policy + card")
    t.add_argument("--board", choices=sorted(BOARDS), default="cpu-2core")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True, help="policy directory to write (policies/<board-class>)")
    t.add_argument("--work", help="checkpoints, curves, transition log (default runs/<board>)")
    t.add_argument("--lanes", choices=LANES, default="edge", help="the lanes trained on (LANES)")
    t.add_argument("--episodes", type=int, default=40)
    t.add_argument("--bootstrap", type=int, default=6)
    t.add_argument("--dagger", type=int, default=6)
    t.add_argument("--duration", type=float, default=4.0, help="seconds of trace per episode")
    t.add_argument("--batch", type=int, default=256)
    t.add_argument("--updates-per-step", type=float, default=0.1)
    t.add_argument("--critic-warmup", type=int, default=1500)
    t.add_argument("--bc-epochs", type=int, default=20)
    t.add_argument("--student-epochs", type=int, default=15)
    t.add_argument("--miss-penalty", type=float, default=2.0,
                   help="an admitted request that misses costs this many answers in time "
                        "(agent.learned.transitions: why above 1 on lanes with admission)")
    t.add_argument("--checkpoint-every", type=int, default=10)
    t.add_argument("--tau-ms", type=float, default=50.0,
                   help="the discount's time constant: a reward dt later counts exp(-dt / tau)")
    t.add_argument("--validation", type=int, default=4, help="validation traces (for the actor kept)")
    t.add_argument("--validate-every", type=int, default=5)
    t.add_argument("--bc-weight", type=float, default=0.5,
                   help="weight of the cross-entropy to the rules' actions in the actor's loss (0: pure SAC)")
    t.add_argument("--target-entropy", type=float, default=0.3,
                   help="the temperature's target: this fraction of the allowed actions' log count")
    t.add_argument("--keep-best", action=argparse.BooleanOptionalAction, default=True)
    e = sub.add_parser("evaluate", help="held-out traces in the simulator: every contender and the learned policy")
    e.add_argument("--board", choices=sorted(BOARDS), default="cpu-2core")
    e.add_argument("--policy", required=True)
    e.add_argument("--contenders", default="fifo,fixed,triton,clipper,deeprt,edge,shed,rules_lanes,learned",
                   help="bench contenders, 'shed' (the rules on lanes without admission), 'rules_lanes' (the "
                        "rules on the policy's lanes) and 'learned'")
    e.add_argument("--duration", type=float, default=10.0)
    e.add_argument("--per-kind", type=int, default=2)
    e.add_argument("--teacher", help="a teacher checkpoint (runs/<board>/teacher_final.pt): its greedy choices too")
    e.add_argument("--json")
    r = sub.add_parser("record", help="replay a trace file under a policy in the simulator; write its transitions")
    r.add_argument("--board", choices=sorted(BOARDS), default="cpu-2core")
    r.add_argument("--trace", required=True)
    r.add_argument("--policy", default="rules", help="'rules' or a learned policy's directory")
    r.add_argument("--lanes", choices=LANES, default="edge", help="with --policy rules: the lanes")
    r.add_argument("--out", required=True, help="the .npz to write")
    o = sub.add_parser("offline", help="discrete IQL from logged transitions into the 2x32 student; export a policy")
    o.add_argument("--transitions", nargs="+", required=True)
    o.add_argument("--out", required=True)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--steps", type=int, default=4000)
    o.add_argument("--batch", type=int, default=256)
    o.add_argument("--expectile", type=float, default=0.7)
    o.add_argument("--beta", type=float, default=3.0)
    o.add_argument("--tau-ms", type=float, default=50.0)
    args = parser.parse_args(argv)
    {"train": train, "evaluate": evaluate, "record": record, "offline": offline}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
