#!/usr/bin/env bash
# Quick start 2: run the whole test suite (installs what is missing first).
# Extra arguments go to pytest, e.g. ./test.sh -k store -x
source "$(dirname "$0")/scripts/bootstrap.sh"
cd "$ROOT"
export QT_QPA_PLATFORM=offscreen
"$VENV/bin/lint-imports" --config pyproject.toml
exec "$PY" -m pytest -q "$@"
