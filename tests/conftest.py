"""Tiny ViT configs built in the tests: no download, both transformers layouts."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path

import numpy as np
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


@pytest.fixture(scope="session")
def cifar_like(tmp_path_factory) -> Path:
    """A DatasetDict on disk with the CIFAR-10 schema ("img", "label"), 32x32 RGB."""
    import datasets
    from PIL import Image
    rng = np.random.default_rng(0)
    feats = datasets.Features({"img": datasets.Image(),
                               "label": datasets.ClassLabel(names=[f"c{i}" for i in range(10)])})

    def split(n):
        return datasets.Dataset.from_dict(
            {"img": [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)],
             "label": [i % 10 for i in range(n)]}, features=feats)
    path = tmp_path_factory.mktemp("data") / "cifar_like"
    datasets.DatasetDict({"train": split(48), "test": split(24)}).save_to_disk(str(path))
    return path
