#!/usr/bin/env bash
# Create .venv (if missing) and install git-crdt-merge with its test tools.
# torch==2.13.0 is installed first: it is the CPU build this project is tested with, and an
# unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# The hook tests run the real git-lfs beside our hooks (tests/integration/test_hook_coexistence.py).
if ! command -v git-lfs >/dev/null 2>&1; then
    apt-get update && apt-get install -y git-lfs
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
# `git crdt --help` runs `man git-crdt`, and man finds <venv>/share/man from PATH. A wheel
# install puts the page there; an editable install does not, so link it.
mkdir -p .venv/share/man/man1
ln -sf ../../../../git_crdt_merge/share/git-crdt.1 .venv/share/man/man1/git-crdt.1
