#!/usr/bin/env bash
# Set up tierd in ./.venv on a fresh machine: the one step `make demo` and `make check` run first.
#
# What is installed is exactly requirements.lock (every package at one version, hashes checked), so a
# release upstream cannot change what a fresh clone runs; `make lock` refreshes it deliberately.
# torch is the exception, because its build depends on the machine: an already-installed torch (a
# CUDA build on a GPU machine) is kept, as the venv sees the system's packages; only where none is
# importable is the version in scripts/torch.pin installed (here the CPU build, found in the
# machine's wheel folder).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV (with access to the system's packages, so an installed torch is kept)"
  "$PY" -m venv --system-site-packages "$VENV"
fi
# The remote tier's tests run a real Redis Cluster on loopback: redis-server and redis-cli (redis-tools)
# come from the system's package manager (Debian here; CI runs as root), installed only when missing.
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
  if command -v apt-get >/dev/null; then
    SUDO=()
    [ "$(id -u)" = 0 ] || SUDO=(sudo)
    echo "setup: installing redis-server and redis-tools with apt-get (the remote tier's tests need them)"
    "${SUDO[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends \
      redis-server redis-tools >/dev/null
  else
    echo "setup: redis-server is missing and there is no apt-get here: install redis-server and" \
      "redis-cli (7.x) with your package manager; the remote tier's tests need them" >&2
    exit 2
  fi
fi
echo "setup: installing the locked dependencies (requirements.lock, hashes checked)"
# -qq: errors only (a machine's pip configuration can warn once per package about its index folders)
"${PIP[@]}" install -qq --require-hashes --no-deps -r requirements.lock
if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: keeping torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
else
  echo "setup: installing $(cat scripts/torch.pin)"
  "${PIP[@]}" install -qq "$(cat scripts/torch.pin)"
fi
echo "setup: installing tierd (editable, no further downloads)"
"${PIP[@]}" install -qq --no-deps --no-build-isolation -e .
"$VENV/bin/python" scripts/check_lock.py requirements.lock
echo "setup: done; tierd $("$VENV/bin/python" -c 'import tierd; print(tierd.__version__)') with:"
"${PIP[@]}" freeze --all 2>/dev/null | grep -iE '^(torch|transformers|numpy)[=@ ]' | sed 's/^/  /'
