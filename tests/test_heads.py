"""Attention heads as a pruning unit: every supported family on tiny random configs, in
whichever transformers major runs the tests. Removing heads is checked against the unpruned
model with those heads silenced (their output-projection columns zeroed: what a removed head
adds is exactly nothing), parameters are counted exactly, and a head-pruned model saves,
reloads with identical outputs and refuses plain from_pretrained."""
from dataclasses import replace

import pytest
import torch
import transformers as tf
from test_families import FAMILIES, TXT, V, build, images, out

from vit_pruning import load_pruned_model, save_pruned_model
from vit_pruning.anatomy import resolve
from vit_pruning.measure import count_flops, count_total_params
from vit_pruning.objective import (BlockTiming, LatencyModel, flop_shape, head_grid,
                                   measure_latency_model)
from vit_pruning.surgery import (attention_refs, is_plain, prune_heads, remove_attention,
                                 restore_attention_refs, sync_config)

TEXT = {"bert": ("BertModel", lambda: tf.BertConfig(**{**TXT, "num_hidden_layers": 3, "num_attention_heads": 4})),
        "roberta": ("RobertaModel", lambda: tf.RobertaConfig(
            **{**TXT, "num_hidden_layers": 3, "num_attention_heads": 4, "max_position_embeddings": 20}))}
VIT = {"vit": ("ViTForImageClassification", lambda: tf.ViTConfig(**V, num_labels=5)),
       "deit": ("DeiTModel", lambda: tf.DeiTConfig(**V))}
ALL = {**{k: v for k, v in FAMILIES.items() if k != "beit-shared-bias"}, **VIT, **TEXT}


def make(name: str) -> torch.nn.Module:
    if name in FAMILIES:
        return build(name)
    cls, cfg = ALL[name]
    torch.manual_seed(0)
    return getattr(tf, cls)(cfg()).eval()


def inputs(name: str) -> torch.Tensor:
    if name in TEXT:
        return torch.randint(3, 99, (4, 7), generator=torch.Generator().manual_seed(1))
    return images(4)


def silenced(model, heads: dict[int, list[int]]):
    """The model's output with heads silenced: their columns of the output projection zeroed."""
    an = resolve(model)
    saved = []
    with torch.no_grad():
        for b, hs in heads.items():
            slots = an.parts[b].heads
            o = slots.linear("o")
            saved.append((o, o.weight.clone()))
            for h in hs:
                o.weight[:, h * slots.head_dim:(h + 1) * slots.head_dim] = 0
    try:
        return out(model, x_of[0])
    finally:
        with torch.no_grad():
            for o, w in saved:
                o.weight.copy_(w)


x_of: list = [None]


def drop(model, heads: dict[int, list[int]]) -> None:
    an = resolve(model)
    for b, hs in heads.items():
        n = an.parts[b].num_heads
        prune_heads(an.parts[b], torch.tensor([h for h in range(n) if h not in hs]))
    sync_config(resolve(model))


@pytest.mark.parametrize("name", ALL)
def test_removed_heads_are_silenced_heads(name):
    model = make(name)
    x_of[0] = x = inputs(name)
    an = resolve(model)
    n, last = an.parts[0].num_heads, len(an.parts) - 1
    heads = {0: [1], last: list(range(1, an.parts[last].num_heads))}  # the last keeps one head
    ref = silenced(model, heads)
    per_head = [an.parts[b].head_params for b in heads]
    before = count_total_params(model)
    drop(model, heads)
    an = resolve(model)
    assert [an.parts[b].num_heads for b in heads] == [n - 1, 1]
    assert count_total_params(model) == before - sum(p * len(hs) for p, hs in zip(per_head, heads.values()))
    torch.testing.assert_close(out(model, x), ref, rtol=0, atol=2e-5)
    assert not is_plain(an)
    assert model.config.vit_pruning["attention_heads"][0] == n - 1


@pytest.mark.parametrize("name", ALL)
def test_head_pruned_model_saves_and_reloads(name, tmp_path):
    model = make(name)
    x = inputs(name)
    an = resolve(model)
    heads = {0: [0], 1: list(range(an.parts[1].num_heads))}  # block 1 loses every head
    drop(model, heads)
    assert resolve(model).parts[1].attention_removed
    ref = out(model, x)
    saved = save_pruned_model(model, tmp_path / "m")
    assert saved.format == "remote-code"
    again = load_pruned_model(tmp_path / "m")
    assert torch.equal(out(again, x), ref)
    assert count_total_params(again) == count_total_params(model)
    assert [p.num_heads for p in resolve(again).parts] == [p.num_heads for p in resolve(model).parts]
    auto = tf.AutoModelForImageClassification if "ForImage" in ALL[name][0] else tf.AutoModel
    with pytest.raises(Exception):
        auto.from_pretrained(tmp_path / "m")  # plain transformers: refused, never a wrong model
    remote = auto.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    torch.testing.assert_close(out(remote, x), ref, rtol=0, atol=1e-5)


def test_losing_every_head_is_removing_the_sublayer():
    a, b = make("beit"), make("beit")
    x_of[0] = x = images(4)
    drop(a, {2: list(range(resolve(a).parts[2].num_heads))})
    remove_attention(b, [2])
    assert count_total_params(a) == count_total_params(b)
    assert a.config.vit_pruning["attention_removed"] == [2] == b.config.vit_pruning["attention_removed"]
    assert torch.equal(out(a, x), out(b, x))


def test_refs_undo_head_pruning():
    model = make("clip-vision")
    x = images(4)
    ref = out(model, x)
    parts = resolve(model).parts[0]
    saved = attention_refs(parts)
    prune_heads(parts, torch.tensor([0, 2]))
    assert not torch.equal(out(model, x), ref)
    restore_attention_refs(saved)
    assert torch.equal(out(model, x), ref) and resolve(model).parts[0].num_heads == 4


def test_bad_head_indices_are_refused():
    parts = resolve(make("vit")).parts[0]
    with pytest.raises(ValueError, match=r"keep_heads must be indices in \[0, 4\)"):
        prune_heads(parts, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="duplicates"):
        prune_heads(parts, torch.tensor([1, 1]))


def test_shared_relative_position_bias_is_known():
    assert resolve(build("beit-shared-bias")).shared_head_bias
    assert not resolve(build("beit")).shared_head_bias


# ---- planning and the pipeline ----
import copy  # noqa: E402

from conftest import cli_run, one_line_error, tiny_model  # noqa: E402
from vit_pruning import PruneConfig, model_shape, prune_2ssp  # noqa: E402
from vit_pruning.config import EMBEDDED  # noqa: E402
from vit_pruning.planner import Within, global_heads, make_plan, uniform_heads  # noqa: E402


def test_plans_count_heads_exactly():
    model = tiny_model(layers=4, num_attention_heads=4)
    shape = model_shape(model)
    heads = uniform_heads(shape, [3], per_block=1)
    assert heads == (1, 1, 1, 0)
    plan = make_plan(shape, 0.4, "block", 8, depth_indices=[3], within=Within(heads=heads))
    # the neurons fill what the heads leave: within half a neuron of the target
    assert abs(plan.params_after - (1 - 0.4) * shape.total_params) <= shape.neuron_params / 2
    without = make_plan(shape, 0.4, "block", 8, depth_indices=[3])
    freed = 3 * resolve(model).parts[0].head_params
    assert sum(without.neurons_to_prune) - sum(plan.neurons_to_prune) == pytest.approx(
        freed / shape.neuron_params, abs=3)
    x = torch.randn(8, 3, 16, 16)
    pruned, res = prune_2ssp(copy.deepcopy(model), 0.4, [x], PruneConfig(
        min_remaining=8, align=1, split=1, heads=1, width_policy="per-block"))
    gone = res.plan.depth_indices
    assert res.plan.heads_to_prune == tuple(0 if i in gone else 1 for i in range(4))
    assert count_total_params(pruned) == res.plan.params_after == res.params_after_stage2
    assert [p.num_heads for p in resolve(pruned).parts] == [3, 3, 3]
    assert [len(k) for i, k in enumerate(res.kept_heads) if i not in gone] == [3, 3, 3]


def test_global_heads_take_the_cheapest_and_leave_one():
    shape = model_shape(tiny_model(layers=3, num_attention_heads=4))
    costs = [[5, 1, 7, 2], [0.5, 9, 9, 9], [3, 3, 3, 3]]
    assert global_heads(shape, [], costs, 3) == (2, 1, 0)
    assert global_heads(shape, [0], costs, 3) == (0, 1, 2)  # block 0 is removed
    assert global_heads(shape, [], costs, 100) == (3, 3, 3)  # each keeps a head
    assert global_heads(shape, [], costs, 0) == ()


def test_heads_a_block_cannot_lose_are_refused():
    shape = model_shape(tiny_model(layers=3, num_attention_heads=4))
    with pytest.raises(ValueError, match="cannot remove 4 of its 4 attention heads"):
        make_plan(shape, 0.3, "block", 8, depth_indices=[], within=Within(heads=(4, 0, 0)))
    with pytest.raises(ValueError, match="cannot remove 1 of its 4"):
        make_plan(shape, 0.3, "block", 8, depth_indices=[1], within=Within(heads=(0, 1, 0)))


@pytest.fixture(scope="module")
def embedded_calibration():
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.tensor(digits.images[:64], dtype=torch.float32) / 16.0
    x = torch.nn.functional.interpolate(x[:, None], size=16, mode="bilinear").repeat(1, 3, 1, 1)
    return [(x - 0.5) / 0.5]


def test_auto_heads_are_kept_only_where_calibration_data_says_they_help(embedded_calibration):
    """The embedded model at 0.6: the split search tries heads beside today's units and keeps
    the plan with the lowest held-out distance; with heads="off" no head plan is tried and the
    plan is the one without heads."""
    model = tf.AutoModelForImageClassification.from_pretrained(EMBEDDED).eval()
    x = embedded_calibration
    _, auto = prune_2ssp(copy.deepcopy(model), 0.6, x, PruneConfig())
    _, off = prune_2ssp(copy.deepcopy(model), 0.6, x, PruneConfig(heads="off"))
    assert not any("heads" in k for k in off.search) and off.plan.heads_to_prune == ()
    tried = {k: v for k, v in auto.search.items() if "heads" in k}
    assert tried  # head plans were tried
    best = min(auto.search, key=auto.search.get)
    assert auto.plan.removes_heads == ("heads" in best)
    assert {k: v for k, v in auto.search.items() if "heads" not in k} == off.search
    if not auto.plan.removes_heads:
        assert auto.plan == off.plan


def test_a_heads_flops_are_its_sublayers_share_and_flop_targets_count_them_exactly():
    """A head's FLOPs are its attention sublayer's over its heads, and a FLOP target with heads
    lands where the plan says: the pruned model's counted FLOPs are the plan's prediction (the
    Pruner checks that too) and within the planner's 0.1 pp of the target."""
    model = tiny_model(layers=4)
    shape = flop_shape(model, model_shape(model))
    assert shape.head_params == tuple(a // 4 for a in shape.attention_params)
    one = tiny_model(layers=4)
    prune_heads(resolve(one).parts[0], torch.tensor([0, 1, 3]))
    assert count_flops(model) - count_flops(one) == shape.head_params[0]
    x = torch.randn(8, 3, 16, 16)
    pruned, res = prune_2ssp(model, 0.3, [x], PruneConfig(objective="flops", min_remaining=8,
                                                          align=1, heads=1))
    assert res.plan.heads_to_prune and sum(res.plan.heads_to_prune) >= 2
    assert count_flops(pruned) == res.plan.params_after == res.objective_after
    assert abs(1 - count_flops(pruned) / shape.total_params - 0.3) <= 1e-3
    assert [len(k) for k in res.kept_heads] == [4 - n for n in res.plan.heads_to_prune]


def test_latency_targets_plan_heads_by_their_measured_line():
    """A latency table where attention holds the time and each head an equal share of it: one
    head less per block is planned at the table's head time, and removing heads where no depth
    count can meet the target is a one-line ValueError."""
    heads = ((1, -0.3), (2, -0.2), (3, -0.1), (4, 0.0))  # 0.1 s a head
    line = BlockTiming(((32, 1.0), (64, 1.0)), 0.4, heads)
    assert line.head_s == pytest.approx(0.1)
    assert BlockTiming(line.grid, 0.2, heads).head_s == pytest.approx(0.05)  # at most the sublayer's
    lat = LatencyModel("synthetic", "float32", 1, "test", 4.0, 0.0, (64,) * 4, (line,) * 4, 20)
    model = tiny_model(layers=4)
    shape = lat.shape(model_shape(model))
    assert shape.head_params == (round(0.1 * 10**12 / 4.0),) * 4
    assert lat.predict((64,) * 4, heads_removed=(1, 2, 0, 3)) == pytest.approx(4.0 - 0.6)
    x = torch.randn(8, 3, 16, 16)
    cfg = PruneConfig(objective="latency", latency_model=lat, align=1, min_remaining=8, heads=1)
    _, res = prune_2ssp(model, 0.325, [x], cfg)  # one block (0.25) and a head of each kept (0.075)
    assert res.plan.blocks_to_prune == 1 and res.plan.heads_to_prune.count(1) == 3
    assert res.objective_ratio == pytest.approx(1 - 0.325)
    with pytest.raises(ValueError, match="no count of block units meets it with 3 attention heads"):
        prune_2ssp(tiny_model(layers=4), 0.05, [x], replace(cfg, heads=3))


def test_fixed_heads_must_leave_a_head_in_the_widest_block():
    """heads=N at or above a block's head count would silently remove fewer: refused, naming
    the allowed range; below it, blocks with fewer heads (Swin's early stages) keep one."""
    shape = model_shape(tiny_model(layers=2))
    with pytest.raises(ValueError, match=r"heads=4: .* at most 4 attention heads .* \(allowed 1..3\)"):
        PruneConfig(heads=4).resolved(shape)
    assert PruneConfig(heads=3).resolved(shape).heads == 3
    one = replace(shape, heads=(1, 1))
    with pytest.raises(ValueError, match="none can go: use auto or off"):
        PruneConfig(heads=1).resolved(one)
    assert PruneConfig(heads="auto").resolved(one).heads == "auto"


def test_latency_models_time_head_counts_of_every_block_of_a_kind():
    assert head_grid(12) == [3, 6, 9, 12] and head_grid(4) == [1, 2, 3, 4] and head_grid(1) == []
    lat = measure_latency_model(tiny_model(layers=2), batch_size=2, repeats=5, align=8,
                                min_remaining=16)
    assert [n for n, _ in lat.blocks[0].heads] == [1, 2, 3, 4] and lat.blocks[0].heads[-1][1] == 0
    assert LatencyModel.from_dict(lat.to_dict()) == lat
    assert lat.shape(model_shape(tiny_model(layers=2))).head_params is not None


@pytest.mark.cli
@pytest.mark.parametrize("flags, message", [
    (["--target", "0.3", "--heads", "some"], "--heads must be auto, off or a count"),
    (["--target", "0.3", "--stage", "s2", "--heads", "1"], "--heads 1 removes heads in stage 1"),
    (["--target", "0.3", "--heads", "4"], "--heads 4: this model's blocks have at most 4 attention "
                                          "heads and each keeps at least one (allowed 1..3)"),
    (["--target", "0.3", "--heads", "100", "--dry-run"], "--heads 100: this model's blocks have "
                                                         "at most 4"),
    (["--target", "0.2", "--heads", "3", "--stage", "s1"],
     "--target: target 0.2 is below what removing 3 heads from every block takes alone (--stage "
     "s1 --heads 3): width pruning alone reaches 0.2464 to 0.7378"),
    (["--target", "0.75", "--heads", "3", "--stage", "s1"],
     "the maximum feasible target for width pruning alone (--stage s1 --heads 3) is 0.7378"),
    (["--target", "0.6", "--stage", "s1"],  # what reaches it: heads too
     "the maximum feasible target for width pruning alone (--stage s1) is 0.4914; with --heads 2 "
     "(heads removed from every block too) it reaches 0.6557"),
    (["--target", "0.3", "--heads", "2", "--split", "1"],
     "--split/--target: 1 block units with 2 attention heads removed from every block that keeps "
     "its attention cannot meet target 0.3: counts that can are [0]"),
])
def test_bad_heads_flags_exit_2(flags, message, tmp_path, capsys):
    assert cli_run(tmp_path, "--model", "embedded", *flags) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "reports").exists()


@pytest.mark.cli
def test_dry_run_shows_heads_of_removed_attention_as_removed(tmp_path, capsys):
    """A block whose attention sublayer stage 2 removes keeps no heads: the dry run says
    "removed" there, as it does for the MLP widths of removed blocks."""
    assert cli_run(tmp_path, "--model", "embedded", "--target", "0.3", "--heads", "2",
                   "--depth-unit", "attention", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "[attention] remove 1 attention unit(s): [0]" in out  # the alpha split's count
    assert "[attention] attention heads after stage 1: removed, 2, 2, 2, 2, 2 " in out
    assert not (tmp_path / "reports").exists()


@pytest.mark.cli
def test_cli_fixed_heads_report_and_saved_model(tmp_path, capsys):
    assert cli_run(tmp_path, "--model", "embedded", "--target", "0.5", "--heads", "1",
                   "--cifar-test-pct", "1", "--eval-batches", "2", "--save-pruned",
                   "--run-id", "h") == 0
    import json
    rep = json.loads((tmp_path / "reports" / "report-h.json").read_text())
    plan = rep["plan"]
    kept = plan["kept_heads"]
    assert all(k in (0, 3) for k in kept) and 3 in kept
    assert "attention heads removed per block" in (tmp_path / "reports" / "report-h.md").read_text()
    assert "attention heads kept per block" in capsys.readouterr().out
    again = load_pruned_model(tmp_path / "pruned" / "h")
    whole = plan["depth_indices"] if plan["unit"] == "block" else []
    assert [p.num_heads for p in resolve(again).parts] == [k for i, k in enumerate(kept) if i not in whole]


@pytest.mark.skipif(not __import__("test_families").ONNX,
                    reason="the [export] extra (onnx, onnxscript, onnxruntime) is not installed")
@pytest.mark.parametrize("name", ["vit", "dinov2-swiglu", "beit", "clip", "siglip-vision", "swin"])
def test_head_pruned_model_exports_to_onnx(name, tmp_path):
    from vit_pruning.export import export_onnx
    model = make(name)
    x_of[0] = images(4)
    drop(model, {0: [0], 1: [1]})
    record = export_onnx(model, tmp_path / "m.onnx")
    assert record["max_abs_diff"] < 1e-4 and (tmp_path / "m.onnx").is_file()


def test_width_only_with_fixed_heads_reaches_what_the_heads_add():
    """stages="s1" with heads=N: the heads count toward what width pruning alone can reach
    (its maximum, and a floor: the heads alone), and the plan quotes stage 1's maximum."""
    from vit_pruning.pipeline import Pruner
    from vit_pruning.planner import heads_removed, uniform_heads, width_only_max
    model = tiny_model(layers=3)
    shape = model_shape(model)
    cfg = PruneConfig(stages="s1", heads=2, min_remaining=8, align=1, width_policy="per-block")
    plain, top = width_only_max(shape, 8), width_only_max(shape, 8, 1, 2)
    floor = heads_removed(shape, uniform_heads(shape, (), 2)) / shape.total_params
    assert top == pytest.approx(plain + floor) and 0 < floor < plain
    target = round((plain + top) / 2, 3)  # beyond the MLPs alone
    pruned, res = prune_2ssp(copy.deepcopy(model), target, None, cfg)
    assert res.plan.heads_to_prune == (2, 2, 2) and res.plan.depth_indices == ()
    assert res.plan.max_feasible_target == pytest.approx(top)
    assert count_total_params(pruned) == res.plan.params_after
    assert abs(res.achieved_sparsity - target) <= 65 / shape.total_params  # half a neuron
    pruner = Pruner(model, None, cfg)
    assert (pruner.min_target(), pruner.max_target()) == pytest.approx((floor, top))
    with pytest.raises(ValueError, match=r"below what removing 2 heads from every block takes "
                                         r"alone \(stages='s1', heads=2\)"):
        pruner.preview(round(floor / 2, 3))
    with pytest.raises(ValueError, match=r"for width pruning alone \(stages='s1', heads=2\) is"):
        pruner.preview(round(top + 0.01, 3))
    assert Pruner(model, None, replace(cfg, heads="off")).preview(round(plain - 0.01, 3)
                                                                  ).max_feasible_target == pytest.approx(plain)
    with pytest.raises(ValueError, match=r"\(stages='s1'\) is [0-9.]+; with heads=1 \(heads removed "
                                         r"from every block too\) it reaches"):
        Pruner(model, None, replace(cfg, heads="off")).preview(target)  # the heads name it


def test_fixed_heads_without_data_go_by_magnitude():
    """No calibration data: the heads with the smallest value-row x output-column norms go,
    nothing is refit, and the count is exact."""
    model = tiny_model(layers=3)
    an = resolve(model)
    with torch.no_grad():  # head 2 of block 0 made tiny: it is the one to go there
        an.parts[0].heads.linear("v").weight[16:24] *= 1e-3
    pruned, res = prune_2ssp(copy.deepcopy(model), 0.3, None, PruneConfig(
        heads=1, min_remaining=8, align=1, split=0, width_policy="per-block"))
    assert res.plan.heads_to_prune == (1, 1, 1)
    assert res.kept_heads[0] == [0, 1, 3]
    assert count_total_params(pruned) == res.plan.params_after


def test_fixed_heads_without_data_keep_the_alpha_split():
    """Without data the depth count is the 2SSP formula's, nearest among the counts that meet
    the target with the heads; it was the largest such count, which at 0.5 removed every
    attention sublayer and so none of the heads asked for."""
    from vit_pruning.planner import alpha_depth
    model = tiny_model(layers=4)
    cfg = PruneConfig(unit="attention", heads=1, min_remaining=8, align=1, width_policy="per-block")
    _, res = prune_2ssp(copy.deepcopy(model), 0.5, None, cfg)
    assert res.plan.blocks_to_prune == alpha_depth(model_shape(model), 0.5, "attention") == 3
    kept = [i for i in range(4) if i not in res.plan.depth_indices]  # (which one: the weight
    assert res.plan.heads_to_prune == tuple(int(i in kept) for i in range(4))  # proxy's, by init)
    assert res.plan.split == "alpha"


def test_sweep_and_search_target_take_heads():
    from vit_pruning import search_target, sweep
    model = tiny_model(layers=4)
    x = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))]
    cfg = PruneConfig(heads=1, min_remaining=8, align=1, width_policy="per-block")
    results = sweep(model, [0.2, 0.4], x, cfg)
    for t, (m, res) in zip([0.2, 0.4], results):
        assert res.plan.removes_heads and count_total_params(m) == res.plan.params_after
        assert abs(res.achieved_sparsity - t) <= res.plan.params_before and \
            abs(res.achieved_sparsity - t) <= 65 / res.plan.params_before  # half a neuron
    found = search_target(model, lambda m: count_total_params(m) > 0.7 * count_total_params(model),
                          x, cfg, resolution=0.1, high=0.5)
    assert found.result.plan.removes_heads


def test_a_budget_search_with_fixed_heads_starts_where_they_fit():
    """Targets below what N heads of every block remove cannot be planned: the search's grid
    begins at the first point above that, instead of judging the targets below as over budget."""
    from vit_pruning import search_target
    from vit_pruning.planner import fixed_heads_floor
    from vit_pruning.sweep import grid_start
    model = tiny_model(layers=4)
    x = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))]
    cfg = PruneConfig(heads=2, min_remaining=8, align=1, width_policy="per-block")
    floor = fixed_heads_floor(model_shape(model), 2)
    first = grid_start(floor, 0.05)
    assert floor <= first < floor + 0.05 and first > 0.05
    found = search_target(model, lambda m: False, x, cfg, resolution=0.05)  # nothing kept: the
    assert found.target is None and found.trials[-1].target == first  # search ends at the bottom
    assert all("error" not in t.measures for t in found.trials)
    assert grid_start(0.0, 0.05) == 0.05 and grid_start(0.15, 0.05) == 0.15


def test_a_head_plan_needs_a_clear_gain_on_the_held_out_rows():
    from vit_pruning.measure import output_distance, row_distances
    from vit_pruning.pipeline import clear_gain
    g = torch.Generator().manual_seed(0)
    out, ref = torch.randn(32, 10, generator=g), torch.randn(32, 10, generator=g)
    assert float(row_distances(out, ref, True).mean()) == pytest.approx(output_distance(out, ref, True), rel=1e-12)
    hid, href = torch.randn(4, 5, 8, generator=g), torch.randn(4, 5, 8, generator=g)
    assert float(row_distances(hid, href, False).mean()) == pytest.approx(output_distance(hid, href, False), rel=1e-12)
    worse = torch.rand(32, generator=g) + 1.0
    assert clear_gain(worse, worse * 0.9)[0]  # the same rows, each better: clear
    noisy = worse * torch.exp(0.5 * torch.randn(32, generator=g))
    lower_mean = noisy * float(worse.mean() / noisy.mean()) * 0.99  # lower on average by 1%
    clear, z = clear_gain(worse, lower_mean)
    assert lower_mean.mean() < worse.mean() and not clear and z < 3
    one_row = worse.clone()
    one_row[0] = 0.0  # one row far better, the rest the same: a mean gain, no clear one
    assert one_row.mean() < worse.mean() and not clear_gain(worse, one_row)[0]
    assert clear_gain(worse, worse * 0.9 + 1e-12)[1] == pytest.approx(clear_gain(worse, worse * 0.9)[1], rel=1e-3)


def test_head_costs_read_the_unpruned_trace_as_the_model_computes_them():
    from vit_pruning.attention_heads import head_costs
    from vit_pruning.trace import trace_unpruned
    model = tiny_model(layers=3)
    x = [torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(2)), torch.randn(3, 3, 16, 16)]
    an = resolve(model)
    trace = trace_unpruned(an, x)
    fit = [x[0][:4]]  # the first rows, as the split trials fit on
    run = head_costs(an, fit)
    traced = head_costs(an, fit, trace=trace)
    assert len(run) == 3 and all(len(c) == 4 for c in run)
    for a, b in zip(run, traced):  # the trace ran 5 rows where the model runs 4: the same
        # costs up to the kernels' rounding, which costs near 1e-8 of the stream magnify
        assert a == pytest.approx(b, rel=1e-3)


class _StubTrials:
    """A table of head-plan trials, (depth units, share) -> per-row held-out distances, in the
    shape pipeline._fewer_units reads (plans, search, rows, share_of, orders, call -> key)."""

    def __init__(self, table: dict):
        self.table, self.orders = table, {0: [], 1: [0], 2: [0, 1]}
        self.plans, self.search, self.rows, self.share_of, self.calls = {}, {}, {}, {}, []

    def __call__(self, d: int, share: float):
        self.calls.append((d, share))
        if (d, share) not in self.table:
            return None  # cannot meet the target
        key = f"{d}+{round(share * 8)} heads"
        if key not in self.search:
            rows = self.table[(d, share)]
            self.plans[key], self.search[key], self.rows[key] = object(), float(rows.mean()), rows
            self.share_of[key] = share
        return key


def test_heads_take_a_depth_units_place_only_where_that_is_clearly_closer():
    from vit_pruning.pipeline import _fewer_units
    g = torch.Generator().manual_seed(0)
    base = torch.rand(64, generator=g) + 0.5
    shares = (0.125, 0.25, 0.375, 0.5)
    clear = _StubTrials({(2, 0.125): base, (1, 0.25): base * 0.7, (1, 0.375): base * 0.6,
                         (1, 0.5): base * 0.65, (0, 0.5): base * 0.9})
    clear(2, 0.125)
    gates: dict = {}
    _fewer_units(clear, shares, low=2, gates=gates)
    # one unit fewer with the larger shares, while they help; then none of level 0 was clear
    assert clear.calls[1:4] == [(1, 0.25), (1, 0.375), (1, 0.5)]
    assert {"1+2 heads", "1+3 heads", "1+4 heads"} <= set(clear.plans)
    assert "0+4 heads" in clear.search and "0+4 heads" not in clear.plans  # withdrawn
    last = gates["fewer depth units"]  # the last level's gate: 0+4 against 1+3, not clear
    assert (last["tried"], last["against"], last["kept"]) == ("0+4 heads", "1+3 heads", False)
    assert last["z"] < 0
    noisy_rows = base * torch.tensor([0.6, 1.35]).repeat(32)  # lower on average, not clearly
    noisy = _StubTrials({(2, 0.125): base, (1, 0.25): noisy_rows})
    noisy(2, 0.125)
    _fewer_units(noisy, shares, low=2, gates={})
    assert noisy.search["1+2 heads"] < noisy.search["2+1 heads"]
    assert "1+2 heads" not in noisy.plans and noisy.calls[-1] == (1, 0.5)  # tried, withdrawn


class _Rounding(_StubTrials):
    def __call__(self, d: int, share: float):  # 1/4 and 3/8 round to the same heads at d=1
        return super().__call__(d, 0.25 if (d, share) == (1, 0.375) else share)


def test_a_withdrawn_level_may_name_one_plan_twice():
    from vit_pruning.pipeline import _fewer_units
    base = torch.linspace(1.0, 2.0, 16)
    lower_not_clearly = base * torch.tensor([0.5, 1.4]).repeat(8)
    stub = _Rounding({(2, 0.125): base, (1, 0.25): lower_not_clearly})
    stub(2, 0.125)
    _fewer_units(stub, (0.125, 0.25, 0.375, 0.5), low=2, gates={})
    assert stub.calls[1:] == [(1, 0.25), (1, 0.25)]  # the second share named the same plan
    assert "1+2 heads" in stub.search and "1+2 heads" not in stub.plans


def test_a_latency_target_between_block_counts_tries_heads_in_the_sublayers_place(
        embedded_calibration):
    """Blocks hold the time, an attention sublayer a quarter of a block, each head a quarter of
    that: 0.3 lies between one block and two, and the mixed plans (blocks, then attention
    sublayers of kept blocks) are tried beside plans with heads in the sublayers' place. Every
    plan meets the target exactly; a head plan is chosen only by the gate, and with heads="off"
    the mixed plans are what they were."""
    model = tf.AutoModelForImageClassification.from_pretrained(EMBEDDED).eval()
    heads = ((1, -0.1875), (2, -0.125), (3, -0.0625), (4, 0.0))  # 0.0625 s a head
    line = BlockTiming(((192, 0.99), (384, 1.0)), 0.25, heads)
    lat = LatencyModel("synthetic", "float32", 1, "test", 6.0, 0.0, (384,) * 6, (line,) * 6, 20)
    cfg = PruneConfig(objective="latency", latency_model=lat, align=1)
    x = embedded_calibration
    _, auto = prune_2ssp(copy.deepcopy(model), 0.3, x, cfg)
    _, off = prune_2ssp(copy.deepcopy(model), 0.3, x, replace(cfg, heads="off"))
    assert off.plan.heads_to_prune == () and off.plan.attention_indices  # a mixed plan
    assert all("attention" in k for k in off.search)
    tried = [k for k in auto.search if "heads" in k]
    assert tried and any("attention" in k for k in auto.search)
    assert auto.objective_ratio == pytest.approx(0.7, abs=1e-3)
    assert off.objective_ratio == pytest.approx(0.7, abs=1e-3)
    if off.search:
        assert {k: v for k, v in auto.search.items() if "heads" not in k} == off.search
    if auto.plan.removes_heads:
        assert auto.plan.attention_indices == ()
        assert auto.search[f"{auto.plan.blocks_to_prune}+{sum(auto.plan.heads_to_prune)} heads"] < min(
            v for k, v in auto.search.items() if "heads" not in k)
    else:  # the same plan; "search" where head plans were tried beside a single mixed one
        assert replace(auto.plan, split=off.plan.split) == off.plan


def test_fixed_heads_reach_targets_whole_depth_units_cannot():
    """heads=N removes heads from the blocks that stay, so the largest target counts them: the
    embedded ViT reaches 0.9059 with whole blocks, 0.9470 with 3 heads of its last block too."""
    import copy
    from vit_pruning import PruneConfig, Pruner
    from vit_pruning.config import EMBEDDED
    model = tf.AutoModelForImageClassification.from_pretrained(EMBEDDED).eval()
    plain = Pruner(model, None, PruneConfig(heads="off")).max_target()
    pruner = Pruner(model, None, PruneConfig(heads=3))
    assert plain == pytest.approx(0.9059, abs=1e-4) and pruner.max_target() == pytest.approx(0.9470, abs=1e-4)
    pruned, res = pruner.prune(0.92, copy.deepcopy(model))
    assert abs(res.achieved_sparsity - 0.92) < 1e-3 and res.plan.max_feasible_target == pruner.max_target()
    assert [p.num_heads for p in resolve(pruned).parts if not p.attention_removed] == [1]
    with pytest.raises(ValueError, match=r"maximum feasible target .* is 0\.9196"):
        Pruner(model, None, PruneConfig(heads=1)).prune(0.93, copy.deepcopy(model))


@pytest.mark.cli
def test_the_dry_run_quotes_the_range_with_fixed_heads_and_how_the_model_saves(tmp_path, capsys):
    from conftest import cli_run, one_line_error
    assert cli_run(tmp_path, "--model", "embedded", "--target", "0.92", "--heads", "3",
                   "--dry-run") == 0
    out = capsys.readouterr().out
    assert "max feasible target 0.9470" in out  # not plain: heads are removed
    assert "(one width, 192; saved with its modeling file, as attention heads are removed)" in out
    assert cli_run(tmp_path, "--model", "embedded", "--target", "0.93", "--heads", "1") == 2
    assert ("maximum feasible target with this min_remaining and depth unit and --heads 1 is "
            "0.9196") in one_line_error(capsys)
    assert cli_run(tmp_path, "--model", "embedded", "--target", "0.6", "--dry-run") == 0
    assert "plain transformers model, unless the run removes heads)" in capsys.readouterr().out
    assert not (tmp_path / "reports").exists()


def test_heads_auto_fills_a_target_between_depth_units_and_the_neurons():
    """Two blocks: one is 44% of the model, the neurons 32%, so 0.4 lies between them and only
    heads reach it. heads="auto" (the default) plans them: with calibration data by its head
    trials, the closest on the held-out rows (no plan without heads exists to gate against);
    without, the fewest heads per block that reach it, as heads=N would (the dry run's plan).
    heads="off" keeps the error that names the head counts."""
    from vit_pruning import Pruner
    from vit_pruning.planner import target_bound
    model = tiny_model(2)
    shape = model_shape(model)
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    cfg = PruneConfig(min_remaining=8, align=1)
    pruned, res = prune_2ssp(copy.deepcopy(model), 0.4, [x], cfg)
    assert res.plan.blocks_to_prune == 0 and sum(res.plan.heads_to_prune) > 0
    assert len(res.search) >= 2 and res.plan.split == "search"  # the shares tried, each
    assert all(k.startswith("0+") and k.endswith(" heads") for k in res.search)  # with heads
    assert min(res.search, key=res.search.get) == f"0+{sum(res.plan.heads_to_prune)} heads"
    assert count_total_params(pruned) == res.plan.params_after
    assert abs(res.achieved_sparsity - 0.4) <= target_bound(shape, res.plan, "auto") + 1e-12
    free = Pruner(copy.deepcopy(model), None, cfg).preview(0.4)
    assert free.heads_to_prune == (1, 1) and free.blocks_to_prune == 0
    _, res_free = prune_2ssp(copy.deepcopy(model), 0.4, None, cfg)
    assert res_free.plan.heads_to_prune == (1, 1)
    with pytest.raises(ValueError, match=r"falls between .* try heads=N \(N attention heads "
                                         r"removed from every block: N in \[1, 2, 3\] reach it\)"):
        prune_2ssp(copy.deepcopy(model), 0.4, [x], replace(cfg, heads="off"))


@pytest.mark.cli
def test_the_command_line_takes_a_target_only_heads_reach(tmp_path, capsys):
    """The CLI checks every target before any work on the data-free plan: a target between
    depth units and the neurons is not refused with --heads auto (the dry run shows the fewest
    heads that reach it), and is with --heads off, naming the counts that would."""
    from conftest import vit_folder
    folder = str(vit_folder(tmp_path / "m", tiny_model(2)))
    args = ("--model", folder, "--target", "0.4", "--min-remaining", "8", "--align", "1",
            "--dataset", "digits", "--replace-classifier")
    assert cli_run(tmp_path, *args, "--dry-run") == 0
    assert "attention heads after stage 1: 3, 3 (--heads auto;" in capsys.readouterr().out
    assert cli_run(tmp_path, *args, "--heads", "off", "--dry-run") == 2
    assert "N in [1, 2, 3] reach it" in one_line_error(capsys)
    assert not (tmp_path / "reports").exists()
