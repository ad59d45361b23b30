#!/usr/bin/env bash
# Set up (idempotent) and run `git crdt demo`: a digits classifier fine-tuned in three clones,
# merged in different orders, with the same model in every clone. Options go to the demo
# (e.g. --keep DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the demo's own dependency (scikit-learn, for its digits data) is the `demo` extra
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[demo]'
export PATH="$PWD/.venv/bin:$PATH"
exec git crdt demo "$@"
