"""The pruning methods compared by the benchmarks, all ending at the same parameter count.

- ``ours*``: vit_pruning.prune_2ssp with named options (one row per idea).
- ``seed``: the seed system's recipe as ANCHORS.md describes it: uniform K neurons per block by
  the activation L2 score, attention bypass of the N blocks whose *individual* bypass costs least
  top-1 on the evaluation loader (5 batches, a model copy per candidate, as the seed does),
  N = round(B * s ** (P_mlp / (alpha * P_attn))), alpha = 1.5. K is set so the parameter count
  equals the other methods' (the seed's own planner missed its target by up to 3.8 points).
- ``2ssp-paper``: uniform K by the 2SSP score, greedy attention removal by calibration
  cross-entropy, N = round(B * s_blocks ** ((P_mlp / P_attn) / 1.5)).
- ``tp-magnitude`` / ``tp-taylor``: Torch-Pruning's MetaPruner on the MLP hidden channels only
  (fc1 outputs with their coupled fc2 inputs), group magnitude or group Taylor importance, the
  same per-block counts as a width-only plan. It has no depth stage.
- ``tp-heads``: Torch-Pruning's head pruning (its Hugging Face ViT recipe, group magnitude): a
  quarter of every block's heads and MLP channels for the rest, at the same parameter count.
- ``random``: our planner's counts (alpha split), random neurons and random blocks.

Every method takes (model, target, calib_x, calib_y, eval_batches, min_remaining, seed). For a
text encoder there are no labels (``calib_y`` and ``eval_batches`` are None): where a recipe
scores with labels it uses the calibration embeddings' cosine distance to the unpruned model
instead (seed: per-candidate cost; 2ssp-paper: the greedy loss), and tp-taylor's gradient comes
from an unsupervised SimCSE loss (two dropout views of each calibration sentence, in-batch
negatives), the kind of contrastive objective the sentence encoder was trained with.
"""
from __future__ import annotations

import copy
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vit_pruning import PruneConfig, prune_2ssp, resolve
from vit_pruning.importance import activation_scores
from vit_pruning.measure import (collect_outputs, evaluate_top1, forward_output, output_distance,
                                 output_tensor)
from vit_pruning.pipeline import model_shape
from vit_pruning.planner import Within, feasible_depths, make_plan, uniform_heads, width_only_max
from vit_pruning.surgery import (bypass_attention, remove_attention, remove_blocks,
                                 restore_attention, sync_config)
from vit_pruning.width import prune_vit_mlp_width

from . import peers


def _nearest_feasible(shape, target, unit, mr, wanted: int) -> int:
    options = feasible_depths(shape, target, unit, mr)
    if not options:
        raise ValueError(f"out of reach: no {unit} count reaches target {target} with "
                         f"min_remaining={mr}")
    return min(options, key=lambda o: (abs(o - wanted), o))


def prune_ours(model, target, calib_x, mr, **options):
    """`ours` in place; returns the PruneResult (which blocks went, for distillation's map)."""
    return prune_2ssp(model, target, calib_x, PruneConfig(min_remaining=mr, **options))[1]


def ours(**options) -> Callable:
    def run(model, target, calib_x, calib_y, eval_batches, mr, seed):
        prune_ours(model, target, calib_x, mr, **options)
        return model
    return run


def seed_recipe(model, target, calib_x, calib_y, eval_batches, mr, seed, timings=None):
    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    shape = model_shape(model)
    p_mlp = max(shape.widths) * shape.neuron_params
    p_attn = max(shape.attention_params)
    wanted = int(round(shape.num_blocks * target ** (p_mlp / (1.5 * p_attn))))
    n = _nearest_feasible(shape, target, "attention", mr, wanted)
    plan = make_plan(shape, target, "attention", mr, depth=n)
    an = resolve(model)
    ref = None if calib_y is not None else collect_outputs(model, calib_x)
    prune_vit_mlp_width(model, list(plan.neurons_to_prune), mr,
                        importance=activation_scores(an, calib_x))
    timings["stage 1 (width)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if n:
        drops = {}
        for i in range(shape.num_blocks):  # one-shot, a model copy per candidate (seed)
            trial = copy.deepcopy(model)
            remove_attention(trial, [i])
            drops[i] = (-evaluate_top1(trial, eval_batches, _device(model), 5) if eval_batches
                        else _calibration_loss(trial, calib_x, None, ref))
            del trial
        remove_attention(model, sorted(drops, key=lambda k: (drops[k], k))[:n])
    timings["stage 2 (depth selection and removal)"] = time.perf_counter() - t0
    return model


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _calibration_loss(model, calib_x, calib_y, ref) -> float:
    """Cross-entropy on labelled calibration images, or (text) 1 - mean cosine of the
    calibration embeddings to the unpruned model's `ref`."""
    if calib_y is None:
        return output_distance(collect_outputs(model, calib_x), ref, False)
    total = sum(float(F.cross_entropy(model(pixel_values=x).logits, y, reduction="sum"))
                for x, y in zip(calib_x, calib_y))
    return total / sum(len(y) for y in calib_y)


def paper_recipe(model, target, calib_x, calib_y, eval_batches, mr, seed):
    shape = model_shape(model)
    s = min(1.0, target * shape.total_params / sum(shape.block_params))
    ratio = max(shape.widths) * shape.neuron_params / max(shape.attention_params)
    n = _nearest_feasible(shape, target, "attention", mr,
                          int(round(shape.num_blocks * s ** (ratio / 1.5))))
    plan = make_plan(shape, target, "attention", mr, depth=n)
    ref = None if calib_y is not None else collect_outputs(model, calib_x)
    prune_vit_mlp_width(model, list(plan.neurons_to_prune), mr,
                        importance=activation_scores(resolve(model), calib_x))
    removed: list[int] = []
    for _ in range(n):  # greedy: each round remove the attention that hurts calibration loss least
        an = resolve(model)
        losses = {}
        for i, parts in enumerate(an.parts):
            if parts.attention_removed:
                continue
            saved = bypass_attention(parts)
            losses[i] = _calibration_loss(model, calib_x, calib_y, ref)
            restore_attention(saved)
        best = min(losses, key=lambda k: (losses[k], k))
        remove_attention(model, [best])
        removed.append(best)
    return model


def torch_pruning(importance: str) -> Callable:
    def run(model, target, calib_x, calib_y, eval_batches, mr, seed):
        import torch_pruning as tp
        shape = model_shape(model)
        # width only (TP has no depth stage); TP has no notion of min_remaining, so where our
        # floor makes the target unreachable by width alone it may go down to 1 neuron per block
        floor = mr if target <= width_only_max(shape, mr) else 1
        plan = make_plan(shape, target, "block", floor, depth=0)
        an = resolve(model)
        fc1s = [p.fc1 for p in an.parts]
        ignored = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
                   and not any(m is f for f in fc1s)]
        imp = (tp.importance.GroupMagnitudeImportance(p=2) if importance == "magnitude"
               else tp.importance.GroupTaylorImportance())
        ratios = {f: n / f.out_features for f, n in zip(fc1s, plan.neurons_to_prune)}
        pruner = tp.pruner.MetaPruner(
            model, calib_x[0][:1], importance=imp, pruning_ratio_dict=ratios,
            ignored_layers=ignored, global_pruning=False,
            output_transform=output_tensor)
        if importance == "taylor":
            model.zero_grad()
            if calib_y is None:
                _simcse_backward(model, calib_x)
            else:
                for x, y in zip(calib_x, calib_y):
                    F.cross_entropy(model(pixel_values=x).logits, y).backward()
        pruner.step()
        model.zero_grad()
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval()
    return run


TP_HEAD_SHARE = 0.25  # tp-heads: the share of each block's heads Torch-Pruning removes


def heads_peer_plan(model, target: float, mr: int):
    """The shape of the head-pruning peers (tp-heads, TextPruner) at `target`: (model shape,
    heads removed per block, plan): a quarter of every block's heads (TP_HEAD_SHARE) and, for the
    rest of the target, as many MLP neurons per block as our planner gives a width-only plan with
    those heads (ValueError where that cannot meet the target)."""
    shape = model_shape(model)
    heads = uniform_heads(shape, (), max(1, round(TP_HEAD_SHARE * max(shape.heads))))
    floor = mr if target <= width_only_max(shape, mr) else 1
    return shape, heads, make_plan(shape, target, "block", floor, depth_indices=[],
                                   within=Within(heads=heads))


def torch_pruning_heads(model, target, calib_x, calib_y, eval_batches, mr, seed):
    """Torch-Pruning's own head pruning, as its Hugging Face ViT example sets it up: the q/k/v
    layers' head counts (`num_heads`), `prune_num_heads=True`, `prune_head_dims=False`, group
    magnitude importance; a quarter of every block's heads and, in the same step, MLP hidden
    channels (fc1 outputs and the coupled fc2 inputs) for the rest of the target, as many per
    block as our planner gives a width-only plan with those heads. No depth stage, no refit.
    The attention modules' head counts are set from the pruned layers after the step (the
    example's loop, here through our anatomy so both transformers layouts take it)."""
    import torch_pruning as tp
    shape, heads, plan = heads_peer_plan(model, target, mr)
    an = resolve(model)
    fc1s = [p.fc1 for p in an.parts]
    qkv = {p.heads.linear(w): p.num_heads for p in an.parts for w in "qkv"}
    roots = [*fc1s, *qkv]
    ignored = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
               and not any(m is r for r in roots)]
    ratios = {f: n / f.out_features for f, n in zip(fc1s, plan.neurons_to_prune)}
    share = heads[0] / shape.heads[0]
    ratios.update({lin: share for lin in qkv})  # TP removes heads only in a scope that prunes
    # (prune_head_dims=False keeps each head's dimension whole)
    pruner = tp.pruner.MetaPruner(
        model, calib_x[0][:1], importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio_dict=ratios, ignored_layers=ignored, global_pruning=False,
        num_heads=qkv, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=share, output_transform=output_tensor)
    pruner.step()
    for p in an.parts:
        p.heads.set_count(pruner.num_heads[p.heads.linear("q")])
    sync_config(an)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def simcse_loss(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """The unsupervised SimCSE loss of two views of a batch (one embedding per sentence): each
    row's other view is its positive, the batch's other rows its negatives."""
    sim = F.cosine_similarity(a.unsqueeze(1), b.unsqueeze(0), dim=-1) / temperature
    return F.cross_entropy(sim, torch.arange(len(a), device=sim.device))


def _simcse_backward(model, calib_x, temperature: float = 0.05) -> None:
    """Accumulate gradients of the unsupervised SimCSE loss: each sentence's two dropout views
    are positives, the other sentences of its (equal-length) batch negatives."""
    was_training = model.training
    model.train()
    torch.manual_seed(0)
    try:
        for x in calib_x:
            if len(x) < 2:
                continue
            a, b = (forward_output(model, x) for _ in range(2))  # mean-pooled, dropout on
            simcse_loss(a, b, temperature).backward()
    finally:
        model.train(was_training)


def random_recipe(model, target, calib_x, calib_y, eval_batches, mr, seed):
    shape = model_shape(model)
    rng = np.random.default_rng(seed)
    probe = make_plan(shape, target, "block", mr, "alpha")
    idx = sorted(rng.choice(shape.num_blocks, probe.blocks_to_prune, replace=False).tolist())
    plan = make_plan(shape, target, "block", mr, depth_indices=idx)
    scores = [torch.as_tensor(rng.random(w)) for w in shape.widths]
    prune_vit_mlp_width(model, list(plan.neurons_to_prune), mr, importance=scores)
    remove_blocks(model, idx)
    return model


METHODS: dict[str, Callable] = {
    "ours": ours(),
    "ours (alpha split, no search)": ours(split="alpha"),
    "ours (no compensation)": ours(compensation="none"),
    "ours (bias compensation)": ours(compensation="bias"),
    "ours (global allocation)": ours(allocation="global"),
    "ours (Block Influence depth)": ours(depth_method="bi"),
    "ours (attention unit)": ours(unit="attention"),
    "ours (auto unit)": ours(unit="auto"),
    "ours (refit own MLP, not model)": ours(refit_target="block"),
    "ours (2SSP score selection)": ours(selection="score"),
    "ours (least-squares selection)": ours(selection="lsq"),
    "ours (align 1)": ours(align=1, width_policy="per-block"),
    "ours (heads off)": ours(heads="off"),  # today's units before heads: neurons and depth
    "seed": seed_recipe,
    "2ssp-paper": paper_recipe,
    "tp-magnitude": torch_pruning("magnitude"),
    "tp-taylor": torch_pruning("taylor"),
    "tp-heads": torch_pruning_heads,
    "textpruner": peers.textpruner,  # these two run where bench.peers says
    "inc-retrain-free": peers.inc_retrain_free,
    "random": random_recipe,
}
TEXT_ONLY = tuple(peers.PEERS)  # methods for text encoders alone (not in the ViT tables)
BASELINES = ("seed", "2ssp-paper", "tp-magnitude", "tp-taylor", "random")
