#!/usr/bin/env python3
"""Write golden outputs into the demo model cards (their ``golden`` field), for the self-test.

For each card: the first ``--count`` digits of the shipped test split (``digits_test.npz``, as
frames), run through the reference file (the ONNX one) on onnxruntime's CPU provider; the logits
are stored rounded to ``--decimals`` places. Each file variant gets a tolerance the self-test
holds it to on any board:

* ``onnx`` and ``tflite`` (float32): ``atol`` 1e-3 and the same top-1. The float files agree with
  each other to about 2e-6 here; the margin covers other CPUs' kernels, the rounding, and a frame
  pixel that rounds the other way on another BLAS.
* ``tflite_int8``: ``atol`` 0.5 and the same top-1. Int8 logits sit up to 0.13 from the float
  ones on the whole test split (the card's ``max_abs_diff_vs_torch``); 0.5 allows another CPU's
  int8 kernels a few quantisation steps, while a broken file misses by whole logits (the top-1
  margins of these inputs are 2.7 to 5.8).

The script also prints, per variant, the largest difference it measured on this machine, so the
tolerances can be checked against what the files really do. Rerun it after
``tools/build_models.py`` (``tools/build_models.sh`` does): the build rewrites the cards.

    .venv/bin/python tools/golden_outputs.py [--models mobilenet_digits ...] [--check]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.backends import load_backend  # noqa: E402
from agent.models.card import DEMO_DIR, demo_model_names, golden_input_digest, load_card, make_inputs  # noqa: E402

REFERENCE = "onnx"
TOLERANCE = {
    "onnx": {"atol": 1e-3, "top1": True},
    "tflite": {"atol": 1e-3, "top1": True},
    "tflite_int8": {"atol": 0.5, "top1": True},
}
NOTE = ("outputs of the reference file on onnxruntime (CPU) for the inputs, rounded; the self-test "
        "runs the configured file on the configured backend and needs every value within the "
        "variant's atol and, with top1, the same arg-max per item (tools/golden_outputs.py)")


def _placeholder(i: int) -> str:
    return f"@@golden-row-{i}@@"


def write_card(path: Path, card: dict, rows: list[list]) -> None:
    """The card as the build writes it (indent 2), except one line per golden list (``rows``)."""
    text = json.dumps(card, indent=2)
    for i, row in enumerate(rows):
        text = text.replace(json.dumps(_placeholder(i)), json.dumps(row))
    path.write_text(text + "\n")


def golden_for(name: str, count: int, decimals: int) -> tuple[dict, list[list], dict[str, float]]:
    """The golden entry for one demo model, its rows, and the measured max |diff| per variant."""
    card = load_card(f"demo:{name}")
    raw = json.loads(card.source.read_text())
    raw.pop("golden", None)
    inputs_spec = {"dataset": "digits_test.npz", "array": "images", "indices": list(range(count)),
                   "preprocess": "digits_frames"}
    dataset = raw.get("dataset", {})
    if dataset.get("preprocess") == "agent.models.digits.camera_frames":     # the camera-sized model
        inputs_spec.update(preprocess="camera_frames", seed=dataset["seed"],
                           frame_size=dataset.get("frame_size", 160))
    batch = make_inputs(inputs_spec, card.inputs, card.source.parent)
    reference = load_backend("onnxruntime", card.verify_file(REFERENCE), providers=["CPUExecutionProvider"]).run(batch)
    measured: dict[str, float] = {}
    for variant in card.files:
        if variant == REFERENCE or variant not in TOLERANCE:
            continue
        try:
            got = load_backend("litert", card.verify_file(variant)).run(batch)
        except Exception as exc:  # noqa: BLE001 - a missing runtime only leaves the figure out
            print(f"  {name}/{variant}: not run ({exc})", file=sys.stderr)
            continue
        measured[variant] = max(float(np.abs(got[k] - reference[k]).max()) for k in reference)
    rows: list[list] = [inputs_spec["indices"]]
    outputs = {}
    for output_name, values in reference.items():
        rounded = np.round(values.astype(np.float64), decimals).reshape(count, -1).tolist()
        outputs[output_name] = []
        for row in rounded:
            outputs[output_name].append(_placeholder(len(rows)))
            rows.append(row)
    raw["golden"] = {
        "note": NOTE,
        "reference": REFERENCE,
        "inputs": dict(inputs_spec, indices=_placeholder(0)),
        "input_sha256": golden_input_digest(batch),
        "outputs": outputs,
        "tolerance": {v: t for v, t in TOLERANCE.items() if v in card.files},
    }
    return raw, rows, measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=demo_model_names(), help="demo models (default: all)")
    parser.add_argument("--count", type=int, default=8, help="test digits per card (default 8)")
    parser.add_argument("--decimals", type=int, default=4, help="decimals kept (default 4)")
    parser.add_argument("--check", action="store_true", help="print the figures, write nothing")
    args = parser.parse_args(argv)
    for name in args.models:
        raw, rows, measured = golden_for(name, args.count, args.decimals)
        figures = ", ".join(f"{v} max |diff| {d:.3g} (atol {TOLERANCE[v]['atol']:g})" for v, d in measured.items())
        print(f"{name}: {args.count} inputs from {raw['golden']['inputs']['dataset']}; {figures}")
        if not args.check:
            write_card(DEMO_DIR / f"{name}.json", raw, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
