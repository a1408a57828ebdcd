"""The steps of a single run after its data is ready: prune (or resume), distill, recover, time
every stage back to back, save what was asked for."""
from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

import torch

from ..config import DISTILL_MATCH, OBJECTIVE_FLAGS, RunConfig
from ..errors import UsageError
from .choices import Choices, prune_config
from .evaluate import Evaluator
from .inputs import Data
from .loading import Loaded

log = logging.getLogger("vit_pruning")


def prune_step(cfg: RunConfig, loaded: Loaded, data: Data, ch: Choices, evaluate: Evaluator,
               search=None):
    """Baseline, stage 1, stage 2 (and the head re-tune with --recover), each measured; keeps a
    copy of the model after each stage so that latency can be timed back to back at the end.
    After a budget search (`search`, a tradeoff.BudgetRun) its chosen model is stage 2."""
    from ..heads import finetune
    from ..pipeline import prune_2ssp
    model = loaded.model
    if cfg.recovery.resume:  # pruned and measured before: the checkpoint holds it all
        stages, snapshots, result, model, state = resume_step(cfg, loaded, ch, evaluate)
        loaded.model = model
    elif search is not None:  # the search pruned copies: the loaded model is still the baseline
        state = None
        if search.report_inputs:  # chosen on other inputs: measured here anew
            stages = [evaluate("baseline", model)] + (
                [evaluate("stage1", search.stage1_model)] if search.stage1_model is not None else [])
        else:
            stages = [search.baseline] + ([search.stage1] if search.stage1 is not None else [])
        snapshots = {"baseline": model}
        if search.stage1_model is not None:
            snapshots["stage1"] = search.stage1_model
        model, result = search.search.model, search.search.result
        loaded.model = model
    else:
        state = None
        stages = [evaluate("baseline", model)]
        snapshots = {"baseline": copy.deepcopy(model)}

        def after_stage1(m):
            stages.append(evaluate("stage1", m))
            snapshots["stage1"] = copy.deepcopy(m)

        try:
            model, result = prune_2ssp(model, cfg.targets.target, data.calib_inputs, prune_config(cfg, ch),
                                       device=ch.device, progress=not cfg.output.quiet,
                                       after_stage1=after_stage1)
        except ValueError as exc:
            raise UsageError(f"{OBJECTIVE_FLAGS[ch.objective]}: {exc}") from exc
    if not cfg.recovery.resume:
        stages.append(evaluate("stage2", model))
    distilled = None
    if cfg.recovery.distill_steps:
        snapshots.setdefault("stage2", copy.deepcopy(model))
        distilled = distill_step(cfg, loaded, data, ch, model, result, stages, snapshots, state)
        stages.append(evaluate("distilled", model))
    if cfg.head.recover:
        snapshots[stages[-1].name] = copy.deepcopy(model)
        h = cfg.head
        finetune(model, data.train_loader, h.ft_epochs, data.ft_lr, h.freeze_backbone, ch.device,
                 not cfg.output.quiet, ch.mixed_precision, cfg.recovery.grad_accumulation)
        model.eval()
        stages.append(evaluate("recovered", model))
    snapshots[stages[-1].name] = model
    return stages, snapshots, result, distilled


def distill_step(cfg: RunConfig, loaded: Loaded, data: Data, ch: Choices, model, result, stages,
                 snapshots,
                 state=None):
    """Distill the pruned `model` from the baseline (on accelerate: every process of a launched
    job on its own shard, after checking they all pruned the same plan); with
    --checkpoint-every its state is written every N steps (the main process), and with
    --resume it goes on from `state`."""
    from ..accel import is_main, make_accelerator, same_everywhere
    from ..checkpoint import Checkpoint
    from ..distillation import distill
    dc = distill_config(cfg, ch, result)
    acc = make_accelerator(ch.device, dc.mixed_precision, dc.grad_accumulation)
    try:
        same_everywhere(acc, plan_fingerprint(result), "the pruning plan")
    except RuntimeError as exc:
        raise UsageError(str(exc)) from exc
    hook = None
    if cfg.recovery.checkpoint_every and is_main():
        saved = Checkpoint.of(cfg.output.artifacts_dir, ch.run_id)
        saved.write_snapshots({k: snapshots[k] for k in ("stage1", "stage2") if k in snapshots},
                              loaded.processor)
        run_record = {"stages": list(stages), "result": result}

        def write(st):
            where = saved.write(st.step, model, st, run_record, cfg.job(), loaded.processor)
            log.info("checkpoint: step %d written to %s", st.step, where)
        hook = write
    from ..batches import rows
    log.info("distilling from the unpruned model on %d unlabeled inputs%s", rows(data.distill_inputs),
        "" if acc.num_processes == 1 else f", sharded over {acc.num_processes} processes")
    return distill(model, snapshots["baseline"], data.distill_inputs, config=dc,
                   check_inputs=data.distill_checks, progress=not cfg.output.quiet, checkpoint=hook,
                   resume=state)


def distill_config(cfg: RunConfig, ch: Choices, result):
    """The library's DistillConfig of this run (--distill-match auto: DISTILL_MATCH, each kept
    block against the teacher block whose place it takes)."""
    from ..distillation import DistillConfig, pruned_layers
    r = cfg.recovery
    match = DISTILL_MATCH if r.distill_match == "auto" else r.distill_match
    return DistillConfig(steps=r.distill_steps, lr=r.distill_lr, batch_size=r.distill_batch_size,
                         temperature=r.distill_temperature, train=r.distill_train, seed=cfg.seed,
                         match=match,
                         layers=tuple(pruned_layers(result)) if match == "layers" else None,
                         mixed_precision=ch.mixed_precision,
                         grad_accumulation=r.grad_accumulation, checkpoint_every=r.checkpoint_every)


def plan_fingerprint(result) -> str:
    """What must be the same in every process before they train one model together."""
    import hashlib
    text = repr((result.plan.to_dict(), result.depth_order, result.neurons_removed))
    return hashlib.sha256(text.encode()).hexdigest()


def resume_step(cfg: RunConfig, loaded: Loaded, ch: Choices, evaluate):
    """The checkpoint of --run-id: (stages measured before it, snapshots for the latency table,
    the PruneResult, the student with its weights then, the distillation state)."""
    from ..checkpoint import Checkpoint
    try:
        student, state, run, snaps = Checkpoint.of(cfg.output.artifacts_dir, ch.run_id).load(
            cfg.job(), ch.device)
    except ValueError as exc:
        raise UsageError(f"--resume: {exc}") from exc
    log.info("resuming run %s from step %d of %d", ch.run_id, state.step, cfg.recovery.distill_steps)
    base = evaluate("baseline", loaded.model)  # the reference of the stages measured next
    stages = [base] + [s for s in run["stages"] if s.name != "baseline"]
    snapshots = {"baseline": loaded.model, **snaps}
    return stages, snapshots, run["result"], student.eval(), state


def timing_options(cfg: RunConfig, loaded: Loaded, data: Data, ch: Choices) -> dict:
    """interleaved_latency's keyword arguments for this run, the same for every timing it does:
    --latency-batch-size, --latency-repeats, the latency dtype, --latency-precision and
    --latency-max-repeats, the allocator (--no-steady-allocator) and a text encoder's sequence
    length."""
    return {"batch_size": cfg.timing.latency_batch_size, "repeats": cfg.timing.latency_repeats,
            "dtype": ch.latency_dtype, "precision": cfg.timing.latency_precision or None,
            "max_repeats": cfg.timing.latency_max_repeats,
            "steady_allocator": cfg.timing.steady_allocator,
            "progress": not cfg.output.quiet,
            **({"seq_len": data.seq_len} if loaded.text else {})}


def latency_step(cfg: RunConfig, loaded: Loaded, data: Data, ch: Choices, stages, snapshots) -> dict:
    """Time every stage's model back to back, interleaved (see measure.interleaved_latency), and
    write each stage's median and its ratio to the baseline into `stages`."""
    from ..measure import interleaved_latency
    comp = interleaved_latency({s.name: snapshots[s.name] for s in stages}, warmup=3,
                               **timing_options(cfg, loaded, data, ch))
    noisy = set(comp.untrusted())
    for s in stages:
        s.latency_ms = comp.median_ms[s.name]
        s.latency_ratio = comp.ratio[s.name]
        s.latency_ratio_iqr = (comp.ratio_q1[s.name], comp.ratio_q3[s.name])
        s.latency_noisy = s.name in noisy
    return latency_setup(cfg, data, ch, comp)


def latency_setup(cfg: RunConfig, data: Data, ch: Choices, comp) -> dict:
    """The report's `latency_setup`: how the timing was made, and its comparison's numbers."""
    return {**comp.to_dict(), "threads": torch.get_num_threads(), "device": str(ch.device),
            "seq_len": data.seq_len, "interleaved": True,
            "steady_allocator": cfg.timing.steady_allocator}


def save_dtype(cfg: RunConfig, loaded: Loaded) -> torch.dtype:
    """The dtype a pruned model's weights are saved in: --save-dtype, or with auto the dtype the
    checkpoint stores its weights in."""
    name = cfg.output.save_dtype
    return loaded.stored_dtype if name == "auto" else getattr(torch, name)


def save_model(cfg: RunConfig, model, folder: Path, final: Path, loaded: Loaded, data: Data,
               meta: dict):
    """One pruned model saved into `folder` (its staging place, renamed to `final` with the
    report), with a sentence-transformers model's module files, and its ONNX export inside
    where --export-onnx asks (the export's record names the final path); returns the
    SavedModel."""
    from ..persistence import dtype_name, save_pruned_model

    def extra(tmp: Path) -> dict | None:  # written into the folder before it appears
        for name, source in loaded.extra_files.items():  # sentence-transformers modules
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, tmp / name)
        if not cfg.output.export_onnx:
            return None
        from ..export import export_onnx
        record = export_onnx(model, tmp / "model.onnx", seq_len=data.seq_len or 16)
        return {**record, "path": str(final / "model.onnx")}
    dtype = save_dtype(cfg, loaded)
    saved = save_pruned_model(model, folder, loaded.processor, meta, extra=extra, dtype=dtype)
    if dtype != torch.float32:
        log.info("pruned model saved in %s%s", dtype_name(dtype), " (the checkpoint's dtype)"
                 if cfg.output.save_dtype == "auto" else "")
    if saved.extra is not None:
        log.info("ONNX export %s: onnxruntime max |difference| to torch %.2e",
                 saved.extra["path"], saved.extra["max_abs_diff"])
    return saved


def save_step(cfg: RunConfig, loaded: Loaded, data: Data, ch: Choices, outputs) -> dict:
    """The head/adapter, the pruned model and its ONNX export, each only when asked, written
    to their staging places (`outputs`, renamed into place with the report); the artifacts
    record names the final paths."""
    from ..heads import save_adapter
    from ..persistence import dtype_name
    model = loaded.model
    artifacts = {"adapter": None, "pruned_model": None, "plot": None}
    meta = {"model": loaded.model_id, "target": cfg.targets.target, "head": data.head_cfg,
            "run_id": ch.run_id}
    if cfg.head.save_adapter:
        save_adapter(model, outputs.stage("adapter"), data.head_cfg["kind"], meta)
        artifacts["adapter"] = str(outputs.by_role("adapter").path)
    if cfg.output.save_pruned_model or cfg.output.export_onnx:
        final = outputs.by_role("model").path
        saved = save_model(cfg, model, outputs.stage("model"), final, loaded, data,
                           {**meta, "seed": cfg.seed})
        artifacts["pruned_model"] = str(final)
        artifacts["pruned_model_format"] = saved.format
        artifacts["pruned_model_dtype"] = dtype_name(save_dtype(cfg, loaded))
        if saved.extra is not None:
            artifacts["onnx"] = saved.extra
    return artifacts
