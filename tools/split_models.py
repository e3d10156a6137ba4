#!/usr/bin/env python3
"""Cut model cards' candidate split tensors into head and tail ONNX graphs, check and time them,
and write the split points into the cards.

Collaborative offload (issue 23) runs a model's head on the board and its tail on a peer. For every
candidate tensor a card names (``split_points`` and ``split_candidates``), this tool:

1. checks that the tensor is a true single-tensor separator of the graph: everything the model's
   outputs need from before the cut flows through it. A tensor inside a residual block is not one
   (the skip connection crosses the cut); ``onnx.utils.extract_model`` would fail there with a
   misleading "not topologically sorted" error, so the check runs first and names the crossing
   tensor;
2. cuts a head graph (the model's inputs, same names -> the tensor, named as ``onnx_tensor``) and a
   tail graph (the tensor, float32 ``[N, ...]`` -> the model's outputs, same names), both with the
   model's dynamic batch dimension;
3. runs head then tail on the card's whole test set with onnxruntime (through the agent's own
   backend) and needs the full model's outputs within ``--atol`` and the same top-1 everywhere;
4. times head, tail and the full model per batch size (1, 2, 4, 8) with one intra-op thread and
   spinning off (the agent's session options), taking turns round by round so that a burst of
   CPU stolen by other tenants hits all three alike; the figure is the median, in ms per batch;
5. keeps the chosen points (``--keep``, else those the card already ships, else the tool's
   defaults), writes ``<model>.head.<split>.onnx`` / ``<model>.tail.<split>.onnx`` beside the card,
   and rewrites the card's ``split_points`` (name, onnx_tensor, shape, dtype, bytes_per_item,
   head/tail path, sha256, bytes, profile) and ``split_candidates`` (every candidate: shipped, not
   shipped, or rejected, with the reason and, where it could be cut, its figures).

Needs onnx (the tools venv, ``tools/build_models.sh`` makes it); the agent reads the result with
numpy and onnxruntime only (``agent.models.card.SplitPoint``).

    tools/split_models.sh [--models resnet_digits ...] [--keep resnet_digits=stage2,stage3] [--check]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.models.card import DEMO_DIR, demo_model_names, load_card, resolve_card_path  # noqa: E402
from agent.models.digits import card_test_set  # noqa: E402
from agent.models.tensors import TensorSpec  # noqa: E402

BATCH_SIZES = (1, 2, 4, 8)
#: Split points shipped when neither --keep nor the card says (why: the card's ``split_notes``).
DEFAULT_KEEP = {
    "resnet_digits": ["stage1", "stage2"],
    "mobilenet_digits": ["stage2", "stage3"],
    "camera_digits": ["stage2", "stage3"],
}


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------
# the separator check (pure Python over node lists, so that it is testable without onnx)
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Node:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Cut:
    """Node indices of the head (inputs -> tensor) and of the tail (tensor -> outputs)."""

    head: list[int]
    tail: list[int]


def _ancestors(nodes: Sequence[Node], producer: dict[str, int], targets: Iterable[str], stop: set[str]) -> set[int]:
    seen: set[int] = set()
    stack = [t for t in targets if t not in stop]
    visited: set[str] = set()
    while stack:
        tensor = stack.pop()
        if tensor in visited:
            continue
        visited.add(tensor)
        index = producer.get(tensor)
        if index is None or index in seen:
            continue
        seen.add(index)
        stack.extend(i for i in nodes[index].inputs if i and i not in stop)
    return seen


def find_cut(nodes: Sequence[Node], graph_inputs: Sequence[str], graph_outputs: Sequence[str],
             tensor: str) -> Cut | str:
    """The head and tail of a cut at ``tensor``, or why ``tensor`` is not a single-tensor separator.

    ``graph_inputs`` are the model's runtime inputs (initializers are not inputs here). The cut is
    valid when the tail (everything the outputs need, stopping at ``tensor``) shares no node with the
    head (everything ``tensor`` needs) and needs no model input itself.
    """
    producer: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for out in node.outputs:
            producer[out] = index
    if tensor in graph_outputs:
        return f"{tensor!r} is an output of the model: there is no tail after it"
    if tensor not in producer:
        if tensor in graph_inputs:
            return f"{tensor!r} is an input of the model: there is no head before it"
        return f"no node produces a tensor named {tensor!r}"
    head = _ancestors(nodes, producer, [tensor], stop=set(graph_inputs))
    tail = _ancestors(nodes, producer, graph_outputs, stop={tensor, *graph_inputs})
    head_tensors = {out for i in head for out in nodes[i].outputs}
    crossing: list[tuple[str, str]] = []
    for index in sorted(tail - head):
        for name in nodes[index].inputs:
            if name != tensor and name in head_tensors:
                crossing.append((name, nodes[index].name))
    if crossing:
        shown = "; ".join(f"{t!r} (made before the cut) feeds node {n!r} after it" for t, n in crossing[:3])
        more = f" and {len(crossing) - 3} more" if len(crossing) > 3 else ""
        return (f"{tensor!r} does not separate the graph: {shown}{more} (a residual/skip connection "
                "crosses the cut; cut between blocks instead)")
    needs_input = sorted({i for index in tail for i in nodes[index].inputs if i in graph_inputs})
    if needs_input:
        return f"the tail after {tensor!r} also needs the model input(s) {needs_input}"
    if tail & head:
        return f"the model's outputs are computed partly before {tensor!r} ({len(tail & head)} nodes on both sides)"
    if not _ancestors(nodes, producer, graph_outputs, stop={*graph_inputs}) >= head:
        return f"{tensor!r} does not lead to the model's outputs"
    return Cut(head=sorted(head), tail=sorted(tail))


# --------------------------------------------------------------------------------------
# cutting (onnx)
# --------------------------------------------------------------------------------------

def onnx_nodes(graph) -> list[Node]:
    import onnx

    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise RuntimeError(f"node {node.name!r} ({node.op_type}) has a subgraph: not supported by this tool")
    return [Node(n.name or f"#{i} {n.op_type}", tuple(n.input), tuple(n.output)) for i, n in enumerate(graph.node)]


def runtime_inputs(graph) -> list[str]:
    constants = {t.name for t in graph.initializer}
    return [i.name for i in graph.input if i.name not in constants]


def batch_dim_param(graph) -> str:
    """The symbolic name of the model input's batch dimension (the cut graphs keep it)."""
    dim = graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_param or "N"


def subgraph(model, indices: list[int], inputs, outputs, model_name: str, part: str, doc: str):
    """A checked ModelProto of ``model``'s nodes ``indices`` with the given input and output value
    infos: its initializers, value infos, opsets and functions (what a head, tail or exit stage is)."""
    import onnx
    from onnx import helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    value_info = {v.name: v for v in g.value_info}
    boundary = {v.name for v in inputs} | {v.name for v in outputs}
    nodes = [g.node[i] for i in indices]
    used = {name for n in nodes for name in n.input}
    produced = {name for n in nodes for name in n.output}
    graph = helper.make_graph(
        nodes, f"{g.name or model_name}_{part}", inputs, outputs,
        initializer=[inits[name] for name in sorted(used) if name in inits],
        value_info=[value_info[name] for name in sorted(produced) if name in value_info and name not in boundary],
    )
    proto = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="tools/split_models.py",
                              doc_string=doc)
    proto.ir_version = model.ir_version
    proto.functions.extend(model.functions)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def boundary_info(graph, tensor: str, shape: Sequence[int]):
    """The value info of a cut tensor: float32 ``[N, ...]`` with the model's batch dimension."""
    import onnx
    from onnx import helper

    return helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT,
                                         [batch_dim_param(graph), *[int(d) for d in shape[1:]]])


def cut_graph(model, cut: Cut, tensor: str, shape: Sequence[int], model_name: str, split: str):
    """The head and tail ModelProtos of a valid cut; the boundary tensor float32 [N, ...]."""
    g = model.graph
    boundary = boundary_info(g, tensor, shape)
    runtime = set(runtime_inputs(g))
    # every model input, same names (a head that ignores one still takes it)
    head = subgraph(model, cut.head, [i for i in g.input if i.name in runtime], [boundary], model_name,
                    f"head_{split}", f"{model_name}: head of the cut at {tensor!r} (split {split!r})")
    tail = subgraph(model, cut.tail, [boundary], list(g.output), model_name,
                    f"tail_{split}", f"{model_name}: tail of the cut at {tensor!r} (split {split!r})")
    return head, tail


def cut_exit_stages(model, exit_outputs: Sequence[str], boundaries: Sequence[tuple[str, Sequence[int]]],
                    model_name: str) -> list:
    """Cut a multi-exit model into stages that continue one another (early exit, issue 24).

    ``exit_outputs`` are the model's exit logits, earliest first; ``boundaries`` the feature tensors
    (name, shape) after which exits 1..k-1 branch off, one fewer than the exits. Stage 1 takes the
    model's inputs and gives (exit 1's logits, boundary 1); stage k takes boundary k-1 and gives (exit
    k's logits, boundary k); the last stage gives the last exit's logits. Each boundary must be a
    single-tensor separator of what comes after it (:func:`find_cut`), so a stage needs nothing from
    before its input; the error names the tensor that crosses."""
    g = model.graph
    nodes = onnx_nodes(g)
    inputs = runtime_inputs(g)
    if len(boundaries) != len(exit_outputs) - 1:
        raise ValueError(f"{model_name}: {len(exit_outputs)} exits need {len(exit_outputs) - 1} boundaries, "
                         f"got {len(boundaries)}")
    producer = {out: i for i, node in enumerate(nodes) for out in node.outputs}
    outputs = {o.name: o for o in g.output}
    for name in exit_outputs:
        if name not in outputs:
            raise ValueError(f"{model_name}: {name!r} is not an output of the model; outputs: {sorted(outputs)}")
    for k, (tensor, _) in enumerate(boundaries):
        cut = find_cut(nodes, inputs, list(exit_outputs[k + 1:]), tensor)
        if isinstance(cut, str):
            raise ValueError(f"{model_name}: exit boundary {k + 1} {tensor!r}: {cut}")
    runtime = set(inputs)
    stages = []
    for k, exit_name in enumerate(exit_outputs):
        stop = runtime if k == 0 else {boundaries[k - 1][0]}
        targets = [exit_name] + ([boundaries[k][0]] if k < len(boundaries) else [])
        indices = sorted(_ancestors(nodes, producer, targets, stop=stop))
        needs = {i for j in indices for i in nodes[j].inputs if i and i not in stop and i in producer
                 and producer[i] not in indices} | {i for j in indices for i in nodes[j].inputs if i in runtime
                                                    and i not in stop}
        if needs:
            raise ValueError(f"{model_name}: stage {k + 1} also needs {sorted(needs)} from before its input")
        stage_inputs = [i for i in g.input if i.name in runtime] if k == 0 else [boundary_info(g, *boundaries[k - 1])]
        stage_outputs = [outputs[exit_name]] + ([boundary_info(g, *boundaries[k])] if k < len(boundaries) else [])
        stages.append(subgraph(model, indices, stage_inputs, stage_outputs, model_name, f"stage{k + 1}",
                               f"{model_name}: exit stage {k + 1} ({[v.name for v in stage_inputs]} -> "
                               f"{[v.name for v in stage_outputs]})"))
    return stages


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------
# checking and timing (onnxruntime through the agent's backend)
# --------------------------------------------------------------------------------------

def load(path: Path, threads: int):
    from agent.backends import load_backend

    return load_backend("onnxruntime", path, threads=threads, providers=["CPUExecutionProvider"])


def run_batched(backend, name: str, x: np.ndarray, batch: int = 64) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(x), batch):
        for key, value in backend.run({name: np.ascontiguousarray(x[i:i + batch])}).items():
            parts.setdefault(key, []).append(value)
    return {key: np.concatenate(values) for key, values in parts.items()}


def verify(full_out: dict[str, np.ndarray], head_path: Path, tail_path: Path, input_name: str, tensor: str,
           frames: np.ndarray, threads: int) -> tuple[float, int]:
    """Head then tail on the whole test set vs the full model: (max |diff|, items whose top-1 differs)."""
    head, tail = load(head_path, threads), load(tail_path, threads)
    try:
        mid = run_batched(head, input_name, frames)[tensor]
        out = run_batched(tail, tensor, mid)
    finally:
        head.close()
        tail.close()
    worst, flips = 0.0, 0
    for key, expected in full_out.items():
        worst = max(worst, float(np.abs(out[key] - expected).max()))
        if expected.ndim == 2:
            flips += int((out[key].argmax(1) != expected.argmax(1)).sum())
    return worst, flips


def profile(paths: dict[str, Path], specs: dict[str, Sequence[TensorSpec]], sizes: Sequence[int],
            rounds: int, warmup: int) -> dict[str, list[float]]:
    """Median ms per batch of each graph per batch size, one thread, spinning off (the agent's
    session options); the graphs take turns, one run each per round."""
    from agent.profiler.measure import time_runs, zeros_batch

    backends = {key: load(path, threads=1) for key, path in paths.items()}
    result: dict[str, list[float]] = {key: [] for key in paths}
    try:
        for b in sizes:
            batches = {key: zeros_batch(specs[key], b) for key in paths}
            for key in paths:
                time_runs(backends[key], batches[key], repeats=0, warmup=warmup)
            samples: dict[str, list[float]] = {key: [] for key in paths}
            for _ in range(rounds):
                for key in paths:
                    samples[key] += time_runs(backends[key], batches[key], repeats=1, warmup=0)
            for key in paths:
                result[key].append(round(float(np.median(samples[key])) * 1e3, 4))
    finally:
        for backend in backends.values():
            backend.close()
    return result


def cpu_model() -> str:
    """The CPU's model string, as ``edge-agent profile`` records it (agent.profiler.run needs the
    agent's MQTT dependencies, which the tools venv does not have)."""
    import platform

    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware")) and ":" in line:
                    value = line.split(":", 1)[1].strip()
                    if value:
                        return value
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


# --------------------------------------------------------------------------------------
# the card
# --------------------------------------------------------------------------------------

def dump_card(raw: dict) -> str:
    """The card as the build writes it (indent 2), with golden rows and profile series on one line
    each (as tools/golden_outputs.py writes the golden rows)."""
    compact: list[list] = []

    def mark(value: list) -> str:
        compact.append(value)
        return f"@@compact-{len(compact) - 1}@@"

    data = json.loads(json.dumps(raw))
    golden = data.get("golden")
    if isinstance(golden, dict):
        inputs = golden.get("inputs")
        if isinstance(inputs, dict) and isinstance(inputs.get("indices"), list):
            inputs["indices"] = mark(inputs["indices"])
        for key, rows in (golden.get("outputs") or {}).items():
            golden["outputs"][key] = [mark(r) if isinstance(r, list) else r for r in rows]
    for section in ("split_points", "split_candidates"):
        for entry in data.get(section) or []:
            for key in ("shape",):
                if isinstance(entry.get(key), list):
                    entry[key] = mark(entry[key])
            prof = entry.get("profile")
            if isinstance(prof, dict):
                for key, value in prof.items():
                    if isinstance(value, list):
                        prof[key] = mark(value)
    text = json.dumps(data, indent=2)
    for i, value in enumerate(compact):
        text = text.replace(json.dumps(f"@@compact-{i}@@"), json.dumps(value))
    return text + "\n"


def candidates_of(raw: dict) -> list[dict]:
    """Every candidate the card names, in order, once: shipped split points, then the others."""
    seen: dict[str, dict] = {}
    for entry in list(raw.get("split_points") or []) + list(raw.get("split_candidates") or []):
        if entry["name"] not in seen:
            seen[entry["name"]] = {"name": entry["name"], "onnx_tensor": entry["onnx_tensor"],
                                   "shape": list(entry["shape"])}
    order = {}
    for i, entry in enumerate(raw.get("split_candidates") or []):
        order[entry["name"]] = i
    return sorted(seen.values(), key=lambda e: order.get(e["name"], -1)) if order else list(seen.values())


def split_model(card_ref: str, keep: list[str] | None, args: argparse.Namespace) -> dict:
    import onnx

    path = resolve_card_path(card_ref)
    raw = json.loads(path.read_text())
    name = raw["name"]
    candidates = candidates_of(raw)
    if not candidates:
        log(f"{name}: the card names no split tensors; skipped")
        return raw
    if keep is None:
        keep = [e["name"] for e in raw.get("split_points") or [] if "head" in e] or DEFAULT_KEEP.get(name)
    if keep is None:
        keep = [c["name"] for c in candidates]
    unknown = sorted(set(keep) - {c["name"] for c in candidates})
    if unknown:
        raise SystemExit(f"{name}: --keep names {unknown}, the card's candidates are {[c['name'] for c in candidates]}")
    model_path = (path.parent / raw["files"]["onnx"]["path"]).resolve()
    model = onnx.load(str(model_path))
    graph = model.graph
    nodes = onnx_nodes(graph)
    inputs, outputs = runtime_inputs(graph), [o.name for o in graph.output]
    if len(inputs) != 1:
        raise SystemExit(f"{name}: {len(inputs)} runtime inputs; the test set fills one")
    card = load_card_quietly(path, raw)
    frames, labels = card_test_set(raw["dataset"], path.parent)
    full = load(model_path, threads=args.threads)
    try:
        full_out = run_batched(full, inputs[0], frames)
    finally:
        full.close()
    full_acc = float((full_out[outputs[0]].argmax(1) == labels).mean())
    in_bytes = sum(int(np.prod(s.item_shape())) * s.dtype.itemsize for s in card.inputs)
    log(f"{name}: {len(nodes)} nodes, test set {len(labels)} items (full model top-1 {full_acc:.4f}), "
        f"input {in_bytes} B/item; candidates {[c['name'] for c in candidates]}, shipping {keep}")

    points, report = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for cand in candidates:
            split, tensor, shape = cand["name"], cand["onnx_tensor"], cand["shape"]
            per_item = int(np.prod(shape[1:])) * 4
            entry = {"name": split, "onnx_tensor": tensor, "shape": shape, "dtype": "float32",
                     "bytes_per_item": per_item}
            cut = find_cut(nodes, inputs, outputs, tensor)
            if isinstance(cut, str):
                log(f"  {split:10s} REJECTED: {cut}")
                report.append(dict(entry, verdict="rejected", reason=cut))
                if split in keep:
                    raise SystemExit(f"{name}: --keep names {split!r}, which cannot be cut: {cut}")
                continue
            shipped = split in keep
            where = path.parent if shipped and not args.check else Path(tmp)
            head_path = where / f"{name}.head.{split}.onnx"
            tail_path = where / f"{name}.tail.{split}.onnx"
            head, tail = cut_graph(model, cut, tensor, shape, name, split)
            head_path.write_bytes(head.SerializeToString())
            tail_path.write_bytes(tail.SerializeToString())
            diff, flips = verify(full_out, head_path, tail_path, inputs[0], tensor, frames, args.threads)
            if diff > args.atol or flips:
                raise SystemExit(f"{name}: split {split!r}: head then tail differs from the full model by {diff:.3g} "
                                 f"(atol {args.atol:g}), top-1 differs on {flips} of {len(labels)} items")
            spec = {"head": card.inputs, "tail": (TensorSpec(tensor, np.float32, (None, *shape[1:])),),
                    "full": card.inputs}
            times = profile({"head": head_path, "tail": tail_path, "full": model_path}, spec,
                            args.batch_sizes, args.rounds, args.warmup)
            prof = {"host": cpu_model(), "batch_sizes": list(args.batch_sizes), "head_ms": times["head"],
                    "tail_ms": times["tail"], "full_ms": times["full"]}
            b1 = args.batch_sizes.index(1) if 1 in args.batch_sizes else 0
            share = times["head"][b1] / max(times["head"][b1] + times["tail"][b1], 1e-9)
            log(f"  {split:10s} {tensor:12s} {str(shape):20s} {per_item:7d} B/item ({per_item / in_bytes:5.2f}x input)  "
                f"head {times['head']} tail {times['tail']} full {times['full']} ms  (head {share:.0%} at b="
                f"{args.batch_sizes[b1]}); max|diff| {diff:.2e}  {'SHIPPED' if shipped else 'not shipped'}")
            figures = {"head_ms": times["head"], "tail_ms": times["tail"], "max_abs_diff": float(f"{diff:.3g}")}
            report.append(dict(entry, verdict="shipped" if shipped else "not shipped",
                               head_bytes=head_path.stat().st_size, tail_bytes=tail_path.stat().st_size,
                               head_share_b1=round(share, 3), **figures))
            if shipped:
                points.append(dict(entry,
                                   head={"path": head_path.name, "sha256": sha256(head_path),
                                         "bytes": head_path.stat().st_size},
                                   tail={"path": tail_path.name, "sha256": sha256(tail_path),
                                         "bytes": tail_path.stat().st_size},
                                   profile=prof, max_abs_diff_vs_full=float(f"{diff:.3g}")))
    if args.check:
        return raw
    for stale in path.parent.glob(f"{name}.head.*.onnx"):
        if stale.name.split(".")[2] not in keep:
            stale.unlink()
    for stale in path.parent.glob(f"{name}.tail.*.onnx"):
        if stale.name.split(".")[2] not in keep:
            stale.unlink()
    raw["split_points"] = [p for k in keep for p in points if p["name"] == k]
    raw["split_candidates"] = [{"name": r["name"], "onnx_tensor": r["onnx_tensor"], "shape": r["shape"],
                                "bytes_per_item": r["bytes_per_item"], "verdict": r["verdict"],
                                **({"reason": r["reason"]} if "reason" in r else {}),
                                **({"profile": {"batch_sizes": list(args.batch_sizes), "head_ms": r["head_ms"],
                                                "tail_ms": r["tail_ms"]}} if "head_ms" in r else {})}
                               for r in report]
    raw["split_method"] = (
        "tools/split_models.py: each candidate checked as a single-tensor separator, cut into head (inputs -> "
        "tensor) and tail (tensor float32 [N,...] -> outputs) with the model's dynamic batch; head then tail "
        f"equals the full model on the whole test set ({len(labels)} items, atol {args.atol:g}, same top-1); times are "
        f"onnxruntime CPU, 1 intra-op thread, spinning off, zero inputs, median of {args.rounds} runs per batch "
        "(head, tail and full taking turns), ms per batch")
    if args.notes.get(name):
        raw["split_notes"] = args.notes[name]
    path.write_text(dump_card(raw))
    load_card(path)  # what the agent reads must load
    for point in load_card(path).split_points:
        point.verify_head()
        point.verify_tail()
    log(f"  wrote {path.name}: split_points {keep}")
    return raw


def load_card_quietly(path: Path, raw: dict):
    """The card's interface (inputs, outputs) even while its split_points are old-style candidates."""
    from agent.models import card as card_module

    stripped = dict(raw)
    stripped.pop("split_points", None)
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=path.parent, delete=False) as fh:
        fh.write(json.dumps(stripped))
    try:
        return card_module.load_card(fh.name)
    finally:
        os.unlink(fh.name)


def parse_keep(items: list[str]) -> dict[str, list[str]]:
    keep: dict[str, list[str]] = {}
    for item in items:
        model, sep, names = item.partition("=")
        if not sep or not names:
            raise SystemExit(f"--keep {item!r}: expected MODEL=split[,split...]")
        keep[model] = [n for n in names.split(",") if n]
    return keep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=None,
                        help="demo model names or card paths (default: every demo card with split tensors)")
    parser.add_argument("--keep", nargs="*", default=[], metavar="MODEL=SPLIT,...",
                        help="split points to ship (default: those the card ships, else the tool's defaults)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    parser.add_argument("--rounds", type=int, default=40, help="timed runs per graph and batch size (default 40)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="threads for the accuracy check (timing uses 1)")
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--check", action="store_true", help="cut, check and time in a temporary folder; write nothing")
    args = parser.parse_args(argv)
    args.notes = NOTES
    keep = parse_keep(args.keep)
    refs = args.models if args.models is not None else demo_model_names()
    for ref in refs:
        card_ref = ref if (ref.endswith(".json") or "/" in ref or ref.startswith("demo:")) else f"demo:{ref}"
        raw = json.loads(resolve_card_path(card_ref).read_text())
        if not (raw.get("split_points") or raw.get("split_candidates")):
            continue
        split_model(card_ref, keep.get(raw["name"]), args)
    return 0


#: Why each model ships the split points it does (written into the card's ``split_notes``).
NOTES: dict[str, str] = {
    "resnet_digits": (
        "Shipped: stage1 and stage2, the two cuts that leave a peer a real share of the work (about 30% and 13% "
        "of the run at batch 1 on the build host). Not shipped (each head+tail pair costs about the model's 2.3 MB): "
        "stem, whose head is about 2% of the run while its tensor is 10.7x the input, so full offload beats it "
        "on every link; stage3, whose tail is about 1% of the run (a global pool and a linear layer), never worth "
        "sending 24 KB for. Both shipped tensors stay larger than the 12 KB uint8 input even in int8 (48 KB and "
        "16 KB): full offload always sends fewer bytes, so these points serve a peer too busy to take the whole "
        "model, and the mechanics; camera_digits is the model where the split is a real question "
        "(split_candidates holds each candidate's figures)."),
    "mobilenet_digits": (
        "Shipped: stage2 (about half the run on each side at batch 1 on the build host, 32 KB per item) and "
        "stage3 (about 70% head, 12 KB per item, as large as the uint8 input in float32, a quarter of it in "
        "int8). Not shipped (each head+tail pair costs about the model's 1.9 MB): stage1, whose head is about 13% "
        "of the run while its tensor is 8x the input; stage4, whose tail is about 5% of the run "
        "(split_candidates holds each candidate's figures)."),
    "camera_digits": (
        "Shipped: stage2 (about 78% of the run before the cut at batch 1 on the build host; 150 KB per item "
        "in float32, 2x the 75 KB uint8 input, half of it in int8) and stage3 (about 93% before the cut; "
        "62.5 KB per item, 0.83x the input in float32, a fifth of it in int8): the two cuts whose tensor a "
        "codec makes smaller than the input, so that on a slow link a split beats full offload. Not shipped "
        "(each head+tail pair costs about the model's 9.5 MB): stem (4% head, tensor 2.7x the input: full "
        "offload beats it on every link); stage1 (58% head, the even split, but its tensor is 5.3x the input, "
        "1.3x in int8; tools/split_models.sh --keep camera_digits=stage1,stage2,stage3 adds it); stage4 "
        "(its tail, a pool and a linear layer, is under 1% of the run). split_candidates holds each "
        "candidate's figures."),
}


if __name__ == "__main__":
    sys.exit(main())
