"""Run every benchmark and write docs/benchmarks.md.

    python -m bench                 # full tables (about 20 minutes on a 2-core CPU)
    python -m bench --smoke         # seconds: every benchmark on tiny settings (CI)
    python -m bench --only fidelity --out /tmp/b.md
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

from . import cost, fidelity, speed, target_error
from .common import digits_tensors, embedded_model
from vit_pruning import count_total_params
from vit_pruning.report import versions

PARTS = ("target_error", "fidelity", "speed", "cost")


def machine() -> str:
    import os
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, torch threads "
            f"{torch.get_num_threads()}, {platform.system()} {platform.release()}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny settings for CI (seconds)")
    ap.add_argument("--only", choices=PARTS, action="append", help="run only these parts")
    ap.add_argument("--out", type=Path, default=None,
                    help="Markdown output (default docs/benchmarks.md; with --smoke nothing is written)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("vit_pruning").setLevel(logging.WARNING)  # the benchmark's own lines only
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    parts = args.only or list(PARTS)
    smoke = args.smoke
    t_start = time.perf_counter()
    cmd = "python -m bench" + ("" if not args.only else " " + " ".join(f"--only {p}" for p in args.only))
    doc = [f"# Benchmarks", "", f"Produced by `{cmd}` on {_dt.date.today().isoformat()}, machine: "
           f"{machine()}; versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()) + ".", ""]
    if "target_error" in parts:
        res = target_error.run([0.05, 0.25, 0.5] if smoke else None,
                               ("vit-b16",) if smoke else ("vit-s16", "vit-b16", "vit-l16"))
        doc += ["## Target error (planner)", "", target_error.__doc__.strip(), "", target_error.table(res), ""]
        print(target_error.table(res))
    if "fidelity" in parts:
        targets = (0.3, 0.7) if smoke else (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
        seeds = (0,) if smoke else (0, 1, 2)
        methods = ["ours", "seed", "2ssp-paper", "tp-magnitude", "random"] if smoke else None
        res = fidelity.run(targets, seeds, methods, retune=not smoke)
        base_params = count_total_params(embedded_model())
        doc += ["## Fidelity and accuracy (embedded digits ViT)", "", fidelity.__doc__.strip(), "",
                "Goals for `ours` (the tool's default) against the other methods' best:", "",
                fidelity.goals(res), "", fidelity.tables(res, base_params), ""]
        print(fidelity.goals(res))
    if "speed" in parts:
        res = speed.run(targets=(0.3,) if smoke else (0.1, 0.2, 0.3, 0.4, 0.5),
                        shape="tiny" if smoke else "vit-b16", batches=(1,) if smoke else (1, 8),
                        repeats=2 if smoke else 5)
        doc += ["## Speed (ViT-B/16 shape, CPU)", "", speed.__doc__.strip(), "",
                f"Threads: {res['threads']}, timed repeats: {res['repeats']} (interleaved).", "",
                speed.table(res), "", "### MLP width alignment", "",
                speed.width_alignment(repeats=3 if smoke else 12), ""]
        print(speed.table(res))
    if "cost" in parts:
        res = cost.run("tiny" if smoke else "vit-b16", 8 if smoke else cost.CALIB)
        doc += ["## Cost of pruning", "", cost.__doc__.strip(), "", cost.table(res), ""]
        print(cost.table(res))
    doc += [f"Total benchmark wall time: {time.perf_counter() - t_start:.0f} s.", ""]
    out = args.out or (None if smoke else Path("docs/benchmarks.md"))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(doc), encoding="utf-8")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
