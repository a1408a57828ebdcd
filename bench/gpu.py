"""Speed on a GPU: ViT-B/16 and ViT-L/16 shapes (random weights), targets 0.1..0.5, both depth
units, MLP widths aligned to 1 / 8 (the default) / 64, timed in fp32 and in bf16 autocast at
batch 1 and 64. Pruned without calibration data (speed depends on the shapes, not on which
neurons go). Each pruned model is timed back to back with its parent, interleaved, with CUDA
events (`vit_pruning.interleaved_latency`): latency ratio = median over rounds of
t(pruned) / t(unpruned); realization = latency reduction / FLOP reduction."""
from __future__ import annotations

import copy

import torch

from vit_pruning import PruneConfig, count_flops, count_total_params, interleaved_latency, prune_2ssp

from .common import md_table, vit_shape

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def run(smoke: bool = False, shapes=("vit-b16", "vit-l16"), targets=(0.1, 0.2, 0.3, 0.4, 0.5),
        units=("block", "attention"), aligns=(1, 8, 64), batches=(1, 64), repeats: int = 30,
        device: str = "cuda") -> dict:
    """`device` other than cuda only to try this script on a CPU before spending GPU time."""
    if smoke:
        shapes, targets, aligns, batches, repeats = ("tiny",), (0.3,), (1, 8), (1,), 3
    rows = []
    for name in shapes:
        base = vit_shape(name).to(device)
        base_params, base_flops = count_total_params(base), count_flops(base)
        mr = min(512, base.config.intermediate_size // 6)
        for unit in units:
            for t in targets:
                for align in aligns:
                    model = copy.deepcopy(base)
                    _, res = prune_2ssp(model, t, None, PruneConfig(unit=unit, min_remaining=mr, align=align))
                    flops = count_flops(model) / base_flops
                    for dname, dtype in DTYPES.items():
                        for b in batches:
                            comp = interleaved_latency({"base": base, "pruned": model}, b, repeats,
                                                       warmup=5, dtype=dtype)
                            lat = comp.ratio["pruned"]
                            rows.append({"shape": name, "unit": unit, "target": t, "align": align,
                                         "dtype": dname, "batch": b,
                                         "params": count_total_params(model) / base_params, "flops": flops,
                                         "latency": lat, "iqr": (comp.ratio_q1["pruned"], comp.ratio_q3["pruned"]),
                                         "base_ms": comp.median_ms["base"],
                                         "realization": (1 - lat) / (1 - flops),
                                         "uniform": res.plan.uniform_width})
                    del model
                    if device == "cuda":
                        torch.cuda.empty_cache()
        del base
    name = torch.cuda.get_device_name() if device == "cuda" else device
    return {"device": name, "torch": torch.__version__, "repeats": repeats,
            "rows": rows}


def header(res: dict) -> str:
    return f"GPU: {res['device']}, torch {res['torch']}, {res['repeats']} interleaved rounds per pair."


def table(res: dict) -> str:
    rows = [[r["shape"], r["unit"], r["target"], r["align"], r["dtype"], r["batch"], f"{r['params']:.3f}",
             f"{r['flops']:.3f}", f"{r['base_ms']:.2f}", f"{r['latency']:.3f} [{r['iqr'][0]:.2f}, {r['iqr'][1]:.2f}]",
             f"{r['realization']:.2f}", r["uniform"] or "per-block"] for r in res["rows"]]
    return md_table(["shape", "unit", "target", "align", "dtype", "batch", "param ratio", "FLOP ratio",
                     "unpruned ms", "latency ratio [IQR]", "realization", "MLP width"], rows)
