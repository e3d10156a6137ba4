#!/usr/bin/env bash
# Build the demo models (agent/models/demo/): make the tools venv if missing, install the
# pinned toolchain (again only when tools/requirements-models.txt changed), then train,
# export and verify with tools/build_models.py, then write the cards' golden outputs
# (tools/golden_outputs.py), then cut their split points (tools/split_models.py). Extra arguments go to build_models.py
# (e.g. --models resnet_digits, --epochs 5, --no-bench). Rerunnable; CPU only.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-tools"
REQ="$ROOT/tools/requirements-models.txt"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.requirements-models.sha256"
want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "== installing $(basename "$REQ") into $VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -r "$REQ"
    echo "$want" > "$stamp"
else
    echo "== $VENV is up to date with $(basename "$REQ")"
fi

# The models named by --models (golden outputs and split points are redone for those only).
models=()
collect=0
for arg in "$@"; do
    case "$arg" in
        --models) collect=1 ;;
        --*) collect=0 ;;
        *) if [ "$collect" = 1 ]; then models+=("$arg"); fi ;;
    esac
done
only=()
if [ "${#models[@]}" -gt 0 ]; then only=(--models "${models[@]}"); fi

cd "$ROOT"
echo "== tools/build_models.py $*"
"$VENV/bin/python" -u tools/build_models.py "$@"
# The build rewrites the cards: put the self-test's golden outputs back, from the new files.
echo "== tools/golden_outputs.py"
"$VENV/bin/python" -u tools/golden_outputs.py "${only[@]}"
# ... and drops their split points: cut them again (the card keeps none, so the tool's defaults).
echo "== tools/split_models.py"
exec "$VENV/bin/python" -u tools/split_models.py "${only[@]}"
