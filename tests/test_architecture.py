"""The architecture of DESIGN.md as folder rules, checked on the imports of every module.

Each module's imports are read from its source (ast, so an import inside a function counts
too), resolved to absolute names, and checked against the "never" arrows:

- nothing under ``replicated/`` or ``integration/`` imports ``resolution/``, ``strategies/``,
  ``numerics/`` or torch (Layer 1 and what git runs never depend on Layer 2);
- ``strategies/`` never imports storage (``replicated/``, ``git/``): a strategy sees tensors;
- no core module imports ``cli/`` (only the entry points dispatch to it).

The few calls from the lower layers into Layer 2 are function-level imports made on purpose
(the post-checkout hook resolves; ``clone`` resolves after its checkout; a pickled model is
read with torch); they are listed in ``ALLOWED`` with their reason, and nothing else passes.
Then the driver's and the hooks' import closure is checked in a fresh interpreter: no torch.
Each rule is shown to fail on a violation planted in a temporary package.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import git_crdt_merge

PACKAGE = Path(git_crdt_merge.__file__).parent


@dataclass(frozen=True)
class Rule:
    """Modules under ``where`` never import a module under any of ``never``."""

    name: str
    where: tuple[str, ...]
    never: tuple[str, ...]


def rules(pkg: str) -> list[Rule]:
    def under(*names: str) -> tuple[str, ...]:
        return tuple(f"{pkg}.{n}" for n in names)

    lower = under("replicated", "integration")
    core = tuple(
        f"{pkg}.{n}"
        for n in ("replicated", "integration", "resolution", "query", "git", "strategies")
    ) + under("numerics", "errors", "faults", "bounded", "atomic", "plugins", "demo")
    return [
        Rule(
            "Layer 1 and git's entry points never import Layer 2 or torch",
            lower,
            under("resolution", "strategies", "numerics") + ("torch",),
        ),
        Rule("strategies never import storage", under("strategies"), under("replicated", "git")),
        Rule("the core never imports the CLI", core, under("cli")),
    ]


# (importer, imported): the deliberate function-level calls into a higher layer.
ALLOWED = {
    # post-checkout/post-merge resolve; on a cache hit that imports no torch (checked below)
    ("git_crdt_merge.integration.hooks", "git_crdt_merge.resolution.resolve"),
    ("git_crdt_merge.integration.hooks", "git_crdt_merge.resolution.freshness"),
    ("git_crdt_merge.integration.install", "git_crdt_merge.resolution.freshness"),
    # 'git crdt clone' resolves after its own checkout, so that errors reach the caller
    ("git_crdt_merge.integration.clone", "git_crdt_merge.resolution.resolve"),
    # a pickled state dict (.bin/.pt) can only be read with torch, and only when given one
    ("git_crdt_merge.replicated.formats", "torch"),
    ("git_crdt_merge.replicated.tensorio", "torch"),
}


def module_name(path: Path, root: Path, pkg: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([pkg, *parts])


def import_statements(path: Path, name: str) -> list[tuple[int, set[str]]]:
    """(line, absolute names) of every import statement of ``path``, at any depth of its
    code; for ``from X import y`` the names are ``X`` and ``X.y`` (``y`` may be a module)."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.append((node.lineno, {alias.name for alias in node.names}))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            found.append((node.lineno, {target} | {f"{target}.{a.name}" for a in node.names}))
    return found


def imports_of(path: Path, name: str) -> set[str]:
    return set().union(*(names for _, names in import_statements(path, name)))


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations(root: Path, pkg: str, allowed: set[tuple[str, str]]) -> list[str]:
    """Every import statement of a module under ``root`` (the package ``pkg``) that breaks a
    rule, unless one of its names is an ``allowed`` (importer, imported) pair."""
    found = []
    for path in sorted(root.rglob("*.py")):
        name = module_name(path, root, pkg)
        for rule in rules(pkg):
            if not any(_within(name, w) for w in rule.where):
                continue
            for line, names in import_statements(path, name):
                hits = sorted(n for n in names if any(_within(n, p) for p in rule.never))
                if not hits:
                    continue
                exempt = {(name, n) for n in names} | {(name, n.split(".")[0]) for n in names}
                if exempt & allowed:
                    continue
                found.append(f"{name}:{line} imports {hits[0]}: {rule.name}")
    return found


def test_the_package_keeps_the_layer_rules() -> None:
    assert violations(PACKAGE, "git_crdt_merge", ALLOWED) == []


def test_every_allowed_exception_is_still_an_import() -> None:
    """An exception nobody needs any more is removed, not kept as a silent loophole."""
    for importer, imported in sorted(ALLOWED):
        rel = importer.removeprefix("git_crdt_merge.").replace(".", "/")
        path = PACKAGE / f"{rel}.py"
        assert path.exists(), importer
        assert imported in imports_of(path, importer), (importer, imported)


def test_the_layer_folders_exist() -> None:
    for folder in ("replicated", "integration", "resolution", "query", "git", "cli"):
        assert (PACKAGE / folder / "__init__.py").is_file(), folder
    assert (PACKAGE / "strategies" / "__init__.py").is_file()


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for folder in ("", "replicated", "integration", "resolution", "strategies", "cli", "git"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "__init__.py").write_text("")
    for rel, text in files.items():
        (root / rel).write_text(text)
    return root


@pytest.mark.parametrize(
    ("rel", "source", "broken"),
    [
        ("replicated/store.py", "from ..resolution import engine\n", "Layer 2"),
        ("replicated/store.py", "def f():\n    import torch\n", "Layer 2"),
        ("integration/driver.py", "from pkg.strategies import registry\n", "Layer 2"),
        ("integration/driver.py", "from .. import numerics\n", "Layer 2"),
        ("strategies/mean.py", "from ..replicated.store import ObjectStore\n", "storage"),
        ("strategies/mean.py", "from ..git import commands\n", "storage"),
        ("resolution/resolve.py", "from ..cli import app\n", "the CLI"),
        ("errors.py", "def f():\n    from .cli.app import main\n", "the CLI"),
    ],
)
def test_the_checker_fails_on_a_planted_violation(
    tmp_path: Path, rel: str, source: str, broken: str
) -> None:
    root = _plant(tmp_path, {rel: source})
    found = violations(root, "pkg", set())
    assert len(found) == 1 and broken in found[0], found
    # the same import, declared as a deliberate exception, passes
    target = found[0].split(" imports ")[1].split(":")[0]
    assert violations(root, "pkg", {(module_name(root / rel, root, "pkg"), target)}) == []


def test_the_checker_passes_what_the_rules_allow(tmp_path: Path) -> None:
    root = _plant(
        tmp_path,
        {
            "resolution/engine.py": "import torch\nfrom ..replicated import store\n",
            "replicated/store.py": "from ..git import commands\nfrom .. import errors\n",
            "cli/app.py": "from ..resolution import engine\n",
            "strategies/mean.py": "import torch\nfrom .. import numerics\n",
        },
    )
    assert violations(root, "pkg", set()) == []


CLOSURE = """
import json, sys
import git_crdt_merge.integration.driver
import git_crdt_merge.integration.hooks
import git_crdt_merge.entry
heavy = {"torch", "numpy", "safetensors", "typer", "rich"}
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
"""


def test_the_driver_and_hooks_import_closure_holds_no_torch() -> None:
    """What git runs on every merge and checkout starts without torch, numpy or the CLI's
    libraries."""
    proc = subprocess.run(
        [sys.executable, "-c", CLOSURE], capture_output=True, text=True, check=True
    )
    assert json.loads(proc.stdout) == []


ROOT = PACKAGE.parent


def test_the_module_map_of_design_md_is_current() -> None:
    """docs/design.md lists every module with its docstring's first sentence; a module added,
    moved or re-described without regenerating the map fails here."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_module_map.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    design = (ROOT / "docs" / "design.md").read_text()
    for path in PACKAGE.rglob("*.py"):
        assert f"| `{path.relative_to(PACKAGE).as_posix()}` |" in design, path


def test_contributing_names_the_files_of_each_kind_of_change() -> None:
    guide = (ROOT / "CONTRIBUTING.md").read_text()
    for section in ("a strategy", "a command", "a git operation", "a storage encoding"):
        assert f"## Add {section}\n" in guide, section
    for path in re.findall(
        r"`((?:git_crdt_merge|replicated|resolution|query|git|cli|strategies|integration)/[\w/]+\.py)`",
        guide,
    ):
        full = ROOT / path if path.startswith("git_crdt_merge/") else PACKAGE / path
        assert full.exists(), path


# -- every git call goes through git/ ---------------------------------------------------------
def raw_git_calls(root: Path, pkg: str) -> list[str]:
    """``gitops.run([...])`` / ``gitops.out([...])`` with a literal argv, and ``["git", ...]``
    lists, outside ``git/``: each a place where git's command line is spelled out of the layer
    that owns it.  (The demo's wrapper passes a variable argv and is not one of them.)"""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] == "git":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("run", "out")
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "gitops"
                and node.args
                and isinstance(node.args[0], ast.List)
            ):
                found.append(f"{pkg}/{rel}:{node.lineno}")
            if (
                isinstance(node, ast.List)
                and node.elts
                and isinstance(node.elts[0], ast.Constant)
                and node.elts[0].value == "git"
            ):
                found.append(f"{pkg}/{rel}:{node.lineno}")
    return found


def test_no_git_command_line_outside_the_git_layer() -> None:
    assert raw_git_calls(PACKAGE, "git_crdt_merge") == []


def test_the_git_layer_check_finds_a_planted_call(tmp_path: Path) -> None:
    pkg = tmp_path / "planted"
    (pkg / "git").mkdir(parents=True)
    (pkg / "git" / "commands.py").write_text('def run(a, c):\n    return ["git", *a]\n')
    (pkg / "query").mkdir()
    (pkg / "query" / "x.py").write_text(
        "from ..git import commands as gitops\n\n"
        'def f(root):\n    return gitops.out(["rev-parse", "HEAD"], root)\n'
    )
    (pkg / "y.py").write_text('import subprocess\nsubprocess.run(["git", "status"])\n')
    assert raw_git_calls(pkg, "planted") == ["planted/query/x.py:4", "planted/y.py:2"]
