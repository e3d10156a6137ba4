"""Config validation: good files load; each bad setting is named with its value and expectation."""
import math
from pathlib import Path

import pytest

from agent.config import CONFIG_VERSION, Config, ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


def base() -> dict:
    return {
        "config_version": CONFIG_VERSION,
        "agent": {"device": "board-1"},
        "models": [{"name": "mobilenet_digits", "card": "demo:mobilenet_digits"}],
    }


def test_demo_config_is_valid():
    config = Config.demo(mqtt_port=18830)
    assert config.mqtt.port == 18830
    assert [m.name for m in config.models] == ["mobilenet_digits", "resnet_digits"]
    assert all(m.batching.rule == "deadline_aware" for m in config.models)


@pytest.mark.parametrize("path", sorted((ROOT / "firmware_configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_board_configs_parse(path):
    config = load_config(path)
    assert config.models, path


def test_defaults_fill_in():
    config = parse_config(base())
    model = config.models[0]
    assert (model.backend, model.file, model.instances, model.threads) == ("onnxruntime", "onnx", 1, 1)
    assert config.worker_count >= 1


@pytest.mark.parametrize("mutate, field, fragment", [
    (lambda c: c.update(config_version=2), "config_version", "expected 1"),
    (lambda c: c.update(models=[]), "models", "at least one"),
    (lambda c: c["models"][0].update(instances=0), "models[0].instances", "1..64"),
    (lambda c: c["models"][0].update(instances="2"), "models[0].instances", "1..64"),
    (lambda c: c["models"][0].update(backend="tensorflow"), "models[0].backend", "onnxruntime"),
    (lambda c: c["models"][0].update(name="a/b"), "models[0].name", "topic level"),
    (lambda c: c["models"][0].update(batching={"rule": "greedy"}), "models[0].batching.rule", "deadline_aware"),
    (lambda c: c["models"][0].update(batching={"max_batch": 0}), "models[0].batching.max_batch", "1..1024"),
    (lambda c: c["models"][0].update(batching={"max_batch": 4, "preferred_sizes": [8]}),
     "models[0].batching.preferred_sizes", "1..max_batch (4)"),
    (lambda c: c["models"][0].update(batching={"max_queue_delay_ms": -1}), "models[0].batching.max_queue_delay_ms", ">= 0"),
    (lambda c: c["models"][0].update(default_slo_ms=0), "models[0].default_slo_ms", "> 0"),
    (lambda c: c["models"][0].update(instanses=2), "models[0].instanses", "known keys"),
    (lambda c: c["agent"].update(max_payload_bytes=10), "agent.max_payload_bytes", "1024.."),
    (lambda c: c["agent"].update(device="a+b"), "agent.device", "without"),
    (lambda c: c["agent"].update(hold_fraction=2), "agent.hold_fraction", "0..1"),
    (lambda c: c["agent"].update(hold_fraction="0.25"), "agent.hold_fraction", "0..1"),
    (lambda c: c["agent"].update(worker_nice=20), "agent.worker_nice", "0..19"),
    (lambda c: c["agent"].update(worker_nice=-1), "agent.worker_nice", "0..19"),
    (lambda c: c["agent"].update(admission_lookahead=1), "agent.admission_lookahead", "bool"),
    (lambda c: c["agent"].update(edf_horizon_ms=-5), "agent.edf_horizon_ms", "0 = plain EDF"),
    (lambda c: c["agent"].update(edf_horizon_ms="50"), "agent.edf_horizon_ms", "milliseconds"),
    (lambda c: c.update(mqtt={"port": 70000}), "mqtt.port", "1..65535"),
    (lambda c: c.update(mqtt={"enabled": "yes"}), "mqtt.enabled", "bool"),
    (lambda c: c.update(mqtt={"pools": ["cams/1"]}), "mqtt.pools", "without '/'"),
    (lambda c: c.update(mqtt={"pools": ["a", "a"]}), "mqtt.pools", "distinct"),
    (lambda c: c.update(mqtt={"pools": "cams"}), "mqtt.pools", "a list"),
    (lambda c: c.update(http={"port": 70000}), "http.port", "0..65535"),
    (lambda c: c.update(http={"port": "8000"}), "http.port", "0..65535"),
    (lambda c: c.update(http={"enabled": 1}), "http.enabled", "bool"),
    (lambda c: c.update(http={"host": ""}), "http.host", "a host name or address"),
    (lambda c: c.update(http={"prot": 8000}), "http.prot", "known keys"),
    (lambda c: c.update(http=[]), "http", "a table"),
    (lambda c: c["models"].append(dict(c["models"][0])), "models[1].name", "not used by another"),
    (lambda c: c.update(offload={"probe_idle_s": 0.01}), "offload.probe_idle_s", "or 0 (off)"),
    (lambda c: c.update(offload={"probe_idle_s": "2"}), "offload.probe_idle_s", "seconds in 0.05..3600"),
    (lambda c: c.update(offload={"probe_bytes": -1}), "offload.probe_bytes", "0: round trips only"),
    (lambda c: c.update(offload={"probe_bytes": 1.5}), "offload.probe_bytes", "bytes in 0.."),
])
def test_bad_settings_are_named(mutate, field, fragment):
    config = base()
    mutate(config)
    with pytest.raises(ConfigError) as info:
        parse_config(config)
    assert info.value.field == field
    assert fragment in str(info.value)
    assert str(info.value).startswith(f"config: {field} = ")


def test_scheduler_settings_default_on_and_can_be_turned_off():
    config = parse_config(base())
    assert config.admission_lookahead is True and config.worker_nice == 5
    raw = base()
    raw["agent"].update(admission_lookahead=False, worker_nice=0)
    config = parse_config(raw)
    assert config.admission_lookahead is False and config.worker_nice == 0


def test_hold_fraction_defaults_to_a_quarter_and_zero_turns_it_off():
    assert parse_config(base()).hold_fraction == 0.25
    config = base()
    config["agent"]["hold_fraction"] = 0
    assert parse_config(config).hold_fraction == 0.0


def test_edf_horizon_defaults_to_50_ms_and_zero_means_plain_edf():
    config = parse_config(base())
    assert config.edf_horizon_ms == 50.0 and config.edf_horizon_s == 0.05
    raw = base()
    raw["agent"]["edf_horizon_ms"] = 0
    assert parse_config(raw).edf_horizon_s == math.inf


def test_the_idle_probe_defaults_to_2_s_sized_by_the_board_and_zero_turns_it_off():
    offload = parse_config(base()).offload
    assert offload.probe_idle_s == 2.0 and offload.probe_bytes is None
    raw = base()
    raw["offload"] = {"probe_idle_s": 0, "probe_bytes": 0}
    offload = parse_config(raw).offload
    assert offload.probe_idle_s == 0.0 and offload.probe_bytes == 0


def test_http_intake_is_off_unless_enabled():
    http = parse_config(base()).http
    assert (http.enabled, http.host, http.port) == (False, "127.0.0.1", 8000)
    http = parse_config(dict(base(), http={"enabled": True, "host": "0.0.0.0", "port": 0})).http
    assert (http.enabled, http.host, http.port) == (True, "0.0.0.0", 0)


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("config_version = = 1\n")
    with pytest.raises(ConfigError, match="valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="an existing TOML file"):
        load_config(tmp_path / "missing.toml")


def test_relative_card_path_resolves_against_the_config_file(tmp_path):
    (tmp_path / "cfg.toml").write_text(
        'config_version = 1\n[[models]]\nname = "m"\ncard = "cards/m.json"\n')
    config = load_config(tmp_path / "cfg.toml")
    assert config.models[0].card == str(tmp_path / "cards" / "m.json")


def test_the_policy_defaults_to_the_rules_and_an_unknown_one_is_named():
    assert parse_config(base()).policy == "rules"
    data = base()
    data["agent"]["policy"] = "rules"
    assert parse_config(data).policy == "rules"
    data["agent"]["policy"] = "learned-v9"
    with pytest.raises(ConfigError) as refused:
        parse_config(data)
    assert "agent.policy" in str(refused.value) and "learned-v9" in str(refused.value) and "rules" in str(refused.value)


def test_mqtt_subscribers_default_to_the_inference_intake_and_unknown_ones_are_named():
    assert parse_config(base()).mqtt.subscribers == ("infer",)
    data = base()
    data["mqtt"] = {"subscribers": []}
    assert parse_config(data).mqtt.subscribers == ()
    for wrong in (["infer", "telemetry-v0"], ["infer", "infer"], "infer"):
        data["mqtt"] = {"subscribers": wrong}
        with pytest.raises(ConfigError) as refused:
            parse_config(data)
        assert "mqtt.subscribers" in str(refused.value) and "infer" in str(refused.value)


def test_each_known_subscriber_is_a_class_that_takes_the_agent_and_its_transport():
    import importlib
    import inspect
    from agent.transport.subscribers import SUBSCRIBERS, build_subscriber
    for name, where in SUBSCRIBERS.items():
        module, _, cls = where.partition(":")
        subscriber = getattr(importlib.import_module(module), cls)
        assert list(inspect.signature(subscriber).parameters)[:2] == ["agent", "transport"], name
        assert callable(subscriber.start) and callable(subscriber.stop_taking), name
    with pytest.raises(ValueError, match="subscriber 'nope'"):
        build_subscriber("nope", None, None)


def test_workers_0_means_the_cores_this_process_may_run_on():
    """`workers = 0` follows the CPU affinity (taskset, a container's cpuset), not the machine's count."""
    import os
    import shutil
    import subprocess
    import sys
    if shutil.which("taskset") is None or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs taskset and two cores to pin a process to one")
    code = "from agent.config import Config; print(Config.demo().worker_count)"
    pinned = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert pinned.stdout.strip() == "1", pinned.stderr
    assert Config.demo().worker_count == len(os.sched_getaffinity(0))


def _cgroup_tree(tmp_path, proc_line: str, files: dict[str, str]):
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "cgroup"
    proc.write_text(proc_line + "\n")
    for rel, text in files.items():
        path = tmp_path / "fs" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(tmp_path / "fs"), str(proc)


def test_the_cgroup_cpu_quota_is_read_from_v1_and_v2(tmp_path):
    from agent.config import cgroup_cpu_quota
    root, proc = _cgroup_tree(tmp_path / "v1", "4:cpu,cpuacct:/boards/a",
                              {"cpu,cpuacct/boards/a/cpu.cfs_quota_us": "50000", "cpu,cpuacct/boards/a/cpu.cfs_period_us": "100000"})
    assert cgroup_cpu_quota(root, proc) == 0.5
    root, proc = _cgroup_tree(tmp_path / "v2", "0::/system.slice/edge-agent.service",
                              {"system.slice/edge-agent.service/cpu.max": "150000 100000"})
    assert cgroup_cpu_quota(root, proc) == 1.5
    root, proc = _cgroup_tree(tmp_path / "none", "0::/x", {"x/cpu.max": "max 100000"})
    assert cgroup_cpu_quota(root, proc) is None
    root, proc = _cgroup_tree(tmp_path / "unlimited", "4:cpu:/", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})
    assert cgroup_cpu_quota(root, proc) is None
    assert cgroup_cpu_quota(str(tmp_path / "nowhere"), str(tmp_path / "no-such-file")) is None


def test_a_process_under_a_half_core_quota_takes_one_execution_slot(tmp_path):
    """A real cgroup v1 CPU quota of half a core (root only): ``workers = 0`` means one slot, not
    one per core of the machine (two slots would time-slice half a core)."""
    import os
    import subprocess
    import sys
    base = "/sys/fs/cgroup/cpu"
    if os.geteuid() != 0 or not os.path.isfile(os.path.join(base, "cpu.cfs_quota_us")):
        pytest.skip("needs root and the cgroup v1 cpu controller at /sys/fs/cgroup/cpu")
    group = os.path.join(base, f"edge-agent-test-{os.getpid()}")
    os.mkdir(group)
    try:
        with open(os.path.join(group, "cpu.cfs_period_us"), "w") as fh:
            fh.write("100000")
        with open(os.path.join(group, "cpu.cfs_quota_us"), "w") as fh:
            fh.write("50000")
        code = ("import os,sys; open(sys.argv[1], 'w').write(str(os.getpid()));"
                "from agent.config import available_cores, cgroup_cpu_quota, cpu_budget;"
                "print(available_cores(), cgroup_cpu_quota(), cpu_budget())")
        script = f"echo $$ > {group}/cgroup.procs && exec {sys.executable} -c \"{code}\" {tmp_path / 'pid'}"
        out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["1", "0.5", "0.5"]     # one slot; half a core to measure load against
    finally:
        os.rmdir(group)
