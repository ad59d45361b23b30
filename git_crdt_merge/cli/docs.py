"""The CLI's reference, man page and bash completion, generated from the typer app.

One source (the commands, their help and options in ``cli.py``) gives three files, written by
``scripts/gen_cli_docs.py`` and checked to be current by ``tests/cli/test_clidocs.py``:

- ``docs/cli.md``: the CLI reference;
- ``git_crdt_merge/share/git-crdt.1``: the man page (``git crdt --help`` runs ``man git-crdt``);
- ``git_crdt_merge/share/git-crdt.bash``: ``_git_crdt`` for git's bash completion.

Nothing here depends on the date or the machine, so regenerating gives the same bytes.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__, errors

if TYPE_CHECKING:
    import typer

SHARE = Path(__file__).parent.parent / "share"
MAN_PAGE = SHARE / "git-crdt.1"
BASH_COMPLETION = SHARE / "git-crdt.bash"

DESCRIPTION = (
    "git-crdt-merge makes git merges of fine-tuned models order-free. Each fine-tuned model is "
    "a contribution, stored in the repository as per-tensor blobs and recorded in an OR-Set "
    "manifest (a CRDT) in .crdt/manifest. A merge driver joins manifests by set union, so "
    "merge, pull, rebase and cherry-pick in any order reach the same set; hooks then compute "
    "the merged model from the set with a deterministic strategy, seeded from the set's "
    "Merkle root, so every clone holding the same contributions holds byte-identical model "
    "files."
)
START = (
    "Try it: git crdt demo. In a repository: git crdt init, then git crdt add-contribution "
    "PATH and git commit; in every other clone run git crdt install once."
)
FILES = [
    (".crdt/manifest", "the replicated set: one JSON record per line, sorted"),
    (".crdt/objects/", "tensor chunks and descriptors as git blobs, kept out of the work tree"),
    ("merged/", "the merged model (the output register), ignored by git"),
    (".git/crdt/cache/", "merged models by Merkle root, per clone"),
]


@dataclass
class Opt:
    names: str  # "-n, --name TEXT"
    help: str


@dataclass
class Cmd:
    name: str
    summary: str
    help: str
    usage: str
    arguments: list[Opt]
    options: list[Opt]


def _clean(text: str | None) -> str:
    return inspect.cleandoc(text or "").strip()


def commands(app: typer.Typer) -> list[Cmd]:
    """Every subcommand of the typer ``app`` (``git crdt``), in the order ``-h`` lists them."""
    import typer.main

    group: Any = typer.main.get_command(app)
    out = []
    for name, cmd in group.commands.items():
        if cmd.hidden:
            continue
        ctx = cmd.context_class(cmd, info_name=name, parent=None)
        args, opts = [], []
        usage = []
        for p in cmd.params:
            if getattr(p, "hidden", False):
                continue
            if p.param_type_name == "argument":
                metavar = p.name.upper().rstrip("_")
                piece = metavar + ("..." if p.nargs == -1 else "")
                usage.append(piece if p.required else f"[{piece}]")
                args.append(Opt(metavar, _clean(getattr(p, "help", ""))))
            else:
                record = p.get_help_record(ctx)
                if record is not None:
                    opts.append(Opt(record[0], _clean(record[1])))
        opts.append(Opt("-h, --help", "Show this command's help and exit."))
        help_text = _clean(cmd.help)
        out.append(
            Cmd(
                name,
                help_text.split("\n\n")[0].replace("\n", " "),
                help_text,
                " ".join(["git crdt", name, "[OPTIONS]", *usage]),
                args,
                opts,
            )
        )
    return out


def exit_codes() -> list[tuple[int, str]]:
    """(code, meaning) from the error hierarchy, plus 0 and 130."""
    rows = [(0, "Success.")]
    seen = {0}
    # only the classes of errors.py: what else is imported must not change the page
    classes: list[type[errors.CrdtError]] = [
        errors.CrdtError,
        *(c for c in errors.CrdtError.__subclasses__() if c.__module__ == errors.__name__),
    ]
    for cls in classes:
        code = cls.exit_code
        if code in seen:
            continue
        seen.add(code)
        rows.append((code, _clean(cls.__doc__).split("\n\n")[0].replace("\n", " ")))
    rows.append((130, "Interrupted (Ctrl-C)."))
    return sorted(rows)


SIZES = """\
Every size (`--chunk-size`, `chunk-size`, `--max-shard-size`, `gc --max-bytes`, and the
settings `crdt.cacheMaxBytes` and `crdt.maxShardSize`) is read by one parser
(`git_crdt_merge/sizes.py`): a whole number of bytes (`500000000`), or a number (`1.5`
allowed) and a unit, case-insensitive: `B`; `KB`, `MB`, `GB`, `TB` = 1000, 1000², 1000³,
1000⁴; `KiB`, `MiB`, `GiB`, `TiB` = 1024, 1024², 1024³, 1024⁴; `k`, `m`, `g`, `t` alone =
powers of 1024, as `git config --type=int` reads them. The result is rounded down to a
whole byte."""


# -- markdown ----------------------------------------------------------------------------------
def markdown(app: typer.Typer) -> str:
    """docs/cli.md."""
    lines = [
        "# CLI reference",
        "",
        "<!-- Generated from the typer app by scripts/gen_cli_docs.py; do not edit by hand.",
        "     tests/cli/test_clidocs.py fails when this file is out of date. -->",
        "",
        DESCRIPTION,
        "",
        "Every command takes `-h` / `--help`. Human output and progress go to stderr, `--json`",
        "output to stdout. `git crdt --help` opens the man page (`man git-crdt`), which holds",
        "this same reference.",
        "",
        "| command | what it does |",
        "| --- | --- |",
    ]
    cmds = commands(app)
    for c in cmds:
        lines.append(f"| [`{c.name}`](#git-crdt-{c.name}) | {_md_cell(c.summary)} |")
    for c in cmds:
        lines += ["", f"## git crdt {c.name}", "", "```", c.usage, "```", "", _md_text(c.help), ""]
        if c.arguments:
            lines += ["| argument | |", "| --- | --- |"]
            lines += [f"| `{a.names}` | {_md_cell(a.help)} |" for a in c.arguments]
            lines.append("")
        lines += ["| option | |", "| --- | --- |"]
        lines += [f"| `{o.names}` | {_md_cell(o.help)} |" for o in c.options]
    lines += ["", "## Sizes", "", *SIZES.split("\n")]
    lines += ["", "## Exit status", "", "| code | meaning |", "| --- | --- |"]
    lines += [f"| {code} | {text} |" for code, text in exit_codes()]
    lines += ["", "Details and the messages of each error: [errors.md](errors.md).", ""]
    return "\n".join(lines)


def _md_text(text: str) -> str:
    return text.replace("<", "&lt;").replace(">", "&gt;")


def _md_cell(text: str) -> str:
    return _md_text(text).replace("|", "\\|").replace("\n", " ")


# -- man page ----------------------------------------------------------------------------------
def _roff(text: str) -> str:
    """Escape text for roff: backslashes, and a leading dot or quote on a line."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + ln) if ln[:1] in (".", "'") else ln for ln in text.split("\n"))


def man_page(app: typer.Typer) -> str:
    """git-crdt(1) in roff (man macros)."""
    out = [
        '.\\" Generated from the typer app by scripts/gen_cli_docs.py; do not edit by hand.',
        f'.TH GIT\\-CRDT 1 "" "git-crdt-merge {__version__}" "Git Manual"',
        ".SH NAME",
        "git\\-crdt \\- order\\-free git merges of fine\\-tuned models",
        ".SH SYNOPSIS",
        ".B git crdt",
        ".I command",
        "[\\fIoptions\\fR] [\\fIarguments\\fR]",
        ".br",
        ".B git crdt",
        "\\fIcommand\\fR \\-h",
        ".SH DESCRIPTION",
        _roff(DESCRIPTION),
        ".PP",
        _roff(START),
        ".SH COMMANDS",
    ]
    for c in commands(app):
        out += [".TP", f"\\fB{_roff(c.usage)}\\fR", _roff(c.help.replace("\n\n", "\n.br\n"))]
        for a in c.arguments:
            out += [".RS", ".TP", f"\\fI{_roff(a.names)}\\fR", _roff(a.help), ".RE"]
        for o in c.options:
            out += [".RS", ".TP", f"\\fB{_roff(o.names)}\\fR", _roff(o.help), ".RE"]
    out += [".SH EXIT STATUS"]
    for code, text in exit_codes():
        out += [".TP", f"\\fB{code}\\fR", _roff(text)]
    out += [".SH FILES"]
    for path, text in FILES:
        out += [".TP", f"\\fI{_roff(path)}\\fR", _roff(text)]
    out += [
        ".SH SEE ALSO",
        "\\fBgit\\fR(1), \\fBgitattributes\\fR(5), \\fBgithooks\\fR(5);",
        "the documentation in the docs/ folder of git\\-crdt\\-merge.",
        "",
    ]
    return "\n".join(out)


# -- bash completion ---------------------------------------------------------------------------
def bash_completion(app: typer.Typer) -> str:
    """``_git_crdt`` for git's completion (``git crdt <TAB>``) and ``complete`` for
    ``git-crdt``: subcommands, then that subcommand's options."""
    cmds = commands(app)
    lines = [
        "# bash completion for git-crdt (git-crdt-merge). Generated by scripts/gen_cli_docs.py.",
        "# Load it after git's own completion, e.g. in ~/.bashrc:",
        '#   source "$(git-crdt completion --path)"',
        "# git's completion calls _git_crdt for 'git crdt <TAB>'.",
        "",
        "__git_crdt_commands='" + " ".join(c.name for c in cmds) + "'",
        "",
        "__git_crdt_options() {",
        '    case "$1" in',
    ]
    for c in cmds:
        flags = []
        for o in c.options:
            for part in o.names.split(","):
                word = part.strip().split(" ")[0]
                if word.startswith("-"):
                    flags.append(word)
            # "--flag / --no-flag" records list the negative form after a slash
            flags += [w for w in o.names.replace("/", " ").split() if w.startswith("--no-")]
        uniq = sorted(set(flags), key=flags.index)
        lines.append(f"        {c.name}) echo '{' '.join(uniq)}' ;;")
    lines += [
        "    esac",
        "}",
        "",
        "# $1: the words after 'crdt'; prints the candidates for the last one.",
        "__git_crdt_candidates() {",
        '    local cur="${@: -1}" sub="" w',
        '    for w in "${@:1:$#-1}"; do',
        '        case "$w" in -*) ;; *) sub="$w"; break ;; esac',
        "    done",
        '    if [ -z "$sub" ]; then',
        '        case "$cur" in',
        "            -*) echo '--help --version' ;;",
        '            *) echo "$__git_crdt_commands" ;;',
        "        esac",
        '    elif [ "${cur#-}" != "$cur" ]; then',
        '        __git_crdt_options "$sub"',
        "    fi",
        "}",
        "",
        "# Called by git's completion for 'git crdt ...' (it provides __gitcomp and words).",
        "_git_crdt() {",
        '    local words_after=("${words[@]:2:cword-1}")',
        '    local candidates; candidates="$(__git_crdt_candidates "${words_after[@]}")"',
        "    # nothing to offer (a path argument): git's 'complete -o default' completes files",
        '    [ -n "$candidates" ] && __gitcomp "$candidates"',
        "}",
        "",
        "# 'git-crdt ...' typed directly.",
        "_git_crdt_direct() {",
        '    local cur="${COMP_WORDS[COMP_CWORD]}"',
        '    local words_after=("${COMP_WORDS[@]:1:COMP_CWORD}")',
        '    local candidates; candidates="$(__git_crdt_candidates "${words_after[@]}")"',
        '    if [ -n "$candidates" ]; then',
        '        COMPREPLY=($(compgen -W "$candidates" -- "$cur"))',
        "    else",
        '        COMPREPLY=($(compgen -f -- "$cur"))',
        "    fi",
        "}",
        "complete -o default -F _git_crdt_direct git-crdt",
        "",
    ]
    return "\n".join(lines)


def generated_files(repo_root: Path, app: typer.Typer) -> dict[Path, str]:
    """Every generated file of the typer ``app`` and the text it must hold."""
    return {
        repo_root / "docs" / "cli.md": markdown(app),
        MAN_PAGE: man_page(app),
        BASH_COMPLETION: bash_completion(app),
    }
