"""Cost of the whole pipeline on the ViT-B/16 shape (random weights) at target 0.25 with 64
calibration images: wall time per phase and peak memory, ours vs the seed recipe (one-shot
depth selection with a model copy per candidate, 5 evaluation batches of 32). Each method runs
in its own subprocess; peak memory is resident memory sampled every 10 ms while it prunes.
Ours keeps the unpruned model's trace (every block's input for the 64 images, 465 MB here) from
start to stage 1, where each phase used to re-run the unpruned model: most of its extra memory."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import threading
import time

import torch

from .common import md_table, vit_shape

TARGET = 0.25
CALIB = 64
EVAL_BATCHES, EVAL_BATCH = 5, 32


def _rss_mb() -> float:
    """Resident memory now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class PeakRSS:
    """Samples resident memory every 10 ms in a thread; `.peak` is the highest seen."""

    def __enter__(self):
        self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.01)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def one(method: str, shape: str, calib: int) -> dict:
    from vit_pruning import PruneConfig, prune_2ssp
    from .methods import seed_recipe
    torch.manual_seed(0)
    model = vit_shape(shape)
    size = model.config.image_size
    g = torch.Generator().manual_seed(1)
    calib_x = list(torch.split(torch.randn(calib, 3, size, size, generator=g), 32))
    eval_b = [(torch.randn(EVAL_BATCH, 3, size, size, generator=g),
               torch.randint(0, 1000, (EVAL_BATCH,), generator=g)) for _ in range(EVAL_BATCHES)]
    min_remaining = min(512, model.config.intermediate_size // 6)
    setup = _rss_mb()
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        if method in ("ours", "ours-heads-off"):
            heads = "off" if method == "ours-heads-off" else "auto"
            _, res = prune_2ssp(model, TARGET, calib_x, PruneConfig(min_remaining=min_remaining,
                                                                    heads=heads))
            timings = res.timings
        else:
            timings = {}
            seed_recipe(model, TARGET, calib_x, None, eval_b, min_remaining, 0, timings)
    return {"method": method, "wall_s": time.perf_counter() - t0, "timings": timings,
            "peak_rss_mb": mem.peak, "setup_rss_mb": setup}


def run(shape: str = "vit-b16", calib: int = CALIB, methods=("seed", "ours")) -> list[dict]:
    out = []
    for method in methods:
        proc = subprocess.run([sys.executable, "-m", "bench.cost", method, shape, str(calib)],
                              capture_output=True, text=True, check=True)
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        phases = "; ".join(f"{k} {v:.1f}s" for k, v in r["timings"].items())
        rows.append([r["method"], f"{r['wall_s']:.1f}", phases, f"{r['peak_rss_mb']:.0f}",
                     f"{r['peak_rss_mb'] - r['setup_rss_mb']:.0f}"])
    return md_table(["method", "wall time (s)", "phases", "peak RSS while pruning (MB)",
                     "peak above the loaded model + data (MB)"], rows)


if __name__ == "__main__":
    print(json.dumps(one(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
