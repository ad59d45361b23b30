"""``verify`` and ``gc``: checking a state, pruning the result cache."""

from __future__ import annotations

from typing import Annotated

import typer

from ..bounded import display
from ..errors import UsageError
from .app import (
    JsonOpt,
    QuietOpt,
    app,
    byte_progress,
    emit_json,
    err,
    fail,
    handle_errors,
    open_repo,
    size_arg,
)
from .render import human_bytes


@app.command()
def verify(
    staged: Annotated[bool, typer.Option("--staged", help="Check the index (pre-commit).")] = False,
    rev: Annotated[str | None, typer.Option("--rev", help="Check a commit instead.")] = None,
    full: Annotated[bool, typer.Option("--full", help="Re-hash every object (blake3).")] = False,
    fetch: Annotated[
        bool,
        typer.Option(
            "--fetch", help="Partial clone or chunks in Git LFS: fetch absent objects first."
        ),
    ] = False,
    fast: Annotated[
        bool, typer.Option("--fast", help="Hash nothing: presence and sizes only.")
    ] = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Check the manifest, every record, descriptor and object, the compatibility of the
    contributions and the strategy; exit 1 listing every problem (and how to fix it).

    By default every object that HEAD does not hold as the same git blob is re-hashed (what
    a fetch, merge or add brought in: '--rev FETCH_HEAD' checks a fetch before you merge
    it); --full re-hashes every object, the cache and the published output too.  In a
    partial clone, and for chunks kept in Git LFS, objects not fetched yet are named as absent
    (--fetch fetches them)."""
    from ..query.verify import verify as do_verify

    if staged and rev is not None:
        raise fail(UsageError("--staged and --rev are exclusive"))
    if full and fast:
        raise fail(UsageError("--full and --fast are exclusive"))
    with handle_errors(), byte_progress("verify", full and not (json_ or quiet)) as (st, adv):
        report = do_verify(
            open_repo(),
            ":" if staged else rev,
            full=full,
            resolvable=True,
            fetch=fetch,
            progress=adv,
            on_start=st,
            hash_new_against=None if fast else "HEAD",
        )
    if json_:
        emit_json(report.as_dict())
    else:
        for p in report.problems:
            err.print(
                f"problem: {display(p.message)}\n  fix: {p.fix}", markup=False, soft_wrap=True
            )
        if not quiet:
            for note in report.notes:
                err.print(f"note: {display(note)}", markup=False, soft_wrap=True)
            speed = report.bytes_hashed / max(report.hash_seconds, 1e-9) / 1e6
            hashed = f", {human_bytes(report.bytes_hashed)} hashed at {speed:.0f} MB/s"
            verdict = f"{len(report.problems)} problem(s)" if report.problems else "ok"
            err.print(
                f"{verdict}: {report.state}, {report.contributions} contributions, "
                f"{report.objects} objects{hashed if report.bytes_hashed else ''}",
                markup=False,
            )
    if report.problems:
        raise typer.Exit(1)


@app.command()
def gc(
    max_bytes: Annotated[
        str | None,
        typer.Option(
            "--max-bytes", help="Cache size budget, e.g. 10GB (default: crdt.cacheMaxBytes)."
        ),
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Prune the result cache: entries that no ref reaches or that an earlier revision of their
    strategy computed, then the least recently used beyond the size budget."""
    from ..resolution import cache

    with handle_errors():
        repo = open_repo()
        repo.require_initialized()
        budget = size_arg(max_bytes, "--max-bytes") if max_bytes is not None else None
        budget = budget if budget is not None else cache.cache_budget(repo)
        with repo.lock():
            result = cache.prune(repo, cache.reachable_roots(repo), budget)
    if json_:
        emit_json(result.as_dict())
        return
    err.print(
        f"removed {len(result.removed)} cache entries ({human_bytes(result.bytes_removed)}), "
        f"kept {len(result.kept)} ({human_bytes(result.bytes_kept)})"
    )
