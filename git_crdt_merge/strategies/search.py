"""Search-based merges: per-contribution coefficients found over the whole model.

AdaMerging, DAM, evolutionary and genetic merging all merge each tensor as a weighted sum of
the contributions (of their task vectors when there is a base) with coefficients that a search
chooses for the whole model.  They run as two streamed passes (``Strategy.model_pass``):

1. statistics: for every tensor name, the exact K x K Gram matrix ``G[i][j] = <v_i, v_j>`` of
   the contributions' vectors (``v_i = X_i - B`` with a base, ``X_i`` without), a few floats
   per tensor whatever its size;
2. the search runs on those statistics alone (plain float64 scalar arithmetic in a fixed order,
   randomness from the RandomStream under a stream name of its own), then every tensor is
   merged with the coefficients found, which ``resolution.json`` records.

The objective is data-free by default (below) or a plugin: an installed entry point of group
``git_crdt_merge.fitness`` named by the ``objective`` / ``fitness`` parameter, called as
``plugin(candidate) -> float`` (lower is better) with a :class:`Candidate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from .. import numerics
from ..errors import ResolveError
from ..plugins import FITNESS_GROUP, load_plugin, plugin_origin
from . import common
from .registry import ModelContext, ModelPass, ModelValues, Param, Strategy, TensorInputs, register

__all__ = ["Candidate", "merge_with_coefficients", "retention_loss"]

_SQRT3 = math.sqrt(3.0)  # correctly rounded: uniform noise of unit variance is sqrt(3)(2u - 1)


@dataclass(frozen=True)
class Candidate:
    """One set of coefficients, as an objective plugin sees it."""

    strategy: str
    coefficients: dict[str, list[float]]  # tensor name -> one coefficient per contribution
    contribution_ids: list[str]  # canonical order
    weights: list[float]
    has_base: bool  # True: coefficients scale task vectors X_i - B; False: the models X_i
    gram: dict[str, list[list[float]]]  # tensor name -> exact K x K Gram matrix of the vectors
    numels: dict[str, int]
    read: Callable[[str], TensorInputs] | None = None

    def merged(self, name: str) -> torch.Tensor:
        """Tensor ``name`` of this candidate's merged model (compute dtype), read from the
        object store on demand: what a data-aware objective evaluates."""
        if self.read is None:
            raise ResolveError(
                f"strategy {self.strategy}: no object store behind this search; tensors of a "
                "candidate are only available inside a resolution"
            )
        inputs = replace(self.read(name), model=self.coefficients[name])
        return merge_with_coefficients(inputs, {})


# -- statistics pass ----------------------------------------------------------------------------


def collect_gram(inputs: TensorInputs, params: Mapping[str, Any]) -> list[list[float]]:
    """G[i][j] = <v_i, v_j> (exact float64 dot products), v_i = X_i - B or X_i."""
    vectors = inputs.tensors
    if inputs.base is not None:
        for t in vectors:
            t.sub_(inputs.base)  # owned by this call
    return common.gram(vectors)


# -- objectives ---------------------------------------------------------------------------------


def _over_tasks(
    gram: Sequence[Sequence[float]], w: Sequence[float], term: Callable[[int], float]
) -> float:
    """sum_i w_i term(i) / sum_i w_i over the i with G_ii > 0 (0 if none): the objectives'
    weighted mean over the tasks whose vector is not zero."""
    total = 0.0
    wsum = 0.0
    for i in range(len(gram)):
        if gram[i][i] > 0:
            total += w[i] * term(i)
            wsum += w[i]
    return total / wsum if wsum > 0 else 0.0


def _gradient_over_tasks(
    gram: Sequence[Sequence[float]],
    w: Sequence[float],
    term: Callable[[int, float], tuple[float, Sequence[float]]],
) -> list[float]:
    """sum_i f_i d_i over the i with G_ii > 0, where (f_i, d_i) = term(i, sum of those w_i):
    the gradient of an :func:`_over_tasks` objective (0 where that sum is not positive)."""
    k = len(gram)
    grad = [0.0] * k
    wsum = math.fsum(w[i] for i in range(k) if gram[i][i] > 0)
    if wsum <= 0:
        return grad
    for i in range(k):
        if gram[i][i] > 0:
            f, d = term(i, wsum)
            for j in range(k):
                grad[j] += f * d[j]
    return grad


def _retention_residual(row: Sequence[float], lam: Sequence[float], i: int) -> float:
    """(G lam)_i / G_ii - 1."""
    return math.fsum(g * c for g, c in zip(row, lam, strict=True)) / row[i] - 1.0


def retention_loss(
    gram: Sequence[Sequence[float]], lam: Sequence[float], w: Sequence[float]
) -> float:
    """sum_i w_i ((G lam)_i / G_ii - 1)^2 / sum_i w_i over the i with G_ii > 0 (0 if none)."""

    def term(i: int) -> float:
        r = _retention_residual(gram[i], lam, i)
        return r * r

    return _over_tasks(gram, w, term)


def _retention_grad(
    gram: Sequence[Sequence[float]], lam: Sequence[float], w: Sequence[float]
) -> list[float]:
    def term(i: int, wsum: float) -> tuple[float, Sequence[float]]:
        row = gram[i]
        return 2.0 * w[i] * _retention_residual(row, lam, i) / (row[i] * wsum), row

    return _gradient_over_tasks(gram, w, term)


def _distance_loss(
    gram: Sequence[Sequence[float]], c: Sequence[float], w: Sequence[float]
) -> float:
    """sum_i w_i ||sum_j c_j v_j - v_i||^2 / G_ii / sum_i w_i over the i with G_ii > 0."""
    k = len(c)
    gc = [math.fsum(gram[i][j] * c[j] for j in range(k)) for i in range(k)]
    cgc = math.fsum(c[i] * gc[i] for i in range(k))
    return _over_tasks(gram, w, lambda i: (cgc - 2.0 * gc[i] + gram[i][i]) / gram[i][i])


def _distance_grad(
    gram: Sequence[Sequence[float]], c: Sequence[float], w: Sequence[float]
) -> list[float]:
    k = len(c)
    gc = [math.fsum(gram[i][j] * c[j] for j in range(k)) for i in range(k)]

    def term(i: int, wsum: float) -> tuple[float, Sequence[float]]:
        return 2.0 * w[i] / (gram[i][i] * wsum), [gc[j] - gram[i][j] for j in range(k)]

    return _gradient_over_tasks(gram, w, term)


@dataclass
class Problem:
    """The coefficients of a search: a flat vector x of K (task-wise) or K per tensor name
    (layer-wise, names in sorted order), and the objective on x."""

    strategy: str
    context: ModelContext
    layerwise: bool
    plugin: Callable[[Candidate], float] | None
    plugin_name: str

    def __post_init__(self) -> None:
        total = sum(self.context.numels.values())
        self._shares = {n: (c / total if total else 0.0) for n, c in self.context.numels.items()}

    @property
    def k(self) -> int:
        return len(self.context.contribution_ids)

    @property
    def names(self) -> list[str]:
        return list(self.context.summaries)

    def share(self, name: str) -> float:
        """The tensor's fraction of the model's elements (the weight of its loss term)."""
        return self._shares[name]

    def size(self) -> int:
        return self.k * (len(self.names) if self.layerwise else 1)

    def coefficients(self, x: Sequence[float]) -> dict[str, list[float]]:
        k = self.k
        if not self.layerwise:
            return {n: list(x[:k]) for n in self.names}
        return {n: list(x[i * k : (i + 1) * k]) for i, n in enumerate(self.names)}

    def plugin_loss(self, x: Sequence[float]) -> float:
        assert self.plugin is not None
        candidate = Candidate(
            strategy=self.strategy,
            coefficients=self.coefficients(x),
            contribution_ids=list(self.context.contribution_ids),
            weights=list(self.context.weights),
            has_base=self.context.has_base,
            gram={n: [list(r) for r in g] for n, g in self.context.summaries.items()},
            numels=dict(self.context.numels),
            read=self.context.read,
        )
        try:
            value = float(self.plugin(candidate))
        except ResolveError:
            raise
        except Exception as exc:  # noqa: BLE001 - foreign code
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ResolveError(
                f"strategy {self.strategy}: objective plugin {self.plugin_name!r} failed: {first}"
            ) from None
        if not math.isfinite(value):
            raise ResolveError(
                f"strategy {self.strategy}: objective plugin {self.plugin_name!r} returned "
                f"{value}, not a finite number"
            )
        return value

    def per_layer(
        self,
        x: Sequence[float],
        fn: Callable[[Sequence[Sequence[float]], Sequence[float], Sequence[float]], float],
    ) -> float:
        coeffs = self.coefficients(x)
        w = self.context.weights
        return math.fsum(
            self.share(n) * fn(g, coeffs[n], w) for n, g in self.context.summaries.items()
        )

    def per_layer_grad(
        self,
        x: Sequence[float],
        fn: Callable[[Sequence[Sequence[float]], Sequence[float], Sequence[float]], list[float]],
    ) -> list[float]:
        coeffs = self.coefficients(x)
        w = self.context.weights
        k = self.k
        grad = [0.0] * self.size()
        for index, (n, g) in enumerate(self.context.summaries.items()):
            s = self.share(n)
            part = fn(g, coeffs[n], w)
            offset = index * k if self.layerwise else 0
            for j in range(k):
                grad[offset + j] += s * part[j]
        return grad


def _plugin_or_none(strategy: str, name: str) -> Callable[[Candidate], float] | None:
    return None if name == "" else load_plugin(FITNESS_GROUP, name)


def _finite_difference(
    loss: Callable[[list[float]], float], x: list[float], h: float
) -> list[float]:
    """Central differences (f(x + h e_j) - f(x - h e_j)) / 2h, j in order."""
    grad = []
    for j in range(len(x)):
        up = list(x)
        down = list(x)
        up[j] += h
        down[j] -= h
        grad.append((loss(up) - loss(down)) / (2.0 * h))
    return grad


_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


def _adam(
    grad: Callable[[list[float]], list[float]],
    x: list[float],
    steps: int,
    lr: float,
    lo: float = -math.inf,
    hi: float = math.inf,
) -> list[float]:
    """``steps`` steps of Adam (Kingma & Ba 2015; betas 0.9, 0.999, eps 1e-8) from ``x``, each
    result clipped to [lo, hi].  Plain float64 scalar arithmetic in a fixed order; the bias
    corrections use running products of the betas (no ``pow``, whose libm result may differ
    between platforms) and ``math.sqrt`` (correctly rounded by IEEE 754)."""
    b1, b2 = _ADAM_BETAS
    m = [0.0] * len(x)
    v = [0.0] * len(x)
    b1t = b2t = 1.0
    for _ in range(steps):
        g = grad(x)
        b1t *= b1
        b2t *= b2
        for j, gj in enumerate(g):
            m[j] = b1 * m[j] + (1.0 - b1) * gj
            v[j] = b2 * v[j] + (1.0 - b2) * (gj * gj)
            m_hat = m[j] / (1.0 - b1t)
            v_hat = v[j] / (1.0 - b2t)
            x[j] = min(max(x[j] - lr * m_hat / (math.sqrt(v_hat) + _ADAM_EPS), lo), hi)
    return x


def _check(strategy: str, ok: bool, message: str) -> None:
    if not ok:
        raise ResolveError(f"strategy {strategy}: {message}")


def _positive_weights(strategy: str, context: ModelContext) -> None:
    for cid, w in zip(context.contribution_ids, context.weights, strict=True):
        _check(strategy, w > 0, f"contribution {cid[:12]} has weight {w:g}; weights must be > 0")


def _report(
    problem: Problem, x: Sequence[float], loss: float, extra: dict[str, Any]
) -> ModelValues:
    coeffs = problem.coefficients(x)
    shown: Any = coeffs if problem.layerwise else list(x[: problem.k])
    report = {
        "method": problem.strategy,
        "objective": problem.plugin_name or "data-free",
        "loss": loss,
        "coefficients": shown,
        **extra,
    }
    report["granularity"] = "layer" if problem.layerwise else "task"
    if problem.plugin_name:
        report["plugin"] = plugin_origin(FITNESS_GROUP, problem.plugin_name)
    return ModelValues(per_tensor=coeffs, report=report)


# -- per-tensor pass (shared) -------------------------------------------------------------------


def merge_with_coefficients(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """out = B + sum_i c_i (X_i - B) with a base, sum_i c_i X_i without; c from the search.

    Each product and each add is one rounding, in canonical order (numerics.weighted_sum_)."""
    coeffs: list[float] = inputs.model
    if inputs.base is None:
        return numerics.weighted_sum_(inputs.tensors, coeffs)
    for t in inputs.tensors:
        t.sub_(inputs.base)
    return numerics.weighted_sum_(inputs.tensors, coeffs) + inputs.base


# -- AdaMerging ---------------------------------------------------------------------------------


def _search_loss(problem: Problem) -> Callable[[list[float]], float]:
    """The plugin's loss, or the data-free task-retention loss over the layers."""

    def loss(x: list[float]) -> float:
        if problem.plugin is not None:
            return problem.plugin_loss(x)
        return problem.per_layer(x, retention_loss)

    return loss


def _descent_settings(
    name: str, context: ModelContext, params: Mapping[str, Any]
) -> tuple[int, float]:
    """(steps, lr) of a search by Adam (ada_merging, dam), checked after the weights."""
    _positive_weights(name, context)
    steps: int = params["steps"]
    lr: float = params["lr"]
    _check(name, steps >= 0, f"parameter steps must be >= 0, got {steps}")
    _check(name, lr > 0, f"parameter lr must be > 0, got {lr}")
    return steps, lr


def _fd_step(name: str, params: Mapping[str, Any]) -> float:
    """The step of the central differences through a plugin objective, checked."""
    h: float = params["fd_step"]
    _check(name, h > 0, f"parameter fd_step must be > 0, got {h}")
    return h


def _granularity(strategy: str, params: Mapping[str, Any]) -> bool:
    value = params["granularity"]
    _check(
        strategy,
        value in ("task", "layer"),
        f"parameter granularity must be task or layer, got {value!r}",
    )
    return bool(value == "layer")


def finish_ada_merging(context: ModelContext, params: Mapping[str, Any]) -> ModelValues:
    name = "ada_merging"
    steps, lr = _descent_settings(name, context, params)
    init: float = params["init"]
    _check(name, 0 <= init <= 1, f"parameter init must be in [0, 1], got {init}")
    h = _fd_step(name, params)
    problem = Problem(
        name,
        context,
        _granularity(name, params),
        _plugin_or_none(name, params["objective"]),
        params["objective"],
    )
    loss = _search_loss(problem)

    def grad(x: list[float]) -> list[float]:
        if problem.plugin is None:
            return problem.per_layer_grad(x, _retention_grad)
        return _finite_difference(loss, x, h)

    x = _adam(grad, [init] * problem.size(), steps, lr, 0.0, 1.0)
    return _report(problem, x, loss(x), {"steps": steps})


def merge_ada_merging(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """out = B + sum_i lambda_i^l (X_i - B),   lambda = argmin_{lambda in [0,1]} L(lambda)

    AdaMerging (Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning",
    ICLR 2024): task-wise (one lambda_i per contribution) or layer-wise (one per contribution and
    tensor, granularity=layer) coefficients, initialised to ``init`` (the paper's 0.3) and
    refined by ``steps`` fixed steps of Adam (the paper's optimizer; step ``lr``, each step
    clipped to [0, 1] as in the paper's code).  The paper minimises the entropy of the merged
    model's predictions on unlabeled test data; here L is a plugin objective
    (``objective=NAME``, gradients by central differences of step ``fd_step``) or, by
    default, the data-free task-retention surrogate
    L = sum_l s_l sum_i w_i ((G^l lambda^l)_i / G^l_ii - 1)^2 / sum_i w_i, where G^l is the
    exact Gram matrix of the task vectors of tensor l and s_l its share of the model's
    elements: each task keeps its own update's length along its own direction, overlapping
    tasks are scaled down.  Weights w_i (> 0) weigh the tasks in L."""
    return merge_with_coefficients(inputs, params)


_PLUGIN_HELP = "name of an installed git_crdt_merge.fitness entry point ('' = data-free)"

register(
    Strategy(
        name="ada_merging",
        aliases=("adamerging",),
        params=(
            Param("granularity", str, "layer", help="task or layer coefficients"),
            Param("init", float, 0.3, help="initial coefficient"),
            Param("steps", int, 200, help="Adam steps"),
            Param("lr", float, 0.01, help="Adam step size"),
            Param("objective", str, "", help=_PLUGIN_HELP),
            Param("fd_step", float, 1e-3, help="finite-difference step for plugin objectives"),
        ),
        base="required",
        stochastic=False,
        merge=merge_ada_merging,
        summary="AdaMerging: task arithmetic with task- or layer-wise coefficients optimised",
        model_pass=ModelPass(collect_gram, finish_ada_merging),
    )
)


# -- DAM ----------------------------------------------------------------------------------------


def _dam_regularisers(
    x: Sequence[float], k: int, n_layers: int, params: Mapping[str, Any]
) -> tuple[float, list[float]]:
    """(value, gradient) of gamma_cos * mean_{i<j} cos(c_i, c_j) + gamma_l1 * mean |c| +
    gamma_l2 * mean c^2, with c_i the vector of contribution i's coefficients over layers."""
    g_cos: float = params["cosine_weight"]
    g_l1: float = params["l1_weight"]
    g_l2: float = params["l2_weight"]
    count = len(x)
    grad = [0.0] * count
    value = 0.0
    if count:
        value += g_l1 * math.fsum(abs(v) for v in x) / count
        value += g_l2 * math.fsum(v * v for v in x) / count
        for p, v in enumerate(x):
            sign = 1.0 if v > 0 else (-1.0 if v < 0 else 0.0)
            grad[p] += g_l1 * sign / count + g_l2 * 2.0 * v / count
    pairs = k * (k - 1) // 2
    if g_cos and pairs:
        vecs = [[x[layer * k + i] for layer in range(n_layers)] for i in range(k)]
        norms = [math.sqrt(math.fsum(v * v for v in vec)) for vec in vecs]
        for i in range(k):
            for j in range(i + 1, k):
                if norms[i] == 0 or norms[j] == 0:
                    continue
                dot = math.fsum(a * b for a, b in zip(vecs[i], vecs[j], strict=True))
                cos = dot / (norms[i] * norms[j])
                value += g_cos * cos / pairs
                for layer in range(n_layers):
                    a, b = vecs[i][layer], vecs[j][layer]
                    da = b / (norms[i] * norms[j]) - cos * a / (norms[i] * norms[i])
                    db = a / (norms[i] * norms[j]) - cos * b / (norms[j] * norms[j])
                    grad[layer * k + i] += g_cos * da / pairs
                    grad[layer * k + j] += g_cos * db / pairs
    return value, grad


def finish_dam(context: ModelContext, params: Mapping[str, Any]) -> ModelValues:
    name = "dam"
    steps, lr = _descent_settings(name, context, params)
    h = _fd_step(name, params)
    for key in ("cosine_weight", "l1_weight", "l2_weight"):
        _check(name, params[key] >= 0, f"parameter {key} must be >= 0, got {params[key]}")
    problem = Problem(
        name, context, True, _plugin_or_none(name, params["objective"]), params["objective"]
    )
    k, n_layers = problem.k, len(problem.names)
    wsum = math.fsum(context.weights)
    x = [w / wsum for w in context.weights] * n_layers

    def data_loss(x: list[float]) -> float:
        if problem.plugin is not None:
            return problem.plugin_loss(x)
        return problem.per_layer(x, _distance_loss)

    def loss(x: list[float]) -> float:
        return data_loss(x) + _dam_regularisers(x, k, n_layers, params)[0]

    def grad(x: list[float]) -> list[float]:
        if problem.plugin is None:
            data = problem.per_layer_grad(x, _distance_grad)
        else:
            data = _finite_difference(data_loss, x, h)
        reg = _dam_regularisers(x, k, n_layers, params)[1]
        return [a + b for a, b in zip(data, reg, strict=True)]

    x = _adam(grad, x, steps, lr)
    return _report(problem, x, loss(x), {"steps": steps})


def merge_dam(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """out = sum_i c_i^l X_i,   c = argmin L(c) + regularisers

    Differentiable Adaptive Merging (Gauthier-Caron et al., "Merging in a Bottle:
    Differentiable Adaptive Merging (DAM) and the Path from Averaging to Automation", 2024):
    scaling coefficients per model, trained against the KL divergence between the merged
    model's and each model's outputs on data, plus a cosine-similarity penalty between the
    models' coefficient vectors and L1/L2 penalties.  Here: one coefficient per model and
    tensor (the paper scales each input column), initialised to w_i / sum w, ``steps`` fixed
    Adam steps of size ``lr``; the data term L is a plugin objective (``objective=NAME``,
    central differences of step ``fd_step``) or, by default, the data-free distance surrogate
    L = sum_l s_l sum_i w_i ||sum_j c_j^l X_j^l - X_i^l||^2 / ||X_i^l||^2 / sum_i w_i computed
    from the exact Gram matrices; the penalties are cosine_weight * mean_{i<j} cos(c_i, c_j) +
    l1_weight * mean |c| + l2_weight * mean c^2 over the coefficient vectors c_i (one entry per
    tensor), all 0 by default: against the data-free term, which is nearly flat when the models
    are close, the cosine penalty drives coefficients negative.  The base is not used."""
    return merge_with_coefficients(inputs, params)


register(
    Strategy(
        name="dam",
        params=(
            Param("steps", int, 200, help="Adam steps"),
            Param("lr", float, 0.01, help="Adam step size"),
            Param("cosine_weight", float, 0.0, help="cosine-similarity penalty"),
            Param("l1_weight", float, 0.0, help="L1 penalty on the coefficients"),
            Param("l2_weight", float, 0.0, help="L2 penalty on the coefficients"),
            Param("objective", str, "", help=_PLUGIN_HELP),
            Param("fd_step", float, 1e-3, help="finite-difference step for plugin objectives"),
        ),
        base="ignored",
        stochastic=False,
        merge=merge_dam,
        summary="DAM: per-model, per-tensor scaling coefficients optimised by gradient descent",
        model_pass=ModelPass(collect_gram, finish_dam),
    )
)


# -- evolutionary and genetic searches ----------------------------------------------------------


def _search_problem(name: str, context: ModelContext, params: Mapping[str, Any]) -> Problem:
    _positive_weights(name, context)
    size: int = params["population_size"]
    gens: int = params["generations"]
    _check(name, size >= 2, f"parameter population_size must be >= 2, got {size}")
    _check(name, gens >= 0, f"parameter generations must be >= 0, got {gens}")
    plugin = _plugin_or_none(name, params["fitness"])
    return Problem(name, context, False, plugin, params["fitness"])


def _center(context: ModelContext) -> list[float]:
    """Where the search starts: task arithmetic (all 1) with a base, the weighted average
    without."""
    if context.has_base:
        return [1.0] * len(context.weights)
    wsum = math.fsum(context.weights)
    return [w / wsum for w in context.weights]


def _stream_name(strategy: str) -> str:
    return f"search:{strategy}"  # a stream of its own: contribution ids are hex, never this


def _unit_noise(u: float) -> float:
    """sqrt(3) (2u - 1): uniform noise of unit variance from u in [0, 1)."""
    return _SQRT3 * (2.0 * u - 1.0)


def _first_generation(
    problem: Problem,
    loss: Callable[[list[float]], float],
    size: int,
    spread: float,
) -> tuple[list[list[float]], list[float]]:
    """The centre and ``size - 1`` members centre + spread * noise (stream "init"), with their
    losses: where the evolutionary and the genetic search start."""
    k = problem.k
    center = _center(problem.context)
    u = problem.context.rng.uniform(_stream_name(problem.strategy), "init", size * k).tolist()
    pop = [center] + [
        [center[j] + spread * _unit_noise(u[p * k + j]) for j in range(k)] for p in range(1, size)
    ]
    return pop, [loss(x) for x in pop]


def _fittest(
    problem: Problem, pop: Sequence[list[float]], losses: Sequence[float], generations: int
) -> ModelValues:
    """The report of the member with the lowest loss (ties: lowest index)."""
    best = min(range(len(pop)), key=lambda p: (losses[p], p))
    return _report(problem, pop[best], losses[best], {"generations": generations})


def finish_evolutionary(context: ModelContext, params: Mapping[str, Any]) -> ModelValues:
    name = "evolutionary_merge"
    problem = _search_problem(name, context, params)
    sigma: float = params["sigma"]
    _check(name, sigma > 0, f"parameter sigma must be > 0, got {sigma}")
    size: int = params["population_size"]
    loss = _search_loss(problem)
    k = problem.k
    pop, losses = _first_generation(problem, loss, size, sigma)
    elite_n = (size + 1) // 2
    for gen in range(params["generations"]):
        order = sorted(range(size), key=lambda p: (losses[p], p))
        elite = [pop[p] for p in order[:elite_n]]
        elite_losses = [losses[p] for p in order[:elite_n]]
        noise = context.rng.uniform(
            _stream_name(name), f"generation:{gen}", (size - elite_n) * k
        ).tolist()
        children = [
            [elite[c % elite_n][j] + sigma * _unit_noise(noise[c * k + j]) for j in range(k)]
            for c in range(size - elite_n)
        ]
        pop = elite + children
        losses = elite_losses + [loss(x) for x in children]
    return _fittest(problem, pop, losses, params["generations"])


def merge_evolutionary(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """out = B + sum_i c_i (X_i - B) with a base, sum_i c_i X_i without; c from an evolution
    strategy.

    Evolutionary model merging (Akiba et al., "Evolutionary Optimization of Model Merging
    Recipes", 2024) searches merge coefficients with an evolution strategy (CMA-ES there)
    against task scores.  Here: a truncation evolution strategy over one coefficient vector
    c (K entries): population_size members, the first the centre (all 1 with a base, w_i /
    sum w without), the others centre + sigma * noise; each of ``generations`` rounds keeps the
    better half (ties by index) and refills the rest with elite[j mod E] + sigma * noise.
    noise = sqrt(3) (2u - 1) (uniform, unit variance), u from the RandomStream seeded by the
    Merkle root (stream "search:evolutionary_merge").  Fitness: a plugin loss (``fitness=NAME``)
    or the data-free task-retention loss of ada_merging on the exact Gram statistics (so
    candidates never re-read the model).  Weights w_i (> 0) weigh the retention loss."""
    return merge_with_coefficients(inputs, params)


register(
    Strategy(
        name="evolutionary_merge",
        params=(
            Param("population_size", int, 20, help="candidates per generation (>= 2)"),
            Param("generations", int, 50, help="rounds of selection and mutation"),
            Param("sigma", float, 0.1, help="mutation scale (standard deviation)"),
            Param("fitness", str, "", help=_PLUGIN_HELP),
        ),
        base="optional",
        stochastic=True,
        merge=merge_evolutionary,
        summary="Evolutionary merge: coefficients from a seeded evolution strategy",
        model_pass=ModelPass(collect_gram, finish_evolutionary),
    )
)


_INIT_SPREAD = 0.3  # standard deviation of the initial population around the centre


def _tournament(draws: Sequence[int], size: int, losses: Sequence[float]) -> int:
    """The best (lowest loss, then lowest index) of the members floor(bits * size / 2^32)."""
    picks = [(bits * size) >> 32 for bits in draws]
    return min(picks, key=lambda p: (losses[p], p))


def finish_genetic(context: ModelContext, params: Mapping[str, Any]) -> ModelValues:
    name = "genetic_merge"
    problem = _search_problem(name, context, params)
    rate: float = params["mutation_rate"]
    _check(name, 0 < rate <= 1, f"parameter mutation_rate must be in (0, 1], got {rate}")
    size: int = params["population_size"]
    loss = _search_loss(problem)
    k = problem.k
    pop, losses = _first_generation(problem, loss, size, _INIT_SPREAD)
    per_child = 6 + 3 * k
    for gen in range(params["generations"]):
        bits = context.rng.bits(_stream_name(name), f"generation:{gen}", (size - 1) * per_child)
        draws = bits.tolist()
        best = min(range(size), key=lambda p: (losses[p], p))
        new_pop = [pop[best]]
        new_losses = [losses[best]]
        for c in range(size - 1):
            d = draws[c * per_child : (c + 1) * per_child]

            a = pop[_tournament(d[0:3], size, losses)]
            b = pop[_tournament(d[3:6], size, losses)]
            child = []
            for j in range(k):
                coin, hit, noise = d[6 + 3 * j], d[7 + 3 * j], d[8 + 3 * j]
                gene = a[j] if coin < 2**31 else b[j]
                if hit < numerics.threshold_u32(rate):
                    gene = gene + rate * _unit_noise(noise / 2**32)
                child.append(gene)
            new_pop.append(child)
            new_losses.append(loss(child))
        pop, losses = new_pop, new_losses
    return _fittest(problem, pop, losses, params["generations"])


def merge_genetic(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """out = B + sum_i c_i (X_i - B) with a base, sum_i c_i X_i without; c from a genetic
    algorithm.

    A genetic algorithm (Holland 1975; as used for merge recipes by the paper's genetic_merge)
    over one coefficient vector c (K genes): the initial population is the centre (all 1 with a
    base, w_i / sum w without) and centre + 0.3 * noise; each of ``generations`` rounds keeps
    the best member (elitism) and breeds the rest: two parents by tournaments of 3 (uniform
    picks floor(bits * P / 2^32), best loss wins, ties by index), uniform crossover (gene from
    the first parent iff bits < 2^31), and per gene with probability mutation_rate a mutation
    of mutation_rate * noise.  noise = sqrt(3) (2u - 1); all draws from the RandomStream seeded
    by the Merkle root (stream "search:genetic_merge").  Fitness: a plugin loss
    (``fitness=NAME``) or ada_merging's data-free task-retention loss on the Gram statistics.
    Weights w_i (> 0) weigh the retention loss."""
    return merge_with_coefficients(inputs, params)


register(
    Strategy(
        name="genetic_merge",
        params=(
            Param("population_size", int, 20, help="candidates per generation (>= 2)"),
            Param("generations", int, 50, help="rounds of selection and breeding"),
            Param("mutation_rate", float, 0.1, help="mutation probability and scale"),
            Param("fitness", str, "", help=_PLUGIN_HELP),
        ),
        base="optional",
        stochastic=True,
        merge=merge_genetic,
        summary="Genetic merge: coefficients from a seeded genetic algorithm",
        model_pass=ModelPass(collect_gram, finish_genetic),
    )
)
