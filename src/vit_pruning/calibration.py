"""Calibration images for a library user, drawn as the command line draws them."""
from __future__ import annotations

import torch

from .batches import take_inputs
from .data import calibration_subset, load_splits, make_loader


def image_batches(dataset: str, processor, count: int = 64, batch_size: int = 32, seed: int = 0,
                  train_pct: float = 0.25, channels: int = 3) -> list[torch.Tensor]:
    """`count` train images of `dataset` ("digits", "cifar10", "cifar100", a hub id or a local
    folder; see :func:`vit_pruning.data.load_splits`), chosen by `seed` from the `train_pct`
    slice of the train split, preprocessed by `processor`, as batches of pixel values on
    the CPU, read for a model of `channels` input channels: what ``vit-2ssp --calib-size count
    --seed seed`` calibrates on."""
    splits = load_splits(dataset, train_pct, 1.0)
    return split_batches(splits, processor, count, batch_size, seed, "cpu", channels)


def split_batches(splits, processor, count: int, batch_size: int, seed: int,
                  device: str | torch.device, channels: int = 3) -> list[torch.Tensor]:
    """`count` rows of `splits.train` chosen by `seed` (never test rows), preprocessed, as
    batches of pixel values on `device` (the command line's calibration images)."""
    chosen, _ = calibration_subset(splits.train, count, seed)
    return take_inputs(make_loader(chosen, processor, splits, batch_size, channels=channels),
                       None, device)
