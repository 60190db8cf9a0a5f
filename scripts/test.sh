#!/usr/bin/env bash
# Sets up the environment and runs the whole test suite with 8 fake CPU devices (for sharding tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
export HF_HUB_OFFLINE=1
exec "$VENV/bin/python" -m pytest -q -n 2 --dist loadfile tests "$@"
