#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv/ in the repository root and install lungseg into it.
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh test   (extras of LungSegCore/pyproject.toml)
# demo (the default): inference only, on ONNX Runtime (no torch); test: also training (torch, MONAI) and the tests.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${1:-demo}"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "setup: Python >= 3.10 is required (found $("$PYTHON" --version 2>&1))" >&2; exit 1; }
  "$PYTHON" -m venv "$VENV"
fi
# Reinstall only when the package metadata, the pins or the extras change.
SLICER_REQS="$ROOT/Testing/requirements-slicer.txt"  # slicer-core and PySide6 for the Slicer module's tests
STAMP="$VENV/.lungseg-$(cat "$ROOT/LungSegCore/pyproject.toml" "$ROOT/scripts/constraints-cpu.txt" "$ROOT/scripts/setup.sh" \
  $( [ "$EXTRAS" = test ] && [ -f "$SLICER_REQS" ] && echo "$SLICER_REQS") \
  | { echo "$EXTRAS"; cat; } | sha1sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    -c "$ROOT/scripts/constraints-cpu.txt" -e "$ROOT/LungSegCore[$EXTRAS]"
  if [ "$EXTRAS" = test ] && [ -f "$SLICER_REQS" ]; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c "$ROOT/scripts/constraints-cpu.txt" -r "$SLICER_REQS"
  fi
  rm -f "$VENV"/.lungseg-*
  touch "$STAMP"
fi
