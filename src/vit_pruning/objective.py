"""What a target counts: parameters (the seed's), FLOPs of one forward, or latency on a device.

The planner (:mod:`vit_pruning.planner`) is arithmetic on a :class:`ModelShape`: a total, what
each depth unit (block or attention sublayer) holds and what one MLP neuron of each block holds.
Those numbers can be parameters, FLOPs or seconds: a FLOP or latency target is planned by the
same arithmetic on a shape whose numbers are FLOPs (:func:`flop_shape`) or time
(:meth:`LatencyModel.shape`), so it is hit as exactly as the cost model allows.

- FLOPs are counted by ``torch.utils.flop_counter`` on one forward (the report's count): each
  block's and each attention sublayer's share is read during that forward, and one neuron costs
  ``2 * tokens * (fc1 inputs + fc2 outputs)`` (a gate row more for SwiGLU), tokens being what
  the block really sees (Swin's stages see fewer). Removing units and neurons removes exactly
  those FLOPs, so the plan's prediction is the pruned model's count.
- Latency is a model measured on the device, dtype and batch it is for
  (:func:`measure_latency_model`): the time of each distinct block at a grid of MLP widths, at
  a grid of attention head counts and without its attention sublayer, and the fixed cost
  outside the blocks (the whole model's time less its blocks'), each measured as a whole
  forward. Straight lines through each block's grids (time per neuron, time per head) are what
  the planner plans with and what the prediction reports.
- An attention head's FLOPs are its sublayer's over its heads: every FLOP counted there is
  one head's (:func:`_head_flops`).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import platform
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .anatomy import resolve
from .atomic import atomic_write_json
from .config import LATENCY_MIN_REPEATS as MIN_REPEATS
from .config import LATENCY_MODEL_ROUNDS, OBJECTIVES
from .measure import autocast_context, example_inputs, run_model, time_rounds
from .planner import ModelShape, aligned_floor
from .surgery import prune_heads, prune_mlp_neurons, remove_attention, remove_blocks
from .modes import device_of, eval_mode

log = logging.getLogger(__name__)

LATENCY_UNITS = 10**12  # the latency shape counts time in units of total / 1e12: integers for
# the planner, fine enough that rounding moves no plan
GRID_POINTS = 5  # MLP widths timed per distinct block, from the narrowest allowed to full
HEAD_POINTS = 4  # head counts timed per distinct block: a quarter, half, three quarters, all
MIN_ROUNDS = LATENCY_MODEL_ROUNDS  # rounds of a latency model by default (the command line's
# too); fast models get more, up to
MAX_ROUNDS = 200  # this, so that each variant runs for about
ROUND_SECONDS = 0.5  # seconds in all


@torch.no_grad()
def flop_shape(model: nn.Module, shape: ModelShape, seq_len: int = 128) -> ModelShape:
    """`shape` (the model's parameter shape) with every number in FLOPs of one forward at batch
    1 (the model's image size, or `seq_len` tokens of text): total, per block, per attention
    sublayer and per MLP neuron of each block."""
    an = resolve(model)
    x = example_inputs(model, 1, seq_len=seq_len)
    counter = FlopCounterMode(display=False)
    spans: dict[tuple[str, int], list[int]] = {}
    rows: dict[int, int] = {}
    handles = []

    def enter(key):
        return lambda *_: spans.setdefault(key, []).append(counter.get_total_flops())

    def leave(key):
        def hook(*_):
            spans[key][-1] = counter.get_total_flops() - spans[key][-1]
        return hook

    def tokens(i):
        def hook(_module, args):
            rows[i] = args[0].numel() // args[0].shape[-1]
        return hook

    for i, p in enumerate(an.parts):
        handles += [p.block.register_forward_pre_hook(enter(("block", i))),
                    p.block.register_forward_hook(leave(("block", i))),
                    p.fc2.register_forward_pre_hook(tokens(i))]
        if not p.attention_removed:
            handles += [p.attention.register_forward_pre_hook(enter(("attention", i))),
                        p.attention.register_forward_hook(leave(("attention", i)))]
    with eval_mode(model):
        with counter:
            run_model(model, x)
        for h in handles:
            h.remove()
    total = int(counter.get_total_flops())
    blocks = tuple(int(sum(spans[("block", i)])) for i in range(len(an.parts)))
    attention = tuple(int(sum(spans.get(("attention", i), [0]))) for i in range(len(an.parts)))
    costs = tuple(2 * rows[i] * _neuron_matmul_width(p) for i, p in enumerate(an.parts))
    return _cost_shape(shape, total, blocks, attention, costs, _head_flops(shape, attention))


def _head_flops(shape: ModelShape, attention: Sequence[int]) -> tuple[int, ...] | None:
    """FLOPs one attention head of each block takes: its sublayer's count over its heads.
    Every counted FLOP of an attention sublayer is a head's (the q/k/v rows and output columns
    it multiplies with, its score and value matmuls; the bias tables are gathered, not
    multiplied), so the count is a multiple of the heads and removing one removes exactly its
    share. None where the shape does not count heads."""
    if shape.heads is None or shape.head_params is None:
        return None
    out = []
    for i, (flops, n) in enumerate(zip(attention, shape.heads)):
        if n and flops % n:
            raise RuntimeError(f"internal error: block {i}'s attention counts {flops:,} FLOPs, "
                               f"not a multiple of its {n} heads")
        out.append(flops // n if n else 0)
    return tuple(out)


def _neuron_matmul_width(parts) -> int:
    """Multiply-adds one MLP neuron takes per token: its input rows and its fc2 column."""
    ins = sum(fc.in_features for fc in parts.in_projections) * (2 if parts.fused else 1)
    return ins + parts.fc2.out_features


def _cost_shape(shape: ModelShape, total: int, blocks: Sequence[int], attention: Sequence[int],
                costs: Sequence[int], heads: Sequence[int] | None) -> ModelShape:
    """`shape` with its numbers in another objective's units: the total, each block, each
    attention sublayer, one MLP neuron and one attention head of each block (`heads`: None
    where heads are not a unit)."""
    costs = tuple(max(1, int(c)) for c in costs)
    return replace(shape, total_params=int(total), block_params=tuple(int(b) for b in blocks),
                   attention_params=tuple(int(a) for a in attention),
                   params_per_neuron=costs[0],
                   neuron_costs=costs if len(set(costs)) > 1 else None,
                   head_params=None if heads is None else tuple(int(h) for h in heads))


def _slope(points: Sequence[tuple[int, float]]) -> float:
    """Slope of the least-squares line through (x, seconds) points, never below 0 (a block does
    not get slower as it narrows)."""
    w = [p[0] for p in points]
    t = [p[1] for p in points]
    mw, mt = statistics.fmean(w), statistics.fmean(t)
    var = sum((a - mw) ** 2 for a in w)
    return max(0.0, sum((a - mw) * (b - mt) for a, b in zip(w, t)) / var) if var else 0.0


@dataclass(frozen=True)
class BlockTiming:
    """Seconds of one block: at each timed MLP width (`grid`, (width, seconds), ascending), and
    what its attention sublayer takes (0 if it has none). Predictions use the straight line
    through the grid (:attr:`line`): one neuron costs the same time in any block of a kind,
    which is what the planner's arithmetic needs, and it averages out the timing noise."""

    grid: tuple[tuple[int, float], ...]
    attention_s: float
    heads: tuple[tuple[int, float], ...] = ()  # (head count, seconds relative to all heads),
    # ascending: every block of the kind with fewer heads (() where none were timed)

    @property
    def head_s(self) -> float:
        """Seconds one attention head takes: the slope of the least-squares line through the
        head-count timings, never below 0 and never above the sublayer's time shared by its
        heads (removing every head cannot save more than removing the sublayer)."""
        if len(self.heads) < 2:
            return 0.0
        slope = _slope(self.heads)
        return min(slope, self.attention_s / self.heads[-1][0]) if self.attention_s else slope

    @property
    def line(self) -> tuple[float, float]:
        """(intercept, seconds per neuron) of the least-squares line through the grid; the slope
        is never below 0 (a block does not get slower as its MLP narrows)."""
        slope = _slope(self.grid)
        return statistics.fmean(g[1] for g in self.grid) - slope * statistics.fmean(
            g[0] for g in self.grid), slope

    @property
    def slope_s(self) -> float:
        return self.line[1]

    def at(self, width: int) -> float:
        """Seconds at MLP width `width`, on the line (what the planner plans with)."""
        a, b = self.line
        return max(0.0, a + b * width)


@dataclass(frozen=True)
class LatencyModel:
    """Measured time of a model's parts on one device, dtype and batch size (see the module
    docstring). `blocks[i]` is block i's timing (blocks of one kind share one measurement);
    `total_s` is the whole model's measured time, `fixed_s` what lies outside the blocks."""

    device: str
    dtype: str
    batch_size: int
    key: str  # what it was measured for (see latency_key); a cached model is found by it
    total_s: float
    fixed_s: float
    widths: tuple[int, ...]  # each block's MLP width when measured
    blocks: tuple[BlockTiming, ...]
    repeats: int

    def predict(self, widths: Sequence[int], blocks_removed: Sequence[int] = (),
                attention_removed: Sequence[int] = (), heads_removed: Sequence[int] = ()
                ) -> float:
        """Predicted seconds of the model with these MLP widths, whole blocks removed, attention
        sublayers removed (block indices of the measured model) and `heads_removed[i]` heads of
        block i (() for none): the sum the planner's shape (:meth:`shape`) counts, in seconds."""
        gone, no_att = set(blocks_removed), set(attention_removed)
        heads = heads_removed or (0,) * len(self.blocks)
        t = self.fixed_s
        for i, b in enumerate(self.blocks):
            if i not in gone:
                t += b.at(widths[i]) - (b.attention_s if i in no_att else b.head_s * heads[i])
        return t

    def blocks_s(self) -> float:
        """The blocks' own times at the measured widths, summed."""
        return sum(b.at(w) for b, w in zip(self.blocks, self.widths))

    @property
    def model_s(self) -> float:
        """The unpruned model's time as the latency model sums it (the measured total, unless
        the blocks' own times add up to more, when nothing is left outside them): what
        predicted ratios are ratios of."""
        return self.predict(self.widths)

    def shape(self, shape: ModelShape) -> ModelShape:
        """`shape` (the parameter shape of the measured model) in time units: total, each
        block, each attention sublayer, and each block's time per MLP neuron (linear fit)."""
        if tuple(shape.widths) != self.widths:
            raise ValueError(f"latency model was measured for MLP widths {list(self.widths)}, "
                             f"the model has {list(shape.widths)}")
        unit = LATENCY_UNITS / self.model_s
        blocks = [b.at(w) * unit for b, w in zip(self.blocks, self.widths)]
        # integer units, the total made their exact sum so removing everything removes it all
        total = round(self.fixed_s * unit) + sum(round(b) for b in blocks)
        return _cost_shape(shape, total, [round(b) for b in blocks],
                           [round(b.attention_s * unit) for b in self.blocks],
                           [round(b.slope_s * unit) for b in self.blocks],
                           None if shape.head_params is None or not self.timed_heads else
                           [round(b.head_s * unit) for b in self.blocks])

    @property
    def timed_heads(self) -> bool:
        """Whether head counts were timed (every block with heads has a head line)."""
        return any(b.heads for b in self.blocks)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyModel":
        blocks = tuple(BlockTiming(tuple((int(w), float(t)) for w, t in b["grid"]),
                                   float(b["attention_s"]),
                                   tuple((int(n), float(t)) for n, t in b.get("heads", ())))
                       for b in d["blocks"])
        return cls(device=d["device"], dtype=d["dtype"], batch_size=int(d["batch_size"]),
                   key=d["key"], total_s=float(d["total_s"]), fixed_s=float(d["fixed_s"]),
                   widths=tuple(int(w) for w in d["widths"]), blocks=blocks,
                   repeats=int(d["repeats"]))


def device_name(device: torch.device) -> str:
    """What the latency model is for: the GPU's name, or the CPU with the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads ({platform.processor() or platform.system()})"


def latency_key(model: nn.Module, device: torch.device, dtype: torch.dtype | None,
                batch_size: int, seq_len: int, align: int, min_remaining: int) -> str:
    """A hash of everything the measured times depend on: device, dtype, batch, the model's
    class and structure (widths, attention removed, hidden size, heads, input size), the width
    grid's alignment and floor, and the torch version."""
    an = resolve(model)
    cfg = {k: getattr(model.config, k, None) for k in ("image_size", "patch_size", "window_size")}
    what = {"device": device_name(device), "dtype": str(dtype or torch.float32),
            "batch": batch_size, "seq_len": seq_len if an.is_text else None,
            "class": type(model).__name__, "hidden": an.hidden_size, "heads": an.num_heads,
            "widths": [p.intermediate_size for p in an.parts],
            "block_heads": [p.num_heads for p in an.parts], "head_points": HEAD_POINTS,
            "no_attention": [p.attention_removed for p in an.parts], "config": cfg,
            "align": align, "min_remaining": min_remaining, "torch": torch.__version__}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]


def default_cache_dir() -> Path:
    """Where measured latency models are kept: $VIT_2SSP_CACHE, else $XDG_CACHE_HOME/vit-2ssp,
    else ~/.cache/vit-2ssp (safe to delete: a missing model is measured again)."""
    if os.environ.get("VIT_2SSP_CACHE"):
        return Path(os.environ["VIT_2SSP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vit-2ssp"


def width_grid(width: int, min_remaining: int, align: int, points: int = GRID_POINTS) -> list[int]:
    """MLP widths to time for a block of `width`: `points` widths from the narrowest a plan can
    keep (min_remaining rounded up to `align`) to the full width, multiples of `align`."""
    low = min(width, aligned_floor(min_remaining, align))
    out = {width}
    for k in range(points - 1):
        w = low + (width - low) * k / max(1, points - 1)
        out.add(min(width, max(low, int(round(w / align)) * align)))
    return sorted(out)


SAMPLE_BLOCKS = 4  # blocks of one kind removed together in a timed variant (their mean is kept)


@torch.no_grad()
def measure_latency_model(model: nn.Module, batch_size: int = 1, dtype: torch.dtype | None = None,
                          repeats: int = MIN_ROUNDS, warmup: int = 3, seq_len: int = 128, align: int = 8,
                          min_remaining: int = 1, cache_dir: str | Path | None = None,
                          steady_allocator: bool = False) -> LatencyModel:
    """Measure (or, with `cache_dir`, load if measured before) the latency model of `model` on
    its device. Every time is a whole forward, so each block is timed in the model as it runs
    (its share of framework overhead included): the model as it is, and per kind of block
    (width, attention, stage, input shape) the model with every block of that kind at each grid
    width (as a plan narrows them: all alike), without their attention sublayers, and without
    up to SAMPLE_BLOCKS of the blocks themselves; the differences, divided by the blocks
    changed, are each block's times (changing every block of a kind makes the difference, and
    so its share of the timing noise, as large as it can be). All
    variants are interleaved over at least `repeats` rounds, more for fast models (until each
    variant has run about ROUND_SECONDS, at most MAX_ROUNDS), and medians kept. Each variant is
    a copy built before timing (sharing the unchanged weights), so no surgery is timed with it:
    bypassing six attention sublayers inside the timed call added 9% to a 3 ms forward. `model`
    is left as it came. `steady_allocator`: see :func:`vit_pruning.measure.time_rounds`."""
    if repeats < MIN_REPEATS:
        raise ValueError(f"repeats must be >= {MIN_REPEATS} to measure a latency model, got {repeats}")
    device = device_of(model)
    key = latency_key(model, device, dtype, batch_size, seq_len, align, min_remaining)
    path = Path(cache_dir) / "latency" / f"{key}.json" if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            found = LatencyModel.from_dict(json.loads(path.read_text()))
            log.info("latency model: cached %s", path)
            return found
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("latency model cache %s unreadable (%s): measuring again", path, exc)
    work = copy.deepcopy(model).eval()
    an = resolve(work)
    x = example_inputs(work, batch_size, seq_len=seq_len)
    kinds = _block_kinds(an, x)
    variants, plans = _variants(work, an, kinds, min_remaining, align)
    calls = {name: (lambda m=m: run_model(m, x)) for name, m in variants.items()}
    with autocast_context(device, dtype):
        once = time_rounds({"model": calls["model"]}, 3, 1, device,
                           steady_allocator=steady_allocator)["model"]
    repeats = max(repeats, min(MAX_ROUNDS, math.ceil(ROUND_SECONDS / max(min(once), 1e-6))))
    log.info("latency model: timing %d variants x %d rounds (about %.0f s)", len(calls), repeats,
             len(calls) * repeats * min(once))
    for attempt in range(MEASURES):  # an implausible table is measured again, never cached
        with autocast_context(device, dtype):
            times = time_rounds(calls, repeats, warmup, device, steady_allocator=steady_allocator)
        med = {k: statistics.median(v) for k, v in times.items()}
        timing = _block_timings(med, kinds, plans)
        widths = tuple(p.intermediate_size for p in an.parts)
        result = LatencyModel(device=device_name(device), dtype=str(dtype or torch.float32).replace(
            "torch.", ""), batch_size=batch_size, key=key, total_s=med["model"], fixed_s=0.0,
            widths=widths, blocks=tuple(timing[i] for i in range(len(an.parts))), repeats=repeats)
        why = implausible(result)
        result = replace(result, fixed_s=max(0.0, result.total_s - result.blocks_s()))
        if why is None:
            break
        log.warning("latency model implausible (%s): %s", why,
                    "measuring again" if attempt + 1 < MEASURES else
                    "not cached; plans on it may miss their target (time on an idle machine)")
    log.info("latency model: %.3f ms per forward (%.3f ms outside the blocks), %d kinds of "
             "block, %d variants x %d rounds", 1e3 * result.total_s, 1e3 * result.fixed_s,
             len(kinds), len(calls), repeats)
    if path is not None and why is None:
        try:
            atomic_write_json(path, result.to_dict(), overwrite=True)
        except OSError as exc:
            log.warning("latency model not cached (%s)", exc)
    return result


def _variants(work: nn.Module, an, kinds: dict[tuple, list[int]], min_remaining: int, align: int
              ) -> tuple[dict[str, nn.Module], dict[tuple, dict]]:
    """The models timed ("model" as it is, and per kind of block: every block of the kind at
    each grid width, at each grid head count (:func:`head_grid`; not where a shared relative
    position bias makes heads no unit), without their attention sublayers, without up to
    SAMPLE_BLOCKS of them), and per kind its grids, dropped blocks and width."""
    variants = {"model": work}
    plans: dict[tuple, dict] = {}
    for kind, members in kinds.items():
        width = an.parts[members[0]].intermediate_size
        grid = [w for w in width_grid(width, min_remaining, align) if w < width]
        for w in grid:
            variants[f"{members[0]}:{w}"] = _narrowed(work, members, w)
        heads = []
        if not an.parts[members[0]].attention_removed:
            variants[f"{members[0]}:no attention"] = remove_attention(_shared_copy(work), members)
            heads = [] if an.shared_head_bias else head_grid(an.parts[members[0]].num_heads)
            for n in heads[:-1]:
                variants[f"{members[0]}:heads {n}"] = _fewer_heads(work, members, n)
        drop = _droppable(an, members)
        if drop:
            variants[f"{members[0]}:drop"] = remove_blocks(_shared_copy(work), drop)
        plans[kind] = {"grid": grid, "drop": drop, "width": width, "heads": heads}
    return variants, plans


def head_grid(heads: int, points: int = HEAD_POINTS) -> list[int]:
    """Head counts to time for a block of `heads` heads: `points` counts from a quarter of them
    (at least one) to all, ascending ([] for a single head: nothing to remove)."""
    if heads < 2:
        return []
    return sorted({max(1, round(heads * (k + 1) / points)) for k in range(points)})


def _fewer_heads(model: nn.Module, blocks: list[int], heads: int) -> nn.Module:
    """A variant of `model` (:func:`_shared_copy`) with `blocks` keeping their first `heads`
    attention heads, built before timing."""
    variant = _shared_copy(model)
    an = resolve(variant)
    for i in blocks:
        prune_heads(an.parts[i], torch.arange(heads))
    return variant


def _block_timings(med: dict[str, float], kinds: dict[tuple, list[int]], plans: dict[tuple, dict]
                   ) -> dict[int, BlockTiming]:
    """Each block's times from the variants' medians: the time saved per block at each width,
    without its attention, and without the whole block (at least its attention and MLP)."""
    total = med["model"]
    timing: dict[int, BlockTiming] = {}
    for kind, members in kinds.items():
        pl, first = plans[kind], members[0]
        saved = {w: (total - med[f"{first}:{w}"]) / len(members) for w in pl["grid"]}
        att = (max(0.0, (total - med[f"{first}:no attention"]) / len(members))
               if f"{first}:no attention" in med else 0.0)
        line = BlockTiming(tuple(sorted([(pl["width"], 0.0), *((w, -s) for w, s in saved.items())])), att)
        mlp = max(0.0, line.slope_s * pl["width"])  # what the MLP's width costs, at least
        whole = (total - med[f"{first}:drop"]) / len(pl["drop"]) if pl["drop"] else 0.0
        whole = max(whole, att + mlp)  # a block holds at least its attention and MLP
        heads = tuple((n, -(total - med[f"{first}:heads {n}"]) / len(members))
                      for n in pl["heads"][:-1]) + ((pl["heads"][-1], 0.0),) if pl["heads"] else ()
        block = BlockTiming(tuple((w, max(0.0, whole + t)) for w, t in line.grid), att, heads)
        for i in members:
            timing[i] = block
    return timing


MEASURES = 2  # times a latency model is measured while it is implausible
PLAUSIBLE_SLACK = 0.05  # of the whole forward: how far timing noise may bend the table


def implausible(lat: LatencyModel) -> str | None:
    """Why a measured latency model cannot be right, or None: its blocks take more time than
    the whole forward, or a block is slower at a narrower MLP than at a wider one (beyond
    PLAUSIBLE_SLACK of the forward). Either comes of a machine busy while it was timed."""
    total, slack = lat.total_s, PLAUSIBLE_SLACK * lat.total_s
    blocks = lat.blocks_s()
    if blocks > total + slack:
        return (f"its blocks sum to {1e3 * blocks:.3f} ms, more than the whole forward's "
                f"{1e3 * total:.3f} ms")
    for i, b in enumerate(lat.blocks):
        for (w1, t1), (w2, t2) in zip(b.grid, b.grid[1:]):
            if t1 > t2 + slack:
                return (f"block {i} timed {1e3 * t1:.3f} ms at MLP width {w1}, slower than "
                        f"{1e3 * t2:.3f} ms at {w2}")
    return None


def _block_kinds(an, x: dict) -> dict[tuple, list[int]]:
    """Blocks grouped by what their time depends on: MLP width, attention kept, heads, stage,
    the shape of their input, class."""
    hidden = an.embed(next(iter(x.values())))
    kinds: dict[tuple, list[int]] = {}
    for i, p in enumerate(an.parts):
        kind = (p.intermediate_size, p.attention_removed, p.num_heads,
                an.stage_of[i] if an.stage_of else 0,
                tuple(hidden.shape), type(p.block).__name__)
        kinds.setdefault(kind, []).append(i)
        hidden = an.transition(i, an.block_forward(i, hidden))
    return kinds


def _droppable(an, members: list[int]) -> list[int]:
    """Up to SAMPLE_BLOCKS of `members` that can be removed together (a stage keeps a block,
    the model keeps one)."""
    if an.stage_of is not None:
        left = {st: an.stage_of.count(st) for st in set(an.stage_of)}
        out = []
        for i in members:
            if len(out) < SAMPLE_BLOCKS and left[an.stage_of[i]] > 1:
                out.append(i)
                left[an.stage_of[i]] -= 1
        return out
    return members[:min(SAMPLE_BLOCKS, len(an.parts) - 1)]


def _shared_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s modules that shares its parameters and buffers: surgery on the copy
    replaces modules (never edits tensors), so the original is untouched and each timed variant
    costs only the tensors its surgery makes."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def _narrowed(model: nn.Module, blocks: list[int], width: int) -> nn.Module:
    """A variant of `model` (:func:`_shared_copy`) with `blocks` at MLP width `width` (their
    first neurons kept): built before timing, so no surgery is timed with it."""
    variant = _shared_copy(model)
    an = resolve(variant)
    for i in blocks:
        prune_mlp_neurons(an.parts[i], torch.arange(width))
    return variant


def objective_shape(model: nn.Module, shape: ModelShape, objective: str,
                    latency: LatencyModel | None = None, seq_len: int = 128) -> ModelShape:
    """The planner's shape for `objective`: `shape` itself for parameters, FLOPs, or time from
    `latency` (required for "latency")."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "params":
        return shape
    if objective == "flops":
        return flop_shape(model, shape, seq_len)
    if latency is None:
        raise ValueError("objective 'latency' needs a latency model (measure_latency_model)")
    return latency.shape(shape)
