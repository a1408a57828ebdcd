"""The unpruned model's path over the calibration batches, traced once.

Every phase of :func:`vit_pruning.prune_2ssp` needs part of it: the reference outputs that
fidelity is measured against, each block's input (greedy depth selection scores candidate ``c``
by running blocks ``c..`` from it) and the residual sum each block's MLP writes into (every
width pass, split trials included, refits fc2 toward it). Traced once, it replaces a forward
of the unpruned model in each of those phases.

Memory: (blocks + 1) hidden states per calibration input, twice that post-norm (BERT), where
the residual sum is not the block output; :func:`trace_bytes` estimates it from one input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .anatomy import Anatomy
from .importance import block_output_and_sum
from .modes import eval_mode


@dataclass
class UnprunedTrace:
    """`inputs[i][b]`: block i's input for calibration batch b (`inputs[-1]`: the last block's
    output, after any Swin merging); `sums[i][b]`: the residual sum block i's MLP writes into
    (the same tensor as the block output pre-norm); `outputs`: the model outputs."""

    inputs: list[list[torch.Tensor]]
    sums: list[list[torch.Tensor]]
    outputs: torch.Tensor

    def batch_inputs(self, batch: int, upto: int) -> list[torch.Tensor]:
        """Inputs of blocks 0..upto for one batch."""
        return [self.inputs[i][batch] for i in range(upto + 1)]

    def sums_for(self, block: int, sizes: Sequence[int]) -> list[torch.Tensor]:
        """Block `block`'s residual sums for the first sum(sizes) calibration inputs, cut into
        batches of `sizes` rows."""
        return regroup(self.sums[block], sizes)


@torch.no_grad()
def trace_unpruned(anatomy: Anatomy, batches: Sequence[torch.Tensor]) -> UnprunedTrace:
    """Run the (unpruned) model block by block over `batches`, keeping what is traced."""
    model = anatomy.model
    with eval_mode(model):
        hidden = [anatomy.embed(x) for x in batches]
        inputs, sums = [hidden], []
        for i in range(len(anatomy.parts)):
            nxt, totals = [], []
            for h in hidden:
                out, total, _ = block_output_and_sum(anatomy, i, h)
                totals.append(total)
                nxt.append(anatomy.transition(i, out))
            sums.append(totals)
            hidden = nxt
            inputs.append(hidden)
        outputs = torch.cat([anatomy.head(h) for h in hidden])
    return UnprunedTrace(inputs, sums, outputs)


@torch.no_grad()
def trace_bytes(anatomy: Anatomy, batches: Sequence[torch.Tensor]) -> int:
    """Estimated size of :func:`trace_unpruned` over `batches` (one input's embedding per block
    boundary, doubled post-norm; Swin's merged stages make it an overestimate)."""
    rows = sum(len(x) for x in batches)
    if not rows:
        return 0
    one = anatomy.embed(batches[0][:1])
    per_boundary = one.numel() * one.element_size() * rows
    post = any(p.post_norm for p in anatomy.parts)
    return per_boundary * (len(anatomy.parts) + 1) * (2 if post else 1)


def regroup(tensors: Sequence[torch.Tensor], sizes: Sequence[int]) -> list[torch.Tensor]:
    """The first sum(sizes) rows of a list of batches, cut into batches of `sizes` rows: views
    where one batch holds a piece, concatenated where a piece spans two (same shapes needed)."""
    out: list[torch.Tensor] = []
    src, offset = 0, 0
    for size in sizes:
        pieces, need = [], size
        while need:
            if src >= len(tensors):
                raise ValueError(f"regroup: asked for {sum(sizes)} rows, the batches hold "
                                 f"{sum(len(t) for t in tensors)}")
            take = min(need, len(tensors[src]) - offset)
            pieces.append(tensors[src][offset:offset + take])
            need -= take
            offset += take
            if offset == len(tensors[src]):
                src, offset = src + 1, 0
        out.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces))
    return out
