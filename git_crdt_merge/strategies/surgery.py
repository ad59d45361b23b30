"""Representation Surgery: task arithmetic plus one closed-form linear surgery module per task
and linear layer, written beside the merged model as ``surgery.safetensors``.

The modules need each contribution's Gram matrices of its layer inputs (``add-contribution
--gram``, as for RegMean); the merged weights themselves are plain task arithmetic, so the
model files stay a drop-in replacement for the base.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .. import numerics
from ..errors import CpuError, ResolveError
from .registry import Param, Strategy, TensorInputs, register
from .task_arithmetic import VARIANTS, generalized_task_arithmetic

__all__ = ["SURGERY_FILE", "merge_representation_surgery", "surgery_factors", "surgery_module"]

SURGERY_FILE = "surgery.safetensors"
"""The output folder's file of surgery modules: tensor ``"<contribution id>/<weight name>"``."""

_TASK_ARITHMETIC = next(v for v in VARIANTS if v.name == "task_arithmetic")


def surgery_module(
    merged: torch.Tensor, task: torch.Tensor, gram: torch.Tensor, ridge: float
) -> torch.Tensor:
    """M = (W_m - W_t) G W_m^T (W_m G W_m^T + lambda I)^-1   (out, out), float64

    with lambda = ridge * tr(W_m G W_m^T) / out.  M = I - S for the S that minimises
    sum_x ||S W_m x - W_t x||^2 + lambda ||S - I||_F^2 over the inputs x of the layer
    (G = sum_x x x^T): setting the gradient 2 (S P - W_t G W_m^T + lambda (S - I)) to zero,
    P = W_m G W_m^T, gives S = (W_t G W_m^T + lambda I)(P + lambda I)^-1, and
    I - S = (P + lambda I - W_t G W_m^T - lambda I)(P + lambda I)^-1 = (W_m - W_t) G W_m^T
    (P + lambda I)^-1, computed in that form (no cancellation against I).  Products through
    numerics.matmul, P through numerics.matmul_symmetric (its lower triangle, mirrored: exactly
    symmetric, about half the work), lambda's trace summed with math.fsum (correctly rounded),
    M^T = (P + lambda I)^-1 C^T by Cholesky (numerics.solve_spd: P + lambda I is symmetric
    positive definite for lambda > 0)."""
    return _fit(merged, task, gram, ridge)[0]


def surgery_factors(
    merged: torch.Tensor, task: torch.Tensor, gram: torch.Tensor, ridge: float, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, D) with U (out, r) and D = U^T M (r, out), r = min(rank, out): M_r = U D is the
    best module of rank <= r for the same objective (reduced-rank ridge regression).

    The objective is ||M Z - R||^2 + lambda ||M||^2 with Z = W_m X^T, R = (W_m - W_t) X^T, a
    least-squares fit on the data augmented by sqrt(lambda) I; its rank-r optimum projects the
    full solution M onto the r leading eigenvectors U of the fitted values' covariance
    M (P + lambda I) M^T = C M^T (C = (W_m - W_t) G W_m^T, a symmetric product: through
    numerics.matmul_symmetric), taken with numerics.eigh (deterministic signs), largest
    eigenvalue first."""
    module, c = _fit(merged, task, gram, ridge)
    fitted = numerics.matmul_symmetric(c, module.T)  # C (P + lambda I)^-1 C^T
    _, vectors = numerics.eigh(fitted)
    r = min(rank, module.shape[0])
    up = vectors[:, vectors.shape[1] - r :].flip(1).contiguous()
    return up, numerics.matmul(up.T, module)


def _fit(
    merged: torch.Tensor, task: torch.Tensor, gram: torch.Tensor, ridge: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, C) of :func:`surgery_module`, C = (W_m - W_t) G W_m^T."""
    merged64 = merged.to(torch.float64)
    diff = merged64 - task.to(torch.float64)  # one rounding per element
    gw = numerics.matmul(gram, merged64.T)  # (in, out) = G W_m^T
    p = numerics.matmul_symmetric(merged64, gw)  # W_m G W_m^T, exactly symmetric
    c = numerics.matmul(diff, gw)  # (out, out)
    out = p.shape[0]
    trace = math.fsum(p.diagonal().tolist())
    lam = ridge * trace / out
    if trace == 0.0:  # no signal in this task's inputs through W_m: nothing to correct
        return torch.zeros_like(c), c
    if lam != 0.0:
        p.diagonal().add_(lam)
    try:
        module_t = numerics.solve_spd(p, c.T.contiguous())
    except RuntimeError:  # torch.linalg.LinAlgError: singular
        raise ResolveError(
            "W_m G W_m^T is singular (fewer independent inputs than outputs); set ridge > 0"
        ) from None
    return module_t.T.contiguous(), c


def merge_representation_surgery(inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
    """W_m = B + lambda * sum_i w_i (X_i - B);   for each task t with a Gram matrix G_t of
    this weight: M_t = (W_m - W_t) G_t W_m^T (W_m G_t W_m^T + lambda_t I)^-1,
    lambda_t = ridge * tr(W_m G_t W_m^T) / out

    Representation Surgery (Yang, Shen, Wang, Chen, Guo, Tao & Shen, "Representation Surgery
    for Multi-Task Model Merging", ICML 2024): the merged model's representation z_m = W_m x
    of task t's data drifts from the task model's z_t = W_t x; a per-task module f_t corrects
    it as z^ = z_m - f_t(z_m).  Here f_t(z) = M_t z is linear and fitted in closed form from
    the contribution's Gram matrix G_t = X_t^T X_t (its ``gram`` extra input): M_t = I - S_t
    for the S_t minimising sum_x ||S_t W_m x - W_t x||^2 + lambda_t ||S_t - I||_F^2 (L2 and a
    closed form, where the paper trains an adapter under an L1 loss with Adam).  The merged
    weights are task arithmetic (``lambda``, ``normalize`` and the weights w_i as in
    task_arithmetic).  The modules go to the side file ``surgery.safetensors`` as
    ``"<contribution id>/<weight name>"`` (out, out) in the weight's dtype, or with ``rank``
    r > 0 as the factors ``...up`` (out, r) and ``...down`` (r, out) of the best rank-r module
    M_t ~ up @ down (reduced-rank ridge regression; see surgery_factors); a task without a
    Gram matrix for a weight gets no module there (the identity: z^ = z_m)."""
    ridge: float = params["ridge"]
    if not ridge >= 0:
        raise ResolveError(
            f"strategy representation_surgery: parameter ridge must be >= 0, got {ridge}"
        )
    rank: int = params["rank"]
    if rank < 0:
        raise ResolveError(
            f"strategy representation_surgery: parameter rank must be >= 0, got {rank}"
        )
    grams = inputs.extras.get("gram", [None] * len(inputs.tensors))
    side = inputs.side
    # the task models' weights, kept before task arithmetic overwrites its inputs in place
    # (only where a module is wanted and possible: a side dict and a Gram matrix)
    originals = {
        i: inputs.tensors[i].clone()
        for i, g in enumerate(grams)
        if side is not None and g is not None
    }
    merged = generalized_task_arithmetic(_TASK_ARITHMETIC, inputs, params)
    if side is None or not originals:
        return merged
    merged64 = merged.to(torch.float64)  # once for every task's fit (_fit's cast is then free)
    if merged.dim() != 2:  # pragma: no cover - checked when the contribution was added
        raise ResolveError(f"strategy representation_surgery: tensor {inputs.name!r} is not 2-D")
    inner = merged.shape[1]
    for i in sorted(originals):
        gram = grams[i]
        assert gram is not None
        key = f"{inputs.contribution_ids[i]}/{inputs.name}"
        task, gram2d = originals.pop(i), gram.reshape(inner, inner)
        # float64 here, rounded once to the weight's storage dtype by run_strategy
        try:
            if rank == 0:
                side[key] = surgery_module(merged64, task, gram2d, ridge)
            else:
                side[f"{key}.up"], side[f"{key}.down"] = surgery_factors(
                    merged64, task, gram2d, ridge, rank
                )
        except CpuError:
            raise  # about the machine, not this tensor: run_strategy names the strategy
        except ResolveError as exc:
            raise ResolveError(
                f"strategy representation_surgery: tensor {inputs.name!r}, contribution "
                f"{inputs.contribution_ids[i][:12]}: {exc}"
            ) from None
    return merged


register(
    Strategy(
        name="representation_surgery",
        params=(
            Param("lambda", float, 1.0, help="scale of the merged task vector"),
            Param("normalize", bool, False, help="divide by the sum of the weights"),
            Param(
                "rank",
                int,
                0,
                help="0: full out x out modules; r > 0: the best rank-r module, stored as two "
                "factors .up (out, r) and .down (r, out)",
            ),
            Param(
                "ridge",
                float,
                1e-3,
                help="pull of each surgery map towards the identity, relative to the mean "
                "eigenvalue of W_m G W_m^T (>= 0)",
            ),
        ),
        base="required",
        stochastic=False,
        revision=2,  # symmetric products and Cholesky in MKL's AVX2 branch
        merge=merge_representation_surgery,
        summary="task arithmetic plus per-task linear surgery modules (surgery.safetensors) "
        "fitted from the Gram matrices",
        extra_inputs=("gram",),
        side_output=SURGERY_FILE,
        compute_bound=True,  # float64 products and a solve per task and weight
        # W_m, W_m - W_t, G W_m^T; the task models' weights; P, C and the solve's out x out
        float64_scratch=(3, 1, 5),
    )
)
