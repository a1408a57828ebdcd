"""Run a fixed set of CLI cases on the embedded model and keep what a restructuring must not
change: plans, kept neurons, removed units, achieved sparsity and fidelity (latency and clock
times left out: they are measurements of the machine, not of the code).

    python scripts/behaviour_snapshot.py run OUT_DIR [FLAG ...]  # one JSON per case, and dry-run
                                                               # text; FLAGs added to every case
    python scripts/behaviour_snapshot.py compare DIR_A DIR_B  # every difference beyond float noise

Used to compare a commit with the one before it, case by case (DEVELOPERS.md: a restructuring
changes no result). Every case is a command a user could type; each runs in its own process.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

QUICK = ["--model", "embedded", "--cifar-test-pct", "1", "--eval-batches", "4",
         "--latency-precision", "0", "--latency-repeats", "2", "--quiet"]
CASES = {
    "single": ["--target", "0.3"],
    "attention": ["--target", "0.5", "--depth-unit", "attention"],
    "auto_unit_lsq": ["--target", "0.4", "--depth-unit", "auto", "--neuron-selection", "lsq"],
    "align1": ["--target", "0.3", "--align", "1"],
    "global_bi": ["--target", "0.35", "--allocation", "global", "--depth-method", "bi"],
    "s1": ["--target", "0.2", "--stage", "s1"],
    "s2": ["--target", "0.3", "--stage", "s2"],
    "split2": ["--target", "0.45", "--split", "2"],
    "several": ["--target", "0.2,0.4,0.6"],
    "budget_kl": ["--max-kl", "0.002", "--target-resolution", "0.05"],
    "budget_acc": ["--max-accuracy-drop", "1", "--target-resolution", "0.05"],
    "flops": ["--target-flops", "0.6"],
    "flops_several": ["--target-flops", "0.5,0.8"],
    "distill": ["--target", "0.5", "--distill-steps", "4", "--distill-size", "64",
                "--distill-batch-size", "16", "--recover", "--calib-size", "32"],
    "head": ["--target", "0.3", "--replace-classifier", "--do-finetune", "--freeze-backbone"],
}
DRY = {"dry_single": ["--target", "0.5", "--dry-run"],
       "dry_flops": ["--target-flops", "0.5", "--dry-run"],
       "dry_budget": ["--max-kl", "0.01", "--dry-run"]}
DROP = re.compile(r"latency|time|created|versions|artifacts|command|^config$|run_id|_s$|"
                  r"^repeats$|^shared_work|^warnings$|^attempts$|^seconds$")


def keep(x):
    """The report without what measures the machine (or names the checkout it ran from)."""
    if isinstance(x, dict):
        out = {k: keep(v) for k, v in x.items() if not DROP.search(str(k))}
        if isinstance(out.get("id"), str) and "/" in out["id"]:
            out["id"] = Path(out["id"]).name
        return out
    if isinstance(x, list):
        return [keep(v) for v in x]
    return x


def run(out: Path, extra: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, flags in {**CASES, **DRY}.items():
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "vit_pruning", *QUICK, *flags, *extra, "--run-id", name,
                   "--reports-dir", f"{tmp}/r", "--artifacts-dir", f"{tmp}/a",
                   "--pruned-output-dir", f"{tmp}/p"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if name in DRY:
                text = re.sub(r"model \S+/embedded/", "model embedded/", done.stdout)
                (out / f"{name}.txt").write_text(text + f"exit {done.returncode}\n")
                continue
            rep = Path(tmp) / "r" / f"report-{name}.json"
            body = keep(json.loads(rep.read_text())) if rep.exists() else None
            (out / f"{name}.json").write_text(json.dumps(
                {"exit": done.returncode, "stderr_tail": done.stderr.strip().splitlines()[-1:]
                 if done.returncode else [], "report": body}, indent=1, sort_keys=True))
        print(f"{name}: exit {done.returncode}", flush=True)


def differences(a, b, where="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{where}/{k}: only in {'B' if k not in a else 'A'}")
            else:
                out += differences(a[k], b[k], f"{where}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items against {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        if a == b or (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7):
            return []
    elif a == b:
        return []
    return [f"{where}: {a!r} against {b!r}"]


def compare(a: Path, b: Path) -> int:
    bad = 0
    for fa in sorted(a.iterdir()):
        fb = b / fa.name
        if not fb.exists():
            print(f"{fa.name}: missing in {b}")
            bad += 1
            continue
        if fa.suffix == ".txt":
            diffs = [] if fa.read_text() == fb.read_text() else ["dry-run text differs"]
        else:
            diffs = differences(json.loads(fa.read_text()), json.loads(fb.read_text()))
        print(f"{fa.name}: {'same' if not diffs else f'{len(diffs)} differences'}")
        for d in diffs[:20]:
            print(f"   {d}")
        bad += bool(diffs)
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "run":
        run(Path(sys.argv[2]), sys.argv[3:])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        sys.exit(__doc__)
