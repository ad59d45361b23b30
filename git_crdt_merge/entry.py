"""Console-script entry point ``git-crdt``.

The merge driver and the hooks run on every merge and checkout, so they are dispatched here
before the CLI (typer, rich) or torch is imported.
"""

from __future__ import annotations

import sys


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["merge-driver"]:
        from .integration.driver import main as driver_main

        sys.exit(driver_main(argv[1:]))
    if argv[:1] == ["hook"]:
        from .integration.hooks import main as hook_main

        sys.exit(hook_main(argv[1:]))
    from .cli.app import run

    run()


if __name__ == "__main__":
    main()
