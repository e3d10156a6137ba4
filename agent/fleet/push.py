"""Pushing a written plan to boards that already run an agent, with signed control commands.

``edge-agent plan`` writes one agent config per board (``OUT/configs/<board>.toml``); a fleet that
runs agents already need not restart them. Per board, the plan's models are made the board's
models with the command channel's model commands (``agent.ops.commands``), after a ``status``
that says what the board serves now:

1. ``unload-model`` each model the board serves that the plan does not give it (its queue is served
   first), unless ``keep_others``: a board the plan leaves empty (``report.json``) loses every model;
2. a model in both whose ``instances`` differ from the plan's: ``unload-model`` then ``load-model``
   (instances are fixed when a model loads);
3. a model in both: ``set-batching`` with the plan's table when the rule or ``max_batch`` differ,
   and ``set-slo-default`` when the default SLO differs (both change a serving lane in place);
4. ``load-model`` (the config's ``[[models]]`` table) for each model the board lacks.

Unloads go first so that a board's memory and slots are free for what it loads. A board that does
not answer ``status`` is skipped and reported; a refused step is reported with its ack and the
board's later steps still run (each command is all or nothing on the board). Commands are sent by a
``send(device, command, args) -> ack | None`` callable (the CLI's signs and publishes with
``agent.ops.ctl.send_command``), so the order of steps is plain to read and to test.
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = ["Step", "BoardPush", "planned_boards", "push_plan"]

#: ``send(device, command, args)``: the board's ack (a dict with ``ok``), or None when none came.
Send = Callable[[str, str, dict], "dict | None"]


@dataclass
class Step:
    device: str
    command: str
    args: dict
    ack: dict | None

    @property
    def ok(self) -> bool:
        return bool(self.ack and self.ack.get("ok"))

    def line(self) -> str:
        shown = {k: v for k, v in self.args.items() if k != "batching"} if self.command == "load-model" else self.args
        if self.ack is None:
            outcome = "no acknowledgement"
        elif self.ok:
            outcome = "ok"
        else:
            outcome = f"refused {self.ack.get('code')}: {self.ack.get('reason')}"
        return f"{self.device}: {self.command} {json.dumps(shown, sort_keys=True)} -> {outcome}"


@dataclass
class BoardPush:
    device: str
    reached: bool = False
    steps: list[Step] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.reached and all(s.ok for s in self.steps)


def planned_boards(plan_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Board name -> the ``[[models]]`` tables the plan gives it: one per ``configs/*.toml``, and
    an empty list for each board of the chosen plan that hosts nothing (from ``report.json``, when
    it is there). Raises ``ValueError`` naming the file for a plan directory that is not one."""
    plan_dir = Path(plan_dir)
    configs = plan_dir / "configs"
    if not configs.is_dir():
        raise ValueError(f"{plan_dir}: not a plan directory (no configs/; write one with edge-agent plan --out)")
    boards: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(configs.glob("*.toml")):
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"{path}: {exc}") from None
        device = (data.get("agent") or {}).get("device")
        if device != path.stem or not isinstance(data.get("models"), list):
            raise ValueError(f"{path}: expected an agent config of board {path.stem!r} with [[models]] "
                             f"(as edge-agent plan writes it)")
        boards[device] = data["models"]
    report = plan_dir / "report.json"
    if report.exists():
        try:
            data = json.loads(report.read_text())
            chosen = data["methods"][data["chosen"]]["boards"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{report}: not edge-agent plan's report ({exc!r})") from None
        for device, apps in chosen.items():
            if not apps:
                boards.setdefault(device, [])
    return boards


def _steps_for(serving: dict[str, dict], planned: list[dict[str, Any]], keep_others: bool) -> list[tuple[str, dict]]:
    """The commands that make a board serving ``serving`` (its status's ``models``) serve ``planned``."""
    wanted = {m["name"]: m for m in planned}
    unloads, changes, loads = [], [], []
    for name in sorted(serving):
        if name not in wanted and not keep_others:
            unloads.append(("unload-model", {"model": name}))
    for name, table in sorted(wanted.items()):
        now = serving.get(name)
        if now is None:
            loads.append(("load-model", dict(table)))
            continue
        if int(now.get("instances", -1)) != int(table.get("instances", 1)):
            unloads.append(("unload-model", {"model": name}))
            loads.append(("load-model", dict(table)))
            continue
        batching = table.get("batching", {})
        live = now.get("batching", {})
        if live.get("rule") != batching.get("rule") or live.get("max_batch") != batching.get("max_batch"):
            changes.append(("set-batching", {"model": name, **batching}))
        slo = table.get("default_slo_ms")
        if slo is not None and now.get("default_slo_ms") != slo:
            changes.append(("set-slo-default", {"model": name, "slo_ms": slo}))
    return unloads + changes + loads


def push_plan(plan_dir: str | Path, send: Send, *, devices: list[str] | None = None, keep_others: bool = False,
              progress: Callable[[str], None] | None = None) -> list[BoardPush]:
    """Make each board of the plan (``devices``: only these) serve what the plan gives it (module
    docstring). Returns one :class:`BoardPush` per board, in name order."""
    boards = planned_boards(plan_dir)
    if devices:
        unknown = sorted(set(devices) - set(boards))
        if unknown:
            raise ValueError(f"boards {unknown} are not in the plan {plan_dir} (it has {sorted(boards)})")
        boards = {d: boards[d] for d in devices}
    results = []
    for device in sorted(boards):
        push = BoardPush(device)
        results.append(push)
        status = send(device, "status", {})
        if not status or not status.get("ok") or not isinstance((status.get("result") or {}).get("models"), dict):
            push.steps.append(Step(device, "status", {}, status))
            if progress:
                progress(push.steps[-1].line() + " (skipped: the board's models are not known)")
            continue
        push.reached = True
        for command, args in _steps_for(status["result"]["models"], boards[device], keep_others):
            step = Step(device, command, args, send(device, command, args))
            push.steps.append(step)
            if progress:
                progress(step.line())
        if progress and not push.steps:
            progress(f"{device}: serves the plan's models already")
    return results
