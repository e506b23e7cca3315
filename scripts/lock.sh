#!/usr/bin/env bash
# Refresh requirements.lock, the exact set that scripts/setup.sh installs (make lock runs this).
#
# A refresh is deliberate: commit the new lock on its own, so its CI run shows the new versions pass.
# The lock holds every package that tierd and its extras (model, remote, test, bench, gpu) need, each at one version
# with the hashes of its files, for CPython 3.11 on Linux x86-64. The one package it leaves out is torch:
# its build depends on the machine (CPU or CUDA), so setup.sh installs the version in scripts/torch.pin
# only where no torch is importable. torch's own dependencies are resolved against the CPU build of that
# version and are in the lock.
#
# The tool is uv's `pip compile` (the version below, installed into .venv): it resolves and hashes the
# whole set in seconds and writes the plain requirements format that pip installs with --require-hashes.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV"
if [ "$("$VENV/bin/python" -m uv --version 2>/dev/null | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  echo "lock: installing uv==$UV_VERSION into $VENV"
  "$VENV/bin/pip" install --quiet "uv==$UV_VERSION"
fi

torch_pin=$(cat scripts/torch.pin)
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
# Resolve torch's dependencies against its CPU build (the CUDA build on PyPI would pull in the CUDA
# libraries). It lies in the machine's wheel folder where there is one, else on PyTorch's CPU index.
extra=()
if ls "${TORCH_WHEELS:-/opt/wheels}"/torch-"${torch_pin#torch==}"+cpu-*.whl >/dev/null 2>&1; then
  extra+=(--find-links "${TORCH_WHEELS:-/opt/wheels}")
else
  extra+=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
fi
echo "${torch_pin}+cpu" >"$constraints"

echo "lock: resolving tierd[model,remote,test,bench,gpu] for CPython 3.11 on Linux x86-64"
"$VENV/bin/python" -m uv pip compile pyproject.toml \
  --extra model --extra remote --extra test --extra bench --extra gpu \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --generate-hashes --no-emit-package torch --no-header --quiet \
  --constraint "$constraints" "${extra[@]}" \
  --output-file requirements.lock.new
{
  echo "# The exact set scripts/setup.sh installs: tierd[model,remote,test,bench,gpu] on CPython 3.11, Linux x86-64."
  echo "# Written by scripts/lock.sh (make lock) with uv $UV_VERSION; do not edit by hand."
  echo "# torch is left out here (its build depends on the machine): setup.sh installs $(cat scripts/torch.pin)"
  echo "# where none is importable. Everything else, torch's own dependencies included, is pinned with hashes."
  cat requirements.lock.new
} >requirements.lock
rm requirements.lock.new
echo "lock: wrote requirements.lock ($(grep -c '^[a-z0-9]' requirements.lock) packages); the changes:"
git --no-pager diff --stat -- requirements.lock || true
git --no-pager diff -U0 -- requirements.lock | grep -E '^[-+][a-z0-9][^ ]*==' || echo "  (no version changed)"
