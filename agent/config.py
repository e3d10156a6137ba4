"""Versioned agent configuration (TOML), validated with errors that name the field, the value and
what was expected.

A board's file lives in ``firmware_configs/``; ``Config.demo()`` is the embedded default the demo
runs on. Validation happens once, at load: a running agent never meets a malformed setting.
"""
from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.ops.json_log import LOG_FORMATS
from agent.scheduler.exit_rule import EXIT_MODES
from agent.scheduler.policy import DEFAULT_POLICY, policy_names
from agent.transport.paho_client import MqttSecurity, SecurityError
from agent.transport.subscribers import DEFAULT_SUBSCRIBERS, SUBSCRIBERS

CONFIG_VERSION = 1
BATCHING_RULES = ("fixed", "dynamic", "deadline_aware", "fifo", "aimd", "disbatcher")
BACKEND_KINDS = ("onnxruntime", "litert")


def available_cores() -> int:
    """The cores this process may use: its CPU affinity (taskset, a cgroup cpuset, a container's
    cores), which ``os.cpu_count()`` ignores, and its cgroup's CPU quota (systemd's ``CPUQuota=``, a
    container's ``--cpus``, Kubernetes' CPU limit), rounded up: a slot per machine core on a process
    allowed fewer would only time-slice them, each batch taking several times its profiled time."""
    return max(1, math.ceil(cpu_budget() - 1e-9))


def cpu_budget() -> float:
    """The cores this process may keep busy, unrounded: its cgroup's CPU quota where one is set (0.5
    for half a core), else its CPU affinity (what :func:`available_cores` rounds up to slots, and
    ``agent.offload.cpu`` measures the agent's load against)."""
    try:
        cores = float(len(os.sched_getaffinity(0)) or 1)
    except AttributeError:     # not Linux
        cores = float(os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    return min(cores, quota) if quota is not None and quota > 0 else cores


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> float | None:
    """The CPU quota of this process's cgroup in cores (``quota / period``), or ``None`` when it has
    none or there is no cgroup to read: cgroup v2 (``cpu.max``) or v1 (``cpu.cfs_quota_us`` and
    ``cpu.cfs_period_us`` of the ``cpu`` hierarchy). A quota set on a parent cgroup is not seen."""
    try:
        with open(proc_cgroup) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        path = path.lstrip("/")
        try:
            if controllers == "":                                    # v2: the unified hierarchy
                for base in (os.path.join(root, path), os.path.join(root, "unified", path)):
                    try:
                        with open(os.path.join(base, "cpu.max")) as fh:
                            quota, period = fh.read().split()[:2]
                    except OSError:
                        continue
                    if quota != "max":
                        return int(quota) / int(period)
            elif "cpu" in controllers.split(","):                    # v1: the cpu controller
                base = os.path.join(root, controllers, path)
                if not os.path.isdir(base):
                    base = os.path.join(root, "cpu", path)
                with open(os.path.join(base, "cpu.cfs_quota_us")) as fh:
                    quota = int(fh.read())
                with open(os.path.join(base, "cpu.cfs_period_us")) as fh:
                    period = int(fh.read())
                if quota > 0 and period > 0:
                    return quota / period
        except (OSError, ValueError):
            continue
    return None


class ConfigError(ValueError):
    """``field = value: expected ...``: one bad setting, named so it can be fixed without guessing."""

    def __init__(self, field_path: str, value: Any, expected: str) -> None:
        super().__init__(f"config: {field_path} = {value!r}: expected {expected}")
        self.field = field_path
        self.value = value
        self.expected = expected


@dataclass(frozen=True)
class BatchingConfig:
    """Which batching rule forms a model's batches, and its parameters (``agent.core`` rules)."""

    rule: str = "deadline_aware"
    max_batch: int = 8
    size: int = 4                              # fixed
    preferred_sizes: tuple[int, ...] = ()      # dynamic
    max_queue_delay_ms: float = 0.0            # dynamic
    max_wait_ms: float = 0.0                   # deadline_aware: hold for a bigger batch while slack allows
    margin_ms: float = 0.5                     # deadline_aware: safety margin on predicted finish
    window_ms: float = 0.0                     # disbatcher (required > 0): DeepRT's window, batches leave at its joints
    shed_hopeless: bool = True                 # answer at once what cannot finish in time (default: deadline_aware only)
    admission: bool = True                     # refuse at arrival what is predicted to miss (default: deadline_aware only)


@dataclass(frozen=True)
class ModelConfig:
    name: str
    card: str                                  # "demo:NAME" or a path to a model card
    backend: str = "onnxruntime"
    file: str = "onnx"                         # which of the card's files: onnx | tflite | tflite_int8
    instances: int = 1                         # concurrent sessions of this model
    threads: int = 1                           # intra-op threads per instance
    queue_capacity: int = 1024
    default_slo_ms: float = 100.0              # used when a request names neither slo_ms nor deadline
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    # A multi-exit model (its card lists exits): "off" runs the whole graph; "fixed" answers each
    # request at the earliest exit accurate enough for its min_accuracy, "confidence" at the first
    # exit confident enough (agent.scheduler.exit_rule), running stage by stage.
    exit_mode: str = "off"
    # With exit_mode "fixed": under overload, admit by the online exit allocation (agent.exits.online),
    # which serves the classes (exit, SLO) that make the most requests served per second.
    exit_allocation: bool = False
    # With exit_mode "fixed" or "confidence": each later stage a lane of its own, where the survivors
    # of several batches run together (agent.exits.survivors).
    exit_rebatch: bool = False


@dataclass(frozen=True)
class MqttConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 1883
    keepalive_s: int = 30
    # The topic handlers that run on the agent's connection (agent.transport.subscribers).
    subscribers: tuple[str, ...] = DEFAULT_SUBSCRIBERS
    # Delivery (README, "Delivery guarantees"): how long the broker keeps the agent's session
    # (subscriptions and the requests queued for them) while it is away; 0 = a clean session.
    session_expiry_s: int = 3600
    # Outgoing QoS 1 messages (replies) in flight at once, and held in all until the broker
    # acknowledges them (what overflows is dropped and counted).
    max_inflight_messages: int = 1000
    max_queued_messages: int = 10000
    # A request seen again with the same (response topic, correlation data) is dropped until its
    # deadline plus this many seconds; at most dedup_max requests are remembered.
    dedup_grace_s: float = 30.0
    dedup_max: int = 65536
    # The longest wait between reconnects (takeover back-off).
    reconnect_max_delay_s: int = 60
    # Pools this board serves (README, "Scale out through the broker"): for each group it also takes
    # requests on edge/v1/pool/<group>/infer/<model> through the shared subscription
    # $share/<group>/..., so the broker balances one application's requests across the group's boards.
    pools: tuple[str, ...] = ()
    # Transport security (README, "Securing the broker"): TLS on when `tls` or `tls_ca`/`tls_cert`
    # is set; paths are resolved against the config file's directory. The password is never in the
    # TOML: `password_file` names a file only its owner may read.
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_insecure: bool = False
    username: str | None = None
    password_file: str | None = None

    def security(self) -> MqttSecurity:
        """The settings every client of this config connects with (agent, self-test)."""
        return MqttSecurity(tls=self.tls, ca_file=self.tls_ca, cert_file=self.tls_cert, key_file=self.tls_key,
                            insecure=self.tls_insecure, username=self.username, password_file=self.password_file)


@dataclass(frozen=True)
class HttpConfig:
    """The Open Inference Protocol (KServe v2 / Triton HTTP) intake: off unless enabled."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8000                           # 0 = any free port (the bound one is logged)
    # No client holds a connection for free (agent.intake.http): a request's head must arrive within
    # header_timeout_s (a new connection's first one too), its body within body_timeout_s of the
    # head, and a keep-alive connection may sit idle_timeout_s between requests.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    idle_timeout_s: float = 30.0
    # Open connections beyond this are answered 503 and closed (clipped to the open-file limit).
    max_connections: int = 4096
    max_header_bytes: int = 64 * 1024          # request line and headers; more is 431


@dataclass(frozen=True)
class ControlConfig:
    """Signed control commands (``[mqtt] subscribers`` with ``"cmd"``, agent.ops.commands): the board's
    trusted operator keys and how long a command may live."""

    keyring: str | None = None                 # directory of <key_id>.pub files and an optional `revoked` list
    max_ttl_s: float = 300.0                   # longest validity a command may carry (bounds the replay store)
    clock_skew_s: float = 30.0                 # how far the operator's clock and the board's may disagree


@dataclass(frozen=True)
class TelemetryConfig:
    """What the board reports, and where (agent.ops.prometheus, agent.ops.telemetry_publisher)."""

    prometheus_port: int = 0                   # GET /metrics, Triton's names; 0 = off (Triton's is 8002)
    prometheus_host: str = "127.0.0.1"         # 0.0.0.0 for a Prometheus on another machine
    interval_s: float = 10.0                   # a sample on edge/v1/<device>/telemetry every interval; 0 = off


#: The largest ``[offload] probe_bytes`` (a probe is padding, not work: a few MiB at most).
MAX_PROBE_BYTES = 4 * 1024 * 1024
#: The split policy's ways of pricing an option (``agent.offload.planner``).
PLANNERS = ("queue", "latency")


@dataclass(frozen=True)
class OffloadConfig:
    """Collaborative offload (README, "Offload"): the peer role, the peers this board sends to, and
    the fixed policy's plan (``[agent] policy = "offload_fixed"``)."""

    serve: bool = False                        # the peer role: take partial work on edge/v1/<device>/offload/+
    splits: tuple[str, ...] | None = None      # split points loaded (heads, tails); None = all each card has
    peers: tuple[str, ...] = ()                # devices this board may send batches to (executor targets)
    peer: str | None = None                    # offload_fixed: the peer it sends to
    split: str | None = None                   # offload_fixed: the split point ("none" in the TOML: full offload)
    share: float = 0.5                         # offload_fixed: fraction of batches sent to the peer
    models: tuple[str, ...] | None = None      # offload_fixed: models it offloads; None = every model
    status_interval_s: float = 2.0             # the retained status is refreshed this often (queue delays)
    peer_stale_s: float = 10.0                 # a peer whose status is older than this is forgotten
    margin_ms: float = 5.0                     # the board stops waiting this long before the last moment it
                                               # could still finish the tail itself
    codec: str = "int8"                        # how a split tensor travels (agent.offload.codecs); "raw": as float32
    planner: str = "queue"                     # split policy: "queue" (ours: the backlog's weight too) or
                                               # "latency" (Neurosurgeon: each batch's own earliest finish)
    probe_idle_s: float = 2.0                  # probe a peer's link after this long without a batch to it
                                               # (agent.offload.probe); 0 = off
    probe_bytes: int | None = None             # the big probe's padding; None = one split tensor's item
                                               # after the codec; 0 = round trips only

    @property
    def targets(self) -> tuple[str, ...]:
        """Every peer the board may send to: ``peers`` and the fixed policy's ``peer``."""
        return tuple(dict.fromkeys((*self.peers, *((self.peer,) if self.peer else ()))))


@dataclass(frozen=True)
class Config:
    device: str = "edge-board"
    workers: int = 0                           # execution slots; 0 = one per core available (available_cores)
    max_payload_bytes: int = 4 * 1024 * 1024
    # While an urgent request waits, a batch holds its slot for at most this share of the tightest
    # recent SLO, unless batching pays (agent.scheduler.dispatcher); 0 = no cap. Admission lanes only.
    hold_fraction: float = 0.25
    # Admission counts the work that tighter SLO classes, arriving at their recent rates, will put
    # ahead of a request while it waits (agent.scheduler.admission.overtaken_wait). Admission lanes only.
    admission_lookahead: bool = True
    # The EDF horizon: a request whose SLO is looser than this is queued by ``arrival + horizon``
    # instead of its deadline (it still expires by its deadline), so it does not wait out a whole
    # burst behind tighter requests (agent.scheduler.dispatcher); 0 = plain EDF.
    edf_horizon_ms: float = 50.0
    # Added to the worker threads' nice value: the intake and the board's applications preempt model
    # compute (agent.runtime.live.lower_thread_priority); 0 = the same priority. Linux only.
    worker_nice: int = 5
    # On SIGTERM: how long the agent serves what it queued before answering the rest shutting_down
    # (agent.runtime.live.LiveLoop.stop); the systemd unit's TimeoutStopSec must leave room for it.
    drain_timeout_s: float = 1.0
    # What decides each dispatch: a module of agent.scheduler.policies (agent.scheduler.policy).
    policy: str = DEFAULT_POLICY
    # The learned policy's directory (a card and its weights, agent.learned.card); needed by
    # policy = "learned" and checked against the models when the agent starts.
    policy_path: str | None = None
    profile: str | None = None                 # a profile file (edge-agent profile); None = measure at start
    log_format: str = "text"                   # "json": one JSON object a line on stdout (agent.ops.json_log)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    models: tuple[ModelConfig, ...] = ()

    @property
    def worker_count(self) -> int:
        """Execution slots: ``workers``, or with 0 one per core this process may run on."""
        return self.workers or available_cores()

    @property
    def edf_horizon_s(self) -> float:
        """The scheduler's EDF horizon in seconds (``math.inf`` when ``edf_horizon_ms`` is 0: plain EDF)."""
        return self.edf_horizon_ms / 1000.0 if self.edf_horizon_ms > 0 else math.inf

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    @staticmethod
    def demo(mqtt_port: int = 1883) -> "Config":
        """The embedded default: both demo models on onnxruntime, deadline-aware batching."""
        return parse_config({
            "config_version": CONFIG_VERSION,
            "agent": {"device": "demo-board"},
            "mqtt": {"host": "127.0.0.1", "port": mqtt_port},
            "models": [
                {"name": "mobilenet_digits", "card": "demo:mobilenet_digits", "instances": 2,
                 "batching": {"rule": "deadline_aware", "max_batch": 8}},
                {"name": "resnet_digits", "card": "demo:resnet_digits", "instances": 2,
                 "batching": {"rule": "deadline_aware", "max_batch": 8}},
            ],
        })


def load_config(path: str | Path) -> Config:
    """Read a TOML config file; every problem is a :class:`ConfigError` naming the field."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError("file", str(path), "an existing TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("file", str(path), f"valid TOML ({exc})") from None
    return parse_config(data, base_dir=path.parent)


# --- validation helpers: each names the dotted field path ---------------------------------------

def _take(table: dict, key: str, where: str, kind: type | tuple, default: Any, check=None, expected: str = "") -> Any:
    if key not in table:
        return default
    value = table[key]
    path = f"{where}.{key}" if where else key
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError(path, value, expected or f"a {kinds[0].__name__}")
    if not isinstance(value, kinds):
        raise ConfigError(path, value, expected or f"a {kinds[0].__name__}")
    if check is not None and not check(value):
        raise ConfigError(path, value, expected)
    return value


def _no_unknown(table: dict, known: set[str], where: str) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(f"{where}.{key}" if where else key, table[key], f"one of the known keys {sorted(known)}")


def _table(data: dict, key: str, where: str) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}.{key}" if where else key, value, "a table")
    return value


def _parse_batching(t: dict, where: str) -> BatchingConfig:
    _no_unknown(t, set(BatchingConfig.__dataclass_fields__), where)
    rule = _take(t, "rule", where, str, "deadline_aware", lambda v: v in BATCHING_RULES, f"one of {BATCHING_RULES}")
    max_batch = _take(t, "max_batch", where, int, 8, lambda v: 1 <= v <= 1024, "an integer in 1..1024")
    size = _take(t, "size", where, int, min(4, max_batch), lambda v: 1 <= v <= max_batch, f"an integer in 1..max_batch ({max_batch})")
    preferred = _take(t, "preferred_sizes", where, list, [],
                      lambda v: all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= max_batch for x in v),
                      f"a list of integers in 1..max_batch ({max_batch})")
    window_ms = float(_take(t, "window_ms", where, (int, float), 0.0, lambda v: v >= 0, "a number >= 0"))
    if rule == "disbatcher" and not window_ms > 0:
        raise ConfigError(f"{where}.window_ms", t.get("window_ms"),
                          "a number > 0 for rule 'disbatcher' (DeepRT's window: half the smallest SLO of the model)")
    shed_hopeless = _take(t, "shed_hopeless", where, bool, rule == "deadline_aware")
    admission = _take(t, "admission", where, bool, rule == "deadline_aware")
    if rule == "fifo":
        # The plain one-at-a-time loop computes every request, late or not: that is the baseline.
        for key, value in (("shed_hopeless", shed_hopeless), ("admission", admission)):
            if value:
                raise ConfigError(f"{where}.{key}", value, "false for rule 'fifo' (a plain loop neither sheds nor refuses)")
    return BatchingConfig(
        rule=rule, max_batch=max_batch, size=size, preferred_sizes=tuple(sorted(set(preferred))),
        max_queue_delay_ms=float(_take(t, "max_queue_delay_ms", where, (int, float), 0.0, lambda v: v >= 0, "a number >= 0")),
        max_wait_ms=float(_take(t, "max_wait_ms", where, (int, float), 0.0, lambda v: v >= 0, "a number >= 0")),
        margin_ms=float(_take(t, "margin_ms", where, (int, float), 0.5, lambda v: v >= 0, "a number >= 0")),
        window_ms=window_ms,
        shed_hopeless=shed_hopeless,
        admission=admission,
    )


def _parse_model(t: Any, where: str, base_dir: Path | None) -> ModelConfig:
    if not isinstance(t, dict):
        raise ConfigError(where, t, "a table with at least name and card")
    _no_unknown(t, set(ModelConfig.__dataclass_fields__), where)
    name = _take(t, "name", where, str, None, lambda v: v and "/" not in v and "+" not in v and "#" not in v,
                 "a non-empty name without '/', '+' or '#' (it is an MQTT topic level)")
    if name is None:
        raise ConfigError(f"{where}.name", None, "a model name")
    card = _take(t, "card", where, str, f"demo:{name}")
    if not card.startswith("demo:") and base_dir is not None and not Path(card).is_absolute():
        card = str((base_dir / card).resolve())
    return ModelConfig(
        name=name, card=card,
        backend=_take(t, "backend", where, str, "onnxruntime", lambda v: v in BACKEND_KINDS, f"one of {BACKEND_KINDS}"),
        file=_take(t, "file", where, str, "onnx", lambda v: bool(v), "a file variant named in the model card"),
        instances=_take(t, "instances", where, int, 1, lambda v: 1 <= v <= 64, "an integer in 1..64"),
        threads=_take(t, "threads", where, int, 1, lambda v: 1 <= v <= 64, "an integer in 1..64"),
        queue_capacity=_take(t, "queue_capacity", where, int, 1024, lambda v: 1 <= v <= 1_000_000, "an integer in 1..1000000"),
        default_slo_ms=float(_take(t, "default_slo_ms", where, (int, float), 100.0, lambda v: v > 0, "a number > 0")),
        batching=_parse_batching(_table(t, "batching", where), f"{where}.batching"),
        exit_mode=(mode := _take(t, "exit_mode", where, str, "off", lambda v: v in EXIT_MODES,
                                 f"one of {EXIT_MODES} (early exits: agent.scheduler.exit_rule)")),
        exit_allocation=_take(t, "exit_allocation", where, bool, False, lambda v: not v or mode == "fixed",
                              f"false, or true with exit_mode = \"fixed\" (exit_mode is {mode!r}: the online exit "
                              f"allocation, agent.exits.online, prices each request at one exit)"),
        exit_rebatch=_take(t, "exit_rebatch", where, bool, False, lambda v: not v or mode != "off",
                           f"false, or true with exit_mode \"fixed\" or \"confidence\" (exit_mode is {mode!r}: "
                           f"the whole graph runs as one, there are no stages to re-batch)"),
    )


def parse_model_entry(table: Any, where: str = "models[0]", base_dir: Path | None = None) -> ModelConfig:
    """One ``[[models]]`` table, validated exactly as in a config file (a ``load-model`` command's
    args are one); ``where`` names it in errors, ``base_dir`` resolves a relative card path."""
    return _parse_model(table, where, base_dir)


def parse_batching(table: Any, where: str = "batching") -> BatchingConfig:
    """One ``[models.batching]`` table, validated exactly as in a config file (``set-batching``)."""
    if not isinstance(table, dict):
        raise ConfigError(where, table, "a table")
    return _parse_batching(table, where)


def _seconds(table: dict, key: str, default: float) -> float:
    return float(_take(table, key, "http", (int, float), default, lambda v: 0.01 <= v <= 86_400,
                       "seconds in 0.01..86400"))


def _profile_path(value: str | None, base_dir: Path | None) -> str | None:
    if value is None or base_dir is None or Path(value).is_absolute():
        return value
    return str((base_dir / value).resolve())


def _policy_path(agent: dict, base_dir: Path | None) -> str | None:
    """``[agent] policy_path`` (relative to the config), required by ``policy = "learned"``."""
    path = _profile_path(_take(agent, "policy_path", "agent", str, None, lambda v: bool(v),
                               "a policy directory (its card.json and weights)"), base_dir)
    if agent.get("policy") == "learned" and path is None:
        raise ConfigError("agent.policy_path", None, "a policy directory (e.g. policies/cpu-2core) when "
                                                     "policy = \"learned\"")
    return path


def _parse_security(mqtt: dict, base_dir: Path | None) -> MqttSecurity:
    """``[mqtt]`` TLS and credentials, the files they name loaded once here (a missing CA, a key
    that does not match its certificate, a password file others may read: a ConfigError at load)."""
    def path(key: str, expected: str) -> str | None:
        return _profile_path(_take(mqtt, key, "mqtt", str, None, lambda v: bool(v), expected), base_dir)

    ca = path("tls_ca", "a path to the PEM file of the CA that signed the broker's certificate")
    cert = path("tls_cert", "a path to this client's PEM certificate")
    key = path("tls_key", "a path to this client's PEM private key (unencrypted)")
    password_file = path("password_file", "a path to a file holding the password (chmod 600)")
    username = _take(mqtt, "username", "mqtt", str, None, lambda v: bool(v) and "\x00" not in v,
                     "a non-empty user name")
    tls = _take(mqtt, "tls", "mqtt", bool, bool(ca or cert))
    insecure = _take(mqtt, "tls_insecure", "mqtt", bool, False)
    try:
        security = MqttSecurity(tls=tls, ca_file=ca, cert_file=cert, key_file=key, insecure=insecure,
                                username=username, password_file=password_file)
        security.check()
    except SecurityError as exc:
        raise ConfigError(f"mqtt.{exc.setting}", exc.value, exc.expected) from None
    return security


def _device_id(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and all(c not in value for c in "/+#")


def _offload_codecs() -> list[str]:
    from agent.offload.codecs import available_codecs
    return available_codecs()


def parse_offload(t: dict, models: tuple[ModelConfig, ...], where: str = "offload") -> OffloadConfig:
    """``[offload]``: every key checked, a model named that none of ``models`` is an error here.
    ``where`` names the table in errors (``args`` for the ``set-offload`` command)."""
    _no_unknown(t, set(OffloadConfig.__dataclass_fields__) - {"targets"}, where)
    names = {m.name for m in models}
    splits = _take(t, "splits", where, list, None,
                   lambda v: all(isinstance(x, str) and x and "@" not in x for x in v),
                   "a list of split point names (as the model cards name them)")
    peers = _take(t, "peers", where, list, [], lambda v: all(_device_id(x) for x in v),
                  "a list of device ids (no '/', '+' or '#')")
    peer = _take(t, "peer", where, str, None, _device_id, "a device id (no '/', '+' or '#')")
    split = _take(t, "split", where, str, "none", lambda v: bool(v) and "@" not in v,
                  "a split point's name, or \"none\" to send whole inputs (full offload)")
    chosen = _take(t, "models", where, list, None, lambda v: all(x in names for x in v),
                   f"a list of configured model names ({sorted(names)})")
    return OffloadConfig(
        serve=_take(t, "serve", where, bool, False),
        splits=None if splits is None else tuple(splits),
        peers=tuple(peers), peer=peer, split=None if split == "none" else split,
        share=float(_take(t, "share", where, (int, float), 0.5, lambda v: 0 <= v <= 1, "a fraction in 0..1")),
        models=None if chosen is None else tuple(chosen),
        status_interval_s=float(_take(t, "status_interval_s", where, (int, float), 2.0,
                                      lambda v: 0.1 <= v <= 3600, "seconds in 0.1..3600")),
        peer_stale_s=float(_take(t, "peer_stale_s", where, (int, float), 10.0,
                                 lambda v: 0.5 <= v <= 86400, "seconds in 0.5..86400")),
        planner=_take(t, "planner", where, str, "queue", lambda v: v in PLANNERS, f"one of {list(PLANNERS)}"),
        codec=_take(t, "codec", where, str, "int8", lambda v: v in _offload_codecs(),
                    f"one of {_offload_codecs()}"),
        margin_ms=float(_take(t, "margin_ms", where, (int, float), 5.0, lambda v: 0 <= v <= 60_000,
                              "milliseconds in 0..60000")),
        probe_idle_s=float(_take(t, "probe_idle_s", where, (int, float), 2.0,
                                 lambda v: v == 0 or 0.05 <= v <= 3600, "seconds in 0.05..3600, or 0 (off)")),
        probe_bytes=_take(t, "probe_bytes", where, int, None, lambda v: 0 <= v <= MAX_PROBE_BYTES,
                          f"bytes in 0..{MAX_PROBE_BYTES} (0: round trips only)"),
    )


def offload_table(offload: OffloadConfig) -> dict:
    """``offload`` as the ``[offload]`` table :func:`parse_offload` reads back into it (what
    ``set-offload`` merges its args into, so they are checked as a config file's would be)."""
    table = {f: getattr(offload, f) for f in OffloadConfig.__dataclass_fields__}
    table["split"] = "none" if offload.split is None else offload.split
    for key in ("splits", "peers", "models"):
        if table[key] is not None:
            table[key] = list(table[key])
    return {k: v for k, v in table.items() if v is not None}


def parse_config(data: dict, base_dir: Path | None = None) -> Config:
    """Validate a config mapping (as read from TOML) into a :class:`Config`."""
    if not isinstance(data, dict):
        raise ConfigError("(top level)", data, "a table")
    _no_unknown(data, {"config_version", "agent", "mqtt", "http", "control", "telemetry", "offload", "models"}, "")
    version = data.get("config_version")
    if version != CONFIG_VERSION:
        raise ConfigError("config_version", version, f"{CONFIG_VERSION} (this agent reads config version {CONFIG_VERSION})")
    agent = _table(data, "agent", "")
    _no_unknown(agent, {"device", "workers", "max_payload_bytes", "hold_fraction", "admission_lookahead",
                        "edf_horizon_ms", "worker_nice", "drain_timeout_s", "policy", "policy_path", "profile",
                        "log_format"}, "agent")
    mqtt = _table(data, "mqtt", "")
    if "password" in mqtt:
        raise ConfigError("mqtt.password", "(hidden)", "no password in the config: put it in a file only its owner "
                                                       "may read and name it in [mqtt] password_file")
    _no_unknown(mqtt, set(MqttConfig.__dataclass_fields__), "mqtt")
    http = _table(data, "http", "")
    _no_unknown(http, set(HttpConfig.__dataclass_fields__), "http")
    control = _table(data, "control", "")
    _no_unknown(control, set(ControlConfig.__dataclass_fields__), "control")
    telemetry = _table(data, "telemetry", "")
    _no_unknown(telemetry, set(TelemetryConfig.__dataclass_fields__), "telemetry")
    models_raw = data.get("models", [])
    if not isinstance(models_raw, list) or not models_raw:
        raise ConfigError("models", models_raw, "at least one [[models]] table")
    models = tuple(_parse_model(m, f"models[{i}]", base_dir) for i, m in enumerate(models_raw))
    seen: set[str] = set()
    for i, m in enumerate(models):
        if m.name in seen:
            raise ConfigError(f"models[{i}].name", m.name, "a name not used by another model")
        seen.add(m.name)
    subscribers = tuple(_take(mqtt, "subscribers", "mqtt", list, list(DEFAULT_SUBSCRIBERS),
                              lambda v: all(name in SUBSCRIBERS for name in v) and len(set(v)) == len(v),
                              f"a list of distinct names from {sorted(SUBSCRIBERS)}"))
    keyring = _profile_path(_take(control, "keyring", "control", str, None, lambda v: bool(v),
                                  "a directory of trusted public keys (<key_id>.pub)"), base_dir)
    if "cmd" in subscribers and keyring is None:
        raise ConfigError("control.keyring", None, "a directory of the operators' public keys (edge-agent keys "
                                                   "generate) when [mqtt] subscribers has \"cmd\"")
    security = _parse_security(mqtt, base_dir)
    offload = parse_offload(_table(data, "offload", ""), models)
    if offload.serve and "offload" not in subscribers:
        subscribers = (*subscribers, "offload")
    device = _take(agent, "device", "agent", str, "edge-board",
                   lambda v: v and all(c not in v for c in "/+#"), "a non-empty id without '/', '+' or '#'")
    return Config(
        device=device,
        workers=_take(agent, "workers", "agent", int, 0, lambda v: 0 <= v <= 256, "an integer in 0..256 (0 = one per core)"),
        max_payload_bytes=_take(agent, "max_payload_bytes", "agent", int, 4 * 1024 * 1024,
                                lambda v: 1024 <= v <= 256 * 1024 * 1024, "an integer in 1024..268435456"),
        hold_fraction=float(_take(agent, "hold_fraction", "agent", (int, float), 0.25, lambda v: 0 <= v <= 1,
                                  "a fraction in 0..1 (0 = batches not capped by the tightest SLO)")),
        admission_lookahead=_take(agent, "admission_lookahead", "agent", bool, True),
        edf_horizon_ms=float(_take(agent, "edf_horizon_ms", "agent", (int, float), 50.0,
                                   lambda v: 0 <= v <= 3_600_000,
                                   "milliseconds in 0..3600000 (0 = plain EDF, no horizon)")),
        worker_nice=_take(agent, "worker_nice", "agent", int, 5, lambda v: 0 <= v <= 19,
                          "an integer in 0..19 (0 = workers at the intake's priority)"),
        drain_timeout_s=float(_take(agent, "drain_timeout_s", "agent", (int, float), 1.0, lambda v: 0 <= v <= 600,
                                    "seconds in 0..600 (0 = answer everything queued shutting_down at once)")),
        policy=_take(agent, "policy", "agent", str, DEFAULT_POLICY, lambda v: v in policy_names(),
                     f"one of {policy_names()}"),
        policy_path=_policy_path(agent, base_dir),
        profile=_profile_path(_take(agent, "profile", "agent", str, None, lambda v: bool(v), "a path to a profile file"),
                              base_dir),
        log_format=_take(agent, "log_format", "agent", str, "text", lambda v: v in LOG_FORMATS, f"one of {LOG_FORMATS}"),
        mqtt=MqttConfig(
            enabled=_take(mqtt, "enabled", "mqtt", bool, True),
            host=_take(mqtt, "host", "mqtt", str, "127.0.0.1", lambda v: bool(v), "a host name or address"),
            port=_take(mqtt, "port", "mqtt", int, 8883 if security.tls else 1883, lambda v: 1 <= v <= 65535,
                       "a port in 1..65535"),
            keepalive_s=_take(mqtt, "keepalive_s", "mqtt", int, 30, lambda v: 5 <= v <= 3600, "seconds in 5..3600"),
            subscribers=subscribers,
            session_expiry_s=_take(mqtt, "session_expiry_s", "mqtt", int, 3600, lambda v: 0 <= v <= 0xFFFFFFFF,
                                   "seconds in 0..4294967295 (0: a clean session)"),
            max_inflight_messages=_take(mqtt, "max_inflight_messages", "mqtt", int, 1000, lambda v: 1 <= v <= 65535,
                                        "an integer in 1..65535"),
            max_queued_messages=_take(mqtt, "max_queued_messages", "mqtt", int, 10000, lambda v: v >= 1,
                                      "an integer >= 1"),
            dedup_grace_s=float(_take(mqtt, "dedup_grace_s", "mqtt", (int, float), 30.0, lambda v: 0 <= v <= 86400,
                                      "seconds in 0..86400")),
            dedup_max=_take(mqtt, "dedup_max", "mqtt", int, 65536, lambda v: 1 <= v <= 10_000_000,
                            "an integer in 1..10000000"),
            reconnect_max_delay_s=_take(mqtt, "reconnect_max_delay_s", "mqtt", int, 60, lambda v: 1 <= v <= 3600,
                                        "seconds in 1..3600"),
            pools=tuple(_take(mqtt, "pools", "mqtt", list, [],
                              lambda v: all(isinstance(g, str) and g and not any(c in g for c in "/+#$") for g in v)
                              and len(set(v)) == len(v),
                              "a list of distinct group names without '/', '+', '#' or '$'")),
            tls=security.tls, tls_ca=security.ca_file, tls_cert=security.cert_file, tls_key=security.key_file,
            tls_insecure=security.insecure, username=security.username, password_file=security.password_file,
        ),
        http=HttpConfig(
            enabled=_take(http, "enabled", "http", bool, False),
            host=_take(http, "host", "http", str, "127.0.0.1", lambda v: bool(v), "a host name or address to listen on"),
            port=_take(http, "port", "http", int, 8000, lambda v: 0 <= v <= 65535,
                       "a port in 0..65535 (0 = any free port)"),
            header_timeout_s=_seconds(http, "header_timeout_s", 10.0),
            body_timeout_s=_seconds(http, "body_timeout_s", 30.0),
            idle_timeout_s=_seconds(http, "idle_timeout_s", 30.0),
            max_connections=_take(http, "max_connections", "http", int, 4096, lambda v: 1 <= v <= 1_000_000,
                                  "an integer in 1..1000000"),
            max_header_bytes=_take(http, "max_header_bytes", "http", int, 64 * 1024,
                                   lambda v: 1024 <= v <= 1024 * 1024, "bytes in 1024..1048576"),
        ),
        control=ControlConfig(
            keyring=keyring,
            max_ttl_s=float(_take(control, "max_ttl_s", "control", (int, float), 300.0, lambda v: 0 < v <= 3600,
                                  "seconds in (0, 3600]")),
            clock_skew_s=float(_take(control, "clock_skew_s", "control", (int, float), 30.0, lambda v: 0 <= v <= 600,
                                     "seconds in 0..600")),
        ),
        telemetry=TelemetryConfig(
            prometheus_port=_take(telemetry, "prometheus_port", "telemetry", int, 0, lambda v: 0 <= v <= 65535,
                                  "a port in 0..65535 (0 = no Prometheus endpoint; Triton's is 8002)"),
            prometheus_host=_take(telemetry, "prometheus_host", "telemetry", str, "127.0.0.1", lambda v: bool(v),
                                  "a host name or address to listen on"),
            interval_s=float(_take(telemetry, "interval_s", "telemetry", (int, float), 10.0,
                                   lambda v: v == 0 or 0.1 <= v <= 86_400,
                                   "seconds in 0.1..86400 (0 = no telemetry on MQTT)")),
        ),
        offload=offload,
        models=models,
    )
