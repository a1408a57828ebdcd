"""Model anatomy: find the transformer blocks of a ViT-family model (or a BERT-family text
encoder), once, by structure.

transformers 5.x lays a ViT out as ``vit.layers[i].{attention.{q,k,v,o}_proj, mlp.{fc1,fc2}}``;
4.x as ``vit.encoder.layer[i].{attention.attention.{query,key,value}, attention.output.dense,
intermediate.dense, output.dense}``. A BERT encoder (both majors) is
``encoder.layer[i].{attention.self.{query,key,value}, attention.output.{dense,LayerNorm},
intermediate.dense, output.{dense,LayerNorm}}`` and is *post*-LayerNorm: each sublayer's
LayerNorm sits on the residual stream after the sum. Everything else in this package goes
through :func:`resolve`, so no other module knows which layout it is looking at.

A resolved model can also be run *in segments* (embed -> block i -> ... -> head), which is what
calibration and greedy depth selection use to reuse the hidden states that stay the same.
Segments run without an attention mask: image batches have none, and text batches are made
padding-free first (:func:`vit_pruning.batches.take_inputs` groups sentences by length).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection
import torch
from torch import nn

from .modeling_vit_pruning import (AttentionBypass, PostNormAttentionBypass,
                                   attention_returns_tuple)

SUPPORTED = (
    "ViTModel, ViTForImageClassification, DeiTModel, DeiTForImageClassification "
    "(transformers 4.x and 5.x layouts), and headless BERT-family text encoders (BertModel, "
    "RobertaModel)"
)
TEXT_BACKBONE_PARTS = {"embeddings", "encoder", "pooler"}


def is_text_config(config) -> bool:
    """A text model's config: a vocabulary and no image size (decides, before a model is built,
    whether it takes token ids or pixels)."""
    return bool(getattr(config, "vocab_size", None)) and not hasattr(config, "image_size")


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sentence embedding of a text encoder: token states averaged over the real tokens
    (sentence-transformers' mean pooling). (B, T, H) -> (B, H)."""
    if mask is None:
        return hidden.mean(1)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


@dataclass(frozen=True)
class BlockParts:
    """The prunable pieces of one transformer block."""

    block: nn.Module
    fc1: nn.Linear  # hidden -> intermediate
    fc2: nn.Linear  # intermediate -> hidden
    attention: nn.Module  # the attention sublayer (projections included)
    attention_owner: nn.Module  # module holding `attention` as attribute `attention_attr`
    attention_attr: str
    norm_before: nn.Module  # the attention sublayer's LayerNorm: pre-norm (ViT) it goes with
    # the sublayer; post-norm (BERT) it stays on the residual stream
    attention_removed: bool
    norm_after: nn.Module  # the MLP sublayer's LayerNorm (before fc1 pre-norm, after the sum post-norm)
    act_fn: Callable[[torch.Tensor], torch.Tensor]  # the MLP nonlinearity
    post_norm: bool = False  # BERT-style: y = LN(x + sublayer(x))
    attention_returns_tuple: bool = True  # what the attention module returns

    def mlp_residual(self, x_mid: torch.Tensor) -> torch.Tensor:
        """The block's second half from the stream after attention: x + MLP(LN(x)) pre-norm,
        LN(x + MLP(x)) post-norm."""
        if self.post_norm:
            return self.norm_after(x_mid + self.fc2(self.act_fn(self.fc1(x_mid))))
        return x_mid + self.fc2(self.act_fn(self.fc1(self.norm_after(x_mid))))

    def attention_stream(self, x: torch.Tensor) -> torch.Tensor:
        """The stream after the attention sublayer: x + attn(LN(x)) pre-norm, LN(x + attn(x))
        post-norm."""
        if self.post_norm:
            out = self.attention(x)
            return out[0] if isinstance(out, tuple) else out
        out = self.attention(self.norm_before(x))
        return x + (out[0] if isinstance(out, tuple) else out)

    @property
    def sum_module(self) -> nn.Module | None:
        """Post-norm: the module whose *input* is the pre-norm residual sum the MLP writes into
        (None pre-norm, where that sum is the block output itself)."""
        return self.norm_after if self.post_norm else None

    @property
    def attention_params(self) -> int:
        """Parameters that removing the attention sublayer frees (0 if already removed)."""
        if self.attention_removed:
            return 0
        att = sum(p.numel() for p in self.attention.parameters())
        norm = sum(p.numel() for p in self.norm_before.parameters())
        return att - norm if self.post_norm else att + norm

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
    layout: str  # "v5" or "v4" (ViT/DeiT), "bert" (text encoders, same in both majors)
    has_classifier: bool

    @property
    def is_text(self) -> bool:
        return self.layout == "bert"

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """Embeddings: the input of block 0, shape (B, T, hidden). `inputs` are pixel values
        (images) or padding-free token ids (text)."""
        emb = self.backbone.embeddings
        if self.is_text:
            return emb(input_ids=inputs)
        dtype = emb.patch_embeddings.projection.weight.dtype
        return emb(inputs.to(dtype))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output of the last block -> logits (classifiers), final normed hidden states
        (headless ViT), or the mean-pooled sentence embedding (text encoders)."""
        if self.is_text:
            return mean_pool(hidden)
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
        if hasattr(getattr(model, "embeddings", None), "word_embeddings"):
            extra = sorted(set(n for n, _ in model.named_children()) - TEXT_BACKBONE_PARTS)
            if not extra:
                return model, False  # a headless text encoder (BertModel, RobertaModel)
            raise ValueError(
                f"unsupported model class {type(model).__name__}: a text model with "
                f"{', '.join(extra)} besides embeddings -> encoder (heads and embedding "
                f"projections are not supported); vit_pruning supports {SUPPORTED}")
    raise ValueError(
        f"unsupported model class {type(model).__name__}: vit_pruning supports {SUPPORTED}"
    )


def _bert_block_parts(block: nn.Module) -> BlockParts | None:
    """A post-LayerNorm BERT block, or None if `block` is not one."""
    att, out = getattr(block, "attention", None), getattr(block, "output", None)
    inter = getattr(block, "intermediate", None)
    if not (isinstance(getattr(out, "LayerNorm", None), nn.Module) and inter is not None
            and isinstance(getattr(out, "dense", None), nn.Linear) and att is not None):
        return None
    if getattr(block, "crossattention", None) is not None:
        raise ValueError(f"unsupported block class {type(block).__name__}: blocks with "
                         f"cross-attention (decoders) are not supported; supported: {SUPPORTED}")
    norm = getattr(getattr(att, "output", None), "LayerNorm", None)
    if not isinstance(norm, nn.Module) or not (isinstance(att, PostNormAttentionBypass)
                                               or hasattr(att, "self")):
        raise ValueError(f"unsupported block class {type(block).__name__}: no "
                         f"attention.self/attention.output.LayerNorm; supported: {SUPPORTED}")
    return BlockParts(
        block=block, fc1=inter.dense, fc2=out.dense, attention=att, attention_owner=block,
        attention_attr="attention", norm_before=norm,
        attention_removed=isinstance(att, AttentionBypass), norm_after=out.LayerNorm,
        act_fn=inter.intermediate_act_fn, post_norm=True, attention_returns_tuple=True,
    )


def _block_parts(block: nn.Module) -> tuple[BlockParts, str]:
    if not hasattr(block, "layernorm_before"):
        bert = _bert_block_parts(block)
        if bert is not None:
            return bert, "bert"
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
        attention_returns_tuple=attention_returns_tuple(block),
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
