"""Board kinds (one profile file each) and the fleet's boards.

A board kind is an ``edge-agent profile`` file (``agent.profiler.profile_file``: batch tables and
the fitted interference model t(b, k) per model) with a ``"board"`` section that the profiler does
not write and the planner needs::

    "board": {"kind": "cpu-2core",            # the name apps.toml's [fleet] and node selectors use
              "made": "how the figures were obtained (measured, derived from what, by what rule)",
              "memory_mb": 2048,                # memory the agent may use on such a board
              "model_memory_mb": {"mobilenet_digits": 48, ...},   # per loaded instance
              "workers": 2,                     # execution slots the agent is given (config [agent] workers)
              "accelerator": "cpu",             # cpu | jetson-gpu | edgetpu
              "device_resource": null,          # Kubernetes extended resource, e.g. "nvidia.com/gpu"
              "cpu_request": "1", "cpu_limit": "2"}        # the pod's CPU (Kubernetes quantities)

The section is validated here (a ``ProfileError`` naming the field), the rest by the profile loader.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.core import LatencyTable
from agent.profiler.profile_file import Profile, ProfileError, load_profile

__all__ = ["ACCELERATORS", "BoardKind", "Board", "load_kinds", "fleet_boards"]

ACCELERATORS = ("cpu", "jetson-gpu", "edgetpu")


def _kind_name(value: Any) -> bool:
    # A Kubernetes label value and a file-name part: [a-z0-9] with '-' and '.' inside.
    return (isinstance(value, str) and 0 < len(value) <= 63 and value[0].isalnum() and value[-1].isalnum()
            and all(c.isalnum() and (c.islower() or c.isdigit()) or c in "-." for c in value))


@dataclass(frozen=True)
class BoardKind:
    """One kind of board: its profile (latency per model) and what the planner needs besides."""

    name: str
    made: str
    profile: Profile
    memory_mb: float
    model_memory_mb: dict[str, float]
    workers: int
    accelerator: str
    device_resource: str | None
    cpu_request: str
    cpu_limit: str | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "_isolated", {})     # (model, batch) -> seconds: the planner asks often

    @property
    def cores(self) -> int:
        return int(self.profile.host["cores"])

    @property
    def models(self) -> list[str]:
        return self.profile.model_names

    def serves(self, model: str) -> bool:
        return model in self.profile.data["models"]

    def table(self, model: str) -> LatencyTable:
        """The isolated batch latency (p50, seconds per batch size): what the agent's scheduler and
        the simulator time batches by."""
        return self.profile.latency_table(model, "p50")

    def params(self, model: str) -> dict[str, float]:
        return self.profile.model(model)["fit"]["params"]

    def slowdown(self, model: str, k: float) -> float:
        """The fitted interference factor for ``k`` batches running at once (1 at k = 1):
        ``agent.profiler.fit.slowdown``, in plain floats (the planner calls it very often)."""
        p = self.params(model)
        k = max(1.0, float(k))
        cores = int(p["cores"])
        return max(1.0, k * p["u"] / cores) * (1.0 + p["gamma"] * (min(k, cores) - 1.0))

    def isolated_s(self, model: str, batch: int) -> float:
        """A batch's time alone (seconds): the larger of the table's and the fit's figure, so
        neither a lucky measurement nor a fit that undershoots makes a plan optimistic."""
        key = (model, batch)
        cached = self._isolated.get(key)
        if cached is None:
            p = self.params(model)
            fitted = (p["alpha_ms"] + p["beta_ms"] * batch) / 1e3
            cached = self._isolated[key] = max(float(self.table(model).predict(batch)), fitted)
        return cached

    def service_s(self, model: str, batch: int, k: float) -> float:
        """A batch's time with ``k`` batches running at once (the interference model t(b, k))."""
        return self.isolated_s(model, batch) * self.slowdown(model, k)

    def batch_sizes(self, model: str) -> list[int]:
        return list(self.profile.model(model)["batch"]["sizes"])

    def instance_mb(self, model: str) -> float:
        return float(self.model_memory_mb.get(model, 64.0))


@dataclass(frozen=True)
class Board:
    """One board of the fleet: a name (its device id, node name) and its kind."""

    name: str
    kind: BoardKind


def _board_section(profile: Profile, source: Path) -> BoardKind:
    data = profile.data.get("board")
    where = "board"

    def bad(key: str, value: Any, expected: str) -> ProfileError:
        return ProfileError(f"{where}.{key}", value, expected, source)

    if not isinstance(data, dict):
        raise ProfileError(where, data, "an object with kind, made, memory_mb, ... (the planner's board section)",
                           source)
    name = data.get("kind")
    if not _kind_name(name):
        raise bad("kind", name, "a lower-case name of letters, digits, '-' and '.' (a Kubernetes label value)")
    made = data.get("made")
    if not isinstance(made, str) or not made:
        raise bad("made", made, "a sentence saying how these figures were obtained")
    memory = data.get("memory_mb")
    if isinstance(memory, bool) or not isinstance(memory, (int, float)) or not memory > 0:
        raise bad("memory_mb", memory, "megabytes > 0")
    per_model = data.get("model_memory_mb", {})
    if not isinstance(per_model, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in per_model.values()):
        raise bad("model_memory_mb", per_model, "an object: model name -> megabytes > 0 per instance")
    workers = data.get("workers", int(profile.host["cores"]))
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 256:
        raise bad("workers", workers, "an integer in 1..256")
    accelerator = data.get("accelerator", "cpu")
    if accelerator not in ACCELERATORS:
        raise bad("accelerator", accelerator, f"one of {list(ACCELERATORS)}")
    resource = data.get("device_resource")
    if resource is not None and (not isinstance(resource, str) or "/" not in resource):
        raise bad("device_resource", resource, "null or a Kubernetes extended resource name (domain/name)")
    cpu_request = data.get("cpu_request", str(workers))
    cpu_limit = data.get("cpu_limit")
    for key, value in (("cpu_request", cpu_request), ("cpu_limit", cpu_limit)):
        if value is not None and not (isinstance(value, str) and value and
                                      (value.rstrip("m").replace(".", "", 1).isdigit())):
            raise bad(key, value, "a Kubernetes CPU quantity such as \"500m\" or \"2\"")
    return BoardKind(name=name, made=made, profile=profile, memory_mb=float(memory),
                     model_memory_mb={k: float(v) for k, v in per_model.items()}, workers=workers,
                     accelerator=accelerator, device_resource=resource, cpu_request=cpu_request, cpu_limit=cpu_limit)


def load_kinds(directory: str | Path) -> dict[str, BoardKind]:
    """Every ``*.json`` profile of ``directory`` as a board kind, by kind name; errors name the file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ProfileError("directory", str(directory), "a directory of board profiles (*.json)")
    kinds: dict[str, BoardKind] = {}
    for path in sorted(directory.glob("*.json")):
        kind = _board_section(load_profile(path), path)
        if kind.name in kinds:
            raise ProfileError("board.kind", kind.name, f"a kind not used by another profile of {directory}", path)
        kinds[kind.name] = kind
    if not kinds:
        raise ProfileError("directory", str(directory), "at least one board profile (*.json)")
    return kinds


def fleet_boards(kinds: dict[str, BoardKind], counts: dict[str, int] | None = None) -> list[Board]:
    """The fleet: ``counts[kind]`` boards of each kind (default one each), named ``<kind>-<i>``,
    in a fixed order (kinds by name) so that a plan is reproducible."""
    counts = dict(counts) if counts else {name: 1 for name in kinds}
    for name in counts:
        if name not in kinds:
            raise ProfileError("fleet", name, f"a board kind of the profiles given: {sorted(kinds)}")
    boards = []
    for name in sorted(counts):
        for i in range(counts[name]):
            boards.append(Board(f"{name}-{i + 1}", kinds[name]))
    if not boards:
        raise ProfileError("fleet", counts, "at least one board")
    return boards


def ceil_div(a: float, b: float) -> int:
    return int(math.ceil(a / b - 1e-12))
