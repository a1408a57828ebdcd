"""Which MLP neurons matter: the 2SSP activation score, a weight-magnitude fallback, and the
calibration statistics (activation Gram matrix) that least-squares compensation needs.

2SSP score (Sandri et al. 2025): s_j = mean over calibration images of the L2 norm over tokens
of the j-th MLP hidden activation (after the nonlinearity, i.e. the input of fc2).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Collection, Iterator, Sequence

import torch
from torch import nn

from .anatomy import Anatomy


@dataclass
class MLPStats:
    """Calibration statistics of one block's MLP hidden activations."""

    score_sum: torch.Tensor  # (I,) sum over images of the L2 norm over tokens
    images: int
    gram: torch.Tensor | None  # (I+1, I+1) float64 Gram of [activation, 1] over all tokens

    @property
    def score(self) -> torch.Tensor:
        return self.score_sum / max(1, self.images)


@contextmanager
def capture_fc2_inputs(fc2_modules: dict[int, nn.Module], sink: dict[int, list]) -> Iterator[None]:
    """Record the input of each fc2 (the MLP hidden activation) into sink[block]; hooks always removed."""
    handles = []

    def make_hook(key: int):
        def hook(_module, inputs):
            sink.setdefault(key, []).append(inputs[0].detach())
        return hook

    try:
        for key, mod in fc2_modules.items():
            handles.append(mod.register_forward_pre_hook(make_hook(key)))
        yield
    finally:
        for h in handles:
            h.remove()


def accumulate(stats: MLPStats | None, act: torch.Tensor, with_gram: bool) -> MLPStats:
    """Add a batch of activations (B, T, I) to running statistics."""
    act = act.float()
    norms = act.norm(dim=1).sum(0)  # (I,): per image L2 over tokens, summed over images
    gram = None
    if with_gram:
        flat = act.reshape(-1, act.shape[-1]).double()
        flat = torch.cat([flat, flat.new_ones(flat.shape[0], 1)], dim=1)
        gram = flat.T @ flat
    if stats is None:
        return MLPStats(norms, act.shape[0], gram)
    stats.score_sum += norms
    stats.images += act.shape[0]
    if with_gram:
        stats.gram += gram
    return stats


@torch.no_grad()
def block_mlp_stats(anatomy: Anatomy, index: int, inputs: Sequence[torch.Tensor],
                    with_gram: bool) -> tuple[MLPStats, list[torch.Tensor]]:
    """Run block `index` on `inputs` (block inputs per batch): its MLP statistics and outputs."""
    stats: MLPStats | None = None
    outputs = []
    for h in inputs:
        sink: dict[int, list] = {}
        with capture_fc2_inputs({0: anatomy.parts[index].fc2}, sink):
            outputs.append(anatomy.run_blocks(h, index, index + 1))
        stats = accumulate(stats, sink[0][0], with_gram)
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
            stats, hidden = block_mlp_stats(anatomy, i, hidden, with_gram=False)
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
