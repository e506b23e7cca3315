#!/usr/bin/env bash
# Set up tierd in ./.venv on a fresh machine: the one step `make demo` and `make check` run first.
#
# torch: an already-installed torch (a CUDA build on a GPU machine) is kept: the venv sees the
# system's packages. Only where none is importable does this install torch==2.13.0, the CPU build,
# instead of letting pip pull a multi-GB CUDA build as a dependency.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV (with access to the system's packages, so an installed torch is kept)"
  "$PY" -m venv --system-site-packages "$VENV"
fi
if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: keeping torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
else
  echo "setup: installing torch==2.13.0 (CPU build)"
  "$VENV/bin/pip" install --quiet "torch==2.13.0"
fi
echo "setup: installing tierd and its test tools"
"$VENV/bin/pip" install --quiet -e ".[test]"
echo "setup: done ($("$VENV/bin/python" -c 'import tierd; print("tierd", tierd.__version__)'))"
