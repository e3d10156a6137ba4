"""The self-test: is this board fit to serve this config, and if not, what to do about it.

One function, :func:`run_selftest`, returns a structured :class:`Report` (a list of
:class:`Check` rows: status ``ok``, ``warn``, ``fail`` or ``skip``, a detail, and for anything
not ok, what to do). ``edge-agent selftest`` prints it as a table or JSON and exits 1 on any
``fail``; the MQTT ``selftest`` control command calls the same function and publishes
:meth:`Report.to_dict`. Nothing here raises for a problem with the board: a check that cannot
run (a missing runtime, an unreadable file, even a bug) becomes a ``fail`` row that names it,
so one broken part never hides the others.

What is checked, in order, and why:

* **core**: the compiled core loads and computes exactly what its pure-Python twin computes on a
  fixed vector (queue order, batch plans, latency predictions, batch assembly). A core built for
  another CPU or against another numpy can import and still miscompute; the twin is the spec.
* **config files**: the dispatch policy exists and the profile file, if the config names one,
  is valid (a bad one would stop ``edge-agent run`` at start).
* **models**, per configured model: the card loads; the file's sha256 is the card's (a truncated
  copy, a swapped file), and so are its split points' head and tail files; the file, loaded by the configured backend, reproduces the card's golden
  outputs within the tolerance the card states for that file variant (a runtime or delegate that
  loads the model but computes something else); its batch-1 and largest-batch latency against
  the stored profile, else the card's build-host figures (drift: a warning, never a failure,
  because CPUs of one family differ by 1.5-1.8x, and the fix is a new profile, not a stop).
* **accelerators**: the Edge TPU (PCIe ``/dev/apex_*``, USB ids ``1a6e:089a`` before its
  firmware loads and ``18d1:9302`` after, and ``libedgetpu``) and a Jetson's GPU (through the
  execution providers onnxruntime offers). Absent is a failure only when the config needs it.
* **broker**: connect to the config's ``[mqtt]`` broker, publish and receive on a self-test
  topic, and report the round trip.
* **headroom**: free disk where the models and the state live, available memory, and the hottest
  thermal zone, each against the thresholds below (a board that exposes no temperature says so).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import shutil
import statistics
import textwrap
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable

import numpy as np

from agent.config import Config, ModelConfig

__all__ = [
    "SELFTEST_VERSION", "STATUSES", "GROUPS", "Check", "Report", "run_selftest",
    "DISK_FAIL_MIB", "DISK_WARN_MIB", "MEMORY_FAIL_MIB", "MEMORY_WARN_MIB", "TEMP_WARN_C", "TEMP_FAIL_C",
    "DRIFT_FACTOR", "BROKER_TIMEOUT_S",
]

SELFTEST_VERSION = 1
STATUSES = ("ok", "warn", "fail", "skip")
#: The groups of checks, in the order they run; ``run_selftest(groups=...)`` picks some.
GROUPS = ("core", "files", "models", "accelerators", "broker", "headroom")

# Thresholds (stated in the report's details, so a reader sees what a status was measured against).
DISK_FAIL_MIB = 64          # below: a profile, a log or a model update cannot be written
DISK_WARN_MIB = 512
MEMORY_FAIL_MIB = 64        # MemAvailable below: the kernel's OOM killer is near
MEMORY_WARN_MIB = 256
TEMP_WARN_C = 80.0          # most boards start throttling between 80 and 95 degrees C
TEMP_FAIL_C = 95.0
#: Measured latency over the reference (or under it by the same factor) warns: a profile taken
#: elsewhere, or on this board under other conditions, misleads admission control and batching.
DRIFT_FACTOR = 2.0
BROKER_TIMEOUT_S = 5.0
BROKER_ROUND_TRIPS = 5
#: Latency measurement per model: untimed warm-up runs, then timed runs; the median counts.
DRIFT_WARMUP = 2
DRIFT_REPEATS_B1 = 15
DRIFT_REPEATS_MAX = 5

# The Edge TPU's USB ids: Global Unichip before its firmware is loaded, Google after.
EDGETPU_USB_IDS = (("1a6e", "089a"), ("18d1", "9302"))
EDGETPU_PCI_ID = ("0x1ac1", "0x089a")
CORAL_APT = "Coral's apt repository (packages.cloud.google.com/apt, suite coral-edgetpu-stable)"
EDGETPU_USB_INSTALL = f"sudo apt-get install libedgetpu1-std from {CORAL_APT}, then replug the accelerator"
EDGETPU_PCIE_INSTALL = (f"sudo apt-get install gasket-dkms libedgetpu1-std from {CORAL_APT}, then reboot "
                        "so the apex driver creates /dev/apex_0")
JETSON_GPU_INSTALL = ("sudo apt-get install nvidia-jetpack (CUDA, cuDNN, TensorRT), then the onnxruntime-gpu "
                      "wheel built for this JetPack release (NVIDIA's Jetson Zoo / jetson-ai-lab pip index) "
                      "in place of the CPU onnxruntime")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


@dataclass
class Check:
    """One row of the report. ``fix`` says what to do; empty when there is nothing to do."""

    name: str
    status: str
    detail: str
    fix: str = ""
    figures: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status = {self.status!r}: expected one of {STATUSES}")

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.name, "status": self.status, "detail": self.detail, "fix": self.fix,
                "figures": self.figures}


@dataclass
class Report:
    """The self-test's result: rows in the order they ran, and what they ran on."""

    checks: list[Check]
    config: str
    device: str
    duration_s: float

    @property
    def ok(self) -> bool:
        """No row failed (warnings and skips do not fail a board)."""
        return not any(c.status == "fail" for c in self.checks)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def counts(self) -> dict[str, int]:
        return {status: sum(c.status == status for c in self.checks) for status in STATUSES}

    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``--json``, the ``selftest`` command's reply): versioned, plain types."""
        return {"selftest_version": SELFTEST_VERSION, "ok": self.ok, "device": self.device, "config": self.config,
                "duration_s": round(self.duration_s, 3), "counts": self.counts(),
                "checks": [c.to_dict() for c in self.checks]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=_json_default)

    def format_table(self, width: int | None = None) -> str:
        """The table for people: check, status, detail, what to do; long cells wrap in their column."""
        width = width or shutil.get_terminal_size((120, 24)).columns
        name_w = max([len("CHECK")] + [len(c.name) for c in self.checks])
        status_w = 6
        rest = max(40, width - name_w - status_w - 6)
        detail_w = rest * 11 // 20
        fix_w = rest - detail_w
        lines = [f"{'CHECK':<{name_w}}  {'STATUS':<{status_w}}  {'DETAIL':<{detail_w}}  WHAT TO DO",
                 f"{'-' * name_w}  {'-' * status_w}  {'-' * detail_w}  {'-' * fix_w}"]
        for c in self.checks:
            detail = textwrap.wrap(c.detail, detail_w, break_on_hyphens=False, break_long_words=False) or [""]
            fix = textwrap.wrap(c.fix, fix_w, break_on_hyphens=False, break_long_words=False) or [""]
            status = c.status.upper() if c.status == "fail" else c.status
            for i in range(max(len(detail), len(fix))):
                cells = (c.name if i == 0 else "", status if i == 0 else "",
                         detail[i] if i < len(detail) else "", fix[i] if i < len(fix) else "")
                lines.append(f"{cells[0]:<{name_w}}  {cells[1]:<{status_w}}  {cells[2]:<{detail_w}}  {cells[3]}".rstrip())
        counts = self.counts()
        verdict = "passed" if self.ok else f"FAILED ({counts['fail']} failing)"
        lines.append("")
        lines.append(f"selftest {verdict}: {counts['ok']} ok, {counts['warn']} warn, {counts['fail']} fail, "
                     f"{counts['skip']} skip in {self.duration_s:.1f} s (device {self.device!r}, config {self.config})")
        return "\n".join(lines)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def run_selftest(config: Config, *, config_file: str | Path | None = None, config_source: str = "embedded demo config",
                 groups: Iterable[str] = GROUPS, state_dir: str | Path | None = None,
                 progress: Callable[[str], None] | None = None) -> Report:
    """Run the checks of ``groups`` (default: all, :data:`GROUPS`) for ``config``; never raises for
    a problem of the board (each becomes a ``fail`` row).

    ``config_file``: where ``config`` was read from (None: built in code, named by ``config_source``).
    ``state_dir``: where the agent keeps its state, checked for free disk beside the models;
    default ``$STATE_DIRECTORY`` (systemd's ``StateDirectory=``), else the profile file's folder.
    ``progress`` is called with a label before each slow step (the CLI prints it on stderr).
    """
    groups = tuple(groups)
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise ValueError(f"groups = {unknown}: expected some of {GROUPS}")
    step = progress or (lambda label: None)
    started = time.perf_counter()
    checks: list[Check] = []
    if "core" in groups:
        step("core: compiled against the pure twin")
        checks.append(_guarded("core", check_core))
    if "files" in groups:
        checks.append(_guarded("policy", lambda: check_policy(config)))
        checks.append(_guarded("profile", lambda: check_profile(config)))
    if "models" in groups:
        profile = _load_profile_quietly(config)
        for model in config.models:
            step(f"model {model.name}: sha256, golden outputs, latency ({model.backend}/{model.file})")
            checks.extend(_guarded_many(f"model {model.name}", lambda m=model: check_model(m, profile)))
    if "accelerators" in groups:
        step("accelerators")
        checks.append(_guarded("edge tpu", lambda: check_edgetpu(config)))
        checks.append(_guarded("jetson gpu", check_jetson_gpu))
    if "broker" in groups:
        step(f"broker {config.mqtt.host}:{config.mqtt.port}")
        checks.append(_guarded("broker", lambda: check_broker(config)))
    if "headroom" in groups:
        checks.append(_guarded("disk", lambda: check_disk(config, state_dir)))
        checks.append(_guarded("memory", check_memory))
        checks.append(_guarded("temperature", check_temperature))
    if config_file is not None:   # commands in the advice run as written
        for check in checks:
            check.fix = check.fix.replace("--config CONFIG", f"--config {config_file}")
    return Report(checks, config_source if config_file is None else str(config_file), config.device,
                  time.perf_counter() - started)


def _guarded(name: str, check: Callable[[], Check]) -> Check:
    """A check that raised is a failing row naming the error, not a crashed self-test."""
    try:
        return check()
    except Exception as exc:  # noqa: BLE001 - the report must name every problem, even a bug
        return _crashed(name, exc)


def _guarded_many(name: str, checks: Callable[[], list[Check]]) -> list[Check]:
    try:
        return checks()
    except Exception as exc:  # noqa: BLE001
        return [_crashed(name, exc)]


def _crashed(name: str, exc: Exception) -> Check:
    return Check(name, "fail", f"the check itself failed: {type(exc).__name__}: {exc}",
                 "report this as a bug of edge-agent selftest, with the output of `edge-agent -v selftest`")


# ---- core: compiled vs pure twin --------------------------------------------------------------

_COMPILED_MODULES = ("_deadline_queue", "_latency_table", "_batch_rules", "_batch_assembly")
_BUILD_HINT = ("build the compiled core: `pip install --force-reinstall edge-agent` from its wheel, or in the source "
               "tree `pip install -e .` (needs gcc and python3-dev); or set EDGE_AGENT_CORE=python to run the pure "
               "twin (slower, same behaviour)")


def _compiled_core() -> SimpleNamespace:
    names: dict[str, Any] = {}
    for module_name in _COMPILED_MODULES:
        module = importlib.import_module(f"agent.core.{module_name}")
        names.update({k: getattr(module, k) for k in dir(module) if not k.startswith("_")})
    return SimpleNamespace(**names)


def core_vector(impl: Any) -> dict[str, Any]:
    """What one core implementation computes on a fixed vector: queue pushes and pops (priorities,
    a key other than the deadline, a duplicate, a full queue, a cancel, expiry), the latency table's
    predictions and budgets, the three batching rules' plans at several times, and batch assembly.
    Plain Python values, compared for exact equality (the compiled core is built without FMA
    contraction so its doubles are the twin's)."""
    out: dict[str, Any] = {}
    queue = impl.DeadlineQueue(6)
    pushes = [  # rid, deadline, arrival, priority, key
        (10, 0.050, 0.000, 0, None), (11, 0.020, 0.001, 0, None), (12, 0.080, 0.002, 1, None),
        (13, 0.090, 0.003, 0, 0.015), (11, 0.500, 0.004, 0, None), (14, 0.010, 0.004, 0, None),
        (15, 0.040, 0.005, -1, None), (16, 0.045, 0.006, 0, None), (17, 0.030, 0.007, 0, None),
    ]
    out["push"] = [int(queue.push(rid, d, a, p) if k is None else queue.push(rid, d, a, p, key=k))
                   for rid, d, a, p, k in pushes]
    out["cancel"] = [bool(queue.cancel(15)), bool(queue.cancel(99))]
    out["push_after_cancel"] = int(queue.push(17, 0.030, 0.007, 0))
    out["queue"] = [len(queue), queue.earliest_deadline(), queue.oldest_arrival(), queue.head_deadline(),
                    queue.head_key(), queue.head_priority(), queue.count_ahead(0.035), queue.count_ahead(0.0, 1),
                    list(queue.ids())]
    table = impl.LatencyTable(np.array([1, 2, 4, 8], dtype=np.int64), np.array([0.002, 0.0031, 0.0029, 0.009]))
    out["predict"] = [table.predict(b) for b in range(1, 13)]
    out["within"] = [table.max_batch_within(budget, 8) for budget in (0.001, 0.0025, 0.004, 0.0061, 0.02)]
    rules = {"fixed": impl.FixedBatch(4), "dynamic": impl.DynamicBatch(8, (4, 8), 0.002),
             "deadline_aware": impl.DeadlineAwareBatch(table, 8, 0.001, 0.0005)}
    out["plans"] = {name: [tuple(rule.plan(queue, now)) for now in (0.004, 0.0075, 0.012)]
                    for name, rule in rules.items()}
    ready = np.zeros(8, dtype=np.int64)
    expired = np.zeros(8, dtype=np.int64)
    n_ready, n_expired = queue.pop_batch(3, 0.0125, ready, expired)
    out["pop"] = [int(n_ready), ready[:n_ready].tolist(), int(n_expired), expired[:n_expired].tolist()]
    out["drop"] = [int(queue.drop_expired(0.0455, expired)), expired[:2].tolist(), list(queue.ids())]
    destination = np.zeros((4, 2, 3), dtype=np.uint8)
    sources = [np.arange(6, dtype=np.uint8).reshape(2, 3) + 10 * i for i in range(3)]
    sources[1] = sources[1].reshape(1, 2, 3)
    out["gather"] = [int(impl.gather_into(destination, sources)), destination.tolist()]
    rows = impl.scatter_rows(np.arange(12, dtype=np.float32).reshape(4, 3) / 7, 3)
    out["scatter"] = [[list(r.shape), r.tolist()] for r in rows]
    return out


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in a:
            found = _first_difference(a[key], b.get(key), f"{path}.{key}" if path else str(key))
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{path}[{i}]")
            if found:
                return found
        return None
    same = a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    return None if same else f"{path}: compiled {a!r}, pure twin {b!r}"


def check_core() -> Check:
    """The compiled core imports and agrees exactly with the pure twin on :func:`core_vector`."""
    requested = os.environ.get("EDGE_AGENT_CORE", "").strip().lower()
    try:
        import agent.core.pure as pure
        compiled = _compiled_core()
    except ImportError as exc:
        if requested == "python":
            return Check("core", "warn", f"the compiled core does not load ({exc}); the agent runs the pure twin "
                         "(EDGE_AGENT_CORE=python), several times slower per request", _BUILD_HINT)
        return Check("core", "fail", f"the compiled core does not load: {exc}", _BUILD_HINT)
    expected = core_vector(pure)
    got = core_vector(compiled)
    difference = _first_difference(got, expected)
    count = len(_leaves(expected))
    figures = {"values_compared": count, "implementation": "python" if requested == "python" else "compiled"}
    if difference:
        return Check("core", "fail", f"the compiled core disagrees with its pure twin: {difference}",
                     "rebuild the compiled core on this board (`pip install --force-reinstall --no-binary "
                     "edge-agent edge-agent`, or `pip install -e .` in the source tree); until then run "
                     "EDGE_AGENT_CORE=python", figures)
    if requested == "python":
        return Check("core", "warn", f"compiled core agrees with the pure twin on {count} values, but the agent "
                     "runs the pure twin (EDGE_AGENT_CORE=python)", "unset EDGE_AGENT_CORE to run the compiled core",
                     figures)
    return Check("core", "ok", f"compiled core agrees with the pure twin on {count} values "
                 "(queue order, batch plans, latency table, batch assembly)", figures=figures)


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, (list, tuple)):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


# ---- files the config names: policy, profile ----------------------------------------------------

def check_policy(config: Config) -> Check:
    """The dispatch policy is a module of ``agent.scheduler.policies`` with a ``build`` function;
    the learned one's directory (``[agent] policy_path``) is checked as the agent checks it at start
    (``agent.learned.card.load_policy``: card version, schemas, the lanes against the configured
    models, the weights' sha256 and shape), which loading the config does not do."""
    from agent.scheduler.policy import policy_names
    if config.policy not in policy_names():
        return Check("policy", "fail", f"[agent] policy = {config.policy!r} is not installed; installed: {policy_names()}",
                     f"set [agent] policy to one of {policy_names()}")
    module = importlib.import_module(f"agent.scheduler.policies.{config.policy}")
    if not callable(getattr(module, "build", None)):
        return Check("policy", "fail", f"policy module {module.__name__} has no build(scheduler) function",
                     "reinstall edge-agent: the policy module is damaged")
    if config.policy == "learned":
        from agent.learned.card import PolicyCardError, load_policy
        try:
            loaded = load_policy(config.policy_path, [m.name for m in config.models])
        except PolicyCardError as exc:
            return Check("policy", "fail", str(exc),
                         "copy the policy directory again from the release (or retrain it: tools/train_policy.py), "
                         "point [agent] policy_path at one trained for these models, or set [agent] policy = \"rules\"")
        weights = loaded.card["weights"]
        return Check("policy", "ok", f"'learned' from {config.policy_path}: {weights['file']} matches its card "
                                     f"({weights['sha256'][:12]}...), lanes {list(loaded.lanes)}, "
                                     f"{len(loaded.buckets)} batch buckets")
    return Check("policy", "ok", f"{config.policy!r} (built in, no policy file)")


def check_profile(config: Config) -> Check:
    if config.profile is None:
        return Check("profile", "skip", "no [agent] profile: batch latency is measured at each start",
                     "optional: `edge-agent profile --config CONFIG --out profile.json`, then [agent] profile = "
                     "\"profile.json\"")
    from agent.profiler import ProfileError, load_profile
    try:
        profile = load_profile(config.profile)
    except ProfileError as exc:
        return Check("profile", "fail", str(exc), "re-create it on this board: `edge-agent profile --config CONFIG "
                     f"--out {config.profile}`, or remove [agent] profile")
    missing = [m.name for m in config.models if m.name not in profile.model_names]
    mismatched = [m.name for m in config.models if m.name in profile.model_names and
                  (profile.model(m.name).get("backend"), profile.model(m.name).get("file")) != (m.backend, m.file)]
    created = profile.data.get("created", "?")
    if missing or mismatched:
        return Check("profile", "warn", f"{config.profile} (created {created}) lacks {missing} and measured {mismatched} "
                     "with another backend or file; those are measured at start instead",
                     f"re-profile: `edge-agent profile --config CONFIG --out {config.profile}`")
    return Check("profile", "ok", f"{config.profile} valid (created {created} on {profile.host.get('cpu', '?')})")


def _load_profile_quietly(config: Config) -> Any:
    if config.profile is None:
        return None
    try:
        from agent.profiler import load_profile
        return load_profile(config.profile)
    except Exception:  # noqa: BLE001 - the profile row already says what is wrong with it
        return None


# ---- models ------------------------------------------------------------------------------------

def _file_fix(card_source: Path, path: Path) -> str:
    from agent.models.card import DEMO_DIR
    if DEMO_DIR in path.parents:
        return (f"{path.name} is a shipped demo file: reinstall edge-agent (pip install --force-reinstall edge-agent), "
                "or in the source tree `git checkout agent/models/demo`")
    return (f"copy {path.name} again from where the model was released, or, if the model was changed on purpose, "
            f"update files.*.sha256 in {card_source} (sha256sum {path.name})")


def check_model(model: ModelConfig, profile: Any) -> list[Check]:
    """Card, sha256, golden outputs and latency of one configured model (rows named ``model NAME: ...``)."""
    from agent.models.card import CardError, load_card
    prefix = f"model {model.name}"
    try:
        card = load_card(model.card)
        entry = card.file(model.file)
    except CardError as exc:
        return [Check(f"{prefix}: card", "fail", str(exc),
                      f"fix or restore the card named by [[models]] card = {model.card!r} (and its file = {model.file!r})")]
    rows: list[Check] = []
    path = entry.path
    if not path.is_file():
        rows.append(Check(f"{prefix}: sha256", "fail", f"{path} named by {card.source} does not exist",
                          _file_fix(card.source, path)))
        return rows
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not entry.sha256:
        rows.append(Check(f"{prefix}: sha256", "warn", f"{card.source.name} states no sha256 for {path.name}: "
                          "a damaged copy would not be noticed", f"add files.{model.file}.sha256 = \"{digest}\" to the card"))
    elif digest != entry.sha256:
        rows.append(Check(f"{prefix}: sha256", "fail", f"{path} has sha256 {digest[:16]}..., its card "
                          f"{card.source.name} says {entry.sha256[:16]}...: the file is damaged or not the card's",
                          _file_fix(card.source, path), {"file": str(path), "sha256": digest, "card_sha256": entry.sha256}))
        rows.append(Check(f"{prefix}: golden", "skip", "not run: the file is not the one its card describes",
                          "fix the sha256 row first"))
        return rows
    else:
        rows.append(Check(f"{prefix}: sha256", "ok", f"{path.name} matches its card ({digest[:12]}...)",
                          figures={"file": str(path), "sha256": digest}))
    if card.split_points:
        rows.append(_check_split_files(prefix, card))
    from agent.backends import BackendError, load_backend
    try:
        backend = load_backend(model.backend, path, threads=model.threads)
    except (BackendError, ValueError) as exc:
        rows.append(Check(f"{prefix}: golden", "fail", f"{model.backend} cannot load {path.name}: {exc}",
                          _backend_fix(model.backend)))
        return rows
    try:
        rows.append(_check_golden(prefix, model, card, backend))
        rows.append(_check_latency(prefix, model, card, backend, profile))
    finally:
        backend.close()
    return rows


def _check_split_files(prefix: str, card: Any) -> Check:
    """The head and tail files of the card's split points (what a peer or this board runs when the
    model is split): present and the card's sha256."""
    from agent.models.card import CardError
    problems: list[tuple[Path, str]] = []
    checked: list[str] = []
    for point in card.split_points:
        for verify, file in ((point.verify_head, point.head_path), (point.verify_tail, point.tail_path)):
            try:
                checked.append(verify().name)
            except CardError as exc:
                problems.append((file, str(exc)))
    name = f"{prefix}: split files"
    if problems:
        return Check(name, "fail", "; ".join(text for _, text in problems), _file_fix(card.source, problems[0][0]),
                     {"files": [str(file) for file, _ in problems]})
    return Check(name, "ok", f"{len(checked)} head/tail files of split points "
                 f"{[p.name for p in card.split_points]} match their card", figures={"files": checked})


def _backend_fix(kind: str) -> str:
    if kind == "litert":
        return "pip install 'edge-agent[tflite]' (ai-edge-litert); on a Coral board also its Edge TPU runtime (see edge tpu)"
    return "pip install onnxruntime (on a Jetson: the onnxruntime-gpu wheel for its JetPack release)"


def _check_golden(prefix: str, model: ModelConfig, card: Any, backend: Any) -> Check:
    from agent.api import _check_backend_matches_card
    from agent.models.card import CardError, golden_input_digest, golden_inputs
    name = f"{prefix}: golden"
    where = f"{model.backend}/{getattr(backend, 'device', '?')} {model.file}"
    try:
        _check_backend_matches_card(card, backend, backend.path)
    except ValueError as exc:
        return Check(name, "fail", f"{exc}", f"the file does not have the interface its card {card.source.name} states: "
                     "restore the file or correct the card's inputs/outputs")
    golden = card.golden
    if golden is None:
        return Check(name, "skip", f"{card.source.name} ships no golden outputs",
                     "add a golden entry to the card (tools/golden_outputs.py writes those of the demo cards)")
    tolerance = golden.tolerance_for(model.file)
    if tolerance is None:
        return Check(name, "warn", f"{card.source.name} states no golden tolerance for file {model.file!r} "
                     f"(it has {sorted(golden.tolerance)})", f"add golden.tolerance.{model.file} = {{atol, top1}} to the card")
    try:
        batch = golden_inputs(card)
    except CardError as exc:
        return Check(name, "fail", str(exc), "fix the card's golden.inputs")
    outputs = backend.run(batch)
    inputs_note = "" if golden_input_digest(batch) == golden.input_sha256 or not golden.input_sha256 else (
        "; NOTE the inputs made here differ from those the outputs were computed on (input_sha256)")
    worst = 0.0
    problems: list[str] = []
    for output_name, expected in golden.outputs.items():
        got = np.asarray(outputs[output_name], dtype=np.float64).reshape(expected.shape)
        diff = np.abs(got - expected)
        worst = max(worst, float(diff.max()))
        if not np.all(diff <= tolerance.atol):
            item = int(np.unravel_index(int(diff.argmax()), diff.shape)[0])
            problems.append(f"{output_name}: max |diff| {float(diff.max()):.4g} > atol {tolerance.atol:g} "
                            f"(item {item}: {np.round(got[item].ravel()[:4], 4).tolist()}... vs golden "
                            f"{np.round(expected[item].ravel()[:4], 4).tolist()}...)")
        if tolerance.top1 and expected.ndim == 2:
            disagree = np.flatnonzero(got.argmax(axis=1) != expected.argmax(axis=1))
            if disagree.size:
                problems.append(f"{output_name}: top-1 differs on items {disagree.tolist()} "
                                f"({got.argmax(axis=1)[disagree].tolist()} vs golden {expected.argmax(axis=1)[disagree].tolist()})")
    count = next(iter(golden.outputs.values())).shape[0]
    figures = {"max_abs_diff": worst, "atol": tolerance.atol, "top1": tolerance.top1, "items": count,
               "backend": model.backend, "device": getattr(backend, "device", None), "file": model.file}
    if problems:
        return Check(name, "fail", f"{where} does not reproduce the card's golden outputs: {'; '.join(problems)}{inputs_note}",
                     f"this runtime computes other outputs than {golden.reference} did when the model was built: check "
                     f"the {model.backend} build and version (edge-agent -v selftest), its delegate, and that the card "
                     f"{card.source.name} is the file's", figures)
    top1 = ", same top-1" if tolerance.top1 else ""
    return Check(name, "ok", f"{where}: {count} golden items within atol {tolerance.atol:g} (max |diff| "
                 f"{worst:.2g}{top1}){inputs_note}", figures=figures)


def _check_latency(prefix: str, model: ModelConfig, card: Any, backend: Any, profile: Any) -> Check:
    """Batch-1 and largest-batch latency now, against the profile or the card's build-host figures."""
    from agent.profiler.measure import time_runs, zeros_batch
    name = f"{prefix}: latency"
    max_batch = model.batching.size if model.batching.rule == "fixed" else model.batching.max_batch
    reference, source = _latency_reference(model, card, profile, max_batch)
    measured: dict[int, float] = {}
    for batch_size, repeats in ((1, DRIFT_REPEATS_B1), (max_batch, DRIFT_REPEATS_MAX)):
        if batch_size in measured:
            continue
        samples = time_runs(backend, zeros_batch(card.inputs, batch_size), repeats, warmup=DRIFT_WARMUP)
        measured[batch_size] = statistics.median(samples) * 1e3
    figures: dict[str, Any] = {"measured_ms": {str(b): round(ms, 4) for b, ms in measured.items()},
                               "reference": source, "drift_factor_limit": DRIFT_FACTOR}
    now = ", ".join(f"b{b} {ms:.3g} ms" for b, ms in measured.items())
    if not reference:
        return Check(name, "skip", f"{now}; no profile or card figures for {model.backend}/{model.file} to compare with",
                     "optional: `edge-agent profile --config CONFIG --out profile.json` and [agent] profile", figures)
    ratios = {b: measured[b] / reference[b] for b in measured if b in reference}
    figures["reference_ms"] = {str(b): round(ms, 4) for b, ms in reference.items() if b in measured}
    figures["ratio"] = {str(b): round(r, 3) for b, r in ratios.items()}
    compared = ", ".join(f"b{b} {measured[b]:.3g} ms vs {reference[b]:.3g} ms ({r:.2f}x)" for b, r in ratios.items())
    drifted = {b: r for b, r in ratios.items() if r > DRIFT_FACTOR or r < 1 / DRIFT_FACTOR}
    if drifted:
        return Check(name, "warn", f"{compared} in {source}: beyond {DRIFT_FACTOR:g}x",
                     "if the board is busy or hot (see temperature), find what loads it; otherwise re-profile this "
                     "board (`edge-agent profile --config CONFIG --out profile.json`, [agent] profile) so batching and "
                     "admission work from its real latency", figures)
    return Check(name, "ok", f"{compared} in {source} (within {DRIFT_FACTOR:g}x)", figures=figures)


def _latency_reference(model: ModelConfig, card: Any, profile: Any, max_batch: int) -> tuple[dict[int, float], str]:
    """Milliseconds per batch size to compare with, and where they come from."""
    if profile is not None and model.name in profile.model_names:
        entry = profile.model(model.name)
        if (entry.get("backend"), entry.get("file")) == (model.backend, model.file):
            table = profile.latency_table(model.name)
            return {b: table.predict(b) * 1e3 for b in {1, max_batch}}, f"profile {profile.source}"
    figures = card.raw.get("provenance", {}).get("latency_ms_per_image_1thread_build_host", {})
    native = {"onnx": "onnxruntime"}.get(model.file, "litert")
    if model.threads != 1 or native != model.backend:
        return {}, ""
    per_batch = {}
    for b in {1, max_batch}:
        per_image = figures.get(f"{model.file}_b{b}")
        if isinstance(per_image, (int, float)) and per_image > 0:
            per_batch[b] = per_image * b
    return per_batch, f"card {card.source.name} (build host, 1 thread)"


# ---- accelerators ------------------------------------------------------------------------------

def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def find_edgetpus(sys_root: Path = Path("/sys"), dev_root: Path = Path("/dev")) -> dict[str, list[str]]:
    """Edge TPUs this board shows: ``pcie`` (``/dev/apex_N``), ``pcie_no_driver`` (a PCI device without
    its apex node), ``usb`` (``bus-port vendor:product``)."""
    found: dict[str, list[str]] = {"pcie": sorted(str(p) for p in dev_root.glob("apex_*")), "pcie_no_driver": [], "usb": []}
    for device in sorted((sys_root / "bus/pci/devices").glob("*")):
        if (_read(device / "vendor"), _read(device / "device")) == EDGETPU_PCI_ID and not found["pcie"]:
            found["pcie_no_driver"].append(device.name)
    for device in sorted((sys_root / "bus/usb/devices").glob("*")):
        ids = (_read(device / "idVendor").lower(), _read(device / "idProduct").lower())
        if ids in EDGETPU_USB_IDS:
            found["usb"].append(f"{device.name} {ids[0]}:{ids[1]}")
    return found


def _edgetpu_library() -> tuple[bool, str]:
    import ctypes

    from agent.backends.litert_backend import EDGETPU_LIBRARY
    try:
        ctypes.CDLL(EDGETPU_LIBRARY)
    except OSError as exc:
        installed = "cannot open shared object file" not in str(exc)
        return False, f"{EDGETPU_LIBRARY} {'does not load: ' + str(exc) if installed else 'not installed'}"
    return True, f"{EDGETPU_LIBRARY} loads"


def _models_needing_edgetpu(config: Config) -> list[str]:
    from agent.backends.litert_backend import is_edgetpu_model
    from agent.models.card import load_card
    needing = []
    for model in config.models:
        if model.backend != "litert":
            continue
        if "edgetpu" in model.file:
            needing.append(model.name)
            continue
        try:
            path = load_card(model.card).file(model.file).path
            if path.is_file() and is_edgetpu_model(path):
                needing.append(model.name)
        except Exception:  # noqa: BLE001 - the model's own rows report a bad card or file
            continue
    return needing


def check_edgetpu(config: Config) -> Check:
    """An Edge TPU and its runtime: a failure only when a configured model is compiled for it."""
    needing = _models_needing_edgetpu(config)
    found = find_edgetpus()
    library_ok, library = _edgetpu_library()
    where = ", ".join([f"PCIe {p}" for p in found["pcie"]] + [f"USB {u}" for u in found["usb"]]
                      + [f"PCIe {p} without the apex driver" for p in found["pcie_no_driver"]])
    figures = {"devices": found, "library": library, "needed_by": needing}
    if found["pcie_no_driver"]:
        fix = EDGETPU_PCIE_INSTALL
    elif found["pcie"]:
        fix = EDGETPU_PCIE_INSTALL.split(", then reboot")[0]
    else:
        fix = EDGETPU_USB_INSTALL
    usable = library_ok and (found["pcie"] or found["usb"])
    if usable:
        try:
            from agent.backends import edgetpu_available
            usable, library = edgetpu_available()
        except Exception as exc:  # noqa: BLE001 - no LiteRT: the delegate cannot be tried
            usable, library = False, f"{library}, but the delegate was not tried: {exc}"
        figures["library"] = library
    uses = f"used by {needing}" if needing else "no configured model is compiled for it"
    if usable:
        return Check("edge tpu", "ok", f"found: {where}; {library}; {uses}", figures=figures)
    if needing:
        problem = (f"{where} found but {library}" if where else f"none found ({library})")
        return Check("edge tpu", "fail", f"{problem}; needed by {needing} (files compiled for the Edge TPU)",
                     f"{fix}; or point those models at a CPU file (file = \"tflite_int8\")", figures)
    if where:
        return Check("edge tpu", "warn", f"{where} found but not usable: {library}; {uses}", fix, figures)
    return Check("edge tpu", "skip", f"none found (no /dev/apex_*, no USB 1a6e:089a or 18d1:9302), {library}; {uses}",
                 f"only to use one: {EDGETPU_USB_INSTALL}", figures)


def jetson_release(root: Path = Path("/")) -> str | None:
    """The L4T release line of a Jetson (``/etc/nv_tegra_release``), or its device-tree model; None elsewhere."""
    release = _read(root / "etc/nv_tegra_release")
    if release:
        return release.splitlines()[0].lstrip("# ").strip()
    model = _read(root / "proc/device-tree/model").rstrip("\x00")
    return model if "jetson" in model.lower() else None


def check_jetson_gpu(root: Path = Path("/")) -> Check:
    """A Jetson's GPU through onnxruntime's providers: warned when a Jetson's onnxruntime lacks them.
    ``root``: where ``/etc/nv_tegra_release`` and the device tree are read (the tests' fake trees)."""
    release = jetson_release(root)
    try:
        import onnxruntime
        providers = list(onnxruntime.get_available_providers())
        runtime = f"onnxruntime {onnxruntime.__version__}"
    except ImportError as exc:
        providers, runtime = [], f"onnxruntime not importable ({exc})"
    gpu = [p for p in providers if p in GPU_PROVIDERS]
    figures = {"jetson": release, "providers": providers}
    if release is None:
        if gpu:
            return Check("jetson gpu", "ok", f"not a Jetson; {runtime} offers {gpu}", figures=figures)
        return Check("jetson gpu", "skip", f"not a Jetson (no /etc/nv_tegra_release); {runtime} providers: {providers}",
                     "", figures)
    if gpu:
        return Check("jetson gpu", "ok", f"{release}; {runtime} offers {gpu}", figures=figures)
    return Check("jetson gpu", "warn", f"{release}, but {runtime} offers only {providers}: models run on the CPU",
                 JETSON_GPU_INSTALL, figures)


# ---- broker ------------------------------------------------------------------------------------

def check_broker(config: Config, timeout_s: float = BROKER_TIMEOUT_S) -> Check:
    """Connect, subscribe to a fresh self-test topic, and time publish-to-receive round trips."""
    mqtt = config.mqtt
    where = f"{mqtt.host}:{mqtt.port}"
    if not mqtt.enabled:
        return Check("broker", "skip", "[mqtt] enabled = false: the agent does not use a broker", "")
    from agent.transport.paho_client import connect, make_client
    from agent.transport.topics import ROOT
    token = uuid.uuid4().hex[:12]
    topic = f"{ROOT}/{config.device}/selftest/{token}"
    try:
        client = make_client(f"{config.device}-selftest-{token}", security=mqtt.security())
    except ValueError as exc:     # a certificate or password file gone since the config was loaded
        return Check("broker", "fail", str(exc), "fix the [mqtt] TLS and credential settings (README, "
                     "\"Securing the broker\")", {"host": mqtt.host, "port": mqtt.port})
    arrived = threading.Event()
    suback = threading.Event()
    client.on_message = lambda c, u, message: arrived.set()
    client.on_subscribe = lambda c, u, mid, codes, props: suback.set()
    fix = (f"check that the broker runs on {where} (`systemctl status mosquitto`; install: sudo apt-get install "
           "mosquitto), that [mqtt] host and port in the config name it, and that no firewall blocks the port")
    if mqtt.tls:
        fix += ("; that [mqtt] tls_ca signed the broker's certificate, issued for the host name in [mqtt] host, "
                "and that the broker's CA signed tls_cert")
    if mqtt.username:
        fix += "; that the broker knows [mqtt] username with the password in password_file"
    try:
        started = time.perf_counter()
        connect(client, mqtt.host, mqtt.port, timeout=timeout_s, keepalive=max(5, mqtt.keepalive_s))
        connect_ms = (time.perf_counter() - started) * 1e3
    except ConnectionError as exc:
        return Check("broker", "fail", str(exc), fix, {"host": mqtt.host, "port": mqtt.port})
    try:
        client.subscribe(topic, qos=1)
        if not suback.wait(timeout_s):
            return Check("broker", "fail", f"MQTT broker {where} accepted the connection but did not acknowledge a "
                         f"subscription to {topic} within {timeout_s:g} s", fix)
        figures_security = mqtt.security().describe()
        round_trips = []
        for i in range(BROKER_ROUND_TRIPS):
            arrived.clear()
            started = time.perf_counter()
            client.publish(topic, f"selftest {i}".encode(), qos=1)
            if not arrived.wait(timeout_s):
                return Check("broker", "fail", f"MQTT broker {where}: a message published to {topic} did not come "
                             f"back within {timeout_s:g} s", f"{fix}; and that its ACLs let this client publish and "
                             f"subscribe to {ROOT}/{config.device}/#")
            round_trips.append((time.perf_counter() - started) * 1e3)
    finally:
        client.disconnect()
        client.loop_stop()
    median = statistics.median(round_trips)
    figures = {"host": mqtt.host, "port": mqtt.port, "security": figures_security, "connect_ms": round(connect_ms, 3),
               "round_trip_ms": [round(ms, 3) for ms in round_trips], "round_trip_p50_ms": round(median, 3)}
    return Check("broker", "ok", f"{where} ({figures_security}): connected in {connect_ms:.1f} ms; publish-to-receive round trip "
                 f"p50 {median:.2f} ms, max {max(round_trips):.2f} ms ({BROKER_ROUND_TRIPS} at QoS 1)", figures=figures)


# ---- headroom ----------------------------------------------------------------------------------

def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


def _model_dirs(config: Config) -> list[Path]:
    from agent.models.card import load_card
    dirs: list[Path] = []
    for model in config.models:
        try:
            directory = load_card(model.card).file(model.file).path.parent
        except Exception:  # noqa: BLE001 - a bad card is the model rows' to report
            continue
        if directory not in dirs:
            dirs.append(directory)
    return dirs


def check_disk(config: Config, state_dir: str | Path | None = None) -> Check:
    """Free space where the models live and where the agent keeps its state."""
    places: list[tuple[str, Path]] = [("models", d) for d in _model_dirs(config)]
    state = state_dir or os.environ.get("STATE_DIRECTORY", "").split(":")[0] or (
        str(Path(config.profile).parent) if config.profile else None)
    if state:
        places.append(("state", Path(state)))
    rows, worst, figures = [], math.inf, {}
    for label, place in places:
        try:
            usage = shutil.disk_usage(place)
        except OSError as exc:
            return Check("disk", "fail", f"{label} {place}: {exc}", f"create {place} or correct the path")
        rows.append(f"{label} {place}: {_mib(usage.free)} free of {_mib(usage.total)}")
        figures[str(place)] = {"free_bytes": usage.free, "total_bytes": usage.total}
        worst = min(worst, usage.free)
    if not places:
        return Check("disk", "skip", "no model directory or state directory to check", "")
    detail = "; ".join(rows) + f" (fail < {DISK_FAIL_MIB} MiB, warn < {DISK_WARN_MIB} MiB)"
    if worst < DISK_FAIL_MIB * 2**20:
        return Check("disk", "fail", detail, "free disk space there (old logs, journald: journalctl --vacuum-size=50M)",
                     figures)
    if worst < DISK_WARN_MIB * 2**20:
        return Check("disk", "warn", detail, "free some disk space before the next model update", figures)
    return Check("disk", "ok", detail, figures=figures)


def read_meminfo(path: Path = Path("/proc/meminfo")) -> dict[str, int]:
    """``/proc/meminfo`` in bytes (empty where the board has none)."""
    values: dict[str, int] = {}
    for line in _read(path).splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return values


def check_memory() -> Check:
    info = read_meminfo()
    if "MemAvailable" not in info:
        return Check("memory", "skip", "not exposed (no MemAvailable in /proc/meminfo)", "")
    available, total = info["MemAvailable"], info.get("MemTotal", 0)
    figures = {"available_bytes": available, "total_bytes": total}
    detail = (f"{_mib(available)} available of {_mib(total)} (fail < {MEMORY_FAIL_MIB} MiB, "
              f"warn < {MEMORY_WARN_MIB} MiB)")
    if available < MEMORY_FAIL_MIB * 2**20:
        return Check("memory", "fail", detail, "stop what else runs on the board, or serve fewer instances "
                     "([[models]] instances)", figures)
    if available < MEMORY_WARN_MIB * 2**20:
        return Check("memory", "warn", detail, "little room left: fewer instances, or a smaller max_batch", figures)
    return Check("memory", "ok", detail, figures=figures)


def read_thermal_zones(root: Path = Path("/sys/class/thermal")) -> dict[str, float]:
    """Zone name (``type``, else the directory) -> degrees C, for the zones that report one."""
    zones: dict[str, float] = {}
    for zone in sorted(root.glob("thermal_zone*")):
        raw = _read(zone / "temp")
        try:
            millidegrees = int(raw)
        except ValueError:
            continue
        label = _read(zone / "type") or zone.name
        if label in zones:
            label = f"{label} ({zone.name})"
        zones[label] = millidegrees / 1000.0
    return zones


def check_temperature() -> Check:
    zones = read_thermal_zones()
    if not zones:
        return Check("temperature", "skip", "not exposed (no /sys/class/thermal/thermal_zone*/temp)", "")
    hottest = max(zones, key=zones.get)
    degrees = zones[hottest]
    figures = {"zones_c": zones}
    detail = (f"hottest {hottest} {degrees:.1f} C of {len(zones)} zone(s) (fail >= {TEMP_FAIL_C:g} C, "
              f"warn >= {TEMP_WARN_C:g} C)")
    if degrees >= TEMP_FAIL_C:
        return Check("temperature", "fail", detail, "cool the board (heatsink, fan, airflow) before serving: it is "
                     "throttling or about to shut down", figures)
    if degrees >= TEMP_WARN_C:
        return Check("temperature", "warn", detail, "the board may throttle under load: check its cooling", figures)
    return Check("temperature", "ok", detail, figures=figures)
