"""Several targets from one model (`vit_pruning.sweep`): what the shared work saves, and whether
any fidelity is traded for it.

Cost: the ViT-B/16 shape (random weights), 64 calibration images, targets 0.1..0.5, in one
process: one single-target `prune_2ssp` at 0.3, then one `sweep` over the five targets; wall
time and phases of each (the sweep's shared work is the unpruned trace and the greedy depth
order, computed once to the largest count any target needs; each target still runs its own split
search, neuron selection and stage 1). Five separate runs would cost about five single runs.

Fidelity: the embedded digits ViT (its 64 calibration images, KL of the logits on the test
split against the unpruned model): each sweep point against `prune_2ssp` run alone at that
target, and each achieved sparsity against the single run's.
"""
from __future__ import annotations

import copy
import logging
import time

import torch

from vit_pruning import PruneConfig, prune_2ssp
from vit_pruning.measure import collect_outputs, kl_divergence
from vit_pruning.pipeline import Pruner
from vit_pruning.sweep import sweep

from .common import digits_tensors, embedded_model, md_table, vit_shape

log = logging.getLogger("bench.sweep")

TARGETS = (0.1, 0.2, 0.3, 0.4, 0.5)
SINGLE = 0.3
CALIB = 64


def cost(shape: str = "vit-b16", calib: int = CALIB, targets=TARGETS) -> dict:
    torch.manual_seed(0)
    model = vit_shape(shape).eval()
    size = model.config.image_size
    x = list(torch.split(torch.randn(calib, 3, size, size, generator=torch.Generator().manual_seed(1)), 32))
    cfg = PruneConfig(min_remaining=min(512, model.config.intermediate_size // 6))
    t0 = time.perf_counter()
    _, single = prune_2ssp(copy.deepcopy(model), SINGLE, x, cfg)
    single_s = time.perf_counter() - t0
    log.info("cost: one target (%g) in %.1f s: %s", SINGLE, single_s, _phases(single.timings))
    t0 = time.perf_counter()
    pruner = Pruner(model, x, cfg)  # what vit_pruning.sweep runs, target by target (largest
    phases = {}  # first), to print each as it lands
    for t in sorted(targets, reverse=True):
        t1 = time.perf_counter()
        _, res = pruner.prune(t, copy.deepcopy(model))
        phases[str(t)] = res.timings
        log.info("cost: sweep target %g in %.1f s (%.1f s so far): %s", t, time.perf_counter() - t1,
                 time.perf_counter() - t0, _phases(res.timings))
    sweep_s = time.perf_counter() - t0
    return {"shape": shape, "calib": calib, "targets": list(targets), "single_s": single_s,
            "single_phases": single.timings, "sweep_s": sweep_s,
            "sweep_phases": {str(t): phases[str(t)] for t in targets}}


def _phases(timings: dict) -> str:
    return ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())


def fidelity(targets=TARGETS, calib: int = CALIB) -> list[dict]:
    base, digits = embedded_model().eval(), digits_tensors()
    x_cal = list(torch.split(digits.x_train[:calib], 32))
    ref = collect_outputs(base, [digits.x_test])
    cfg = PruneConfig()
    rows = []
    points = sweep(base, targets, x_cal, cfg)
    for t, (model, res) in zip(targets, points):
        alone, res_alone = prune_2ssp(copy.deepcopy(base), t, x_cal, cfg)
        rows.append({"target": t, "kl_sweep": kl_divergence(collect_outputs(model, [digits.x_test]), ref),
                     "kl_single": kl_divergence(collect_outputs(alone, [digits.x_test]), ref),
                     "achieved_sweep": res.achieved_sparsity,
                     "achieved_single": res_alone.achieved_sparsity,
                     "same_structure": res.depth_order == res_alone.depth_order
                     and res.neurons_removed == res_alone.neurons_removed})
    return rows


def run(smoke: bool = False) -> dict:
    if smoke:
        return {"cost": cost("tiny", 8, (0.1, 0.3)), "fidelity": fidelity((0.1, 0.3), 16)}
    return {"cost": cost(), "fidelity": fidelity()}


def tables(res: dict) -> str:
    c = res["cost"]
    shared = ("unpruned trace", "reference outputs")
    first = c["sweep_phases"][str(max(c["targets"]))]
    shared_s = sum(v for k, v in first.items() if k in shared)
    rows = [["one target (" + f"{SINGLE:g})", f"{c['single_s']:.1f}", "1.00",
             "; ".join(f"{k} {v:.1f}s" for k, v in c["single_phases"].items())],
            [f"{len(c['targets'])} targets, one sweep", f"{c['sweep_s']:.1f}",
             f"{c['sweep_s'] / c['single_s']:.2f}",
             f"shared: {shared_s:.1f}s; per target: " + "; ".join(
                 f"{t}: " + ", ".join(f"{k} {v:.1f}s" for k, v in ph.items() if k not in shared)
                 for t, ph in c["sweep_phases"].items())]]
    out = [f"Cost, {c['shape']} shape, {c['calib']} calibration images, targets "
           f"{', '.join(f'{t:g}' for t in c['targets'])}:", "",
           md_table(["run", "wall time (s)", "x one target", "phases"], rows), "",
           "Fidelity, embedded digits ViT (KL of the test-split logits to the unpruned model):", ""]
    frows = [[f"{r['target']:g}", f"{r['kl_sweep']:.3g}", f"{r['kl_single']:.3g}",
              f"{r['kl_sweep'] / r['kl_single']:.3f}" if r["kl_single"] else "",
              f"{r['achieved_sweep']:.4f}", f"{r['achieved_single']:.4f}",
              "yes" if r["same_structure"] else "no"] for r in res["fidelity"]]
    out.append(md_table(["target", "KL, sweep point", "KL, single run", "ratio",
                         "achieved, sweep", "achieved, single", "same depth units and widths"], frows))
    return "\n".join(out)
