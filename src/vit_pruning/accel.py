"""Training on Hugging Face `accelerate`: one process or many (``accelerate launch``, ``torchrun``),
mixed precision and gradient accumulation, for distillation and the head fine-tune.

One plain process behaves as before (the model stays on its own device). Under a launcher every
process prunes the same plan, trains on its own shard of the inputs with gradients averaged
across processes (DDP: gloo on the CPU, NCCL on CUDA), and only the main process measures,
writes and logs (:func:`is_main`).
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from .config import PRECISIONS
from .modes import device_of


def launched() -> bool:
    """Whether this process is one of several started by a launcher (torchrun, accelerate)."""
    return world()[1] > 1


def world() -> tuple[int, int]:
    """(this process's rank, number of processes), before or without any process group."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return world()[0] == 0


def resolve_precision(value: str, device: torch.device) -> str:
    """`value` of --mixed-precision as accelerate takes it: "auto" is bf16 on a CUDA device that
    runs it, else "no"; ValueError for a precision the device cannot run (fp16 on the CPU,
    bf16 on a GPU without it)."""
    if value not in PRECISIONS:
        raise ValueError(f"mixed precision must be one of {PRECISIONS}, got {value!r}")
    cuda = device.type == "cuda"
    if value == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if value == "fp16" and not cuda:
        raise ValueError("fp16 needs a CUDA device; on the CPU use bf16 or no")
    if value == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ValueError(f"bf16: {torch.cuda.get_device_name(device)} cannot run it; use fp16 or no")
    return value


def make_accelerator(device: torch.device, mixed_precision: str = "no",
                     grad_accumulation: int = 1):
    """An `accelerate.Accelerator` for one training run. Alone, it trains where the model is
    (no device placement); under a launcher, on its process's device. accelerate keeps one
    configuration per process: a run asking for another precision or accumulation than the
    previous one resets it with accelerate's own reset (the process group stays)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    if AcceleratorState._shared_state:  # configured by an earlier run in this process
        state = AcceleratorState()
        if (state.mixed_precision != mixed_precision
                or GradientState().num_steps != grad_accumulation):
            AcceleratorState._reset_state(reset_partial_state=False)
            GradientState._reset_state()
    acc = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accumulation,
                      cpu=device.type == "cpu", device_placement=False)
    return acc


FUSED_DEVICES = ("cpu", "cuda")  # where torch has a fused AdamW kernel


def adamw(params: Sequence[nn.Parameter], lr: float) -> torch.optim.AdamW:
    """AdamW without weight decay, fused into one kernel where torch has one: on the CPU the
    per-tensor update is 4-6x slower (measured, 10.6M parameters: 75 ms against 12 ms a step on
    one thread), and every data-parallel process runs the whole update itself."""
    params = list(params)
    fused = bool(params) and all(p.device.type in FUSED_DEVICES and p.is_floating_point()
                                 for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=fused or None)


def train_device(acc, model: nn.Module) -> torch.device:
    """Where a run trains: the model's own device alone, the process's device under a launcher."""
    if acc.num_processes > 1:
        return acc.device
    return device_of(model)


def shard_rows(batches: Sequence, rank: int, count: int) -> list:
    """Every batch's rows rank, rank + count, ... (tensors, or dicts of tensors): each process's
    share of the inputs; all of them with one process."""
    if count == 1:
        return list(batches)
    out = []
    for b in batches:
        if isinstance(b, dict):
            out.append({k: v[rank::count] for k, v in b.items()})
        elif isinstance(b, list):  # [output, *block outputs] targets
            out.append([t[rank::count] for t in b])
        else:
            out.append(b[rank::count])
    return out


def reduce_sum(acc, values: Sequence[float]) -> list[float]:
    """The sums of `values` over every process (the values themselves alone)."""
    if acc.num_processes == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=acc.device)
    return [float(v) for v in acc.reduce(t, reduction="sum")]


def same_everywhere(acc, fingerprint: str, what: str) -> None:
    """RuntimeError unless every process computed the same `fingerprint` (e.g. of the plan)."""
    if acc is None or acc.num_processes == 1:
        return
    from accelerate.utils import gather_object
    prints = gather_object([fingerprint])
    if len(set(prints)) > 1:
        odd = next(i for i, p in enumerate(prints) if p != prints[0])
        raise RuntimeError(f"{what} differs between processes (rank 0 and rank {odd}); every "
                           f"process must prune the same model with the same options")
