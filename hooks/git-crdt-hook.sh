#!/bin/sh
# git-crdt-merge hook: installed by `git crdt install`, removed by `git crdt uninstall`.
# A hook that was here before was moved to HOOK.legacy; it runs first, with the same
# arguments and standard input.
hook=$(basename "$0")
legacy="$(dirname "$0")/$hook.legacy"
status=0
if [ -x "$legacy" ]; then
    case "$hook" in
        pre-push|post-rewrite)
            input=$(mktemp) || exit 1
            cat > "$input"
            "$legacy" "$@" < "$input"; status=$?
            ;;
        *)
            "$legacy" "$@"; status=$?
            ;;
    esac
    case "$hook" in
        pre-*) if [ "$status" -ne 0 ]; then rm -f "${input:-}"; exit "$status"; fi ;;
    esac
fi
# The program `git crdt install` ran from (an absolute path, so the hooks work whatever PATH
# is, e.g. with the virtual environment not activated); else the one on PATH.
GIT_CRDT=@GIT_CRDT@
if [ ! -x "$GIT_CRDT" ]; then
    GIT_CRDT=$(command -v git-crdt 2>/dev/null)
fi
if [ -z "$GIT_CRDT" ]; then
    echo "git-crdt: 'git-crdt' is not on PATH; skipping the $hook hook (run 'git crdt doctor')" >&2
    rm -f "${input:-}"
    case "$hook" in
        pre-*) [ "$status" -eq 0 ] && echo "git-crdt: $hook: nothing was verified" >&2 ;;
    esac
    exit "$status"
fi
if [ -n "${input:-}" ]; then
    "$GIT_CRDT" hook "$hook" "$@" < "$input"; ours=$?
    rm -f "$input"
else
    "$GIT_CRDT" hook "$hook" "$@"; ours=$?
fi
[ "$ours" -ne 0 ] && exit "$ours"
exit "$status"
