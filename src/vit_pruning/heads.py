"""Classification heads: a fresh linear head, a bottleneck adapter + head, fine-tuning, and the
seed's adapter artifact (``adapter.pt``) save/load.

Both head kinds replace ``model.classifier`` (applied to the [CLS] token), so pruning, the
segmented forward and saving treat them like any classifier.
"""
from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .anatomy import resolve
from .batches import batch_labels, batch_pixels
from .measure import forward_output
from .atomic import atomic_write
from .modeling_vit_pruning import AdapterHead
from .surgery import sync_config

log = logging.getLogger(__name__)
HEAD_TYPES = ("linear", "adapter")


def build_head(kind: str, hidden_size: int, num_labels: int, reduction: int = 4) -> nn.Module:
    if kind == "linear":
        return nn.Linear(hidden_size, num_labels)
    if kind == "adapter":
        return AdapterHead(hidden_size, num_labels, reduction)
    raise ValueError(f"head kind must be one of {HEAD_TYPES}, got {kind!r}")


def head_in_features(model: nn.Module) -> int:
    """What the classifier takes: the hidden size, or twice it for DINOv2's ([CLS], mean patch)
    pair."""
    head = getattr(model, "classifier", None)
    if isinstance(head, AdapterHead):
        return head.down.in_features
    if isinstance(head, nn.Linear):
        return head.in_features
    return resolve(model).hidden_size


TWO_HEADS = ("cls_classifier", "distillation_classifier")  # a distilled DeiT's heads: its logits
# are their mean, on the [CLS] and the distillation token


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the model's classifier: its head, or a distilled DeiT's two heads."""
    names = TWO_HEADS if hasattr(model, TWO_HEADS[1]) else ("classifier",)
    return [p for n in names for p in getattr(model, n).parameters()]


def install_head(model: nn.Module, head: nn.Module, label_names: list[str] | None = None) -> None:
    """Put `head` in place of model.classifier and keep the config's label count truthful."""
    if not resolve(model).has_classifier:
        raise ValueError(f"{type(model).__name__} has no classifier to replace")
    if hasattr(model, TWO_HEADS[1]):
        raise ValueError(f"{type(model).__name__} has two heads (its logits are the mean of the "
                         f"[CLS] and distillation-token heads), not one classifier to replace")
    model.classifier = head
    num = head.head.out_features if isinstance(head, AdapterHead) else head.out_features
    model.config.num_labels = num
    names = label_names or [str(i) for i in range(num)]
    model.config.id2label = {i: n for i, n in enumerate(names)}
    model.config.label2id = {n: i for i, n in enumerate(names)}
    sync_config(resolve(model))  # an adapter head makes the saved model need its modeling file


def finetune(model: nn.Module, loader: Iterable, epochs: int = 1, lr: float = 1e-3,
             freeze_backbone: bool = True, device: str | torch.device = "cpu",
             progress: bool = True, mixed_precision: str = "no",
             grad_accumulation: int = 1) -> list[float]:
    """Train the head (and the backbone unless frozen) with cross-entropy; returns epoch losses.
    On accelerate (:mod:`vit_pruning.accel`): mixed precision, gradient accumulation, and under
    a launcher every process takes every n-th batch with gradients averaged (the remainder that
    does not divide among the processes is left out, so they all take as many steps)."""
    from .accel import adamw, make_accelerator, reduce_sum, train_device
    params = head_parameters(model) if freeze_backbone else list(model.parameters())
    for p in model.parameters():
        p.requires_grad_(not freeze_backbone)
    for p in head_parameters(model):
        p.requires_grad_(True)
    acc = make_accelerator(torch.device(device), mixed_precision, grad_accumulation)
    device = train_device(acc, model)
    model.to(device)
    net, opt = acc.prepare(_Logits(model), adamw(params, lr))
    rank, count = acc.process_index, acc.num_processes
    losses = []
    model.train()
    try:
        for epoch in range(epochs):
            total = count_rows = 0.0
            batches = list(loader) if count > 1 else loader
            if count > 1:
                batches = batches[:len(batches) - len(batches) % count][rank::count]
            bar = tqdm(batches, desc=f"fine-tune epoch {epoch + 1}/{epochs}",
                       disable=not (progress and acc.is_main_process), leave=False)
            for batch in bar:
                with acc.accumulate(net):
                    logits = net(batch_pixels(batch).to(device))
                    loss = F.cross_entropy(logits.float(), batch_labels(batch).to(device))
                    acc.backward(loss)
                    opt.step()
                    opt.zero_grad()
                total += float(loss.detach()) * len(logits)
                count_rows += len(logits)
                bar.set_postfix(loss=f"{total / count_rows:.4f}")
            total, count_rows = reduce_sum(acc, [total, count_rows])
            losses.append(total / max(1, count_rows))
            if acc.is_main_process:
                log.info("fine-tune epoch %d: loss %.4f", epoch + 1, losses[-1])
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        acc.free_memory()
    return losses


class _Logits(nn.Module):
    """A classifier's logits as one module (what a data-parallel wrapper runs)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return forward_output(self.model, pixels)


def save_adapter(model: nn.Module, path: str | Path, classifier_type: str, metadata: dict) -> Path:
    """Write the seed's adapter payload (head state_dict + description) atomically; never overwrites."""
    head = model.classifier
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
        "classifier_type": classifier_type,
        "num_labels": int(model.config.num_labels),
        "hidden_size": head_in_features(model),  # the classifier's input size
        "label_names": [str(model.config.id2label[i]) for i in range(int(model.config.num_labels))],
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "metadata": metadata,
    }
    return atomic_write(path, lambda p: torch.save(payload, p))


class AdapterFileError(ValueError):
    """An adapter file that cannot be read or does not fit the model/dataset."""


def load_adapter(model: nn.Module, path: str | Path, num_labels: int | None = None,
                 label_names: list[str] | None = None) -> dict:
    """Install a head saved by :func:`save_adapter`; checks it fits the model and dataset. The
    model's class names become the ones the head was trained on where the file records them
    (files of earlier versions do not: then `label_names`, the dataset's)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        kind, labels, hidden = payload["classifier_type"], payload["num_labels"], payload["hidden_size"]
        state = payload["state_dict"]
    except Exception as exc:
        raise AdapterFileError(f"--load-adapter: cannot read {path} as an adapter file "
                               f"({type(exc).__name__})") from exc
    if hidden != head_in_features(model):
        raise AdapterFileError(f"--load-adapter: {path} was trained for hidden size {hidden}, "
                               f"the model's classifier takes {head_in_features(model)}")
    if num_labels is not None and labels != num_labels:
        raise AdapterFileError(f"--load-adapter: {path} has {labels} classes, the dataset {num_labels}")
    reduction = int(payload.get("metadata", {}).get("head", {}).get("adapter_reduction", 4))
    head = build_head(kind, hidden, labels, reduction)
    try:
        head.load_state_dict(state)
    except RuntimeError as exc:
        raise AdapterFileError(f"--load-adapter: weights in {path} do not match a {kind} head") from exc
    install_head(model, head, payload.get("label_names") or label_names)  # the names it was
    return payload  # trained on: a dataset's other order is renumbered to them (align_to_head)


def save_cifar_adapter(model: nn.Module, path: str | Path | None = None, metadata: dict | None = None,
                       run_id: str | None = None,
                       artifacts_dir: str | Path = "experiments/vit_pruning/artifacts") -> Path:
    """The seed's adapter artifact: the model's head/adapter as ``adapter.pt`` (state_dict,
    classifier_type, num_labels, hidden_size, timestamp, metadata), by default at
    ``<artifacts_dir>/<run_id>/adapter.pt``; never overwrites. Reload with ``--load-adapter``
    or :func:`load_adapter`."""
    head = getattr(model, "classifier", None)
    if isinstance(head, AdapterHead):
        kind = "adapter"
    elif isinstance(head, nn.Linear):
        kind = "linear"
    else:
        raise ValueError(f"{type(model).__name__} has no linear or adapter classifier to save")
    if path is None:
        run_id = run_id or _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        path = Path(artifacts_dir) / run_id / "adapter.pt"
    meta = {"head": {"kind": kind, "adapter_reduction": (
        head.down.in_features // head.down.out_features if kind == "adapter" else None)},
        **(metadata or {})}
    return save_adapter(model, path, kind, meta)
