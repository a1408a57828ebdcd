"""Asking for speed: FLOP and latency targets against parameter targets, on this machine.

For each model and batch size: the latency model is measured once (`measure_latency_model`, on
the device and batch it is for); then for each ratio R the model is pruned three ways from the
unpruned one: `--target-flops R`; `--target-latency R` as the CLI runs it (planned on the
latency model, timed against the baseline, and while it misses R by more than 0.01 planned again,
up to twice, at the target corrected by the misses; a timing more than 0.03 from the prediction
is taken twice more and the median used; the closest is kept: `prune_to_measured`); and a
parameter target with the same parameter count as the latency-target model (what a user who
asked for parameters would have got). All three and the baseline are then timed back to back,
interleaved (a fresh measurement, not the one the correction used); the ratio is the median over
rounds of t(pruned) / t(baseline), with its quartiles. "miss" is |measured - R| of that final
timing. Every timing runs at least 10 rounds and goes on, doubling them up to 100 (or 10 s of
rounds for fast models), until each ratio's 95% interval is within +-0.01 (the CLI's default
--latency-precision).

Models: the ViT-B/16, DINOv2-B/14 and Swin-T shapes with random weights (data-free pruning:
the shapes, not the choices, set the speed) and the embedded digits ViT with its 64
calibration images, whose KL to the unpruned model on the test split is the fidelity column
(fidelity at equal measured latency, against every parameter target a user can prune to, is
`python -m bench --only latency_choice`).
"""
from __future__ import annotations

import copy
import logging
import time

import torch

from vit_pruning import PruneConfig, count_flops, count_total_params
from vit_pruning.measure import collect_outputs, interleaved_latency, kl_divergence
from vit_pruning.objective import measure_latency_model
from vit_pruning.pipeline import Pruner, default_min_remaining, model_shape
from vit_pruning.sweep import prune_to_measured
from vit_pruning.config import LATENCY_TOLERANCE

from .common import digits_tensors, embedded_model, md_table, vit_shape

log = logging.getLogger(__name__)

RATIOS = (0.9, 0.8, 0.7, 0.6, 0.5)
PRECISION = 0.01  # every timing goes on (up to 10 x its rounds, or 10 s) until its ratios are known to +-0.01
SHAPES = ("vit-b16", "dinov2-b14", "swin-t", "embedded")


def _model(name: str):
    if name == "embedded":
        d = digits_tensors()
        return embedded_model().eval(), list(torch.split(d.x_train[:64], 32)), d.x_test
    return vit_shape(name), None, None


def run_model(name: str, ratios=RATIOS, batches=(8,), repeats: int = 10) -> list[dict]:
    base, calib, x_test = _model(name)
    ref = collect_outputs(base, [x_test]) if x_test is not None else None
    flops0, params0 = count_flops(base), count_total_params(base)
    widths = model_shape(base).widths
    mr = default_min_remaining(model_shape(base))[0]
    cfg = PruneConfig(min_remaining=mr)
    flop_pruner = Pruner(base, calib, PruneConfig(min_remaining=mr, objective="flops"))
    param_pruner = Pruner(base, calib, cfg)
    flop_models = {r: flop_pruner.prune(round(1 - r, 12), copy.deepcopy(base)) for r in ratios}
    rows = []
    for b in batches:
        t0 = time.perf_counter()
        lat = measure_latency_model(base, batch_size=b, align=int(param_pruner.cfg.align),
                                    min_remaining=mr)
        lat_s = time.perf_counter() - t0
        lat_pruner = Pruner(base, calib, PruneConfig(min_remaining=mr, objective="latency",
                                                     latency_model=lat))
        def measure(model, b=b) -> float:
            return interleaved_latency({"base": base, "pruned": model}, b, repeats, warmup=2,
                                       precision=PRECISION).ratio["pruned"]
        for r in ratios:
            try:  # what a --target-latency run does: plan, time, plan again if it misses
                lat_model, lat_res, tries = prune_to_measured(lat_pruner, r, measure, LATENCY_TOLERANCE)
            except ValueError as exc:
                log.info("%s b%d R=%g: %s", name, b, r, exc)
                rows.append({"model": name, "batch": b, "asked": r, "error": str(exc)})
                continue
            par_model, par_res = param_pruner.prune(lat_res.achieved_sparsity, copy.deepcopy(base))
            flop_model, flop_res = flop_models[r]
            comp = interleaved_latency({"base": base, "latency": lat_model, "params": par_model,
                                        "flops": flop_model}, b, repeats, warmup=2,
                                       precision=PRECISION)
            row = {"model": name, "batch": b, "asked": r, "latency_model_s": lat_s,
                   "tries": [(t.measures["predicted_ratio"], t.measures["measured_ratio"],
                              bool(t.measures.get("chosen"))) for t in tries],
                   "predicted": lat_res.objective_ratio,
                   "measured": comp.ratio["latency"],
                   "iqr": (comp.ratio_q1["latency"], comp.ratio_q3["latency"]),
                   "rounds": comp.repeats, "interval": comp.ratio_interval["latency"],
                   "structure": _structure(lat_res, widths),
                   "param_ratio": count_total_params(lat_model) / params0,
                   "flop_ratio": count_flops(lat_model) / flops0,
                   "params_run": comp.ratio["params"], "params_iqr": (comp.ratio_q1["params"],
                                                                      comp.ratio_q3["params"]),
                   "params_structure": _structure(par_res, widths),
                   "flops_asked_measured": count_flops(flop_model) / flops0,
                   "flops_run": comp.ratio["flops"]}
            if ref is not None:
                row["kl_latency"] = kl_divergence(collect_outputs(lat_model, [x_test]), ref)
                row["kl_params"] = kl_divergence(collect_outputs(par_model, [x_test]), ref)
            rows.append(row)
            log.info("%s b%d R=%g: predicted %.3f measured %.3f (params run %.3f)", name, b, r,
                     row["predicted"], row["measured"], row["params_run"])
    return rows


def _structure(res, widths) -> str:
    """"-2 blocks -6 heads, MLP 1536": the depth units and heads removed and the kept MLP
    widths."""
    gone = set(res.plan.removed_blocks)
    kept = sorted({w - n for i, (w, n) in enumerate(zip(widths, res.neurons_removed)) if i not in gone})
    count, att = len(res.depth_order), len(res.plan.attention_indices)
    mixed = f" -{att} attention" if att else ""
    mixed += f" -{sum(res.plan.heads_to_prune)} heads" if res.plan.removes_heads else ""
    return f"-{count} {res.plan.unit}{'s' if count != 1 else ''}{mixed}, MLP {'/'.join(map(str, kept))}"


def run(smoke: bool = False) -> dict:
    if smoke:
        return {"rows": run_model("embedded", (0.8, 0.6), (1,), repeats=2), "repeats": 2}
    rows = []
    for name in SHAPES:  # batch 8 on every model, batch 1 too on the embedded one (the goals')
        rows += run_model(name, batches=(1, 8) if name == "embedded" else (8,))
    return {"rows": rows, "repeats": 10}


def table(res: dict) -> str:
    out = []
    rows = []
    for r in res["rows"]:
        if "error" in r:
            rows.append([r["model"], r["batch"], f"{r['asked']:g}", "", r["error"], "", "", "", "", "", ""])
            continue
        kl = f"{r['kl_latency']:.3g} / {r['kl_params']:.3g}" if "kl_latency" in r else ""
        rows.append([r["model"], r["batch"], f"{r['asked']:g}",
                     "; ".join(f"{p:.3f}: {m:.3f}" + (" (kept)" if kept and len(r["tries"]) > 1 else "")
                               for p, m, kept in r["tries"]),
                     f"**{r['measured']:.3f}** [{r['iqr'][0]:.3f}, {r['iqr'][1]:.3f}]"
                     + (f", {r['rounds']} rounds" if "rounds" in r else "")
                     + (f", +-{(r['interval'][1] - r['interval'][0]) / 2:.3f}" if "interval" in r else ""),
                     f"{abs(r['measured'] - r['asked']):.3f}", r["structure"],
                     f"{r['param_ratio']:.3f} / {r['flop_ratio']:.3f}",
                     f"{r['params_run']:.3f} [{r['params_iqr'][0]:.3f}, {r['params_iqr'][1]:.3f}]",
                     f"{r['flops_asked_measured']:.4f}: {r['flops_run']:.3f}", kl])
    out.append(md_table(["model", "batch", "R asked",
                         "each plan: predicted: measured (timed against the baseline alone; "
                         "planned again while it missed by more than 0.01)",
                         "measured latency ratio of the model kept [quartiles], rounds, +- half its 95% interval",
                         "miss", "latency-target structure", "its param / FLOP ratio",
                         "param target, same params: latency", "FLOP target R: FLOP ratio, latency",
                         "KL: latency target / param target, same params"], rows))
    return "\n".join(out)
