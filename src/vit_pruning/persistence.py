"""Saving and reloading pruned models, and writing any output file atomically.

A pruned ViT may have different MLP widths per block and blocks without attention, which
``from_pretrained`` cannot rebuild (ViT's modeling code reads one global ``intermediate_size``).
The saved folder is a normal Hugging Face folder (``config.json`` + ``model.safetensors``) whose
config carries a ``vit_pruning`` entry (per-block ``intermediate_sizes``, ``attention_removed``);
:func:`load_pruned_model` builds the architecture from the config, applies that structure, and
loads the weights strictly.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from .anatomy import resolve
from .heads import AdapterHead
from .surgery import prune_mlp_neurons, remove_attention, sync_config

FORMAT_VERSION = 1
SUPPORTED_CLASSES = ("ViTModel", "ViTForImageClassification", "DeiTModel",
                     "DeiTForImageClassification", "BertModel", "RobertaModel")


# transformers 4.x <-> 5.x names inside a ViT/DeiT backbone (everything else is the same)
_NAME_PAIRS = [  # (4.x, 5.x)
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
    (".intermediate.dense.", ".mlp.fc1."),
    (".output.dense.", ".mlp.fc2."),
]


def translate_keys(state: dict[str, torch.Tensor], to: str) -> dict[str, torch.Tensor]:
    """Rename a state dict's block parameters to the `to` layout ("v4" or "v5")."""
    if to not in ("v4", "v5"):
        raise ValueError(f"layout must be 'v4' or 'v5', got {to!r}")
    pairs = _NAME_PAIRS if to == "v5" else [(new, old) for old, new in _NAME_PAIRS]
    blocks = (r"\.encoder\.layer\.(\d+)\.", r".layers.\1.") if to == "v5" else \
        (r"\.layers\.(\d+)\.", r".encoder.layer.\1.")
    out = {}
    for key, value in state.items():
        new = re.sub(blocks[0], blocks[1], "." + key)
        for old_name, new_name in pairs:
            new = new.replace(old_name, new_name)
        out[new[1:]] = value
    return out


def _head_info(model: nn.Module) -> dict | None:
    head = getattr(model, "classifier", None)
    if isinstance(head, AdapterHead):
        return {"kind": "adapter", "bottleneck": head.down.out_features,
                "num_labels": head.head.out_features}
    return None


def save_pruned_model(model: nn.Module, out_dir: str | Path, processor=None,
                      metadata: dict | None = None) -> Path:
    """Save a (pruned) model into a new folder `out_dir`; refuses an existing path."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; choose another --run-id or folder")
    sync_config(resolve(model))
    model.config.vit_pruning = {**model.config.vit_pruning, "format": FORMAT_VERSION,
                                "layout": resolve(model).layout,
                                "head": _head_info(model),
                                "loader": "vit_pruning.load_pruned_model",
                                **({"metadata": metadata} if metadata else {})}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(tmp)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if processor is not None:  # image processor or tokenizer: the folder stays usable
            processor.save_pretrained(tmp)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_pruned_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save_pruned_model` (non-uniform widths, removed attention)."""
    path = Path(path)
    config = transformers.AutoConfig.from_pretrained(path)
    info = getattr(config, "vit_pruning", None)
    arch = (getattr(config, "architectures", None) or [None])[0]
    if arch not in SUPPORTED_CLASSES:
        raise ValueError(f"{path}: architecture {arch!r} is not one of {SUPPORTED_CLASSES}")
    widths = list(info["intermediate_sizes"]) if info else None
    if widths:
        config.num_hidden_layers = len(widths)
        config.intermediate_size = max(widths)
    model = getattr(transformers, arch)(config)
    if info:
        an = resolve(model)
        for parts, w in zip(an.parts, widths):
            if w != parts.intermediate_size:
                prune_mlp_neurons(parts, torch.arange(w))
        head = info.get("head")
        if head and head.get("kind") == "adapter":
            model.classifier = AdapterHead(config.hidden_size, head["num_labels"],
                                           bottleneck=head["bottleneck"])
        if info.get("attention_removed"):
            remove_attention(model, info["attention_removed"])
    state = load_file(str(path / "model.safetensors"))
    saved_layout = (info or {}).get("layout", resolve(model).layout)
    if saved_layout != resolve(model).layout and "bert" not in (saved_layout, resolve(model).layout):
        state = translate_keys(state, to=resolve(model).layout)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the saved structure "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device).eval()
