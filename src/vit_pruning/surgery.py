"""Surgery: physically remove MLP neurons, attention heads, whole blocks, or attention sublayers.

Small functions on modules, in the manner of transformers' ``prune_linear_layer``: they build
new, smaller ``nn.Linear`` layers from the kept indices and keep the config truthful.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from .anatomy import Anatomy, BlockParts, resolve, supported_class
from .modeling_vit_pruning import (HEAD_COUNT_ATTRS, HEAD_TABLE, HEAD_WIDTH_ATTRS, PRUNED_CLASSES, PRUNED_CONFIGS, AdapterHead,
                                   mlp_slots, neuron_rows,
                                   restore_swapped, set_config_depth, set_config_width,
                                   tower_config)
from .modeling_vit_pruning import bypass_attention as _bypass_block


def prune_linear(layer: nn.Linear, keep_idx: torch.Tensor, dim: int) -> nn.Linear:
    """Return a new Linear keeping rows (dim=0, outputs) or columns (dim=1, inputs) `keep_idx`.

    With dim=1 the bias is kept whole (it belongs to the outputs).
    """
    keep_idx = keep_idx.to(layer.weight.device)
    weight = layer.weight.index_select(dim, keep_idx).detach().clone()
    bias = None
    if layer.bias is not None:
        bias = (layer.bias.index_select(0, keep_idx) if dim == 0 else layer.bias).detach().clone()
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                    device=weight.device, dtype=weight.dtype)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    new.weight.requires_grad_(layer.weight.requires_grad)
    return new


def prune_mlp_neurons(parts: BlockParts, keep_idx: torch.Tensor,
                      fc2_weight: torch.Tensor | None = None,
                      fc2_bias: torch.Tensor | None = None) -> None:
    """Keep only MLP hidden neurons `keep_idx` of one block (rows of fc1 and of a SwiGLU gate,
    columns of fc2).

    `fc2_weight`/`fc2_bias`, if given, replace the pruned fc2's parameters (compensation).
    """
    keep_idx = torch.as_tensor(keep_idx, dtype=torch.long).sort().values
    width = parts.intermediate_size
    if keep_idx.numel() == 0 or keep_idx.min() < 0 or keep_idx.max() >= width:
        raise ValueError(f"keep_idx must be non-empty indices in [0, {width}), got {keep_idx.tolist()[:8]}...")
    if keep_idx.unique().numel() != keep_idx.numel():
        raise ValueError("keep_idx contains duplicates")
    ins, (own2, n2), fused = mlp_slots(parts.block)
    rows = neuron_rows(keep_idx, width, fused)
    new_fc2 = prune_linear(parts.fc2, keep_idx, dim=1)
    with torch.no_grad():
        if fc2_weight is not None:
            new_fc2.weight.copy_(fc2_weight)
        if fc2_bias is not None and new_fc2.bias is not None:
            new_fc2.bias.copy_(fc2_bias)
    for owner, name in ins:
        setattr(owner, name, prune_linear(getattr(owner, name), rows, dim=0))
    setattr(own2, n2, new_fc2)


def head_rows(keep: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of q/k/v (columns of the output projection) that hold heads `keep`."""
    offsets = torch.arange(head_dim, device=keep.device)
    return (keep[:, None] * head_dim + offsets).flatten()


def prune_heads(parts: BlockParts, keep_heads: torch.Tensor,
                o_weight: torch.Tensor | None = None, o_bias: torch.Tensor | None = None) -> None:
    """Keep only attention heads `keep_heads` of one block, in their order, each with its full
    head dimension: their q/k/v rows, their columns of the output projection and their columns
    of a per-block relative position bias table. Keeping none removes the attention sublayer
    (:func:`bypass_attention`).

    `o_weight` / `o_bias`, if given, replace the pruned output projection's parameters (the
    least-squares refit).
    """
    slots = parts.heads
    if slots is None:
        raise ValueError("the attention sublayer of this block was removed: it has no heads")
    keep = torch.as_tensor(keep_heads, dtype=torch.long).sort().values
    n = slots.num_heads
    if keep.numel() and (keep.min() < 0 or keep.max() >= n):
        raise ValueError(f"keep_heads must be indices in [0, {n}), got {keep.tolist()}")
    if keep.unique().numel() != keep.numel():
        raise ValueError("keep_heads contains duplicates")
    if keep.numel() == 0:
        bypass_attention(parts)
        return
    rows = head_rows(keep, slots.head_dim)
    for which, name in zip("qkv", slots.qkv):
        setattr(slots.owner, name, prune_linear(slots.linear(which), rows, dim=0))
    new_o = prune_linear(slots.linear("o"), rows, dim=1)
    with torch.no_grad():
        if o_weight is not None:
            new_o.weight.copy_(o_weight)
        if o_bias is not None and new_o.bias is not None:
            new_o.bias.copy_(o_bias)
    setattr(slots.o_owner, slots.o_name, new_o)
    for m in slots.tables:
        table = getattr(m, HEAD_TABLE)
        setattr(m, HEAD_TABLE, nn.Parameter(table.detach().index_select(
            1, keep.to(table.device)).clone(), requires_grad=table.requires_grad))
    slots.set_count(int(keep.numel()))


def attention_refs(parts: BlockParts) -> list:
    """What :func:`prune_heads` replaces in one block (its attention's linears, tables, head
    counts and class), recorded so that :func:`restore_attention_refs` undoes it."""
    slots = parts.heads
    if slots is None:
        return []
    owner = slots.owner
    attrs = {a: getattr(owner, a) for a in (*HEAD_COUNT_ATTRS, *HEAD_WIDTH_ATTRS)
             if isinstance(getattr(owner, a, None), int)}
    linears = [(slots.owner, name, getattr(slots.owner, name)) for name in slots.qkv]
    linears.append((slots.o_owner, slots.o_name, slots.linear("o")))
    tables = [(m, HEAD_TABLE, getattr(m, HEAD_TABLE)) for m in slots.tables]
    return [owner, type(owner), attrs, linears + tables]


def restore_attention_refs(saved: list) -> None:
    """Undo :func:`prune_heads` (a block that lost every head is restored by
    :class:`TemporaryBypass` or :func:`restore_attention`, not here)."""
    if not saved:
        return
    owner, cls, attrs, refs = saved
    owner.__class__ = cls
    for name, value in attrs.items():
        setattr(owner, name, value)
    for module, name, value in refs:
        setattr(module, name, value)


def mlp_refs(parts: BlockParts) -> list[tuple[nn.Module, str, nn.Module]]:
    """References to a block's MLP linears as (owner, attribute, module). Surgery replaces these
    modules rather than editing them, so putting the references back undoes width pruning."""
    ins, out, _ = mlp_slots(parts.block)
    return [(owner, name, getattr(owner, name)) for owner, name in [*ins, out]]


def restore_refs(refs: list[tuple[nn.Module, str, nn.Module]]) -> None:
    """Put back modules recorded by :func:`mlp_refs`."""
    for owner, name, fc in refs:
        setattr(owner, name, fc)


def head_info(model: nn.Module) -> dict | None:
    """The adapter head's shape (None for a plain linear head or none)."""
    head = getattr(model, "classifier", None)
    if isinstance(head, AdapterHead):
        return {"kind": "adapter", "bottleneck": head.down.out_features,
                "num_labels": head.head.out_features, "in_features": head.down.in_features}
    return None


def is_plain(anatomy: Anatomy) -> bool:
    """Whether plain transformers can rebuild the model from its config: one MLP width in every
    block that the config can state exactly, every attention sublayer in place with all its
    heads, no adapter head."""
    return (_config_states_widths(anatomy)
            and not any(p.attention_removed for p in anatomy.parts)
            and [p.num_heads for p in anatomy.parts] == anatomy.config_heads()
            and head_info(anatomy.model) is None)


def _config_states_widths(anatomy: Anatomy) -> bool:
    """Whether the stock class, built from the config, has these MLP widths (and, Swin, these
    window shifts)."""
    if anatomy.stage_of is None:
        widths = {p.intermediate_size for p in anatomy.parts}
        return len(widths) == 1 and set_config_width(copy.deepcopy(anatomy.model.config),
                                                     widths.pop())
    cfg = tower_config(anatomy.model.config)
    if any(p.intermediate_size != int(cfg.mlp_ratio * p.fc2.out_features) for p in anatomy.parts):
        return False
    for stage, ids in enumerate(anatomy.stage_blocks()):  # a stock stage shifts every 2nd block
        if min(anatomy.stage_dims[stage]) <= cfg.window_size:
            continue  # windows cover the whole grid: the block never shifts
        if any(int(anatomy.blocks[i].shift_size) != (cfg.window_size // 2 if j % 2 else 0)
               for j, i in enumerate(ids)):
            return False
    return True


def stock_class(model: nn.Module) -> type:
    """The transformers class a (possibly class-swapped) pruned model is an instance of."""
    name = supported_class(model)
    return next(cls for cls in type(model).__mro__ if cls.__name__ == name)


def sync_config(anatomy: Anatomy) -> None:
    """Keep config truthful after surgery: depth, per-block widths and heads, removed attention
    and the head. A model plain transformers cannot rebuild becomes an instance of its ``Pruned*``
    subclass (:mod:`vit_pruning.modeling_vit_pruning`), so that ``model.save_pretrained`` writes
    a folder that reloads with ``trust_remote_code=True``."""
    model = anatomy.model
    cfg = model.config
    widths = [p.intermediate_size for p in anatomy.parts]
    swin = anatomy.stage_of is not None
    stage_depths = [len(ids) for ids in anatomy.stage_blocks()] if swin else None
    set_config_depth(cfg, len(anatomy.parts), stage_depths)
    set_config_width(cfg, max(widths))
    cfg.vit_pruning = {
        **(getattr(cfg, "vit_pruning", None) or {}),
        **({"depths": stage_depths, "shift_sizes": [int(b.shift_size) for b in anatomy.blocks]}
           if swin else {}),
        "intermediate_sizes": widths,
        "attention_removed": [i for i, p in enumerate(anatomy.parts) if p.attention_removed],
        "attention_heads": [p.num_heads for p in anatomy.parts],
        "head": head_info(model),
        **({"pooler": model.pooler is not None} if hasattr(model, "pooler") else {}),
    }
    stock = stock_class(model)
    plain = is_plain(anatomy)
    model.__class__ = stock if plain else PRUNED_CLASSES[stock.__name__][0]
    # the config's model type follows: a pruned structure's (pruned_<type>) is one plain
    # transformers refuses to build as the stock class
    stock_cfg = stock.config_class
    twin = PRUNED_CONFIGS[stock_cfg.__name__]
    if type(cfg) in (stock_cfg, twin):
        cfg.__class__ = stock_cfg if plain else twin


def remove_blocks(model: nn.Module, indices: Sequence[int]) -> nn.Module:
    """Remove whole blocks (by current index) and update config.num_hidden_layers."""
    anatomy = resolve(model)
    n = len(anatomy.blocks)
    drop = set(int(i) for i in indices)
    bad = sorted(i for i in drop if not 0 <= i < n)
    if bad:
        raise ValueError(f"block indices {bad} out of range [0, {n})")
    if len(drop) >= n:
        raise ValueError(f"cannot remove all {n} blocks")
    if anatomy.stage_of is None:
        kept = nn.ModuleList([b for i, b in enumerate(anatomy.blocks) if i not in drop])
        setattr(anatomy.blocks_owner, anatomy.blocks_attr, kept)
    else:  # Swin: per stage; each keeps a block (patch merging needs its input)
        stage_ids = anatomy.stage_blocks()
        empty = [k for k, ids in enumerate(stage_ids) if set(ids) <= drop]
        if empty:
            raise ValueError(f"cannot remove every block of stage {empty[0]} "
                             f"(blocks {stage_ids[empty[0]]}): each stage keeps one")
        for stage, ids in zip(anatomy.stages, stage_ids):
            stage.blocks = nn.ModuleList([anatomy.blocks[i] for i in ids if i not in drop])
    sync_config(resolve(model))
    return model


def bypass_attention(parts: BlockParts) -> list:
    """Remove a block's attention sublayer in place; return what :func:`restore_attention` needs.

    Pre-norm (ViT): the sublayer, its LayerNorm, its layer scale and a per-block relative
    position bias go; the block computes x + MLP(LN(x)). Post-norm (BERT): q/k/v/o go, the
    LayerNorm stays on the stream: LN1(x + attn(x)) -> LN1(x).
    """
    return _bypass_block(parts.block)


def restore_attention(saved: list) -> None:
    """Undo :func:`bypass_attention` (used while scoring candidates, no model copies)."""
    restore_swapped(saved)


class TemporaryBypass:
    """Bypass attention sublayers for a while (scoring, calibration); on exit every sublayer
    still bypassed is restored, so the model leaves exactly as it came, with no copies.

        with TemporaryBypass(model) as bypass:
            bypass.add(3)      # block 3 now computes x + MLP(x)
            bypass.undo(3)     # and has its attention back
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._saved: dict[int, list] = {}

    def add(self, index: int) -> None:
        anatomy = resolve(self.model)
        self._saved[index] = bypass_attention(anatomy.parts[index])

    def undo(self, index: int) -> None:
        restore_attention(self._saved.pop(index))

    def __enter__(self) -> "TemporaryBypass":
        return self

    def __exit__(self, *exc) -> None:
        for index in list(self._saved):
            self.undo(index)


def remove_attention(model: nn.Module, indices: Sequence[int]) -> nn.Module:
    """Remove the attention sublayer of blocks `indices` (see :func:`bypass_attention`)."""
    anatomy = resolve(model)
    n = len(anatomy.parts)
    bad = sorted(int(i) for i in indices if not 0 <= int(i) < n)
    if bad:
        raise ValueError(f"block indices {bad} out of range [0, {n})")
    for i in sorted(set(int(i) for i in indices)):
        parts = anatomy.parts[i]
        if parts.attention_removed:
            raise ValueError(f"attention of block {i} is already removed")
        bypass_attention(parts)
    sync_config(resolve(model))
    return model
