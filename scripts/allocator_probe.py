"""How the C library's allocator moves CPU latency ratios: measure a model's latency model, plan
latency targets on it (no correction) and time each plan against its parent in pairs (interleaved,
10 rounds, twice), with the allocator as glibc leaves it or as the timings now steady it.

    PYTHONPATH=.:src python scripts/allocator_probe.py --allocator default --model swin-t
    PYTHONPATH=.:src python scripts/allocator_probe.py --allocator steady --model swin-t

``default`` keeps glibc's dynamic mmap threshold (a library call's timings; the CLI's with
--no-steady-allocator); ``steady`` is ``vit_pruning.measure.steady_cpu_allocator`` (what the
CLI's timings ask for). Prints one line
per target: predicted ratio, then each pair's median ratio [quartiles].
"""
import argparse
import copy
import logging
import time

from bench.common import vit_shape
from vit_pruning import PruneConfig, measure
from vit_pruning.objective import measure_latency_model
from vit_pruning.pipeline import Pruner, default_min_remaining, model_shape

log = logging.getLogger("allocator_probe")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--allocator", choices=("default", "steady"), required=True)
    ap.add_argument("--model", default="swin-t", choices=("swin-t", "vit-b16", "dinov2-b14"))
    ap.add_argument("--ratios", default="0.9,0.8", help="latency targets, comma-separated")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    steady = args.allocator == "steady"
    base = vit_shape(args.model)
    mr = default_min_remaining(model_shape(base))[0]
    t0 = time.perf_counter()
    lat = measure_latency_model(base, batch_size=args.batch_size, align=8, min_remaining=mr,
                                steady_allocator=steady)
    log.info("%s: latency model in %.0f s", args.model, time.perf_counter() - t0)
    pruner = Pruner(base, None, PruneConfig(min_remaining=mr, objective="latency", latency_model=lat))
    for r in (float(x) for x in args.ratios.split(",")):
        model, res = pruner.prune(1 - r, copy.deepcopy(base))
        pairs = [measure.interleaved_latency({"base": base, "p": model}, args.batch_size, 10,
                                             warmup=2, steady_allocator=steady)
                 for _ in range(2)]
        log.info("%s %s R=%g: predicted %.3f, measured %s", args.allocator, args.model, r,
                 res.objective_ratio, " ".join(f"{c.ratio['p']:.3f} [{c.ratio_q1['p']:.3f}, "
                                               f"{c.ratio_q3['p']:.3f}]" for c in pairs))


if __name__ == "__main__":
    main()
