from dataclasses import replace

import pytest
import torch

from src.vit_pruning import PruneConfig, count_total_params, prune_2ssp, resolve
from vit_pruning.measure import collect_outputs, kl_divergence
from vit_pruning.pipeline import model_shape
from vit_pruning.planner import heads_removed
from vit_pruning.persistence import load_pruned_model, save_pruned_model


@pytest.mark.parametrize("unit", ["block", "attention"])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_prune_2ssp_exact_and_reported(tiny_vit, pixels, unit, allocation):
    p0 = count_total_params(tiny_vit)
    shape = model_shape(tiny_vit)
    cfg = PruneConfig(unit=unit, min_remaining=8, allocation=allocation)
    model, res = prune_2ssp(tiny_vit, 0.35, [pixels[:4], pixels[4:]], cfg)
    assert count_total_params(model) == res.plan.params_after == res.params_after_stage2
    assert abs(res.achieved_sparsity - 0.35) <= 65 / p0
    removed_width = sum(res.neurons_removed) * 65 + heads_removed(shape, res.plan.heads_to_prune)
    assert res.params_after_stage1 == p0 - removed_width
    assert res.plan.split == "search" and res.search
    assert model(pixel_values=pixels).logits.shape == (8, 5)


def test_same_seed_same_result(pixels):
    from conftest import tiny_config
    from transformers import ViTForImageClassification
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        m = ViTForImageClassification(tiny_config()).eval()
        _, res = prune_2ssp(m, 0.3, [pixels], PruneConfig(min_remaining=8))
        results.append((res.depth_order, res.neurons_removed, res.kept_neurons,
                        collect_outputs(m, [pixels])))
    assert results[0][:3] == results[1][:3]
    torch.testing.assert_close(results[0][3], results[1][3], rtol=0, atol=0)


def test_lsq_compensation_beats_plain_removal(pixels):
    from conftest import tiny_config
    from transformers import ViTForImageClassification
    kls = {}
    for comp in ("none", "lsq"):
        torch.manual_seed(0)
        m = ViTForImageClassification(tiny_config(intermediate_size=128)).eval()
        ref = collect_outputs(m, [pixels])
        prune_2ssp(m, 0.3, [pixels], PruneConfig(min_remaining=8, compensation=comp, split=0))
        kls[comp] = kl_divergence(collect_outputs(m, [pixels]), ref)
    assert kls["lsq"] < kls["none"]


def test_no_calibration_data_uses_weights(tiny_vit):
    model, res = prune_2ssp(tiny_vit, 0.3, None, PruneConfig(min_remaining=8))
    assert res.plan.split == "alpha"
    assert count_total_params(model) == res.plan.params_after


@pytest.mark.parametrize("unit", ["block", "attention"])
def test_saved_model_reloads_identically(tiny_vit, pixels, tmp_path, unit):
    model, _ = prune_2ssp(tiny_vit, 0.4, [pixels], PruneConfig(unit=unit, min_remaining=8,
                                                                 allocation="global"))
    out = save_pruned_model(model, tmp_path / "run")
    again = load_pruned_model(out)
    assert count_total_params(again) == count_total_params(model)
    with torch.no_grad():
        diff = (again(pixel_values=pixels).logits - model(pixel_values=pixels).logits).abs().max()
    assert diff < 1e-5
    assert [p.attention_removed for p in resolve(again).parts] == \
        [p.attention_removed for p in resolve(model).parts]
    with pytest.raises(FileExistsError):
        save_pruned_model(model, out)


def test_translate_keys_between_layouts(tiny_vit):
    from vit_pruning.persistence import translate_keys
    state = tiny_vit.state_dict()
    layout = resolve(tiny_vit).layout
    other = "v4" if layout == "v5" else "v5"
    there = translate_keys(state, other)
    assert translate_keys(there, layout).keys() == state.keys()
    v4 = there if other == "v4" else state
    assert "vit.encoder.layer.0.intermediate.dense.weight" in v4
    assert "vit.encoder.layer.3.attention.output.dense.bias" in v4


def test_width_trial_leaves_model_unchanged_and_predicts_outputs(tiny_vit, pixels):
    from vit_pruning.depth import outputs_with_depth
    from vit_pruning.width import WidthPass, prune_width_sequential
    before = {k: v.clone() for k, v in tiny_vit.state_dict().items()}
    counts = [10, 20, 0, 30]
    cfg = PruneConfig(min_remaining=8, align=1, selection="score")
    trial = prune_width_sequential(tiny_vit, counts, [pixels], cfg, WidthPass([2], trial=True))
    after = tiny_vit.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    real = prune_width_sequential(tiny_vit, counts, [pixels], cfg, WidthPass([2]))
    assert real["kept"] == trial["kept"]
    torch.testing.assert_close(outputs_with_depth(tiny_vit, [pixels], "block", [2]), trial["outputs"],
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("target", [0.2, 0.4])
def test_repruning_a_pruned_model_stays_exact(tiny_vit, pixels, target):
    prune_2ssp(tiny_vit, 0.3, [pixels], PruneConfig(unit="attention", min_remaining=8, split=2))
    p0 = count_total_params(tiny_vit)
    model, res = prune_2ssp(tiny_vit, target, [pixels], PruneConfig(unit="block", min_remaining=4))
    assert count_total_params(model) == res.plan.params_after
    assert abs(res.achieved_sparsity - target) <= 65 / p0


def _fc2_and_stats(scale: torch.Tensor | None = None):
    """An fc2 of 12 neurons -> 6 channels and calibration statistics of its activations."""
    from vit_pruning.importance import accumulate
    torch.manual_seed(3)
    fc2 = torch.nn.Linear(12, 6)
    act = torch.randn(4, 50, 12)
    out = fc2(act) if scale is None else scale * fc2(act)
    return fc2, accumulate(None, act, out.detach())


@pytest.mark.parametrize("scale", [None, torch.tensor([0.5, 2.0, 1.0, 3.0, 0.25, 1.5])])
def test_refit_damping_pulls_toward_zero_or_the_unpruned_weights(scale):
    """A vanishing damping gives the plain least-squares fit either way; a huge one leaves the
    kept weights near zero, or anchored, as they were (a layer scale divided out exactly)."""
    from vit_pruning.lsq import refit_fc2
    fc2, stats = _fc2_and_stats(scale)
    keep = torch.tensor([0, 2, 3, 5, 7, 8, 11])
    w0, b0 = refit_fc2(fc2, stats, keep, "lsq", 1e-9, scale)
    w1, b1 = refit_fc2(fc2, stats, keep, "lsq", 1e-9, scale, anchored=True)
    torch.testing.assert_close(w0, w1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b0, b1, rtol=1e-5, atol=1e-6)
    zero, _ = refit_fc2(fc2, stats, keep, "lsq", 1e7, scale)
    anchored, _ = refit_fc2(fc2, stats, keep, "lsq", 1e7, scale, anchored=True)
    assert zero.abs().max() < 1e-5 * fc2.weight.abs().max()
    torch.testing.assert_close(anchored, fc2.weight[:, keep].detach(), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(w0, fc2.weight[:, keep], atol=1e-3)  # the refit did move them


def _state(model) -> list[torch.Tensor]:
    return [v.clone() for v in model.state_dict().values()]


def test_refit_prior_auto_is_one_of_the_fixed_priors_by_a_clear_gain(pixels, monkeypatch):
    """refit_prior="auto" tries the unpruned prior on the chosen split and prunes exactly as
    "unpruned" (with that split and selection) where the held-out gain is clear, exactly as
    "zero" where it is not; "zero" tries nothing more, and the two priors prune differently."""
    import copy
    from vit_pruning import pipeline
    from conftest import tiny_model
    base = tiny_model(layers=4, seed=2)
    cfg = PruneConfig(min_remaining=8, align=1, heads="off")

    def prune(config, **kw):
        m = copy.deepcopy(base)
        _, res = prune_2ssp(m, 0.3, [pixels], replace(config, **kw))
        return _state(m), res

    zero, res_zero = prune(cfg, refit_prior="zero")
    assert res_zero.refit_prior == "zero" and not any("prior" in k for k in res_zero.selection_search)
    assert "refit prior" not in res_zero.gates  # asked for: no gate ran
    for clear, expect in ((True, "unpruned"), (False, "zero")):
        monkeypatch.setattr(pipeline, "clear_gain", lambda worse, better, clear=clear: (clear, 0.0))
        state, res = prune(cfg)
        assert res.refit_prior == expect and f"{res.selection}, unpruned prior" in res.selection_search
        assert res.gates["refit prior"] == {"tried": "unpruned", "against": "zero", "z": 0.0,
                                            "kept": clear}  # what the gate decided, recorded
        fixed, res_fixed = prune(cfg, refit_prior=expect, selection=res.selection,
                                 split=res.plan.blocks_to_prune)
        assert res_fixed.refit_prior == expect and res_fixed.plan.neurons_to_prune == res.plan.neurons_to_prune
        assert all(torch.equal(a, b) for a, b in zip(state, fixed))
        if expect == "zero":
            assert all(torch.equal(a, b) for a, b in zip(state, zero))
        else:
            assert any(not torch.equal(a, b) for a, b in zip(state, zero))


def test_bad_refit_prior_is_refused(tiny_vit, pixels):
    with pytest.raises(ValueError, match="refit_prior must be one of"):
        prune_2ssp(tiny_vit, 0.3, [pixels], PruneConfig(refit_prior="model"))


def test_auto_unit_skips_a_unit_that_cannot_meet_the_target(tiny_vit, pixels):
    """--depth-unit auto at a target only one unit reaches (here whole attention sublayers,
    not blocks, which must leave one): that unit alone is tried, where before the other
    unit's ValueError ended the run after the first unit's work, quoting its smaller maximum
    as the model's. Above both, the error quotes the larger maximum."""
    from conftest import tiny_model
    from vit_pruning.planner import max_feasible_target
    shape = model_shape(tiny_vit)
    align = int(PruneConfig(unit="auto", min_remaining=8).resolved(shape).align)
    tops = {u: max_feasible_target(shape, u, 8, align) for u in ("block", "attention")}
    low, high = sorted(tops, key=tops.get)
    assert tops[low] + 0.02 < tops[high]
    target = round((tops[low] + tops[high]) / 2, 3)
    model, res = prune_2ssp(tiny_vit, target, [pixels[:4], pixels[4:]],
                            PruneConfig(unit="auto", min_remaining=8))
    assert res.plan.unit == high
    assert count_total_params(model) == res.plan.params_after
    with pytest.raises(ValueError, match=f"maximum feasible target .* is {tops[high]:.4f}"):
        prune_2ssp(tiny_model(), min(0.99, tops[high] + 0.02), [pixels],
                   PruneConfig(unit="auto", min_remaining=8))


def test_pruner_refuses_a_model_it_was_not_made_for(pixels):
    """A Pruner's shared work (trace, depth order, head costs) holds for its unpruned model
    only: a copy prunes as the model itself would, but a second prune() of the model the first
    pruned in place, or any model of another structure, is refused with the way out, where it
    used to end in an error about neuron counts (or prune on work that no longer held)."""
    import copy
    from conftest import tiny_model
    from vit_pruning import Pruner
    model = tiny_model()
    original = copy.deepcopy(model)
    pruner = Pruner(model, [pixels], PruneConfig(min_remaining=8))
    copied, res_copy = pruner.prune(0.3, model=copy.deepcopy(original))
    own, res_own = pruner.prune(0.3)
    assert own is model and res_copy.plan == res_own.plan
    assert torch.equal(copied(pixel_values=pixels).logits, own(pixel_values=pixels).logits)
    with pytest.raises(ValueError, match=r"its own model, which an earlier prune\(\) pruned in place"):
        pruner.prune(0.4)
    with pytest.raises(ValueError, match="a model of another structure"):
        pruner.decide(0.4, tiny_model(layers=3))
    assert pruner.prune(0.4, model=copy.deepcopy(original))[1].plan.target == 0.4
