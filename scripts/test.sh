#!/usr/bin/env bash
# Set up .venv with the test dependencies and run the whole pytest suite (extra arguments go to pytest).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh" test
cd "$ROOT"
exec .venv/bin/python -m pytest Testing "$@"
