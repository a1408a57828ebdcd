"""Which attention heads go, and the refit of what remains: stage 1's unit inside attention.

A block's attention output is ``o(z) = sum_h z_h W_h^T + b``: each head h adds its context
``z_h`` (the output projection's input, ``head_dim`` columns) through its own columns ``W_h`` of
the output projection. Removing heads therefore leaves a least-squares problem of exactly the
shape of the MLP's ``fc2`` refit, with heads as groups of columns: the kept heads' columns and
the bias are refit so that the sublayer reproduces its unpruned output on the calibration
tokens (:func:`vit_pruning.lsq.refit_fc2`, the same normal equations).

Selection, label-free as the neurons':

- with the least-squares refit: the least-squares cost of removing a head given the refit (group Optimal Brain
  Surgeon: with S = G^-1 C the full refit, dropping the columns Q of a head and refitting the
  rest raises the squared error by tr(S_Q^T (G^-1_QQ)^-1 S_Q)); heads go one at a time, S and
  G^-1 updated in closed form after each, so each choice accounts for the compensation.
- otherwise: the energy each head adds to the output, ||z_h W_h^T||^2 over the calibration
  tokens (the heads' activation score).

Without calibration data (or with ``sequential=False``) heads go by weight magnitude, with no
refit (:func:`prune_heads_by_magnitude`), as the neurons do.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .anatomy import Anatomy
from .importance import MLPStats, accumulate, keep_indices
from .lsq import damped_gram, refit_fc2, spd_inverse
from .surgery import head_rows, prune_heads
from .trace import UnprunedTrace, regroup


@torch.no_grad()
def head_stats(anatomy: Anatomy, index: int, inputs: Sequence[torch.Tensor]) -> MLPStats:
    """Gram of [context, 1] and its cross term with the attention output, over block `index`'s
    attention on block inputs `inputs` (the MLP does not run)."""
    o = anatomy.parts[index].heads.linear("o")
    stats: list = [None]

    def take(_module, args, output):
        stats[0] = accumulate(stats[0], args[0].detach(), output.detach())

    handle = o.register_forward_hook(take)
    try:
        for h in inputs:
            anatomy.attention_stream(index, h)
    finally:
        handle.remove()
    return stats[0]


def _refit_solution(stats: MLPStats, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(G^-1, S = G^-1 C): the damped Gram's inverse and the refit over every column."""
    h_inv = spd_inverse(damped_gram(stats, ridge))
    return h_inv, h_inv @ stats.cross.double()


def _head_cost(h_inv: torch.Tensor, sol: torch.Tensor, rows: torch.Tensor
               ) -> tuple[float, torch.Tensor]:
    """A head's (columns `rows`) least-squares cost of removal given the refit,
    tr(S_Q^T (G^-1_QQ)^-1 S_Q), and (G^-1_QQ)^-1."""
    inv = torch.linalg.inv(h_inv[rows][:, rows])
    return float(torch.einsum("ij,ik,jk->", inv, sol[rows], sol[rows])), inv


def _rows(h: int, head_dim: int, device) -> torch.Tensor:
    return head_rows(torch.tensor([h]), head_dim).to(device)


def lsq_keep_heads(stats: MLPStats, num_heads: int, head_dim: int, n_remove: int,
                   ridge: float = 1e-3) -> torch.Tensor:
    """Kept heads chosen by their least-squares cost given the refit (see the module doc)."""
    if n_remove <= 0:
        return torch.arange(num_heads)
    h_inv, sol = _refit_solution(stats, ridge)
    alive = list(range(num_heads))
    for _ in range(n_remove):
        costs = [_head_cost(h_inv, sol, _rows(h, head_dim, sol.device))[0] for h in alive]
        h = alive.pop(min(range(len(alive)), key=lambda k: (costs[k], k)))
        rows = _rows(h, head_dim, sol.device)
        inv = _head_cost(h_inv, sol, rows)[1]
        sol -= h_inv[:, rows] @ (inv @ sol[rows])
        h_inv -= h_inv[:, rows] @ inv @ h_inv[rows]
    return torch.tensor(alive)


def _single_costs(stats: MLPStats, num_heads: int, head_dim: int, ridge: float) -> list[float]:
    """Each head's least-squares cost of removal alone, given the refit of the others (the
    first round of :func:`lsq_keep_heads`)."""
    h_inv, sol = _refit_solution(stats, ridge)
    return [_head_cost(h_inv, sol, _rows(h, head_dim, sol.device))[0] for h in range(num_heads)]


@torch.no_grad()
def head_costs(anatomy: Anatomy, batches: Sequence[torch.Tensor], ridge: float = 1e-3,
               trace: UnprunedTrace | None = None) -> list[list[float]]:
    """Per block, each head's cost of removal on the unpruned model (its least-squares cost
    given the refit, over the calibration tokens), relative to the energy of the block's input
    stream, so that heads of different blocks compare: what the planner allocates heads by
    (:func:`vit_pruning.planner.global_heads`). [] for blocks without attention. `trace`: the
    unpruned model's traced block inputs, of which `batches` are the first rows (no block is
    run again)."""
    sizes = [len(x) for x in batches]
    hidden = regroup(trace.inputs[0], sizes) if trace else [anatomy.embed(x) for x in batches]
    costs: list[list[float]] = []
    for i, parts in enumerate(anatomy.parts):
        if parts.heads is not None:
            stats = head_stats(anatomy, i, hidden)
            energy = max(sum(float(h.double().pow(2).sum()) for h in hidden), 1e-30)
            costs.append([c / energy for c in _single_costs(stats, parts.num_heads,
                                                            parts.heads.head_dim, ridge)])
        else:
            costs.append([])
        if i + 1 < len(anatomy.parts):
            hidden = (regroup(trace.inputs[i + 1], sizes) if trace else
                      [anatomy.transition(i, anatomy.block_forward(i, h)) for h in hidden])
    return costs


def score_keep_heads(stats: MLPStats, o_weight: torch.Tensor, head_dim: int,
                     n_remove: int) -> torch.Tensor:
    """Kept heads: all but the `n_remove` adding the least energy to the output (ties: the
    lower index is kept)."""
    num_heads = o_weight.shape[1] // head_dim
    gram = stats.gram.double()
    w = o_weight.double().to(gram.device)
    energy = []
    for h in range(num_heads):
        rows = slice(h * head_dim, (h + 1) * head_dim)
        w_h = w[:, rows]
        energy.append(float(torch.einsum("oi,ij,oj->", w_h, gram[rows, rows], w_h)))
    return keep_indices(torch.tensor(energy), n_remove)


@torch.no_grad()
def prune_block_heads(anatomy: Anatomy, index: int, inputs: Sequence[torch.Tensor],
                      n_remove: int, compensation: str, ridge: float = 1e-3,
                      refit_damping: tuple[float, bool] | None = None) -> list[int]:
    """Remove `n_remove` heads of block `index`, chosen on calibration block inputs `inputs`,
    and refit the output projection: with compensation "lsq" the heads go by their
    least-squares cost given the refit and the rest are refit by least squares (a dozen heads
    make the exact cost cheap: unlike the neurons', no cheaper score is worth trying); with
    "bias" or "none" they go by the energy they add, and the removed heads' mean output is
    folded into the bias ("bias") or nothing is refit ("none"). `ridge` damps the selection;
    `refit_damping` (damping, anchored), the refit (:func:`vit_pruning.lsq.refit_fc2`; default:
    `ridge` toward zero). Returns the kept heads (their original indices)."""
    parts = anatomy.parts[index]
    slots = parts.heads
    if n_remove <= 0:
        return list(range(parts.num_heads))
    stats = head_stats(anatomy, index, inputs)
    o = slots.linear("o")
    if compensation == "lsq":
        keep = lsq_keep_heads(stats, slots.num_heads, slots.head_dim, n_remove, ridge)
    else:
        keep = score_keep_heads(stats, o.weight, slots.head_dim, n_remove)
    weight = bias = None
    if compensation != "none":
        fit_ridge, anchored = refit_damping or (ridge, False)
        weight, bias = refit_fc2(o, stats, head_rows(keep, slots.head_dim), compensation,
                                 fit_ridge, anchored=anchored)
    prune_heads(parts, keep, weight, bias)
    return keep.tolist()


def magnitude_keep_heads(parts, n_remove: int) -> torch.Tensor:
    """Kept heads without data: all but the `n_remove` with the smallest product of their value
    rows' and output columns' norms (the size of the map a head adds; ties: lower index kept)."""
    slots = parts.heads
    rows = [head_rows(torch.tensor([h]), slots.head_dim) for h in range(slots.num_heads)]
    v, o = slots.linear("v").weight.detach(), slots.linear("o").weight.detach()
    return keep_indices(torch.tensor([float(v[r].norm() * o[:, r].norm()) for r in rows]), n_remove)


@torch.no_grad()
def prune_heads_by_magnitude(anatomy: Anatomy, heads: Sequence[int]) -> list[list[int]]:
    """Remove `heads[i]` heads of each block by weight magnitude (no data, no refit); returns
    the kept heads per block."""
    kept = []
    for parts, n in zip(anatomy.parts, heads):
        if n and parts.heads is not None:
            keep = magnitude_keep_heads(parts, int(n))
            prune_heads(parts, keep)
            kept.append(keep.tolist())
        else:
            kept.append(list(range(parts.num_heads)))
    return kept
