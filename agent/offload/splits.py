"""A model's split points as the offload code needs them: the tensor, and the head and tail files.

The model card owns split points (``ModelCard.split_points``, ``card.split_point(name)``: frozen
``SplitPoint`` objects with ``name``, ``tensor``, ``spec``, ``head_path``, ``tail_path`` and
``verify_head()`` / ``verify_tail()``). A card from before those (split points as plain maps
``{name, onnx_tensor, shape}``) is read here the same way, its head and tail found beside the card
as ``<model>.head.<split>.onnx`` and ``<model>.tail.<split>.onnx``: the offload code asks only
this module, so it reads either.

Which split points an agent loads is its config's (``[offload] splits``; default: every one the
card has): each costs a head or tail session, so a board loads only what it serves or sends.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from agent.models.card import CardError, ModelCard
from agent.models.tensors import TensorSpec


@dataclass(frozen=True)
class _CardSplit:
    """A split point read from a plain card map (the interface of the card's ``SplitPoint``)."""

    name: str
    tensor: str
    spec: TensorSpec
    head_path: Path
    tail_path: Path
    profile: Any = None

    def verify_head(self) -> Path:
        return _exists(self.head_path, self.name, "head")

    def verify_tail(self) -> Path:
        return _exists(self.tail_path, self.name, "tail")


def _exists(path: Path, name: str, part: str) -> Path:
    if not path.is_file():
        raise CardError(f"split point {name!r}: its {part} file {path} does not exist")
    return path


def _from_map(card: ModelCard, entry: Any) -> _CardSplit:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise CardError(f"{card.source}: split_points entry {entry!r}: expected a map with name, onnx_tensor, shape")
    name = entry["name"]
    tensor = str(entry.get("onnx_tensor") or entry.get("tensor") or name)
    shape = entry.get("shape")
    if not isinstance(shape, list) or not shape:
        raise CardError(f"{card.source}: split point {name!r}: shape = {shape!r}: expected [-1, ...]")
    spec = TensorSpec(name=tensor, dtype=np.dtype(entry.get("dtype", "float32")),
                      shape=(None, *(int(d) for d in shape[1:])))
    base = card.source.parent
    return _CardSplit(name, tensor, spec, base / f"{card.name}.head.{name}.onnx", base / f"{card.name}.tail.{name}.onnx",
                      entry.get("profile"))


def split_points(card: ModelCard) -> list:
    """Every split point of ``card`` (``SplitPoint`` objects, or read from the card's maps)."""
    return [_from_map(card, sp) if isinstance(sp, dict) else sp for sp in card.split_points]


def split_point(card: ModelCard, name: str):
    """The split point ``name`` of ``card``; ``CardError`` listing the card's when it has none so named."""
    for sp in split_points(card):
        if sp.name == name:
            return sp
    raise CardError(f"model {card.name!r} has no split point {name!r}; its card {card.source} lists "
                    f"{[sp.name for sp in split_points(card)]}")


def chosen(card: ModelCard, names: Iterable[str] | None) -> list:
    """The split points of ``card`` a config names (``None``: all of them), those it lacks skipped."""
    points = split_points(card)
    if names is None:
        return points
    wanted = set(names)
    return [sp for sp in points if sp.name in wanted]


def lane_name(model: str, split: str | None) -> str:
    """The scheduler lane a peer runs a tail in: ``<model>@<split>``; the model's own lane for a
    whole model (full offload)."""
    return model if split is None else f"{model}@{split}"


__all__ = ["split_points", "split_point", "chosen", "lane_name"]
