#!/usr/bin/env bash
# Set up .venv with the test dependencies and run the whole pytest suite (extra arguments go to pytest).
#   scripts/test.sh -m "not data and not slow"   # the fast subset: a few minutes, no research data in ../shared
#   scripts/test.sh -m slicer                    # the Slicer module's tests only (Testing/slicer/; "not slicer": the core's)
# Markers (Testing/pytest.ini): data (needs ../shared/data), slow (over ~20 s on 2 cores), slicer (Testing/slicer/).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh" test
cd "$ROOT"
exec .venv/bin/python -m pytest Testing "$@"
