"""Pruned ViT / DeiT / BERT-family models as transformers classes.

A pruned model whose blocks all keep one MLP width and their attention is a plain transformers
model (``intermediate_size`` and ``num_hidden_layers`` say it all). Any other pruned structure
(per-block widths, attention sublayers removed, an adapter head) is described by the config's
``vit_pruning`` entry and rebuilt by the classes below: the stock class is built, then
:func:`apply_pruned_structure` resizes each block's MLP, bypasses the removed attention
sublayers and installs the adapter head; the weights are loaded afterwards, strictly.

This file is copied into every saved folder that needs it, with ``auto_map`` in its config, so
that ``AutoModel*.from_pretrained(folder, trust_remote_code=True)`` loads the model where
vit_pruning is not installed. It therefore imports only torch and transformers, and works
with both transformers majors (4.x ``encoder.layer[i].intermediate.dense``, 5.x
``layers[i].mlp.fc1``).
"""
from __future__ import annotations

import torch
import transformers
from torch import nn
from torch.nn import functional as F
from transformers import (BertModel, DeiTForImageClassification, DeiTModel, RobertaModel,
                          ViTForImageClassification, ViTModel)

_TF_VERSION = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())


def attention_returns_tuple(block: nn.Module) -> bool:
    """What a block expects its attention module to return. transformers 5.x layers unpack
    ``hidden, _ = self.attention(...)``; post-LayerNorm (BERT) blocks index ``[0]`` in every
    version; 4.x ViT layers index ``[0]`` up to 4.55 and take a tensor from 4.56 on."""
    if hasattr(block, "mlp") or not hasattr(block, "layernorm_before"):
        return True
    return _TF_VERSION < (4, 56)


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


def block_list(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a ViT/DeiT (either layout) or BERT-family model."""
    base = next((getattr(model, a) for a in ("vit", "deit") if hasattr(model, a)), model)
    if isinstance(getattr(base, "layers", None), nn.ModuleList):
        return base.layers
    return base.encoder.layer


def mlp_slots(block: nn.Module) -> tuple[tuple[nn.Module, str], tuple[nn.Module, str]]:
    """(owner, attribute) of a block's fc1 and fc2."""
    if hasattr(block, "mlp"):
        return (block.mlp, "fc1"), (block.mlp, "fc2")
    return (block.intermediate, "dense"), (block.output, "dense")


def is_post_norm(block: nn.Module) -> bool:
    return not hasattr(block, "layernorm_before")


def bypass_attention(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Replace a block's attention sublayer by a bypass; return the originals (attention, norm).
    Pre-norm (ViT): the sublayer and its LayerNorm go. Post-norm (BERT): q/k/v/o go, the
    LayerNorm stays on the stream."""
    old_att = block.attention
    if is_post_norm(block):
        old_norm = old_att.output.LayerNorm
        block.attention = PostNormAttentionBypass(old_norm)
    else:
        old_norm = block.layernorm_before
        block.attention = AttentionBypass(attention_returns_tuple(block))
        block.layernorm_before = nn.Identity()
    return old_att, old_norm


def _resized(layer: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=layer.bias is not None,
                     device=layer.weight.device, dtype=layer.weight.dtype)


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
        (own1, n1), (own2, n2) = mlp_slots(block)
        fc1, fc2 = getattr(own1, n1), getattr(own2, n2)
        if fc1.out_features != width:
            setattr(own1, n1, _resized(fc1, fc1.in_features, width))
            setattr(own2, n2, _resized(fc2, width, fc2.out_features))
    for i in info.get("attention_removed") or []:
        if not 0 <= int(i) < len(blocks):
            raise ValueError(f"config: vit_pruning.attention_removed names block {i}, the model "
                             f"has {len(blocks)}")
        bypass_attention(blocks[int(i)])
    head = info.get("head") or {}
    if head.get("kind") == "adapter":
        model.classifier = AdapterHead(model.config.hidden_size, head["num_labels"],
                                       bottleneck=head["bottleneck"])
    return model


def _prepared(config):
    """The config to build the stock model from: as many blocks as were kept, MLPs as wide as
    the widest (narrowed afterwards)."""
    info = getattr(config, "vit_pruning", None) or {}
    widths = info.get("intermediate_sizes")
    if widths:
        config.num_hidden_layers = len(widths)
        config.intermediate_size = max(widths)
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


class PrunedViTModel(_Pruned, ViTModel):
    _headless = True


class PrunedViTForImageClassification(_Pruned, ViTForImageClassification):
    pass


class PrunedDeiTModel(_Pruned, DeiTModel):
    _headless = True


class PrunedDeiTForImageClassification(_Pruned, DeiTForImageClassification):
    pass


class PrunedBertModel(_Pruned, BertModel):
    _headless = True


class PrunedRobertaModel(_Pruned, RobertaModel):
    _headless = True


# stock class name -> (pruned class, the Auto classes that load it)
PRUNED_CLASSES = {
    "ViTModel": (PrunedViTModel, ("AutoModel",)),
    "ViTForImageClassification": (PrunedViTForImageClassification,
                                  ("AutoModelForImageClassification",)),
    "DeiTModel": (PrunedDeiTModel, ("AutoModel",)),
    "DeiTForImageClassification": (PrunedDeiTForImageClassification,
                                   ("AutoModelForImageClassification",)),
    "BertModel": (PrunedBertModel, ("AutoModel",)),
    "RobertaModel": (PrunedRobertaModel, ("AutoModel",)),
}

for _pruned, _autos in PRUNED_CLASSES.values():
    _pruned._auto_class = _autos[0]  # model.save_pretrained copies this file and writes auto_map


def _register_key_renames() -> None:
    """Saved folders use the 4.x weight names. transformers 5.x renames them at load time for
    its own classes, and for a remote-code class only if the class is registered: the headless
    ones need it (the classifiers' backbones are stock classes and are renamed anyway)."""
    try:
        from transformers.conversion_mapping import (get_checkpoint_conversion_mapping,
                                                     register_checkpoint_conversion_mapping)
    except ImportError:
        return  # transformers 4.x: the 4.x names are its own
    for pruned in (PrunedViTModel, PrunedDeiTModel):
        mapping = get_checkpoint_conversion_mapping("ViTModel")
        if mapping:
            register_checkpoint_conversion_mapping(pruned.__name__, mapping, overwrite=True)


_register_key_renames()
