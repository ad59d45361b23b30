"""Test-only fault injection: ``GIT_CRDT_KILL_AT=NAME`` makes the process SIGKILL itself when it
reaches the point called NAME, so the crash-safety tests can stop a command at an exact step.

Points: ``object:tmp-written`` (a loose object written, not yet renamed), ``add:objects-written``,
``add:objects-staged``, ``index:staged`` (staged into the private copy of the index, which
has not replaced the index yet), ``write:<file name>`` (an atomic write's temporary file
complete, not yet renamed), ``manifest:written`` (renamed, not yet staged), ``driver:tmp-written``,
``resolve:tensor`` (the first tensor merged), ``resolve:worker-tensor`` (a worker process of a
parallel resolve wrote its first tensor: the worker dies, its caller goes on),
``resolve:computed`` (the result complete, not yet in the cache), ``publish:assembled``,
``publish:old-moved``.  Unset, it costs one lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "GIT_CRDT_KILL_AT"


def point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
