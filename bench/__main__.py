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
import platform
import sys
import time
from pathlib import Path

import torch

from . import cost, fidelity, gpu, onnx_speed, speed, target_error, text
from .common import embedded_model
from vit_pruning import count_total_params
from vit_pruning.report import versions

PARTS = ("target_error", "fidelity", "speed", "onnx", "gpu", "cost", "text")


def machine() -> str:
    import os
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, torch threads "
            f"{torch.get_num_threads()}, {platform.system()} {platform.release()}")


def run_target_error(smoke: bool) -> str:
    res = target_error.run([0.05, 0.25, 0.5] if smoke else None,
                           ("vit-b16",) if smoke else ("vit-s16", "vit-b16", "vit-l16", "embedded"))
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
    res = speed.run(targets=(0.3,) if smoke else (0.1, 0.2, 0.3, 0.4, 0.5),
                    shape="tiny" if smoke else "vit-b16", batches=(1,) if smoke else (1, 8),
                    repeats=2 if smoke else 10)
    return "\n".join(["## Speed (ViT-B/16 shape, CPU)", "", speed.__doc__.strip(), "",
                      f"Threads: {res['threads']}, rounds: {res['repeats']}.", "", speed.table(res), "",
                      "### MLP width alignment", "", speed.width_alignment(repeats=3 if smoke else 12), ""])


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


def run_text(smoke: bool) -> str:
    if smoke:
        res = text.run(targets=(0.1, 0.3), methods=("ours", "seed", "tp-magnitude", "random"),
                       ideas={}, n_calib=32, n_eval=32, smoke=True, repeats=2)
    else:
        res = text.run()
    return "\n".join(["## A real pretrained transformer: all-MiniLM-L6-v2 (text)", "",
                      text.__doc__.strip(), "", "Goals for `ours` (the tool's default):", "",
                      text.goals(res), "", text.tables(res), ""])


RUNNERS = {"target_error": run_target_error, "fidelity": run_fidelity, "speed": run_speed,
           "onnx": run_onnx, "gpu": run_gpu, "cost": run_cost, "text": run_text}
DOC = Path("docs/benchmarks.md")
PARTS_DIR = Path("docs/bench")
HEADER = """# Benchmarks

Every table below was produced by the command in its first line (`python -m bench` runs them
all, about 45 minutes on a 2-core CPU: fidelity 5, speed 4, cost 12, text 22; it assembles
this file from `docs/bench/*.md`; `pip install -r bench/requirements.txt -r
bench/requirements-text.txt` first). `python -m bench --smoke` is the seconds-long version CI
runs (its text part uses a tiny random BERT and needs no download).
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny settings for CI (seconds)")
    ap.add_argument("--only", choices=PARTS, action="append", help="run only these parts")
    ap.add_argument("--out", type=Path, default=None,
                    help="write the sections to this file instead of docs/ (with --smoke: nothing "
                         "is written unless --out is given)")
    args = ap.parse_args(argv)
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
        sections[part] = (f"_Produced by `python -m bench --only {part}` on "
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
