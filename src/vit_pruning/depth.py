"""Stage 2 (depth): choose and remove whole blocks or attention sublayers.

Selection methods (label-free, on calibration images):
- ``greedy``: at each step remove the candidate whose removal changes the model output least
  (KL of logits to the reference outputs, or 1 - cosine of final hidden states for a headless
  model). Block inputs of the current model are cached per batch, so scoring candidate ``c``
  runs only blocks ``c..B-1``.
- ``bi``: one-shot Block Influence (ShortGPT): 1 - mean cos(sublayer input, output).
Candidates are bypassed temporarily and restored; the model is never copied.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .anatomy import Anatomy, resolve
from .batches import take_inputs
from .config import PruneConfig
from .measure import output_distance
from .surgery import TemporaryBypass, remove_attention, remove_blocks
from .trace import UnprunedTrace
from .modes import device_of, eval_mode

METHODS = ("greedy", "bi")


def _state_skip(unit: str, removed: Sequence[int]) -> set[int]:
    return set(removed) if unit == "block" else set()


@torch.no_grad()
def _inputs_per_block(an: Anatomy, known: list[torch.Tensor], skip: set[int],
                      upto: int) -> list[torch.Tensor]:
    """inputs[i] = input of block i for one batch under the current state (blocks in `skip`
    left out), for i = 0..upto; `known` holds the first ones already (at least the embedding)."""
    inputs = list(known[:upto + 1])
    for i in range(len(inputs) - 1, upto):
        inputs.append(an.run_blocks(inputs[i], i, i + 1, skip))
    return inputs


def _first_half(batches: Sequence[torch.Tensor]) -> int:
    """How many leading batches hold at most half the rows (at least one, never all; 0 for a
    single batch): the screening sample of the greedy first step."""
    if len(batches) < 2:
        return 0
    total, rows, count = sum(len(x) for x in batches), 0, 0
    for x in batches:
        if rows + len(x) > total / 2:
            break
        rows, count = rows + len(x), count + 1
    return min(max(count, 1), len(batches) - 1)


@dataclass(frozen=True)
class Budget:
    """The most the removed depth units may hold together (`limit`), and what each holds
    (`sizes`, unit index -> parameters, or FLOPs or time with those objectives): used where units
    differ in size, so the selection never picks units that overshoot the target."""

    limit: float
    sizes: Mapping[int, float]

    def fits(self, units: Sequence[int]) -> bool:
        return sum(self.sizes[i] for i in units) <= self.limit


def _allowed(an: Anatomy, unit: str, removed: Sequence[int], cand: int,
             budget: Budget | None) -> bool:
    """Whether `cand` may go next: a stage (Swin) keeps at least one block, and the units
    removed stay within the `budget` (when units differ in size)."""
    if unit == "block" and an.stage_of is not None:
        stage = an.stage_of[cand]
        if sum(1 for i, st in enumerate(an.stage_of) if st == stage and i not in removed) <= 1:
            return False
    return budget is None or budget.fits([*removed, cand])


def _ranked(an: Anatomy, unit: str, scores: dict[int, float], count: int,
            budget: Budget | None) -> list[int]:
    """The `count` lowest-scored units that :func:`_allowed` lets go, in order."""
    out: list[int] = []
    for c in sorted(scores, key=lambda k: (scores[k], k)):
        if len(out) < count and _allowed(an, unit, out, c, budget):
            out.append(c)
    return out


@torch.no_grad()
def _step_scores(score: Callable[[list[int], range], dict[int, float]], live: list[int],
                 step_scores: list[dict[int, float]], rescore: int | None, half: int,
                 rows: list[int]) -> tuple[dict[int, float], dict[int, float]]:
    """One greedy step's (scores of every live candidate, contenders the winner is the lowest
    of): lazily rescored after the first step, screened on half the batches (`half`, of `rows`
    per batch) at the first, or every candidate on every batch."""
    n, everything = sum(rows), range(len(rows))
    scores = {c: step_scores[-1][c] for c in live if step_scores}
    contenders = scores
    if rescore and step_scores:  # lazy: rescore the best, keep the others' last scores
        live = sorted(live, key=lambda c: (scores[c], c))[:rescore]
        scores.update({c: v / n for c, v in score(live, everything).items()})
    elif rescore and half and len(live) > rescore:  # first step: screen every candidate on
        # half the batches, finish the `rescore` best on the rest
        first = score(live, range(half))
        scores = {c: v / sum(rows[:half]) for c, v in first.items()}
        live = sorted(live, key=lambda c: (scores[c], c))[:rescore]
        rest = score(live, range(half, len(rows)))
        contenders = {c: (first[c] + rest[c]) / n for c in live}
        scores.update(contenders)
    else:
        scores = contenders = {c: v / n for c, v in score(live, everything).items()}
    return scores, contenders


def greedy_order(model: nn.Module, pixel_batches: Sequence[torch.Tensor], count: int,
                 unit: str = "block", reference: torch.Tensor | None = None,
                 progress: bool = False, rescore: int | None = None,
                 budget: Budget | None = None, unpruned: UnprunedTrace | None = None
                 ) -> tuple[list[int], list[dict[int, float]]]:
    """Greedy removal order of up to `count` depth units; returns (indices, per-step candidate
    scores). Swin stages keep one block each; with `budget` the removed units hold at most that
    many parameters (fewer units come back when nothing else fits).

    With `rescore` (if set), the first step scores every candidate on the leading batches that
    hold half the calibration rows and only the `rescore` best on the rest (the others keep their
    half-sample score); each later step rescores only the `rescore` candidates that scored
    best in the previous step (lazy greedy), the rest keeping their previous scores.

    Each step streams the calibration batches: one pass caches every block's input for the
    batch, then candidate ``c`` is scored by running only blocks ``c..B-1`` from its cached
    input. Memory holds one batch's block inputs; the model is left unchanged. With the
    unpruned model's trace over `pixel_batches` (:func:`vit_pruning.trace.trace_unpruned`),
    the inputs of blocks up to the first removed unit and the reference come from it.
    """
    an = resolve(model)
    removed: list[int] = []
    step_scores: list[dict[int, float]] = []
    with eval_mode(model):
        with TemporaryBypass(model) as bypass:  # attention units chosen so far stay bypassed
            if reference is None:
                reference = unpruned.outputs if unpruned is not None else torch.cat(
                    [an.head(an.run_blocks(an.embed(x))) for x in pixel_batches])
            refs = list(torch.split(reference, [len(x) for x in pixel_batches]))
            cands = [i for i, p in enumerate(an.parts) if unit == "block" or not p.attention_removed]

            def score(live: list[int], batches: range) -> dict[int, float]:
                """Summed distance of each candidate in `live` over the batches `batches`."""
                skip = _state_skip(unit, removed)
                totals = {c: 0.0 for c in live}
                unchanged = min(removed, default=len(an.blocks) - 1)  # inputs up to it are
                # the unpruned model's
                for b in batches:
                    known = (unpruned.batch_inputs(b, unchanged) if unpruned is not None
                             else [an.embed(pixel_batches[b])])
                    inputs = _inputs_per_block(an, known, skip, max(live))
                    for c in live:
                        if unit == "block":
                            out = an.head(an.run_blocks(inputs[c], c, skip=skip | {c}))
                        else:
                            bypass.add(c)
                            try:
                                out = an.head(an.run_blocks(inputs[c], c, skip=skip))
                            finally:
                                bypass.undo(c)
                        totals[c] += output_distance(out, refs[b], an.has_classifier) * len(out)
                return totals

            half = _first_half(pixel_batches)
            for _ in tqdm(range(count), desc=f"stage 2: greedy {unit} selection",
                          disable=not progress, leave=False):
                live = [c for c in cands if c not in removed
                        and _allowed(an, unit, removed, c, budget)]
                if not live:
                    break
                scores, contenders = _step_scores(score, live, step_scores, rescore, half,
                                                  [len(x) for x in pixel_batches])
                best = min(contenders, key=lambda k: (contenders[k], k))
                removed.append(best)
                step_scores.append(scores)
                if unit == "attention":
                    bypass.add(best)
    return removed, step_scores


@torch.no_grad()
def block_influence(model: nn.Module, pixel_batches: Sequence[torch.Tensor],
                    unit: str = "block") -> dict[int, float]:
    """One-shot Block Influence: 1 - mean cos(input, output) of each block (or attention sublayer)."""
    an = resolve(model)
    device = device_of(model)
    total = torch.zeros(len(an.parts), dtype=torch.float64, device=device)
    with eval_mode(model):
        for x in pixel_batches:
            h = an.embed(x)
            for i in range(len(an.parts)):
                out = an.block_forward(i, h)
                ref = out if unit == "block" else an.attention_stream(i, h)
                total[i] += (1 - F.cosine_similarity(h.double(), ref.double(), dim=-1).mean()) * len(x)
                h = an.transition(i, out)
    n = sum(len(x) for x in pixel_batches)
    return {i: float(v / n) for i, v in enumerate(total)
            if unit == "block" or not an.parts[i].attention_removed}


@torch.no_grad()
def weight_proxy(model: nn.Module, unit: str = "block") -> dict[int, float]:
    """Data-free fallback: how much a unit can write into the residual stream (Frobenius norms of
    its output projections). Lower = removed first."""
    an = resolve(model)
    out = {}
    for i, p in enumerate(an.parts):
        if unit == "attention" and p.attention_removed:
            continue
        att = 0.0 if p.attention_removed else max(
            float(m.weight.norm()) for m in p.attention.modules() if isinstance(m, nn.Linear))
        out[i] = att + (float(p.fc2.weight.norm()) if unit == "block" else 0.0)
    return out


def select_depth(model: nn.Module, count: int, unit: str = "block",
                 pixel_batches: Sequence[torch.Tensor] | None = None,
                 config: PruneConfig | None = None, *, reference: torch.Tensor | None = None,
                 budget: Budget | None = None, unpruned: UnprunedTrace | None = None,
                 progress: bool = False) -> tuple[list[int], dict]:
    """Choose up to `count` units to remove (Swin stages keep a block each; removed units hold
    at most `budget` parameters if given); returns (indices in removal order, scores). The
    config's `depth_method` ("greedy" by output fidelity, "bi" Block Influence) and
    `greedy_rescore` decide how (default: PruneConfig's); without `pixel_batches`, the weight
    proxy. `reference`: the unpruned outputs on `pixel_batches`; `unpruned`: the unpruned
    model's trace over them, if there is one (greedy)."""
    config = config or PruneConfig()
    method, rescore = config.depth_method, config.greedy_rescore
    if method not in METHODS:
        raise ValueError(f"depth method must be one of {METHODS}, got {method!r}")
    if count == 0:
        return [], {}
    an = resolve(model)
    if not pixel_batches:
        scores = weight_proxy(model, unit)
        return _ranked(an, unit, scores, count, budget), {"weight_proxy": scores}
    if method == "bi":
        scores = block_influence(model, pixel_batches, unit)
        return _ranked(an, unit, scores, count, budget), {"block_influence": scores}
    order, steps = greedy_order(model, pixel_batches, count, unit, reference, progress, rescore,
                                budget, unpruned)
    return order, {"greedy_steps": [{str(k): v for k, v in s.items()} for s in steps]}


@torch.no_grad()
def outputs_with_depth(model: nn.Module, pixel_batches: Sequence[torch.Tensor], unit: str,
                       indices: Sequence[int], attention: Sequence[int] = ()) -> torch.Tensor:
    """Model outputs as if `indices` were removed (blocks skipped / attention bypassed), and the
    attention sublayers of `attention` too (a mixed plan's)."""
    an = resolve(model)
    with eval_mode(model):
        with TemporaryBypass(model) as bypass:
            for i in [*(indices if unit == "attention" else ()), *attention]:
                bypass.add(i)
            skip = set(indices) if unit == "block" else set()
            return torch.cat([an.head(an.run_blocks(an.embed(x), skip=skip)) for x in pixel_batches])


def apply_depth(model: nn.Module, indices: Sequence[int], unit: str,
                attention: Sequence[int] = ()) -> nn.Module:
    """Remove the chosen blocks (unit="block") or attention sublayers (unit="attention"); with
    `attention` (a mixed plan), those kept blocks' attention sublayers as well (removed first:
    indices are the model's as it comes)."""
    if attention:
        remove_attention(model, attention)
    return remove_blocks(model, indices) if unit == "block" else remove_attention(model, indices)


def prune_vit_attention_blocks(model: nn.Module, sparsity: float | None = None,
                               dataloader: Iterable | None = None,
                               device: str | torch.device | None = None,
                               batch_limit: int = 5, num_to_prune: int | None = None,
                               selected_indices: Sequence[int] | None = None,
                               unit: str = "block", method: str = "greedy",
                               progress: bool = False) -> dict:
    """Seed API for stage 2: remove `num_to_prune` (or round(sparsity * B)) depth units.

    Returns {"model", "pruned_indices" (sorted, original numbering), "order", "scores", "unit"}.
    """
    an = resolve(model)
    n = len(an.parts)
    if selected_indices is not None:
        order, scores = [int(i) for i in selected_indices], {}
    else:
        if num_to_prune is None:
            if sparsity is None:
                raise ValueError("give one of sparsity, num_to_prune or selected_indices")
            if not 0 <= sparsity < 1:
                raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
            num_to_prune = int(round(sparsity * n))
        limit = n - len(an.stage_blocks()) if unit == "block" else n
        if not 0 <= num_to_prune <= limit:
            raise ValueError(f"num_to_prune must be in [0, {limit}] for unit={unit!r}, got {num_to_prune}")
        device = device if device is not None else device_of(model)
        batches = (take_inputs(dataloader, batch_limit, device, an.is_text)
                   if dataloader is not None else None)
        order, scores = select_depth(model, num_to_prune, unit, batches,
                                     PruneConfig(depth_method=method), progress=progress)
    model = apply_depth(model, order, unit)
    return {"model": model, "pruned_indices": sorted(order), "order": order,
            "scores": scores, "unit": unit}
