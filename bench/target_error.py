"""Target error |achieved - target| over targets 0.01..0.80 on ViT-S/16, ViT-B/16, ViT-L/16
shapes (meta device: exact counts, no memory), ours vs the seed's formula planner.

The seed's planner as ANCHORS.md describes it: N = round(B * s ** (P_mlp / (alpha * P_attn)))
attention sublayers (alpha = 1.5, s = target), then one uniform K for every block from the
remaining budget, clamped to [0, I - min_remaining], plus a local search of K +- 3."""
from __future__ import annotations

import numpy as np

from vit_pruning.pipeline import model_shape
from vit_pruning.planner import make_plan, max_feasible_target

from .common import md_table, vit_shape

MIN_REMAINING = 512


def seed_planner_params_after(shape, target: float, alpha: float = 1.5) -> int:
    p_attn = max(shape.attention_params)
    p_mlp = max(shape.widths) * shape.neuron_params
    b = shape.num_blocks
    n = min(b, int(round(b * target ** (p_mlp / (alpha * p_attn)))))
    goal = target * shape.total_params
    cap = max(shape.widths) - MIN_REMAINING
    k0 = int(round((goal - n * p_attn) / (b * shape.neuron_params)))
    best = None
    for k in range(k0 - 3, k0 + 4):
        k = min(max(k, 0), cap)
        removed = n * p_attn + k * b * shape.neuron_params
        if best is None or abs(removed - goal) < abs(best - goal):
            best = removed
    return shape.total_params - best


def run(targets=None, names=("vit-s16", "vit-b16", "vit-l16")) -> dict:
    targets = targets if targets is not None else [round(t, 2) for t in np.arange(0.01, 0.805, 0.01)]
    out = {}
    for name in names:
        shape = model_shape(vit_shape(name, meta=True))
        bound = shape.neuron_params / shape.total_params
        errs = {"ours (block)": [], "ours (attention)": [], "seed planner": []}
        for t in targets:
            for unit in ("block", "attention"):
                if t <= max_feasible_target(shape, unit, MIN_REMAINING):
                    errs[f"ours ({unit})"].append(abs(make_plan(shape, t, unit, MIN_REMAINING).predicted_sparsity - t))
            errs["seed planner"].append(abs(1 - seed_planner_params_after(shape, t) / shape.total_params - t))
        out[name] = {"bound": bound, "targets": len(targets), "errors": errs}
    return out


def table(results: dict) -> str:
    rows = []
    for name, r in results.items():
        for method, e in r["errors"].items():
            rows.append([name, method, len(e), f"{100 * max(e):.4f}", f"{100 * float(np.mean(e)):.4f}",
                         f"{100 * r['bound']:.4f}", "yes" if max(e) <= r["bound"] else "no"])
    return md_table(["shape", "planner", "targets", "max error (points)", "mean error (points)",
                     "one neuron (points)", "within one neuron"], rows)
