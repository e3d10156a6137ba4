#!/usr/bin/env bash
# One entry point for a fresh Debian machine: installs what is missing, builds, then runs.
#
#   bash tools/dev.sh demo [--duration S] [--load X]   the demo on the embedded default config
#   bash tools/dev.sh test [pytest args]               the whole test suite
#   bash tools/dev.sh setup                            only the set-up (venv, compiled core, mosquitto)
#   bash tools/dev.sh agent ARGS...                    any edge-agent command from the venv
#   bash tools/dev.sh triton [bench args]              edge-agent vs a real Triton (edge-agent bench triton)
#
# Set-up: Debian packages (mosquitto, python3-venv, gcc) when missing, a virtualenv in .venv with
# two editable installs from this tree: the agent with its [dev] extra (which compiles the Cython
# core) and the lab (lab/: benchmarks, Triton harness, demo, test broker) with its [bench] extra.
# It is redone only when pyproject.toml, lab/pyproject.toml, setup.py or _core/ changed since the
# last build. `triton` uses its own virtualenv, .venv-triton: the agent and the lab's [triton]
# extra (nvidia-pytriton pins numpy < 2).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY=${PYTHON:-python3}

say() { printf '[dev.sh] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    say "need root to run: $*"; exit 1; fi
}

apt_install() {
  say "installing Debian packages: $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_system() {
  local missing=()
  command -v "$PY" >/dev/null || missing+=(python3)
  "$PY" -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
  command -v gcc >/dev/null || missing+=(gcc)
  "$PY" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null || missing+=(python3-dev)
  { command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ]; } || missing+=(mosquitto)
  command -v mosquitto_pub >/dev/null || missing+=(mosquitto-clients)
  # The two-board lab (edge_lab.netlab, tests/test_netlab.py): namespaces, veths and tc; nsenter.
  { command -v ip >/dev/null && command -v tc >/dev/null; } || missing+=(iproute2)
  command -v nsenter >/dev/null || missing+=(util-linux)
  if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
}

build_stamp() {
  { cat pyproject.toml lab/pyproject.toml setup.py; find _core -name '*.pyx' -o -name '*.pxd' | sort | xargs cat; } | sha256sum | cut -d' ' -f1
}

ensure_venv() {  # ensure_venv [DIR AGENT_EXTRA LAB_EXTRA]: the agent and the lab installed editable in DIR
  local venv=${1:-$VENV} extra=${2-dev} lab_extra=${3:-bench}
  if [ ! -x "$venv/bin/python" ]; then
    say "creating virtualenv $venv"
    "$PY" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
  fi
  local stamp; stamp=$(build_stamp)
  if [ "$(cat "$venv/.edge-agent-build" 2>/dev/null)" != "$stamp" ] \
     || ! "$venv/bin/python" -c 'import agent.core as c, edge_lab; assert c.IMPLEMENTATION == "compiled"' 2>/dev/null; then
    local agent_spec=.
    [ -z "$extra" ] || agent_spec=".[$extra]"
    say "installing $agent_spec and ./lab[$lab_extra] into $venv, compiling the core (first time: a few minutes)"
    "$venv/bin/pip" install -q -e "$agent_spec" -e "./lab[$lab_extra]"
    echo "$stamp" > "$venv/.edge-agent-build"
  fi
}

cmd=${1:-help}
shift || true
case "$cmd" in
  setup) ensure_system; ensure_venv ;;
  demo)  ensure_system; ensure_venv; exec "$VENV/bin/edge-agent" demo "$@" ;;
  test)  ensure_system; ensure_venv; exec "$VENV/bin/python" -m pytest "$@" ;;
  agent) ensure_system; ensure_venv; exec "$VENV/bin/edge-agent" "$@" ;;
  triton) ensure_system; ensure_venv "$ROOT/.venv-triton" "" triton
          exec "$ROOT/.venv-triton/bin/edge-agent" bench triton "$@" ;;
  *) sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; [ "$cmd" = help ] || exit 2 ;;
esac
