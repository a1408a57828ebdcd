"""The run-wide choices made once a model is loaded: device, timing precision, min_remaining and
alignment, the objective's cost model (FLOPs or a measured latency model), and the checks of
every target against it before any work."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..config import (IMAGE_CALIB, LATENCY_MODEL_ROUNDS, TEXT_CALIB,
                      PruneConfig, RunConfig, fixed_heads_problem, width_limits)
from ..errors import UsageError
from .loading import Loaded

log = logging.getLogger("vit_pruning")


@dataclass
class Choices:
    """Every run-wide choice, made once in :func:`choose`: where it runs, at what precision it is
    timed, how widths are aligned, and where its outputs go."""

    device: torch.device
    latency_dtype: torch.dtype
    run_id: str
    min_remaining: int
    min_remaining_source: str
    align: int
    align_source: str
    width_policy: str
    calib_size: int
    mixed_precision: str = "no"  # of training steps (accel.resolve_precision of --mixed-precision)
    objective: str = "params"  # what the targets count (see objective_step)
    seq_len: int = 128  # text: tokens per sentence the FLOPs and latency are counted at
    cost_shape: Any = None  # planner.ModelShape in the objective's units (None: parameters)
    latency_model: Any = None  # objective.LatencyModel of a --target-latency run


def choose(cfg: RunConfig, loaded: Loaded, run_id: str) -> Choices:
    """Device, timing precision, min_remaining and alignment, decided in one place."""
    from ..accel import launched, resolve_precision
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    if launched() and device.type == "cuda" and device.index is None:  # one GPU per process
        import os
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    try:
        precision = resolve_precision(cfg.recovery.mixed_precision, device)
    except ValueError as exc:
        raise UsageError(f"--mixed-precision {cfg.recovery.mixed_precision}: {exc}") from exc
    if cfg.timing.latency_dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, cfg.timing.latency_dtype)
        if dtype == torch.float16 and device.type != "cuda":
            raise UsageError("--latency-dtype float16 needs CUDA; on the CPU use float32 or bfloat16")
    width = max(loaded.shape.widths)
    if cfg.pruning.min_remaining is not None and cfg.pruning.min_remaining >= width:
        raise UsageError(f"--min-remaining must be below the MLP width {width}, got "
                         f"{cfg.pruning.min_remaining}", "min_remaining")
    problem = cfg.pruning.heads.isdigit() and fixed_heads_problem(loaded.shape, int(cfg.pruning.heads))
    if problem:
        raise UsageError(f"--heads {cfg.pruning.heads}: {problem}", "heads")
    align = cfg.pruning.align if cfg.pruning.align == "auto" else int(cfg.pruning.align)
    limits = width_limits(loaded.shape, cfg.pruning.min_remaining, align)
    calib = cfg.data.calib_size or (TEXT_CALIB if loaded.text else IMAGE_CALIB)
    return Choices(device, dtype, run_id, limits.min_remaining, limits.min_remaining_source,
                   limits.align, limits.align_source, cfg.pruning.width_policy, calib,
                   mixed_precision=precision)


def prune_config(cfg: RunConfig, ch: Choices) -> PruneConfig:
    """The library's PruneConfig of this run (min_remaining and align as chosen)."""
    return PruneConfig(unit=cfg.pruning.depth_unit, min_remaining=ch.min_remaining,
                       split=int(cfg.pruning.split) if cfg.pruning.split.isdigit() else cfg.pruning.split,
                       depth_method=cfg.pruning.depth_method, allocation=cfg.pruning.allocation,
                       compensation=cfg.pruning.compensation, selection=cfg.pruning.neuron_selection,
                       refit_prior=cfg.pruning.refit_prior,
                       stages=cfg.pruning.stage, align=ch.align, width_policy=ch.width_policy,
                       objective=ch.objective, latency_model=ch.latency_model,
                       seq_len=ch.seq_len, mixed_depth=not cfg.pruning.no_mixed_depth,
                       heads=int(cfg.pruning.heads) if cfg.pruning.heads.isdigit() else cfg.pruning.heads)


def data_free(cfg: RunConfig, ch: Choices, unit: str | None = None) -> PruneConfig:
    """This run's PruneConfig as a Pruner without calibration data plans: the alpha split
    unless a depth count is asked for (the split search needs data)."""
    pc = prune_config(cfg, ch)
    return replace(pc, split=pc.split if isinstance(pc.split, int) else "alpha",
                   unit=unit or pc.unit)


def plan_probes(cfg: RunConfig, loaded: Loaded, ch: Choices) -> dict[float, dict]:
    """Per target, the data-free plan of each depth unit, as the pipeline makes it
    (:meth:`vit_pruning.pipeline.Pruner.preview`, one Pruner for every target): checks the
    targets before any work, one UsageError naming the flag where one cannot be met."""
    from ..pipeline import Pruner
    from ..planner import max_depth_units, units_of
    if not cfg.targets.targets:
        return {}
    if cfg.pruning.split.isdigit() and cfg.pruning.stage == "both":  # before the library's check
        units = units_of(cfg.pruning.depth_unit)
        most = max(max_depth_units(ch.cost_shape or loaded.shape, u) for u in units)
        if int(cfg.pruning.split) > most:
            raise UsageError(f"--split {cfg.pruning.split}: this model has at most {most} "
                             f"removable {' or '.join(units)} units", "split")
    pruner = Pruner(loaded.model, None, data_free(cfg, ch))
    return {t: _target_probes(cfg, loaded, ch, pruner, t) for t in cfg.targets.targets}


def _target_probes(cfg: RunConfig, loaded: Loaded, ch: Choices, pruner, target: float) -> dict:
    """plan_probes of one target."""
    from ..planner import check_width_only, max_target_over, units_of, validate_target
    shape = ch.cost_shape or loaded.shape
    units = units_of(cfg.pruning.depth_unit)
    flag = cfg.targets.flag
    if ch.objective != "params":
        top = max_target_over(shape, units, ch.min_remaining, ch.align, pruner.cfg.fixed_heads)
        if target > top:
            what = "FLOPs" if ch.objective == "flops" else "latency (predicted)"
            raise UsageError(f"{flag} {1 - target:g} is below what the deepest feasible pruning "
                             f"reaches: {1 - top:.4f} of the {what} (min_remaining "
                             f"{ch.min_remaining}, {' or '.join(units)} units)")
    elif cfg.pruning.split.isdigit() and cfg.pruning.stage == "both":
        flag = "--split/--target"
    probes = {}
    try:
        if cfg.pruning.stage == "s1":
            fixed = pruner.cfg.fixed_heads
            check_width_only(shape, target, ch.min_remaining, ch.align, fixed,
                             "--stage s1" + (f" --heads {fixed}" if fixed else ""))
            units = units[:1]
        elif ch.objective == "params":
            fixed = pruner.cfg.fixed_heads
            validate_target(target, max_target_over(shape, units, ch.min_remaining, ch.align, fixed),
                            "with this min_remaining and depth unit"
                            + (f" and --heads {fixed}" if fixed else ""))
        for u in units:
            try:
                probes[u] = pruner.preview(target, u)
            except ValueError:
                if len(units) == 1:
                    raise
    except ValueError as exc:
        raise UsageError(f"{flag} {1 - target:g}: {exc}" if ch.objective != "params" else
                         f"{flag}: {exc}") from exc
    return probes


def objective_step(cfg: RunConfig, loaded: Loaded, ch: Choices,
                   seq_len: int | None) -> dict[float, dict] | None:
    """For --target-flops / --target-latency: the planner's shape in FLOPs, or the latency model
    measured on the run's device, dtype and batch size (or found in the cache); then every
    target is checked against it, before anything is pruned."""
    if cfg.targets.objective == "params":
        return None  # checked before the data (parameters need no cost model)
    from ..objective import default_cache_dir, measure_latency_model, objective_shape
    ch.objective, ch.seq_len = cfg.targets.objective, seq_len or 128
    if cfg.targets.objective == "latency":
        cache = (None if cfg.timing.latency_cache == "none" else
                 Path(cfg.timing.latency_cache) if cfg.timing.latency_cache else default_cache_dir())
        log.info("measuring the latency model on %s (%s, batch %d)", ch.device,
                 str(ch.latency_dtype).replace("torch.", ""), cfg.timing.latency_batch_size)
        ch.latency_model = measure_latency_model(
            loaded.model, cfg.timing.latency_batch_size, ch.latency_dtype,
            max(LATENCY_MODEL_ROUNDS, cfg.timing.latency_repeats),
            seq_len=ch.seq_len, align=ch.align, min_remaining=ch.min_remaining, cache_dir=cache,
            steady_allocator=cfg.timing.steady_allocator)
    ch.cost_shape = objective_shape(loaded.model, loaded.shape, ch.objective, ch.latency_model,
                                    ch.seq_len)
    return plan_probes(cfg, loaded, ch)
