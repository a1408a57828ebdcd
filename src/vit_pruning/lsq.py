"""Least-squares refit of an output projection from calibration statistics: the normal
equations every refit in stage 1 solves (an MLP's fc2 with neurons as columns, an attention
output projection with heads as groups of columns)."""
from __future__ import annotations

import torch
from torch import nn

from .importance import MLPStats


def damping(stats: MLPStats, ridge: float) -> float:
    """The refit's damping: `ridge` times the mean activation energy (the Gram's activation
    diagonal)."""
    return ridge * float(stats.gram.diagonal()[:-1].double().mean())


def damped_gram(stats: MLPStats, ridge: float, index: torch.Tensor | None = None) -> torch.Tensor:
    """The float64 Gram matrix of [activation, 1] with :func:`damping` added to the activation
    diagonal (the bias, last, is not shrunk); with `index`, only those rows and columns, cut
    before the copy (the same values as cutting the whole damped matrix)."""
    width = stats.gram.shape[0] - 1
    if index is None:
        index = torch.arange(width + 1, device=stats.gram.device)
        gram = stats.gram.double().clone()
    else:
        gram = stats.gram.index_select(0, index).index_select(1, index).double()
    gram.diagonal()[index < width] += damping(stats, ridge)
    return gram


def refit_fc2(fc2: nn.Linear, stats: MLPStats, keep: torch.Tensor, mode: str,
              ridge: float = 1e-3, scale: torch.Tensor | None = None, anchored: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New (weight, bias) of a pruned fc2 from calibration statistics.

    "lsq": ridge-regularized least squares over the kept neurons plus bias, fitting
    ``stats.cross`` (what the MLP sublayer should add to the stream). The damping pulls the
    kept weights toward zero, or with `anchored` toward fc2's current (unpruned) weights of
    those columns: the right-hand side gains the damping times them, so a damping that grows
    without bound leaves the weights as they were. With a layer scale (the sublayer adds
    ``scale * fc2(a)``) the fit is of ``scale * fc2`` and the scale is divided out afterwards:
    each output channel is its own least-squares problem, so this is the exact optimum of the
    scaled output. "bias": fold the dropped neurons' mean contribution into the bias, keep the
    weights.
    """
    width = fc2.in_features
    if mode == "bias" and fc2.bias is None:
        raise ValueError("compensation='bias' needs an fc2 with a bias; use 'lsq' or 'none'")
    if mode == "bias":
        gram = stats.gram
        dropped = torch.ones(width, dtype=torch.bool, device=gram.device)
        dropped[keep.to(gram.device)] = False
        mean_act = gram[width, :width].double() / float(gram[width, width])  # ones row / tokens
        bias = fc2.bias.double() + fc2.weight.double()[:, dropped] @ mean_act[dropped]
        return fc2.weight[:, keep].detach().clone(), bias.to(fc2.bias.dtype)
    gram = stats.gram
    k = keep.to(gram.device, torch.long)
    if fc2.bias is not None:  # the constant column of [activation, 1] fits the bias
        k = torch.cat([k, torch.tensor([width], device=gram.device)])
    g_kk = damped_gram(stats, ridge, k)
    rhs = stats.cross[k].double()
    if anchored:  # damping toward the current weights: + damping * (scale *) W[:, keep]^T
        w = fc2.weight.detach().double().to(rhs.device)[:, k[:len(keep)]]
        if scale is not None:
            w = w * scale.detach().double().to(rhs.device)[:, None]
        rhs[:len(keep)] += damping(stats, ridge) * w.T
    chol, info = torch.linalg.cholesky_ex(g_kk)  # damped Gram: positive definite, unless
    # neurons are exactly collinear (then the LU solve below copes)
    sol = torch.cholesky_solve(rhs, chol) if int(info) == 0 else torch.linalg.solve(g_kk, rhs)
    if scale is not None:  # channels a zero scale silences keep any weights: give them zeros
        s = scale.detach().double().to(sol.device)
        sol = torch.where(s.abs() > 0, sol / torch.where(s.abs() > 0, s, 1.0), 0.0)
    if fc2.bias is None:
        return sol.T.to(fc2.weight.dtype), None
    return sol[:-1].T.to(fc2.weight.dtype), sol[-1].to(fc2.bias.dtype)


def spd_inverse(gram: torch.Tensor) -> torch.Tensor:
    """Inverse of a symmetric positive semi-definite matrix; exact collinearity (dead or
    duplicate neurons) gets the smallest extra damping that makes it factorize."""
    jitter = 0.0
    scale = float(gram.diagonal().mean().clamp_min(1e-12))
    for _ in range(12):
        chol, info = torch.linalg.cholesky_ex(gram + jitter * torch.eye(len(gram), dtype=gram.dtype,
                                                                 device=gram.device))
        if int(info) == 0:
            return torch.cholesky_inverse(chol)
        jitter = scale * (1e-10 if jitter == 0 else 10 * jitter / scale)
    raise RuntimeError("calibration Gram matrix could not be factorized (non-finite activations?)")
