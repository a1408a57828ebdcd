"""Checks of a run's inputs against this machine, before any work: paths that must lead
somewhere, a CUDA device that must exist, an optional package that must import. (Ranges and
combinations of values are checked with the config: :func:`vit_pruning.config.check`.)"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import torch

from ..config import RunConfig
from ..errors import UsageError, is_out_of_memory


def check_input_path(flag: str, value: str, names: tuple[str, ...]) -> None:
    """A value that is a path must lead somewhere: a broken link, a link loop or a missing
    local path is named as such (not taken for a hub id to download). Hub ids (owner/name)
    and the built-in `names` pass."""
    if value in names:
        return
    path = Path(value)
    if path.is_symlink() and not path.exists():
        try:
            path.resolve(strict=True)
        except (RuntimeError, OSError) as exc:  # RuntimeError or ELOOP: a loop
            if isinstance(exc, RuntimeError) or getattr(exc, "errno", None) == errno.ELOOP:
                raise UsageError(f"{flag}: {value} is a symbolic link loop") from exc
        raise UsageError(f"{flag}: {value} is a broken symbolic link (it points to "
                         f"{os.readlink(path)}, which does not exist)")
    try:
        path.exists()
    except OSError as exc:  # ELOOP through a directory link, or a name too long
        raise UsageError(f"{flag}: {value} cannot be reached ({exc.strerror})") from exc
    local = value.startswith(("/", "./", "../", "~")) or value.count("/") > 1 or \
        value.endswith(("/", ".json", ".txt", ".pt", ".safetensors"))
    if local and not path.exists():
        raise UsageError(f"{flag}: no such {'file' if path.suffix else 'folder'} {value}")


def check_environment(cfg: RunConfig) -> None:
    """The device, the input paths and the ONNX exporter; each failure names the flag."""
    if cfg.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {cfg.device}: no CUDA device is available here; use "
                             f"--device cpu", "device")
        index, count = int(cfg.device.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            raise UsageError(f"--device {cfg.device}: this machine has {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}", "device")
    check_input_path("--model", cfg.model, ("embedded",))
    if Path(cfg.model).is_file():
        raise UsageError(f"--model: {cfg.model} is a file; give a model folder (with its "
                         f"config.json), a hub id or embedded")
    if cfg.data.dataset:
        from ..data import KNOWN
        check_input_path("--dataset", cfg.data.dataset, ("digits", *KNOWN))
    for name, value in (("--text-file", cfg.data.text_file), ("--load-adapter", cfg.head.load_adapter)):
        if value is not None:
            check_input_path(name, value, ())
            if not Path(value).exists():
                raise UsageError(f"{name}: no such file {value}")
            if Path(value).is_dir():
                raise UsageError(f"{name}: {value} is a directory, not a file")
    from .hub import check_hub, needed
    if any(flag == "--model" for flag, _, _ in needed(cfg)):  # the model is downloaded first:
        check_hub(cfg)  # every hub resource at once, before any download is tried (with a
        # local model, the data's are checked once the model says which flags apply)
    if cfg.output.export_onnx:
        from ..export import OnnxUnavailable, require_onnx
        try:
            require_onnx()
        except OnnxUnavailable as exc:
            raise UsageError(f"--export-onnx: {exc}") from exc


def check_latency_batch(model: torch.nn.Module, batch_size: int, dtype: torch.dtype | None,
                        seq_len: int = 128) -> None:
    """One forward of `model` (the unpruned one, the largest timed) at --latency-batch-size in
    the timing's dtype, on the model's device, before pruning (the run calls it once its data is
    ready: a text encoder is timed at its sentences' mean length): a batch too large for the
    device's memory is named now, in one line, not after pruning, when the stages are timed.
    (One forward beside the timing's 13 or more per model.)"""
    from ..measure import autocast_context, example_inputs, run_model
    from ..modes import device_of, eval_mode
    device = device_of(model)
    try:
        x = example_inputs(model, batch_size, seq_len=seq_len)
        with torch.no_grad(), eval_mode(model), autocast_context(device, dtype):
            run_model(model, x)
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(exc):
            raise
        size = ""
        if device.type == "cuda":
            size = f" ({torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB)"
        raise UsageError(f"--latency-batch-size {batch_size}: one forward of the unpruned model "
                         f"at this batch does not fit in the memory of {device}{size}; lower it",
                         "latency_batch_size") from None
    finally:
        x = None  # freed before the cache is emptied
        if device.type == "cuda":
            torch.cuda.empty_cache()
