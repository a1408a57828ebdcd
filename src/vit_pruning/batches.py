"""What a batch looks like: HF-style dicts, (pixels, labels) tuples, or bare tensors."""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch


def batch_pixels(batch: Any) -> torch.Tensor:
    """The pixel tensor of a batch."""
    if isinstance(batch, dict):
        return batch["pixel_values"]
    if isinstance(batch, (tuple, list)):
        return batch[0]
    if isinstance(batch, torch.Tensor):
        return batch
    raise TypeError(f"cannot find pixel values in a batch of type {type(batch).__name__}")


def batch_labels(batch: Any) -> torch.Tensor:
    """The label tensor of a batch (dict key 'labels'/'label', or the second tuple item)."""
    if isinstance(batch, dict):
        for key in ("labels", "label"):
            if key in batch:
                return batch[key]
    elif isinstance(batch, (tuple, list)) and len(batch) > 1:
        return batch[1]
    raise TypeError("batch has no labels: expected a dict with 'labels' or a (pixels, labels) pair")


def take_pixels(loader: Iterable, max_batches: int | None = None,
                device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """The first `max_batches` pixel batches of a loader, on `device`."""
    out = []
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        out.append(batch_pixels(batch).to(device))
    return out


def iter_limited(loader: Iterable, max_batches: int | None) -> Iterator:
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            return
        yield batch
