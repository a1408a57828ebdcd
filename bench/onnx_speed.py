"""Does the cut survive deployment? ViT-B/16 shape (random weights), pruned with the default
options (block unit, aligned uniform widths: a plain transformers model) at targets 0.1..0.5,
exported to ONNX by `vit_pruning.export_onnx` and timed in onnxruntime on the CPU against the
unpruned model's export: one session per model, timed back to back in rounds (median of the
per-round ratios), batch 1 and 8. Realization = latency reduction / FLOP reduction."""
from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vit_pruning import PruneConfig, count_flops, count_total_params, export_onnx, prune_2ssp
from vit_pruning.measure import example_inputs

from .common import md_table, vit_shape


def _session(model, folder: Path, name: str):
    import onnxruntime as ort
    rec = export_onnx(model, folder / f"{name}.onnx")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(rec["path"], opts, providers=["CPUExecutionProvider"]), rec["max_abs_diff"]


def run(targets=(0.1, 0.2, 0.3, 0.4, 0.5), shape: str = "vit-b16", batches=(1, 8),
        repeats: int = 10) -> dict:
    base = vit_shape(shape)
    base_params, base_flops = count_total_params(base), count_flops(base)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base_sess, base_diff = _session(base, folder, "base")
        for t in targets:
            model = copy.deepcopy(base)
            mr = min(512, max(model.config.intermediate_size // 6, 1))
            _, res = prune_2ssp(model, t, None, PruneConfig(min_remaining=mr))
            sess, diff = _session(model, folder, f"t{t}")
            row = {"target": t, "params": count_total_params(model) / base_params,
                   "flops": count_flops(model) / base_flops, "max_abs_diff": max(diff, base_diff),
                   "uniform_width": res.plan.uniform_width}
            for b in batches:
                x = {"pixel_values": example_inputs(base, b)["pixel_values"].numpy()}
                for s in (base_sess, sess):
                    s.run(None, x)
                ratios = []
                for r in range(repeats):
                    times = {}
                    for key, s in ((("base", base_sess), ("pruned", sess)) if r % 2 == 0
                                   else (("pruned", sess), ("base", base_sess))):
                        t0 = time.perf_counter()
                        s.run(None, x)
                        times[key] = time.perf_counter() - t0
                    ratios.append(times["pruned"] / times["base"])
                row[f"latency_b{b}"] = statistics.median(ratios)
                row[f"realization_b{b}"] = (1 - row[f"latency_b{b}"]) / (1 - row["flops"])
            rows.append(row)
            del model, sess
    return {"shape": shape, "threads": torch.get_num_threads(), "repeats": repeats, "rows": rows}


def table(res: dict) -> str:
    keys = sorted({k[8:] for r in res["rows"] for k in r if k.startswith("latency_")})
    header = (["target", "param ratio", "FLOP ratio", "MLP width"] + [f"latency ratio {k}" for k in keys]
              + [f"realization {k}" for k in keys] + ["max abs diff ORT vs torch"])
    rows = [[r["target"], f"{r['params']:.3f}", f"{r['flops']:.3f}", r["uniform_width"]]
            + [f"{r['latency_' + k]:.3f}" for k in keys] + [f"{r['realization_' + k]:.2f}" for k in keys]
            + [f"{r['max_abs_diff']:.1e}"] for r in res["rows"]]
    return md_table(header, rows)
