"""The CLI's runs over many targets: several targets at once (`--target 0.1,0.2,0.3`) and the
largest target within a budget (`--max-accuracy-drop`, `--max-kl`, `--min-cosine`).

Both build one :class:`vit_pruning.pipeline.Pruner` on the unpruned model (the shared work),
measure every target's model on the same evaluation inputs, and time all of them back to back
with the baseline, interleaved. A sweep writes a trade-off report (table and plot, one point per
target); a budget run hands its chosen model to the rest of the pipeline and adds the search
to the usual report.
"""
from __future__ import annotations

import copy
import logging
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import torch
from torch import nn

from ..config import BUDGETS, LATENCY_TOLERANCE, OBJECTIVE_FLAGS, RunConfig
from ..errors import LATENCY_MISSED, UsageError
from ..measure import interleaved_latency
from ..persistence import dtype_name
from ..pipeline import Pruner
from ..sweep import SearchResult, prune_to_measured, search_target, sweep
from .choices import Choices, prune_config
from .evaluate import Evaluator
from .inputs import Data
from .loading import Loaded
from .reporting import kept_head_counts, latency_verdict, report_head, write_error, write_outputs
from .steps import latency_setup, save_dtype, save_model, timing_options

log = logging.getLogger("vit_pruning")


def split_evaluation(data: Data) -> tuple[Data, Data] | None:
    """(what a budget search chooses on, what its report measures the choice on): the
    evaluation inputs in two disjoint halves, so the reported margin to the budget is not
    optimistic by selection; None with fewer than two inputs."""
    if data.eval_pixels:
        x, y = torch.cat(data.eval_pixels), data.eval_labels
        if len(x) < 2:
            return None
        h, size = len(x) // 2, len(data.eval_pixels[0])
        parts = [(list(torch.split(x[a:b], size)), None if y is None else y[a:b])
                 for a, b in ((0, h), (h, len(x)))]
        halves = [replace(data, eval_pixels=p, eval_labels=lab) for p, lab in parts]
    elif data.eval_batches:
        batches = data.eval_batches
        if len(batches) == 1:
            n = len(batches[0]["input_ids"])
            if n < 2:
                return None
            batches = [{k: v[:n // 2] for k, v in batches[0].items()},
                       {k: v[n // 2:] for k, v in batches[0].items()}]
        h = len(batches) // 2
        halves = [replace(data, eval_batches=batches[:h]), replace(data, eval_batches=batches[h:])]
    else:
        return None
    chosen, reported = (evaluation_count(d) for d in halves)
    halves[1].accuracy_note = (f"{data.accuracy_note}; of those, the {reported} the budget search "
                               f"did not choose on (it chose on the other {chosen})")
    return halves[0], halves[1]


def evaluation_count(data: Data) -> int:
    """How many evaluation images (or sentences) every measurement uses."""
    from ..batches import rows
    return rows(data.eval_pixels) if data.eval_pixels else rows(data.eval_batches)


def measure_of(budget: str) -> str:
    return {"max_accuracy_drop": "top1_drop_pp", "max_kl": "kl", "min_cosine": "cosine"}[budget]


def within(budget: str, value: float, metrics, base) -> tuple[bool, dict]:
    """Whether a pruned model's metrics keep the budget, and the measures recorded."""
    if budget == "max_accuracy_drop":
        drop = 100.0 * (base.top1 - metrics.top1)
        return drop <= value + 1e-9, {"top1": metrics.top1, "top1_drop_pp": drop}
    if budget == "max_kl":
        return metrics.kl_to_baseline <= value, {"kl": metrics.kl_to_baseline}
    return metrics.cosine >= value, {"cosine": metrics.cosine, "agreement": metrics.agreement}


@dataclass
class BudgetRun:
    """A budget search as the CLI ran it: the search, the baseline's and the chosen model's
    stage-1 measurements, and every trial's measurements and model (timed for the plot)."""

    search: SearchResult
    baseline: Any  # report.StageMetrics
    stage1: Any = None
    stage1_model: Any = None
    trial_metrics: dict = field(default_factory=dict)
    trial_models: dict = field(default_factory=dict)
    points: list = field(default_factory=list)  # one per trial, timed right after the search
    evaluation_inputs: int = 0  # the images or sentences every trial was measured on
    report_inputs: int = 0  # the disjoint ones the report measures the choice on (0: the same)


def budget_search(cfg: RunConfig, argv: list[str], loaded: Loaded, data: Data,
                  ch: Choices, evaluate: Evaluator, outputs) -> BudgetRun:
    """Find the largest target that keeps the budget (:func:`vit_pruning.sweep.search_target`);
    if none does, write the search's report and exit 2 (a UsageError naming the budget)."""
    name, value = cfg.budget
    base = evaluate("baseline", loaded.model)
    pruner = Pruner(loaded.model, data.calib_inputs, prune_config(cfg, ch), device=ch.device,
                    progress=not cfg.output.quiet)
    run = BudgetRun(None, base, evaluation_inputs=evaluation_count(data))
    current: dict = {}

    def after_stage1(target, model):
        current["target"] = target
        current["stage1"] = (evaluate("stage1", model), copy.deepcopy(model))

    def accept(model):
        t = current["target"]
        metrics = evaluate(f"target {t:g}", model)
        ok, measures = within(name, value, metrics, base)
        run.trial_metrics[t] = metrics
        run.trial_models[t] = model
        if ok:
            run.stage1, run.stage1_model = current["stage1"]
        current.pop("stage1", None)
        return ok, measures

    try:
        run.search = search_target(loaded.model, accept, resolution=cfg.targets.target_resolution,
                                   pruner=pruner, after_stage1=after_stage1)
    except ValueError as exc:
        raise UsageError(f"{BUDGETS[name]}: {exc}") from exc
    if run.search.target is None:
        first = run.search.trials[-1]
        points = tradeoff_points(cfg, loaded, data, ch, base, run.trial_metrics, run.trial_models,
                                 {t.target: None for t in run.search.trials})
        rep = tradeoff_report(cfg, argv, loaded, data, ch, base, points, pruner,
                              search=run.search)
        write_outputs(cfg, rep, outputs)
        raise UsageError(f"{BUDGETS[name]} {value:g}: even the smallest target, {first.target:g}, "
                         f"breaks it ({_measures_text(first.measures)}); the search's report: "
                         f"{outputs.by_role('md').path}")
    log.info("budget %s %g: target %.4f chosen after %d prunings", BUDGETS[name], value,
             run.search.target, len(run.search.trials))
    run.points, _ = tradeoff_points(cfg, loaded, data, ch, base, run.trial_metrics,
                                    run.trial_models, {run.search.target: run.search.result})
    run.trial_models.clear()  # timed: only the chosen model goes on
    return run



def latency_measure(cfg: RunConfig, loaded: Loaded, data: Data, ch: Choices
                    ) -> Callable[[torch.nn.Module], float]:
    """What a --target-latency run measures a pruned model by: its latency ratio to the
    baseline, the two timed back to back, interleaved, on the run's batch, dtype and rounds."""
    options = timing_options(cfg, loaded, data, ch)

    def measure(model) -> float:
        return interleaved_latency({"baseline": loaded.model, "pruned": model}, warmup=2,
                                   **options).ratio["pruned"]
    return measure


def latency_run(cfg: RunConfig, loaded: Loaded, data: Data, ch: Choices,
                evaluate: Evaluator) -> BudgetRun:
    """--target-latency R (one R): prune on the latency model, time the result back to back with
    the baseline, and while it misses R by more than LATENCY_TOLERANCE prune again (up to twice)
    at the target corrected by the misses (:func:`vit_pruning.sweep.prune_to_measured`); the
    closest model goes on through the rest of the pipeline, every attempt is in the report."""
    base = evaluate("baseline", loaded.model)
    pruner = Pruner(loaded.model, data.calib_inputs, prune_config(cfg, ch), device=ch.device,
                    progress=not cfg.output.quiet)
    stage1: dict = {}

    def after_stage1(target, model):
        stage1[target] = (evaluate("stage1", model), copy.deepcopy(model))
    try:
        model, res, tries = prune_to_measured(pruner, 1 - cfg.targets.target,
                                              latency_measure(cfg, loaded, data, ch),
                                              LATENCY_TOLERANCE, after_stage1=after_stage1)
    except ValueError as exc:
        raise UsageError(f"--target-latency: {exc}") from exc
    chosen = next(t for t in tries if t.measures.get("chosen"))
    metrics, snapshot = stage1.get(chosen.target, (None, None))
    search = SearchResult(chosen.target, model, res, tries)
    return BudgetRun(search, base, metrics, snapshot)


def _measures_text(measures: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in measures.items())


def search_section(cfg: RunConfig, run: BudgetRun) -> dict:
    """The report's `budget_search` entry: the budget, each trial with its measures, the
    chosen target and the first that broke the budget, and one trade-off point per trial."""
    name, value = cfg.budget
    n, other = run.evaluation_inputs, run.report_inputs
    one = f"one image is {100 / n:.2f} points of top-1" if name == "max_accuracy_drop" and n else ""
    note = (f"the target was chosen on {n} evaluation inputs (the trials below); the stages of "
            f"this report measure it on the other {other}, so its margin to the budget is not "
            f"optimistic by selection (it may be smaller than the trials', even past the budget)" if other else
            f"the target was chosen on the same {n} evaluation inputs this report measures it on"
            + (f" ({one})" if one else "") + ": its margin to the budget is optimistic (chosen "
            "because it passed there)")
    return {"budget": BUDGETS[name], "value": value, "measure": measure_of(name),
            "resolution": cfg.targets.target_resolution,
            "chosen": run.search.target, "first_rejected": run.search.first_rejected,
            "prunings": len(run.search.trials),
            "selection_inputs": n, "report_inputs": other or n,
            "report_inputs_shared": 0 if other else n, "selection_note": note,
            "trials": [asdict(t) for t in run.search.trials], "points": run.points}


def tradeoff_points(cfg, loaded: Loaded, data: Data, ch: Choices, base, metrics: dict,
                    models: dict, results: dict) -> list[dict]:
    """One point per target: its measurements, and its latency ratio timed back to back with
    the baseline (all targets interleaved in the same rounds)."""
    names = {t: f"target {t:g}" for t in models}
    comp = interleaved_latency({"baseline": loaded.model, **{names[t]: m for t, m in models.items()}},
                               warmup=3, **timing_options(cfg, loaded, data, ch))
    for warning in comp.warnings():
        log.warning("latency: %s", warning)
    points = []
    for t in sorted(models):
        m, res = metrics[t], results.get(t)
        point = {"target": t, "params": m.params, "params_ratio": m.params / base.params,
                 "flops": m.flops, "flops_ratio": m.flops / base.flops if base.flops else None,
                 "achieved_sparsity": 1 - m.params / base.params,
                 "latency_ratio": comp.ratio[names[t]],
                 "latency_noisy": names[t] in comp.untrusted(),
                 "latency_ratio_iqr": [comp.ratio_q1[names[t]], comp.ratio_q3[names[t]]],
                 "top1": m.top1, "kl": m.kl_to_baseline, "cosine": m.cosine,
                 "agreement": m.agreement,
                 "top1_drop_pp": None if m.top1 is None or base.top1 is None else
                 100.0 * (base.top1 - m.top1)}
        if res is not None:
            gone = set(res.plan.removed_blocks)
            shape = loaded.shape
            point.update({"depth_unit": res.plan.unit, "depth_removed": sorted(res.depth_order),
                          "attention_removed": list(res.plan.attention_indices),
                          "kept_widths": [0 if i in gone else w - n for i, (w, n) in
                                          enumerate(zip(shape.widths, res.neurons_removed))],
                          "kept_heads": kept_head_counts(shape, res.plan),
                          "heads_removed": list(res.plan.heads_to_prune),
                          "target_error": abs((res.achieved_sparsity if res.objective == "params"
                                               else 1 - res.objective_ratio) - t),
                          "pruning_time_s": res.timings})
            if res.objective != "params":  # a FLOP or latency target: asked and predicted ratios
                point.update({"objective": res.objective, "asked_ratio": round(1 - t, 12),
                              "predicted_ratio": res.objective_ratio})
            if res.objective == "latency":  # and whether the timing met it
                interval = comp.ratio_interval.get(names[t], point["latency_ratio_iqr"])
                point.update(latency_verdict(point["asked_ratio"], point["latency_ratio"], interval,
                                             cfg.timing.latency_tolerance))
        points.append(point)
    return points, comp


def tradeoff_report(cfg: RunConfig, argv, loaded: Loaded, data: Data, ch: Choices, base,
                    points_comp, pruner: Pruner, search: SearchResult | None = None,
                    artifacts: dict | None = None) -> dict:
    """The report of several targets (kind "sweep") or of a budget search that found nothing
    to go on with (kind "budget", with its `search`)."""
    from ..report import versions
    points, comp = points_comp
    budget = cfg.budget
    return {
        **report_head(cfg, argv, loaded, ch, pruner.cfg),
        "kind": "sweep" if search is None else "budget",
        "budget": None if budget is None else {"flag": BUDGETS[budget[0]], "value": budget[1],
                                               "measure": measure_of(budget[0])},
        "chosen": None if search is None else search.target,
        "first_rejected": None if search is None else search.first_rejected,
        "trials": [] if search is None else [asdict(t) for t in search.trials],
        "baseline": {"params": base.params, "flops": base.flops, "top1": base.top1},
        "points": points,
        "accuracy_note": data.accuracy_note,
        "latency_setup": latency_setup(cfg, data, ch, comp),
        "latency_model": None if ch.latency_model is None else ch.latency_model.to_dict(),
        "shared_work_s": pruner.timings,
        "calibration": data.calib_info,
        "versions": versions(),
        "artifacts": artifacts or {"pruned_models": None, "plot": None},
    }


def save_models(cfg: RunConfig, loaded: Loaded, data: Data, ch: Choices,
                models: dict[float, nn.Module], outputs) -> dict:
    """Each target's pruned model in its own folder of the run's staging folder (renamed into
    place with the report), with its ONNX export where --export-onnx asks (:func:`save_model`);
    the artifacts record: {"pruned_models": {target: final folder}, "onnx": {target: export
    record}}."""
    folder = outputs.stage("model")
    folder.mkdir()
    final = outputs.by_role("model").path
    out: dict = {"pruned_models": {}, "pruned_model_dtype": dtype_name(save_dtype(cfg, loaded))}
    if cfg.output.export_onnx:
        out["onnx"] = {}
    for t, m in models.items():
        name = f"target-{t:g}" if ch.objective == "params" else f"{ch.objective}-{1 - t:g}"
        saved = save_model(cfg, m, folder / name, final / name, loaded, data,
                           {"model": loaded.model_id, "target": t, "run_id": ch.run_id,
                            "seed": cfg.seed})
        out["pruned_models"][str(t)] = str(final / name)
        if saved.extra is not None:
            out["onnx"][str(t)] = saved.extra
    return out


def sweep_run(cfg: RunConfig, argv: list[str], loaded: Loaded, data: Data, ch: Choices,
              evaluate: Evaluator, outputs) -> int:
    """--target with several values: one Pruner, one pruned copy per target, each measured and
    timed against the baseline (several --target-latency values: each planned, timed and
    corrected as a single one is, see latency_run); saves each model with --save-pruned-model
    (and its ONNX export with --export-onnx: :func:`save_models`); the trade-off report."""
    base = evaluate("baseline", loaded.model)
    pruner = Pruner(loaded.model, data.calib_inputs, prune_config(cfg, ch), device=ch.device,
                    progress=not cfg.output.quiet)
    attempts: dict[float, list[dict]] = {}
    try:
        if ch.objective == "latency":  # each target as a single one is met: timed, corrected
            measure = latency_measure(cfg, loaded, data, ch)
            runs = {t: prune_to_measured(pruner, 1 - t, measure, LATENCY_TOLERANCE)
                    for t in sorted(cfg.targets.targets, reverse=True)}  # largest first, as sweep()
            pruned = [runs[t][:2] for t in cfg.targets.targets]
            attempts = {t: [trial.measures for trial in runs[t][2]] for t in cfg.targets.targets}
        else:
            pruned = sweep(loaded.model, cfg.targets.targets, pruner=pruner)
    except ValueError as exc:
        raise UsageError(f"{OBJECTIVE_FLAGS[ch.objective]}: {exc}") from exc
    models = {t: m for t, (m, _) in zip(cfg.targets.targets, pruned)}
    results = {t: r for t, (_, r) in zip(cfg.targets.targets, pruned)}
    metrics = {t: evaluate(f"target {t:g}", m) for t, m in models.items()}
    points_comp = tradeoff_points(cfg, loaded, data, ch, base, metrics, models, results)
    for point in points_comp[0]:
        if point["target"] in attempts:
            point["attempts"] = attempts[point["target"]]
    artifacts: dict = {"pruned_models": None, "plot": None}
    try:
        if cfg.output.save_pruned_model or cfg.output.export_onnx:
            artifacts.update(save_models(cfg, loaded, data, ch, models, outputs))
    except OSError as exc:
        raise write_error(exc) from exc
    rep = tradeoff_report(cfg, argv, loaded, data, ch, base, points_comp, pruner,
                          artifacts=artifacts)
    write_outputs(cfg, rep, outputs)
    from ..report import point_line
    print(f"vit-2ssp {ch.run_id}: {len(models)} targets pruned from one model "
          f"(shared work {sum(pruner.timings.values()):.1f} s)")
    for point in rep["points"]:
        print("  " + point_line(point))
    for t, path in (artifacts["pruned_models"] or {}).items():
        onnx = artifacts.get("onnx", {}).get(t)
        print(f"  pruned model, target {float(t):g}: {path}" + (
            f" (model.onnx: onnxruntime within {onnx['max_abs_diff']:.1e} of torch)" if onnx else ""))
    print(f"report: {outputs.by_role('md').path} (json: {outputs.by_role('json').path})")
    missed = [p for p in rep["points"] if p.get("missed")]
    for p in missed:
        lo, hi = p["measured_interval"]
        print(f"vit-2ssp: latency target missed: --target-latency {p['asked_ratio']:g} asked, "
              f"measured {p['latency_ratio']:.3f} [95% {lo:.3f}, {hi:.3f}], more than "
              f"{p['tolerance']:g} away (--latency-tolerance)", file=sys.stderr)
    return LATENCY_MISSED if missed and not cfg.timing.accept_latency_miss else 0
