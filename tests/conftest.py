"""Tiny ViT configs built in the tests: no download, both transformers layouts."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification


def tiny_config(**kw) -> ViTConfig:
    base = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                image_size=16, patch_size=4, num_labels=5)
    base.update(kw)
    return ViTConfig(**base)


@pytest.fixture
def tiny_vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    return ViTForImageClassification(tiny_config()).eval()


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
