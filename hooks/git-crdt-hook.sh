#!/bin/sh
# git-crdt-merge hook: installed by `git crdt install`, removed by `git crdt uninstall`.
# It runs from the hook slot itself, or as HOOK.legacy, called by the pre-commit framework's
# hook.  A hook that was in the slot before us is kept as HOOK.crdt-chained and runs first,
# with the same arguments and standard input.  Where git-lfs is set up in this repository,
# git-lfs's hook commands run too (git-lfs does not install its hooks beside a foreign one).
dir=$(dirname "$0")
hook=$(basename "$0")
while :; do
    case "$hook" in
        *.legacy) hook=${hook%.legacy} ;;
        *) break ;;
    esac
done
chained="$dir/$hook.crdt-chained"
input=""
case "$hook" in
    pre-push|post-rewrite)
        input=$(mktemp) || exit 1
        cat > "$input"
        ;;
esac
# run a command with the saved standard input, if this hook has one
run() {
    if [ -n "$input" ]; then "$@" < "$input"; else "$@"; fi
}
finish() {
    [ -n "$input" ] && rm -f "$input"
    exit "$1"
}
status=0
if [ -x "$chained" ]; then
    run "$chained" "$@"; status=$?
    case "$hook" in
        pre-*) [ "$status" -ne 0 ] && finish "$status" ;;
    esac
fi
case "$hook" in
    pre-push|post-checkout|post-commit|post-merge)
        lfs_dir=$(git rev-parse --git-path lfs 2>/dev/null)
        if [ -n "$(git config --get filter.lfs.process)" ] && [ -d "$lfs_dir" ] \
            && ! grep -qs "git lfs $hook" "$chained"; then
            if command -v git-lfs >/dev/null 2>&1; then
                run git lfs "$hook" "$@"; lfs=$?
                [ "$status" -eq 0 ] && status=$lfs
                case "$hook" in
                    pre-*) [ "$status" -ne 0 ] && finish "$status" ;;
                esac
            else
                echo "git-crdt: this repository uses Git LFS, but 'git-lfs' is not on PATH" >&2
                [ "$hook" = pre-push ] && finish 2
            fi
        fi
        ;;
esac
# prepare-commit-msg matters only for picks (cherry-pick, revert, a rebase pick), which run no
# pre-commit: `git commit` ran pre-commit, a merge pre-merge-commit.  Where /proc names git's
# command and no rebase, cherry-pick or revert is under way, skip starting the interpreter
# (half a second on every commit); anything else goes on to git-crdt, which decides.
if [ "$hook" = prepare-commit-msg ] && [ -r "/proc/$PPID/cmdline" ]; then
    sub=$(tr '\0' '\n' < "/proc/$PPID/cmdline" | sed -n '2,$p' | grep -v '^-' | head -n 1)
    case "$sub" in
        commit|merge)
            gd=$(git rev-parse --git-dir 2>/dev/null)
            if [ -n "$gd" ] && [ ! -e "$gd/rebase-merge" ] && [ ! -e "$gd/rebase-apply" ] \
                && [ ! -e "$gd/sequencer" ] && [ ! -e "$gd/CHERRY_PICK_HEAD" ] \
                && [ ! -e "$gd/REVERT_HEAD" ]; then
                finish "$status"
            fi
            ;;
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
    case "$hook" in
        pre-*) [ "$status" -eq 0 ] && echo "git-crdt: $hook: nothing was verified" >&2 ;;
    esac
    finish "$status"
fi
run "$GIT_CRDT" hook "$hook" "$@"; ours=$?
[ "$ours" -ne 0 ] && finish "$ours"
finish "$status"
