"""The library as a user calls it: the command line's defaults, the dry run's preview is the
plan pruning makes, and bad arguments are errors that name them (never an answer)."""
import copy

import pytest
import torch
from transformers import AutoModelForImageClassification

from conftest import tiny_model
from vit_pruning import (PruneConfig, Pruner, plan_2ssp_allocation, prune_2ssp, search_target,
                         sweep)
from vit_pruning.config import EMBEDDED, default_min_remaining
from vit_pruning.pipeline import model_shape
from vit_pruning.planner import Within


def test_plan_2ssp_allocation_takes_the_command_lines_min_remaining():
    model = AutoModelForImageClassification.from_pretrained(EMBEDDED)  # MLP 384: narrower than 512
    plan = plan_2ssp_allocation(model, 0.25)
    assert plan.min_remaining == default_min_remaining(model_shape(model))[0] == 96
    assert abs(plan.predicted_sparsity - 0.25) < 1e-3
    with pytest.raises(ValueError, match="falls between"):  # the seed's 512 cannot be met here
        plan_2ssp_allocation(model, 0.25, min_remaining=512)


def test_a_target_between_depth_units_and_neurons_names_the_heads_that_reach_it():
    from vit_pruning.planner import make_plan
    shape = model_shape(tiny_model(2))  # two blocks: one is 44% of the model, neurons 32%
    with pytest.raises(ValueError, match=r"falls between .* try heads=N \(N attention heads "
                                         r"removed from every block: N in \[1, 2, 3\] reach it\)"):
        make_plan(shape, 0.35, min_remaining=16)
    plan = make_plan(shape, 0.35, min_remaining=16, depth_indices=[],
                     within=Within(heads=(3, 3)))  # what the message offers does plan
    assert abs(plan.predicted_sparsity - 0.35) < 1e-3


@pytest.mark.parametrize("unit", ["block", "attention"])
@pytest.mark.parametrize("target", [0.2, 0.45])
def test_the_preview_is_the_plan_pruning_makes(unit, target):
    model = tiny_model(6)
    cfg = PruneConfig(unit=unit, min_remaining=8, align=1)
    pruner = Pruner(model, None, cfg)
    preview = pruner.preview(target)
    before = copy.deepcopy(model.state_dict())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
    _, result = pruner.prune(target, copy.deepcopy(model))
    assert preview == result.plan


def test_calibration_inputs_of_the_wrong_kind_are_refused():
    """Raw uint8 pixels were taken for token ids and calibrated on unnormalized values; float
    inputs to a text encoder would fail deep inside its embeddings."""
    from test_text import tiny_bert
    from vit_pruning import prune_vit_attention_blocks, prune_vit_mlp_width
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    raw = (x * 60 + 128).clamp(0, 255).to(torch.uint8)
    with pytest.raises(ValueError, match=r"calibration batch 1 holds torch.uint8 values: an "
                                         r"image model takes float pixel values"):
        prune_2ssp(tiny_model(4), 0.3, [x, raw], PruneConfig(min_remaining=8))
    with pytest.raises(ValueError, match="holds torch.uint8 values"):
        prune_vit_mlp_width(tiny_model(4), [8] * 4, dataloader=[raw], min_remaining=8)
    with pytest.raises(ValueError, match="holds torch.uint8 values"):
        prune_vit_attention_blocks(tiny_model(4), dataloader=[raw], num_to_prune=1)
    ids = torch.randint(5, 90, (4, 12), generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match=r"batch 0 holds torch.float32 values: a text encoder "
                                         r"takes integer token ids"):
        prune_2ssp(tiny_bert(), 0.2, [ids.float()], PruneConfig(min_remaining=4))
    prune_2ssp(tiny_bert(), 0.2, [ids], PruneConfig(min_remaining=4))  # the right kind prunes


def test_calibration_batches_that_cannot_be_images_are_named():
    """An empty loader silently pruned without data; one image without its batch dimension
    failed in an unpacking deep inside, NaN pixels in a factorization. Each is named now."""
    from vit_pruning import prune_vit_mlp_width
    cfg = PruneConfig(min_remaining=8)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"^the calibration data gave no batch: give at least "
                                         r"one, or None to work without calibration data$"):
        prune_2ssp(tiny_model(4), 0.3, [], cfg)
    with pytest.raises(ValueError, match=r"gave no batch \(max_batches=0\)"):
        prune_2ssp(tiny_model(4), 0.3, [x], cfg, calib_batches=0)
    with pytest.raises(ValueError, match=r"calibration batch 1 has shape \(3, 16, 16\): images "
                                         r"come in batches of \(batch, channels, height, width\)"):
        prune_2ssp(tiny_model(4), 0.3, [x, x[0]], cfg)
    bad = x.clone()
    bad[2, 0, 3, 3] = float("inf")
    with pytest.raises(ValueError, match="calibration batch 0 holds NaN or infinite pixel values"):
        prune_vit_mlp_width(tiny_model(4), [8] * 4, dataloader=[bad], min_remaining=8)
    a, ra = prune_2ssp(tiny_model(4), 0.3, x, cfg)  # one tensor is one batch
    b, rb = prune_2ssp(tiny_model(4), 0.3, [x], cfg)
    assert ra.plan == rb.plan and all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize("target", ["0.3", torch.tensor(0.3), 0.3])
def test_a_target_may_be_any_number(target):
    """A string or a tensor target ended in a TypeError from a comparison inside the planner."""
    _, res = prune_2ssp(tiny_model(4), target, None, PruneConfig(min_remaining=8))
    assert res.plan.target == pytest.approx(0.3) and isinstance(res.plan.target, float)


@pytest.mark.parametrize("target", ["thirty percent", None, True, [0.3]])
def test_a_target_that_is_not_a_number_is_named(target):
    with pytest.raises(ValueError, match=r"a target must be a number in \(0, 1\), got "):
        prune_2ssp(tiny_model(4), target, None, PruneConfig(min_remaining=8))
    with pytest.raises(ValueError, match=r"a target must be a number in \(0, 1\), got "):
        sweep(tiny_model(4), [0.2, target], None, PruneConfig(min_remaining=8))


def test_search_target_refuses_bad_arguments_by_name():
    model = tiny_model(4)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    pruner = Pruner(model, [x], PruneConfig(min_remaining=8, align=1))
    with pytest.raises(ValueError, match="low must be in"):
        search_target(model, lambda m: True, low=-0.5, resolution=0.25, pruner=pruner)
    with pytest.raises(ValueError, match="resolution must be in"):
        search_target(model, lambda m: True, resolution=0, pruner=pruner)
    with pytest.raises(ValueError, match="must not be above"):
        search_target(model, lambda m: True, low=0.5, high=0.2, pruner=pruner)
    with pytest.raises(TypeError, match="unexpected keyword"):
        search_target(model, lambda m: True, [x], devcie="cpu")


def test_sweep_refuses_one_number_by_name():
    with pytest.raises(ValueError, match="targets must be a sequence"):
        sweep(tiny_model(4), 0.3)


def test_a_one_output_head_is_refused_where_outputs_are_compared():
    """num_labels=1 (transformers' regression head): the softmax of one logit is 1, so every
    trial measured KL 0 and the plan was chosen blind."""
    model = tiny_model(4)
    model.classifier = torch.nn.Linear(model.classifier.in_features, 1)
    model.config.num_labels = 1
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"ViTForImageClassification: its classifier head has one "
                                         r"output \(a regression head"):
        prune_2ssp(model, 0.3, [x], PruneConfig(min_remaining=8))
    prune_2ssp(model, 0.3, None, PruneConfig(min_remaining=8))  # data-free: nothing compared


def test_what_a_processor_or_tokenizer_returns_is_a_batch():
    """`[processor(images=..., return_tensors="pt")]` is a list of BatchFeature (not a dict):
    it was refused ("cannot find pixel values in a batch of type BatchFeature"), as were numpy
    arrays, and distill took only tensors and plain dicts. Each now prunes (and distills) as
    the same pixels or token ids given as tensors do."""
    from transformers import BatchEncoding, BatchFeature, BertConfig, BertModel

    from vit_pruning import distill
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    cfg = PruneConfig(min_remaining=8)
    ref, _ = prune_2ssp(tiny_model(4), 0.3, [x], cfg)
    for given in ([BatchFeature({"pixel_values": x})], [x.numpy()], [(x, torch.zeros(16))]):
        model, _ = prune_2ssp(tiny_model(4), 0.3, given, cfg)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                     ref.state_dict().values()))
    torch.manual_seed(0)
    teacher = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=32),
                        add_pooling_layer=False).eval()
    ids = torch.randint(1, 50, (8, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    losses = []
    for batch in ({"input_ids": ids, "attention_mask": mask},
                  BatchEncoding({"input_ids": ids, "token_type_ids": ids * 0, "attention_mask": mask})):
        student = copy.deepcopy(teacher)
        losses.append(distill(student, teacher, [batch], steps=2, lr=1e-3, batch_size=4,
                              train="all", heldout=0).losses)
    assert losses[0] == losses[1] and len(losses[0]) == 2


@pytest.mark.parametrize("wrap, how", [(torch.compile, "model._orig_mod"),
                                       (torch.nn.DataParallel, "model.module")])
def test_a_wrapped_model_is_told_what_to_prune(wrap, how):
    """A torch.compile'd or DataParallel model was "unsupported model class OptimizedModule",
    with the list of classes: the class it wraps is one of them."""
    with pytest.raises(ValueError, match=rf"unsupported model class \w+: it wraps a "
                                         rf"ViTForImageClassification: prune that \({how}\)"):
        prune_2ssp(wrap(tiny_model(4)), 0.3, [torch.randn(8, 3, 16, 16)], PruneConfig(min_remaining=8))
