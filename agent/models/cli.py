"""``edge-agent model add FILE.onnx|.tflite``: write a model's card from the file and print the
``[[models]]`` table that serves it (:mod:`agent.models.add`). Heavy imports happen in the handler,
so ``edge-agent --help`` stays fast."""
from __future__ import annotations

import argparse
import sys

__all__ = ["add_model_parser"]


def _cmd_model_add(args: argparse.Namespace) -> int:
    from agent.models.add import AddError, add_model
    try:
        added = add_model(args.file, out=args.out, name=args.name, force=args.force)
    except AddError as exc:
        print(f"edge-agent model add: {exc}", file=sys.stderr)
        return 2
    print(f"# wrote {added.card_path}: {len(added.inputs)} input(s) "
          f"{', '.join(str(s) for s in added.inputs)}; output(s) {', '.join(str(s) for s in added.outputs)}; "
          f"sha256 {added.sha256[:12]}...", file=sys.stderr)
    print("# paste into your config (edge-agent run --config FILE):", file=sys.stderr)
    print(added.models_table(), flush=True)
    return 0


def add_model_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``model`` command (``model add``) to an ``add_subparsers()`` object; returns its parser."""
    parser = subparsers.add_parser("model", help="bring your own model: `model add FILE.onnx|.tflite`",
                                   description="Bring your own model to the agent.")
    commands = parser.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")
    add = commands.add_parser(
        "add", help="write a model card from an ONNX or .tflite file and print its [[models]] table",
        description="Load FILE with the backend the agent serves it with (onnxruntime for .onnx, LiteRT for "
                    ".tflite), read its inputs and outputs, time a batch of 1 and a full batch, and write its "
                    "model card (inputs, outputs, sha256, the chosen defaults) as FILE.json beside it, or --out. "
                    "Prints the [[models]] table to paste into a config on stdout. The batch dimension must be "
                    "the first and may be dynamic; every other dimension must be fixed.")
    add.add_argument("file", metavar="FILE", help="the model: .onnx or .tflite")
    add.add_argument("--out", metavar="CARD", help="where to write the card (default: FILE with .json)")
    add.add_argument("--name", help="the model's name in requests (default: the file's name without suffix)")
    add.add_argument("--force", action="store_true", help="replace an existing card")
    add.set_defaults(func=_cmd_model_add)
    return parser
