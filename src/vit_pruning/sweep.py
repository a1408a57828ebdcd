"""Many targets from one model: the trade-off curve, and the largest target within a budget.

Both run on one :class:`vit_pruning.pipeline.Pruner`, so what does not depend on the target is
done once (calibration batches, the unpruned trace, the held-out split, the greedy depth order
computed to the largest count any target needs), and each target is pruned from an unpruned
copy of the model, never from another target's result.
"""
from __future__ import annotations

import copy
import logging
import math
import statistics
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from torch import nn

from .config import PruneConfig
from .pipeline import Pruner, PruneResult
from .planner import check_targets

log = logging.getLogger(__name__)


def _pruner(model: nn.Module, calibration_loader, config, pruner: Pruner | None,
            options: dict) -> Pruner:
    """The Pruner given, or one on `model` (`options`: Pruner's calib_batches, device, progress)."""
    unknown = set(options) - {"calib_batches", "device", "progress"}
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {sorted(unknown)} (a Pruner takes "
                        f"calib_batches, device and progress)")
    return pruner or Pruner(model, calibration_loader, config, **options)


def sweep(model: nn.Module, targets: Sequence[float], calibration_loader: Iterable | None = None,
          config: PruneConfig | None = None, *, pruner: Pruner | None = None,
          after_stage1: Callable[[float, nn.Module], None] | None = None,
          **pruner_options) -> list[tuple[nn.Module, PruneResult]]:
    """Prune a copy of `model` to each target; `model` itself stays unpruned. Returns one
    (pruned model, PruneResult) per target, in the order given. The largest target is pruned
    first, so the greedy depth order is computed once, to the largest count any target needs.
    `after_stage1(target, model)` is called between the stages of each target. A `pruner` built
    before is used as it is; else one is built (`pruner_options`: calib_batches, device,
    progress)."""
    if isinstance(targets, (int, float, str)):
        raise ValueError(f"targets must be a sequence of floats in (0, 1), got {targets!r} (for "
                         f"one target: sweep(model, [{targets!r}]) or prune_2ssp)")
    values = check_targets(targets)
    pruner = _pruner(model, calibration_loader, config, pruner, pruner_options)
    out: dict[float, tuple[nn.Module, PruneResult]] = {}
    for t in sorted(values, reverse=True):
        log.info("sweep: target %.4f", t)
        hook = None if after_stage1 is None else (lambda m, t=t: after_stage1(t, m))
        out[t] = pruner.prune(t, copy.deepcopy(model), after_stage1=hook)
    return [out[t] for t in values]


@dataclass
class Trial:
    """One target a budget search pruned to, and what came of it."""

    target: float
    accepted: bool
    achieved_sparsity: float
    measures: dict = field(default_factory=dict)  # what `accept` recorded (fidelity, ...)


@dataclass
class SearchResult:
    """What :func:`search_target` chose: the largest accepted target on the grid (None if even
    the smallest broke the budget), its pruned model and result, and every trial in order."""

    target: float | None
    model: nn.Module | None
    result: PruneResult | None
    trials: list[Trial]
    first_rejected: float | None = None  # the smallest target seen to break the budget

    def to_dict(self) -> dict:
        return {"target": self.target, "first_rejected": self.first_rejected,
                "trials": [t.__dict__ for t in self.trials]}


def grid(low: float, high: float, resolution: float) -> list[float]:
    """Targets from `low` to `high` in steps of `resolution`, rounded to the resolution."""
    if not 0 < resolution < 1:
        raise ValueError(f"resolution must be in (0, 1), got {resolution}")
    n, digits = int((high - low) / resolution + 1e-9), _digits(resolution)
    return [round(low + k * resolution, digits) for k in range(n + 1)]


def grid_start(floor: float, resolution: float) -> float:
    """The first multiple of `resolution` (from `resolution` itself) at or above `floor`: where a
    budget search's grid begins when nothing below `floor` can be planned (fixed heads)."""
    return round(resolution * max(1, math.ceil(floor / resolution - 1e-9)), _digits(resolution))


def _digits(resolution: float) -> int:
    """Decimal digits grid points are rounded to: two past the resolution's."""
    return max(0, -int(f"{resolution:e}".split("e")[1])) + 2


def search_target(model: nn.Module, accept: Callable[[nn.Module], bool | tuple[bool, dict]],
                  calibration_loader: Iterable | None = None, config: PruneConfig | None = None,
                  *, resolution: float = 0.01, low: float | None = None, high: float | None = None,
                  pruner: Pruner | None = None,
                  after_stage1: Callable[[float, nn.Module], None] | None = None,
                  **pruner_options) -> SearchResult:
    """The largest target on a grid (`low`, default `resolution`, or with a fixed count of
    heads the first grid point at or above what they remove, to `high`, default the largest
    feasible target, in steps of `resolution`) whose pruned model `accept` takes, by bisection:
    fidelity falls as the target grows, so about log2(grid size) + 1 prunings suffice (7 for a
    0.01 grid up to 0.7). `accept(pruned_model)` returns a bool, or (bool, measures) to record
    what it measured. `model` stays unpruned. Every pruning is from an unpruned copy. A
    `pruner` built before is used as it is; else one is built (`pruner_options`: calib_batches,
    device, progress). ValueError names a `resolution`, `low` or `high` outside (0, 1)."""
    if not 0 < resolution < 0.5:
        raise ValueError(f"resolution must be in (0, 0.5), got {resolution}")
    for name, value in (("low", low), ("high", high)):
        if value is not None and not 0 < value < 1:
            raise ValueError(f"{name} must be in (0, 1), got {value}")
    if low is not None and high is not None and low > high:
        raise ValueError(f"low ({low}) must not be above high ({high})")
    pruner = _pruner(model, calibration_loader, config, pruner, pruner_options)
    if high is None:
        high = pruner.max_target()
    if low is None:  # the first grid point a plan can meet (fixed heads remove some at least)
        low = grid_start(pruner.min_target(), resolution)
    points = grid(low, min(high, 1 - resolution), resolution)
    points = [t for t in points if t <= high]
    if not points:
        raise ValueError(f"no target between {low} and {high} on a grid of {resolution}")
    trials: list[Trial] = []
    kept: dict[float, tuple[nn.Module, PruneResult]] = {}

    def judge(i: int) -> bool:
        t = points[i]
        hook = None if after_stage1 is None else (lambda m: after_stage1(t, m))
        try:
            pruned, res = pruner.prune(t, copy.deepcopy(model), after_stage1=hook)
        except ValueError as exc:  # a target the split cannot reach: counts as over budget
            log.info("search: target %.4f cannot be pruned (%s)", t, exc)
            trials.append(Trial(t, False, float("nan"), {"error": str(exc)}))
            return False
        verdict = accept(pruned)
        ok, measures = verdict if isinstance(verdict, tuple) else (bool(verdict), {})
        trials.append(Trial(t, bool(ok), res.achieved_sparsity, dict(measures)))
        log.info("search: target %.4f -> %s %s", t, "kept" if ok else "over budget", measures)
        if ok:
            kept.clear()  # only the best accepted model is held
            kept[t] = (pruned, res)
        return bool(ok)

    lo, hi = -1, len(points)  # points[lo] accepted (lo = -1: none known), points[hi] rejected
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if judge(mid):
            lo = mid
        else:
            hi = mid
    rejected = points[hi] if hi < len(points) else None
    if lo < 0:
        return SearchResult(None, None, None, trials, rejected)
    best = points[lo]
    pruned, res = kept[best]
    return SearchResult(best, pruned, res, trials, rejected)


RECHECK = 3  # a measurement this many tolerances from the prediction is taken twice more


def prune_to_measured(pruner: Pruner, ratio: float, measure: Callable[[nn.Module], float],
                      tolerance: float = 0.01, corrections: int = 2,
                      after_stage1: Callable[[float, nn.Module], None] | None = None,
                      recheck: float | None = RECHECK,
                      ) -> tuple[nn.Module, PruneResult, list[Trial]]:
    """Prune a copy of the Pruner's model to keep `ratio` of what `measure(pruned) -> ratio`
    measures (e.g. latency timed against the unpruned model): first at the target the cost
    model plans (1 - ratio), then, while the measured ratio misses by more than `tolerance`, up
    to `corrections` times at a corrected target (:func:`_corrected_target`): after one
    attempt, what is removed taken as proportional to the target; after more, the line between
    the closest attempts on either side of the goal (planned target, measured saving), or the
    secant through the last two while all lie on one side, which corrects a first correction
    that crossed to another depth count and overshot. A corrected target that plans a structure timed already ends the search (a
    target between two depth counts maps to the same structure). A measurement more than
    `recheck` tolerances from the cost model's prediction is taken twice more and the median of
    the three used (Trial.measures["takes"]): on a shared machine one spell of a slow baseline
    timed a ViT-B plan predicted at 0.800 as 0.726, and correcting by it missed. The attempt
    closest to `ratio` is returned, with every attempt (Trial.measures: planned, predicted and
    measured ratios)."""
    top = pruner.max_target()
    target, trials, points = 1 - ratio, [], []  # every attempt: its Trial, (planned, saving)
    best = None  # (model, result, Trial) of the attempt closest to `ratio`: the only model held
    timed: list[tuple] = []  # the structure of every attempt, in order
    for _ in range(corrections + 1):
        hook = None if after_stage1 is None else (lambda m, t=target: after_stage1(t, m))
        model, res = pruner.prune(target, copy.deepcopy(pruner.model), after_stage1=hook)
        structure = _structure(res)
        if structure in timed:  # a corrected target that plans a structure timed already
            log.info("measured target: planned %.4f gives the structure of attempt %d; not "
                     "timed again", 1 - res.plan.target, timed.index(structure) + 1)
            break
        timed.append(structure)
        takes = [measure(model)]
        if recheck is not None and abs(takes[0] - res.objective_ratio) > recheck * tolerance:
            takes += [measure(model), measure(model)]
            log.info("measured target: %.4f is far from the predicted %.4f; timed twice more: %s",
                     takes[0], res.objective_ratio, ", ".join(f"{t:.4f}" for t in takes[1:]))
        got = statistics.median(takes)
        trial = Trial(target, abs(got - ratio) <= tolerance, res.achieved_sparsity,
                      {"planned_ratio": 1 - res.plan.target, "predicted_ratio": res.objective_ratio,
                       "measured_ratio": got, **({"takes": takes} if len(takes) > 1 else {})})
        trials.append(trial)
        points.append((res.plan.target, 1 - got))
        log.info("measured target: planned %.4f, predicted %.4f, measured %.4f (asked %.4f)",
                 1 - res.plan.target, res.objective_ratio, got, ratio)
        if best is None or abs(got - ratio) < abs(best[2].measures["measured_ratio"] - ratio):
            best = (model, res, trial)
        del model
        if abs(got - ratio) <= tolerance or got >= 1:
            break
        corrected = min(top, max(1e-3, _corrected_target(points, ratio)))
        if any(abs(corrected - t.target) < 1e-4 for t in trials):
            break  # that plan was timed already
        target = corrected
    model, res, trial = best
    trial.measures["chosen"] = True
    return model, res, trials


def _structure(res: PruneResult) -> tuple:
    """What a pruning removed: blocks, attention sublayers, neurons per block."""
    return (res.plan.unit, tuple(sorted(res.depth_order)), res.plan.attention_indices,
            tuple(res.neurons_removed))


def _corrected_target(points: list[tuple[float, float]], ratio: float) -> float:
    """The next target of :func:`prune_to_measured` from its attempts' (planned target, measured
    saving 1 - measured ratio). Where attempts lie on both sides of the goal, the line between
    the closest one on each side (the goal is between them, whatever the attempts after them
    measured: one odd timing, e.g. 0.08 off its neighbours on a CPU before its allocator was
    steadied, leaves the last two attempts on one side of it). Else the secant through the last
    two where they differ, else the last target scaled by how much more (or less) it had to
    save."""
    goal = 1 - ratio
    short = [pt for pt in points if pt[1] < goal]  # saved too little
    over = [pt for pt in points if pt[1] > goal]
    if short and over:
        p1, s1 = max(short, key=lambda pt: pt[1])
        p2, s2 = min(over, key=lambda pt: pt[1])
        if p1 < p2:
            return p1 + (goal - s1) * (p2 - p1) / (s2 - s1)
    p2, s2 = points[-1]
    if len(points) >= 2:
        p1, s1 = points[-2]
        if abs(s1 - s2) > 1e-6 and abs(p1 - p2) > 1e-6 and (s1 - s2) * (p1 - p2) > 0:
            return p2 + (goal - s2) * (p1 - p2) / (s1 - s2)
    return p2 * goal / s2
