"""Which MLP neurons matter: the 2SSP activation score, a weight-magnitude fallback, and the
calibration statistics (activation Gram matrix) that least-squares compensation needs.

2SSP score (Sandri et al. 2025): s_j = mean over calibration images of the L2 norm over tokens
of the j-th MLP hidden activation (after the nonlinearity, i.e. the input of fc2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Sequence

import torch
from torch import nn

from .anatomy import Anatomy
from .modes import eval_mode

GRAM_CHUNK = 2048  # tokens per chunk when accumulating Gram matrices (bounds memory)
GRAM_PANELS = 6  # column panels of the Gram's upper triangle (measured fastest on 3,073 columns)


@dataclass
class MLPStats:
    """Calibration statistics of one block's MLP hidden activations."""

    score_sum: torch.Tensor  # (I,) sum over images of the L2 norm over tokens
    images: int
    gram: torch.Tensor | None  # (I+1, I+1) Gram of [activation, 1] over all tokens (float32)
    cross: torch.Tensor | None  # (I+1, H) [activation, 1]^T @ (what the MLP sublayer should add
    # to the residual stream: fc2's output times the layer scale, where there is one)

    @property
    def score(self) -> torch.Tensor:
        return self.score_sum / max(1, self.images)


def accumulate(stats: MLPStats | None, act: torch.Tensor,
               fc2_target: torch.Tensor | None = None,
               token_weight: torch.Tensor | None = None) -> MLPStats:
    """Add a batch of activations (B, T, I) to running statistics; with `fc2_target` (B, T, H)
    also the Gram matrix and the cross term least-squares refitting needs, each token's
    squared error weighted by `token_weight` (B, T) squared if given."""
    act = act.float()
    norms = act.norm(dim=1).sum(0)  # (I,): per image L2 over tokens, summed over images
    gram = cross = None
    if fc2_target is not None:
        flat = act.reshape(-1, act.shape[-1])
        tgt = fc2_target.reshape(-1, fc2_target.shape[-1])
        if token_weight is not None:  # [a, 1] rows scaled below too, via `w`
            w = token_weight.reshape(-1, 1).float()
            tgt = tgt * w
        gram = flat.new_zeros(flat.shape[1] + 1, flat.shape[1] + 1)
        cross = flat.new_zeros(flat.shape[1] + 1, tgt.shape[1])
        for rows in range(0, flat.shape[0], GRAM_CHUNK):
            a = flat[rows:rows + GRAM_CHUNK]
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)  # (n, I+1): [activation, 1]
            if token_weight is not None:
                a = a * w[rows:rows + GRAM_CHUNK]
            add_gram(gram, a)
            cross.addmm_(a.T, tgt[rows:rows + GRAM_CHUNK].float())
    if stats is None:
        return MLPStats(norms, act.shape[0], gram, cross)
    stats.score_sum += norms
    stats.images += act.shape[0]
    if gram is not None:
        stats.gram += gram
        stats.cross += cross
    return stats


def add_gram(gram: torch.Tensor, rows: torch.Tensor, panels: int = GRAM_PANELS) -> None:
    """gram += rows.T @ rows, each panel of the upper triangle computed once and mirrored:
    about 0.6x the work of the full product (the Gram is symmetric), same values."""
    n = rows.shape[1]
    step = -(-n // panels)
    for start in range(0, n, step):
        stop = min(n, start + step)
        block = rows[:, start:stop].T @ rows[:, start:]
        gram[start:stop, start:] += block
        if stop < n:
            gram[stop:, start:stop] += block[:, stop - start:].T


@torch.no_grad()
def run_block_capture(anatomy: Anatomy, index: int, hidden: torch.Tensor,
                      modules: Sequence[nn.Module]) -> tuple[torch.Tensor, list[tuple]]:
    """Run block `index` on `hidden`, returning its output (before any Swin patch merging) and
    (input, output) of each module."""
    seen: list[list] = [[] for _ in modules]
    handles = [m.register_forward_hook(
        lambda _m, i, o, k=k: seen[k].append((i[0].detach(), o.detach())))
        for k, m in enumerate(modules)]
    try:
        out = anatomy.block_forward(index, hidden)
    finally:
        for h in handles:
            h.remove()
    return out, [s[0] for s in seen]


@torch.no_grad()
def block_output_and_sum(anatomy: Anatomy, index: int, hidden: torch.Tensor,
                         capture: Sequence[nn.Module] = ()) -> tuple[torch.Tensor, torch.Tensor, list[tuple]]:
    """Run block `index`: its output, the residual sum its MLP writes into (the output itself
    pre-norm; the input of the closing LayerNorm post-norm), and (input, output) of `capture`."""
    sum_module = anatomy.parts[index].sum_module
    mods = list(capture) + ([sum_module] if sum_module is not None else [])
    out, seen = run_block_capture(anatomy, index, hidden, mods)
    total = seen[-1][0] if sum_module is not None else out
    return out, total, seen[:len(capture)]


@torch.no_grad()
def block_mlp_stats(anatomy: Anatomy, index: int, inputs: Sequence[torch.Tensor],
                    refit: str | None = None, targets: Sequence[torch.Tensor] | None = None,
                    fit: int | None = None) -> tuple[MLPStats, list[torch.Tensor], list[torch.Tensor]]:
    """Run block `index` on `inputs` (block inputs per batch): its MLP statistics, outputs (before
    any Swin patch merging: :meth:`Anatomy.transition` gives the next block's input; None for
    held-out batches, which run only up to the MLP, and with refit "model", where the caller
    reruns the refit MLP and the unpruned one stops at fc2's input), and residual streams after
    attention (the MLP's input side, for re-running only the MLP).

    The fit targets are what the MLP sublayer adds to the stream (fc2's output times the layer
    scale): :func:`vit_pruning.lsq.refit_fc2` divides the scale out of the solution.

    refit: None (scores only); "block" (fc2 should reproduce its own current output); "model"
        (the block's residual sum should reproduce `targets`, the unpruned model's residual sums
        from :func:`block_output_and_sum`, so the refit also absorbs error from earlier pruning).
    fit: only the first `fit` batches enter the statistics (the rest are held out: run, not fit).
    """
    stats: MLPStats | None = None
    outputs, mids = [], []
    parts = anatomy.parts[index]
    scale = 1.0 if parts.mlp_scale is None else parts.mlp_scale
    for b, h in enumerate(inputs):
        if fit is not None and b >= fit:  # held out: the attention half only, as the caller
            mids.append(anatomy.attention_stream(index, h))  # runs the (pruned) MLP on it
            outputs.append(None)
            continue
        if refit == "model":  # the caller reruns the refit MLP on `mids`: the unpruned MLP
            # runs only as far as fc2's input (the stream after attention is fc1's input
            # post-norm, the MLP LayerNorm's pre-norm)
            mid, act = anatomy.run_until(index, h, parts.fc2, [parts.fc1 if parts.post_norm
                                                                else parts.norm_after])
            out = total = fc2_out = None
        else:  # the whole block; the stream after attention is the MLP LayerNorm's input
            # pre-norm, and post-norm the residual sum less what fc2 added
            capture = [parts.fc2] if parts.post_norm else [parts.fc2, parts.norm_after]
            out, total, seen = block_output_and_sum(anatomy, index, h, capture)
            act, fc2_out = seen[0]
            mid = total - fc2_out if parts.post_norm else seen[1][0]
        outputs.append(out)
        mids.append(mid)
        target = None
        if refit == "block":
            target = scale * fc2_out  # what the MLP sublayer adds to the stream
        elif refit == "model":
            target = targets[b] - mid  # what the MLP sublayer must add to the stream
        weight = None
        if target is not None and parts.post_norm:  # the closing LayerNorm divides each token's
            # error by that token's spread: weight the fit the same way
            weight = 1.0 / (targets[b] if refit == "model" else total).std(-1, unbiased=False).clamp_min(1e-6)
        stats = accumulate(stats, act, target, weight)
    return stats, outputs, mids


@torch.no_grad()
def activation_scores(anatomy: Anatomy, pixel_batches: Sequence[torch.Tensor],
                      skip: Collection[int] = ()) -> list[torch.Tensor]:
    """2SSP score of every MLP neuron of every block, in one pass over the calibration batches.

    Blocks in `skip` are left out of the forward pass (as stage 2 will remove them); their
    scores are zeros.
    """
    model = anatomy.model
    scores = []
    with eval_mode(model):
        hidden = [anatomy.embed(x) for x in pixel_batches]
        for i, parts in enumerate(anatomy.parts):
            if i in skip:
                scores.append(torch.zeros(parts.intermediate_size, device=parts.fc2.weight.device))
            else:
                stats, hidden, _ = block_mlp_stats(anatomy, i, hidden)
                scores.append(stats.score)
            hidden = [anatomy.transition(i, h) for h in hidden]
    return scores


@torch.no_grad()
def magnitude_scores(anatomy: Anatomy) -> list[torch.Tensor]:
    """Data-free fallback: L1 norm of each neuron's fc1 row(s) (SwiGLU: gate and up rows
    multiplied) times L1 of its fc2 column."""
    out = []
    for p in anatomy.parts:
        score = p.fc2.weight.abs().sum(0)
        for w in p.in_weights:
            score = score * w.abs().sum(1)
        out.append(score)
    return out


def keep_indices(score: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Indices kept (neurons, heads): all but the `n_remove` lowest scores (ties: lower index
    kept)."""
    order = torch.argsort(score.double(), stable=True, descending=True)
    return order[: score.numel() - n_remove].sort().values


def normalized(scores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Scores made comparable across blocks: each block's divided by its own mean."""
    return [s / s.mean().clamp_min(1e-12) for s in scores]
