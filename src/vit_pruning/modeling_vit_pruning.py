"""Pruned models of every supported family as transformers classes.

A pruned model whose blocks keep MLP widths its config can state and all their attention is a
plain transformers model (``intermediate_size`` / ``mlp_ratio`` and the depth say it all). Any
other pruned structure (per-block widths, attention sublayers removed, an adapter head, Swin
blocks whose window shifts are no longer the stock alternation) is described by the config's
``vit_pruning`` entry and rebuilt by the ``Pruned*`` classes below: the stock class is built,
then :func:`apply_pruned_structure` resizes each block's MLP, bypasses the removed attention
sublayers, restores window shifts and installs the adapter head; the weights are loaded
afterwards, strictly.

This file is copied into every saved folder that needs it, with ``auto_map`` in its config, so
that ``AutoModel*.from_pretrained(folder, trust_remote_code=True)`` loads the model where
vit_pruning is not installed. It therefore imports only torch and transformers, and works
with both transformers majors (4.x ``encoder.layer[i].intermediate.dense``, 5.x
``layers[i].mlp.fc1``; see :func:`mlp_slots` for the MLP kinds).
"""
from __future__ import annotations

import functools
import inspect
import math
import re

import torch
import transformers
from torch import nn
from torch.nn import functional as F

_TF_VERSION = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())

# 4.x layers that, from 4.56 to the last 4.x, take a tensor from their attention module (older
# 4.x versions index ``[0]``, 5.x unpacks a pair, and every other family indexes or unpacks);
# the fallback where a layer's source cannot be read
_TENSOR_ATTENTION_4X = {"ViTLayer", "DeiTLayer", "ViTMAELayer", "Dinov2Layer"}
_ATTENTION_CALL = re.compile(r"^[ \t]*([\w \t,]+?)\s*=\s*self\.(?:attention|self_attn)\(", re.M)


@functools.lru_cache(maxsize=None)
def _forward_takes_tuple(layer_class: type) -> bool | None:
    """Read off a layer class's own forward whether it unpacks or indexes what its attention
    module returns (``x, _ = self.attention(...)``, ``out = self.attention(...)`` then
    ``out[0]``) or uses it as a tensor; None if the source cannot be read or the call not found.
    The layouts moved between releases (DINOv2's layer took a tensor in 5.17 and unpacks a pair
    in 5.24), so the code that runs decides, not a version table."""
    try:
        source = inspect.getsource(layer_class.forward)
    except (OSError, TypeError):
        return None
    call = _ATTENTION_CALL.search(source)
    if call is None:
        return None
    target = call.group(1).strip()
    if "," in target:
        return True
    rest = source[call.end():]
    return bool(re.search(rf"\b{re.escape(target)}\s*\[", rest) or
                re.match(r"[^\n]*\)\s*\[\s*0\s*\]", rest))


def attention_returns_tuple(block: nn.Module) -> bool:
    """What a block expects its attention module to return: a tuple (hidden, weights) or a
    tensor, as the block's forward uses it (:func:`_forward_takes_tuple`); where that cannot be
    read, a tensor for the ViT-derived 4.x layers from 4.56 on, else a tuple."""
    for cls in type(block).__mro__:
        if "forward" in vars(cls):
            found = _forward_takes_tuple(cls)
            if found is not None:
                return found
            break
    if type(block).__name__ in _TENSOR_ATTENTION_4X:
        return not ((4, 56) <= _TF_VERSION < (5, 0))
    return True


class AttentionBypass(nn.Module):
    """Stands in for a removed (pre-LayerNorm) attention sublayer: adds nothing to the residual
    stream, so the block computes ``x + MLP(LN(x))``. Returns what the replaced module did
    (a tuple or a tensor, see :func:`attention_returns_tuple`)."""

    def __init__(self, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return self._wrap(torch.zeros_like(hidden_states))

    def _wrap(self, out: torch.Tensor):
        return (out, None) if self.returns_tuple else out


class PostNormAttentionBypass(AttentionBypass):
    """Stands in for a removed post-LayerNorm attention sublayer (BERT): ``LN1(x + attn(x))``
    becomes ``LN1(x)``. The LayerNorm stays, under its state-dict name
    ``attention.output.LayerNorm``; only q/k/v/o go."""

    def __init__(self, norm: nn.Module):
        super().__init__(returns_tuple=True)
        self.output = nn.Module()
        self.output.LayerNorm = norm

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return self._wrap(self.output.LayerNorm(hidden_states))


class AdapterHead(nn.Module):
    """Residual bottleneck adapter (hidden -> bottleneck -> hidden) followed by a linear head."""

    def __init__(self, hidden_size: int, num_labels: int, reduction: int = 4,
                 bottleneck: int | None = None):
        super().__init__()
        bottleneck = bottleneck or max(1, hidden_size // reduction)
        self.down = nn.Linear(hidden_size, bottleneck)
        self.up = nn.Linear(bottleneck, hidden_size)
        self.head = nn.Linear(hidden_size, num_labels)
        nn.init.zeros_(self.up.weight)  # starts as identity + linear head
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.up(F.gelu(self.down(x))))


# where each family keeps its vision tower / encoder (the model itself when headless)
TOWER_ATTRS = ("vit", "deit", "dinov2", "beit", "data2vec_vision", "vision_model", "swin")
NORM_BEFORE = ("layernorm_before", "norm1", "layer_norm1")  # the attention sublayer's pre-norm
NORM_AFTER = ("layernorm_after", "norm2", "layer_norm2")  # the MLP sublayer's pre-norm
ATTENTION = ("attention", "self_attn")


def tower(model: nn.Module) -> nn.Module:
    """The module holding embeddings and blocks: ``model.vit``, ``model.vision_model``, ...
    or the model itself."""
    return next((getattr(model, a) for a in TOWER_ATTRS
                 if isinstance(getattr(model, a, None), nn.Module)), model)


def tower_config(config):
    """The config describing the pruned tower (CLIP/SigLIP dual models nest it)."""
    return getattr(config, "vision_config", None) or config


def block_slot(base: nn.Module) -> tuple[nn.Module, str] | None:
    """(owner, attribute) of a tower's list of blocks: ``layers`` (5.x ViT-likes),
    ``encoder.layer`` (4.x, BERT, DINOv2) or ``encoder.layers`` (CLIP, SigLIP; Swin's stages)."""
    encoder = getattr(base, "encoder", None)
    for owner, attr in ((base, "layers"), (encoder, "layer"), (encoder, "layers")):
        if isinstance(getattr(owner, attr, None), nn.ModuleList):
            return owner, attr
    return None


def block_list(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks (see :func:`block_slot`), Swin's ``encoder.layers[stage].blocks``
    numbered across stages."""
    slot = block_slot(tower(model))
    if slot is None:
        raise ValueError(f"{type(model).__name__}: no list of transformer blocks found")
    found = getattr(*slot)
    if all(isinstance(getattr(st, "blocks", None), nn.ModuleList) for st in found):
        return nn.ModuleList([b for st in found for b in st.blocks])  # Swin: stages
    return found


def first_attr(module: nn.Module, names: tuple[str, ...]) -> str | None:
    """The first of `names` that `module` has as a submodule."""
    return next((n for n in names if isinstance(getattr(module, n, None), nn.Module)), None)


def mlp_slots(block: nn.Module) -> tuple[list[tuple[nn.Module, str]], tuple[nn.Module, str], bool]:
    """Where a block's MLP linears are: (input projections, output projection, fused).

    Each input projection has one row per hidden neuron (``fc1``; SwiGLU ``up_proj`` and
    ``gate_proj``) and the output projection one column (``fc2``, ``down_proj``). ``fused``:
    one input projection holds gate and up stacked (transformers 4.x DINOv2 ``weights_in``), so
    neuron j is its rows j and j + width.
    """
    mlp = getattr(block, "mlp", None)
    if mlp is not None and hasattr(mlp, "fc1") and hasattr(mlp, "fc2"):
        return [(mlp, "fc1")], (mlp, "fc2"), False
    if mlp is not None and hasattr(mlp, "gate_proj") and hasattr(mlp, "down_proj"):
        return [(mlp, "up_proj"), (mlp, "gate_proj")], (mlp, "down_proj"), False
    if mlp is not None and hasattr(mlp, "weights_in") and hasattr(mlp, "weights_out"):
        return [(mlp, "weights_in")], (mlp, "weights_out"), True
    inter, out = getattr(block, "intermediate", None), getattr(block, "output", None)
    if hasattr(inter, "dense") and hasattr(out, "dense"):
        return [(inter, "dense")], (out, "dense"), False
    raise ValueError(f"unsupported block class {type(block).__name__}: no MLP found (mlp.fc1/fc2, "
                     f"mlp.gate_proj/up_proj/down_proj, mlp.weights_in/weights_out or "
                     f"intermediate.dense/output.dense)")


def neuron_rows(keep: torch.Tensor, width: int, fused: bool) -> torch.Tensor:
    """Rows of an input projection that hold neurons `keep` (both halves when fused)."""
    return torch.cat([keep, keep + width]) if fused else keep


def is_post_norm(block: nn.Module) -> bool:
    """BERT-style blocks: each sublayer's LayerNorm sits on the stream after the sum."""
    return first_attr(block, NORM_BEFORE) is None and hasattr(block, "output")


def attention_scale_attr(block: nn.Module) -> str | None:
    """The attention sublayer's layer scale: DINOv2 ``layer_scale1`` (a module), BEiT /
    Data2Vec ``lambda_1`` (a parameter; a float when the model has none)."""
    if isinstance(getattr(block, "layer_scale1", None), nn.Module):
        return "layer_scale1"
    if isinstance(getattr(block, "lambda_1", None), torch.Tensor):
        return "lambda_1"
    return None


def _swap(owner: nn.Module, attr: str, new, saved: list) -> None:
    saved.append((owner, attr, getattr(owner, attr)))
    delattr(owner, attr)  # a parameter or module slot may get a plain value, and back
    setattr(owner, attr, new)


def restore_swapped(saved: list) -> None:
    """Undo :func:`bypass_attention`."""
    for owner, attr, old in reversed(saved):
        delattr(owner, attr)
        setattr(owner, attr, old)


def bypass_attention(block: nn.Module) -> list:
    """Remove a block's attention sublayer; return what :func:`restore_swapped` puts back.

    Pre-norm blocks lose the attention module, its LayerNorm, its layer scale and a per-block
    relative position bias (BEiT): the block computes ``x + MLP(LN(x))``. Post-norm (BERT):
    q/k/v/o go, the LayerNorm stays on the stream: ``LN1(x + attn(x))`` becomes ``LN1(x)``.
    """
    saved: list = []
    att_attr = first_attr(block, ATTENTION)
    if is_post_norm(block):
        _swap(block, att_attr, PostNormAttentionBypass(block.attention.output.LayerNorm), saved)
        return saved
    _swap(block, att_attr, AttentionBypass(attention_returns_tuple(block)), saved)
    _swap(block, first_attr(block, NORM_BEFORE), nn.Identity(), saved)
    scale = attention_scale_attr(block)
    if scale == "layer_scale1":
        _swap(block, scale, nn.Identity(), saved)
    elif scale == "lambda_1":
        _swap(block, scale, 1.0, saved)
    if isinstance(getattr(block, "relative_position_bias", None), nn.Module):
        _swap(block, "relative_position_bias", None, saved)
    return saved


# attention heads: where each block's per-head weights are, by structure (both layouts)
Q_NAMES, K_NAMES, V_NAMES = ("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")
O_NAMES = ("o_proj", "out_proj")  # 4.x ViT / BERT / Swin: attention.output.dense
HEAD_TABLE = "relative_position_bias_table"  # BEiT / Data2Vec / Swin: a column per head
HEAD_COUNT_ATTRS = ("num_attention_heads", "num_heads")  # what a forward reads as the count
HEAD_WIDTH_ATTRS = ("all_head_size", "embed_dim")  # ... and as the heads' total width


class HeadSlots:
    """Where one block's attention heads live: the module holding the query/key/value linears
    (and the head count its forward reads), the output projection, the head dimension and the
    modules holding a per-head relative position bias table. Head h is rows
    ``h * head_dim : (h + 1) * head_dim`` of q, k and v, the same columns of the output
    projection and column h of each table."""

    def __init__(self, block: nn.Module, attention: nn.Module):
        self.owner = next((m for m in attention.modules()
                           if all(_linear_attr(m, names) for names in (Q_NAMES, K_NAMES, V_NAMES))),
                          None)
        if self.owner is None:
            raise ValueError(f"unsupported attention class {type(attention).__name__}: no "
                             f"query/key/value (or q_proj/k_proj/v_proj) linears found")
        self.qkv = tuple(_linear_attr(self.owner, names) for names in (Q_NAMES, K_NAMES, V_NAMES))
        self.o_owner, self.o_name = _output_projection(attention)
        dim = getattr(self.owner, "attention_head_size", None) or getattr(self.owner, "head_dim", None)
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"unsupported attention class {type(self.owner).__name__}: no head "
                             f"dimension (attention_head_size / head_dim)")
        self.head_dim = dim
        self.tables = tuple(m for m in block.modules()
                            if isinstance(getattr(m, HEAD_TABLE, None), nn.Parameter))

    @property
    def num_heads(self) -> int:
        return self.linear("q").out_features // self.head_dim

    def linear(self, which: str) -> nn.Linear:
        """"q", "k", "v" or "o"."""
        if which == "o":
            return getattr(self.o_owner, self.o_name)
        return getattr(self.owner, self.qkv["qkv".index(which)])

    @property
    def params_per_head(self) -> int:
        """Parameters one head holds: its q/k/v rows with their biases, its columns of the
        output projection and its column of each relative position bias table."""
        rows = sum(self.linear(w).in_features + (self.linear(w).bias is not None) for w in "qkv")
        table = sum(getattr(m, HEAD_TABLE).shape[0] for m in self.tables)
        return self.head_dim * (rows + self.linear("o").out_features) + table

    def set_count(self, heads: int) -> None:
        """Make the attention module's forward compute `heads` heads (its linears already have
        that many): the head-count attributes it reads, and, where the stock forward reshapes
        its output to the *input's* width (CLIP / SigLIP on transformers 4.x), a subclass
        whose forward reshapes to the kept heads' width."""
        owner = self.owner
        for attr in HEAD_COUNT_ATTRS:
            if isinstance(getattr(owner, attr, None), int):
                setattr(owner, attr, heads)
        for attr in HEAD_WIDTH_ATTRS:
            if isinstance(getattr(owner, attr, None), int):
                setattr(owner, attr, heads * self.head_dim)
        if _reads_input_width(type(owner)):
            owner.__class__ = _width_free_class(type(owner))


def _linear_attr(module: nn.Module, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if isinstance(getattr(module, n, None), nn.Linear)), None)


def _output_projection(attention: nn.Module) -> tuple[nn.Module, str]:
    for m in attention.modules():
        name = _linear_attr(m, O_NAMES)
        if name is not None:
            return m, name
    out = getattr(attention, "output", None)
    if isinstance(getattr(out, "dense", None), nn.Linear):
        return out, "dense"
    raise ValueError(f"unsupported attention class {type(attention).__name__}: no output "
                     f"projection (o_proj / out_proj / output.dense) found")


def head_slots(block: nn.Module) -> HeadSlots | None:
    """The heads of a block's attention sublayer (None where it was removed)."""
    att = getattr(block, first_attr(block, ATTENTION) or "", None)
    if att is None or isinstance(att, AttentionBypass):
        return None
    return HeadSlots(block, att)


@functools.lru_cache(maxsize=None)
def _reads_input_width(cls: type) -> bool:
    """Whether an attention class's forward reshapes its output to the width of its input
    (``bsz, tgt_len, embed_dim = hidden_states.size()`` ... ``reshape(bsz, tgt_len, embed_dim)``):
    right only while every head is kept."""
    if not any(cls.__name__.startswith(p) for p in ("CLIP", "Siglip")):
        return False
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return True
    return bool(re.search(r"embed_dim\s*=\s*hidden_states\.(?:shape|size\(\))", source))


class _WidthFreeAttention:
    """CLIP / SigLIP attention with some heads removed, for transformers versions whose forward
    reshapes to the input's width: the same eager computation (softmax in float32, the masks
    added as the stock forward adds them), reshaped to the kept heads' width."""

    def forward(self, hidden_states: torch.Tensor, attention_mask=None,
                causal_attention_mask=None, output_attentions: bool = False, **kwargs):
        b, t, _ = hidden_states.shape

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, t, -1, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q_proj(hidden_states)), split(self.k_proj(hidden_states)), \
            split(self.v_proj(hidden_states))
        weights = torch.matmul(q, k.transpose(2, 3)) * self.scale
        for mask in (causal_attention_mask, attention_mask):
            if mask is not None:
                weights = weights + mask
        weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = F.dropout(weights, p=float(getattr(self, "dropout", 0.0)), training=self.training)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, -1)
        return self.out_proj(out), (weights if output_attentions else None)


@functools.lru_cache(maxsize=None)
def _width_free_class(cls: type) -> type:
    return type(f"HeadPruned{cls.__name__}", (_WidthFreeAttention, cls),
                {"__module__": __name__, "__doc__": _WidthFreeAttention.__doc__})


def resize_heads(block: nn.Module, heads: int) -> None:
    """Give a block's attention `heads` heads (fresh weights, loaded afterwards); 0 removes the
    attention sublayer (:func:`bypass_attention`): one concept, one code path."""
    slots = head_slots(block)
    if slots is None or slots.num_heads == heads:
        return
    if heads == 0:
        bypass_attention(block)
        return
    width = heads * slots.head_dim
    for name in slots.qkv:
        fc = getattr(slots.owner, name)
        setattr(slots.owner, name, _resized(fc, fc.in_features, width))
    o = slots.linear("o")
    setattr(slots.o_owner, slots.o_name, _resized(o, width, o.out_features))
    for m in slots.tables:
        table = getattr(m, HEAD_TABLE)
        setattr(m, HEAD_TABLE, nn.Parameter(table.detach()[:, :heads].clone()))
    slots.set_count(heads)


def _resized(layer: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=layer.bias is not None,
                     device=layer.weight.device, dtype=layer.weight.dtype)


def resize_mlp(block: nn.Module, width: int) -> None:
    """Give a block's MLP `width` hidden neurons (fresh weights, loaded afterwards)."""
    ins, (own2, n2), fused = mlp_slots(block)
    fc2 = getattr(own2, n2)
    if fc2.in_features == width:
        return
    for owner, name in ins:
        fc = getattr(owner, name)
        setattr(owner, name, _resized(fc, fc.in_features, width * (2 if fused else 1)))
    setattr(own2, n2, _resized(fc2, width, fc2.out_features))


def apply_pruned_structure(model: nn.Module, info: dict | None) -> nn.Module:
    """Give a freshly built model the structure a ``vit_pruning`` config entry describes (the
    weights come after, from the checkpoint)."""
    if not info:
        return model
    blocks = block_list(model)
    widths = list(info.get("intermediate_sizes") or [])
    if widths and len(widths) != len(blocks):
        raise ValueError(f"config: vit_pruning.intermediate_sizes has {len(widths)} entries for "
                         f"{len(blocks)} blocks (num_hidden_layers)")
    for block, width in zip(blocks, widths):
        resize_mlp(block, int(width))
    for block, shift in zip(blocks, info.get("shift_sizes") or []):
        block.shift_size = int(shift)  # Swin: a kept block keeps its (un)shifted windows
    heads = list(info.get("attention_heads") or [])
    if heads and len(heads) != len(blocks):
        raise ValueError(f"config: vit_pruning.attention_heads has {len(heads)} entries for "
                         f"{len(blocks)} blocks (num_hidden_layers)")
    for block, count in zip(blocks, heads):
        if int(count) < 0:
            raise ValueError(f"config: vit_pruning.attention_heads has a negative count {count}")
        resize_heads(block, int(count))
    for i in info.get("attention_removed") or []:
        if not 0 <= int(i) < len(blocks):
            raise ValueError(f"config: vit_pruning.attention_removed names block {i}, the model "
                             f"has {len(blocks)}")
        if head_slots(blocks[int(i)]) is not None:
            bypass_attention(blocks[int(i)])
    head = info.get("head") or {}
    if head.get("kind") == "adapter":
        model.classifier = AdapterHead(head.get("in_features") or model.config.hidden_size,
                                       head["num_labels"], bottleneck=head["bottleneck"])
    return model


def set_config_depth(config, depth: int, stage_depths: list[int] | None = None) -> None:
    """Make `config` say `depth` blocks (Swin: `stage_depths` blocks per stage); a
    backbone-capable config (DINOv2) also gets stage names for that depth, its output stage
    moved to the last one."""
    cfg = tower_config(config)
    if stage_depths is not None:
        cfg.depths = [int(d) for d in stage_depths]
        return
    cfg.num_hidden_layers = depth
    if getattr(cfg, "stage_names", None):
        cfg.stage_names = ["stem"] + [f"stage{i}" for i in range(1, depth + 1)]
        cfg._out_features, cfg._out_indices = [cfg.stage_names[-1]], [depth]


def set_config_width(config, width: int) -> bool:
    """Make `config` build MLPs `width` wide; False if it cannot say so exactly (DINOv2 states
    a ratio, an int in transformers 5.x, and its SwiGLU rounds to multiples of 8; SigLIP's
    pooling head shares ``intermediate_size``): the model is then built with the config's
    width and its blocks narrowed by :func:`apply_pruned_structure`."""
    cfg = tower_config(config)
    if hasattr(cfg, "depths"):  # Swin: mlp_ratio times each stage's width, never one width
        return False
    if hasattr(cfg, "mlp_ratio") and not hasattr(cfg, "intermediate_size"):
        hidden = int(cfg.hidden_size)
        swiglu = bool(getattr(cfg, "use_swiglu_ffn", False))
        inner = -(-width * 3 // 2) if swiglu else width  # the width before SwiGLU's 2/3
        ratio = inner / hidden
        while int(hidden * ratio) < inner:
            ratio = math.nextafter(ratio, math.inf)
        if ratio == int(ratio):
            ratio = int(ratio)
        try:
            cfg.mlp_ratio = ratio
        except Exception:  # noqa: BLE001 - transformers 5.x types mlp_ratio as int (strictly)
            return False
        built = int(hidden * ratio)
        if swiglu:
            built = (int(built * 2 / 3) + 7) // 8 * 8
        return built == width
    if getattr(cfg, "model_type", "").endswith("siglip_vision_model") and getattr(
            cfg, "vision_use_head", True):  # SigLIP's pooling head takes its MLP width
        return cfg.intermediate_size == width  # from intermediate_size too: leave it alone
    cfg.intermediate_size = width
    return True


def _prepared(config):
    """The config to build the stock model from: as many blocks as were kept, MLPs as wide as
    the widest (narrowed afterwards)."""
    info = getattr(config, "vit_pruning", None) or {}
    widths = info.get("intermediate_sizes")
    if widths:
        set_config_depth(config, len(widths), info.get("depths"))
        set_config_width(config, max(widths))
    return config


def _pooler(config, args: tuple, kwargs: dict) -> dict:
    """A headless model saved without its pooler is rebuilt without one."""
    info = getattr(config, "vit_pruning", None) or {}
    if not args and "add_pooling_layer" not in kwargs and info.get("pooler") is False:
        return {**kwargs, "add_pooling_layer": False}
    return kwargs


class _Pruned:
    """Mixin of every ``Pruned*`` class: build the stock model from the prepared config, then
    give it the structure the config's ``vit_pruning`` entry describes."""

    _headless = False  # headless models take add_pooling_layer

    def __init__(self, config, *args, **kwargs):
        if self._headless:
            kwargs = _pooler(config, args, kwargs)
        super().__init__(_prepared(config), *args, **kwargs)
        apply_pruned_structure(self, getattr(config, "vit_pruning", None))


def _pruned_config_class(stock: type) -> type:
    """The stock config class under a model type of its own (``pruned_vit``, ...): transformers
    does not know it, so plain ``from_pretrained`` without ``trust_remote_code`` refuses a folder
    that needs this file instead of building the stock class with random attention weights."""
    return type(f"Pruned{stock.__name__}", (stock,),
                {"model_type": f"{PRUNED_PREFIX}{stock.model_type}", "_auto_class": "AutoConfig",
                 "__module__": __name__,
                 "__doc__": f"{stock.__name__} of a pruned structure (see _pruned_config_class)."})


def _pruned_class(stock: type, headless: bool, config_class: type) -> type:
    return type(f"Pruned{stock.__name__}", (_Pruned, stock),
                {"_headless": headless, "__module__": __name__, "config_class": config_class,
                 "__doc__": f"{stock.__name__} with the structure its config's vit_pruning entry "
                            f"describes (see the module docstring)."})


# Every supported class, the one table (vit_pruning.anatomy reads it; this file stays standalone
# because saved folders import nothing else): class -> (family of its anatomy resolver, what its
# output is, whether it takes add_pooling_layer, the Auto class that loads it)
SUPPORTED = {
    "ViTModel": ("vit", "hidden", True, "AutoModel"),
    "ViTForImageClassification": ("vit", "logits", False, "AutoModelForImageClassification"),
    "DeiTModel": ("vit", "hidden", True, "AutoModel"),
    "DeiTForImageClassification": ("vit", "logits", False, "AutoModelForImageClassification"),
    # the distilled DeiTs (facebook/deit-*-distilled-*): logits are the mean of a [CLS] head and
    # a distillation-token head
    "DeiTForImageClassificationWithTeacher": ("vit", "logits", False,
                                              "AutoModelForImageClassification"),
    "ViTMAEModel": ("vitmae", "hidden", False, "AutoModel"),
    "Dinov2Model": ("dinov2", "hidden", False, "AutoModel"),
    "Dinov2ForImageClassification": ("dinov2", "logits", False, "AutoModelForImageClassification"),
    "BeitModel": ("beit", "hidden", True, "AutoModel"),
    "BeitForImageClassification": ("beit", "logits", False, "AutoModelForImageClassification"),
    "Data2VecVisionModel": ("beit", "hidden", True, "AutoModel"),
    "Data2VecVisionForImageClassification": ("beit", "logits", False,
                                             "AutoModelForImageClassification"),
    "CLIPVisionModel": ("clip", "pooled", False, "AutoModel"),
    "CLIPModel": ("clip", "image_embeds", False, "AutoModel"),
    "CLIPForImageClassification": ("clip", "logits", False, "AutoModelForImageClassification"),
    "SiglipVisionModel": ("siglip", "pooled", False, "AutoModel"),
    "SiglipModel": ("siglip", "image_embeds", False, "AutoModel"),
    "SiglipForImageClassification": ("siglip", "logits", False, "AutoModelForImageClassification"),
    "SwinModel": ("swin", "hidden", True, "AutoModel"),
    "SwinForImageClassification": ("swin", "logits", False, "AutoModelForImageClassification"),
    "BertModel": ("bert", "text", True, "AutoModel"),
    "RobertaModel": ("bert", "text", True, "AutoModel"),
}

PRUNED_PREFIX = "pruned_"  # model_type of a folder that needs this file: pruned_<stock type>
# stock config class name -> its pruned twin
PRUNED_CONFIGS = {}
# stock class name -> (pruned class, the Auto classes that load it)
PRUNED_CLASSES = {}
for _name, (_, _, _headless, _auto) in SUPPORTED.items():
    _stock_cfg = getattr(transformers, _name).config_class
    if _stock_cfg.__name__ not in PRUNED_CONFIGS:
        PRUNED_CONFIGS[_stock_cfg.__name__] = _pruned_config_class(_stock_cfg)
        globals()[PRUNED_CONFIGS[_stock_cfg.__name__].__name__] = PRUNED_CONFIGS[_stock_cfg.__name__]
    _pruned = _pruned_class(getattr(transformers, _name), _headless, PRUNED_CONFIGS[_stock_cfg.__name__])
    _pruned._auto_class = _auto  # model.save_pretrained copies this file and writes auto_map
    globals()[_pruned.__name__] = _pruned  # importable by name (auto_map, pickling)
    PRUNED_CLASSES[_name] = (_pruned, (_auto,))


def _register_key_renames() -> None:
    """Saved folders use the 4.x weight names. transformers 5.x renames them at load time for
    its own classes (by class name or model type), and for a remote-code class or model type
    only if it is registered: each pruned class and pruned model type gets its stock twin's
    renames."""
    try:
        from transformers.conversion_mapping import (get_checkpoint_conversion_mapping,
                                                     register_checkpoint_conversion_mapping)
    except ImportError:
        return  # transformers 4.x: the 4.x names are its own
    for stock, (pruned, _) in PRUNED_CLASSES.items():
        stock_type = getattr(transformers, stock).config_class.model_type
        for name, mapping in ((pruned.__name__, get_checkpoint_conversion_mapping(stock)),
                              (PRUNED_PREFIX + stock_type, get_checkpoint_conversion_mapping(stock_type))):
            if mapping:
                register_checkpoint_conversion_mapping(name, mapping, overwrite=True)


_register_key_renames()
