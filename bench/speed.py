"""Does the parameter cut turn into speed? On the ViT-B/16, DINOv2-B/14 and Swin-T shapes
(random weights), both depth units, targets 0.1..0.5: parameter, FLOP and CPU latency ratios at batch 1 and 8 (baseline and
pruned timed back to back in one process; the ratio is the median over rounds of
t(pruned) / t(baseline)), and realization = latency reduction / FLOP reduction.
Plus the MLP-width alignment check: time of one MLP at odd vs aligned widths."""
from __future__ import annotations

import copy
import statistics
import time

import torch

from vit_pruning import PruneConfig, count_flops, count_total_params, prune_2ssp
from vit_pruning.measure import interleaved_latency
from vit_pruning.pipeline import model_shape

from .common import md_table, vit_shape


def latency_ratio(base, pruned, batch: int, repeats: int, seq_len: int = 128) -> float:
    """Median over rounds of t(pruned) / t(baseline), the two timed back to back in each round
    (so slow drifts of the machine cancel). Images at the config's size, or `seq_len` tokens."""
    return interleaved_latency({"base": base, "pruned": pruned}, batch, repeats, warmup=1,
                               seq_len=seq_len).ratio["pruned"]


def run(targets=(0.1, 0.2, 0.3, 0.4, 0.5), units=("block", "attention"), shape="vit-b16",
        batches=(1, 8), repeats: int = 10) -> dict:
    base = vit_shape(shape)
    base_params, base_flops = count_total_params(base), count_flops(base)
    rows = []
    for unit in units:
        for t in targets:
            model = copy.deepcopy(base)
            # data-free plan (weights are random): the shapes, not the choices, set the speed
            mr = min(512, max(max(model_shape(model).widths) // 6, 1))
            prune_2ssp(model, t, None, PruneConfig(unit=unit, min_remaining=mr))
            row = {"unit": unit, "target": t, "params": count_total_params(model) / base_params,
                   "flops": count_flops(model) / base_flops}
            for b in batches:
                row[f"latency_b{b}"] = latency_ratio(base, model, b, repeats)
                row[f"realization_b{b}"] = (1 - row[f"latency_b{b}"]) / (1 - row["flops"])
            rows.append(row)
            del model
    return {"shape": shape, "threads": torch.get_num_threads(), "repeats": repeats, "rows": rows}


def table(res: dict) -> str:
    header = ["unit", "target", "param ratio", "FLOP ratio"]
    keys = sorted({k for r in res["rows"] for k in r if k.startswith("latency_b")})
    header += [f"latency ratio b{k[9:]}" for k in keys] + [f"realization b{k[9:]}" for k in keys]
    rows = [[r["unit"], r["target"], f"{r['params']:.3f}", f"{r['flops']:.3f}"]
            + [f"{r[k]:.3f}" for k in keys] + [f"{r['realization_b' + k[9:]]:.2f}" for k in keys]
            for r in res["rows"]]
    return md_table(header, rows)


@torch.no_grad()
def width_alignment(widths=(2048, 2047, 2041, 2040, 1536, 1537, 1531, 1528), hidden: int = 768,
                    tokens: int = 8 * 197, repeats: int = 12) -> str:
    """Median time of fc2(gelu(fc1(x))) per width, interleaved; per-neuron cost shows any
    penalty of widths that are not multiples of 8."""
    x = torch.randn(tokens, hidden)
    mods = {w: (torch.nn.Linear(hidden, w), torch.nn.Linear(w, hidden)) for w in widths}
    times = {w: [] for w in widths}
    for r in range(repeats):
        for w, (fc1, fc2) in mods.items():
            t0 = time.perf_counter()
            fc2(torch.nn.functional.gelu(fc1(x)))
            if r >= 2:
                times[w].append(time.perf_counter() - t0)
    rows = [[w, "yes" if w % 8 == 0 else "no", f"{statistics.median(times[w]) * 1e3:.2f}",
             f"{statistics.median(times[w]) * 1e6 / w:.2f}"] for w in widths]
    return md_table(["MLP width", "multiple of 8", "ms per MLP (8x197 tokens)", "µs per neuron"], rows)
