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


@dataclass
class MLPStats:
    """Calibration statistics of one block's MLP hidden activations."""

    score_sum: torch.Tensor  # (I,) sum over images of the L2 norm over tokens
    images: int
    gram: torch.Tensor | None  # (I+1, I+1) float64 Gram of [activation, 1] over all tokens
    cross: torch.Tensor | None  # (I+1, H) float64 [activation, 1]^T @ (what fc2 should output)

    @property
    def score(self) -> torch.Tensor:
        return self.score_sum / max(1, self.images)


def accumulate(stats: MLPStats | None, act: torch.Tensor,
               fc2_target: torch.Tensor | None = None) -> MLPStats:
    """Add a batch of activations (B, T, I) to running statistics; with `fc2_target` (B, T, H)
    also the Gram matrix and the cross term least-squares refitting needs."""
    act = act.float()
    norms = act.norm(dim=1).sum(0)  # (I,): per image L2 over tokens, summed over images
    gram = cross = None
    if fc2_target is not None:
        flat = act.reshape(-1, act.shape[-1]).double()
        flat = torch.cat([flat, flat.new_ones(flat.shape[0], 1)], dim=1)  # (N, I+1)
        gram = flat.T @ flat
        cross = flat.T @ fc2_target.reshape(-1, fc2_target.shape[-1]).double()
    if stats is None:
        return MLPStats(norms, act.shape[0], gram, cross)
    stats.score_sum += norms
    stats.images += act.shape[0]
    if gram is not None:
        stats.gram += gram
        stats.cross += cross
    return stats


@torch.no_grad()
def block_mlp_stats(anatomy: Anatomy, index: int, inputs: Sequence[torch.Tensor],
                    refit: str | None = None, targets: Sequence[torch.Tensor] | None = None,
                    ) -> tuple[MLPStats, list[torch.Tensor]]:
    """Run block `index` on `inputs` (block inputs per batch): its MLP statistics and outputs.

    refit: None (scores only); "block" (fc2 should reproduce its own current output); "model"
        (the block output should reproduce `targets`, the unpruned model's block output, so the
        refit also absorbs error from earlier pruning).
    """
    stats: MLPStats | None = None
    outputs = []
    fc2 = anatomy.parts[index].fc2
    for b, h in enumerate(inputs):
        acts: list = []
        outs: list = []
        handles = [fc2.register_forward_pre_hook(lambda _m, i: acts.append(i[0].detach())),
                   fc2.register_forward_hook(lambda _m, _i, o: outs.append(o.detach()))]
        try:
            out = anatomy.run_blocks(h, index, index + 1)
        finally:
            for handle in handles:
                handle.remove()
        outputs.append(out)
        target = None
        if refit == "block":
            target = outs[0]
        elif refit == "model":
            target = targets[b] - (out - outs[0])  # what fc2 must add to the residual stream
        stats = accumulate(stats, acts[0], target)
    return stats, outputs


@torch.no_grad()
def activation_scores(anatomy: Anatomy, pixel_batches: Sequence[torch.Tensor],
                      skip: Collection[int] = ()) -> list[torch.Tensor]:
    """2SSP score of every MLP neuron of every block, in one pass over the calibration batches.

    Blocks in `skip` are left out of the forward pass (as stage 2 will remove them); their
    scores are zeros.
    """
    model = anatomy.model
    was_training = model.training
    model.eval()
    scores = []
    try:
        hidden = [anatomy.embed(x) for x in pixel_batches]
        for i, parts in enumerate(anatomy.parts):
            if i in skip:
                scores.append(torch.zeros(parts.intermediate_size))
                continue
            stats, hidden = block_mlp_stats(anatomy, i, hidden)
            scores.append(stats.score)
    finally:
        model.train(was_training)
    return scores


@torch.no_grad()
def magnitude_scores(anatomy: Anatomy) -> list[torch.Tensor]:
    """Data-free fallback: L1 norm of each neuron's fc1 row times L1 of its fc2 column."""
    return [p.fc1.weight.abs().sum(1) * p.fc2.weight.abs().sum(0) for p in anatomy.parts]


def normalized(scores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Scores made comparable across blocks: each block's divided by its own mean."""
    return [s / s.mean().clamp_min(1e-12) for s in scores]
