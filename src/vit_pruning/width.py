"""Stage 1 (width): remove MLP hidden neurons in every block.

Two entry points:
- :func:`prune_vit_mlp_width` is the seed's API: one-shot, by given scores, calibration
  activations (2SSP score) or weight magnitude.
- :func:`prune_width_sequential` is the default of :func:`vit_pruning.prune_2ssp`: blocks are
  pruned in order on the already-pruned model's activations, and the pruned fc2 is refit by
  least squares (``compensation="lsq"``) or bias folding (``"bias"``) to reproduce the unpruned
  MLP's output on the calibration tokens.
"""
from __future__ import annotations

import logging
from typing import Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .anatomy import Anatomy, resolve
from .batches import take_pixels
from .importance import activation_scores, block_mlp_stats, magnitude_scores, normalized
from .surgery import bypass_attention, prune_mlp_neurons, restore_attention, sync_config

log = logging.getLogger(__name__)

COMPENSATIONS = ("none", "bias", "lsq")
ALLOCATIONS = ("uniform", "global")


def _check_counts(anatomy: Anatomy, counts: Sequence[int], min_remaining: int) -> None:
    if len(counts) != len(anatomy.parts):
        raise ValueError(f"n_to_prune_per_block has {len(counts)} entries, model has "
                         f"{len(anatomy.parts)} blocks")
    for i, (n, p) in enumerate(zip(counts, anatomy.parts)):
        if n < 0 or p.intermediate_size - n < min_remaining:
            raise ValueError(
                f"block {i}: cannot remove {n} of {p.intermediate_size} neurons with "
                f"min_remaining={min_remaining} (allowed 0..{max(0, p.intermediate_size - min_remaining)})")


def keep_indices(score: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Indices of the neurons kept: all but the `n_remove` lowest scores (ties: lower index kept)."""
    order = torch.argsort(score.double(), stable=True, descending=True)
    return order[: score.numel() - n_remove].sort().values


def global_allocation(scores: Sequence[torch.Tensor], total: int, min_remaining: int,
                      blocks: Sequence[int] | None = None) -> list[int]:
    """Per-block counts removing the `total` globally least important neurons (scores normalized
    per block), never leaving a block in `blocks` with fewer than `min_remaining`."""
    blocks = list(range(len(scores))) if blocks is None else list(blocks)
    norm = normalized(scores)
    cand = []
    for i in blocks:
        cap = max(0, norm[i].numel() - min_remaining)
        if cap:
            lowest = torch.sort(norm[i].double()).values[:cap]
            cand.extend((float(v), i, r) for r, v in enumerate(lowest))
    if total > len(cand):
        raise ValueError(f"cannot remove {total} neurons with min_remaining={min_remaining}")
    cand.sort()
    counts = [0] * len(scores)
    for _, i, _ in cand[:total]:
        counts[i] += 1
    return counts


@torch.no_grad()
def prune_vit_mlp_width(model: nn.Module, n_to_prune_per_block: Sequence[int],
                        min_remaining: int = 512, importance: Sequence[torch.Tensor] | None = None,
                        dataloader: Iterable | None = None, device: str | torch.device = "cpu",
                        max_batches: int | None = None) -> nn.Module:
    """Remove `n_to_prune_per_block[i]` MLP neurons from block i, lowest importance first.

    Args:
        importance: one score tensor per block (higher = keep). If None, the 2SSP activation
            score on `dataloader` (first `max_batches` batches), else weight magnitude.
    Returns:
        The same model, with fc1 rows and fc2 columns physically removed.
    """
    anatomy = resolve(model)
    _check_counts(anatomy, n_to_prune_per_block, min_remaining)
    if importance is None:
        if dataloader is not None:
            importance = activation_scores(anatomy, take_pixels(dataloader, max_batches, device))
        else:
            importance = magnitude_scores(anatomy)
    for parts, n, score in zip(anatomy.parts, n_to_prune_per_block, importance):
        if n:
            prune_mlp_neurons(parts, keep_indices(score, int(n)))
    sync_config(resolve(model))
    return model


def refit_fc2(fc2: nn.Linear, gram: torch.Tensor, keep: torch.Tensor, mode: str,
              ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """New (weight, bias) of a pruned fc2 that best reproduce the unpruned output on calibration.

    `gram` is the (I+1)x(I+1) Gram matrix of [activation, 1]. "lsq" solves the ridge-regularized
    least squares over kept neurons plus bias; "bias" folds the dropped neurons' mean
    contribution into the bias.
    """
    width = fc2.in_features
    w_full = torch.cat([fc2.weight.double(), fc2.bias.double()[:, None]], 1)  # (H, I+1)
    if mode == "bias":
        dropped = torch.ones(width, dtype=torch.bool)
        dropped[keep] = False
        mean_act = gram[width, :width] / gram[width, width]  # ones row / token count
        bias = fc2.bias.double() + fc2.weight.double()[:, dropped] @ mean_act[dropped]
        return fc2.weight[:, keep].detach().clone(), bias.to(fc2.bias.dtype)
    k = torch.cat([keep.to(torch.long), torch.tensor([width])])
    g_kk = gram[k][:, k]
    damp = ridge * g_kk.diagonal().mean()
    rhs = gram[k] @ w_full.T  # (|k|, H)
    sol = torch.linalg.solve(g_kk + damp * torch.eye(len(k), dtype=g_kk.dtype), rhs)
    return sol[:-1].T.to(fc2.weight.dtype), sol[-1].to(fc2.bias.dtype)


@torch.no_grad()
def prune_width_sequential(model: nn.Module, counts: Sequence[int],
                           pixel_batches: Sequence[torch.Tensor], min_remaining: int = 512,
                           compensation: str = "lsq", allocation: str = "uniform",
                           skip_blocks: Sequence[int] = (), bypass_blocks: Sequence[int] = (),
                           progress: bool = False) -> dict:
    """Width pruning block by block on the already-pruned model's calibration activations.

    Args:
        counts: neurons to remove per block (sum is what matters with allocation="global").
        skip_blocks / bypass_blocks: blocks (or attention sublayers) that stage 2 will remove;
            they are left out of the calibration pass so later blocks see their final inputs.
    Returns:
        {"counts": per-block removed, "kept": per-block kept indices}.
    """
    if compensation not in COMPENSATIONS:
        raise ValueError(f"compensation must be one of {COMPENSATIONS}, got {compensation!r}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    anatomy = resolve(model)
    _check_counts(anatomy, counts, min_remaining)
    was_training = model.training
    model.eval()
    skip = set(skip_blocks)
    saved = {i: bypass_attention(anatomy.parts[i], anatomy.layout) for i in bypass_blocks}
    try:
        anatomy = resolve(model)
        if allocation == "global":
            survivors = [i for i in range(len(anatomy.parts)) if i not in skip]
            scores = activation_scores(anatomy, pixel_batches, skip)
            counts = global_allocation(scores, sum(counts), min_remaining, survivors)
        hidden = [anatomy.embed(x) for x in pixel_batches]
        kept: list[list[int]] = []
        blocks = range(len(anatomy.parts))
        for i in tqdm(blocks, desc="stage 1: width", disable=not progress, leave=False):
            if i in skip:
                kept.append(list(range(anatomy.parts[i].intermediate_size)))
                continue
            stats, outputs = block_mlp_stats(anatomy, i, hidden, compensation != "none")
            parts = anatomy.parts[i]
            keep = keep_indices(stats.score, int(counts[i]))
            if counts[i]:
                weight = bias = None
                if compensation != "none":
                    weight, bias = refit_fc2(parts.fc2, stats.gram, keep, compensation)
                prune_mlp_neurons(parts, keep, weight, bias)
                anatomy = resolve(model)
                outputs = [anatomy.run_blocks(h, i, i + 1) for h in hidden]
            hidden = outputs
            kept.append(keep.tolist())
    finally:
        anatomy = resolve(model)
        for i, (att, norm) in saved.items():
            restore_attention(anatomy.parts[i], att, norm)
        model.train(was_training)
    sync_config(resolve(model))
    return {"counts": list(int(c) for c in counts), "kept": kept}

