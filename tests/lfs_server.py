"""A giftless Git LFS server on 127.0.0.1 for the tests (run as a script by the ``lfs_server``
fixture of tests/integration/test_lfs_server.py): local storage in ARGV[1], port ARGV[3] (0:
a free one), printed on the first line of stdout; anonymous read and write.

Faults for the tests, read from the file ARGV[2] before each request (absent or empty: none):
``refuse N``  every upload (PUT) answered with HTTP status N;
``die K``     the process exits abruptly while receiving the (K+1)-th upload, after reading
              part of it: a server that dies in the middle of a push.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from giftless.app import init_app
from giftless.auth.identity import DefaultIdentity, Permission
from werkzeug.serving import make_server

Environ = dict[str, Any]
StartResponse = Callable[..., Any]


class Anyone(DefaultIdentity):
    """Everyone may read and write.  (giftless 0.6.2's ``allow_anon:read_write`` refuses an
    upload: its identity looks the object's oid up in a table that holds only ``None``.)"""

    def is_authorized(
        self, organization: str, repo: str, permission: Permission, oid: str | None = None
    ) -> bool:
        return True


def allow_all(_: Any) -> Anyone:
    return Anyone(name="anyone")


def with_faults(app: Callable[..., Iterable[bytes]], control: Path) -> Callable[..., Any]:
    uploads = [0]

    def wrapped(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        try:
            words = control.read_text().split()
        except OSError:
            words = []
        if environ["REQUEST_METHOD"] == "PUT" and len(words) == 2:
            if words[0] == "refuse":
                status = int(words[1])
                start_response(f"{status} Refused", [("Content-Type", "text/plain")])
                return [b"refused by the test server\n"]
            if words[0] == "die" and uploads[0] >= int(words[1]):
                environ["wsgi.input"].read(1024)
                os._exit(3)
        if environ["REQUEST_METHOD"] == "PUT":
            uploads[0] += 1
        return app(environ, start_response)

    return wrapped


def main() -> None:
    storage, control = Path(sys.argv[1]), Path(sys.argv[2])
    app = init_app(
        additional_config={
            "AUTH_PROVIDERS": ["__main__:allow_all"],
            # no signed upload URLs: anonymous requests may read and write
            "PRE_AUTHORIZED_ACTION_PROVIDER": None,
            "TRANSFER_ADAPTERS": {
                "basic": {"options": {"storage_options": {"path": str(storage)}}}
            },
        }
    )
    server = make_server("127.0.0.1", int(sys.argv[3]), with_faults(app, control), threaded=True)
    print(server.server_port, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
