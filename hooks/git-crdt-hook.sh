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
if ! command -v git-crdt >/dev/null 2>&1; then
    echo "git-crdt: 'git-crdt' is not on PATH; skipping the $hook hook (run 'git crdt doctor')" >&2
    rm -f "${input:-}"
    exit "$status"
fi
if [ -n "${input:-}" ]; then
    git-crdt hook "$hook" "$@" < "$input"; ours=$?
    rm -f "$input"
else
    git-crdt hook "$hook" "$@"; ours=$?
fi
[ "$ours" -ne 0 ] && exit "$ours"
exit "$status"
