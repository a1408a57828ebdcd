import numpy as np
import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from src.vit_pruning import (count_total_params, model_shape, plan_2ssp_allocation,
                             prune_vit_attention_blocks, prune_vit_mlp_width)
from vit_pruning.planner import (Within, best_feasible_units, default_depth_indices, indices_feasible,
                                 make_plan, max_depth_units)

SHAPES = {  # name: (hidden, layers, heads, mlp)
    "vit-s16": (384, 12, 6, 1536),
    "vit-b16": (768, 12, 12, 3072),
    "vit-l16": (1024, 24, 16, 4096),
    "odd": (200, 7, 5, 777),
}


def meta_model(hidden, layers, heads, mlp):
    """A full-size ViT with no memory behind it: shapes and parameter counts only."""
    cfg = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                    intermediate_size=mlp, num_labels=1000)
    with torch.device("meta"):
        return ViTForImageClassification(cfg)


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("unit", ["block", "attention"])
def test_plan_hits_target_to_the_neuron(name, unit):
    hidden, layers, heads, mlp = SHAPES[name]
    min_remaining = min(512, mlp // 4)
    shape = model_shape(meta_model(*SHAPES[name]))
    top = make_plan(shape, 0.01, unit, min_remaining).max_feasible_target
    tol = (2 * hidden + 1) / shape.total_params
    for target in np.arange(0.01, top, 0.01):
        plan = make_plan(shape, float(target), unit, min_remaining)
        assert abs(plan.predicted_sparsity - target) <= tol, (target, plan)
        assert sum(plan.neurons_to_prune) * (2 * hidden + 1) + (
            shape.total_params - plan.params_after - sum(plan.neurons_to_prune) * (2 * hidden + 1)
        ) == shape.total_params - plan.params_after


@pytest.mark.parametrize("unit", ["block", "attention"])
@pytest.mark.parametrize("target", [0.05, 0.25, 0.5])
def test_applying_plan_gives_predicted_count_vit_b(unit, target):
    model = meta_model(*SHAPES["vit-b16"])
    plan = plan_2ssp_allocation(model, target, min_remaining=512, unit=unit)
    scores = [torch.rand(3072, generator=torch.Generator().manual_seed(i)) for i in range(12)]
    prune_vit_mlp_width(model, list(plan.neurons_to_prune), min_remaining=512, importance=scores)
    prune_vit_attention_blocks(model, selected_indices=plan.depth_indices, unit=unit)
    assert count_total_params(model) == plan.params_after
    assert abs(plan.predicted_sparsity - target) <= 1537 / plan.params_before


def test_seed_notebook_snippet_fields(tiny_vit):
    plan = plan_2ssp_allocation(tiny_vit, 0.143, min_remaining=8)
    assert isinstance(plan.blocks_to_prune, int) and isinstance(plan.per_block_neurons_to_prune, int)
    assert len(plan.neurons_to_prune) == 4


def test_alpha_formula_on_vit_b():
    shape = model_shape(meta_model(*SHAPES["vit-b16"]))
    plan = make_plan(shape, 0.25, "attention", 512, depth="alpha")
    # s = 0.25 of the model on blocks; P_mlp/P_attn ~ 2 -> N = round(12 * s**(2/1.5))
    s = 0.25 * shape.total_params / sum(shape.block_params)
    ratio = (3072 * 1537) / shape.attention_params[0]
    assert plan.blocks_to_prune == round(12 * s ** (ratio / 1.5))


@pytest.mark.parametrize("target", [0.0, -0.1, 1.0, 1.5])
def test_out_of_range_targets(tiny_vit, target):
    with pytest.raises(ValueError, match=r"target must be in \(0, 1\).*maximum feasible target is 0\.\d+"):
        plan_2ssp_allocation(tiny_vit, target, min_remaining=8)


def test_infeasible_target_names_maximum(tiny_vit):
    shape = model_shape(tiny_vit)
    top = make_plan(shape, 0.01, "attention", 60).max_feasible_target
    with pytest.raises(ValueError, match=f"maximum feasible target .* is {top:.4f}"):
        plan_2ssp_allocation(tiny_vit, top + 0.01, min_remaining=60, unit="attention")


def test_the_plan_depends_on_the_shape_alone(tiny_vit):
    """Pure arithmetic: other weights, same shape, the same plan; another shape, another one."""
    from conftest import tiny_model
    from vit_pruning.pipeline import model_shape
    plan = plan_2ssp_allocation(tiny_vit, 0.3, 8)
    assert plan == plan_2ssp_allocation(tiny_model(seed=7), 0.3, 8)
    assert plan == make_plan(model_shape(tiny_vit), 0.3, "block", 8)
    assert plan != plan_2ssp_allocation(tiny_model(layers=6), 0.3, 8)


@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("unit", ["block", "attention"])
@pytest.mark.parametrize("align", [8, 64])
def test_aligned_plans_keep_widths_aligned_and_land_within_half_a_group(name, unit, align):
    hidden, layers, heads, mlp = SHAPES[name]
    mr = min(512, mlp // 4)
    shape = model_shape(meta_model(*SHAPES[name]))
    group = align * (2 * hidden + 1) / shape.total_params
    top = make_plan(shape, 0.01, unit, mr, align=align).max_feasible_target
    for target in np.arange(0.05, top, 0.05):
        plan = make_plan(shape, float(target), unit, mr, align=align, width_policy="per-block")
        kept = [w - n for w, n in zip(shape.widths, plan.neurons_to_prune)]
        assert all(k % align == 0 or n == 0 for k, n in zip(kept, plan.neurons_to_prune)), kept
        assert abs(plan.predicted_sparsity - target) <= group / 2 + 1e-12, (target, plan.target_error)
        auto = make_plan(shape, float(target), unit, mr, align=align, width_policy="auto")
        assert auto.target_error <= max(1e-3, plan.target_error) + 1e-12
        if auto.uniform_width is not None:  # one width for every surviving block
            gone = set(auto.depth_indices) if unit == "block" else set()
            assert {w - n for i, (w, n) in enumerate(zip(shape.widths, auto.neurons_to_prune))
                    if i not in gone} == {auto.uniform_width}


def test_uniform_policy_on_vit_b_is_plain_and_within_a_tenth_of_a_point():
    shape = model_shape(meta_model(*SHAPES["vit-b16"]))
    for target in (0.1, 0.2, 0.3, 0.4, 0.5):
        for depth in range(0, 6):  # whatever depth count the split search picks
            try:
                plan = make_plan(shape, target, "block", 512, depth=depth, align=8, width_policy="auto")
            except ValueError:
                continue
            assert plan.uniform_width is not None and plan.uniform_width % 8 == 0
            assert plan.target_error <= 1e-3


def test_default_align_is_8_on_vit_and_4_on_the_embedded_model():
    from vit_pruning.config import EMBEDDED
    from vit_pruning.planner import default_align
    assert default_align(model_shape(meta_model(*SHAPES["vit-b16"]))) == 8
    emb = ViTForImageClassification.from_pretrained(EMBEDDED)
    assert default_align(model_shape(emb)) == 4


def test_global_allocation_keeps_alignment():
    from vit_pruning.width import global_allocation
    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(64, generator=gen) for _ in range(3)]
    counts = global_allocation(scores, 48, 16, align=8)
    assert sum(counts) == 48 and all(c % 8 == 0 for c in counts)
    with pytest.raises(ValueError, match="multiples of 8"):
        global_allocation([torch.rand(60)], 8, 16, align=8)


def swin_t_shape():
    """Swin-T's shape (meta device): 4 stages of width 96..768, neurons of 193..1537 parameters."""
    from transformers import SwinConfig, SwinForImageClassification
    cfg = SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7,
                     num_labels=1000)
    try:
        with torch.device("meta"):
            return model_shape(SwinForImageClassification(cfg))
    except RuntimeError:  # transformers 4.46 calls .item() while building Swin: real weights
        return model_shape(SwinForImageClassification(cfg))


@pytest.mark.parametrize("unit", ["block", "attention"])
@pytest.mark.parametrize("align", [1, 8])
def test_swin_plans_land_within_half_a_group_of_the_smallest_neurons_with_room(unit, align):
    shape = swin_t_shape()
    assert shape.heterogeneous and sorted(set(shape.costs)) == [193, 385, 769, 1537]
    for target in np.arange(0.05, 0.61, 0.05):
        plan = make_plan(shape, float(target), unit, 128, align=align, width_policy="auto")
        kept = [w - n for w, n in zip(shape.widths, plan.neurons_to_prune)]
        survivors = [i for i in range(shape.num_blocks)
                     if not (unit == "block" and i in plan.depth_indices)]
        room = [shape.costs[i] for i in survivors if kept[i] - align >= 128]
        error = abs(plan.params_after - (1 - target) * shape.total_params)
        assert error <= align * min(room or shape.costs) / 2 + 1e-6, (target, error)
        assert all(k % align == 0 or k == w for k, w in zip(kept, shape.widths))
        # stage 0 (width 384) and stage 3 (width 3072) lose the same share, to a group
        first, last = survivors[0], survivors[-1]
        assert abs(plan.neurons_to_prune[first] / 384 - plan.neurons_to_prune[last] / 3072) < 0.05


def test_swin_keeps_a_block_per_stage_and_refuses_uniform_width():
    shape = swin_t_shape()
    assert max_depth_units(shape, "block") == 12 - 4
    assert {shape.stages[i] for i in range(12)} - {shape.stages[i] for i in range(12)
                                                  if i not in default_depth_indices(shape, "block", 8)} == set()
    with pytest.raises(ValueError, match="width_policy 'uniform' needs blocks of one width"):
        make_plan(shape, 0.3, "block", 128, align=8, width_policy="uniform")


def test_swin_picks_a_feasible_set_when_the_best_scored_units_are_too_small():
    """The lowest-scored attention sublayers (stage 0 and 1: small) cannot reach 0.5 with the
    neurons min_remaining=512 leaves; the lowest-scored set that can is chosen instead."""
    from itertools import combinations
    shape = swin_t_shape()
    scores = {i: float(shape.stages[i]) + i / 100 for i in range(12)}
    ranked = sorted(scores, key=scores.get)
    assert not indices_feasible(shape, 0.5, "attention", ranked[:5], 512, 8)
    units = best_feasible_units(shape, 0.5, "attention", 5, scores, 512, 8)
    assert units is not None and indices_feasible(shape, 0.5, "attention", units, 512, 8)
    best = min(sum(scores[i] for i in c) for c in combinations(range(12), 5)
               if indices_feasible(shape, 0.5, "attention", c, 512, 8))
    assert sum(scores[i] for i in units) == pytest.approx(best)


def test_mixed_attention_takes_the_fewest_sublayers_in_order_that_let_widths_meet_the_target():
    from vit_pruning.planner import ModelShape, make_plan, mixed_attention, mixed_options
    # 4 blocks of 100 (attention 20, 64 neurons of 1), 20 outside: total 420
    shape = ModelShape(total_params=420, hidden_size=8, widths=(64,) * 4, block_params=(100,) * 4,
                       attention_params=(20,) * 4, params_per_neuron=1)
    target = 170 / 420  # one block (100) leaves 70 for three blocks' 3 x 56 neurons: widths alone
    assert mixed_attention(shape, target, (3,), [0, 1, 2], 8, 1) == ()
    assert mixed_options(shape, target, 8, 1) == {}  # a count of whole blocks meets it alone
    target = 330 / 420  # two blocks (200) + two blocks' 112 neurons = 312: one sublayer more
    got = mixed_attention(shape, target, (2, 3), [3, 1, 0], 8, 1)
    assert got == (1,)  # block 3 is gone: the order's next, block 1
    # brute force over every count of sublayers: the fewest that let the widths reach it
    fewest = min(k for k in range(3) if 200 + 20 * k <= 330.5 and 200 + 20 * k + 112 >= 329.5)
    assert len(got) == fewest
    assert mixed_attention(shape, 395 / 420, (1, 2, 3), [0], 8, 1) is None  # the last one cannot
    plan = make_plan(shape, target, "block", 8, depth_indices=(2, 3), within=Within(attention=got), align=1)
    assert plan.params_after == 420 - 200 - 20 - sum(plan.neurons_to_prune)
    assert abs(plan.params_after - (1 - target) * 420) <= 0.5
    with pytest.raises(ValueError, match="removed whole"):
        make_plan(shape, target, "block", 8, depth_indices=(2, 3), within=Within(attention=(3,)), align=1)
