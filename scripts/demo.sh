#!/usr/bin/env bash
# Set up (idempotent) and run the end-to-end demo in a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python scripts/e2e_demo.py "$@"
