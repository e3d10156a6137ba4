"""The policy card: what a shipped network was trained on and for, checked before it decides.

A policy directory (``policies/<board-class>/``) holds ``card.json`` and the weights file it names.
The card says (``CARD_VERSION`` 1):

* ``feature_schema``: ``{"version", "names"}`` (``agent.learned.features``);
* ``action_space``: ``{"version", "lanes", "buckets", "names", "idle_tick_ms"}`` (``agent.learned.actions``);
* ``normalisation``: ``{"mean", "std"}`` per feature;
* ``net``: ``{"hidden": [32, 32], "activation": "relu"}``;
* ``weights``: ``{"file", "sha256"}``;
* ``training``: the profile, the traces (kinds, seeds, rates), the seeds, the teacher and how the
  student was distilled, the teacher agreement on held-out states; free-form beyond that.

:func:`load_policy` refuses, naming what differs: a card of another version, a weights file whose
sha256 is not the card's, a feature schema or action space other than this agent's for the lanes
it serves (a lane missing, another order, other buckets), a network whose shape does not fit them.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from agent.learned.actions import ACTION_SCHEMA_VERSION, action_names
from agent.learned.features import FEATURE_SCHEMA_VERSION, feature_names
from agent.learned.net import MLP

CARD_VERSION = 1
CARD_FILE = "card.json"


class PolicyCardError(ValueError):
    """A policy directory that cannot be used here; the message names what differs."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class LoadedPolicy:
    """A checked card and its network."""

    card: dict
    net: MLP
    lanes: tuple[str, ...]
    buckets: tuple[int, ...]
    idle_tick_s: float
    path: Path


def _differs(what: str, expected: list, got: list) -> str:
    missing = [x for x in expected if x not in got]
    extra = [x for x in got if x not in expected]
    if missing or extra:
        return f"{what}: the card has {extra or 'nothing'} beyond this agent's and lacks {missing or 'nothing'}"
    return f"{what}: same names in another order (card {got}, this agent {expected})"


def load_policy(directory: str | Path, lanes: Sequence[str] | None = None) -> LoadedPolicy:
    """The policy in ``directory``, checked against this agent's schemas and, with ``lanes``, the
    lanes it would serve (as a set: the card's order is kept). Raises :class:`PolicyCardError`."""
    directory = Path(directory)
    card_path = directory / CARD_FILE
    if not card_path.is_file():
        raise PolicyCardError(f"policy {directory}: no {CARD_FILE} there (a policy directory holds its card and weights)")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as exc:
        raise PolicyCardError(f"policy card {card_path}: not readable JSON ({exc})") from None
    if not isinstance(card, dict) or card.get("card_version") != CARD_VERSION:
        raise PolicyCardError(f"policy card {card_path}: card_version = {card.get('card_version') if isinstance(card, dict) else card!r}: "
                              f"expected {CARD_VERSION}")
    try:
        features, space, norm, weights = (card["feature_schema"], card["action_space"], card["normalisation"], card["weights"])
        card_lanes = [str(x) for x in space["lanes"]]
        buckets = [int(b) for b in space["buckets"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise PolicyCardError(f"policy card {card_path}: missing or malformed field {exc}") from None
    if features.get("version") != FEATURE_SCHEMA_VERSION:
        raise PolicyCardError(f"policy card {card_path}: feature schema version {features.get('version')!r}, "
                              f"this agent computes version {FEATURE_SCHEMA_VERSION}")
    if space.get("version") != ACTION_SCHEMA_VERSION:
        raise PolicyCardError(f"policy card {card_path}: action space version {space.get('version')!r}, "
                              f"this agent decodes version {ACTION_SCHEMA_VERSION}")
    if lanes is not None and sorted(lanes) != sorted(card_lanes):
        raise PolicyCardError(f"policy card {card_path}: lanes {card_lanes}, this agent serves {sorted(lanes)}: "
                              f"{_differs('lanes', sorted(lanes), card_lanes)}")
    expected_features = feature_names(card_lanes)
    if list(features.get("names", [])) != expected_features:
        raise PolicyCardError(f"policy card {card_path}: feature names differ from schema {FEATURE_SCHEMA_VERSION}'s: "
                              f"{_differs('features', expected_features, list(features.get('names', [])))}")
    expected_actions = action_names(card_lanes, buckets)
    if list(space.get("names", [])) != expected_actions:
        raise PolicyCardError(f"policy card {card_path}: action names differ from action space {ACTION_SCHEMA_VERSION}'s: "
                              f"{_differs('actions', expected_actions, list(space.get('names', [])))}")
    weights_path = directory / str(weights.get("file", ""))
    if not weights_path.is_file():
        raise PolicyCardError(f"policy card {card_path}: weights file {weights_path} not found")
    digest = sha256_file(weights_path)
    if digest != weights.get("sha256"):
        raise PolicyCardError(f"policy {directory}: weights {weights_path.name} have sha256 {digest}, "
                              f"the card says {weights.get('sha256')!r}: not the network the card describes")
    try:
        net = MLP.load(weights_path, np.asarray(norm["mean"], dtype=np.float32), np.asarray(norm["std"], dtype=np.float32))
    except (KeyError, ValueError, OSError) as exc:
        raise PolicyCardError(f"policy {directory}: {exc}") from None
    if net.n_in != len(expected_features) or net.n_out != len(expected_actions):
        raise PolicyCardError(f"policy {directory}: the network maps {net.n_in} features to {net.n_out} actions; "
                              f"the card's schema has {len(expected_features)} features and {len(expected_actions)} actions")
    tick_ms = float(space.get("idle_tick_ms", 1.0))
    if not tick_ms > 0:
        raise PolicyCardError(f"policy card {card_path}: idle_tick_ms = {tick_ms!r}: expected milliseconds > 0")
    return LoadedPolicy(card, net, tuple(card_lanes), tuple(buckets), tick_ms / 1000.0, directory)


def write_policy(directory: str | Path, weights: dict[str, np.ndarray], *, lanes: Sequence[str],
                 buckets: Sequence[int], mean: np.ndarray, std: np.ndarray, idle_tick_ms: float,
                 training: dict, weights_file: str = "policy.npz") -> Path:
    """Write ``weights`` and their card into ``directory`` (made if missing); returns the card's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights_path = directory / weights_file
    np.savez_compressed(weights_path, **{k: np.asarray(v, dtype=np.float32) for k, v in weights.items()})
    card = {
        "card_version": CARD_VERSION,
        "feature_schema": {"version": FEATURE_SCHEMA_VERSION, "names": feature_names(lanes)},
        "action_space": {"version": ACTION_SCHEMA_VERSION, "lanes": list(lanes), "buckets": [int(b) for b in buckets],
                         "names": action_names(lanes, buckets), "idle_tick_ms": float(idle_tick_ms)},
        "normalisation": {"mean": [float(x) for x in mean], "std": [float(x) for x in std]},
        "net": {"hidden": [int(weights["w1"].shape[1]), int(weights["w2"].shape[1])], "activation": "relu"},
        "weights": {"file": weights_file, "sha256": sha256_file(weights_path)},
        "training": training,
    }
    card_path = directory / CARD_FILE
    card_path.write_text(json.dumps(card, indent=1) + "\n")
    return card_path


__all__ = ["CARD_VERSION", "CARD_FILE", "PolicyCardError", "LoadedPolicy", "load_policy", "write_policy", "sha256_file"]
