"""The whole 2SSP run: plan, stage 1 (width), stage 2 (depth), in one call.

Order of decisions: the depth units are *selected* first (on the unpruned model), so that
width is planned and calibrated only on blocks that survive; then stage 1 removes neurons and
stage 2 removes the selected units. With calibration data and ``split="search"`` every feasible
depth count is tried (width pruned, scored, then undone: no model copies) and the one with the
best calibration fidelity wins. The unpruned model runs once over the calibration data
(:mod:`vit_pruning.trace`): its outputs, block inputs and residual sums serve every phase.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .anatomy import resolve
from .config import (HEAD_FRACTIONS, HEAD_GAIN_Z, NEURON_SELECTIONS, SELECTIONS,  # noqa: F401
                     SPLITS, STAGES, PruneConfig, default_min_remaining)  # (PruneConfig is imported from here too)
from .batches import take_inputs
from .depth import Budget, apply_depth, outputs_with_depth, select_depth
from .measure import (collect_outputs, count_flops, count_total_params, output_distance,
                      row_distances, single_output_problem)
from .objective import measure_latency_model, objective_shape
from .planner import (ModelShape, PruningPlan, Within, alpha_depth, as_target, best_feasible_units,
                      candidates, check_width_only, counts_with_heads, depth_only_plan,
                      feasible_depths,
                      fixed_heads_floor,
                      indices_feasible, make_plan, max_feasible_target,
                      max_target_over, mixed_attention,
                      mixed_choice, mixed_options, reachable_target, target_bound,
                      global_heads, heads_filling, uniform_heads, units_of, validate_target,
                      width_only_max)
from .surgery import (attention_refs, mlp_refs, restore_attention_refs, restore_refs,
                      sync_config)
from .trace import UnprunedTrace, trace_bytes, trace_unpruned
from .width import WidthPass, global_allocation, prune_vit_mlp_width, prune_width_sequential
from .importance import activation_scores, magnitude_scores
from .attention_heads import head_costs, prune_heads_by_magnitude
from .modes import device_of, eval_mode

log = logging.getLogger(__name__)

MICRO_BATCH = 16  # calibration images per forward inside the pipeline
TRACE_LIMIT = 4 * 2**30  # bytes: the unpruned trace is kept below this (ViT-L/16 with 128
# images takes 2.6 GB in fp32), recomputed per phase above it


@dataclass
class PruneResult:
    """What :func:`prune_2ssp` did."""

    plan: PruningPlan
    config: PruneConfig
    params_before: int
    params_after_stage1: int
    params_after_stage2: int
    depth_order: list[int]  # selected units, in greedy removal order (original numbering)
    neurons_removed: list[int]  # per original block
    kept_neurons: list[list[int]] | None
    kept_heads: list[list[int]] | None = None  # per original block, the heads kept (original
    # indices; [] where stage 2 removed the attention; all of a block stage 2 removes whole;
    # None without calibration data or with sequential=False unless heads were removed)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    search: dict[str, float] = field(default_factory=dict)  # depth count ("unit:count" for
    # unit="auto") -> held-out calibration distance of the split trial
    selection: str = "score"  # the neuron selection used ("score" or "lsq")
    selection_search: dict[str, float] = field(default_factory=dict)  # held-out calibration
    # distance on the chosen split of each selection tried (selection="auto") and, with
    # refit_prior="auto", of the selection used with the refit damped toward the unpruned
    # weights ("<selection>, unpruned prior")
    refit_prior: str = "zero"  # what the refit's damping pulled toward ("zero" or "unpruned")
    gates: dict[str, dict] = field(default_factory=dict)  # each held-out gate that ran
    # (:func:`clear_gain`): "heads" (the best head plan against the best without), "fewer depth
    # units" (the descent's last level), "refit prior" -> {"tried", "against", "z", "kept"}
    depth_scores: dict = field(default_factory=dict)
    objective: str = "params"  # what the target counted (PruneConfig.objective)
    objective_before: float = 0.0  # the unpruned model's count of it: parameters, FLOPs, or
    # seconds (as the latency model sums them, LatencyModel.model_s)
    objective_after: float = 0.0  # the pruned model's: counted (parameters, FLOPs) or predicted
    # by the latency model (LatencyModel.predict)

    @property
    def achieved_sparsity(self) -> float:
        return 1 - self.params_after_stage2 / self.params_before

    @property
    def objective_ratio(self) -> float:
        """What of the objective the pruned model keeps (predicted for latency)."""
        return self.objective_after / self.objective_before if self.objective_before else 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["achieved_sparsity"] = self.achieved_sparsity
        d["objective_ratio"] = self.objective_ratio
        d.pop("kept_neurons")
        if self.config.latency_model is not None:  # the table is reported once, on its own
            d["config"]["latency_model"] = self.config.latency_model.key
        return d


def model_shape(model: nn.Module) -> ModelShape:
    """Parameter bookkeeping of a model for the planner."""
    an = resolve(model)

    def n(mod: nn.Module) -> int:
        return sum(p.numel() for p in mod.parameters())

    costs = tuple(p.neuron_params for p in an.parts)
    return ModelShape(
        total_params=count_total_params(model), hidden_size=an.hidden_size,
        params_per_neuron=costs[0], neuron_costs=costs if len(set(costs)) > 1 else None,
        stages=an.stage_of,
        widths=tuple(p.intermediate_size for p in an.parts),
        block_params=tuple(n(p.block) for p in an.parts),
        attention_params=tuple(p.attention_params for p in an.parts),
        heads=tuple(p.num_heads for p in an.parts),
        head_params=None if an.shared_head_bias else tuple(p.head_params for p in an.parts),
    )


def plan_2ssp_allocation(model: nn.Module, target: float, min_remaining: int | None = None,
                         unit: str = "block", depth: int | str = "alpha",
                         depth_indices: Sequence[int] | None = None,
                         alpha: float = 1.5, align: int = 1,
                         width_policy: str = "per-block") -> PruningPlan:
    """Plan a 2SSP run to global sparsity `target` (1 - params_after/params_before over the whole
    model as passed, head included). Raises ValueError naming the maximum feasible target.
    `min_remaining` None is the command line's default (:func:`default_min_remaining`: the
    seed's 512 where the MLP is wider, a quarter of it on narrower MLPs). The seed's other
    defaults (align=1, per-block widths) land within one neuron of the target."""
    shape = model_shape(model)
    if min_remaining is None:
        min_remaining = default_min_remaining(shape)[0]
    return make_plan(shape, target, unit, min_remaining, depth, depth_indices, alpha,
                     align, width_policy)


def _width_stage(model: nn.Module, plan: PruningPlan, batches: list[torch.Tensor] | None,
                 cfg: PruneConfig, progress: bool, trial: bool = False,
                 fit_batches: int | None = None, unpruned: UnprunedTrace | None = None) -> dict:
    """Stage 1 of `plan` in place, calibrated as if stage 2 had already removed its units.
    With `trial` the model is left unchanged (only the outputs it would give are returned);
    `fit_batches` holds the batches after the first `fit_batches` out of the fit; `unpruned`
    is the unpruned model's trace over inputs whose first rows are `batches`'."""
    skip = plan.removed_blocks
    counts = list(plan.neurons_to_prune)
    if batches and cfg.sequential:
        how = WidthPass(plan.removed_blocks, plan.removed_attention, fit_batches, unpruned, trial,
                        progress)
        return prune_width_sequential(model, counts, batches,
                                      replace(cfg, min_remaining=plan.min_remaining,
                                              align=int(cfg.align)), how, plan.heads_to_prune)
    fit = batches[:fit_batches] if batches else batches
    if trial:
        snapshot = [ref for parts in resolve(model).parts for ref in mlp_refs(parts)]
        heads = [attention_refs(parts) for parts in resolve(model).parts]
        info = _width_stage(model, plan, fit, cfg, progress)
        info["outputs"] = outputs_with_depth(model, batches, plan.unit, plan.depth_indices,
                                             plan.attention_indices)
        restore_refs(snapshot)
        for saved in heads:
            restore_attention_refs(saved)
        sync_config(resolve(model))
        return info
    kept_heads = prune_heads_by_magnitude(resolve(model), plan.heads_to_prune) \
        if plan.removes_heads else None  # without data (or sequential=False): by magnitude
    an = resolve(model)
    scores = activation_scores(an, fit, skip) if fit else magnitude_scores(an)
    if cfg.allocation == "global":
        survivors = [i for i in range(len(counts)) if i not in skip]
        counts = global_allocation(scores, sum(counts), plan.min_remaining, survivors, int(cfg.align))
    prune_vit_mlp_width(model, counts, plan.min_remaining, importance=scores)
    return {"counts": counts, "kept": None, "kept_heads": kept_heads}


def prune_2ssp(model: nn.Module, target: float, calibration_loader: Iterable | None = None,
               config: PruneConfig | None = None, calib_batches: int | None = None,
               device: str | torch.device | None = None, progress: bool = False,
               after_stage1: Callable[[nn.Module], None] | None = None,
               ) -> tuple[nn.Module, PruneResult]:
    """Prune `model` in place to global parameter sparsity `target` with 2SSP.

    Args:
        calibration_loader: label-free calibration images (batches of pixel_values). Without
            it width uses weight magnitude and depth a weight-norm proxy.
        calib_batches: how many loader batches to use (all if None).
        device: where calibration batches go (default: the model's device).
        after_stage1: called with the model between stage 1 and stage 2 (to measure it).
    Returns:
        (model, PruneResult) with counts, indices and per-stage parameter counts.
    """
    pruner = Pruner(model, calibration_loader, config, calib_batches, device, progress)
    return pruner.prune(target, after_stage1=after_stage1)


class Pruner:
    """2SSP's work that does not depend on the target, done once for one unpruned model: the
    calibration batches, the unpruned model's trace (reference outputs, block inputs, residual
    sums), the held-out split of the trials, and the greedy depth order of each unit (prefix-
    stable: computed once to the largest count asked, its first units serve every smaller
    count). :meth:`prune` then prunes for one target; :func:`prune_2ssp` is one Pruner and one
    call, :func:`sweep` and :func:`search_target` are one Pruner and many.

    The model given is the unpruned reference and must stay so while the Pruner is used (prune
    copies of it, or prune it in place last).
    """

    def __init__(self, model: nn.Module, calibration_loader: Iterable | None = None,
                 config: PruneConfig | None = None, calib_batches: int | None = None,
                 device: str | torch.device | None = None, progress: bool = False):
        self.model = model
        self.param_shape = model_shape(model)
        cfg = (config or PruneConfig()).resolved(self.param_shape)
        if cfg.objective == "latency" and cfg.latency_model is None:
            cfg = replace(cfg, latency_model=measure_latency_model(
                model, align=int(cfg.align), min_remaining=cfg.min_remaining, seq_len=cfg.seq_len))
        self.shape = objective_shape(model, self.param_shape, cfg.objective, cfg.latency_model,
                                     cfg.seq_len)  # what the planner counts
        self.cfg = replace(config or PruneConfig(), latency_model=cfg.latency_model
                           ).resolved(self.shape)
        self.progress = progress
        device = device if device is not None else device_of(model)
        batches = take_inputs(calibration_loader, calib_batches, device,
                              resolve(model).is_text) if calibration_loader is not None else None
        if batches:  # small micro-batches bound the memory of cached activations in every phase
            problem = single_output_problem(model)
            if problem:
                raise ValueError(f"{type(model).__name__}: {problem}; prune its backbone, or "
                                 f"prune without calibration data (None)")
            batches = [c for x in batches for c in torch.split(x, MICRO_BATCH)]
        self.batches = batches
        cfg = self.cfg
        split = cfg.split
        if split == "auto":
            split = "search" if batches else "alpha"
        if cfg.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {cfg.selection!r}")
        if cfg.stages not in STAGES:
            raise ValueError(f"stages must be one of {STAGES}, got {cfg.stages!r}")
        if cfg.stages == "s2" and cfg.unit == "auto":
            raise ValueError("unit 'auto' compares whole splits; for stage 2 alone choose "
                             "'block' or 'attention'")
        self.split = 0 if cfg.stages == "s1" else split
        clock = _Clock()
        self.trace = _trace(model, batches)
        self.reference = (self.trace.outputs if self.trace is not None else
                          collect_outputs(model, batches) if batches else None)
        clock.lap("unpruned trace" if self.trace is not None else "reference outputs")
        self.holdout = (_holdout(model, batches, self.reference, cfg, self.trace)
                        if batches and cfg.stages != "s2" else None)
        self.timings = dict(clock.laps)  # the shared work's phases
        self._orders: dict[str, tuple[list[int], dict, int]] = {}  # unit -> order, scores, asked
        self._head_costs: list[list[float]] | None = None

    def head_costs(self) -> list[list[float]]:
        """Each block's heads' cost of removal on the unpruned model, over the split trials'
        fitted calibration images (:func:`vit_pruning.attention_heads.head_costs`): computed
        once, shared by every target."""
        if self._head_costs is None:
            fit = self.holdout.batches[:self.holdout.fit_batches]
            with eval_mode(self.model):
                self._head_costs = head_costs(resolve(self.model), fit, self.cfg.ridge,
                                              self.holdout.trace)
        return self._head_costs

    def max_target(self) -> float:
        """The largest target this model can be pruned to with the config's depth unit(s) and
        a fixed count of heads (heads=N), or with stages="s1" by width (and those heads) alone."""
        cfg = self.cfg
        if cfg.stages == "s1":
            return width_only_max(self.shape, cfg.min_remaining, int(cfg.align), cfg.fixed_heads)
        return max_target_over(self.shape, units_of(cfg.unit), cfg.min_remaining, int(cfg.align),
                               cfg.fixed_heads)

    def min_target(self) -> float:
        """The smallest target a plan can meet: 0, but with a fixed count of heads per block
        (heads=N) what those heads remove (:func:`vit_pruning.planner.fixed_heads_floor`)."""
        return fixed_heads_floor(self.shape, self.cfg.fixed_heads)

    def depth_order(self, unit: str, count: int, budget: Budget | None = None
                    ) -> tuple[list[int], dict]:
        """The first `count` depth units in removal order, and the selection's scores. Without
        a `budget` (units of one size) the order is shared: computed to the largest count asked
        so far. With one (units differ, so the target decides what fits) it is computed anew."""
        cfg = self.cfg
        if budget is not None:
            return select_depth(self.model, count, unit, self.batches, cfg,
                                reference=self.reference, budget=budget, unpruned=self.trace,
                                progress=self.progress)
        cached = self._orders.get(unit)
        if cached is None or cached[2] < count:
            order, scores = select_depth(self.model, count, unit, self.batches, cfg,
                                         reference=self.reference, unpruned=self.trace,
                                         progress=self.progress)
            cached = (order, scores, count)
            self._orders[unit] = cached
        return list(cached[0][:count]), cached[1]

    def decide(self, target: float, model: nn.Module | None = None,
               units: Sequence[str] | None = None, clock: "_Clock | None" = None) -> "_Decision":
        """The structure :meth:`prune` makes for `target`, decided without pruning: the depth
        units (selected on this Pruner's calibration data, or by the weight proxy without any)
        and the width/depth split (searched on the data: `model` is pruned and restored per
        trial). `units` narrows the depth units tried (default: the config's)."""
        model = self._unpruned(model)
        cfg, shape, batches = self.cfg, self.shape, self.batches
        target, clock = as_target(target), (clock if clock is not None else _Clock())
        if cfg.stages == "s1":
            width_top = check_width_only(
                shape, target, cfg.min_remaining, int(cfg.align), cfg.fixed_heads,
                "stages='s1'" + (f", heads={cfg.heads}" if cfg.fixed_heads else ""))
        units = tuple(units) if units is not None else units_of(cfg.unit)
        if cfg.stages != "s1" and cfg.fixed_heads and cfg.objective != "latency":  # the range
            # with the heads (a latency target is raised to a reachable one below)
            validate_target(target, max_target_over(shape, units, cfg.min_remaining,
                                                    int(cfg.align), cfg.fixed_heads),
                            f"with this min_remaining, depth unit and heads={cfg.fixed_heads}")
        if cfg.unit == "auto" and (not batches or cfg.stages == "s1") and len(units) > 1:
            units = ("block",)  # nothing to compare without data; s1 removes no depth units
        if len(units) > 1 and cfg.objective != "latency":  # only units that can meet the target
            # (latency targets: _reach below); none can: the error quotes the largest maximum
            tops = {u: max_feasible_target(shape, u, cfg.min_remaining, int(cfg.align),
                                           cfg.fixed_heads) for u in units}
            units = tuple(u for u in units if tops[u] >= target) or (max(units, key=tops.get),)
        mixed = None
        if cfg.objective == "latency" and not cfg.fixed_heads:  # time: a target
            # between depth counts is met by more (fixed heads take the depth units' place)
            reach = _reach(shape, target, units, cfg)
            if min(reach.values()) > target and cfg.mixed_depth and "block" in units:
                mixed = _choose_mixed(self, model, target, cfg, clock)  # or by attention too
            if mixed is None:
                target = min(reach.values())
                units = tuple(u for u in units if reach[u] == target)
        choices = [mixed] if mixed is not None else [
            _choose_depth(self, model, target, replace(cfg, unit=u), clock,
                          score_single=len(units) > 1) for u in units]
        plan, order, search, depth_scores, chosen, chosen_rows, gates = min(
            choices, key=lambda c: c[4] if c[4] is not None else 0.0)
        if cfg.stages == "s1":  # the plan's maximum is stage 1's, not that of its depth unit
            plan = replace(plan, max_feasible_target=width_top)
        elif cfg.fixed_heads:  # and with a fixed count of heads, what they reach too
            plan = replace(plan, max_feasible_target=max_feasible_target(
                shape, plan.unit, cfg.min_remaining, int(cfg.align), cfg.fixed_heads))
        known = {"score": (chosen, chosen_rows)} if chosen is not None else {}  # the winning
        # trial, ranked by score
        if len(units) > 1:
            search = {f"{c[0].unit}:{k}": v for c in choices for k, v in c[2].items()}
        return _Decision(target, plan, order, search, depth_scores, known, gates)

    def preview(self, target: float, unit: str | None = None) -> PruningPlan:
        """The plan :meth:`prune` would make for `target` with this Pruner's data, for one depth
        unit (default: the config's; with "auto" and no data, "block"), the model untouched. A
        Pruner without calibration data gives the data-free plan (weight-proxy depth units and
        the alpha split, or the split asked for): what ``--dry-run`` shows. ValueError where the
        target cannot be met."""
        if self.cfg.stages == "s2":
            count = depth_only_plan(self.shape, target, unit or self.cfg.unit).blocks_to_prune
            order, _ = self.depth_order(unit or self.cfg.unit, count)
            return depth_only_plan(self.shape, target, unit or self.cfg.unit, order)
        return self.decide(target, units=None if unit is None else (unit,)).plan

    def prune(self, target: float, model: nn.Module | None = None,
              after_stage1: Callable[[nn.Module], None] | None = None
              ) -> tuple[nn.Module, PruneResult]:
        """Prune `model` (default: the Pruner's own model, in place) to `target`; `model` must
        be an unpruned copy of the Pruner's model (same weights, so the shared work holds)."""
        model = self._unpruned(model)
        cfg, shape, batches = self.cfg, self.shape, self.batches
        target, clock = as_target(target), _Clock()
        if cfg.stages == "s2":
            return _depth_only(self, model, target, after_stage1)
        d = self.decide(target, model, clock=clock)
        target, plan, order, search, depth_scores = d.target, d.plan, d.order, d.search, d.depth_scores
        gates = dict(d.gates)
        selection, prior, selection_search = _choose_refit(model, plan, self.holdout, cfg, d.known,
                                                           gates)
        clock.lap("neuron selection choice")
        info = _width_stage(model, plan, batches, replace(cfg, selection=selection, refit_prior=prior),
                            self.progress, unpruned=self.trace)
        stage1 = count_total_params(model)
        clock.lap("stage 1 (width)")
        if after_stage1 is not None:
            after_stage1(model)
            clock.lap(None)  # measuring is not pruning
        apply_depth(model, plan.depth_indices, plan.unit, plan.attention_indices)
        after = count_total_params(model)
        clock.lap("stage 2 (depth)")
        counted = self.count(model, plan)
        if counted != plan.params_after:
            raise RuntimeError(f"internal error: plan predicted {plan.params_after:,} "
                               f"{cfg.objective}, pruning left {counted:,}")
        check_achieved(shape, plan, target, counted, cfg.width_policy)
        return model, PruneResult(
            plan=plan, config=cfg, params_before=self.param_shape.total_params,
            params_after_stage1=stage1,
            params_after_stage2=after, depth_order=order, neurons_removed=info["counts"],
            kept_neurons=info["kept"], kept_heads=info.get("kept_heads"), search=search,
            depth_scores=depth_scores,
            timings={**self.timings, **clock.laps}, selection=selection,
            selection_search=selection_search, refit_prior=prior, gates=gates,
            **self.objective_fields(plan, info["counts"], after),
        )

    def _unpruned(self, model: nn.Module | None) -> nn.Module:
        """`model` (default: the Pruner's own), checked to have the structure this Pruner was
        made for: its shared work (trace, depth order, head costs) holds for nothing else.
        ValueError otherwise, the commonest case being a second prune() of the Pruner's own
        model, which the first pruned in place."""
        model = self.model if model is None else model
        shape = model_shape(model)
        if shape != self.param_shape:
            which = ("its own model, which an earlier prune() pruned in place" if model is self.model
                     else "a model of another structure")
            raise ValueError(
                f"this Pruner was made for an unpruned model of {self.param_shape.total_params:,} "
                f"parameters and was given {which} ({shape.total_params:,}): pass an unpruned "
                f"copy, prune(target, model=copy.deepcopy(original)) with the copy made before "
                f"the first prune, or make a new Pruner")
        return model

    def count(self, model: nn.Module, plan: PruningPlan) -> int:
        """The pruned model's count of the objective in the planner's units: its parameters or
        FLOPs, counted; for latency (nothing to count) the plan's own prediction."""
        objective = self.cfg.objective
        if objective == "params":
            return count_total_params(model)
        if objective == "flops":
            return count_flops(model, seq_len=self.cfg.seq_len)
        return plan.params_after

    def objective_fields(self, plan: PruningPlan, removed: Sequence[int], params_after: int) -> dict:
        """PruneResult's objective, objective_before and objective_after for this pruning."""
        cfg, shape = self.cfg, self.shape
        if cfg.objective == "latency":
            lat = cfg.latency_model
            widths = [w - r for w, r in zip(shape.widths, removed)]
            return {"objective": "latency", "objective_before": lat.model_s,
                    "objective_after": lat.predict(widths, plan.removed_blocks,
                                                   plan.removed_attention, plan.heads_to_prune)}
        after = params_after if cfg.objective == "params" else plan.params_after
        return {"objective": cfg.objective, "objective_before": float(shape.total_params),
                "objective_after": float(after)}


def check_achieved(shape: ModelShape, plan: PruningPlan, target: float, params_after: int,
                   width_policy: str) -> None:
    """Raise ValueError if the pruned model misses `target` by more than the planner's stated
    bound (:func:`vit_pruning.planner.target_bound`): the result is compared with what was
    asked, not only with the plan."""
    achieved = 1 - params_after / shape.total_params
    bound = target_bound(shape, plan, width_policy)
    if abs(achieved - target) > bound + 1e-12:
        raise ValueError(f"target {target} missed: pruning reached {achieved:.4f}, beyond the "
                         f"planner's bound of {bound:.2e}")


@dataclass
class _Decision:
    """What :meth:`Pruner.decide` chose: the target met (a latency target may be raised to the
    nearest reachable one), the plan, the depth units in removal order, the split search's
    distances, the depth selection's scores, and the winning trial's (distance, per-row
    distances) by score."""

    target: float
    plan: PruningPlan
    order: list[int]
    search: dict[str, float]
    depth_scores: dict
    known: dict[str, tuple[float, torch.Tensor]]
    gates: dict[str, dict]


class _Clock:
    """Wall time per named phase."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str | None) -> None:
        now = time.perf_counter()
        if name:
            self.laps[name] = self.laps.get(name, 0.0) + now - self._t
        self._t = now


def _trace(model: nn.Module, batches: list[torch.Tensor] | None) -> UnprunedTrace | None:
    """The unpruned model's trace over the calibration batches when it fits in TRACE_LIMIT
    bytes (else every phase re-runs the unpruned model where it needs it)."""
    if not batches:
        return None
    an = resolve(model)
    size = trace_bytes(an, batches)
    if size > TRACE_LIMIT:
        log.info("unpruned trace would take %.1f GiB (> %.1f GiB): phases re-run the unpruned "
                 "model instead", size / 2**30, TRACE_LIMIT / 2**30)
        return None
    return trace_unpruned(an, batches)


@dataclass(frozen=True)
class _Holdout:
    """The calibration images of every trial (split search, selection choice), split once:
    `batches` holds the fitted images first (`fit_batches` batches, `start` images), then the
    held-out ones, whose unpruned outputs are `reference`; they are the first calibration
    images, so `trace` (the unpruned trace over all of them) serves the trials too."""

    batches: list[torch.Tensor]
    fit_batches: int
    start: int
    reference: torch.Tensor
    trace: UnprunedTrace | None = None


def _holdout(model: nn.Module, batches: list[torch.Tensor], reference: torch.Tensor,
             cfg: PruneConfig, trace: UnprunedTrace | None = None) -> _Holdout:
    """Fit on up to `cfg.search_tokens` tokens (default 4x the widest MLP), score on as many
    other images (:func:`search_split`)."""
    an = resolve(model)
    per_row = [an.embed(x[:1]).shape[1] for x in batches]  # tokens per image/sentence
    budget = cfg.search_tokens or 4 * max(p.intermediate_size for p in an.parts)
    fit, held = search_split(batches, per_row, budget)
    start = sum(len(x) for x in fit)
    held_start = 0 if held is fit else start  # a single image: scored on itself
    held_ref = reference[held_start:held_start + sum(len(x) for x in held)]
    return _Holdout(fit + held, len(fit), start, held_ref, trace)


def _trial(model, plan, cfg, holdout: _Holdout) -> tuple[float, torch.Tensor]:
    """Held-out calibration distance of stage 1 under `plan` and `cfg` (model left unchanged),
    and the distance of each held-out row."""
    out = _width_stage(model, plan, holdout.batches, cfg, progress=False, trial=True,
                       fit_batches=holdout.fit_batches, unpruned=holdout.trace)["outputs"]
    logits = resolve(model).has_classifier
    held = out[holdout.start:]
    return (output_distance(held, holdout.reference, logits),
            row_distances(held, holdout.reference, logits))


def clear_gain(worse: torch.Tensor, better: torch.Tensor, z: float = HEAD_GAIN_Z) -> tuple[bool, float]:
    """Whether per-row distances `better` are lower than `worse` (the same rows) beyond their
    noise: the mean of the paired differences of their logarithms (each row's ratio: distances
    are positive and heavy-tailed, so a few rows far off would dominate plain differences) above
    `z` standard errors (one-sided). Rows below a millionth of the larger mean distance count at
    that floor (rounding, not a ratio). Returns (clear, the log differences' z score)."""
    w, b = worse.double(), better.double()
    if w.numel() < 2:
        return False, 0.0
    floor = 1e-6 * max(float(w.mean()), float(b.mean()), 1e-300)
    diff = torch.log(w.clamp_min(floor)) - torch.log(b.clamp_min(floor))
    se = float(diff.std() / diff.numel() ** 0.5)
    score = float(diff.mean()) / se if se > 0 else (float("inf") if diff.mean() > 0 else 0.0)
    return score > z, score


def _gate(tried: str, against: str, z: float, kept: bool) -> dict:
    """A held-out gate's record (:attr:`PruneResult.gates`)."""
    return {"tried": tried, "against": against, "z": round(z, 2), "kept": bool(kept)}


def _choose_refit(model, plan, holdout: _Holdout | None, cfg,
                  known: dict[str, tuple[float, torch.Tensor]], gates: dict[str, dict]
                  ) -> tuple[str, str, dict[str, float]]:
    """The neuron selection and refit prior to use on `plan`: cfg.selection, or for "auto" the
    selection with the better held-out calibration fidelity (the 2SSP score without the refit it
    needs); cfg.refit_prior, or for "auto" "unpruned" where its held-out gain over "zero" with
    that selection is clear (:func:`clear_gain`, recorded in `gates`), else "zero". `known`:
    trials already run (selection -> (distance, per-row distances); the split search's rank by
    the score, with the prior asked for, "zero" for "auto"). Returns (selection, refit prior,
    held-out distance per trial)."""
    selection, prior = cfg.selection, cfg.refit_prior
    fits = holdout is not None and cfg.compensation == "lsq" and cfg.sequential
    trials = dict(known)
    asked = "zero" if prior == "auto" else prior  # what the selections are tried with

    def trial(sel: str, pri: str = asked) -> tuple[float, torch.Tensor]:
        key = sel if pri == asked else f"{sel}, {pri} prior"
        if key not in trials:
            trials[key] = _trial(model, plan, replace(cfg, selection=sel, refit_prior=pri), holdout)
        return trials[key]

    tried: dict[str, float] = {}
    if selection == "auto":
        selection = "score"
        if fits and any(plan.neurons_to_prune):
            tried = {sel: trial(sel)[0] for sel in NEURON_SELECTIONS}
            selection = min(tried, key=lambda k: (tried[k], k != "score"))
            log.info("neuron selection: %s (held-out calibration distance %s)", selection,
                     ", ".join(f"{k} {v:.5f}" for k, v in tried.items()))
    if prior == "auto":
        prior = "zero"
        if fits:
            (base, base_rows), (alt, alt_rows) = trial(selection), trial(selection, "unpruned")
            tried.update({selection: base, f"{selection}, unpruned prior": alt})
            clear, score = clear_gain(base_rows, alt_rows)
            prior = "unpruned" if clear else "zero"
            gates["refit prior"] = _gate("unpruned", "zero", score, clear)
            log.info("refit prior: %s (held-out calibration distance %.4g toward zero, %.4g "
                     "toward the unpruned weights, paired z = %.2f)", prior, base, alt, score)
    return selection, prior, tried


def _choose_depth(pruner: Pruner, model, target, cfg, clock: _Clock, score_single: bool
                  ) -> tuple[PruningPlan, list[int], dict[str, float], dict, float | None,
                             torch.Tensor | None, dict[str, dict]]:
    """Select depth units and the width/depth split for one unit; returns (plan, removal order,
    calibration distance per tried plan, depth scores, the chosen plan's distance and per-row
    distances: None without trials, the held-out gates that ran)."""
    shape, split = pruner.shape, pruner.split
    fixed = cfg.fixed_heads
    # a fixed count of heads takes what depth units would: the counts that meet the target with it
    fits = _counts_with_heads(shape, target, cfg) if fixed else None
    if isinstance(split, int):
        candidates = [split]
        if fits is not None and split not in fits:
            raise ValueError(f"{split} {cfg.unit} units with {fixed} attention heads removed "
                             f"from every block that keeps its attention cannot meet target "
                             f"{target}: counts that can are {fits}")
    elif fits is not None and split == "alpha":  # the one nearest the 2SSP formula's count
        wanted = alpha_depth(shape, target, cfg.unit, cfg.alpha)
        candidates = [min(fits, key=lambda d: (abs(d - wanted), d))]
    elif fits is not None:  # the split search tries the largest
        candidates = fits[-max(1, cfg.max_search):]
    else:
        try:
            probe = cfg.plan(shape, target, depth="alpha")
        except ValueError:  # between whole depth units and the neurons: heads="auto" fills it
            filling = _gap_filling(pruner, target, cfg)
            if filling is None:
                raise
            return _choose_gap(pruner, model, target, cfg, clock, filling)
        options = feasible_depths(shape, target, cfg.unit, cfg.min_remaining, int(cfg.align))
        candidates = ([probe.blocks_to_prune] if split == "alpha" else
                      _search_candidates(options, probe.blocks_to_prune, cfg.max_search))
    budget = None
    if shape.units_differ(cfg.unit):  # units differ in size: never pick ones that overshoot
        sizes = shape.block_params if cfg.unit == "block" else shape.attention_params
        budget = Budget(target * shape.total_params + int(cfg.align) * min(shape.costs) / 2,
                        dict(enumerate(sizes)))
    order, depth_scores = pruner.depth_order(cfg.unit, max(candidates), budget)
    clock.lap("depth selection")
    orders = {d: list(order[:d]) for d in candidates}
    if shape.units_differ(cfg.unit):  # counts were judged on placeholders: check the chosen units
        orders = _feasible_orders(shape, target, cfg, candidates, order, depth_scores)
        candidates = sorted(orders)
    plans: dict[str, PruningPlan] = {}
    for d in candidates:
        heads = uniform_heads(shape, orders[d], per_block=fixed) if fixed else ()
        try:
            plans[str(d)] = cfg.plan(shape, target, depth_indices=orders[d], within=Within(heads=heads))
        except ValueError:
            if not heads or (d == candidates[-1] and not plans):
                raise  # a count the heads overshoot is skipped, unless none is left
    search: dict[str, float] = {}
    rows: dict[str, torch.Tensor] = {}  # each trial's per-row held-out distances
    gates: dict[str, dict] = {}
    if len(plans) > 1 or score_single or _head_fractions(pruner, cfg):
        _try_plans(pruner, model, plans, cfg, search, rows, bar=True)
    if _head_fractions(pruner, cfg):
        first = min(search, key=lambda k: (search[k], int(k)))
        if not shape.units_differ(cfg.unit):  # fewer units than any feasible without heads
            orders = {**{d: list(order[:d]) for d in range(int(first))}, **orders}
        _head_trials(pruner, model, target, cfg, orders, int(first), plans, search, rows, gates)
    best = _gated_best(plans, search, rows, cfg, gates)
    plan = plans[best]
    label = "search" if len(plans) > 1 else ("alpha" if split == "alpha" else "fixed")
    clock.lap("split search")
    return (replace(plan, split=label), list(orders[_units_of(best)]), search,
            depth_scores, search.get(best), rows.get(best), gates)


def _gap_filling(pruner: Pruner, target: float, cfg: PruneConfig) -> list[int] | None:
    """With heads="auto", where `target` falls between whole depth units and the neurons (no
    count of depth units meets it without heads), the counts of heads per block that reach it
    (:func:`vit_pruning.planner.heads_filling`); None where heads cannot fill it, or are not
    "auto" (a fixed count or "off" keeps the planner's error), or depth units differ in size."""
    shape, mr, align = pruner.shape, cfg.min_remaining, int(cfg.align)
    if (cfg.heads != "auto" or shape.units_differ(cfg.unit)
            or target > max_feasible_target(shape, cfg.unit, mr, align)  # out of reach: not a gap
            or feasible_depths(shape, target, cfg.unit, mr, align)):
        return None
    return heads_filling(shape, target, cfg.unit, mr, align) or None


def _choose_gap(pruner: Pruner, model, target, cfg, clock: _Clock, filling: list[int]
                ) -> tuple[PruningPlan, list[int], dict[str, float], dict, float | None,
                           torch.Tensor | None, dict[str, dict]]:
    """_choose_depth where only heads reach `target` (:func:`_gap_filling`): with calibration
    data to judge them, the head trials of heads="auto" (:func:`_head_trials`) from the most
    depth units any count of heads in `filling` meets it with, the closest kept (no plan
    without heads to gate against); without, the fewest heads per block that reach it
    (removed by weight magnitude), as heads=N would."""
    shape = pruner.shape
    if not _head_fractions(pruner, cfg):
        return _choose_depth(pruner, model, target, replace(cfg, heads=filling[0]), clock, False)
    first = max(d for n in filling for d in counts_with_heads(
        shape, target, cfg.unit, cfg.min_remaining, int(cfg.align), n))
    order, depth_scores = pruner.depth_order(cfg.unit, first)
    clock.lap("depth selection")
    orders = {d: list(order[:d]) for d in range(first + 1)}
    plans: dict[str, PruningPlan] = {}
    search: dict[str, float] = {}
    rows: dict[str, torch.Tensor] = {}
    gates: dict[str, dict] = {}
    _head_trials(pruner, model, target, cfg, orders, first, plans, search, rows, gates)
    if not plans:  # no share of all heads meets it: the planner's own error
        cfg.plan(shape, target, depth="alpha")
    best = min(plans, key=lambda k: (search[k], k))
    log.info("split search: %s (only heads reach target %s between whole %s units and the "
             "neurons)", best, target, cfg.unit)
    clock.lap("split search")
    return (replace(plans[best], split="search" if len(plans) > 1 else "fixed"),
            list(orders[_units_of(best)]), search, depth_scores, search[best], rows[best], gates)


def _try_plans(pruner: Pruner, model, plans: dict[str, PruningPlan], cfg: PruneConfig,
               search: dict[str, float], rows: dict[str, torch.Tensor], bar: bool = False) -> None:
    """The split search's trials: each of `plans` (its key: "<depth units>[+<more>]") pruned
    in width, measured on the held-out calibration data and undone (no model copies), ranked
    by the score; its distance goes into `search`, its per-row distances into `rows`."""
    trial_cfg = replace(cfg, selection="score")
    for key in tqdm(list(plans), desc=f"split search ({cfg.unit} units)", leave=False,
                    disable=not (bar and pruner.progress)):
        search[key], rows[key] = _trial(model, plans[key], trial_cfg, pruner.holdout)
        log.info("split search: %s (%s units) -> held-out calibration distance %.5f", key,
                 cfg.unit, search[key])


def _units_of(key: str) -> int:
    """The depth units of a split search's key ("3", "2+18 heads", "1+2 attention")."""
    return int(key.split("+")[0])


def _gated_best(plans: dict[str, PruningPlan], search: dict[str, float],
                rows: dict[str, torch.Tensor], cfg: PruneConfig, gates: dict[str, dict]) -> str:
    """The split search's choice among `plans` (the first without trials): the lowest held-out
    distance, and with heads="auto" a head plan only where its gain over the best plan without
    heads is clear on the held-out rows (:func:`clear_gain`, recorded in `gates`)."""
    if not search:
        return next(iter(plans))
    best = min((k for k in search if k in plans), key=lambda k: (search[k], "heads" in k, k))
    if "heads" in best and cfg.heads == "auto":  # heads only where the held-out rows say so
        plain = min((k for k in search if "heads" not in k),
                    key=lambda k: (search[k], _units_of(k), k))
        clear, score = clear_gain(rows[plain], rows[best])
        log.info("split search: %s against %s on the held-out rows: z = %.2f (%s)", best, plain,
                 score, "heads kept" if clear else "not clear: no heads")
        gates["heads"] = _gate(best, plain, score, clear)
        if not clear:
            best = plain
    return best


def _counts_with_heads(shape: ModelShape, target: float, cfg: PruneConfig) -> list[int]:
    """The depth counts, ascending, that meet the target with a fixed count of heads per block
    (cfg.heads: :func:`vit_pruning.planner.counts_with_heads`). ValueError where none does."""
    fits = counts_with_heads(shape, target, cfg.unit, cfg.min_remaining, int(cfg.align), cfg.heads)
    if not fits:
        raise ValueError(f"target {target}: no count of {cfg.unit} units meets it with {cfg.heads} "
                         f"attention heads removed from every block that keeps its attention "
                         f"(heads='auto' removes heads only where they fit)")
    return fits


def _head_fractions(pruner: Pruner, cfg: PruneConfig) -> tuple[float, ...]:
    """The shares of all heads heads="auto" tries: only with held-out calibration data
    to judge them, a refit pass to remove them in, and a shape that counts heads."""
    shape = pruner.shape
    if (cfg.heads != "auto" or pruner.holdout is None or not cfg.sequential
            or shape.head_params is None or not any(shape.heads)):
        return ()
    return HEAD_FRACTIONS


def _head_trials(pruner: Pruner, model, target, cfg, orders: dict[int, list[int]], first: int,
                 plans: dict[str, PruningPlan], search: dict[str, float],
                 rows: dict[str, torch.Tensor], gates: dict[str, dict]) -> None:
    """heads="auto": beside the best split without heads (`first` depth units), plans that also
    remove a share of all heads (HEAD_FRACTIONS, in order: the first two shares that can meet
    the target, then more while they lower the distance), the cheapest by their cost on the
    unpruned model (:meth:`Pruner.head_costs`, :func:`vit_pruning.planner.global_heads`), with
    that many depth units and with one fewer (the heads take its place; only where the split is
    searched: a count asked for stays), each a trial on the held-out calibration data; added to `plans`,
    `search` and `rows` (per-row distances) as "<depth units>+<heads> heads". While the best
    of them has the fewest depth units tried, heads take one more depth unit's place: one unit
    fewer with the larger shares, while they lower the distance (:func:`_fewer_units`). The
    best is kept only where its gain over the best plan without heads is clear on the held-out
    rows (:func:`clear_gain`), so the default never trades a sure plan for a noisy estimate."""
    trial = _HeadTrial(pruner, model, target, cfg, orders, plans, search, rows)
    shares = _head_fractions(pruner, cfg)
    searched = pruner.split == "search"
    depths = (first, first - 1) if searched else (first,)  # a depth count asked for (an int
    # split, or the alpha formula's) is kept as asked
    for d in depths:
        tried: list[float] = []
        for share in shares:
            if len(tried) >= 2 and tried[-1] >= min(tried[:-1]):  # the first two that meet
                break  # the target, more only while the last lowered the distance
            key = trial(d, share)
            if key is not None:  # None: too few heads to meet the target with d units, or
                tried.append(trial.search[key])  # too many
    if searched:
        _fewer_units(trial, shares, depths[-1], gates)


class _HeadTrial:
    """One head plan's trial: `trial(d, share)` tries `d` depth units (their first of the
    order) and `share` of all heads, the cheapest, removed, and returns its key in the split
    search's plans, distances (`search`) and rows (a plan tried before is not run again); None
    where no plan has them (no head left to remove, or the target cannot be met with them)."""

    def __init__(self, pruner, model, target, cfg, orders, plans, search, rows):
        self.pruner, self.model, self.target, self.cfg, self.orders = pruner, model, target, cfg, orders
        self.plans, self.search, self.rows = plans, search, rows
        self.costs = pruner.head_costs()
        self.total = sum(pruner.shape.heads)
        self.share_of: dict[str, float] = {}

    def __call__(self, d: int, share: float) -> str | None:
        if d not in self.orders:
            return None
        shape, cfg = self.pruner.shape, self.cfg
        heads = global_heads(shape, self.orders[d], self.costs, max(1, round(share * self.total)))
        key = f"{d}+{sum(heads)} heads"
        if not heads:
            return None
        if key not in self.search:
            try:
                plan = cfg.plan(shape, self.target, depth_indices=self.orders[d],
                                within=Within(heads=heads))
            except ValueError:  # the heads overshoot the target, or too few to meet it
                return None
            self.plans[key] = plan
            _try_plans(self.pruner, self.model, {key: plan}, cfg, self.search, self.rows)
            self.share_of[key] = share
        return key


def _fewer_units(trial: _HeadTrial, shares: Sequence[float], low: int,
                 gates: dict[str, dict]) -> None:
    """While the best head plan has the fewest depth units tried (`low`), try one unit fewer
    with the shares above its own (the heads take that unit's place), in order while they lower
    the distance (shares that cannot meet the target are passed over). A level whose best is
    not clearly closer than the plan it would replace (:func:`clear_gain`) is withdrawn from
    the candidates (its distances stay in the search's record) and the descent ends. Each
    level's gate is recorded in `gates` (the last one stays)."""
    while True:
        tried = [k for k in trial.share_of if _units_of(k) >= low and k in trial.plans]
        top = min(tried, key=lambda k: (trial.search[k], k), default=None)
        if top is None or _units_of(top) != low or low - 1 not in trial.orders:
            return
        low, best, level, before = low - 1, trial.search[top], [], set(trial.search)
        for share in (s for s in shares if s > trial.share_of[top]):
            key = trial(low, share)
            if key is None:
                continue
            if key not in before and key not in level:  # shares can round to the same heads
                level.append(key)
            if trial.search[key] >= best:
                break
            best = trial.search[key]
        if not level:
            return
        found = min(level, key=lambda k: (trial.search[k], k))
        clear, score = clear_gain(trial.rows[top], trial.rows[found])
        clear = clear and trial.search[found] < trial.search[top]
        log.info("split search: %s against %s on the held-out rows: z = %.2f (%s)", found, top,
                 score, "one depth unit fewer" if clear else "not clear: withdrawn")
        gates["fewer depth units"] = _gate(found, top, score, clear)
        if not clear:
            for k in level:
                trial.plans.pop(k)
            return


def _reach(shape: ModelShape, target: float, units: Sequence[str], cfg: PruneConfig
           ) -> dict[str, float]:
    """Per depth unit, the smallest target at least `target` it can meet (reachable_target);
    units that cannot reach it at all are left out (ValueError if none can)."""
    reach, errors = {}, []
    for u in units:
        try:
            reach[u] = reachable_target(shape, target, u, cfg.min_remaining, int(cfg.align))
        except ValueError as exc:
            errors.append(exc)
    if not reach:
        raise errors[0]
    return reach


def _choose_mixed(pruner: Pruner, model, target, cfg, clock: _Clock
                  ) -> tuple[PruningPlan, list[int], dict[str, float], dict, float | None,
                             torch.Tensor | None, dict[str, dict]] | None:
    """A latency target between two counts of whole blocks: plans that remove d blocks and the
    attention sublayers of as few kept blocks as let the widths meet `target` exactly
    (:func:`vit_pruning.planner.mixed_attention`), blocks and sublayers each in their own
    selection's order; with calibration data the split search picks among the block counts
    (up to cfg.max_search, fewest sublayers first), and with heads="auto" it also tries heads in
    the sublayers' place (:func:`_head_trials` from the best count: shares of all heads, the
    cheapest, with the widths meeting `target`), kept where clearly closer (:func:`_gated_best`).
    None where no count can, or where units differ in size (Swin stages, a model pruned before:
    those keep the unit's own rule)."""
    shape, mr, align = pruner.shape, cfg.min_remaining, int(cfg.align)
    need = mixed_options(shape, target, mr, align)  # block count -> placeholder sublayers
    if not need:
        return None
    cfg = replace(cfg, unit="block")
    counts = sorted(sorted(need, key=lambda d: (len(need[d]), -d))[:max(1, cfg.max_search)])
    if isinstance(pruner.split, int):  # a count asked for: the nearest that mixing completes
        counts = [min(need, key=lambda d: (abs(d - pruner.split), d))]
    elif pruner.holdout is None:  # nothing to search with
        counts = [mixed_choice(need)]
    order, block_scores = pruner.depth_order("block", max(counts))
    n_att = len(candidates(shape, "attention"))
    att_order, att_scores = pruner.depth_order(
        "attention", min(n_att, max(d + len(need[d]) for d in counts)))
    clock.lap("depth selection")
    plans: dict[str, PruningPlan] = {}
    for d in counts:
        att = mixed_attention(shape, target, order[:d], att_order, mr, align)
        if att:
            plans[f"{d}+{len(att)} attention"] = cfg.plan(shape, target, depth_indices=order[:d],
                                                          within=Within(attention=att))
    if not plans:
        return None
    search: dict[str, float] = {}
    rows: dict[str, torch.Tensor] = {}
    gates: dict[str, dict] = {}
    heads = _head_fractions(pruner, cfg)
    if len(plans) > 1 or heads:
        _try_plans(pruner, model, plans, cfg, search, rows, bar=True)
    if heads:  # heads in the sublayers' place: the time they free, spread over the blocks
        first = _units_of(min(search, key=lambda k: (search[k], k)))
        orders = {d: list(order[:d]) for d in range(len(order) + 1)}
        _head_trials(pruner, model, target, cfg, orders, first, plans, search, rows, gates)
    best = _gated_best(plans, search, rows, cfg, gates)
    plan, d = plans[best], _units_of(best)
    clock.lap("split search")
    log.info("latency target %.4f lies between two counts of whole blocks: %d blocks and %s",
             target, d, f"the attention sublayers of blocks {list(plan.attention_indices)}"
             if plan.attention_indices else f"{sum(plan.heads_to_prune)} attention heads")
    return (replace(plan, split="search" if len(search) > 1 else "mixed"), order[:d],
            search, {**block_scores, "attention": att_scores}, search.get(best), rows.get(best),
            gates)


def _feasible_orders(shape, target, cfg, counts, order, depth_scores) -> dict[int, list[int]]:
    """Depth units differ (Swin, or a model pruned before): for each count, the selection's own first units if
    they can meet the target (with a fixed count of heads, cfg.heads, from the blocks that
    stay), else the lowest-scored set that can (scores of the selection's first step); counts
    with neither are dropped."""
    scores = (depth_scores.get("greedy_steps") or [None])[0] or depth_scores.get(
        "weight_proxy") or depth_scores.get("block_influence") or {}
    scores = {int(k): float(v) for k, v in scores.items()}
    fixed = cfg.fixed_heads
    out = {}
    for d in counts:
        heads = uniform_heads(shape, order[:d], fixed) if fixed else ()
        if d <= len(order) and indices_feasible(shape, target, cfg.unit, order[:d],
                                                cfg.min_remaining, int(cfg.align), heads=heads):
            out[d] = list(order[:d])
            continue
        alt = best_feasible_units(shape, target, cfg.unit, d, scores, cfg.min_remaining,
                                  int(cfg.align), fixed)
        if alt is not None:
            out[d] = list(alt)
    if not out:
        raise ValueError(f"target {target}: no choice of {cfg.unit} units with the remaining "
                         f"neurons meets it (min_remaining={cfg.min_remaining})")
    return out


def _depth_only(pruner: Pruner, model, target, after_stage1):
    """stages="s2": remove the depth count nearest the target, no width pruning."""
    shape, cfg = pruner.shape, pruner.cfg
    count = depth_only_plan(shape, target, cfg.unit).blocks_to_prune
    order, depth_scores = pruner.depth_order(cfg.unit, count)
    plan = depth_only_plan(shape, target, cfg.unit, order)
    if after_stage1 is not None:
        after_stage1(model)
    apply_depth(model, order, cfg.unit)
    after = count_total_params(model)
    before = pruner.param_shape.total_params
    return model, PruneResult(
        plan=plan, config=cfg, params_before=before,
        params_after_stage1=before, params_after_stage2=after, depth_order=order,
        neurons_removed=[0] * shape.num_blocks, kept_neurons=None, depth_scores=depth_scores,
        timings=dict(pruner.timings),
        **pruner.objective_fields(plan, [0] * shape.num_blocks, after))


def first_images(batches: list[torch.Tensor], count: int | None) -> list[torch.Tensor]:
    """The first `count` images of a list of batches (all of them if None)."""
    if count is None:
        return batches
    out, left = [], count
    for x in batches:
        if left <= 0:
            break
        out.append(x[:left])
        left -= len(out[-1])
    return out


def search_split(batches: list[torch.Tensor], tokens_per_row: Sequence[int], budget: int
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Split trials fit on the first calibration images holding `budget` tokens (at most half
    the images) and are scored on as many *other* images: scoring on the fitted images would
    reward the refit's overfitting."""
    total = sum(len(x) for x in batches)
    n, tokens = 0, 0
    for x, per in zip(batches, tokens_per_row):
        for _ in range(len(x)):
            if tokens >= budget or n >= total // 2:
                break
            n, tokens = n + 1, tokens + per
    n = max(1, n)
    fit = first_images(batches, n)
    rest, skip = [], n
    for x in batches:
        if skip >= len(x):
            skip -= len(x)
            continue
        rest.append(x[skip:])
        skip = 0
    if not rest:  # a single calibration image: nothing to hold out
        return fit, fit
    return fit, first_images(rest, n)


def _search_candidates(options: list[int], anchor: int, limit: int) -> list[int]:
    """Up to `limit` feasible depth counts nearest the alpha formula's (always including 0-side)."""
    ranked = sorted(options, key=lambda d: (abs(d - anchor), d))[:max(1, limit)]
    return sorted(ranked)
