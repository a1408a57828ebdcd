"""Distillation on several processes: what data parallelism costs on this CPU.

One distillation run three ways on the same global batch (32 rows per step): one process with 2
torch threads, and two processes of one thread each under `torchrun` (gloo), each on its own
shard of the inputs with gradients averaged (`vit_pruning.distill` on accelerate). Samples per
second count the rows of every process over the distillation's wall time (teacher outputs
included); the held-out loss is the distillation loss on the checks (summed over processes) at
the last step. Rows: the embedded digits ViT at target 0.7 (`blocks`, 1,437 train images, the
calibration images as checks), all-MiniLM-L6-v2 at 0.3 (`blocks layers`, 3,000 docstring
sentences, 512 documentation sentences as checks).

Each run is `python -m bench.distill_scale <model> <steps>` in a fresh process (under torchrun
for two), so thread settings and process start-up are what a user gets. This machine's speed
drifts by up to 30% between minutes, so the two settings run in 3 interleaved pairs (one, two;
two, one; one, two): the table gives each setting's median and the median of the 3 pairs'
ratios, with their range.

Then the distill table's digits rows at 0.7 (every variant, 1,000 steps, one process) through
this loop, against the same rows in docs/bench/distill.md (the table of record); the MiniLM
rows within the 10-minute budget are the distill_budget part's table. Seconds compare only
on one host: the record's first line names the one it ran on.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

STEPS = {"digits": 300, "minilm": 150}
PAIRS = 3
GOAL_TARGET, GOAL_STEPS = 0.7, 1000  # the distill table's digits goal row
RECORD = "docs/bench/distill.md"


def _inputs(name: str):
    """(teacher, pruned student, distill inputs, check inputs, DistillConfig options)."""
    import copy
    import random

    import torch

    from .common import calibration, digits_tensors, embedded_model
    from .methods import prune_ours
    if name == "digits":
        d = digits_tensors()
        base = embedded_model()
        calib, _ = calibration(d, 0)
        pruned = copy.deepcopy(base)
        result = prune_ours(pruned, 0.7, calib, 96)
        return base, pruned, list(torch.split(d.x_train, 256)), calib, {"train": "blocks", "lr": 1e-3}, result
    from vit_pruning.batches import take_inputs
    from vit_pruning.text import python_docstring_sentences, tokenize

    from . import text, text_data
    (base, tok), split = text._minilm(), text_data.split(512, 512)
    calib = take_inputs(tokenize(tok, split.calibration))
    used = set(split.calibration) | set(split.evaluation)
    pool = random.Random(0).sample(python_docstring_sentences(), 3000)
    checks = take_inputs(tokenize(tok, [t for t in text_data.sentences() if t not in used][:512]))
    pruned = copy.deepcopy(base)
    result = prune_ours(pruned, 0.3, calib, text.MIN_REMAINING)
    return (base, pruned, tokenize(tok, pool, 64, by_length=True), checks,
            {"train": "blocks", "lr": 1e-3, "match": "layers"}, result)


def worker(name: str, steps: int) -> None:
    """One run (one process of it under torchrun); the main process prints one JSON line."""
    from vit_pruning.accel import is_main
    from vit_pruning.distillation import DistillConfig, distill, pruned_layers
    base, pruned, inputs, checks, kw, result = _inputs(name)
    if kw.get("match") == "layers":
        kw["layers"] = tuple(pruned_layers(result))
    res = distill(pruned, base, inputs, config=DistillConfig(steps=steps, batch_size=32, **kw),
                  check_inputs=checks)
    if is_main():
        print(json.dumps({"seconds": res.seconds, "rows": steps * 32, "processes": res.processes,
                          "heldout": res.heldout, "kept": res.kept_step}))


def _run(name: str, steps: int, processes: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // processes)}
    if processes == 1:
        cmd = [sys.executable, "-m", "bench.distill_scale", name, str(steps)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "-m", "bench.distill_scale", name, str(steps)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]
    rec = json.loads(line)
    rec.update(name=name, procs=processes, threads=2 // processes, wall=time.perf_counter() - t0,
               rate=rec["rows"] / rec["seconds"])
    return rec


def run(smoke: bool = False) -> dict:
    names = ("digits",) if smoke else ("digits", "minilm")
    rows = []
    for name in names:
        steps = 20 if smoke else STEPS[name]
        for k in range(1 if smoke else PAIRS):
            pair = [_run(name, steps, p) for p in ((1, 2) if k % 2 == 0 else (2, 1))]
            for r in pair:
                r["pair"] = k
            rows += pair
    out = {"rows": rows}
    if not smoke:
        from .distillation import run_digits
        out["digits"] = run_digits((GOAL_TARGET,), GOAL_STEPS)
    return out


def table(res: dict) -> str:
    from .common import md_table
    from statistics import median
    by: dict = {}
    for r in res["rows"]:
        by.setdefault(r["name"], {}).setdefault(r["procs"], []).append(r)
    rows = []
    for name, runs in by.items():
        ones = {r.get("pair", 0): r for r in runs[1]}
        ratios = [r["rate"] / ones[r.get("pair", 0)]["rate"] for r in runs[2]]
        last1 = median(_last(r) for r in runs[1])
        for procs, rs in sorted(runs.items()):
            last = median(_last(r) for r in rs)
            spread = (f"{median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
                      if procs == 2 else "1.00")
            rows.append([name, f"{procs} x {rs[0]['threads']} thread(s)", rs[0]["rows"] // 32,
                         f"{median(r['seconds'] for r in rs):.1f}",
                         f"{median(r['rate'] for r in rs):.1f}", spread, f"{last:.4g}",
                         f"{100 * (last - last1) / last1:+.1f}%"])
    out = md_table(["model", "processes", "steps", "distill seconds (median)",
                    "samples/s (median)", "x one process (median of pairs, range)",
                    "held-out loss, last check (median)", "vs one process"], rows)
    if res.get("digits"):
        out += "\n\n" + goal_rows(res["digits"])
    return out


def _recorded(target: float) -> dict[str, tuple[float, float, str]]:
    """method -> (KL, top-1, seconds) of the digits rows at `target` in the table of record."""
    from pathlib import Path
    rows = {}
    for line in Path(RECORD).read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] == f"{target:g}":  # the digits table's 6 columns
            rows.setdefault(cells[1], (float(cells[2]), float(cells[3]), cells[4]))
    return rows


def goal_rows(digits: list[dict]) -> str:
    """This run's digits rows beside the table of record's."""
    from .common import md_table
    old = _recorded(GOAL_TARGET)
    rows = []
    for r in digits:
        kl0, top0, sec0 = old.get(r["method"], (None, None, ""))
        rows.append([r["method"], f"{r['kl']:.4g}", "" if kl0 is None else f"{kl0:.4g}",
                     "" if kl0 is None else f"{100 * (r['kl'] - kl0) / kl0:+.1f}%",
                     f"{r['top1']:.4f}", "" if top0 is None else f"{top0:.4f}",
                     f"{r['seconds']:.1f}", sec0])
    return "\n".join([f"Digits at {GOAL_TARGET:g}, {GOAL_STEPS} steps, batch 64, one process: this "
                      f"loop against {RECORD}:", "",
                      md_table(["method", "KL to unpruned", "KL, table of record", "change",
                                "top-1", "top-1, table of record", "seconds",
                                "seconds, table of record"], rows)])


def _last(run: dict) -> float:
    """The held-out loss at a run's last check."""
    return run["heldout"][max(run["heldout"], key=int)]


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]))
