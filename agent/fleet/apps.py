"""The application list the planner places (``apps.toml``), validated once with errors that name
the application, the field, the value and what was expected.

Format (TOML)::

    apps_version = 1

    [fleet]                      # optional: how many boards of each profiled kind (default: one each)
    cpu-2core = 2
    jetson-like = 1

    [[apps]]
    name = "doorbell"            # unique; no '/', '+', '#' or ',' (it names MQTT topics and trace rows)
    model = "mobilenet_digits"   # a model the board profiles hold
    rate_per_s = 40              # the application's mean request rate (> 0)
    slo_ms = 30                  # each request's deadline after its arrival (> 0)
    min_accuracy = 0.9           # optional: refuse a model whose card's accuracy is lower

Why a file of its own and not the agent's config: an application is what a user runs (a camera
at 40 requests/s that needs an answer in 30 ms), independent of the boards; the planner decides
which board's agent serves it.
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["APPS_VERSION", "AppsError", "App", "AppList", "load_apps", "parse_apps"]

APPS_VERSION = 1
_APP_KEYS = {"name", "model", "rate_per_s", "slo_ms", "min_accuracy"}


class AppsError(ValueError):
    """``apps: field = value: expected ...``: one bad entry of an application list, named."""

    def __init__(self, field_path: str, value: Any, expected: str, source: str | Path | None = None) -> None:
        where = f"apps {source}" if source else "apps"
        super().__init__(f"{where}: {field_path} = {value!r}: expected {expected}")
        self.field = field_path
        self.value = value
        self.expected = expected


@dataclass(frozen=True)
class App:
    """One application: a model at a mean request rate, each request with the same SLO."""

    name: str
    model: str
    rate_per_s: float
    slo_ms: float
    min_accuracy: float | None = None


@dataclass(frozen=True)
class AppList:
    """The applications, and the fleet's board counts per kind (empty: one board per profile)."""

    apps: tuple[App, ...]
    fleet: dict[str, int] = field(default_factory=dict)

    def app(self, name: str) -> App:
        for a in self.apps:
            if a.name == name:
                return a
        raise KeyError(name)


def _number(table: dict, key: str, where: str, check, expected: str, required: bool = True) -> float | None:
    if key not in table:
        if required:
            raise AppsError(f"{where}.{key}", None, f"{expected} (the field is missing)")
        return None
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not check(value):
        raise AppsError(f"{where}.{key}", value, expected)
    return float(value)


def _name(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and not any(c in value for c in "/+#,") and value.strip() == value


def parse_apps(data: Any, source: str | Path | None = None) -> AppList:
    """Validate a mapping (as read from TOML) into an :class:`AppList`; raises :class:`AppsError`."""
    try:
        if not isinstance(data, dict):
            raise AppsError("(top level)", data, "a table")
        unknown = set(data) - {"apps_version", "fleet", "apps"}
        if unknown:
            key = sorted(unknown)[0]
            raise AppsError(key, data[key], "one of the known keys ['apps', 'apps_version', 'fleet']")
        version = data.get("apps_version")
        if version != APPS_VERSION or isinstance(version, bool):
            raise AppsError("apps_version", version, f"{APPS_VERSION} (this planner reads version {APPS_VERSION})")
        fleet_raw = data.get("fleet", {})
        if not isinstance(fleet_raw, dict):
            raise AppsError("fleet", fleet_raw, "a table: board kind = number of boards")
        fleet: dict[str, int] = {}
        for kind, count in fleet_raw.items():
            if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 10_000:
                raise AppsError(f"fleet.{kind}", count, "a number of boards in 0..10000")
            fleet[kind] = count
        raw = data.get("apps")
        if not isinstance(raw, list) or not raw:
            raise AppsError("apps", raw, "at least one [[apps]] table")
        apps = []
        seen: set[str] = set()
        for i, entry in enumerate(raw):
            where = f"apps[{i}]"
            if not isinstance(entry, dict):
                raise AppsError(where, entry, "a table with name, model, rate_per_s and slo_ms")
            name = entry.get("name")
            if not _name(name):
                raise AppsError(f"{where}.name", name, "a non-empty name without '/', '+', '#' or ','")
            where = f"apps[{i}] ({name})"
            for key in entry:
                if key not in _APP_KEYS:
                    raise AppsError(f"{where}.{key}", entry[key], f"one of the known keys {sorted(_APP_KEYS)}")
            if name in seen:
                raise AppsError(f"{where}.name", name, "a name not used by another application")
            seen.add(name)
            model = entry.get("model")
            if not _name(model):
                raise AppsError(f"{where}.model", model, "a model name (as the board profiles name it)")
            apps.append(App(
                name=name, model=model,
                rate_per_s=_number(entry, "rate_per_s", where, lambda v: 0 < v <= 1e6, "requests per second in (0, 1e6]"),
                slo_ms=_number(entry, "slo_ms", where, lambda v: 0 < v <= 3.6e6, "milliseconds in (0, 3600000]"),
                min_accuracy=_number(entry, "min_accuracy", where, lambda v: 0 <= v <= 1, "a fraction in 0..1",
                                     required=False),
            ))
    except AppsError as exc:
        if source is not None and not str(exc).startswith(f"apps {source}"):
            raise AppsError(exc.field, exc.value, exc.expected, source) from None
        raise
    return AppList(tuple(apps), fleet)


def load_apps(path: str | Path) -> AppList:
    """Read and validate an ``apps.toml``; every problem is an :class:`AppsError` naming the field."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise AppsError("file", str(path), "an existing TOML file (the application list)") from None
    except tomllib.TOMLDecodeError as exc:
        raise AppsError("file", str(path), f"valid TOML ({exc})") from None
    return parse_apps(data, source=path)
