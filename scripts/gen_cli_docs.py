"""Regenerate docs/cli.md, the man page and the bash completion from the typer app.

.venv/bin/python scripts/gen_cli_docs.py          # write the files
.venv/bin/python scripts/gen_cli_docs.py --check  # exit 1 if any is out of date
"""

from __future__ import annotations

import sys
from pathlib import Path

from git_crdt_merge.cli.app import app
from git_crdt_merge.cli.docs import generated_files

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    stale = []
    for path, text in generated_files(ROOT, app).items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(path.relative_to(ROOT))
        if "--check" not in sys.argv:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    verb = "out of date" if "--check" in sys.argv else "written"
    for p in stale:
        print(f"{p}: {verb}")
    return 1 if stale and "--check" in sys.argv else 0


if __name__ == "__main__":
    sys.exit(main())
