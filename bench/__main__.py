"""Run every benchmark and write docs/benchmarks.md.

    python -m bench                 # full tables (about 45 minutes on a 2-core CPU)
    python -m bench --smoke         # seconds: every benchmark on tiny settings (CI)
    python -m bench --only fidelity --out /tmp/b.md
    python -m bench --only text     # needs pip install -r bench/requirements-text.txt
"""
from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

from . import (cost, distill_scale, distillation, families, fidelity, gpu, heads,
               latency_choice, onnx_speed, speed, speed_target, sweep, target_error, text,
               peers)
from .common import embedded_model
from vit_pruning import count_total_params
from vit_pruning.report import versions

PARTS = ("target_error", "fidelity", "families", "distill", "distill_budget", "speed", "onnx", "gpu",
         "cost", "sweep", "speed_target", "latency_choice", "distill_scale", "text", "heads", "heads_latency")


def machine() -> str:
    import os
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, torch threads "
            f"{torch.get_num_threads()}, {platform.system()} {platform.release()}")


def run_target_error(smoke: bool) -> str:
    res = target_error.run([0.05, 0.25, 0.5] if smoke else None,
                           ("vit-b16", "dinov2-b14", "swin-t") if smoke
                           else ("vit-s16", "vit-b16", "vit-l16", "dinov2-b14", "swin-t", "embedded"))
    return "\n".join(["## Target error (planner)", "", target_error.__doc__.strip(), "",
                      target_error.table(res), ""])


def run_fidelity(smoke: bool) -> str:
    targets = (0.3, 0.7) if smoke else (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    seeds = (0,) if smoke else (0, 1, 2)
    methods = ["ours", "seed", "2ssp-paper", "tp-magnitude", "random"] if smoke else None
    res = fidelity.run(targets, seeds, methods, retune=not smoke)
    base_params = count_total_params(embedded_model())
    return "\n".join(["## Fidelity and accuracy (embedded digits ViT)", "", fidelity.__doc__.strip(), "",
                      "Goals for `ours` (the tool's default) against the best other method:", "",
                      fidelity.goals(res), "", fidelity.tables(res, base_params), ""])


def run_speed(smoke: bool) -> str:
    kw = dict(targets=(0.3,) if smoke else (0.1, 0.2, 0.3, 0.4, 0.5),
              batches=(1,) if smoke else (1, 8), repeats=2 if smoke else 10)
    res = speed.run(shape="tiny" if smoke else "vit-b16", **kw)
    dino = speed.run(shape="tiny" if smoke else "dinov2-b14", **kw)
    swin = speed.run(shape="tiny" if smoke else "swin-t", **kw)
    return "\n".join(["## Speed (ViT-B/16, DINOv2-B/14 and Swin-T shapes, CPU)", "",
                      speed.__doc__.strip(), "",
                      f"Threads: {res['threads']}, rounds: {res['repeats']}.", "", "### ViT-B/16", "",
                      speed.table(res), "", "### DINOv2-B/14 (Dinov2Model, 224 px, layer scale)", "",
                      speed.table(dino), "", "### Swin-T (SwinForImageClassification, 224 px)", "",
                      speed.table(swin), "",
                      "### MLP width alignment", "", speed.width_alignment(repeats=3 if smoke else 12), ""])


def run_families(smoke: bool) -> str:
    res = families.run(targets=(0.2,) if smoke else (0.2, 0.4),
                       names=list(families.FAMILIES)[:3] if smoke else None)
    res["swin"] = families.swin_pairs(epochs=1 if smoke else 30)
    return "\n".join(["## Model families: the refit on each", "", families.__doc__.strip(), "",
                      families.tables(res), ""])


def run_distill(smoke: bool) -> str:
    steps = 30 if smoke else 1000
    digits = distillation.run_digits((0.7,) if smoke else (0.3, 0.4, 0.5, 0.6, 0.7), steps,
                                     ("blocks layers",) if smoke else distillation.DIGIT_ROWS)
    if smoke:
        text_rows = distillation.run_text((0.3,), 30, 64, ("blocks layers",), smoke=True)
    else:  # every target at 600 steps, then the 10-minute budget of the issue at 0.3 and 0.4
        text_rows = distillation.run_text((0.1, 0.2, 0.3, 0.4), 600, 3000)
        for target, long_steps in distillation.BUDGET_STEPS.items():
            text_rows += distillation.run_text((target,), long_steps, 12000, ("blocks layers",),
                                               one_shot=False)
    return "\n".join(["## Recovery by distillation", "", distillation.__doc__.strip(), "",
                      distillation.tables(digits, text_rows, steps), ""])


def run_distill_budget(smoke: bool) -> str:
    if smoke:
        rows = distillation.run_text((0.3,), 30, 64, ("blocks layers",), smoke=True,
                                     augment=2, min_remaining=32)
    else:
        rows = [r for target, steps in distillation.BUDGET_STEPS.items()
                for r in distillation.run_text((target,), steps, 12000, ("blocks layers",),
                                               augment=distillation.RECIPE_AUGMENT,
                                               min_remaining=distillation.RECIPE_MIN_REMAINING)]
    return "\n".join(["## Recovery by distillation: MiniLM within the 10-minute budget", "",
                      distillation.BUDGET_DOC.strip(), "", distillation.budget_table(rows), ""])


def run_heads(smoke: bool) -> str:
    return "\n".join(["## Attention heads as a unit", "", heads.__doc__.strip(), "",
                      heads.tables(heads.run(smoke)), ""])


def run_heads_latency(smoke: bool) -> str:
    return "\n".join(["## Attention heads at equal measured latency", "", heads.LATENCY_DOC, "",
                      heads.latency_table(heads.equal_latency(smoke)), ""])


def run_onnx(smoke: bool) -> str:
    res = onnx_speed.run(targets=(0.3,) if smoke else (0.1, 0.2, 0.3, 0.4, 0.5),
                         shape="tiny" if smoke else "vit-b16", batches=(1,) if smoke else (1, 8),
                         repeats=2 if smoke else 10)
    return "\n".join(["## Speed in onnxruntime (ViT-B/16 shape, CPU)", "", onnx_speed.__doc__.strip(), "",
                      f"Threads: {res['threads']}, rounds: {res['repeats']}.", "", onnx_speed.table(res), ""])


def run_gpu(smoke: bool) -> str:
    if not torch.cuda.is_available():
        return "## Speed on a GPU\n\nNo CUDA device here: `python -m bench --only gpu` needs one.\n"
    res = gpu.run(smoke=smoke)
    return "\n".join(["## Speed on a GPU", "", gpu.__doc__.strip(), "", gpu.header(res), "",
                      gpu.table(res), ""])


def run_cost(smoke: bool) -> str:
    res = cost.run("tiny" if smoke else "vit-b16", 8 if smoke else cost.CALIB)
    return "\n".join(["## Cost of pruning", "", cost.__doc__.strip(), "", cost.table(res), ""])


def run_sweep(smoke: bool) -> str:
    res = sweep.run(smoke=smoke)
    return "\n".join(["## Several targets in one run (sweep)", "", sweep.__doc__.strip(), "",
                      sweep.tables(res), ""])


def run_speed_target(smoke: bool) -> str:
    res = speed_target.run(smoke=smoke)
    return "\n".join(["## Asking for speed: FLOP and latency targets (CPU)", "",
                      speed_target.__doc__.strip(), "", f"Rounds: at least {res['repeats']}.", "",
                      speed_target.table(res), ""])


def run_latency_choice(smoke: bool) -> str:
    res = latency_choice.run(smoke=smoke)
    return "\n".join(["## Fidelity at equal latency: latency targets against the parameter-target curve", "",
                      latency_choice.__doc__.strip(), "", latency_choice.table(res), ""])


def run_distill_scale(smoke: bool) -> str:
    res = distill_scale.run(smoke=smoke)
    return "\n".join(["## Distillation on several processes (CPU)", "",
                      distill_scale.__doc__.strip(), "", distill_scale.table(res), ""])


def run_text(smoke: bool) -> str:
    if smoke:
        res = text.run(targets=(0.1, 0.3), methods=("ours", "seed", "tp-magnitude", "random"),
                       ideas={}, n_calib=32, n_eval=32, smoke=True, repeats=2)
    else:
        res = text.run()
    return "\n".join(["## A real pretrained transformer: all-MiniLM-L6-v2 (text)", "",
                      text.__doc__.strip(), "", "Goals for `ours` (the tool's default):", "",
                      text.goals(res), "", text.tables(res), ""])


RUNNERS = {"target_error": run_target_error, "fidelity": run_fidelity, "families": run_families,
           "distill": run_distill, "distill_budget": run_distill_budget,
           "speed": run_speed,
           "onnx": run_onnx, "heads": run_heads, "heads_latency": run_heads_latency, "gpu": run_gpu, "cost": run_cost, "sweep": run_sweep,
           "speed_target": run_speed_target, "latency_choice": run_latency_choice, "distill_scale": run_distill_scale, "text": run_text}
DOC = Path("docs/benchmarks.md")
PARTS_DIR = Path("docs/bench")
HEADER = """# Benchmarks

Every table below was produced by the command in its first line (`python -m bench` runs them
all, about an hour on a 2-core CPU; it assembles this file from `docs/bench/*.md`;
`pip install -r bench/requirements.txt -r bench/requirements-text.txt` first).
`python -m bench --smoke` is the seconds-long version CI runs (its text part uses a tiny random
BERT and needs no download). Each section names the machine and the library versions it ran with.

## Legend: what each row is

| row | what it is |
|---|---|
| `ours` | this tool's defaults: `vit_pruning.prune_2ssp` with `PruneConfig()` = whole-block depth unit, greedy depth selection by output KL (cosine for encoders), split between stages searched on held-out calibration images, uniform neurons per block, neuron selection `auto` (2SSP activation score or least-squares cost, whichever is better on held-out calibration images), least-squares refit of each pruned fc2 toward the unpruned model's block outputs, MLP widths aligned (`align="auto"`: 8, or 4 on the embedded model) with one width for every block when that misses the target by at most 0.1 pp |
| `ours (...)` | the same with the one named option changed (e.g. `ours (attention unit)` = `unit="attention"`, `ours (no compensation)` = `compensation="none"`, `ours (align 1)` = `align=1`, exact to one neuron) |
| `ours --align 1`, `ours default, align N` | planner rows of the target-error table: exact planning vs the default alignment |
| `ours + distill (...)` | `ours`, then `vit_pruning.distill` (label-free, teacher = the unpruned model) training the named parameters (`blocks`, `mlp`, ...) on the named targets (`tokens`: every token of a text encoder; `layers`: every kept block's hidden states too; neither: the output alone) |
| `seed` | the seed system's recipe as ANCHORS.md describes it: uniform K MLP neurons per block by the activation L2 score, attention bypass of the N blocks whose individual bypass costs least top-1 (a model copy per candidate), N = round(B * s ** (P_mlp / (1.5 * P_attn))); K set so the parameter count matches the other rows |
| `2ssp-paper` | the 2SSP paper (Sandri et al. 2025): uniform K by the 2SSP activation score, attention sublayers removed greedily by calibration cross-entropy, N from the paper's alpha formula (alpha 1.5) |
| `tp-magnitude`, `tp-taylor` | Torch-Pruning 1.6.1 (`torch-pruning==1.6.1`) MetaPruner on the MLP hidden channels only (fc1 outputs and the coupled fc2 inputs), `GroupMagnitudeImportance` (L2) or `GroupTaylorImportance` (gradients of calibration cross-entropy; for text encoders of an unsupervised SimCSE loss); no depth stage |
| `tp-heads` | Torch-Pruning 1.6.1's own head pruning, as its Hugging Face ViT example sets it up (`prune_num_heads=True`, `prune_head_dims=False`, group magnitude): a quarter of every block's heads and, in the same step, MLP hidden channels for the rest of the target; no depth stage, no refit |
| `textpruner` | TextPruner 1.1 (`pip install --no-deps textpruner==1.1.post2`: its metadata asks for numpy<1.22) `TransformerPruner`, 8 iterative rounds of gradient x weight importance on an unsupervised SimCSE loss, the same shape as `tp-heads`, no refit; it needs transformers 4.x (`prune_heads`), so under 5.x it runs in a child process on the interpreter named by `BENCH_TEXTPRUNER_PYTHON` (bench/peers.py) |
| `inc-retrain-free` | Intel Neural Compressor 2.6 (`neural-compressor==2.6`, numpy<2) retrain-free pruner (Kwon et al.'s mask search and mask rearrangement, no mask tuning) on the FFN neurons only (channel patterns: no heads), 8 rounds of squared mask gradients of an unsupervised SimCSE loss, our width-only plan's neurons per block, the masked neurons then removed; a child process on the interpreter named by `BENCH_INC_PYTHON` (bench/peers.py) |
| `random` | our planner's counts (alpha split), random neurons and random blocks |
| `seed head re-tune` | the seed's recovery (`--recover`): one epoch of head-only fine-tuning with labels |

Library versions are stated per section (torch, transformers, datasets, vit_pruning); the
benchmark environment pins torch 2.13.0+cpu and transformers 5.24.0 (`requirements.txt`).
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny settings for CI (seconds)")
    ap.add_argument("--only", choices=PARTS, action="append", help="run only these parts")
    ap.add_argument("--out", type=Path, default=None,
                    help="write the sections to this file instead of docs/ (with --smoke: nothing "
                         "is written unless --out is given)")
    ap.add_argument("--assemble", action="store_true",
                    help="only rebuild docs/benchmarks.md from docs/bench/*.md (after copying in a "
                         "section a run wrote with --out)")
    args = ap.parse_args(argv)
    from vit_pruning.measure import steady_cpu_allocator
    steady_cpu_allocator()  # this process is the bench's: every CPU timing with malloc's
    # thresholds fixed, as the command line times (a library call leaves them alone)
    if args.assemble:
        return assemble({})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("vit_pruning").setLevel(logging.WARNING)  # the benchmark's own lines only
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    parts = args.only or list(PARTS)
    smoke = args.smoke
    sections: dict[str, str] = {}
    for part in parts:
        t0 = time.perf_counter()
        body = RUNNERS[part](smoke)
        print(body)
        if part == "gpu" and not torch.cuda.is_available():
            continue  # said so above; the GPU table in docs stays as the last GPU run left it
        env = "".join(f"{p.env}={os.environ[p.env]} " for p in peers.PEERS.values()
                      if part == "heads" and os.environ.get(p.env))
        sections[part] = (f"_Produced by `{env}python -m bench --only {part}` on "
                          f"{_dt.date.today().isoformat()} ({time.perf_counter() - t0:.0f} s), "
                          f"machine: {machine()}; " + ", ".join(f"{k} {v}" for k, v in versions().items())
                          + "._\n\n" + body)
    if smoke and args.out is None:
        return 0
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n\n".join(sections.values()) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
        return 0
    return assemble(sections)


def assemble(sections: dict[str, str]) -> int:
    """Write each new section to docs/bench/<part>.md, then docs/benchmarks.md from them all."""
    PARTS_DIR.mkdir(parents=True, exist_ok=True)
    for part, body in sections.items():
        (PARTS_DIR / f"{part}.md").write_text(body + "\n", encoding="utf-8")
    found = [PARTS_DIR / f"{p}.md" for p in PARTS if (PARTS_DIR / f"{p}.md").exists()]
    doc = [HEADER] + [f.read_text(encoding="utf-8") for f in found]
    DOC.write_text("\n".join(doc), encoding="utf-8")
    print(f"wrote {DOC} from {', '.join(str(f) for f in found)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
