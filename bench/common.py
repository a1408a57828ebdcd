"""Shared set-up of the benchmarks: the embedded model, digits tensors, evaluation, head re-tune."""
from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from transformers import (AutoImageProcessor, Dinov2Config, Dinov2Model, SwinConfig,
                          SwinForImageClassification, ViTConfig, ViTForImageClassification)

from vit_pruning.config import EMBEDDED
from vit_pruning.data import load_splits
from vit_pruning.heads import finetune
from vit_pruning.measure import collect_outputs, kl_divergence


@dataclass
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@lru_cache(maxsize=1)
def digits_tensors() -> Digits:
    """The digits train/test split preprocessed by the embedded model's own image processor."""
    proc = AutoImageProcessor.from_pretrained(EMBEDDED)
    s = load_splits("digits", 1.0, 1.0)

    def prep(ds):
        x = proc(images=[im.convert("RGB") for im in ds["img"]], return_tensors="pt")["pixel_values"]
        return x, torch.tensor(ds["label"])
    return Digits(*prep(s.train), *prep(s.test))


@lru_cache(maxsize=1)
def _embedded_state():
    return ViTForImageClassification.from_pretrained(EMBEDDED).eval()


def embedded_model() -> ViTForImageClassification:
    """A fresh copy of the embedded digits ViT."""
    return copy.deepcopy(_embedded_state())


def batches(x: torch.Tensor, size: int = 32) -> list[torch.Tensor]:
    return list(torch.split(x, size))


def calibration(d: Digits, seed: int, size: int = 64) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`size` train images chosen by `seed`, as (pixel batches, label batches)."""
    idx = torch.as_tensor(np.sort(np.random.default_rng(seed).choice(len(d.x_train), size, replace=False)))
    return batches(d.x_train[idx]), batches(d.y_train[idx])


def evaluate(model, d: Digits, ref_logits: torch.Tensor) -> tuple[float, float]:
    """(KL(pruned || unpruned) of logits, top-1) on all held-out test images."""
    logits = collect_outputs(model, batches(d.x_test))
    return kl_divergence(logits, ref_logits), float((logits.argmax(-1) == d.y_test).float().mean())


def retune_head(model, d: Digits, seed: int) -> None:
    """The 1-epoch head re-tune: classifier only, train split, lr 1e-3, batch 32."""
    torch.manual_seed(seed)
    perm = torch.randperm(len(d.x_train), generator=torch.Generator().manual_seed(seed))
    loader = [(d.x_train[i], d.y_train[i]) for i in torch.split(perm, 32)]
    finetune(model, loader, epochs=1, lr=1e-3, freeze_backbone=True, progress=False)


def vit_shape(name: str, meta: bool = False) -> torch.nn.Module:
    """ViT-S/16, ViT-B/16, ViT-L/16 classifiers, the DINOv2-B/14 backbone at 224 px (hub
    facebook/dinov2-base's shape: LayerScale, MLP ratio 4; 257 tokens), the Swin-T classifier
    (microsoft/swin-tiny-patch4-window7-224's shape), or "tiny" (smoke runs), with random weights
    (or on the meta device: no memory)."""
    if name == "swin-t":
        cfg = SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                         image_size=224, patch_size=4, num_labels=1000)
        build = lambda: SwinForImageClassification(cfg)  # noqa: E731
    elif name == "dinov2-b14":
        cfg = Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           mlp_ratio=4, patch_size=14, image_size=224)
        build = lambda: Dinov2Model(cfg)  # noqa: E731
    else:
        hidden, layers, heads, mlp = {"vit-s16": (384, 12, 6, 1536), "vit-b16": (768, 12, 12, 3072),
                                      "vit-l16": (1024, 24, 16, 4096), "tiny": (64, 4, 4, 256)}[name]
        extra = {"image_size": 32, "patch_size": 8} if name == "tiny" else {}
        cfg = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=mlp, num_labels=1000, **extra)
        build = lambda: ViTForImageClassification(cfg)  # noqa: E731
    if meta:
        with torch.device("meta"):
            return build()
    torch.manual_seed(0)
    return build().eval()


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and half the range (max-min)/2 over seeds."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


def md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)
