"""One way to run modules in eval mode and give them back as they came."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def device_of(model: nn.Module) -> torch.device:
    """Where a model's weights are (its first parameter's device)."""
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put `models` in eval mode (dropout off, as every measurement and calibration needs) and
    give back their modes after, whatever happens inside: each model's own flag to all its
    modules (layers that surgery created inside included), then each submodule's own flag."""
    tops = [(model, model.training) for model in models]
    flags = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, training in tops:
            model.train(training)
        for m, training in flags:
            m.training = training
