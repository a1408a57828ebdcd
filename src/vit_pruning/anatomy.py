"""Model anatomy: find the transformer blocks of a ViT-family model, once, by structure.

transformers 5.x lays a ViT out as ``vit.layers[i].{attention.{q,k,v,o}_proj, mlp.{fc1,fc2}}``;
4.x as ``vit.encoder.layer[i].{attention.attention.{query,key,value}, attention.output.dense,
intermediate.dense, output.dense}``. Everything else in this package goes through
:func:`resolve`, so no other module knows which layout it is looking at.

A resolved model can also be run *in segments* (embed -> block i -> ... -> head), which is what
calibration and greedy depth selection use to reuse the hidden states that stay the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection
import torch
from torch import nn

SUPPORTED = (
    "ViTModel, ViTForImageClassification, DeiTModel, DeiTForImageClassification "
    "(transformers 4.x and 5.x layouts)"
)


class AttentionBypass(nn.Module):
    """Stands in for a removed attention sublayer: contributes nothing to the residual stream.

    The block then computes ``x + MLP(LN(x))``. ``returns_tuple`` mirrors what the replaced
    module returned (a tuple in transformers 5.x, a tensor in 4.x), so the block's own forward
    is untouched.
    """

    def __init__(self, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = torch.zeros_like(hidden_states)
        return (out, None) if self.returns_tuple else out


@dataclass(frozen=True)
class BlockParts:
    """The prunable pieces of one transformer block."""

    block: nn.Module
    fc1: nn.Linear  # hidden -> intermediate
    fc2: nn.Linear  # intermediate -> hidden
    attention: nn.Module  # the attention sublayer (projections included)
    attention_owner: nn.Module  # module holding `attention` as attribute `attention_attr`
    attention_attr: str
    norm_before: nn.Module  # the pre-attention LayerNorm (goes with the attention sublayer)
    attention_removed: bool
    norm_after: nn.Module  # the pre-MLP LayerNorm
    act_fn: Callable[[torch.Tensor], torch.Tensor]  # the MLP nonlinearity

    def mlp_residual(self, x_mid: torch.Tensor) -> torch.Tensor:
        """The block's second half on the residual stream after attention: x + MLP(LN(x))."""
        return x_mid + self.fc2(self.act_fn(self.fc1(self.norm_after(x_mid))))

    @property
    def intermediate_size(self) -> int:
        return self.fc1.out_features


@dataclass(frozen=True)
class Anatomy:
    """Where things are in one model. Re-resolve after any surgery."""

    model: nn.Module
    backbone: nn.Module  # ViTModel / DeiTModel
    blocks: nn.ModuleList
    blocks_owner: nn.Module  # holds `blocks` as attribute `blocks_attr`
    blocks_attr: str
    parts: tuple[BlockParts, ...]
    hidden_size: int
    num_heads: int
    layout: str  # "v5" or "v4"
    has_classifier: bool

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch + position embeddings: the input of block 0, shape (B, T, hidden)."""
        emb = self.backbone.embeddings
        dtype = emb.patch_embeddings.projection.weight.dtype
        return emb(pixel_values.to(dtype))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output of the last block -> logits (classifiers) or final normed hidden states."""
        out = self.backbone.layernorm(hidden)
        if self.has_classifier:
            return self.model.classifier(out[:, 0, :])
        return out

    def run_blocks(self, hidden: torch.Tensor, start: int = 0, stop: int | None = None,
                   skip: Collection[int] = ()) -> torch.Tensor:
        """Run blocks[start:stop] on `hidden`, leaving the blocks in `skip` out."""
        stop = len(self.blocks) if stop is None else stop
        for i in range(start, stop):
            if i in skip:
                continue
            out = self.blocks[i](hidden)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


def _backbone(model: nn.Module) -> tuple[nn.Module, bool]:
    """(backbone, has_classifier). A wrapper must have exactly one `classifier` on the [CLS]
    token: other heads (DeiT's distillation pair, masked-image decoders) would make the
    segmented forward disagree with the model's own, so they are rejected."""
    for attr in ("vit", "deit"):
        sub = getattr(model, attr, None)
        if isinstance(sub, nn.Module) and hasattr(sub, "embeddings"):
            if isinstance(getattr(model, "classifier", None), nn.Module):
                return sub, True
            break
    else:
        if hasattr(model, "embeddings") and hasattr(model, "layernorm"):
            return model, False
    raise ValueError(
        f"unsupported model class {type(model).__name__}: vit_pruning supports {SUPPORTED}"
    )


def _block_parts(block: nn.Module) -> tuple[BlockParts, str]:
    att = getattr(block, "attention", None)
    norm = getattr(block, "layernorm_before", None)
    mlp = getattr(block, "mlp", None)
    if mlp is not None and hasattr(mlp, "fc1") and hasattr(mlp, "fc2"):
        layout, fc1, fc2, act_fn = "v5", mlp.fc1, mlp.fc2, mlp.activation_fn
    elif hasattr(block, "intermediate") and hasattr(block, "output"):
        layout, fc1, fc2 = "v4", block.intermediate.dense, block.output.dense
        act_fn = block.intermediate.intermediate_act_fn
    else:
        raise ValueError(
            f"unsupported block class {type(block).__name__}: expected an MLP as mlp.fc1/mlp.fc2 "
            f"(transformers 5.x) or intermediate.dense/output.dense (4.x); supported: {SUPPORTED}"
        )
    if att is None or norm is None:
        raise ValueError(
            f"unsupported block class {type(block).__name__}: no attention/layernorm_before; "
            f"supported: {SUPPORTED}"
        )
    parts = BlockParts(
        block=block, fc1=fc1, fc2=fc2, attention=att, attention_owner=block,
        attention_attr="attention", norm_before=norm,
        attention_removed=isinstance(att, AttentionBypass),
        norm_after=block.layernorm_after, act_fn=act_fn,
    )
    return parts, layout


def resolve(model: nn.Module) -> Anatomy:
    """Resolve the anatomy of a supported model, or raise ValueError naming what is supported."""
    backbone, has_classifier = _backbone(model)
    if isinstance(getattr(backbone, "layers", None), nn.ModuleList):
        owner, attr = backbone, "layers"
    elif isinstance(getattr(getattr(backbone, "encoder", None), "layer", None), nn.ModuleList):
        owner, attr = backbone.encoder, "layer"
    else:
        raise ValueError(
            f"unsupported model class {type(model).__name__}: no block list found; "
            f"vit_pruning supports {SUPPORTED}"
        )
    blocks = getattr(owner, attr)
    resolved = [_block_parts(b) for b in blocks]
    if not resolved:
        raise ValueError(f"model {type(model).__name__} has no transformer blocks left")
    layouts = {lay for _, lay in resolved}
    cfg = model.config
    return Anatomy(
        model=model, backbone=backbone, blocks=blocks, blocks_owner=owner, blocks_attr=attr,
        parts=tuple(p for p, _ in resolved), hidden_size=int(cfg.hidden_size),
        num_heads=int(cfg.num_attention_heads), layout=layouts.pop(),
        has_classifier=has_classifier,
    )


class _EncoderView:
    """Seed contract: an object whose `.layer` is the live list of blocks (5.x has no `encoder`)."""

    def __init__(self, anatomy: Anatomy):
        self._anatomy = anatomy

    @property
    def layer(self) -> nn.ModuleList:
        return getattr(self._anatomy.blocks_owner, self._anatomy.blocks_attr)


def _get_encoder(model: nn.Module):
    """Return an object with `.layer`, the model's list of transformer blocks (seed API)."""
    anatomy = resolve(model)
    if anatomy.blocks_attr == "layer":
        return anatomy.blocks_owner
    return _EncoderView(anatomy)
