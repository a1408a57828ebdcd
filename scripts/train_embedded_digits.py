"""Reproduce the embedded default model: a small ViT trained on scikit-learn digits.

    python scripts/train_embedded_digits.py            # writes src/vit_pruning/embedded/vit-tiny-digits
    python scripts/train_embedded_digits.py --out /tmp/digits-vit

Deterministic (fixed seeds, deterministic algorithms, one thread). The 8x8 digits are turned into
RGB images and preprocessed by the saved image processor (resize to 16x16, normalize), exactly
as the pruning tool will preprocess them, so the model goes through the same path as any hub
checkpoint. Augmentation: random shifts of up to 2 pixels.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from vit_pruning.data import load_splits
from vit_pruning.measure import evaluate_top1

log = logging.getLogger("train_embedded_digits")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "vit_pruning" / "embedded" / "vit-tiny-digits"


def preprocess(ds, processor) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = processor(images=[im.convert("RGB") for im in ds["img"]], return_tensors="pt")["pixel_values"]
    return pixels, torch.tensor(ds["label"], dtype=torch.long)


def shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation per image, filling with the background value (-1 after normalizing)."""
    out = torch.full_like(x, -1.0)
    h, w = x.shape[-2:]
    for i in range(x.shape[0]):
        dy, dx = (torch.randint(-max_shift, max_shift + 1, (2,), generator=gen)).tolist()
        ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        out[i, :, yd, xd] = x[i, :, ys, xs]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    splits = load_splits("digits", 1.0, 1.0)
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3,
                                  image_std=[0.5] * 3)
    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=96,
                       num_hidden_layers=6, num_attention_heads=4, intermediate_size=384,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                       num_labels=10, id2label={i: str(i) for i in range(10)},
                       label2id={str(i): i for i in range(10)})
    model = ViTForImageClassification(config)
    x_train, y_train = preprocess(splits.train, processor)
    x_test, y_test = preprocess(splits.test, processor)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    steps_per_epoch = (len(x_train) + 63) // 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=args.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * 64:(s + 1) * 64]
            logits = model(pixel_values=shift(x_train[idx], gen)).logits
            loss = F.cross_entropy(logits, y_train[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0:
            acc = evaluate_top1(model, [(x_test, y_test)])
            log.info("epoch %d loss %.3f held-out top-1 %.4f", epoch + 1, loss.item(), acc)
    acc = evaluate_top1(model, [(x_test, y_test)])
    log.info("final held-out top-1 %.4f (%d images)", acc, len(y_test))
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    log.info("saved to %s", args.out)


if __name__ == "__main__":
    main()
