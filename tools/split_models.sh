#!/usr/bin/env bash
# Cut the model cards' split tensors into head/tail ONNX graphs, check them against the full
# model on the test set, time them, and write the split points into the cards
# (tools/split_models.py). Runs in the tools venv (onnx), made by tools/build_models.sh.
# Arguments go to split_models.py (e.g. --models resnet_digits, --keep resnet_digits=stage1,stage2,
# --check).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-tools"
if [ ! -x "$VENV/bin/python" ]; then
    echo "no $VENV: run tools/build_models.sh once (it makes the tools venv), or make it with" >&2
    echo "  python3 -m venv .venv-tools && .venv-tools/bin/pip install -r tools/requirements-models.txt" >&2
    exit 2
fi
cd "$ROOT"
exec "$VENV/bin/python" -u tools/split_models.py "$@"
