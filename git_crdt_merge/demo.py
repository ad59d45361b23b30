"""``git crdt demo``: the whole story on real data, in a temporary directory, offline.

1. Train a small MLP (64-64-10) on scikit-learn's bundled handwritten digits (shipped inside
   the package: nothing is downloaded) from a few examples: the shared *base*.
2. Three people (alice, bob, carol) clone one origin and each fine-tune the base on one subset
   of digits (0-3, 4-6, 7-9): each gets good at its digits and forgets the others.
3. They add their fine-tunes as contributions and exchange them with pushes and pulls in
   different orders (bob merges, carol rebases).  Every clone ends with the same Merkle root and
   byte-identical merged files, for ``ties`` (set at the origin) and then ``task_arithmetic``
   (set later by alice, a replicated register).
4. Accuracy per digit subset and overall, for the base, each fine-tune and each merged model.

Training is deterministic on one machine (NumPy PCG64 initialisation, full-batch Adam, one
torch thread); what the demo *checks* (same root, same bytes in every clone) comes from
git-crdt-merge, not from the training.  git runs with its own configuration in the temporary
directory: the user's global git config is never read or written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CrdtError, GitError, UsageError
from .git import commands as gitops

CLONES = ("alice", "bob", "carol")
TASKS: dict[str, tuple[int, ...]] = {"0-3": (0, 1, 2, 3), "4-6": (4, 5, 6), "7-9": (7, 8, 9)}
TASK_OF = dict(zip(CLONES, TASKS, strict=True))
HIDDEN = 64
# Small on purpose: the base sees few examples, so each fine-tune has room to improve.
BASE_EXAMPLES, BASE_STEPS, BASE_LR = 60, 40, 1e-2
TUNE_STEPS, TUNE_LR = 30, 3e-3
STRATEGIES: list[tuple[str, list[str]]] = [
    ("ties", ["density=0.8", "lambda=0.5", "normalize=false"]),
    ("task_arithmetic", ["lambda=0.5"]),
]
MERGE_ORDER = {
    "alice": "push; merge bob+carol",
    "bob": "merge alice; push; merge carol",
    "carol": "rebase onto alice+bob; push",
}
STEPS = (
    "loading the digits data set",
    "training the base model",
    "fine-tuning alice on digits 0-3",
    "fine-tuning bob on digits 4-6",
    "fine-tuning carol on digits 7-9",
    "origin: base model and strategy 'ties'",
    "alice: clone, add-contribution, commit",
    "bob: clone, add-contribution, commit",
    "carol: clone, add-contribution, commit",
    "exchanging work in different orders",
    "comparing roots and merged files (ties)",
    "alice switches to task_arithmetic; the others pull",
    "comparing roots and merged files (task_arithmetic)",
    "measuring accuracy",
)

Step = Callable[[str], None]


class DemoFailure(CrdtError):
    """The clones disagreed: the demo's central claim did not hold."""


@dataclass
class DemoReport:
    workdir: Path
    kept: bool
    seconds: float = 0.0
    roots: dict[str, dict[str, str]] = field(default_factory=dict)  # strategy -> clone -> root
    files: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)  # -> file -> sha
    accuracy: list[dict[str, Any]] = field(default_factory=list)  # model, kind, per task, all

    def as_dict(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir) if self.kept else None,
            "seconds": round(self.seconds, 2),
            "clones": list(CLONES),
            "merge_order": MERGE_ORDER,
            "roots": self.roots,
            "files": self.files,
            "accuracy": self.accuracy,
            "identical": all(len(set(r.values())) == 1 for r in self.roots.values()),
        }


# -- data and training ---------------------------------------------------------------------------
@dataclass
class Digits:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


DEMO_INSTALL = "pip install 'git-crdt-merge[demo]'"
"""How to get the demo's one extra dependency (the ``demo`` extra of pyproject.toml)."""


def require_dependencies() -> None:
    """Refuse, in one line that says how to get it, to start the demo without scikit-learn
    (the ``demo`` extra): before any step or folder."""
    import importlib.util

    try:
        found = importlib.util.find_spec("sklearn.datasets") is not None
    except ImportError:  # a broken or shadowed install
        found = False
    if not found:
        raise UsageError(
            f"the demo needs scikit-learn, which ships its digits data: {DEMO_INSTALL}"
        )


def load_data() -> Digits:
    """The 1797 8x8 digits bundled with scikit-learn, scaled to [0, 1], a fixed 70/30 split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError(
            f"the demo needs scikit-learn, which ships its digits data: {DEMO_INSTALL}"
        ) from None
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    n_test = len(y) * 3 // 10
    test, train = order[:n_test], order[n_test:]
    return Digits(x[train], y[train], x[test], y[test])


Params = dict[str, Any]  # tensor name -> torch.Tensor


def initial_params() -> Params:
    import torch

    rng = np.random.default_rng(0)  # PCG64: the same numbers on every platform
    w1 = rng.standard_normal((HIDDEN, 64)) / 8.0
    w2 = rng.standard_normal((10, HIDDEN)) / np.sqrt(HIDDEN)
    return {
        "fc1.weight": torch.from_numpy(w1.astype(np.float32)),
        "fc1.bias": torch.zeros(HIDDEN),
        "fc2.weight": torch.from_numpy(w2.astype(np.float32)),
        "fc2.bias": torch.zeros(10),
    }


def forward(params: Params, x: Any) -> Any:
    import torch

    hidden = torch.relu(x @ params["fc1.weight"].T + params["fc1.bias"])
    return hidden @ params["fc2.weight"].T + params["fc2.bias"]


def train(params: Params, x: np.ndarray, y: np.ndarray, steps: int, lr: float) -> Params:
    """Full-batch Adam on cross-entropy; returns new tensors (the input is not changed)."""
    import torch

    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.Adam(list(p.values()), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(forward(p, xt), yt)
        loss.backward()
        opt.step()
    return {k: v.detach().contiguous() for k, v in p.items()}


def accuracy(params: Params, data: Digits) -> dict[str, float]:
    """Test accuracy on each digit subset and overall."""
    import torch

    with torch.no_grad():
        pred = forward(params, torch.from_numpy(data.x_test)).argmax(1).numpy()
    out = {}
    for task, digits in TASKS.items():
        sel = np.isin(data.y_test, digits)
        out[task] = float((pred[sel] == data.y_test[sel]).mean())
    out["all"] = float((pred == data.y_test).mean())
    return out


def save_model(params: Params, path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(params, str(path))
    return path


def load_model(path: Path) -> Params:
    from safetensors.torch import load_file

    return dict(load_file(str(path)))


# -- git ---------------------------------------------------------------------------------------
def demo_env(work: Path) -> dict[str, str]:
    """An environment where git sees only the demo's own config, and finds our ``git-crdt``."""
    home = work / "home"
    home.mkdir(parents=True, exist_ok=True)
    gconf = home / ".gitconfig"
    gconf.write_text("[init]\n\tdefaultBranch = main\n[advice]\n\tdetachedHead = false\n")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("GIT_") or k in ("GIT_EXEC_PATH", "GIT_SSH")
    }
    bins = [str(Path(sys.executable).parent)]
    found = shutil.which("git-crdt")
    if found:
        bins.append(str(Path(found).parent))
    env.update(
        {
            "HOME": str(home),
            "GIT_CONFIG_GLOBAL": str(gconf),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_AUTHOR_NAME": "git-crdt demo",
            "GIT_AUTHOR_EMAIL": "demo@example.invalid",
            "GIT_COMMITTER_NAME": "git-crdt demo",
            "GIT_COMMITTER_EMAIL": "demo@example.invalid",
            "GIT_TERMINAL_PROMPT": "0",
            "PATH": os.pathsep.join([*bins, env.get("PATH", "")]),
            "NO_COLOR": "1",
        }
    )
    return env


class Git:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def __call__(self, cwd: Path, *args: str) -> str:
        # Its own process group: if the demo is interrupted, git and the hooks it started
        # (which resolve, and write into the demo's folder) are killed before that folder is
        # removed, so nothing re-creates it afterwards.
        proc = gitops.run(args, cwd, env=self.env, check=False, own_group=True)
        if proc.returncode != 0:
            text = (proc.stderr or proc.stdout).decode(errors="replace").strip()
            raise GitError(f"git {' '.join(args)} failed in {cwd.name}: {text}")
        return proc.stdout.decode()

    def crdt(self, cwd: Path, *args: str) -> str:
        return self(cwd, "crdt", *args)


def file_digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def _compare(
    report: DemoReport, strategy: str, clones: dict[str, Path], git: Git, merged: Path
) -> None:
    """Record each clone's root and merged-file hashes; fail unless all are equal."""
    roots, files = {}, {}
    for who, c in clones.items():
        git.crdt(c, "resolve", "-q")  # a cache hit: the hooks already resolved
        roots[who] = json.loads(git.crdt(c, "status", "--json"))["merkle_root"]
        files[who] = file_digests(c / "merged")
    report.roots[strategy] = roots
    report.files[strategy] = files
    if len(set(roots.values())) != 1:
        raise DemoFailure(f"{strategy}: the clones reached different Merkle roots: {roots}")
    if len({json.dumps(f, sort_keys=True) for f in files.values()}) != 1:
        raise DemoFailure(f"{strategy}: the merged files differ between clones")
    model = next(iter(clones.values())) / "merged" / "model.safetensors"
    shutil.copy2(model, merged / f"{strategy}.safetensors")


def run_demo(work: Path, *, kept: bool = False, step: Step | None = None) -> DemoReport:
    """Run the whole demo in ``work`` (which must exist and be empty)."""
    import torch

    say = step or (lambda msg: None)
    start = time.perf_counter()
    report = DemoReport(work, kept)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reproducible training on this machine
    try:
        say(STEPS[0])
        data = load_data()
        models = work / "models"
        say(STEPS[1])
        base = train(
            initial_params(),
            data.x_train[:BASE_EXAMPLES],
            data.y_train[:BASE_EXAMPLES],
            BASE_STEPS,
            BASE_LR,
        )
        save_model(base, models / "base.safetensors")
        for i, who in enumerate(CLONES):
            say(STEPS[2 + i])
            sel = np.isin(data.y_train, TASKS[TASK_OF[who]])
            tuned = train(base, data.x_train[sel], data.y_train[sel], TUNE_STEPS, TUNE_LR)
            save_model(tuned, models / f"{who}.safetensors")
    finally:
        torch.set_num_threads(threads)

    git = Git(demo_env(work))
    say(STEPS[5])
    origin = work / "origin.git"
    git(work, "init", "-q", "--bare", "-b", "main", str(origin))
    seed = work / "seed"
    git(work, "clone", "-q", str(origin), str(seed))
    git.crdt(seed, "init", "-q")
    git.crdt(seed, "set-base", str(models / "base.safetensors"), "-q")
    name, params = STRATEGIES[0]
    git.crdt(seed, "strategy", name, *[a for p in params for a in ("--param", p)])
    git(seed, "commit", "-q", "-m", "base model and strategy")
    git(seed, "push", "-q", "origin", "HEAD:main")

    clones: dict[str, Path] = {}
    for i, who in enumerate(CLONES):
        say(STEPS[6 + i])
        c = work / who
        git(work, "clone", "-q", str(origin), str(c))
        git.crdt(c, "install", "-q")
        git.crdt(c, "add-contribution", str(models / f"{who}.safetensors"), "--name", who, "-q")
        git(c, "commit", "-q", "-m", f"{who}: fine-tune on digits {TASK_OF[who]}")
        clones[who] = c

    say(STEPS[9])
    alice, bob, carol = (clones[w] for w in CLONES)
    git(alice, "push", "-q", "origin", "HEAD:main")
    git(bob, "pull", "-q", "--no-rebase", "origin", "main")
    git(bob, "push", "-q", "origin", "HEAD:main")
    git(carol, "pull", "-q", "--rebase", "origin", "main")
    git(carol, "push", "-q", "origin", "HEAD:main")
    git(alice, "pull", "-q", "--no-rebase", "origin", "main")
    git(bob, "pull", "-q", "--no-rebase", "origin", "main")

    merged = work / "merged-models"
    merged.mkdir(exist_ok=True)
    say(STEPS[10])
    _compare(report, name, clones, git, merged)

    say(STEPS[11])
    name, params = STRATEGIES[1]
    git.crdt(alice, "strategy", name, *[a for p in params for a in ("--param", p)])
    git(alice, "commit", "-q", "-m", f"strategy {name}")
    git(alice, "push", "-q", "origin", "HEAD:main")
    for c in (bob, carol):
        git(c, "pull", "-q", "--no-rebase", "origin", "main")
    say(STEPS[12])
    _compare(report, name, clones, git, merged)

    say(STEPS[13])
    rows: list[tuple[str, str, Path]] = [("base", "base", models / "base.safetensors")]
    rows += [(who, f"tuned on {TASK_OF[who]}", models / f"{who}.safetensors") for who in CLONES]
    rows += [(n, "merged", merged / f"{n}.safetensors") for n, _ in STRATEGIES]
    for label, kind, path in rows:
        report.accuracy.append({"model": label, "kind": kind, **accuracy(load_model(path), data)})
    report.seconds = time.perf_counter() - start
    return report
