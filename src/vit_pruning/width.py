"""Stage 1 (width): remove MLP hidden neurons in every block.

Two entry points:
- :func:`prune_vit_mlp_width` is the seed's API: one-shot, by given scores, calibration
  activations (2SSP score) or weight magnitude.
- :func:`prune_width_sequential` is the default of :func:`vit_pruning.prune_2ssp`: blocks are
  pruned in order on the already-pruned model's activations, and the pruned fc2 is refit by
  least squares (``compensation="lsq"``) so the block reproduces the unpruned model's block
  output on the calibration tokens (absorbing error from earlier blocks and removed units), or
  by folding dropped neurons' mean into the bias (``"bias"``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .anatomy import Anatomy, resolve
from .batches import take_inputs
from .config import NEURON_SELECTIONS as SELECTIONS
from .config import PRIORS, PruneConfig
from .importance import (MLPStats, activation_scores, block_mlp_stats, block_output_and_sum,
                         keep_indices, magnitude_scores, normalized)
from .attention_heads import prune_block_heads
from .surgery import (TemporaryBypass, attention_refs, mlp_refs, prune_mlp_neurons,
                      restore_attention_refs, restore_refs, sync_config)
from .lsq import damped_gram, refit_fc2, spd_inverse
from .trace import UnprunedTrace
from .modes import device_of, eval_mode

COMPENSATIONS = ("none", "bias", "lsq")
ALLOCATIONS = ("uniform", "global")
REFIT_TARGETS = ("model", "block")


def _check_counts(anatomy: Anatomy, counts: Sequence[int], min_remaining: int) -> None:
    if len(counts) != len(anatomy.parts):
        raise ValueError(f"n_to_prune_per_block has {len(counts)} entries, model has "
                         f"{len(anatomy.parts)} blocks")
    for i, (n, p) in enumerate(zip(counts, anatomy.parts)):
        if n < 0 or (n > 0 and p.intermediate_size - n < min_remaining):  # a block already
            # narrower than min_remaining (an early Swin stage) is left whole
            raise ValueError(
                f"block {i}: cannot remove {n} of {p.intermediate_size} neurons with "
                f"min_remaining={min_remaining} (allowed 0..{max(0, p.intermediate_size - min_remaining)})")


def global_allocation(scores: Sequence[torch.Tensor], total: int, min_remaining: int,
                      blocks: Sequence[int] | None = None, align: int = 1) -> list[int]:
    """Per-block counts removing the `total` globally least important neurons (scores normalized
    per block), never leaving a block in `blocks` with fewer than `min_remaining`. With
    `align` > 1 neurons go in groups of `align` (ranked by the group's summed score), so kept
    widths stay multiples of `align`; every width must then be one."""
    blocks = list(range(len(scores))) if blocks is None else list(blocks)
    if align > 1:
        odd = [i for i in blocks if scores[i].numel() % align]
        if odd or total % align:
            raise ValueError(f"allocation='global' with align={align} needs MLP widths and a neuron "
                             f"total that are multiples of {align}; use align=1 or uniform allocation")
    floor = -(-min_remaining // align) * align
    norm = normalized(scores)
    cand = []
    for i in blocks:
        cap = max(0, norm[i].numel() - floor) // align
        if cap:
            lowest = torch.sort(norm[i].double()).values[:cap * align].reshape(cap, align).sum(1)
            cand.extend((float(v), i, r) for r, v in enumerate(lowest))
    if total > len(cand) * align:
        raise ValueError(f"cannot remove {total} neurons with min_remaining={min_remaining}")
    cand.sort()
    counts = [0] * len(scores)
    for _, i, _ in cand[:total // align]:
        counts[i] += align
    return counts


@torch.no_grad()
def prune_vit_mlp_width(model: nn.Module, n_to_prune_per_block: Sequence[int],
                        min_remaining: int = 512, importance: Sequence[torch.Tensor] | None = None,
                        dataloader: Iterable | None = None, device: str | torch.device | None = None,
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
            device = device if device is not None else device_of(model)
            importance = activation_scores(anatomy, take_inputs(dataloader, max_batches, device,
                                                                  anatomy.is_text))
        else:
            importance = magnitude_scores(anatomy)
    for parts, n, score in zip(anatomy.parts, n_to_prune_per_block, importance):
        if n:
            prune_mlp_neurons(parts, keep_indices(score, int(n)))
    sync_config(resolve(model))
    return model


def _sequential_pass(model, counts, pixel_batches, cfg: PruneConfig, how: WidthPass,
                     temp: TemporaryBypass, heads: Sequence[int] = ()
                     ) -> tuple[list[list[int]], list[list[int]], torch.Tensor]:
    """The block-by-block loop of :func:`prune_width_sequential`; returns (kept neurons, kept
    heads, outputs). A block loses its heads first (refit on the attention output), then its
    neurons on what its pruned attention gives."""
    compensation, ridge, selection = cfg.compensation, cfg.ridge, cfg.selection
    fit_damping = cfg.refit_damping  # the refit's (the selections damp with `ridge`)
    refit = None if compensation == "none" else ("block" if compensation == "bias" else cfg.refit_target)
    skip, bypass = set(how.removed_blocks), set(how.removed_attention)
    fit, unpruned = how.fit_batches, how.unpruned
    anatomy = resolve(model)
    hidden = [anatomy.embed(x) for x in pixel_batches]  # the pruned model's path
    sizes = [len(x) for x in pixel_batches[:fit]]
    original = None if unpruned is not None else list(hidden[:fit])  # the unpruned model's
    # path (refit_target="model"), needed only where the refit is fit: held-out batches just
    # run the pruned path; traced already when `unpruned` is given
    kept: list[list[int]] = []
    kept_heads = [list(range(p.num_heads)) for p in anatomy.parts]
    for i in tqdm(range(len(anatomy.parts)), desc="stage 1: width", disable=not how.progress,
                  leave=False):
        anatomy = resolve(model)
        targets = None
        if refit == "model" and unpruned is not None:
            targets = unpruned.sums_for(i, sizes)
        elif refit == "model":  # the unpruned path: next inputs, and residual sums to refit to
            original, targets = map(list, zip(*[block_output_and_sum(anatomy, i, h)[:2]
                                                 for h in original]))
            original = [anatomy.transition(i, h) for h in original]
        if i in skip:
            kept.append(list(range(anatomy.parts[i].intermediate_size)))
            hidden = [anatomy.transition(i, h) for h in hidden]
            continue
        if i in bypass:
            temp.add(i)
            anatomy = resolve(model)
            kept_heads[i] = []
        saved_heads = None
        if heads and heads[i]:
            saved_heads = attention_refs(anatomy.parts[i])
            kept_heads[i] = prune_block_heads(anatomy, i, hidden[:fit], int(heads[i]),
                                              compensation, ridge, fit_damping)
            anatomy = resolve(model)
        stats, outputs, mids = block_mlp_stats(anatomy, i, hidden, refit, targets, fit)
        parts = anatomy.parts[i]
        if selection == "lsq" and compensation == "lsq":
            keep = lsq_keep(stats, int(counts[i]), ridge)
        else:
            keep = keep_indices(stats.score, int(counts[i]))
        if counts[i] or refit == "model":
            del outputs  # recomputed below from `mids`; free it before the solve
            originals = mlp_refs(parts)
            weight = bias = None
            if refit is not None:
                weight, bias = refit_fc2(parts.fc2, stats, keep, compensation, fit_damping[0],
                                         parts.mlp_scale, anchored=fit_damping[1])
            prune_mlp_neurons(parts, keep, weight, bias)
            parts = resolve(model).parts[i]
            outputs = [parts.mlp_residual(m) for m in mids]  # attention output is unchanged
            if how.trial:
                restore_refs(originals)
        else:  # unchanged block: held-out batches ran its attention only
            outputs = [o if o is not None else parts.mlp_residual(m) for o, m in zip(outputs, mids)]
        if how.trial and saved_heads:
            restore_attention_refs(saved_heads)
        del stats, mids
        hidden = [anatomy.transition(i, h) for h in outputs]
        kept.append(keep.tolist())
    return kept, kept_heads, torch.cat([resolve(model).head(h) for h in hidden])


def lsq_keep(stats: MLPStats, n_remove: int, ridge: float = 1e-3, rounds: int = 32) -> torch.Tensor:
    """Kept neurons chosen by their least-squares cost (structured Optimal Brain Surgeon).

    With S = G^-1 C the refit fc2 over all neurons (G: damped Gram, C: cross term), dropping
    neuron j and refitting the others raises the squared error by ||S_j||^2 / (G^-1)_jj. The
    cheapest neurons are dropped greedily in `rounds` chunks; after each chunk Q, S and G^-1
    are updated in closed form (S -= G^-1[:,Q] (G^-1[Q,Q])^-1 S[Q], same for G^-1), so each
    choice accounts for the compensation the kept neurons will make.
    """
    width = stats.gram.shape[0] - 1
    if n_remove <= 0:
        return torch.arange(width, device=stats.gram.device)
    h_inv = spd_inverse(damped_gram(stats, ridge))
    sol = h_inv @ stats.cross.double()
    alive = torch.ones(width + 1, dtype=torch.bool, device=stats.gram.device)
    left = n_remove
    for r in range(rounds):
        if left <= 0:
            break
        take = -(-left // (rounds - r))  # ceil: spread what is left over the rounds left
        cost = sol[:-1].pow(2).sum(1) / h_inv.diagonal()[:-1]
        cost[~alive[:-1]] = float("inf")
        q = torch.argsort(cost, stable=True)[:take]
        inv_qq = torch.linalg.inv(h_inv[q][:, q])
        sol -= h_inv[:, q] @ (inv_qq @ sol[q])
        h_inv -= h_inv[:, q] @ inv_qq @ h_inv[q]
        alive[q] = False
        left -= take
    return torch.nonzero(alive[:-1]).flatten()


@dataclass(frozen=True)
class WidthPass:
    """How one stage-1 pass runs (what it decides is the PruneConfig's):

    Args:
        removed_blocks / removed_attention: blocks (or attention sublayers) that stage 2 will
            remove; they are left out of the calibration pass so later blocks see their final
            inputs.
        fit_batches: only the first `fit_batches` calibration batches are fit (scores,
            refit); the rest are held out, only run (their outputs measure generalization).
        unpruned: the unpruned model's trace (:func:`vit_pruning.trace.trace_unpruned`) over
            calibration inputs whose first rows are the fitted ones here, in the same order:
            the refit targets are read from it instead of re-running the unpruned model.
        trial: compute everything (counts, kept indices, outputs) but leave the model as it
            was: each block's original MLP is put back once its outputs are computed, so a
            trial never holds more than one pruned block.
        progress: a progress bar over the blocks.
    """

    removed_blocks: Sequence[int] = ()
    removed_attention: Sequence[int] = ()
    fit_batches: int | None = None
    unpruned: UnprunedTrace | None = None
    trial: bool = False
    progress: bool = False


@torch.no_grad()
def prune_width_sequential(model: nn.Module, counts: Sequence[int],
                           pixel_batches: Sequence[torch.Tensor], config: PruneConfig,
                           how: WidthPass | None = None, heads: Sequence[int] = ()) -> dict:
    """Width pruning block by block on the already-pruned model's calibration activations.

    Args:
        counts: neurons to remove per block (with allocation="global" only the sum is used).
        config: what is decided, from the PruneConfig (resolved: an int min_remaining and
            align): `compensation` (with "lsq" and refit_target "model" each fc2 is refit so the
            block output matches the unpruned model's, absorbing earlier pruning error, removed
            blocks included; "block" matches the block's own unpruned MLP on the same input),
            `selection` ("score": lowest 2SSP activation score, or with compensation "lsq",
            "lsq": lowest least-squares cost given the refit, see :func:`lsq_keep`),
            `allocation` (with "global", neurons go in groups of `align`; the counts given are
            assumed aligned already), `ridge` and `min_remaining`, and `refit_prior` (what
            the refit's damping pulls toward, :attr:`PruneConfig.refit_damping`; "auto": zero).
        how: how the pass runs (:class:`WidthPass`; default: every batch fit, in place).
        heads: attention heads to remove per block (() : none), each block's before its
            neurons, chosen and refit as `compensation` says
            (:func:`vit_pruning.attention_heads.prune_block_heads`).
    Returns:
        {"counts": per-block removed, "kept": per-block kept indices, "kept_heads": per-block
        kept heads (original indices), "outputs": the pruned model's outputs on the
        calibration batches, as if stage 2 had run}.
    """
    how = how or WidthPass()
    compensation, allocation = config.compensation, config.allocation
    selection, refit_target = config.selection, config.refit_target
    min_remaining, align = config.min_remaining, config.align
    if not isinstance(min_remaining, int) or not isinstance(align, int):
        raise ValueError(f"prune_width_sequential takes a resolved config (PruneConfig.resolved: "
                         f"an int min_remaining and align), got {min_remaining!r} and {align!r}")
    if compensation not in COMPENSATIONS:
        raise ValueError(f"compensation must be one of {COMPENSATIONS}, got {compensation!r}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if refit_target not in REFIT_TARGETS:
        raise ValueError(f"refit_target must be one of {REFIT_TARGETS}, got {refit_target!r}")
    if config.refit_prior not in PRIORS:
        raise ValueError(f"refit_prior must be one of {PRIORS}, got {config.refit_prior!r}")
    anatomy = resolve(model)
    _check_counts(anatomy, counts, min_remaining)
    skip, bypass = set(how.removed_blocks), set(how.removed_attention)
    with eval_mode(model):
        if allocation == "global":
            survivors = [i for i in range(len(anatomy.parts)) if i not in skip]
            with TemporaryBypass(model) as temp:
                for i in bypass:
                    temp.add(i)
                scores = activation_scores(resolve(model), pixel_batches[:how.fit_batches], skip)
            counts = global_allocation(scores, sum(counts), min_remaining, survivors, align)
        with TemporaryBypass(model) as temp:  # sublayers stage 2 removes, bypassed as reached
            kept, kept_heads, final = _sequential_pass(model, counts, pixel_batches, config, how,
                                                       temp, heads)
    sync_config(resolve(model))
    return {"counts": list(int(c) for c in counts), "kept": kept, "kept_heads": kept_heads,
            "outputs": final}
