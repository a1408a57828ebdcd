"""Target error |achieved - target| over targets 0.01..0.80 on ViT-S/16, ViT-B/16, ViT-L/16,
DINOv2-B/14 and Swin-T shapes (meta device: exact counts, no memory) and the embedded digits
ViT, ours vs the seed's formula planner. Swin's neurons differ in size by stage (193 to 1537
parameters on Swin-T): its plans land within half a group of the smallest neurons that still
have room, at most half of the largest ("one neuron" is the largest). `ours default` is the tool's default: widths aligned to `--align auto` (8 on
the ViT shapes, 4 on the embedded model) with `--width-policy auto` (one width for every
surviving block when that misses by at most 0.1 pp); `ours --align 1` is exact to one neuron.
"plain" is the share of targets whose pruned model saves as a plain transformers folder (one
MLP width that the config can state, no attention removed: block unit only; DINOv2 states its
width as an integer `mlp_ratio` in transformers 5.x, so a DINOv2 saves plain there only when its
MLPs keep their width).

The seed's planner as ANCHORS.md describes it: N = round(B * s ** (P_mlp / (alpha * P_attn)))
attention sublayers (alpha = 1.5, s = target), then one uniform K for every block from the
remaining budget, clamped to [0, I - min_remaining], plus a local search of K +- 3."""
from __future__ import annotations

import copy

import numpy as np

from vit_pruning.modeling_vit_pruning import set_config_width
from vit_pruning.pipeline import model_shape
from vit_pruning.planner import default_align, make_plan, max_feasible_target

from .common import embedded_model, md_table, vit_shape

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


def _model(name: str):
    return embedded_model() if name == "embedded" else vit_shape(name, meta=True)


def run(targets=None, names=("vit-s16", "vit-b16", "vit-l16", "dinov2-b14", "swin-t", "embedded")) -> dict:
    targets = targets if targets is not None else [round(t, 2) for t in np.arange(0.01, 0.805, 0.01)]
    out = {}
    for name in names:
        model = _model(name)
        shape = model_shape(model)
        mr = min(MIN_REMAINING, max(shape.widths) // 4)
        align = default_align(shape)
        variants = {f"ours default, align {align} ({u})": (u, align, "auto") for u in ("block", "attention")}
        variants.update({f"ours --align 1 ({u})": (u, 1, "per-block") for u in ("block", "attention")})
        errs = {k: [] for k in variants}
        plain = {k: 0 for k in variants}
        for t in targets:
            for key, (unit, a, policy) in variants.items():
                if t <= max_feasible_target(shape, unit, mr, a):
                    plan = make_plan(shape, t, unit, mr, align=a, width_policy=policy)
                    errs[key].append(abs(plan.predicted_sparsity - t))
                    plain[key] += (plan.uniform_width is not None
                                   and (unit == "block" or not plan.blocks_to_prune)
                                   and set_config_width(copy.deepcopy(model.config), plan.uniform_width))
        if name != "embedded":
            errs["seed planner"] = [abs(1 - seed_planner_params_after(shape, t) / shape.total_params - t)
                                    for t in targets]
        out[name] = {"neuron": shape.neuron_params / shape.total_params, "align": align,
                     "targets": len(targets), "errors": errs, "plain": plain}
    return out


def table(results: dict) -> str:
    rows = []
    for name, r in results.items():
        for method, e in r["errors"].items():
            exact = "align 1" in method or method == "seed planner"
            bound = r["neuron"] if exact else max(r["neuron"] * r["align"] / 2, 1e-3)
            within = max(e) <= bound
            plain = f"{100 * r['plain'][method] / len(e):.0f}%" if method in r["plain"] else "-"
            rows.append([name, method, len(e), f"{100 * max(e):.4f}", f"{100 * float(np.mean(e)):.4f}",
                         f"{100 * r['neuron']:.4f}", "yes" if within else "no",
                         "yes" if max(e) <= 1e-3 else "no", plain])
    return md_table(["shape", "planner", "targets", "max error (points)", "mean error (points)",
                     "one neuron (points)", "within its guarantee (align 1: one neuron; default: half a group or 0.1 pp)",
                     "within 0.1 pp", "plain"], rows)
