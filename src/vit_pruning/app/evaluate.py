"""Measuring a model after each stage, on the run's evaluation inputs."""
from __future__ import annotations

import logging

import torch

from ..errors import UsageError
from .choices import Choices
from .inputs import Data
from .loading import Loaded

log = logging.getLogger("vit_pruning")


class Evaluator:
    """Measures the model after each stage on the same evaluation inputs: parameters, FLOPs,
    top-1 and KL (images) or embedding cosine and agreement (text). Latency is timed later, all
    stages back to back (:func:`latency_step`)."""

    def __init__(self, cfg, loaded: Loaded, data: Data, ch: Choices):
        self.loaded, self.data, self.device = loaded, data, ch.device
        self.size = {"seq_len": data.seq_len} if loaded.text else {}
        self.reference = None  # the baseline's outputs

    def __call__(self, name: str, model):  # -> report.StageMetrics
        from ..measure import collect_outputs, count_flops, count_total_params, kl_divergence, \
            mean_cosine, retrieval_agreement
        from ..report import StageMetrics
        from ..text import sentence_embeddings
        data = self.data
        top1 = kl = cos = agree = None
        if self.loaded.text:
            out = sentence_embeddings(model, data.eval_batches, self.device)
            if self.reference is not None:
                cos, agree = mean_cosine(out, self.reference), retrieval_agreement(out, self.reference)
        else:
            out = collect_outputs(model, data.eval_pixels) if data.eval_pixels else None
            if data.eval_pixels and data.has_head:
                top1 = int((out.argmax(-1) == data.eval_labels).sum()) / len(data.eval_labels)
                if self.reference is not None:
                    kl = kl_divergence(out, self.reference)
            elif data.eval_pixels and self.reference is not None:  # a backbone: its outputs
                cos = mean_cosine(out.flatten(1), self.reference.flatten(1))
                agree = retrieval_agreement(out.flatten(1), self.reference.flatten(1))
        if self.reference is None:
            if out is not None and not torch.isfinite(out).all():
                raise UsageError("--model: the unpruned model's outputs hold NaN or Inf on the "
                                 "evaluation inputs; it cannot be measured")
            self.reference = out
        m = StageMetrics(name, count_total_params(model), count_flops(model, **self.size), float("nan"),
                         top1, kl, cos, agree)
        log.info("%s: %s params, %.4f GFLOPs, top-1 %s%s", name, f"{m.params:,}", m.flops / 1e9,
                 "n/a" if top1 is None else f"{top1:.4f}",
                 "" if cos is None else f", cosine {cos:.4f}, agreement {agree:.3f}")
        return m
