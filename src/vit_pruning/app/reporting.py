"""A single run's report (the JSON the Markdown and the plot are made from) and the summary
printed at its end."""
from __future__ import annotations

import datetime as _dt
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from ..batches import rows
from ..config import OBJECTIVE_FLAGS, RunConfig
from ..report import NOISY
from ..errors import UsageError
from .choices import Choices
from .inputs import Data
from .loading import Loaded

log = logging.getLogger("vit_pruning")


def report_head(cfg: RunConfig, argv, loaded: Loaded, ch: Choices, prune_config,
                **config_extra) -> dict:
    """What every report starts with (single run, several targets, budget search): the run, its
    command, the model, every option (with what was chosen for it) and the seed."""
    from ..anatomy import supported_class
    shape = loaded.shape
    return {
        "run_id": ch.run_id,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": ["vit-2ssp", *argv],
        "model": {"id": loaded.model_id, "class": supported_class(loaded.model),
                  "layout": loaded.layout, "num_blocks": shape.num_blocks,
                  "hidden_size": shape.hidden_size, "intermediate_size": max(shape.widths)},
        "config": {**cfg.flat(), "device": str(ch.device), **config_extra,
                   "calib_size": ch.calib_size},
        "prune_config": asdict(prune_config),
        "seed": cfg.seed,
    }


def write_outputs(cfg: RunConfig, rep: dict, outputs) -> None:
    """The report written beside its place, then every staged output renamed into place (the
    one write path of every kind of run); a failed write is one line, nothing kept."""
    from ..report import write_report
    try:
        write_report(rep, outputs.stage("json").parent, final_dir=Path(cfg.output.reports_dir))
        outputs.commit()
    except OSError as exc:
        raise write_error(exc) from exc


def write_error(exc: OSError) -> UsageError:
    """A failed write of a run's outputs (a full disk, say) as the one line the user reads;
    the caller's staging is undone, so nothing was kept."""
    return UsageError(f"cannot write the outputs ({exc.strerror or type(exc).__name__}"
                      f"{': ' + str(exc.filename) if exc.filename else ''}); nothing was kept")


def kept_head_counts(shape, plan) -> list[int] | None:
    """Attention heads each block keeps under `plan` (0 where its block or attention goes);
    None where the shape does not count heads."""
    if shape.heads is None:
        return None
    gone = set(plan.removed_blocks) | set(plan.removed_attention)
    removed = plan.heads_to_prune or (0,) * shape.num_blocks
    return [0 if i in gone else n - r for i, (n, r) in enumerate(zip(shape.heads, removed))]


def build_report(cfg: RunConfig, argv, loaded: Loaded, data: Data, ch: Choices, stages, result, latency,
                 artifacts, distilled=None) -> dict:
    from ..planner import target_bound
    from ..report import stage_dicts, summarize, versions
    shape, plan = loaded.shape, result.plan
    one_group = ch.align * shape.neuron_params / shape.total_params
    if cfg.pruning.stage == "s2":
        bound, why = None, "stage 2 alone removes whole units: it lands on the nearest count, not exactly"
    else:
        bound = target_bound(shape, plan, ch.width_policy)
        why = ("half a width step in every surviving block (one width for all, --width-policy uniform)"
               if plan.uniform_width is not None and ch.width_policy == "uniform" else
               "0.1 pp, as the automatic single width is only taken within it"
               if plan.uniform_width is not None and ch.width_policy == "auto" and bound > one_group / 2
               else f"half a group of {ch.align} MLP neurons" if ch.align > 1 else "half an MLP neuron")
    gone = set(plan.removed_blocks)
    kept_widths = [0 if i in gone else w - n for i, (w, n) in
                   enumerate(zip(shape.widths, result.neurons_removed))]
    kept_heads = kept_head_counts(shape, plan)
    return {
        **report_head(cfg, argv, loaded, ch, result.config, ft_lr=data.ft_lr),
        "depth_unit": plan.unit,
        "depth_unit_requested": cfg.pruning.depth_unit,
        "min_remaining": ch.min_remaining,
        "min_remaining_source": ch.min_remaining_source,
        "alignment": {"align": ch.align, "source": ch.align_source, "width_policy": ch.width_policy,
                      "uniform_width": plan.uniform_width,
                      "max_target_error": bound},
        "target": cfg.targets.target,
        "objective": objective_section(cfg, ch, stages, result, latency),
        "achieved_sparsity": result.achieved_sparsity,
        "target_error": (abs(result.achieved_sparsity - cfg.targets.target) if ch.objective == "params"
                         else abs(1 - result.objective_ratio - cfg.targets.target)),
        "target_bound": bound,
        "target_bound_why": why,
        "notes": run_notes(cfg, ch, result, data),
        "one_neuron_sparsity": shape.neuron_params / shape.total_params,
        "one_group_sparsity": one_group,
        "params_final": result.params_after_stage2,
        "stages": stage_dicts(stages),
        "summary": summarize(stages),
        "accuracy_note": data.accuracy_note,
        "latency_setup": latency,
        "plan": {**plan.to_dict(), "removed_indices": sorted(result.depth_order),
                 "kept_widths": kept_widths,
                 "kept_heads": kept_heads,
                 "kept_head_indices": result.kept_heads,
                 "removal_order": result.depth_order,
                 "neurons_removed_per_block": result.neurons_removed,
                 "estimated_params_removed": plan.params_before - plan.params_after,
                 "achieved_params_removed": result.params_before - result.params_after_stage2,
                 "split_search": {str(k): v for k, v in result.search.items()},
                 "neuron_selection": result.selection,
                 "neuron_selection_search": result.selection_search,
                 "refit_prior": result.refit_prior,
                 "gates": result.gates},
        "pruning_time_s": result.timings,
        "calibration": data.calib_info,
        "skipped_images": data.splits.skipped if data.splits is not None else [],
        "distillation": None if distilled is None else {
            **distilled.to_dict(), "inputs": rows(data.distill_inputs),
            "augmented": data.distill_augmented},
        "versions": versions(),
        "artifacts": artifacts,
    }


def latency_verdict(asked: float, measured: float, interval, tolerance: float) -> dict:
    """Whether a latency target was met: the measured ratio within `tolerance` of the asked
    one; with the measurement's 95% interval, so a reader sees how sure the verdict is."""
    return {"tolerance": tolerance, "measured_interval": list(interval),
            "missed": abs(measured - asked) > tolerance}


def objective_section(cfg: RunConfig, ch: Choices, stages, result, latency: dict) -> dict:
    """What the target counted and how close the run came: the asked ratio of the objective, the
    planner's predicted one, the measured one (FLOPs counted; latency timed back to back with
    the baseline, with its spread), and the parameter and FLOP ratios that resulted. For a
    latency target the latency model is included."""
    by = {s.name: s for s in stages}
    base, final = by["baseline"], by["stage2"]
    out = {"objective": ch.objective, "flag": OBJECTIVE_FLAGS[ch.objective],
           "asked_ratio": 1 - cfg.targets.target if ch.objective != "params" else None,
           "planned_ratio": 1 - result.plan.target,
           "predicted_ratio": result.objective_ratio,
           "params_ratio": final.params / base.params,
           "flops_ratio": final.flops / base.flops if base.flops else None,
           "latency_ratio": final.latency_ratio, "latency_ratio_iqr": final.latency_ratio_iqr}
    out["measured_ratio"] = {"params": out["params_ratio"], "flops": out["flops_ratio"],
                             "latency": out["latency_ratio"]}[ch.objective]
    if ch.latency_model is not None:
        out["latency_model"] = ch.latency_model.to_dict()
    if ch.objective == "latency":
        interval = (latency.get("ratio_interval") or {}).get(final.name) or final.latency_ratio_iqr
        out.update(latency_verdict(out["asked_ratio"], out["measured_ratio"], interval,
                                   cfg.timing.latency_tolerance))
    return out


def run_notes(cfg: RunConfig, ch: Choices, result, data: Data) -> list[str]:
    """What the run did otherwise than a reader of its command might assume, said where the
    summary and the report show it."""
    notes = []
    plan = result.plan
    if cfg.pruning.stage == "s2":
        notes.append(f"--stage s2 removes whole {plan.unit} units only: {plan.blocks_to_prune} "
                     f"(the count nearest the target; --split does not apply)")
    elif cfg.pruning.split == "auto" and plan.split in ("alpha", "fixed") and cfg.pruning.stage == "both":
        notes.append(f"split between stages: {plan.split} ("
                     + ("no calibration data to search with" if not data.calib_inputs else
                        "one feasible depth count only") + ")")
    if data.calib_inputs and rows(data.calib_inputs) < 2:
        notes.append("one calibration input: nothing could be held out, so the 'held-out' "
                     "distances of the split and selection searches are measured on the input "
                     "pruning fitted (use --calib-size 2 or more)")
    if plan.attention_indices:
        notes.append(f"the {OBJECTIVE_FLAGS[ch.objective]} target lies between two counts of whole "
                     f"blocks: {plan.blocks_to_prune} block(s) and the attention sublayers of "
                     f"blocks {list(plan.attention_indices)} were removed (mixed depth units; "
                     f"--no-mixed-depth removes blocks only)")
    if result.params_after_stage2 == result.params_before:
        notes.append("nothing was removed: the target is below what one unit or neuron group removes")
    return notes


def print_summary(cfg: RunConfig, rep: dict, stages, result, json_path: Path, md_path: Path) -> None:
    base, final = stages[0], stages[-1]
    acc = "" if base.top1 is None else f", top-1 {base.top1:.4f} -> {final.top1:.4f}"
    if final.cosine is not None:
        acc = f", embedding cosine {final.cosine:.4f}, neighbour agreement {100 * final.agreement:.1f}%"
    q1, q3 = final.latency_ratio_iqr
    obj = rep.get("objective") or {}
    if obj.get("asked_ratio") is not None:
        what = "FLOPs" if obj["objective"] == "flops" else "latency"
        verdict = "" if "missed" not in obj else (
            "MISSED: " if obj["missed"] else f"met (within {obj['tolerance']:g}): ")
        print(f"{obj['flag']} {obj['asked_ratio']:g}: {verdict}{what} ratio predicted "
              f"{obj['predicted_ratio']:.4f}, measured {obj['measured_ratio']:.4f}"
              + (f" [quartiles {q1:.3f}, {q3:.3f}]" if obj["objective"] == "latency" else "")
              + (f" (planned again after the first plan measured "
                 f"{obj['attempts'][0]['measured_ratio']:.4f})" if len(obj.get("attempts") or []) > 1
                 else f" (the structure nearest below the asked ratio: {obj['planned_ratio']:.4f})"
                 if abs(obj["planned_ratio"] - obj["asked_ratio"]) > 1e-9 else ""))
    print(f"vit-2ssp {rep['run_id']}: params {base.params:,} -> {final.params:,} "
          + (f"(target {cfg.targets.target:.4f}, achieved {result.achieved_sparsity:.4f}), "
             if obj.get("objective", "params") == "params" else
             f"(parameter sparsity {result.achieved_sparsity:.4f}), ") +
          f"latency ratio {final.latency_ratio:.3f}{NOISY if final.latency_noisy else ''} "
          f"[quartiles {q1:.3f}, {q3:.3f}] (median of "
          f"{rep['latency_setup']['repeats']} back-to-back rounds; median times "
          f"{base.latency_ms:.2f} -> {final.latency_ms:.2f} ms){acc}")
    if any(rep["plan"].get("heads_to_prune") or ()):
        print(f"attention heads kept per block: {rep['plan']['kept_heads']} (removed: "
              f"{list(rep['plan']['heads_to_prune'])}; 0 kept: block or attention removed)")
    if rep.get("budget_search"):
        b = rep["budget_search"]
        print(f"budget {b['budget']} {b['value']:g}: target {b['chosen']:g} chosen by bisection "
              f"after {b['prunings']} prunings (kept it; the next target above, "
              f"{b['first_rejected']}, did not: a bracket, assuming fidelity falls as the "
              f"target grows)")
        print(f"note: {b['selection_note']}")
    for note in rep.get("notes", []):
        print(f"note: {note}")
    for warning in rep["latency_setup"].get("warnings", []):
        log.warning("latency: %s", warning)
    art = rep.get("artifacts") or {}
    if art.get("pruned_model"):
        plain = art.get("pruned_model_format") == "plain"
        print(f"pruned model: {art['pruned_model']} ("
              + ("plain transformers: from_pretrained" if plain else
                 "with its modeling file: from_pretrained(..., trust_remote_code=True), or "
                 "vit_pruning.load_pruned_model")
              + (f"; weights in {art['pruned_model_dtype']}"
                 if art.get("pruned_model_dtype", "float32") != "float32" else "") + ")")
    if art.get("onnx"):
        print(f"onnx: {art['onnx']['path']} (onnxruntime within "
              f"{art['onnx']['max_abs_diff']:.1e} of torch)")
    if art.get("adapter"):
        print(f"adapter: {art['adapter']}")
    print(f"report: {md_path} (json: {json_path})")
    if obj.get("missed"):
        print(miss_line(obj, cfg), file=sys.stderr)


def miss_line(obj: dict, cfg: RunConfig) -> str:
    """The one line that says a latency target was missed, and what exits how."""
    lo, hi = obj["measured_interval"]
    return (f"vit-2ssp: latency target missed: {obj['flag']} {obj['asked_ratio']:g} asked, "
            f"measured {obj['measured_ratio']:.3f} [95% {lo:.3f}, {hi:.3f}], more than "
            f"{obj['tolerance']:g} away (--latency-tolerance); the outputs are written"
            + ("" if cfg.timing.accept_latency_miss else
               "; exit 3 (--accept-latency-miss exits 0)"))
