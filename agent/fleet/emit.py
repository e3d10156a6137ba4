"""A plan as one agent config per board (the agent's TOML, ``agent.config``).

Each board's config serves the models its applications use: ``instances`` and the batching limit
from the planner's prediction (``agent.fleet.latency``), the tightest SLO of the model's
applications as its default, ``workers`` from the board kind. The config is built as a mapping,
checked with the agent's own ``parse_config`` (so a plan never writes a file the agent refuses),
and written as TOML by :func:`to_toml` (the standard library reads TOML but does not write it).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent.config import CONFIG_VERSION, parse_config
from agent.fleet.boards import Board
from agent.fleet.latency import BoardPrediction
from agent.models.card import DEMO_DIR

__all__ = ["board_config", "to_toml", "card_for", "card_accuracy"]


def card_for(model: str, cards: dict[str, str] | None = None) -> str:
    """The model card a config names: ``cards[model]`` if given, the shipped demo model of that name,
    else ``cards/<model>.json`` beside the config (to be copied there with the model's files)."""
    if cards and model in cards:
        return cards[model]
    if (Path(DEMO_DIR) / f"{model}.json").exists():
        return f"demo:{model}"
    return f"cards/{model}.json"


def card_accuracy(model: str, cards: dict[str, str] | None = None) -> float | None:
    """The test accuracy the model's card reports (``provenance.test_accuracy_torch``), or None
    when the card is not at hand or does not say: what an application's ``min_accuracy`` is held to."""
    from agent.models.card import resolve_card_path
    ref = card_for(model, cards)
    try:
        data = json.loads(Path(resolve_card_path(ref)).read_text())
    except (OSError, ValueError):
        return None
    value = (data.get("provenance") or {}).get("test_accuracy_torch") if isinstance(data, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def board_config(board: Board, prediction: BoardPrediction, *, broker_host: str = "127.0.0.1",
                 broker_port: int = 1883, cards: dict[str, str] | None = None) -> dict[str, Any]:
    """The agent config (a mapping, validated) of one board that hosts ``prediction.models``."""
    kind = board.kind
    models = []
    for name in sorted(prediction.models):
        p = prediction.models[name]
        entry = kind.profile.model(name)
        models.append({
            "name": name,
            "card": card_for(name, cards),
            "backend": entry["backend"],
            "file": entry["file"],
            "instances": int(p.instances),
            "threads": int(entry.get("threads", 1)),
            "default_slo_ms": round(p.slo_s * 1e3, 3),
            "batching": {"rule": "deadline_aware", "max_batch": int(p.max_batch)},
        })
    data = {
        "config_version": CONFIG_VERSION,
        "agent": {"device": board.name, "workers": int(kind.workers)},
        "mqtt": {"host": broker_host, "port": int(broker_port)},
        "models": models,
    }
    parse_config(json.loads(json.dumps(data)))     # the agent's own check: raises ConfigError
    return data


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)          # a TOML basic string is a JSON string for what we write
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as a TOML value")


def to_toml(data: dict[str, Any], header: str = "") -> str:
    """TOML for a config mapping: top-level scalars, tables, and arrays of tables of tables
    (``[[models]]`` with ``[models.batching]``), which is all an agent config holds."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    tables, arrays = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            arrays.append((key, value))
        else:
            lines.append(f"{key} = {_scalar(value)}")
    for key, table in tables:
        lines += ["", f"[{key}]"] + [f"{k} = {_scalar(v)}" for k, v in table.items()]
    for key, items in arrays:
        for item in items:
            lines += ["", f"[[{key}]]"]
            subtables = [(k, v) for k, v in item.items() if isinstance(v, dict)]
            lines += [f"{k} = {_scalar(v)}" for k, v in item.items() if not isinstance(v, dict)]
            for sub, table in subtables:
                lines += [f"[{key}.{sub}]"] + [f"{k} = {_scalar(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"
