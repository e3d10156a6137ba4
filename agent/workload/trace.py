"""Workload traces (DESIGN.md, traces v1): CSV with the header ``t_s,app,model,slo_ms,priority``
and an optional ``min_accuracy`` column: arrival time in seconds from the start, the application,
the model, the SLO and the priority. The same file drives the live agent, the simulator and every
baseline, so a comparison is always on identical arrivals.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

TRACE_COLUMNS = ("t_s", "app", "model", "slo_ms", "priority")
OPTIONAL_COLUMNS = ("min_accuracy",)


class TraceError(ValueError):
    """A malformed trace; the message names the file, the line and the column."""


@dataclass(frozen=True, slots=True)
class TraceRow:
    t_s: float                        # arrival, seconds from the start of the trace
    app: str
    model: str
    slo_ms: float
    priority: int = 0
    min_accuracy: float | None = None


def write_trace(path: str | Path, rows: Iterable[TraceRow]) -> int:
    """Write rows (sorted by arrival) as a v1 trace; returns the number written."""
    rows = sorted(rows, key=lambda r: r.t_s)
    with_accuracy = any(r.min_accuracy is not None for r in rows)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(TRACE_COLUMNS + (OPTIONAL_COLUMNS if with_accuracy else ()))
        for r in rows:
            line = [f"{r.t_s:.6f}", r.app, r.model, repr(float(r.slo_ms)), r.priority]
            if with_accuracy:
                line.append("" if r.min_accuracy is None else repr(float(r.min_accuracy)))
            writer.writerow(line)
    return len(rows)


def read_trace(path: str | Path) -> list[TraceRow]:
    """Read and validate a v1 trace; rows come back in arrival order."""
    path = Path(path)
    rows: list[TraceRow] = []
    try:
        fh = open(path, newline="")
    except FileNotFoundError:
        raise TraceError(f"trace {path} does not exist") from None
    with fh:
        reader = csv.reader(fh)
        header = tuple(next(reader, ()))
        if header[:len(TRACE_COLUMNS)] != TRACE_COLUMNS or any(c not in OPTIONAL_COLUMNS for c in header[len(TRACE_COLUMNS):]):
            raise TraceError(f"{path}: header {','.join(header)!r}: expected {','.join(TRACE_COLUMNS)}"
                             f" optionally followed by {','.join(OPTIONAL_COLUMNS)}")
        has_accuracy = "min_accuracy" in header
        for line_no, fields in enumerate(reader, start=2):
            if not fields:
                continue
            if len(fields) != len(header):
                raise TraceError(f"{path}:{line_no}: {len(fields)} fields, expected {len(header)}")
            rows.append(_row(fields, has_accuracy, f"{path}:{line_no}"))
    rows.sort(key=lambda r: r.t_s)
    return rows


def _row(fields: list[str], has_accuracy: bool, where: str) -> TraceRow:
    def number(column: str, text: str, check, expected: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or not check(value):
            raise TraceError(f"{where}: {column} = {text!r}: expected {expected}")
        return value

    t_s = number("t_s", fields[0], lambda v: v >= 0, "seconds >= 0")
    if not fields[1] or not fields[2]:
        raise TraceError(f"{where}: app and model must not be empty")
    slo_ms = number("slo_ms", fields[3], lambda v: v > 0, "milliseconds > 0")
    try:
        priority = int(fields[4])
    except ValueError:
        raise TraceError(f"{where}: priority = {fields[4]!r}: expected an integer") from None
    min_accuracy = None
    if has_accuracy and fields[5] != "":
        min_accuracy = number("min_accuracy", fields[5], lambda v: 0 <= v <= 1, "a number in 0..1")
    return TraceRow(t_s, fields[1], fields[2], slo_ms, priority, min_accuracy)
