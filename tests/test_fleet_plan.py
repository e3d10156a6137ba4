"""The fleet planner (``edge-agent plan``, ``agent.fleet``): hand-checked placements, the
interference that knapsack misses shown in the simulated replay, every written config loading
with the agent's own loader, the manifests valid against the Kubernetes API schemas (offline, the
schemas bundled by ``kubernetes-validate``), and bad application lists refused by name.

Small boards here are synthetic profiles made in the test (exact, round figures), so the expected
numbers can be worked out by hand; the CLI test runs the shipped profiles and example list.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.config import load_config, parse_config
from agent.fleet import PROFILES_DIR
from agent.fleet.apps import App, AppsError, load_apps, parse_apps
from agent.fleet.boards import Board, fleet_boards, load_kinds
from agent.fleet.derive import gpu_like
from agent.fleet.emit import board_config, to_toml
from agent.fleet.k8s import KIND_LABEL, board_manifests, to_yaml
from agent.fleet.latency import erlang_c, predict_board
from agent.fleet.placement import Predictor, interference_aware, knapsack, local_search
from agent.fleet.replay import replay_plan
from agent.profiler.profile_file import ProfileError, save_profile

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_APPS = ROOT / "examples" / "fleet" / "apps.toml"


def board_profile(kind: str, cores: int, workers: int, beta_ms: float, gamma: float = 0.0,
                  model: str = "mobilenet_digits", memory_mb: float = 1024) -> dict:
    """A profile whose batch of b takes exactly b * beta_ms alone (alpha 0), gamma as given."""
    data = gpu_like({model: (0.0, beta_ms)}, {"kind": kind, "made": "synthetic, for the test",
                                              "memory_mb": memory_mb, "model_memory_mb": {model: 50},
                                              "workers": workers}, created="2026-12-07T00:00:00+00:00",
                    sizes=(1, 2, 4, 8))
    data["host"]["cores"] = cores
    data["models"][model]["fit"]["params"].update({"cores": cores, "gamma": gamma})
    return data


def kinds_from(tmp_path: Path, *profiles: dict) -> dict:
    directory = tmp_path / "profiles"
    directory.mkdir(exist_ok=True)
    for data in profiles:
        save_profile(data, directory / f"{data['board']['kind']}.json")
    return load_kinds(directory)


# --- the latency model and the placements, by hand ---------------------------------------------

def test_two_boards_three_apps_worked_out_by_hand(tmp_path):
    """One-slot boards, 10 ms per request, three applications at 30/s with a 100 ms SLO.

    Two on a board: load a = 2 * 30 * 0.010 = 0.6; Erlang C(1, 0.6) = 0.6; Allen-Cunneen's
    conditional mean wait E[S^2]/(2 E[S](1 - a)) = 10 / 0.8 = 12.5 ms, tail ln(0.6 / 0.01) = 4.094:
    51.2 ms; head-of-line blocking (C > 1 %) one 10 ms batch: wait 61.2 ms, latency 71.2 ms <= 0.8 x
    100 ms. A third: a = 0.9 > 0.8, refused. Knapsack (cores alone) puts all three on the first
    board (0.9 <= 1 core); the interference-aware plan puts two there and one on the second.
    """
    kinds = kinds_from(tmp_path, board_profile("one-core", cores=1, workers=1, beta_ms=10.0))
    boards = fleet_boards(kinds, {"one-core": 2})
    apps = [App(name, "mobilenet_digits", 30.0, 100.0) for name in ("a", "b", "c")]

    two = predict_board(boards[0].kind, apps[:2])
    assert two.feasible and two.models["mobilenet_digits"].batch == 1
    assert erlang_c(1, 0.6) == pytest.approx(0.6)
    expected_ms = 10 / (2 * 0.4) * math.log(0.6 / 0.01) + 10 + 10
    assert two.latency_s["a"] * 1e3 == pytest.approx(expected_ms, rel=1e-9)
    assert expected_ms == pytest.approx(71.18, abs=0.01)
    three = predict_board(boards[0].kind, apps)
    assert not three.feasible and "load 0.90" in three.reason

    ours = interference_aware(boards, apps)
    assert sorted(len(v) for v in ours.hosted.values()) == [1, 2] and not ours.unplaced
    base = knapsack(boards, apps)
    assert [len(base.hosted[b.name]) for b in boards] == [3, 0]


def test_knapsack_violates_where_interference_matters_and_ours_does_not(tmp_path):
    """Two 2-core boards whose co-running batches slow each other 2x (gamma = 1: a second core
    adds nothing). Knapsack counts two cores and puts three 0.4-core applications on the first
    board: 1.2 cores of work on what runs like one. The replay (the live scheduler, simulated with
    the same interference) shows its applications missing their SLO; ours spreads them and none does."""
    kinds = kinds_from(tmp_path, board_profile("contended", cores=2, workers=2, beta_ms=5.0, gamma=1.0))
    boards = fleet_boards(kinds, {"contended": 2})
    apps = [App(f"cam{i}", "mobilenet_digits", 80.0, 100.0) for i in range(3)]
    predict = Predictor()
    base = knapsack(boards, apps)
    assert len(base.hosted[boards[0].name]) == 3
    ours = interference_aware(boards, apps, predict)
    assert max(len(v) for v in ours.hosted.values()) < 3 and not ours.unplaced

    base_replay = replay_plan(base, duration_s=10.0, predict=predict)
    ours_replay = replay_plan(ours, duration_s=10.0, predict=predict)
    assert len(base_replay.violations) >= 1, base_replay.apps
    assert ours_replay.violations == [], ours_replay.apps
    assert len(ours_replay.hosted) == 3 > len(base_replay.hosted)


def test_local_search_hosts_as_many_as_the_best_assignment_on_two_boards(tmp_path):
    """Board x and board y (one slot, 10 ms each, load cap 0.8): demands 0.2, 0.2, 0.3, 0.45 and
    0.5 sum to 1.65, more than both boards' 1.6, so at most four fit; first fit hosts four too
    (0.2 + 0.2 + 0.3 and 0.45; 0.5 fits beside neither). Local search keeps that and every board
    feasible; the count is checked against all 3^5 assignments."""
    kinds = kinds_from(tmp_path, board_profile("one-core", cores=1, workers=1, beta_ms=10.0))
    boards = fleet_boards(kinds, {"one-core": 2})
    apps = [App("s1", "mobilenet_digits", 20.0, 1000.0), App("s2", "mobilenet_digits", 20.0, 1000.0),
            App("m", "mobilenet_digits", 30.0, 1000.0), App("l1", "mobilenet_digits", 45.0, 1000.0),
            App("l2", "mobilenet_digits", 50.0, 1000.0)]
    predict = Predictor()
    first = interference_aware(boards, apps, predict)
    better = local_search(boards, apps, predict, start=first)
    assert _exhaustive_best(boards, apps, predict) == 4
    assert first.placed_count == better.placed_count == 4
    for board in boards:
        assert predict(board, better.hosted[board.name]).feasible


def _exhaustive_best(boards, apps, predict) -> int:
    """The most applications any assignment hosts with every board feasible under ``predict``:
    every application on every board or on none, all (len(boards) + 1) ** len(apps) of them."""
    import itertools
    n = len(apps)
    feasible = {}
    for j, board in enumerate(boards):
        for mask in range(1 << n):
            members = [apps[i] for i in range(n) if mask >> i & 1]
            feasible[j, mask] = (all(board.kind.serves(a.model) for a in members)
                                 and predict(board, members).feasible)
    best = 0
    for assign in itertools.product(range(len(boards) + 1), repeat=n):
        masks = [0] * len(boards)
        for i, j in enumerate(assign):
            if j < len(boards):
                masks[j] |= 1 << i
        if all(feasible[j, masks[j]] for j in range(len(boards))):
            best = max(best, sum(1 for j in assign if j < len(boards)))
    return best


def test_local_search_reaches_the_exhaustive_optimum_where_the_repairs_alone_do_not():
    """Eight applications of the three demo models on the shipped kinds (one cpu-2core, two
    cpu-halfcore; the mix is ``random_apps(8, 7)``): the packing starts with one-move repairs
    (``iterations=0``) host fewer than the best of all 4^8 assignments under the same latency
    model; the large-neighbourhood search hosts that many, each board feasible."""
    from agent.fleet.plan import random_apps
    boards = fleet_boards(load_kinds(PROFILES_DIR), {"cpu-2core": 1, "cpu-halfcore": 2})
    apps = list(random_apps(8, 7).apps)
    predict = Predictor()
    optimum = _exhaustive_best(boards, apps, predict)
    repairs_only = local_search(boards, apps, predict, iterations=0)
    searched = local_search(boards, apps, predict, iterations=200, budget_s=120)
    assert repairs_only.placed_count < optimum
    assert searched.placed_count == optimum
    for board in boards:
        assert predict(board, searched.hosted[board.name]).feasible
    again = local_search(boards, apps, Predictor(), iterations=200, budget_s=120)      # seeded: the same plan
    assert {b: [a.name for a in v] for b, v in again.hosted.items()} == \
        {b: [a.name for a in v] for b, v in searched.hosted.items()}


def test_the_simulation_check_turns_a_violating_plan_into_one_that_holds(tmp_path):
    """Knapsack's plan of the contended boards above (three applications on the first board, the
    second empty) misses SLOs in the replay; the simulation check (its own traces, not the
    replay's) gives up applications on the first board until the simulator says it holds and
    places them on the second: the replay then finds no violation and all three hosted."""
    from agent.fleet.verify import CHECK_SEED, simulation_checked
    kinds = kinds_from(tmp_path, board_profile("contended", cores=2, workers=2, beta_ms=5.0, gamma=1.0))
    boards = fleet_boards(kinds, {"contended": 2})
    apps = [App(f"cam{i}", "mobilenet_digits", 80.0, 100.0) for i in range(3)]
    predict = Predictor()
    base = knapsack(boards, apps)
    assert replay_plan(base, duration_s=10.0, predict=predict).violations
    lines: list[str] = []
    checked = simulation_checked(base, predict, duration_s=10.0, progress=lines.append)
    assert CHECK_SEED != 0 and any("gives up" in line for line in lines), lines
    assert len(checked.hosted[boards[1].name]) >= 1 and not checked.unplaced
    replay = replay_plan(checked, duration_s=10.0, predict=predict)
    assert replay.violations == [] and len(replay.hosted) == 3, replay.apps
    assert [a.name for a in base.hosted[boards[0].name]] == ["cam0", "cam1", "cam2"]     # the input is left alone


# --- outputs: configs, manifests, CLI ---------------------------------------------------------

@pytest.fixture(scope="module")
def example_plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan")
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "plan", "--apps", str(EXAMPLE_APPS), "--out", str(out),
                           "--duration", "4", "--search-budget", "3", "--kubeedge"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    return out, proc


def test_plan_command_writes_a_report_against_knapsack(example_plan):
    out, proc = example_plan
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads((out / "report.json").read_text())
    methods = report["methods"]
    assert set(methods) == {"knapsack", "interference_aware", "local_search"}
    assert methods["knapsack"]["violations"], "the shipped example should show knapsack's violations"
    assert methods["local_search"]["hosted"] > methods["knapsack"]["hosted"]
    assert "x knapsack" in proc.stdout and "hosted" in (out / "report.txt").read_text()
    assert "local_search:" in proc.stderr and "simulation check:" in proc.stderr     # progress as it plans
    assert proc.returncode == (1 if methods["local_search"]["violations"] else 0)


def test_every_written_config_loads_with_the_agents_loader(example_plan):
    out, _ = example_plan
    configs = sorted((out / "configs").glob("*.toml"))
    assert configs
    report = json.loads((out / "report.json").read_text())
    boards = {b for b, apps in report["methods"]["local_search"]["boards"].items() if apps}
    assert {p.stem for p in configs} == boards
    for path in configs:
        config = load_config(path)
        assert config.device == path.stem and config.workers >= 1 and config.models


def test_manifests_validate_against_the_kubernetes_schemas(example_plan):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    out, _ = example_plan
    documents = list(yaml.safe_load_all((out / "k8s" / "manifests.yaml").read_text()))
    kinds = [d["kind"] for d in documents]
    assert kinds.count("Deployment") == kinds.count("ConfigMap") == len(list((out / "configs").glob("*.toml")))
    for doc in documents:
        kubernetes_validate.validate(doc, "1.30", strict=True)
        if doc["kind"] == "ConfigMap":       # the config the pod reads is the agent's own format
            parse_config(__import__("tomllib").loads(doc["data"]["agent.toml"]))
        if doc["kind"] == "Deployment":
            pod = doc["spec"]["template"]["spec"]
            assert KIND_LABEL in pod["nodeSelector"] and "kubernetes.io/hostname" in pod["nodeSelector"]
            assert pod["tolerations"][0]["key"] == "node-role.kubernetes.io/edge"
            limits = pod["containers"][0]["resources"]["limits"]
            if pod["nodeSelector"][KIND_LABEL] == "jetson-like":
                assert limits["nvidia.com/gpu"] == "1"
    # and the validator does reject what is wrong (it is not a no-op offline)
    bad = json.loads(json.dumps(documents[-1]))
    bad["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.30", strict=True)


def test_manifests_round_trip_through_yaml_and_ask_for_the_device():
    docs = board_manifests("orin-7", "jetson-like", "config_version = 1\n", device_resource="nvidia.com/gpu",
                           cpu_limit="2")
    assert list(yaml.safe_load_all(to_yaml(docs))) == docs
    container = docs[1]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"memory": "256Mi", "cpu": "2", "nvidia.com/gpu": "1"}


def test_a_board_config_is_the_agents_toml(tmp_path):
    kinds = kinds_from(tmp_path, board_profile("one-core", cores=1, workers=1, beta_ms=10.0))
    board = fleet_boards(kinds)[0]
    apps = [App("a", "mobilenet_digits", 30.0, 100.0)]
    data = board_config(board, predict_board(board.kind, apps), broker_host="broker.lan", broker_port=1884)
    path = tmp_path / "agent.toml"
    path.write_text(to_toml(data, "header line\nsecond"))
    config = load_config(path)
    assert config.mqtt.host == "broker.lan" and config.mqtt.port == 1884
    assert config.model("mobilenet_digits").default_slo_ms == 100.0
    assert config.model("mobilenet_digits").batching.rule == "deadline_aware"


def test_the_shipped_profiles_are_three_labelled_kinds():
    kinds = load_kinds(PROFILES_DIR)
    assert {"cpu-2core", "cpu-halfcore", "jetson-like"} <= set(kinds)
    for kind in kinds.values():
        assert len(kind.made) > 40
    assert "measured" in kinds["cpu-2core"].made
    assert "derived" in kinds["cpu-halfcore"].made and "quota" in kinds["cpu-halfcore"].made
    assert "derived" in kinds["jetson-like"].made and "Jetson" in kinds["jetson-like"].made
    gpu = kinds["jetson-like"]
    # where batching pays: 8 requests in one batch cost far less than 8 batches of one
    assert gpu.isolated_s("resnet_digits", 8) < 0.5 * 8 * gpu.isolated_s("resnet_digits", 1)


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, named", [
    ('apps_version = 1\n[[apps]]\nname = "a"\nmodel = "m"\nslo_ms = 10\n', "apps[0] (a).rate_per_s"),
    ('apps_version = 1\n[[apps]]\nname = "a"\nmodel = "m"\nrate_per_s = 5\nslo_ms = -1\n', "apps[0] (a).slo_ms = -1"),
    ('apps_version = 1\n[[apps]]\nname = "a"\nmodel = "m"\nrate_per_s = 5\nslo_ms = 10\nmin_accuracy = 2\n',
     "min_accuracy = 2"),
    ('apps_version = 1\n[[apps]]\nname = "a"\nmodel = "m"\nrate_per_s = 5\nslo_ms = 10\nrate = 3\n', "apps[0] (a).rate"),
    ('apps_version = 1\n[[apps]]\nname = "a"\nmodel = "m"\nrate_per_s = 5\nslo_ms = 10\n'
     '[[apps]]\nname = "a"\nmodel = "m"\nrate_per_s = 5\nslo_ms = 10\n', "apps[1] (a).name"),
    ('apps_version = 2\n', "apps_version = 2"),
    ('apps_version = 1\n', "at least one [[apps]]"),
    ('apps_version = 1\n[fleet]\ncpu = -1\n[[apps]]\nname = "a"\nmodel = "m"\nrate_per_s = 5\nslo_ms = 10\n',
     "fleet.cpu = -1"),
    ('apps_version = 1\n[[apps]]\nname = "a/b"\nmodel = "m"\nrate_per_s = 5\nslo_ms = 10\n', "apps[0].name"),
    ('apps_version = 1\n[[apps]\n', "valid TOML"),
])
def test_a_bad_application_list_is_refused_by_name(tmp_path, text, named):
    path = tmp_path / "apps.toml"
    path.write_text(text)
    with pytest.raises(AppsError) as caught:
        load_apps(path)
    assert named in str(caught.value) and str(path) in str(caught.value)


def test_the_command_refuses_an_unknown_model_and_a_bad_fleet(tmp_path):
    apps = tmp_path / "apps.toml"
    apps.write_text('apps_version = 1\n[[apps]]\nname = "a"\nmodel = "yolo"\nrate_per_s = 5\nslo_ms = 10\n')
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "plan", "--apps", str(apps), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "'yolo'" in proc.stderr and "mobilenet_digits" in proc.stderr
    apps.write_text('apps_version = 1\n[[apps]]\nname = "a"\nmodel = "resnet_digits"\nrate_per_s = 5\nslo_ms = 10\n')
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "plan", "--apps", str(apps), "--out", str(tmp_path / "o"),
                           "--boards", "tpu=2"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "fleet = 'tpu'" in proc.stderr and "cpu-2core" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_a_profile_without_a_board_section_is_refused(tmp_path):
    data = board_profile("x", cores=1, workers=1, beta_ms=1.0)
    del data["board"]
    (tmp_path / "p").mkdir()
    save_profile(data, tmp_path / "p" / "x.json")
    with pytest.raises(ProfileError, match="board"):
        load_kinds(tmp_path / "p")


def test_parse_apps_keeps_what_it_accepts():
    apps = parse_apps({"apps_version": 1, "fleet": {"cpu-2core": 2},
                       "apps": [{"name": "a", "model": "m", "rate_per_s": 5, "slo_ms": 10, "min_accuracy": 0.9}]})
    assert apps.fleet == {"cpu-2core": 2}
    assert apps.app("a") == App("a", "m", 5.0, 10.0, 0.9)


# --- the simulator's interference hook the replay uses ---------------------------------------------

def test_simulate_with_a_slowdown_per_model():
    """``simulate(slowdown=...)``: processor sharing written as a slowdown gives the same run as
    ``cores`` does; a contention factor (gamma = 1: two batches at once each take twice as long)
    stretches exactly the batches that overlap."""
    import numpy as np
    from agent.core import FixedBatch, LatencyTable
    from agent.sim import SimModel, simulate
    from agent.workload.trace import TraceRow

    table = LatencyTable(np.array([1], dtype=np.int64), np.array([0.25]))
    trace = [TraceRow(t, "app", "m", 10_000.0) for t in (0.0, 0.0, 0.0, 1.0)]

    def run(**kwargs):
        models = [SimModel("m", FixedBatch(1), 3, 64, table)]
        return [r.finish_s for r in simulate(trace, models, 3, **kwargs).records]

    shared = run(cores=2)
    assert run(cores=2, slowdown={"m": lambda n: max(1.0, n / 2)}) == pytest.approx(shared)
    # three at once at 3x each: 0.75 s; the lone one at t = 1 runs alone: 1.25
    assert run(slowdown={"m": lambda n: float(n)}) == pytest.approx([0.75, 0.75, 0.75, 1.25])


def test_min_accuracy_is_held_to_the_model_card(tmp_path):
    """camera_digits' card reports 0.9444 test accuracy: an application asking 0.99 is not placed
    (said on stderr, by name); one asking 0.9 is."""
    apps = tmp_path / "apps.toml"
    apps.write_text('apps_version = 1\n'
                    '[[apps]]\nname = "picky"\nmodel = "camera_digits"\nrate_per_s = 2\nslo_ms = 400\nmin_accuracy = 0.99\n'
                    '[[apps]]\nname = "easy"\nmodel = "camera_digits"\nrate_per_s = 2\nslo_ms = 400\nmin_accuracy = 0.9\n')
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "plan", "--apps", str(apps), "--out", str(out),
                           "--duration", "3", "--boards", "cpu-2core=1"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "picky: min_accuracy 0.99 > camera_digits's 0.9444" in proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["methods"]["local_search"]["boards"] == {"cpu-2core-1": ["easy"]}


def test_push_script_loads_the_same_models_with_load_model(example_plan):
    """push.sh's ``edge-agent ctl ... load-model`` lines, parsed as ``ctl`` parses them, are model
    tables the agent's command handler accepts, and they match the board's written config."""
    import shlex
    from agent.config import parse_model_entry
    from agent.ops.cli import parse_command_args
    out, _ = example_plan
    lines = [line for line in (out / "push.sh").read_text().splitlines() if line.startswith("edge-agent ctl")]
    assert lines
    for line in lines:
        words = shlex.split(line)
        device = words[words.index("--device") + 1]
        table = parse_command_args(words[words.index("load-model") + 1:])
        model = parse_model_entry(table)
        assert model == load_config(out / "configs" / f"{device}.toml").model(model.name)


def test_the_quota_kind_is_the_measured_kind_at_half_speed_on_one_core():
    """cpu-halfcore is derived from cpu-2core (agent.fleet.derive.with_quota, 0.5 core): every
    batch time doubled, one core, instances only time-slice it."""
    import json as _json
    from agent.fleet.derive import with_quota
    measured = _json.loads((PROFILES_DIR / "cpu-2core.json").read_text())
    derived = with_quota(measured, 0.5, {"kind": "q", "made": "x", "memory_mb": 1})
    for name, entry in measured["models"].items():
        ours = derived["models"][name]
        assert ours["batch"]["p50_ms"] == pytest.approx([2 * t for t in entry["batch"]["p50_ms"]], abs=1e-3)
        assert ours["fit"]["params"]["cores"] == 1 and ours["fit"]["params"]["gamma"] == 0.0
    shipped = load_kinds(PROFILES_DIR)["cpu-halfcore"].profile.data
    assert {k: v["batch"] for k, v in shipped["models"].items()} == {k: v["batch"] for k, v in derived["models"].items()}
    with pytest.raises(ValueError, match="quota_cores"):
        with_quota(measured, 1.5, {})
