"""Model anatomy: find the transformer blocks of a supported model, once, by structure.

Supported are the model classes in :data:`SUPPORTED_CLASSES`, nothing else: a class whose blocks
merely look familiar is refused by name, because a family's extras (layer scale, relative
position bias, pooling heads) change what pruning must preserve. Within a family the blocks
are found by structure, so both transformers majors work:

- ViT / DeiT / ViTMAE: 5.x ``layers[i].{attention.{q,k,v,o}_proj, mlp.{fc1,fc2}}``, 4.x
  ``encoder.layer[i].{attention.attention.{query,key,value}, intermediate.dense, output.dense}``.
- DINOv2: ``encoder.layer[i].{norm1, attention, layer_scale1, norm2, mlp, layer_scale2}``; the
  MLP is ``fc1/fc2`` or SwiGLU (5.x ``gate_proj/up_proj/down_proj``, 4.x ``weights_in`` holding
  gate and up stacked, ``weights_out``).
- BEiT / Data2Vec-vision: ViT-like blocks whose sublayer outputs are scaled by ``lambda_1`` /
  ``lambda_2`` (layer scale), with an optional relative position bias.
- CLIP / SigLIP vision towers: ``vision_model.encoder.layers[i].{layer_norm1, self_attn,
  layer_norm2, mlp.{fc1,fc2}}``, alone or inside the dual ``CLIPModel`` / ``SiglipModel``
  (the text tower is left untouched).
- Swin: ``encoder.layers[stage].blocks[j]`` (ViT-like blocks on windows), stages of different
  widths joined by patch merging (``downsample``). Blocks are numbered across stages; running
  the last block of a stage is followed by its patch merging (:meth:`Anatomy.transition`).
- BERT-family text encoders (``encoder.layer[i]``, *post*-LayerNorm: each sublayer's LayerNorm
  sits on the residual stream after the sum).

Everything else in this package goes through :func:`resolve`, so no other module knows which
family or layout it is looking at.

A resolved model can also be run *in segments* (embed -> block i -> ... -> head), which is what
calibration and greedy depth selection use to reuse the hidden states that stay the same.
Segments run without an attention mask: image batches have none, and text batches are made
padding-free first (:func:`vit_pruning.batches.take_inputs` groups sentences by length).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Collection, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .modeling_vit_pruning import (ATTENTION, NORM_AFTER, NORM_BEFORE, AttentionBypass, HeadSlots,
                                   PostNormAttentionBypass, attention_returns_tuple, head_slots,
                                   attention_scale_attr, block_slot, first_attr, is_post_norm,
                                   mlp_slots,
                                   tower, tower_config)
from .modeling_vit_pruning import SUPPORTED as _SUPPORTED_TABLE

# model class -> (family, what its forward gives for fidelity: "logits", "hidden" (the last
# hidden state), "pooled" (the tower's image embedding, pooler_output), "image_embeds" (a dual
# model's projected image embedding) or "text" (mean-pooled token states))
SUPPORTED_CLASSES: dict[str, tuple[str, str]] = {  # class -> (resolver family, output kind)
    name: (family, output) for name, (family, output, _, _) in _SUPPORTED_TABLE.items()}
SUPPORTED = ", ".join(SUPPORTED_CLASSES)
DUAL_CLASSES = ("CLIPModel", "SiglipModel")  # image and text towers; only the image one is pruned
TEXT_BACKBONE_PARTS = {"embeddings", "encoder", "pooler"}


def is_text_config(config) -> bool:
    """A text model's config: a vocabulary and no image size (decides, before a model is built,
    whether it takes token ids or pixels)."""
    return bool(getattr(config, "vocab_size", None)) and not hasattr(config, "image_size")


def input_channels(model: nn.Module) -> int:
    """The channels of an image model's pixel values (its vision config's num_channels; 3
    where the config does not say)."""
    return int(getattr(tower_config(model.config), "num_channels", None) or 3)


POOLINGS = ("mean", "cls")  # a text encoder's sentence pooling (config.sentence_pooling)


def sentence_pool(config, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """A text encoder's sentence embedding from its token states, pooled as its config's
    `sentence_pooling` says (set from a sentence-transformers folder's Pooling module, see
    :func:`vit_pruning.text.sentence_modules`): "mean" (the default: the real tokens averaged)
    or "cls" (the first real token's state). (B, T, H) -> (B, H)."""
    mode = getattr(config, "sentence_pooling", None) or "mean"
    if mode == "cls":
        if mask is None:  # padding-free rows (and what an ONNX export traces: no fixed batch)
            return hidden[:, 0]
        return hidden[torch.arange(len(hidden), device=hidden.device), mask.long().argmax(1)]
    if mode != "mean":
        raise ValueError(f"config.sentence_pooling must be one of {POOLINGS}, got {mode!r}")
    return mean_pool(hidden, mask)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sentence embedding of a text encoder: token states averaged over the real tokens
    (sentence-transformers' mean pooling). (B, T, H) -> (B, H)."""
    if mask is None:
        return hidden.mean(1)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


def supported_class(model: nn.Module) -> str:
    """The supported transformers class `model` is (a ``Pruned*`` subclass counts as its stock
    class), or ValueError naming the class and what is supported."""
    for cls in type(model).__mro__:
        if cls.__name__ in SUPPORTED_CLASSES:
            return cls.__name__
    raise ValueError(f"unsupported model class {type(model).__name__}: "
                     + (f"{wrapper}; " if (wrapper := _wrapper_hint(model)) else "")
                     + f"vit_pruning supports {SUPPORTED}")


def _wrapper_hint(model: nn.Module) -> str:
    """What to pass instead of a wrapper around a model (torch.compile, DDP / DataParallel,
    a PEFT model), or ""."""
    inner = next((getattr(model, a) for a in ("_orig_mod", "module") if isinstance(
        getattr(model, a, None), nn.Module)), None)
    if inner is not None:
        how = "model._orig_mod" if hasattr(model, "_orig_mod") else "model.module"
        return (f"it wraps a {type(inner).__name__}: prune that ({how}), and wrap the pruned "
                f"model again")
    if hasattr(model, "merge_and_unload"):
        return "a PEFT model: prune model.merge_and_unload() (its adapters merged into its base)"
    return ""


def output_kind(model: nn.Module) -> str:
    """What :func:`vit_pruning.measure.forward_output` returns for this model (see
    :data:`SUPPORTED_CLASSES`); a SigLIP tower without its pooling head gives hidden states."""
    kind = SUPPORTED_CLASSES[supported_class(model)][1]
    if kind in ("pooled", "image_embeds") and not getattr(tower(model), "use_head", True):
        return "hidden"
    return kind


def mae_noise(model: nn.Module, batch: int) -> torch.Tensor | None:
    """ViTMAE shuffles (and masks) patches by random noise: a fixed ascending noise keeps them in
    order, so the same images always give the same tokens (None for other models)."""
    emb = getattr(tower(model), "embeddings", None)
    if type(emb).__name__ != "ViTMAEEmbeddings":
        return None
    n = emb.patch_embeddings.num_patches
    dev = emb.patch_embeddings.projection.weight.device
    return torch.arange(n, device=dev, dtype=torch.float32).expand(batch, n)


def _scale(block: nn.Module, names: tuple[str, ...]) -> torch.Tensor | None:
    """A layer-scale vector (DINOv2 ``layer_scale*.lambda1``, BEiT ``lambda_*``), or None."""
    for name in names:
        val = getattr(block, name, None)
        if isinstance(val, nn.Module) and isinstance(getattr(val, "lambda1", None), torch.Tensor):
            return val.lambda1
        if isinstance(val, torch.Tensor):
            return val
    return None


class _StreamCaptured(Exception):
    """Raised by a hook to stop a block's forward once the stream after attention is seen."""


@dataclass(frozen=True)
class BlockParts:
    """The prunable pieces of one transformer block."""

    block: nn.Module
    fc1: nn.Linear  # hidden -> intermediate (SwiGLU: up_proj; 4.x DINOv2: gate and up fused)
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
    gate: nn.Linear | None = None  # SwiGLU gate_proj (5.x)
    fused: bool = False  # fc1 holds [gate; up] (4.x SwiGLU): neuron j is rows j and j + width
    mlp_scale: torch.Tensor | None = None  # layer scale on the MLP's output (DINOv2, BEiT)
    heads: HeadSlots | None = None  # the attention's heads (None where it was removed)

    @property
    def num_heads(self) -> int:
        """Heads the block's attention computes (0 where the sublayer was removed)."""
        return 0 if self.heads is None else self.heads.num_heads

    @property
    def head_params(self) -> int:
        """Parameters one attention head holds (0 where the sublayer was removed)."""
        return 0 if self.heads is None else self.heads.params_per_head

    def hidden_act(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP's hidden activations (fc2's input) for the MLP's input `x`."""
        if self.fused:
            gate, up = self.fc1(x).chunk(2, dim=-1)
            return self.act_fn(gate) * up
        if self.gate is not None:
            return self.act_fn(self.gate(x)) * self.fc1(x)
        return self.act_fn(self.fc1(x))

    def mlp_out(self, x: torch.Tensor) -> torch.Tensor:
        """What the MLP sublayer adds to the stream for its input `x` (layer scale included)."""
        out = self.fc2(self.hidden_act(x))
        return out if self.mlp_scale is None else self.mlp_scale * out

    def mlp_residual(self, x_mid: torch.Tensor) -> torch.Tensor:
        """The block's second half from the stream after attention: x + MLP(LN(x)) pre-norm,
        LN(x + MLP(x)) post-norm."""
        if self.post_norm:
            return self.norm_after(x_mid + self.mlp_out(x_mid))
        return x_mid + self.mlp_out(self.norm_after(x_mid))

    @property
    def in_projections(self) -> tuple[nn.Linear, ...]:
        """The linears with one row (two when fused) per hidden neuron."""
        return (self.fc1,) if self.gate is None else (self.fc1, self.gate)

    @property
    def in_weights(self) -> list[torch.Tensor]:
        """(width, hidden) weight matrices, one per input projection (fused ones split)."""
        if self.fused:
            return list(self.fc1.weight.chunk(2, dim=0))
        return [fc.weight for fc in self.in_projections]

    @property
    def neuron_params(self) -> int:
        """Parameters one hidden neuron holds: its input rows (+ biases) and its fc2 column."""
        rows = sum(fc.in_features + (fc.bias is not None) for fc in self.in_projections)
        return rows * (2 if self.fused else 1) + self.fc2.out_features

    @property
    def sum_module(self) -> nn.Module | None:
        """Post-norm: the module whose *input* is the pre-norm residual sum the MLP writes into
        (None pre-norm, where that sum is the block output itself)."""
        return self.norm_after if self.post_norm else None

    @property
    def attention_params(self) -> int:
        """Parameters that removing the attention sublayer frees (0 if already removed): its
        projections, pre-norm, layer scale and per-block relative position bias."""
        if self.attention_removed:
            return 0
        att = sum(p.numel() for p in self.attention.parameters())
        norm = sum(p.numel() for p in self.norm_before.parameters())
        if self.post_norm:
            return att - norm
        extra = 0
        scale = attention_scale_attr(self.block)
        if scale is not None:
            val = getattr(self.block, scale)
            extra += sum(p.numel() for p in val.parameters()) if isinstance(val, nn.Module) \
                else val.numel()
        bias = getattr(self.block, "relative_position_bias", None)
        if isinstance(bias, nn.Module):
            extra += sum(p.numel() for p in bias.parameters())
        return att + norm + extra

    @property
    def intermediate_size(self) -> int:
        return self.fc2.in_features


@dataclass(frozen=True)
class Anatomy:
    """Where things are in one model. Re-resolve after any surgery."""

    model: nn.Module
    backbone: nn.Module  # the tower holding embeddings and blocks (ViTModel, vision_model, ...)
    blocks: nn.ModuleList
    blocks_owner: nn.Module  # holds `blocks` as attribute `blocks_attr`
    blocks_attr: str
    parts: tuple[BlockParts, ...]
    hidden_size: int
    num_heads: int
    layout: str  # "v5" or "v4" (ViT/DeiT), "bert" (text encoders), else the family name
    has_classifier: bool
    family: str = "vit"
    output: str = "logits"  # see SUPPORTED_CLASSES
    image_size: int = 224
    stage_of: tuple[int, ...] | None = None  # Swin: the stage of each block (None: one stage)
    stages: tuple[nn.Module, ...] = ()  # Swin: the stages (each with .blocks, .downsample)
    stage_dims: tuple[tuple[int, int], ...] = ()  # Swin: each stage's token grid (height, width)

    @property
    def is_text(self) -> bool:
        return self.layout == "bert"

    @property
    def shared_head_bias(self) -> bool:
        """A relative position bias shared by every block (BEiT's
        ``use_shared_relative_position_bias``): computed once for all heads of every block, so
        a block cannot lose heads on its own."""
        shared = getattr(self.backbone, "shared_position_bias", None)  # 5.x
        if shared is None:  # 4.x: on the encoder
            shared = getattr(getattr(self.backbone, "encoder", None), "relative_position_bias", None)
        return isinstance(shared, nn.Module)

    def config_heads(self) -> list[int]:
        """The heads each block has as its config builds it (Swin: its stage's count)."""
        heads = tower_config(self.model.config).num_attention_heads
        if isinstance(heads, (list, tuple)):
            return [int(heads[s]) for s in self.stage_of]
        return [int(heads)] * len(self.parts)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """Embeddings: the input of block 0, shape (B, T, hidden). `inputs` are pixel values
        (images) or padding-free token ids (text)."""
        emb = self.backbone.embeddings
        if self.is_text:
            return emb(input_ids=inputs)
        proj = getattr(emb, "patch_embeddings", None)
        conv = getattr(proj, "projection", None) or getattr(emb, "patch_embedding", None)
        x = inputs.to(conv.weight.dtype)
        if self.family == "vitmae":
            return emb(x, noise=mae_noise(self.model, x.shape[0]))[0]
        out = emb(x)
        out = out[0] if isinstance(out, tuple) else out  # 4.x BEiT: (embeddings, patch grid)
        pre = getattr(self.backbone, "pre_layrnorm", None)  # CLIP's LayerNorm before block 0
        return pre(out) if pre is not None else out

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output of the last block -> what the model's forward gives (see
        :data:`SUPPORTED_CLASSES`): logits, final hidden states, image or sentence embedding."""
        if self.is_text:
            return sentence_pool(self.model.config, hidden)
        model, tw = self.model, self.backbone
        if self.family in ("clip", "siglip"):
            post = tw.post_layernorm
            if self.family == "clip":
                if self.output == "logits":
                    return model.classifier(hidden[:, 1:].mean(1))
                pooled = post(hidden[:, 0])
                return model.visual_projection(pooled) if self.output == "image_embeds" else pooled
            out = post(hidden)
            if self.output == "logits":
                return model.classifier(out.mean(1))
            return out if self.output == "hidden" else tw.head(out)
        out = tw.layernorm(hidden)
        if self.output != "logits":
            return out
        if self.family == "swin":
            return model.classifier(tw.pooler(out.transpose(1, 2)).flatten(1))
        if self.family == "dinov2":
            return model.classifier(torch.cat([out[:, 0], out[:, 1:].mean(1)], dim=-1))
        if self.family == "beit":
            return model.classifier(tw.pooler(out))
        if hasattr(model, "distillation_classifier"):  # a distilled DeiT: two tokens, two heads
            return (model.cls_classifier(out[:, 0]) + model.distillation_classifier(out[:, 1])) / 2
        return model.classifier(out[:, 0, :])

    def block_call(self, hidden: torch.Tensor) -> tuple[tuple, dict]:
        """The extra arguments the family's encoder passes each block."""
        params = list(inspect.signature(type(self.blocks[0]).forward).parameters.values())[2:]
        # arguments without a default (CLIP / SigLIP attention masks): None, images have none
        args = tuple(None for p in params if p.default is inspect.Parameter.empty
                     and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        if self.family != "beit":
            return args, {}
        size = (self.image_size, self.image_size)
        kwargs: dict = {"resolution": size}
        names = {p.name for p in params}
        shared = getattr(self.backbone, "shared_position_bias", None)  # 5.x
        if shared is None:  # 4.x: on the encoder
            shared = getattr(getattr(self.backbone, "encoder", None), "relative_position_bias", None)
        if shared is not None:
            patch = int(tower_config(self.model.config).patch_size)
            bias = shared((size[0] // patch, size[1] // patch), interpolate_pos_encoding=False,
                          dim_size=hidden.shape[1])
            kwargs["attention_mask" if "attention_mask" in names else "relative_position_bias"] = bias
        return args, kwargs

    def block_forward(self, index: int, hidden: torch.Tensor,
                      call: tuple[tuple, dict] | None = None) -> torch.Tensor:
        """Block `index` alone on `hidden` (no patch merging after it)."""
        if self.stage_of is not None:
            out = self.blocks[index](hidden, self.stage_dims[self.stage_of[index]])
        else:
            args, kwargs = call if call is not None else self.block_call(hidden)
            out = self.blocks[index](hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def transition(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """What follows block `index` before the next block: Swin's patch merging after the last
        block of a stage, else nothing. It runs whether or not block `index` itself ran."""
        if self.stage_of is None:
            return hidden
        stage = self.stage_of[index]
        if index + 1 < len(self.stage_of) and self.stage_of[index + 1] == stage:
            return hidden
        merge = getattr(self.stages[stage], "downsample", None)
        return hidden if merge is None else merge(hidden, self.stage_dims[stage])

    def stage_blocks(self) -> list[list[int]]:
        """Block indices per stage ([all blocks] for single-stage models)."""
        if self.stage_of is None:
            return [list(range(len(self.blocks)))]
        out: list[list[int]] = [[] for _ in self.stages]
        for i, st in enumerate(self.stage_of):
            out[st].append(i)
        return out

    def run_blocks(self, hidden: torch.Tensor, start: int = 0, stop: int | None = None,
                   skip: Collection[int] = ()) -> torch.Tensor:
        """Run blocks[start:stop] on `hidden`, leaving the blocks in `skip` out (Swin's patch
        merging still runs at the end of each stage)."""
        stop = len(self.blocks) if stop is None else stop
        call = self.block_call(hidden) if self.stage_of is None else None
        for i in range(start, stop):
            if i not in skip:
                hidden = self.block_forward(i, hidden, call)
            hidden = self.transition(i, hidden)
        return hidden

    def attention_stream(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """The residual stream after block `index`'s attention sublayer, for block input
        `hidden` (pre-norm: the MLP's LayerNorm input; post-norm: its attention output)."""
        parts = self.parts[index]
        if parts.post_norm:
            out = parts.attention(hidden)
            return out[0] if isinstance(out, tuple) else out
        return self.run_until(index, hidden, parts.norm_after)[0]  # the MLP does not run

    def run_until(self, index: int, hidden: torch.Tensor, stop: nn.Module,
                  watch: Sequence[nn.Module] = ()) -> list[torch.Tensor]:
        """Run block `index` on `hidden` only until `stop` is called: the first input of each
        module of `watch` (called before `stop`), then `stop`'s; the rest of the block does
        not run."""
        seen: list[torch.Tensor | None] = [None] * (len(watch) + 1)

        def hook(k: int):
            def take(_module, args):
                if seen[k] is None:
                    seen[k] = args[0]
                if k == len(watch):
                    raise _StreamCaptured
            return take

        handles = [m.register_forward_pre_hook(hook(k)) for k, m in enumerate([*watch, stop])]
        try:
            self.block_forward(index, hidden)
        except _StreamCaptured:
            pass
        finally:
            for h in handles:
                h.remove()
        if seen[-1] is None:
            raise RuntimeError(f"block {index} finished without calling {type(stop).__name__}")
        return seen


def _text_backbone(model: nn.Module) -> None:
    extra = sorted(set(n for n, _ in model.named_children()) - TEXT_BACKBONE_PARTS)
    if extra:
        raise ValueError(
            f"unsupported model class {type(model).__name__}: a text model with "
            f"{', '.join(extra)} besides embeddings -> encoder (heads and embedding "
            f"projections are not supported); vit_pruning supports {SUPPORTED}")


def _bert_block_parts(block: nn.Module) -> BlockParts:
    """A post-LayerNorm BERT block."""
    att, out = getattr(block, "attention", None), getattr(block, "output", None)
    inter = getattr(block, "intermediate", None)
    if getattr(block, "crossattention", None) is not None:
        raise ValueError(f"unsupported block class {type(block).__name__}: blocks with "
                         f"cross-attention (decoders) are not supported; supported: {SUPPORTED}")
    norm = getattr(getattr(att, "output", None), "LayerNorm", None)
    if not (isinstance(norm, nn.Module) and isinstance(getattr(out, "LayerNorm", None), nn.Module)
            and hasattr(inter, "dense") and (isinstance(att, PostNormAttentionBypass)
                                             or hasattr(att, "self"))):
        raise ValueError(f"unsupported block class {type(block).__name__}: no "
                         f"attention.self/attention.output.LayerNorm; supported: {SUPPORTED}")
    return BlockParts(
        block=block, fc1=inter.dense, fc2=out.dense, attention=att, attention_owner=block,
        attention_attr="attention", norm_before=norm,
        attention_removed=isinstance(att, AttentionBypass), norm_after=out.LayerNorm,
        act_fn=inter.intermediate_act_fn, post_norm=True, attention_returns_tuple=True,
        heads=head_slots(block),
    )


def _act_fn(block: nn.Module, fused: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    if fused:
        return F.silu  # transformers 4.x Dinov2SwiGLUFFN applies silu functionally
    mlp = getattr(block, "mlp", None)
    for owner, name in ((mlp, "activation_fn"), (mlp, "act_fn"), (mlp, "activation"),
                        (getattr(block, "intermediate", None), "intermediate_act_fn")):
        if callable(getattr(owner, name, None)):
            return getattr(owner, name)
    raise ValueError(f"unsupported block class {type(block).__name__}: no MLP activation found")


def _block_parts(block: nn.Module) -> BlockParts:
    if is_post_norm(block):
        return _bert_block_parts(block)
    ins, (own2, n2), fused = mlp_slots(block)
    att_attr, norm_attr = first_attr(block, ATTENTION), first_attr(block, NORM_BEFORE)
    after_attr = first_attr(block, NORM_AFTER)
    if att_attr is None or norm_attr is None or after_attr is None:
        raise ValueError(f"unsupported block class {type(block).__name__}: expected an attention "
                         f"sublayer and two LayerNorms ({'/'.join(NORM_BEFORE)}, "
                         f"{'/'.join(NORM_AFTER)}); supported: {SUPPORTED}")
    att = getattr(block, att_attr)
    return BlockParts(
        block=block, fc1=getattr(*ins[0]), fc2=getattr(own2, n2), attention=att,
        attention_owner=block, attention_attr=att_attr, norm_before=getattr(block, norm_attr),
        attention_removed=isinstance(att, AttentionBypass),
        norm_after=getattr(block, after_attr), act_fn=_act_fn(block, fused),
        attention_returns_tuple=attention_returns_tuple(block),
        gate=getattr(*ins[1]) if len(ins) > 1 else None, fused=fused,
        mlp_scale=_scale(block, ("layer_scale2", "lambda_2")), heads=head_slots(block),
    )


def resolve(model: nn.Module) -> Anatomy:
    """Resolve the anatomy of a supported model, or raise ValueError naming what is supported."""
    name = supported_class(model)
    family = SUPPORTED_CLASSES[name][0]
    backbone = tower(model)
    if family == "bert":
        _text_backbone(model)
    owner, attr = None, None
    stage_info: dict = {}
    if family == "swin":
        blocks, stage_info = _swin_stages(model, backbone)
    else:
        slot = block_slot(backbone)
        if slot is None:
            raise ValueError(f"unsupported model class {type(model).__name__}: no block list "
                             f"found; vit_pruning supports {SUPPORTED}")
        owner, attr = slot
        blocks = getattr(owner, attr)
    parts = tuple(_block_parts(b) for b in blocks)
    if not parts:
        raise ValueError(f"model {type(model).__name__} has no transformer blocks left")
    if family == "vit":
        layout = "v5" if attr == "layers" else "v4"
    else:
        layout = family
    cfg = tower_config(model.config)
    kind = output_kind(model)
    heads = cfg.num_attention_heads
    return Anatomy(
        model=model, backbone=backbone, blocks=blocks, blocks_owner=owner, blocks_attr=attr,
        parts=parts, hidden_size=int(cfg.hidden_size),
        num_heads=int(max(heads) if isinstance(heads, (list, tuple)) else heads),
        layout=layout, has_classifier=kind == "logits", family=family, output=kind,
        image_size=_image_size(cfg), **stage_info,
    )


def _image_size(cfg) -> int:
    size = getattr(cfg, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _swin_stages(model: nn.Module, backbone: nn.Module) -> tuple[nn.ModuleList, dict]:
    """Swin's blocks numbered across stages, each block's stage, and each stage's token grid
    (patch grid at the config's image size, halved, rounding up, by each patch merging)."""
    stages = tuple(backbone.encoder.layers)
    blocks = nn.ModuleList([b for st in stages for b in st.blocks])  # a view: owns nothing new
    stage_of = tuple(k for k, st in enumerate(stages) for _ in st.blocks)
    cfg = tower_config(model.config)
    patch = int(cfg.patch_size if not isinstance(cfg.patch_size, (list, tuple)) else cfg.patch_size[0])
    h = w = -(-_image_size(cfg) // patch)
    dims = []
    for st in stages:
        dims.append((h, w))
        if getattr(st, "downsample", None) is not None:
            h, w = (h + 1) // 2, (w + 1) // 2
    return blocks, {"stage_of": stage_of, "stages": stages, "stage_dims": tuple(dims)}


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
