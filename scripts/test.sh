#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite on CPU, then ruff.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export TRITON_INTERPRET=1
ruff check .
python -m pytest -q -x --durations=15 "$@"
