"""The board profile file (JSON, versioned): what was measured, on what, and the fitted model.

The file is the hand-off between ``edge-agent profile`` (run once per board, minutes) and
everything that needs latency figures without measuring again: the scheduler's latency table,
admission control, the simulator. Like the config, it is validated once at load, and an error
names the field, the value and what was expected, so a hand-edited or truncated profile fails at
start, not in the middle of a scheduling decision.

Format, ``profile_version`` 1 (lists are parallel; times in milliseconds)::

    {"profile_version": 1, "created": "2026-11-24T14:00:00+00:00",
     "host": {"cpu": str, "cores": int, "machine": str, "system": str, "python": str,
              "runtimes": {"onnxruntime": str, "litert": str}},
     "settings": {...how it was measured: repeats, warmup, max_batch, max_concurrency, quick...},
     "models": {NAME: {
        "backend": "onnxruntime", "file": "onnx", "threads": 1,
        "batch": {"sizes": [1, 2, 4], "p50_ms": [...], "p99_ms": [...], "mean_ms": [...],
                  "tail": "p99" | "max", "repeats": N, "stopped": null | "why the sweep ended early"},
        "concurrency": {"levels": [1, 2], "batch_sizes": [1, 8],
                        "p50_ms": [[...per batch size...] per level], "p99_ms": [[...]], "mean_ms": [[...]],
                        "repeats": N},
        "co_running": {OTHER: {"batch_sizes": [...], "p50_ms": [...], "alone_p50_ms": [...],
                               "predicted_ms": [...], "rel_error": [...]}},
        "fit": {"form": str, "params": {"alpha_ms", "beta_ms", "u", "gamma", "cores"},
                "train": [[b, k], ...], "heldout": [[b, k], ...], "heldout_rel_errors": [...],
                "median_rel_error": x | null, "max_rel_error": y | null, ...}}}}

``concurrency.p50_ms[i][j]`` is the per-batch latency of one instance at ``levels[i]`` instances
busy at once and batch ``batch_sizes[j]``. ``co_running[OTHER]`` is this model (one instance)
while one instance of OTHER runs the same batch size; ``predicted_ms`` is the fit's figure for
two busy instances, a check the fit never trained on.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from agent.core import LatencyTable
from agent.profiler.fit import predict_ms as _fit_predict_ms

__all__ = ["PROFILE_VERSION", "PERCENTILES", "ProfileError", "Profile", "validate_profile",
           "load_profile", "save_profile"]

PROFILE_VERSION = 1
#: The batch statistics a latency table can be built from.
PERCENTILES = ("p50", "p99", "mean")
_FIT_PARAMS = ("alpha_ms", "beta_ms", "u", "gamma", "cores")


class ProfileError(ValueError):
    """``profile: field = value: expected ...``: one bad entry of a profile file, named."""

    def __init__(self, field_path: str, value: Any, expected: str, source: str | Path | None = None) -> None:
        shown = repr(value)
        if len(shown) > 80 and not isinstance(value, str):
            shown = shown[:77] + "..."
        where = f"profile {source}" if source else "profile"
        super().__init__(f"{where}: {field_path} = {shown}: expected {expected}")
        self.field = field_path
        self.value = value
        self.expected = expected


_MISSING = object()


def _get(table: dict, key: str, where: str) -> Any:
    path = f"{where}.{key}" if where else key
    if not isinstance(table, dict):
        raise ProfileError(where or "(top level)", table, "an object")
    value = table.get(key, _MISSING)
    if value is _MISSING:
        raise ProfileError(path, None, "this field (it is missing)")
    return value


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _str(table: dict, key: str, where: str) -> str:
    value = _get(table, key, where)
    if not isinstance(value, str) or not value:
        raise ProfileError(f"{where}.{key}", value, "a non-empty string")
    return value


def _pos_int(table: dict, key: str, where: str) -> int:
    value = _get(table, key, where)
    if not _is_int(value) or value < 1:
        raise ProfileError(f"{where}.{key}", value, "an integer >= 1")
    return value


def _int_list(table: dict, key: str, where: str) -> list[int]:
    value = _get(table, key, where)
    path = f"{where}.{key}"
    if (not isinstance(value, list) or not value or not all(_is_int(v) and v >= 1 for v in value)
            or any(a >= b for a, b in zip(value, value[1:]))):
        raise ProfileError(path, value, "a non-empty, strictly increasing list of integers >= 1")
    return value


def _ms_list(table: dict, key: str, where: str, length: int) -> list[float]:
    value = _get(table, key, where)
    path = f"{where}.{key}"
    if not isinstance(value, list) or len(value) != length or not all(_is_number(v) and v > 0 for v in value):
        raise ProfileError(path, value, f"a list of {length} numbers > 0 (milliseconds, one per entry)")
    return value


def _ms_matrix(table: dict, key: str, where: str, rows: int, cols: int) -> list[list[float]]:
    value = _get(table, key, where)
    path = f"{where}.{key}"
    if not isinstance(value, list) or len(value) != rows:
        raise ProfileError(path, value, f"{rows} rows (one per concurrency level) of {cols} numbers > 0")
    for i, row in enumerate(value):
        if not isinstance(row, list) or len(row) != cols or not all(_is_number(v) and v > 0 for v in row):
            raise ProfileError(f"{path}[{i}]", row, f"a list of {cols} numbers > 0 (one per batch size)")
    return value


def _points(table: dict, key: str, where: str) -> None:
    value = _get(table, key, where)
    if not isinstance(value, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(_is_int(x) and x >= 1 for x in p) for p in value):
        raise ProfileError(f"{where}.{key}", value, "a list of [batch, k] pairs of integers >= 1")


def _validate_model(name: str, entry: Any) -> None:
    where = f"models.{name}"
    if not isinstance(entry, dict):
        raise ProfileError(where, entry, "an object")
    _str(entry, "backend", where)
    _str(entry, "file", where)
    _pos_int(entry, "threads", where)

    batch_where = f"{where}.batch"
    batch = _get(entry, "batch", where)
    if not isinstance(batch, dict):
        raise ProfileError(batch_where, batch, "an object")
    sizes = _int_list(batch, "sizes", batch_where)
    for key in ("p50_ms", "p99_ms", "mean_ms"):
        _ms_list(batch, key, batch_where, len(sizes))
    _pos_int(batch, "repeats", batch_where)

    conc_where = f"{where}.concurrency"
    conc = _get(entry, "concurrency", where)
    if not isinstance(conc, dict):
        raise ProfileError(conc_where, conc, "an object")
    levels = _int_list(conc, "levels", conc_where)
    conc_sizes = _int_list(conc, "batch_sizes", conc_where)
    _ms_matrix(conc, "p50_ms", conc_where, len(levels), len(conc_sizes))

    co = entry.get("co_running", {})
    if not isinstance(co, dict):
        raise ProfileError(f"{where}.co_running", co, "an object: other model -> figures")
    for other, figures in co.items():
        co_where = f"{where}.co_running.{other}"
        co_sizes = _int_list(figures, "batch_sizes", co_where)
        _ms_list(figures, "p50_ms", co_where, len(co_sizes))

    fit_where = f"{where}.fit"
    fit = _get(entry, "fit", where)
    if not isinstance(fit, dict):
        raise ProfileError(fit_where, fit, "an object")
    _str(fit, "form", fit_where)
    params = _get(fit, "params", fit_where)
    if not isinstance(params, dict):
        raise ProfileError(f"{fit_where}.params", params, f"an object with {list(_FIT_PARAMS)}")
    for key in _FIT_PARAMS:
        value = _get(params, key, f"{fit_where}.params")
        if not _is_number(value) or value < 0 or (key in ("u", "cores") and value <= 0):
            raise ProfileError(f"{fit_where}.params.{key}", value,
                               "a number > 0" if key in ("u", "cores") else "a number >= 0")
    if params["alpha_ms"] + params["beta_ms"] <= 0:
        raise ProfileError(f"{fit_where}.params.beta_ms", params["beta_ms"],
                           "alpha_ms + beta_ms > 0 (a batch of one takes time)")
    _points(fit, "train", fit_where)
    _points(fit, "heldout", fit_where)
    for key in ("median_rel_error", "max_rel_error"):
        value = _get(fit, key, fit_where)
        if value is not None and not (_is_number(value) and value >= 0):
            raise ProfileError(f"{fit_where}.{key}", value, "a number >= 0, or null when nothing was held out")


def validate_profile(data: Any, source: str | Path | None = None) -> dict:
    """Check a profile mapping field by field; returns it, or raises :class:`ProfileError`."""
    try:
        if not isinstance(data, dict):
            raise ProfileError("(top level)", data, "a JSON object")
        version = data.get("profile_version", _MISSING)
        if version is _MISSING:
            raise ProfileError("profile_version", None, f"{PROFILE_VERSION} (the field is missing)")
        if version != PROFILE_VERSION or isinstance(version, bool):
            raise ProfileError("profile_version", version,
                               f"{PROFILE_VERSION} (this agent reads profile version {PROFILE_VERSION})")
        _str(data, "created", "")
        host = _get(data, "host", "")
        if not isinstance(host, dict):
            raise ProfileError("host", host, "an object")
        _pos_int(host, "cores", "host")
        models = _get(data, "models", "")
        if not isinstance(models, dict) or not models:
            raise ProfileError("models", models, "a non-empty object: model name -> figures")
        for name, entry in models.items():
            _validate_model(name, entry)
    except ProfileError as exc:
        if source is not None and not str(exc).startswith(f"profile {source}"):
            raise ProfileError(exc.field, exc.value, exc.expected, source) from None
        raise
    return data


class Profile:
    """A validated board profile: measured tables and the fitted interference model per model."""

    def __init__(self, data: dict, source: str | Path | None = None) -> None:
        self.data = validate_profile(data, source)
        self.source = source

    @property
    def version(self) -> int:
        return int(self.data["profile_version"])

    @property
    def host(self) -> dict:
        return self.data["host"]

    @property
    def model_names(self) -> list[str]:
        return sorted(self.data["models"])

    def model(self, name: str) -> dict:
        """The raw figures of one model; KeyError naming the profiled models otherwise."""
        try:
            return self.data["models"][name]
        except KeyError:
            raise KeyError(f"model {name!r} is not in this profile; it has {self.model_names}") from None

    def latency_table(self, model: str, percentile: str = "p50") -> LatencyTable:
        """The model's isolated batch latency as the scheduler's table (seconds per batch size).

        ``percentile`` picks the statistic: ``"p50"`` (typical; what the start-up profile uses),
        ``"p99"`` (DeepRT's worst case: admission that must not be optimistic) or ``"mean"``.
        """
        if percentile not in PERCENTILES:
            raise ValueError(f"percentile = {percentile!r}: expected one of {PERCENTILES}")
        batch = self.model(model)["batch"]
        return LatencyTable(np.array(batch["sizes"], dtype=np.int64),
                            np.array(batch[f"{percentile}_ms"], dtype=np.float64) / 1e3)

    def predict_ms(self, model: str, batch: int, concurrency: int = 1) -> float:
        """The fitted model's latency (ms) of a batch of ``batch`` with ``concurrency`` instances busy."""
        if batch < 1 or concurrency < 1:
            raise ValueError(f"batch = {batch}, concurrency = {concurrency}: expected both >= 1")
        return float(_fit_predict_ms(self.model(model)["fit"]["params"], batch, concurrency))


def save_profile(data: dict, path: str | Path) -> Path:
    """Validate, then write atomically (a reader never sees half a profile). Returns the path."""
    validate_profile(data)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile file; every problem is a :class:`ProfileError` naming the field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError("file", str(path), "an existing profile JSON file (edge-agent profile --out FILE)") from None
    except json.JSONDecodeError as exc:
        raise ProfileError("file", str(path), f"valid JSON ({exc})") from None
    return Profile(data, source=path)
