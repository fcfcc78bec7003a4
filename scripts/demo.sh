#!/usr/bin/env bash
# Set up .venv and segment the bundled demo radiographs into lungseg-demo/ (labelmaps, overlays, results.csv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh" demo
cd "$ROOT"
mapfile -t INPUTS < <(.venv/bin/python -c 'from lungseg.samples import demo_inputs; print(*demo_inputs(), sep="\n")')
.venv/bin/lungseg segment "${INPUTS[@]}" -o lungseg-demo --overlays "$@"
