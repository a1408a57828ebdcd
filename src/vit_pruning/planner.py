"""Planner: how many depth units and MLP neurons to remove to hit one global sparsity target.

Pure arithmetic on a :class:`ModelShape` (integers in, a frozen :class:`PruningPlan` out).

Sparsity is ``1 - params_after / params_before`` over the whole model as passed (embeddings,
blocks, norms and head included). Removing ``n`` neurons from a block removes exactly
``n * (2 * hidden + 1)`` parameters (a row + bias of fc1, a column of fc2; SwiGLU adds a gate
row: :attr:`ModelShape.neuron_params`), so after choosing the
depth units the neuron count is the rounded remainder and the plan misses the target by at most
half a neuron's parameters.

With ``align > 1`` every kept MLP width is a multiple of ``align`` (or the block's full width):
GPU tensor cores run a matmul whose inner dimension is not a multiple of 8 several times slower
in bf16/fp16. Neurons then go in groups of ``align`` and the plan misses the target by at most
half a group's parameters. ``width_policy="uniform"`` gives every surviving block the *same*
aligned width (the saved model is then a plain transformers model); ``"auto"`` does so whenever
that keeps the target error within :data:`UNIFORM_TOLERANCE`.

The split between stages follows the 2SSP paper (Sandri et al. 2025, arXiv 2501.17771):
``N = round(B * s ** ((P_mlp / P_attn) / alpha))`` with ``s`` the target measured on the blocks,
then moved to the nearest depth count for which the target is reachable. The pipeline can
override it with a search by calibration fidelity (:func:`feasible_depths` lists the options).
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

UNITS = ("block", "attention")
WIDTH_POLICIES = ("auto", "uniform", "per-block")
UNIFORM_TOLERANCE = 1e-3  # "auto" prefers one width for all blocks if it misses by <= 0.1 pp


@dataclass(frozen=True)
class ModelShape:
    """Parameter bookkeeping of a model, per block; see :func:`vit_pruning.pipeline.model_shape`."""

    total_params: int
    hidden_size: int
    widths: tuple[int, ...]  # MLP hidden width of each block
    block_params: tuple[int, ...]  # all parameters of each block
    attention_params: tuple[int, ...]  # attention sublayer + its pre-norm (0 if already removed)
    params_per_neuron: int | None = None  # parameters one MLP neuron holds; None: 2 * hidden + 1
    # (an fc1 row with its bias and an fc2 column; SwiGLU MLPs hold a gate row too)
    neuron_costs: tuple[int, ...] | None = None  # per block, where blocks differ (Swin stages)
    stages: tuple[int, ...] | None = None  # stage of each block; every stage keeps one block
    heads: tuple[int, ...] | None = None  # attention heads of each block (0: sublayer removed);
    # None where heads are not a unit (FLOP and latency shapes, a shared relative position bias)
    head_params: tuple[int, ...] | None = None  # parameters one head of each block holds

    @property
    def num_blocks(self) -> int:
        return len(self.widths)

    @property
    def neuron_params(self) -> int:
        """Parameters of one neuron (of the largest, where blocks differ)."""
        if self.neuron_costs:
            return max(self.neuron_costs)
        return self.params_per_neuron or 2 * self.hidden_size + 1

    @property
    def costs(self) -> tuple[int, ...]:
        """Parameters of one neuron of each block."""
        return self.neuron_costs or (self.neuron_params,) * self.num_blocks

    @property
    def heterogeneous(self) -> bool:
        """Blocks whose neurons hold different parameter counts (Swin): the planner then
        spreads removal in proportion to width and lands within half the smallest group."""
        return len(set(self.costs)) > 1

    def units_differ(self, unit: str) -> bool:
        """Whether which depth units go changes the arithmetic, not only how many: neurons of
        different sizes (Swin), or units of different sizes or MLP widths (a model pruned
        before, with per-block widths or some attention already removed). The planner then
        judges the chosen units themselves, never a count on placeholder units."""
        if self.heterogeneous:
            return True
        cands = candidates(self, unit)
        sizes = self.block_params if unit == "block" else self.attention_params
        return (len({sizes[i] for i in cands}) > 1 or
                (unit == "block" and len({self.widths[i] for i in cands}) > 1))


@dataclass(frozen=True)
class Within:
    """What a plan removes inside the blocks that stay, beside MLP neurons: the attention
    sublayers of kept blocks (mixed depth units, unit "block" only: :func:`mixed_attention`)
    and attention heads per block (:func:`uniform_heads`, :func:`global_heads`)."""

    attention: Sequence[int] = ()
    heads: Sequence[int] = ()


@dataclass(frozen=True)
class PruningPlan:
    """What to remove. Indices refer to the blocks of the model the plan was made for."""

    target: float
    unit: str
    blocks_to_prune: int  # depth units removed (whole blocks or attention sublayers)
    depth_indices: tuple[int, ...]  # which blocks lose their block/attention
    per_block_neurons_to_prune: int  # the uniform count (seed API); see neurons_to_prune
    neurons_to_prune: tuple[int, ...]  # exact per-block counts (0 for blocks removed whole)
    min_remaining: int
    params_before: int
    params_after: int  # predicted, exact
    predicted_sparsity: float
    max_feasible_target: float
    split: str  # how blocks_to_prune was chosen: "alpha", "search" or "fixed"
    notes: tuple[str, ...] = field(default_factory=tuple)
    align: int = 1  # kept widths are multiples of this (or the block's full width)
    uniform_width: int | None = None  # the one width of every surviving block, if there is one
    attention_indices: tuple[int, ...] = ()  # a block plan that also removes the attention
    # sublayers of these kept blocks (mixed depth units, see mixed_attention)
    heads_to_prune: tuple[int, ...] = ()  # attention heads removed per block (() : none); a
    # block keeps at least one (losing all is its attention depth unit)

    @property
    def target_error(self) -> float:
        return abs(self.predicted_sparsity - self.target)

    @property
    def removed_blocks(self) -> tuple[int, ...]:
        """Blocks this plan removes whole."""
        return self.depth_indices if self.unit == "block" else ()

    @property
    def removed_attention(self) -> tuple[int, ...]:
        """Blocks that stay but lose their attention sublayer (its unit's, or a mixed plan's)."""
        return (*(self.depth_indices if self.unit == "attention" else ()), *self.attention_indices)

    @property
    def removes_heads(self) -> bool:
        return any(self.heads_to_prune)

    def to_dict(self) -> dict:
        return asdict(self)


def default_align(shape: ModelShape, preferred: int = 8) -> int:
    """The alignment `align="auto"` uses: `preferred` (8: what bf16/fp16 tensor cores need),
    halved until half a group of neurons is within UNIFORM_TOLERANCE of the model's parameters,
    so the per-block plan still lands within 0.1 pp on small models (where alignment buys
    nothing anyway)."""
    align = preferred
    while align > 1 and align * shape.neuron_params / 2 > UNIFORM_TOLERANCE * shape.total_params:
        align //= 2
    return align


def _check_unit(unit: str) -> None:
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")


def _depth_removed(shape: ModelShape, unit: str, indices: Sequence[int]) -> int:
    per = shape.block_params if unit == "block" else shape.attention_params
    return sum(per[i] for i in indices)


def _survivors(shape: ModelShape, unit: str, indices: Sequence[int]) -> list[int]:
    gone = set(indices) if unit == "block" else set()
    return [i for i in range(shape.num_blocks) if i not in gone]


def aligned_floor(min_remaining: int, align: int) -> int:
    """The narrowest kept width allowed: min_remaining rounded up to a multiple of align."""
    return -(-min_remaining // align) * align


def _capacity(shape: ModelShape, survivors: Sequence[int], min_remaining: int,
              align: int = 1) -> list[int]:
    floor = aligned_floor(min_remaining, align)
    return [max(0, shape.widths[i] - floor) if i in survivors else 0
            for i in range(shape.num_blocks)]


def default_depth_indices(shape: ModelShape, unit: str, count: int) -> tuple[int, ...]:
    """Placeholder indices for a plan made before depth selection: the last `count` candidates
    (a stage's last block is never among them)."""
    if not count:
        return ()
    cands = candidates(shape, unit)
    if unit == "block" and shape.stages is not None:
        left = {st: shape.stages.count(st) for st in set(shape.stages)}
        picked = []
        for i in reversed(cands):
            if len(picked) < count and left[shape.stages[i]] > 1:
                picked.append(i)
                left[shape.stages[i]] -= 1
        return tuple(sorted(picked))
    return tuple(sorted(cands[len(cands) - count:]))


def candidates(shape: ModelShape, unit: str) -> list[int]:
    """Blocks that can still lose a depth unit."""
    if unit == "block":
        return list(range(shape.num_blocks))
    return [i for i in range(shape.num_blocks) if shape.attention_params[i] > 0]


def max_depth_units(shape: ModelShape, unit: str) -> int:
    """At least one block (one per stage) must remain; every attention sublayer may go."""
    n = len(candidates(shape, unit))
    if unit == "block":
        return n - (len(set(shape.stages)) if shape.stages is not None else 1)
    return n


def _capacity_params(shape: ModelShape, survivors: Sequence[int], min_remaining: int,
                     align: int = 1) -> int:
    """Parameters the surviving blocks' removable neurons hold."""
    return sum(c * n for c, n in zip(shape.costs, _capacity(shape, survivors, min_remaining, align)))


def _removal(shape: ModelShape, unit: str, indices: Sequence[int], min_remaining: int,
             align: int, attention: Sequence[int] = (), heads: Sequence[int] = ()
             ) -> tuple[int, int]:
    """(what removing depth units `indices`, the attention sublayers `attention` of kept blocks
    and `heads` heads per block frees, what the surviving blocks' neurons can still free)."""
    removed = (_depth_removed(shape, unit, indices) + _depth_removed(shape, "attention", attention)
               + heads_removed(shape, heads))
    return removed, _capacity_params(shape, _survivors(shape, unit, indices), min_remaining, align)


def indices_feasible(shape: ModelShape, target: float, unit: str, indices: Sequence[int],
                     min_remaining: int, align: int = 1, attention: Sequence[int] = (),
                     heads: Sequence[int] = ()) -> bool:
    """Whether removing depth units `indices` (and, with unit "block", the attention sublayers
    of the kept blocks `attention`, and `heads` attention heads per block) leaves a width
    removal that meets the target to within half a group of the smallest neurons."""
    goal = target * shape.total_params
    half = align * min(shape.costs) / 2
    removed, cap = _removal(shape, unit, indices, min_remaining, align, attention, heads)
    if shape.stages is not None and unit == "block":
        kept = {shape.stages[i] for i in _survivors(shape, unit, indices)}
        if kept != set(shape.stages):
            return False
    return removed <= goal + half and removed + cap >= goal - half


def heads_removed(shape: ModelShape, heads: Sequence[int]) -> int:
    """Parameters (or the shape's units) that removing `heads[i]` heads of each block frees."""
    if not any(heads):
        return 0
    return sum(n * c for n, c in zip(heads, shape.head_params))


def counts_with_heads(shape: ModelShape, target: float, unit: str, min_remaining: int,
                      align: int, per_block: int) -> list[int]:
    """The depth counts, ascending, that meet the target with `per_block` heads removed from
    every block that keeps its attention (:func:`uniform_heads`), which frees what depth units
    would: units of one size, any of a count will do for the check; units that differ (a model
    pruned before, Swin), some set of them (:func:`best_feasible_units`)."""
    units = candidates(shape, unit)
    counts = range(max_depth_units(shape, unit) + 1)
    if shape.units_differ(unit):
        return [d for d in counts if best_feasible_units(
            shape, target, unit, d, {i: -i for i in units}, min_remaining, align, per_block)
            is not None]
    return [d for d in counts if indices_feasible(shape, target, unit, units[:d], min_remaining,
                                                  align, heads=uniform_heads(shape, units[:d],
                                                                             per_block))]


def heads_filling(shape: ModelShape, target: float, unit: str, min_remaining: int,
                  align: int = 1) -> list[int]:
    """The fixed counts of heads per block with which some count of depth units meets the
    target (:func:`counts_with_heads`): what fills a gap between whole depth units and the
    neurons ([] where the shape does not count heads)."""
    if shape.head_params is None or not any(shape.heads):
        return []
    return [n for n in range(1, max(shape.heads))
            if counts_with_heads(shape, target, unit, min_remaining, align, n)]


def uniform_heads(shape: ModelShape, indices: Sequence[int], per_block: int) -> tuple[int, ...]:
    """`per_block` heads removed from every block that keeps its attention sublayer after depth
    units `indices` go, each keeping at least one head; () where that removes none."""
    gone = set(indices)
    counts = [0 if i in gone or n == 0 else max(0, min(per_block, n - 1))
              for i, n in enumerate(shape.heads)]
    return tuple(counts) if any(counts) else ()


def global_heads(shape: ModelShape, indices: Sequence[int], costs: Sequence[Sequence[float]],
                 total: int) -> tuple[int, ...]:
    """Heads removed per block: the `total` cheapest by `costs` (per block, each head's cost of
    removal, comparable across blocks) among the blocks that keep their attention after depth
    units `indices` go, each keeping at least one head; () where that removes none. Ties go to
    the later block, then the higher head."""
    gone = set(indices)
    ranked = sorted((c, -i, -h, i) for i in range(shape.num_blocks)
                    if i not in gone and shape.heads[i] > 1
                    for h, c in enumerate(sorted(costs[i])[:shape.heads[i] - 1]))
    counts = [0] * shape.num_blocks
    for *_, i in ranked[:max(0, total)]:
        counts[i] += 1
    return tuple(counts) if any(counts) else ()


def _check_heads(shape: ModelShape, unit: str, indices: Sequence[int], heads: Sequence[int],
                 attention: Sequence[int]) -> tuple[int, ...]:
    if not any(heads):
        return ()
    if shape.heads is None or shape.head_params is None:
        raise ValueError("this model's shape has no attention heads to prune (heads are a unit "
                         "of the parameter objective, and not with a shared relative position bias)")
    if len(heads) != shape.num_blocks:
        raise ValueError(f"heads has {len(heads)} entries, the model has {shape.num_blocks} blocks")
    gone = set(indices) | set(attention)
    for i, n in enumerate(heads):
        if n < 0 or (n and (i in gone or n >= shape.heads[i])):
            raise ValueError(f"block {i}: cannot remove {n} of its {shape.heads[i]} attention heads "
                             f"(a block keeps at least one; a removed depth unit has none to lose)")
    return tuple(int(n) for n in heads)


BEST_UNITS_SPLITS = 200_000  # best_feasible_units: splits tried at most (many groups of one
# unit each, as a model pruned to per-block widths and heads may have)


def best_feasible_units(shape: ModelShape, target: float, unit: str, count: int,
                        scores: dict[int, float], min_remaining: int,
                        align: int = 1, heads_per_block: int = 0) -> tuple[int, ...] | None:
    """Where depth units differ in size (Swin stages, a model pruned before): the `count` units
    with the lowest total score among the sets that can still meet the target
    (:func:`indices_feasible`), or None. Alike units (one stage, the same size and the same MLP
    width and neuron cost: what feasibility reads) are interchangeable, so a set is judged by
    how many it takes from each group of alike units, and from each group it takes the
    lowest-scored: every split of `count` over the groups is tried (the first
    BEST_UNITS_SPLITS of them where there are more). `heads_per_block`: a fixed count of heads
    (:func:`uniform_heads`) goes from every block that keeps its attention too."""
    groups: dict[tuple, list[int]] = {}
    stage = shape.stages or (0,) * shape.num_blocks
    size = shape.attention_params if unit == "attention" else shape.block_params
    for i in candidates(shape, unit):
        if i in scores:  # a block pruned before (its heads, its width, its attention) differs
            groups.setdefault((stage[i], size[i], shape.widths[i], shape.costs[i]), []).append(i)
    keys = sorted(groups)
    for k in keys:
        groups[k].sort(key=lambda i: (scores[i], i))
    keep_one = unit == "block" and shape.stages is not None
    limits = [min(count, len(groups[k]) - (1 if keep_one else 0)) for k in keys]
    best: tuple[float, tuple[int, ...]] | None = None
    splits = (split for split in itertools.product(*[range(m + 1) for m in limits])
              if sum(split) == count)
    for split in itertools.islice(splits, BEST_UNITS_SPLITS):
        chosen = [i for k, n in zip(keys, split) for i in groups[k][:n]]
        heads = uniform_heads(shape, chosen, heads_per_block) if heads_per_block else ()
        if indices_feasible(shape, target, unit, chosen, min_remaining, align, heads=heads):
            total = sum(scores[i] for i in chosen)
            if best is None or total < best[0]:
                best = (total, tuple(sorted(chosen, key=lambda i: (scores[i], i))))
    return None if best is None else best[1]


def mixed_attention(shape: ModelShape, target: float, blocks: Sequence[int], order: Sequence[int],
                    min_remaining: int, align: int = 1) -> tuple[int, ...] | None:
    """Mixed depth units: the fewest attention sublayers of kept blocks, taken in `order` (the
    attention selection's removal order), that with the blocks `blocks` removed let the widths
    meet `target`; () if the blocks alone can, None if no count can (the sublayers overshoot or
    run out). It fills what lies between two counts of whole blocks where a block costs far more
    than all the MLP widths can make up (latency at batch 1): blocks, then attention sublayers,
    then neurons."""
    goal = target * shape.total_params + align * min(shape.costs) / 2
    gone = set(blocks)
    kept = [i for i in order if i not in gone and shape.attention_params[i] > 0]
    for k in range(len(kept) + 1):
        att = kept[:k]
        if indices_feasible(shape, target, "block", blocks, min_remaining, align, att):
            return tuple(att)
        if _depth_removed(shape, "block", blocks) + _depth_removed(shape, "attention", att) > goal:
            return None
    return None


def mixed_options(shape: ModelShape, target: float, min_remaining: int, align: int = 1
                  ) -> dict[int, tuple[int, ...]]:
    """Block counts from which mixed depth units meet `target`, each with the attention
    sublayers it needs on placeholder units (:func:`mixed_attention`); {} where none can, where
    a count of whole blocks meets it alone, or where units differ in size (Swin stages, a model
    pruned before: those keep the unit's own rule, so placeholders would not stand for them)."""
    if shape.units_differ("block") or shape.units_differ("attention"):
        return {}
    out = {}
    for d in range(max_depth_units(shape, "block") + 1):
        blocks = default_depth_indices(shape, "block", d)
        att = mixed_attention(shape, target, blocks, candidates(shape, "attention"),
                              min_remaining, align)
        if att is not None:
            if not att:
                return {}
            out[d] = att
    return out


def mixed_choice(options: dict[int, tuple[int, ...]]) -> int:
    """The block count of :func:`mixed_options` a plan takes without data to search with: the
    one that needs the fewest attention sublayers (the most blocks on a tie)."""
    return min(options, key=lambda d: (len(options[d]), -d))


def units_of(unit: str) -> tuple[str, ...]:
    """The depth units a unit option tries: both for "auto", else the one named."""
    return UNITS if unit == "auto" else (unit,)


def max_target_over(shape: ModelShape, units: Sequence[str], min_remaining: int,
                    align: int = 1, heads_per_block: int = 0) -> float:
    """The largest feasible target with any of `units` (:func:`max_feasible_target`)."""
    return max(max_feasible_target(shape, u, min_remaining, align, heads_per_block) for u in units)


def max_feasible_target(shape: ModelShape, unit: str, min_remaining: int, align: int = 1,
                        heads_per_block: int = 0) -> float:
    """Largest sparsity reachable with this unit and `min_remaining` neurons per surviving block,
    and with `heads_per_block` (a fixed count, :func:`uniform_heads`) those heads of every block
    that keeps its attention, where the shape counts heads."""
    _check_unit(unit)
    best = 0
    for d in range(max_depth_units(shape, unit) + 1):
        for idx in _extreme_units(shape, unit, d, min_remaining, align):
            heads = (uniform_heads(shape, idx, heads_per_block)
                     if heads_per_block and shape.head_params is not None else ())
            best = max(best, sum(_removal(shape, unit, idx, min_remaining, align, heads=heads)))
    return best / shape.total_params


def _extreme_units(shape: ModelShape, unit: str, count: int, min_remaining: int,
                   align: int) -> list[tuple[int, ...]]:
    """Placeholder units, and where units differ (:meth:`ModelShape.units_differ`, Swin
    excepted: its stages keep their own rule) the `count` units that remove the least and the
    ones that reach the most (their parameters beyond the MLP capacity they take along)."""
    out = [default_depth_indices(shape, unit, count)]
    if shape.stages is None and shape.units_differ(unit) and count:
        full = _capacity(shape, list(range(shape.num_blocks)), min_remaining, align)
        per = shape.block_params if unit == "block" else shape.attention_params
        gain = {i: per[i] - (shape.costs[i] * full[i] if unit == "block" else 0)
                for i in candidates(shape, unit)}
        out.append(tuple(sorted(sorted(gain, key=lambda i: (per[i], i))[:count])))
        out.append(tuple(sorted(sorted(gain, key=lambda i: (-gain[i], i))[:count])))
    return out


def feasible_depths(shape: ModelShape, target: float, unit: str, min_remaining: int,
                    align: int = 1) -> list[int]:
    """Depth-unit counts from which the target can be met to within half a neuron (half a
    group of `align` neurons)."""
    _check_unit(unit)
    if shape.stages is None and shape.units_differ(unit):
        # units differ: a count is kept if the units that remove least do not overshoot and
        # the ones that reach most get there (the pipeline then checks the units it chose)
        goal, half = target * shape.total_params, align * min(shape.costs) / 2
        out = []
        for d in range(max_depth_units(shape, unit) + 1):
            _, least, most = _extreme_units(shape, unit, d, min_remaining, align) if d else [()] * 3
            reach = _depth_removed(shape, unit, most) + _capacity_params(
                shape, _survivors(shape, unit, most), min_remaining, align)
            if _depth_removed(shape, unit, least) <= goal + half and reach >= goal - half:
                out.append(d)
        return out
    return [d for d in range(max_depth_units(shape, unit) + 1)
            if indices_feasible(shape, target, unit, default_depth_indices(shape, unit, d),
                                min_remaining, align)]


def reachable_target(shape: ModelShape, target: float, unit: str, min_remaining: int,
                     align: int = 1) -> float:
    """The smallest target at least `target` that some depth count can meet: `target` itself
    when one can, else where the next count's units alone begin. For objectives where the MLP
    width buys little (latency at batch 1), a target between two depth counts is met by removing
    more, never less. ValueError above the largest feasible target."""
    _check_unit(unit)
    maximum = max_feasible_target(shape, unit, min_remaining, align)
    validate_target(target, maximum, "with this min_remaining, align and depth unit")
    if feasible_depths(shape, target, unit, min_remaining, align):
        return target
    starts = []
    for d in range(1, max_depth_units(shape, unit) + 1):
        for idx in _extreme_units(shape, unit, d, min_remaining, align):
            start = _depth_removed(shape, unit, idx) / shape.total_params
            if start > target and feasible_depths(shape, start, unit, min_remaining, align):
                starts.append(start)
    if not starts:
        raise ValueError(f"target {target}: no depth count of {unit} units reaches it or more "
                         f"(min_remaining={min_remaining})")
    return min(starts)


def alpha_depth(shape: ModelShape, target: float, unit: str, alpha: float = 1.5) -> int:
    """The 2SSP paper's depth count: round(B * s ** ((P_mlp / P_attn) / alpha))."""
    block_total = sum(shape.block_params)
    s = min(1.0, target * shape.total_params / block_total)  # target measured on blocks
    attn = max(shape.attention_params) or 1
    mlp = max(w * c for w, c in zip(shape.widths, shape.costs))
    return int(round(shape.num_blocks * s ** ((mlp / attn) / alpha)))


def _spread(total: int, capacity: Sequence[int], survivors: Sequence[int]) -> list[int]:
    """Remove `total` neurons as evenly as capacity allows (water-filling), deterministic."""
    counts = [0] * len(capacity)
    left = total
    open_ = [i for i in survivors if capacity[i] > 0]
    while left > 0 and open_:
        share, extra = divmod(left, len(open_))
        for k, i in enumerate(open_):
            want = share + (1 if k < extra else 0)
            take = min(want, capacity[i] - counts[i])
            counts[i] += take
            left -= take
        open_ = [i for i in open_ if counts[i] < capacity[i]]
    if left:
        raise ValueError(f"cannot place {left} more neurons within min_remaining")
    return counts


def _aligned_spread(goal: float, shape: ModelShape, survivors: Sequence[int], min_remaining: int,
                    align: int) -> list[int]:
    """Neurons removed per block so that kept widths are multiples of `align` (or untouched),
    as even as possible (each group comes off the widest block left, ties to the lowest index),
    totalling as near `goal` neurons as the groups allow."""
    floor = aligned_floor(min_remaining, align)
    counts = [0] * shape.num_blocks
    open_ = {i: shape.widths[i] for i in survivors if shape.widths[i] > floor}  # kept widths
    removed = 0
    while open_:
        i = min(open_, key=lambda b: (-open_[b], b))
        step = open_[i] - ((open_[i] - 1) // align) * align  # down to the next multiple of align
        if removed + step / 2 >= goal:
            break
        removed += step
        counts[i] += step
        open_[i] -= step
        if open_[i] <= floor:
            del open_[i]
    return counts


def _param_spread(goal: float, shape: ModelShape, survivors: Sequence[int], min_remaining: int,
                  align: int) -> list[int]:
    """Blocks whose neurons differ in size (Swin stages): remove the same fraction of every
    surviving block's width (in groups of `align`, within capacity), then top up block by block,
    largest neurons first, so the removed parameters land within half a group of the smallest
    neurons of `goal` (parameters)."""
    floor = aligned_floor(min_remaining, align)
    cap = {i: max(0, shape.widths[i] - floor) // align for i in survivors}  # in groups
    cost = {i: align * shape.costs[i] for i in survivors}  # parameters per group

    def fill(f: float) -> dict[int, int]:
        return {i: min(cap[i], int(f * shape.widths[i] / align)) for i in survivors}

    lo, hi = 0.0, 1.0
    for _ in range(60):  # the largest fraction whose removal stays within the goal
        mid = (lo + hi) / 2
        if sum(n * cost[i] for i, n in fill(mid).items()) <= goal:
            lo = mid
        else:
            hi = mid
    groups = fill(lo)
    left = goal - sum(n * cost[i] for i, n in groups.items())
    for i in sorted(survivors, key=lambda b: (-cost[b], b)):
        take = min(cap[i] - groups[i], int(left // cost[i]))
        groups[i] += take
        left -= take * cost[i]
    room = [i for i in survivors if groups[i] < cap[i]]
    if room:
        i = min(room, key=lambda b: (cost[b], b))
        if left > cost[i] / 2:
            groups[i] += 1
    return [groups.get(i, 0) * align for i in range(shape.num_blocks)]


def _uniform_width(goal: float, shape: ModelShape, survivors: Sequence[int], min_remaining: int,
                   align: int) -> int | None:
    """The one kept width (a multiple of `align`, or the common full width) for every surviving
    block whose removal is nearest `goal` neurons; None if the survivors allow none."""
    if not survivors:
        return None
    top = min(shape.widths[i] for i in survivors)
    options = list(range(aligned_floor(min_remaining, align), top + 1, align))
    if len({shape.widths[i] for i in survivors}) == 1 and top not in options:
        options.append(top)  # no pruning at all keeps the (unaligned) original width
    if not options:
        return None
    return min(options, key=lambda w: (abs(sum(shape.widths[i] - w for i in survivors) - goal), -w))


def validate_target(target: float, maximum: float,
                    what: str = "with this min_remaining and depth unit") -> None:
    if not 0.0 < target < 1.0:
        raise ValueError(f"target must be in (0, 1) exclusive, got {target}; "
                         f"the maximum feasible target is {maximum:.4f}")
    if target > maximum:
        raise ValueError(f"target {target} is infeasible: the maximum feasible target {what} "
                         f"is {maximum:.4f}")


def make_plan(shape: ModelShape, target: float, unit: str = "block", min_remaining: int = 512,
              depth: int | str = "alpha", depth_indices: Sequence[int] | None = None,
              alpha: float = 1.5, align: int = 1, width_policy: str = "per-block",
              within: "Within | None" = None) -> PruningPlan:
    """Plan the removal. `depth` is an int (fixed count) or "alpha" (2SSP formula).

    `depth_indices` names which blocks lose their unit (from depth selection); without it the
    plan uses placeholder indices, which give the same counts on uniform models.
    `within` (with `depth_indices`): what else goes inside the blocks that stay, before the
    neurons fill what is left of the target (:class:`Within`: attention sublayers of kept
    blocks, attention heads per block). `align`: kept widths are multiples of it;
    `width_policy`: "per-block" (widths as even as the target allows, to within half a group),
    "uniform" (one width for every surviving block), or "auto" (uniform when align > 1 and its
    target error is at most UNIFORM_TOLERANCE).
"""
    within = within or Within()
    if any(within.heads) and depth_indices is None:
        raise ValueError("heads need depth_indices (they are counted in the blocks that stay)")
    att = _check_plan_args(shape, unit, min_remaining, align, width_policy, depth_indices,
                           within.attention)
    heads = _check_heads(shape, unit, depth_indices or (), within.heads, att)
    maximum = max_feasible_target(shape, unit, min_remaining, align)
    reach = maximum  # what goes inside kept blocks (`within`) may reach beyond depth units alone
    if att or heads:
        reach = max(maximum, sum(_removal(shape, unit, tuple(depth_indices), min_remaining, align,
                                          att, heads)) / shape.total_params)
    validate_target(target, reach, "with this min_remaining, align and depth unit"
                    + (" (and what goes inside the kept blocks)" if reach > maximum else ""))
    options = feasible_depths(shape, target, unit, min_remaining, align)
    if not options and not att and not heads:
        fill = heads_filling(shape, target, unit, min_remaining, align)
        hint = (f"heads=N (N attention heads removed from every block: N in {fill} reach it), "
                if fill else "")
        raise ValueError(f"target {target} falls between what whole {unit} units and the remaining "
                         f"neurons can reach (min_remaining={min_remaining}); try {hint}a lower "
                         f"min_remaining or another target")
    d, idx, split, notes = _plan_depth(shape, target, unit, min_remaining, align, depth,
                                       depth_indices, alpha, options, Within(att, heads))
    removed_depth = (_depth_removed(shape, unit, idx) + _depth_removed(shape, "attention", att)
                     + heads_removed(shape, heads))
    survivors = _survivors(shape, unit, idx)
    counts, uniform = _plan_widths(shape, target, removed_depth, survivors, min_remaining, align,
                                   width_policy)
    n = sum(counts)
    after = shape.total_params - removed_depth - sum(c * k for c, k in zip(shape.costs, counts))
    return PruningPlan(
        target=target, unit=unit, blocks_to_prune=d, depth_indices=idx,
        per_block_neurons_to_prune=n // max(1, len(survivors)), neurons_to_prune=tuple(counts),
        min_remaining=min_remaining, params_before=shape.total_params, params_after=after,
        predicted_sparsity=1 - after / shape.total_params, max_feasible_target=maximum,
        split=split, notes=tuple(notes), align=align, uniform_width=uniform,
        attention_indices=att, heads_to_prune=heads,
    )


def _check_plan_args(shape: ModelShape, unit: str, min_remaining: int, align: int,
                     width_policy: str, depth_indices: Sequence[int] | None,
                     attention_indices: Sequence[int]) -> tuple[int, ...]:
    """make_plan's arguments checked; returns the attention indices, sorted."""
    _check_unit(unit)
    if min_remaining < 1:
        raise ValueError(f"min_remaining must be >= 1, got {min_remaining}")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    if width_policy not in WIDTH_POLICIES:
        raise ValueError(f"width_policy must be one of {WIDTH_POLICIES}, got {width_policy!r}")
    att = tuple(sorted(attention_indices))
    if att:
        if unit != "block" or depth_indices is None:
            raise ValueError("attention sublayers of kept blocks (mixed depth units) need unit 'block' and "
                             "depth_indices")
        bad = [i for i in att if i in set(depth_indices) or i not in candidates(shape, "attention")]
        if bad or len(set(att)) != len(att):
            raise ValueError(f"attention_indices {list(att)}: block {bad[0] if bad else att} is "
                             f"removed whole, has no attention sublayer, or is named twice")
    return att


def _plan_depth(shape: ModelShape, target: float, unit: str, min_remaining: int, align: int,
                depth: int | str, depth_indices: Sequence[int] | None, alpha: float,
                options: list[int], within: Within) -> tuple[int, tuple[int, ...], str, list[str]]:
    """(depth count, indices, split label, notes) of make_plan (`within` checked already)."""
    att, heads = within.attention, within.heads
    notes: list[str] = []
    if depth_indices is not None:
        d, split = len(depth_indices), "fixed"
    elif depth == "alpha":
        wanted = alpha_depth(shape, target, unit, alpha)
        d = min(options, key=lambda o: (abs(o - wanted), o))
        if d != wanted:
            notes.append(f"alpha formula gave {wanted} depth units; nearest feasible is {d}")
        split = "alpha"
    elif isinstance(depth, int):
        d, split = depth, "fixed"
    else:
        raise ValueError(f"depth must be an int or 'alpha', got {depth!r}")
    idx = tuple(sorted(depth_indices)) if depth_indices is not None else \
        default_depth_indices(shape, unit, d)
    if depth_indices is None and shape.units_differ(unit) and not indices_feasible(
            shape, target, unit, idx, min_remaining, align):  # placeholders that can meet it
        idx = best_feasible_units(shape, target, unit, d, {i: -i for i in range(shape.num_blocks)},
                                  min_remaining, align) or idx
    if (d not in options and not shape.units_differ(unit) and not att and not heads
            ) or not indices_feasible(shape, target, unit, idx, min_remaining, align, att, heads):
        raise ValueError(f"{d} {unit} units {'at ' + str(list(idx)) + ' ' if depth_indices is not None else ''}"
                         f"{'and attention sublayers at ' + str(list(att)) + ' ' if att else ''}"
                         f"{'and heads ' + str(list(heads)) + ' ' if heads else ''}"
                         f"cannot meet target {target}: feasible counts"
                         f"{' without them' if att or heads else ''} are {options}")
    return d, idx, split, notes


def _plan_widths(shape: ModelShape, target: float, removed_depth: int, survivors: list[int],
                 min_remaining: int, align: int, width_policy: str
                 ) -> tuple[list[int], int | None]:
    """(neurons removed per block, the one width of every survivor or None) of make_plan."""
    goal = target * shape.total_params
    wanted = max(0.0, goal - removed_depth) / shape.neuron_params  # neurons, not rounded
    if shape.heterogeneous:
        counts = _param_spread(max(0.0, goal - removed_depth), shape, survivors, min_remaining, align)
    elif align == 1:
        capacity = _capacity(shape, survivors, min_remaining)
        counts = _spread(min(int(round(wanted)), sum(capacity)), capacity, survivors)
    else:
        counts = _aligned_spread(wanted, shape, survivors, min_remaining, align)
    uniform = None
    if shape.heterogeneous:
        if width_policy == "uniform":
            raise ValueError("width_policy 'uniform' needs blocks of one width; this model's "
                             "blocks differ by stage (use 'per-block' or 'auto')")
    elif width_policy == "uniform" or (width_policy == "auto" and align > 1):
        w = _uniform_width(wanted, shape, survivors, min_remaining, align)
        if w is not None:
            u_counts = [shape.widths[i] - w if i in survivors else 0 for i in range(shape.num_blocks)]
            u_error = abs(sum(u_counts) - wanted) * shape.neuron_params / shape.total_params
            if width_policy == "uniform" or u_error <= UNIFORM_TOLERANCE:
                counts, uniform = u_counts, w
        elif width_policy == "uniform":
            raise ValueError(f"no single width of a multiple of {align} fits every surviving block "
                             f"with min_remaining={min_remaining}")
    if uniform is None and len({shape.widths[i] - counts[i] for i in survivors}) == 1 and survivors:
        uniform = shape.widths[survivors[0]] - counts[survivors[0]]
    return counts, uniform


def target_bound(shape: ModelShape, plan: PruningPlan, width_policy: str = "per-block") -> float:
    """The most (in sparsity) a plan of this shape may miss its target by, as this module
    promises: half a group of `align` of the largest neurons; with an automatically chosen
    single width, UNIFORM_TOLERANCE; with width_policy "uniform", half a width step taken in
    every surviving block."""
    group = plan.align * max(shape.costs) / 2
    if plan.uniform_width is not None and width_policy == "uniform":
        survivors = len(_survivors(shape, plan.unit, plan.depth_indices))
        return max(group, survivors * group) / shape.total_params
    if plan.uniform_width is not None and width_policy == "auto":
        return max(group / shape.total_params, UNIFORM_TOLERANCE)
    return group / shape.total_params


def width_only_max(shape: ModelShape, min_remaining: int, align: int = 1,
                   heads_per_block: int = 0) -> float:
    """Largest sparsity stage 1 alone can reach: every MLP down to `min_remaining`, and with
    `heads_per_block` (a fixed count of heads, :func:`uniform_heads`) those heads of every block
    too, where the shape counts heads."""
    return (_capacity_params(shape, list(range(shape.num_blocks)), min_remaining, align)
            + heads_removed(shape, _width_only_heads(shape, heads_per_block))) / shape.total_params


def _width_only_heads(shape: ModelShape, per_block: int) -> tuple[int, ...]:
    """The heads a fixed count removes with no depth unit gone (none where the shape does not
    count heads)."""
    return uniform_heads(shape, (), per_block) if per_block and shape.head_params is not None else ()


def check_width_only(shape: ModelShape, target: float, min_remaining: int, align: int = 1,
                     heads_per_block: int = 0, named: str = "stages='s1'") -> float:
    """The largest target stage 1 alone reaches (:func:`width_only_max`); ValueError where it
    (`named`: how the caller spells it) cannot meet `target`: above that, or, with a fixed count
    of heads per block, below what those heads alone remove (to within half a group of
    neurons, as every plan)."""
    top = width_only_max(shape, min_remaining, align, heads_per_block)
    if target > top and shape.head_params is not None:  # more heads per block may reach it
        more = [n for n in range(heads_per_block + 1, max(shape.heads or (1,)))
                if fixed_heads_floor(shape, n) <= target
                <= width_only_max(shape, min_remaining, align, n)]
        if more:
            flag = "--heads " if named.startswith("--") else "heads="
            raise ValueError(f"target {target} is infeasible: the maximum feasible target for width "
                             f"pruning alone ({named}) is {top:.4f}; with {flag}{more[0]} (heads "
                             f"removed from every block too) it reaches "
                             f"{width_only_max(shape, min_remaining, align, more[0]):.4f}")
    validate_target(target, top, f"for width pruning alone ({named})")
    floor = heads_removed(shape, _width_only_heads(shape, heads_per_block))
    if floor > target * shape.total_params + align * min(shape.costs) / 2:
        raise ValueError(f"target {target} is below what removing {heads_per_block} heads from "
                         f"every block takes alone ({named}): width pruning alone reaches "
                         f"{floor / shape.total_params:.4f} to {top:.4f}")
    return top


def fixed_heads_floor(shape: ModelShape, per_block: int) -> float:
    """The share of the shape that a fixed count of heads per block removes with no depth unit
    gone: the least any plan with them removes (a depth unit takes its heads along, and more)."""
    return heads_removed(shape, _width_only_heads(shape, per_block)) / shape.total_params


def depth_only_plan(shape: ModelShape, target: float, unit: str,
                    depth_indices: Sequence[int] | None = None) -> PruningPlan:
    """Stage 2 alone: the depth count whose removal lands nearest the target (not exact)."""
    _check_unit(unit)
    goal = target * shape.total_params
    top = _depth_removed(shape, unit, default_depth_indices(shape, unit, max_depth_units(shape, unit)))
    validate_target(target, top / shape.total_params)
    if depth_indices is None:
        d = min(range(max_depth_units(shape, unit) + 1), key=lambda k: (
            abs(_depth_removed(shape, unit, default_depth_indices(shape, unit, k)) - goal), k))
        depth_indices = default_depth_indices(shape, unit, d)
    idx = tuple(sorted(depth_indices))
    after = shape.total_params - _depth_removed(shape, unit, idx)
    return PruningPlan(
        target=target, unit=unit, blocks_to_prune=len(idx), depth_indices=idx,
        per_block_neurons_to_prune=0, neurons_to_prune=(0,) * shape.num_blocks, min_remaining=0,
        params_before=shape.total_params, params_after=after,
        predicted_sparsity=1 - after / shape.total_params,
        max_feasible_target=top / shape.total_params, split="depth-only",
        notes=("stage 2 only: whole units cannot hit the target exactly",))


def as_target(value: Any) -> float:
    """A target as a float: a Python or NumPy number, a one-element tensor or a numeric string;
    anything else (a bool, None, a list) is a ValueError naming it, not a TypeError from deep
    inside the planner."""
    try:
        if isinstance(value, bool) or value is None:
            raise TypeError
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"a target must be a number in (0, 1), got {value!r} "
                         f"({type(value).__name__})") from None


def check_targets(targets: Sequence[float]) -> list[float]:
    """The targets as floats, or ValueError: none, one outside (0, 1), or two that are the same
    or print alike (reports label and save them by ``f"{t:g}"``: 0.3 and 0.3000001 would share
    a name and a folder)."""
    values = [as_target(t) for t in targets]
    if not values:
        raise ValueError("no target given")
    bad = [t for t in values if not 0 < t < 1]
    if bad:
        raise ValueError(f"every target must be in (0, 1), got {bad[0]}")
    if len(set(values)) != len(values):
        dup = next(t for t in values if values.count(t) > 1)
        raise ValueError(f"target {dup} is given twice")
    names: dict[str, float] = {}
    for t in values:
        if f"{t:g}" in names:
            raise ValueError(f"targets {names[f'{t:g}']!r} and {t!r} both print as {t:g}: give "
                             f"targets that differ in their first 6 digits")
        names[f"{t:g}"] = t
    return values
