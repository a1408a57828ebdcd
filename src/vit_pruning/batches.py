"""What a batch looks like: HF-style dicts (an image processor's or tokenizer's output
included), (pixels, labels) tuples, or bare tensors (or numpy arrays).

Calibration batches are reduced to one tensor each: pixel values for images, token ids for
text. Text batches are made *padding-free* (:func:`unpad`): sentences are grouped by length,
so blocks can run without an attention mask and no padding token enters any statistic.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterable, Iterator

import numpy as np
import torch


def batch_len(batch: Any) -> int:
    """Rows of one batch: a tensor of images or token ids, or a dict of tokenized sentences."""
    return len(batch["input_ids"]) if isinstance(batch, Mapping) else len(batch)


def rows(batches: Iterable) -> int:
    """Rows of a list of batches (images or sentences)."""
    return sum(batch_len(b) for b in batches)


def batch_pixels(batch: Any) -> torch.Tensor:
    """The model input tensor of a batch: pixel values, or token ids for text. A mapping is a
    dict or what an image processor or tokenizer returns (BatchFeature, BatchEncoding)."""
    if isinstance(batch, Mapping):
        for key in ("pixel_values", "input_ids"):
            if key in batch:
                return torch.as_tensor(batch[key])
        raise TypeError(f"batch dict has neither 'pixel_values' nor 'input_ids' (keys: {sorted(batch)})")
    if isinstance(batch, (tuple, list)):
        return torch.as_tensor(batch[0])
    if isinstance(batch, (torch.Tensor, np.ndarray)):
        return torch.as_tensor(batch)
    raise TypeError(f"cannot find pixel values in a batch of type {type(batch).__name__}")


def model_input(batch: Any) -> torch.Tensor | dict[str, torch.Tensor]:
    """A batch as the models here take it: a text batch as a dict of `input_ids` (and its
    `attention_mask`), whatever mapping the tokenizer gave; any other as its pixel tensor
    (:func:`batch_pixels`)."""
    if isinstance(batch, Mapping) and "input_ids" in batch:
        return {k: torch.as_tensor(batch[k]) for k in ("input_ids", "attention_mask")
                if batch.get(k) is not None}
    return batch_pixels(batch)


def batch_labels(batch: Any) -> torch.Tensor:
    """The label tensor of a batch (dict key 'labels'/'label', or the second tuple item)."""
    if isinstance(batch, Mapping):
        for key in ("labels", "label"):
            if key in batch:
                return torch.as_tensor(batch[key])
    elif isinstance(batch, (tuple, list)) and len(batch) > 1:
        return torch.as_tensor(batch[1])
    raise TypeError("batch has no labels: expected a dict with 'labels' or a (pixels, labels) pair")


def unpad(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """The real tokens of each sentence of a (possibly padded, either side) batch of token ids."""
    if attention_mask is None:
        return list(input_ids)
    return [ids[mask] for ids, mask in zip(input_ids, attention_mask.bool()) if mask.any()]


def group_by_length(sentences: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Padding-free batches: sentences of equal length stacked, groups in order of first
    appearance (deterministic)."""
    groups: dict[int, list[torch.Tensor]] = {}
    for row in sentences:
        groups.setdefault(row.numel(), []).append(row)
    return [torch.stack(rows) for rows in groups.values()]


def take_inputs(loader: Iterable, max_batches: int | None = None,
                device: str | torch.device = "cpu", text: bool | None = None) -> list[torch.Tensor]:
    """The first `max_batches` batches of a loader as input tensors on `device`. Text batches
    (integer token ids, with or without 'attention_mask') are made padding-free: the sentences
    of all batches regrouped by length, so there may be more or fewer tensors than batches.
    `text` (the model's kind, where known): a batch of the other kind is a ValueError (raw
    uint8 pixels would otherwise be taken for token ids, float pixels given to a text encoder).
    One tensor given as the loader is one batch. A loader that gives no batch, an image batch
    that is not (batch, channels, height, width), or one with NaN or infinite values is a
    ValueError naming it."""
    if isinstance(loader, torch.Tensor):
        loader = [loader]
    images, sentences = [], []
    for k, batch in enumerate(iter_limited(loader, max_batches)):
        x = batch_pixels(batch)
        if text is not None and x.is_floating_point() == text:
            raise ValueError(f"calibration batch {k} holds {x.dtype} values: " + (
                "a text encoder takes integer token ids (the tokenizer's input_ids)" if text else
                "an image model takes float pixel values (the image processor's pixel_values; "
                "raw integer pixels are not normalized)"))
        if x.is_floating_point():
            if x.dim() != 4:
                raise ValueError(f"calibration batch {k} has shape {tuple(x.shape)}: images come "
                                 f"in batches of (batch, channels, height, width) pixel values")
            if not torch.isfinite(x).all():
                raise ValueError(f"calibration batch {k} holds NaN or infinite pixel values")
            images.append(x.to(device))
        else:
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            sentences.extend(unpad(x, mask))
    if not images and not sentences:
        raise ValueError("the calibration data gave no batch" + (
            f" (max_batches={max_batches})" if max_batches is not None else "") +
            ": give at least one, or None to work without calibration data")
    return images + [t.to(device) for t in group_by_length(sentences)]


def iter_limited(loader: Iterable, max_batches: int | None) -> Iterator:
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            return
        yield batch
