"""Models off the main path: saved folders never load as a different model, targets are met
or refused on models pruned before, unsupported classes and non-finite weights are refused by
name, and a layer's attention output kind is read off its own code."""
import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForImageClassification, BertConfig,
                          BertForSequenceClassification, Dinov2Backbone, Dinov2Config,
                          ViTForImageClassification, ViTForMaskedImageModeling)

from conftest import cli_run as run
from conftest import one_line_error, tiny_config, vit_folder
from vit_pruning import PruneConfig, Pruner, load_pruned_model, prune_2ssp, save_pruned_model
from vit_pruning.pipeline import check_achieved, model_shape
from vit_pruning.planner import target_bound

ROOT = Path(__file__).resolve().parents[1]


# 1. a folder that needs its modeling file never loads as the stock class

def attention_pruned(width_policy="uniform"):
    torch.manual_seed(0)
    model = ViTForImageClassification(tiny_config()).eval()
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    prune_2ssp(model, 0.3, [x], PruneConfig(unit="attention", min_remaining=8, align=4, split=2,
                                            width_policy=width_policy))
    return model, x


@pytest.mark.parametrize("how", ["save_pruned_model", "save_pretrained"])
def test_remote_code_folder_refuses_plain_loading(tmp_path, how):
    model, x = attention_pruned()  # one MLP width, some attention removed
    if how == "save_pruned_model":
        save_pruned_model(model, tmp_path / "m")
    else:
        model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "pruned_vit" and cfg["auto_map"]["AutoConfig"].endswith("PrunedViTConfig")
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForImageClassification.from_pretrained(tmp_path / "m")
    back = load_pruned_model(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(back(pixel_values=x).logits, model(pixel_values=x).logits)


@pytest.mark.cli
def test_dry_run_does_not_call_an_attention_plan_plain(tmp_path, capsys):
    assert run(tmp_path, "--model", "embedded", "--target", "0.5", "--depth-unit", "attention",
               "--width-policy", "uniform", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "plain transformers model" not in out and "saved with its modeling file" in out


# 2. models pruned before: the target is met within the planner's bound (not refused)

@pytest.mark.parametrize("first", [("attention", "uniform"), ("attention", "per-block"),
                                   ("block", "per-block")])
@pytest.mark.parametrize("target", [0.1, 0.2, 0.3])
def test_repruning_a_pruned_model_meets_the_target(first, target):
    unit, policy = first
    torch.manual_seed(0)
    model = ViTForImageClassification(tiny_config(num_hidden_layers=6)).eval()
    x = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    prune_2ssp(model, 0.35, [x], PruneConfig(unit=unit, min_remaining=8, align=1, width_policy=policy,
                                             split=2))
    for second in ("block", "attention"):
        again = copy.deepcopy(model)
        before = sum(p.numel() for p in again.parameters())
        cfg = PruneConfig(unit=second, min_remaining=8, align=1, width_policy="per-block")
        _, res = prune_2ssp(again, target, [x], cfg)  # within reach: met, never refused
        achieved = 1 - sum(p.numel() for p in again.parameters()) / before
        assert abs(achieved - target) <= target_bound(model_shape(model), res.plan, "per-block") + 1e-12


@pytest.mark.cli
def test_cli_repruning_an_attention_pruned_folder_hits_the_target(tmp_path):
    assert run(tmp_path, "--model", "embedded", "--target", "0.5", "--depth-unit", "attention",
               "--calib-size", "32", "--eval-batches", "1", "--save-pruned-model", "--run-id", "att") == 0
    for i, target in enumerate(("0.2", "0.4")):
        assert run(tmp_path, "--model", str(tmp_path / "pruned" / "att"), "--target", target,
                   "--calib-size", "32", "--run-id", f"re{i}") == 0
        rep = json.loads((tmp_path / "reports" / f"report-re{i}.json").read_text())
        assert rep["target_error"] <= rep["target_bound"] <= 1e-3


def test_achieved_is_checked_against_the_target():
    torch.manual_seed(0)
    model = ViTForImageClassification(tiny_config()).eval()
    shape = model_shape(model)
    plan = PruneConfig(min_remaining=8, align=1, width_policy="per-block").plan(shape, 0.3)
    check_achieved(shape, plan, 0.3, plan.params_after, "per-block")  # as planned: fine
    with pytest.raises(ValueError, match="target 0.3 missed"):
        check_achieved(shape, plan, 0.3, int(shape.total_params * 0.6), "per-block")


# 3. classes outside the supported list are refused by name

@pytest.mark.cli
@pytest.mark.parametrize("build", ["bert-classifier", "vit-mim", "dinov2-backbone"])
def test_unsupported_classes_are_refused_by_name(tmp_path, capsys, build):
    folder = tmp_path / "m"
    if build == "bert-classifier":
        BertForSequenceClassification(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=64)).save_pretrained(folder)
        name = "BertForSequenceClassification"
    elif build == "vit-mim":
        ViTForMaskedImageModeling(tiny_config()).save_pretrained(folder)
        name = "ViTForMaskedImageModeling"
    else:
        Dinov2Backbone(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    image_size=16, patch_size=4, out_features=["stage2"])).save_pretrained(folder)
        name = "Dinov2Backbone"
    assert run(tmp_path, "--model", str(folder), "--target", "0.2") == 2
    assert f"unsupported model class {name}" in one_line_error(capsys)
    assert not (tmp_path / "reports").exists()



# 6c. NaN or Inf in the weights is refused before the work

@pytest.mark.cli
@pytest.mark.parametrize("where", ["classifier.weight", "vit.encoder.layer.1.intermediate.dense.weight"])
def test_non_finite_weights_are_refused(tmp_path, capsys, where):
    torch.manual_seed(0)
    model = ViTForImageClassification(tiny_config())
    state = model.state_dict()
    name = where if where in state else next(k for k in state if k.endswith(("layers.1.mlp.fc1.weight",)))
    with torch.no_grad():
        state[name][0, 0] = float("nan")
    folder = vit_folder(tmp_path / "nan", model)
    assert run(tmp_path, "--model", str(folder), "--target", "0.2") == 2
    assert "NaN or Inf" in one_line_error(capsys)
    assert not (tmp_path / "reports").exists()



# what a layer does with its attention's output is read off its own code, whatever the release

class _UnpacksPair:
    def forward(self, hidden_states):
        hidden_states, _ = self.attention(hidden_states)
        return hidden_states


class _IndexesLater:
    def forward(self, hidden_states):
        outputs = self.attention(
            hidden_states,
        )
        return outputs[0] + hidden_states


class _AddsTensor:  # DINOv2's layer in transformers 5.17, ViT's in 4.56-4.57
    def forward(self, hidden_states):
        attention_output = self.attention(hidden_states)
        return attention_output + hidden_states


def test_attention_output_kind_is_read_from_the_layer():
    from vit_pruning.modeling_vit_pruning import _forward_takes_tuple
    assert _forward_takes_tuple(_UnpacksPair) is True
    assert _forward_takes_tuple(_IndexesLater) is True
    assert _forward_takes_tuple(_AddsTensor) is False


def test_repruning_a_head_pruned_model_finds_the_units_that_fit():
    """Blocks that lost heads are smaller than the rest, so the last blocks (the placeholders)
    may overshoot a target that smaller ones meet. Alike units were grouped by stage and width
    only, so the search took the last blocks and refused the target (the embedded ViT pruned to
    0.5, then to 0.3: '2 block units cannot meet target 0.3: feasible counts are [1, 2]')."""
    from conftest import tiny_model
    from vit_pruning.anatomy import resolve
    from vit_pruning.planner import best_feasible_units, make_plan
    from vit_pruning.surgery import prune_heads, sync_config
    model = tiny_model(6, intermediate_size=128)
    for i in (2, 3, 4):
        prune_heads(resolve(model).parts[i], torch.tensor([0, 1, 2]))
    sync_config(resolve(model))
    shape = model_shape(model)
    assert shape.block_params == (12704, 12704, 11656, 11656, 11656, 12704)
    assert best_feasible_units(shape, 0.316, "block", 2, {i: -i for i in range(6)}, 16) == (4, 3)
    plan = make_plan(shape, 0.316, min_remaining=16, depth=2)
    assert set(plan.depth_indices) == {3, 4} and abs(plan.predicted_sparsity - 0.316) < 1e-3
    for target in (0.35, 0.5):  # a fixed count of heads as well: the sets that fit with them
        # (before: '2 block units at [2, 4] and heads [1, 1, 0, 1, 0, 1] cannot meet target 0.35')
        _, res = Pruner(model, None, PruneConfig(heads=1, min_remaining=16, align=1)).prune(
            target, copy.deepcopy(model))
        assert abs(res.achieved_sparsity - target) < 1e-3 and any(res.plan.heads_to_prune)
