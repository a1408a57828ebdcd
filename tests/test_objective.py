"""FLOP and latency targets: the FLOP shape counts exactly what pruning removes, the planner hits
FLOP targets as exactly as parameter ones (brute force on tiny configs), a latency model from a
synthetic table gives the structure the table predicts, a measured one is cached and leaves the
model untouched, and the CLI's --target-flops / --target-latency with every bad input."""
import copy
from dataclasses import replace
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import cli_run
from test_families import build, images
from vit_pruning import PruneConfig, count_total_params, prune_2ssp
from vit_pruning.anatomy import resolve
from vit_pruning.cli import main
from vit_pruning.depth import apply_depth
from vit_pruning.measure import count_flops
from vit_pruning.objective import (BlockTiming, LatencyModel, flop_shape, measure_latency_model,
                                   implausible, width_grid)
from vit_pruning.pipeline import model_shape
from vit_pruning.surgery import prune_mlp_neurons


from conftest import tiny_model as tiny


@pytest.mark.parametrize("name", ["vit", "swin", "dinov2-swiglu", "beit"])
def test_flop_shape_counts_exactly_what_pruning_removes(name):
    model = tiny() if name == "vit" else build(name)
    shape = flop_shape(model, model_shape(model))
    assert shape.total_params == count_flops(model)
    an = resolve(model)
    n = len(an.parts)
    widths = [p.intermediate_size for p in an.parts]
    cut = [w // 3 for w in widths]  # neurons removed per block
    for i, p in enumerate(an.parts):
        prune_mlp_neurons(p, torch.arange(widths[i] - cut[i]))
    no_att = [n - 1]
    apply_depth(model, no_att, "attention")
    gone = [0] if name != "swin" else []  # Swin's first stage has two blocks: keep the stage
    if gone:
        apply_depth(model, gone, "block")
    predicted = (shape.total_params - sum(shape.costs[i] * cut[i] for i in range(n) if i not in gone)
                 - sum(shape.attention_params[i] for i in no_att)
                 - sum(shape.block_params[i] for i in gone))
    assert count_flops(model) == predicted


@pytest.mark.parametrize("target", [0.13, 0.3, 0.52, 0.71])
def test_flop_target_lands_within_half_a_neuron_of_brute_force(target):
    model, x = tiny(6), images(8)
    shape = flop_shape(model, model_shape(model))
    before = count_flops(model)
    pruned, res = prune_2ssp(copy.deepcopy(model), target, [x],
                             PruneConfig(objective="flops", align=1, min_remaining=8,
                                         width_policy="per-block"))
    removed = before - count_flops(pruned)
    goal = target * before
    # brute force: every count of whole blocks and every total of removed neurons
    cost, width, block = shape.costs[0], shape.widths[0], shape.block_params[0]
    best = min(abs(d * block + k * cost - goal) for d in range(6)
               for k in range((6 - d) * (width - 8) + 1))
    assert abs(removed - goal) <= best + cost / 2
    assert abs(removed - goal) <= cost / 2  # within one neuron's FLOPs
    assert res.objective == "flops" and res.objective_after == count_flops(pruned)
    assert res.params_before == count_total_params(model)  # parameters are still reported


def test_flop_target_on_swin_within_the_planners_bound():
    model, x = build("swin"), images(8)
    before = count_flops(model)
    pruned, res = prune_2ssp(model, 0.3, [x], PruneConfig(objective="flops", align=1, min_remaining=4))
    shape = flop_shape(build("swin"), model_shape(build("swin")))
    assert abs(count_flops(pruned) / before - 0.7) <= max(shape.costs) / 2 / before


def table(block_s: float, slope_s: float, attention_s: float, fixed_s: float, blocks: int = 4,
          width: int = 64) -> LatencyModel:
    """A synthetic latency model: every block the same line."""
    line = BlockTiming(((width // 2, block_s - slope_s * width / 2), (width, block_s)), attention_s)
    total = fixed_s + blocks * block_s
    return LatencyModel("synthetic", "float32", 1, "test", total, fixed_s, (width,) * blocks,
                        (line,) * blocks, 20)


def test_a_table_where_blocks_cost_time_and_neurons_none_removes_blocks_only():
    model = tiny()
    lat = table(block_s=1.0, slope_s=0.0, attention_s=0.1, fixed_s=0.0)
    _, res = prune_2ssp(model, 0.3, None, PruneConfig(objective="latency", latency_model=lat,
                                                     align=1, min_remaining=8, mixed_depth=False))
    # 0.3 of the time lies between one block (0.25) and two (0.5): met by more, two blocks
    assert res.plan.blocks_to_prune == 2 and not any(res.neurons_removed)
    assert res.plan.attention_indices == ()
    assert res.objective_ratio == pytest.approx(0.5)


def test_a_target_between_block_counts_is_met_by_attention_sublayers_of_kept_blocks():
    """Mixed depth units: blocks cost 0.25 of the time each, an attention sublayer 0.025 and
    neurons nothing, so 0.3 is one block and two attention sublayers, exactly."""
    model = tiny()
    shape = model_shape(model)
    lat = table(block_s=1.0, slope_s=0.0, attention_s=0.1, fixed_s=0.0)
    pruned, res = prune_2ssp(model, 0.3, None, PruneConfig(objective="latency", latency_model=lat,
                                                           align=1, min_remaining=8))
    plan = res.plan
    assert plan.unit == "block" and plan.blocks_to_prune == 1 and len(plan.attention_indices) == 2
    assert not set(plan.attention_indices) & set(plan.depth_indices)
    assert not any(res.neurons_removed)
    assert res.objective_ratio == pytest.approx(0.7)
    an = resolve(pruned)
    assert len(an.parts) == 3 and sum(p.attention_removed for p in an.parts) == 2
    gone = shape.block_params[plan.depth_indices[0]] + sum(
        shape.attention_params[i] for i in plan.attention_indices)
    assert count_total_params(pruned) == shape.total_params - gone


def test_mixed_plans_are_searched_on_calibration_data_and_reload_identically(tmp_path):
    """With calibration images every block count that mixing can complete is a split trial;
    the pruned model (blocks and attention sublayers gone, MLPs narrowed) saves and reloads to
    the same logits."""
    from vit_pruning.persistence import load_pruned_model, save_pruned_model
    model = tiny(6)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    # a block 1/6 of the time, an attention sublayer 1/24, every MLP 0.05 of its block: 0.25
    # lies between one block and two; one block and two sublayers, or five sublayers, meet it
    lat = table(block_s=1.0, slope_s=0.05 / 64, attention_s=0.25, fixed_s=0.0, blocks=6)
    cfg = PruneConfig(objective="latency", latency_model=lat, align=1, min_remaining=8)
    pruned, res = prune_2ssp(model, 0.25, [x], cfg)
    assert sorted(res.search) == ["0+5 attention", "1+2 attention"]
    _, forced = prune_2ssp(tiny(6), 0.25, [x], replace(cfg, split=0))  # a count asked for
    assert forced.plan.blocks_to_prune == 0 and len(forced.plan.attention_indices) == 5
    assert forced.search == {}
    assert res.plan.attention_indices and res.objective_ratio == pytest.approx(0.75, abs=1e-3)
    assert len(resolve(pruned).parts) == 6 - res.plan.blocks_to_prune
    saved = save_pruned_model(pruned, tmp_path / "mixed")
    back = load_pruned_model(saved.path)
    with torch.no_grad():
        assert torch.equal(back(pixel_values=x).logits, pruned(pixel_values=x).logits)
    assert [p.attention_removed for p in resolve(back).parts] == \
        [p.attention_removed for p in resolve(pruned).parts]


def test_a_table_where_neurons_hold_the_time_narrows_every_block():
    model = tiny()
    lat = table(block_s=1.0, slope_s=1.0 / 64, attention_s=0.0, fixed_s=1.0)
    _, res = prune_2ssp(model, 0.2, None, PruneConfig(objective="latency", latency_model=lat,
                                                     align=1, min_remaining=8, split=0))
    # 0.2 of 5 s = 1 s = 64 neurons of 1/64 s: 16 from each of the four blocks
    assert res.plan.blocks_to_prune == 0 and res.neurons_removed == [16, 16, 16, 16]
    assert res.objective_ratio == pytest.approx(0.8)
    assert lat.predict([48] * 4) == pytest.approx(4.0)


def test_measured_latency_model_is_cached_and_leaves_the_model(tmp_path, monkeypatch):
    import vit_pruning.objective as objective
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lat = measure_latency_model(model, batch_size=2, repeats=5, align=8, min_remaining=16,
                                cache_dir=tmp_path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert [p.intermediate_size for p in resolve(model).parts] == [64] * 4
    assert lat.widths == (64,) * 4 and lat.total_s > 0
    assert [w for w, _ in lat.blocks[0].grid] == width_grid(64, 16, 8) == [16, 32, 40, 48, 64]
    shape = lat.shape(model_shape(model))
    assert shape.total_params == round(lat.fixed_s * 1e12 / lat.model_s) + sum(shape.block_params)
    files = list((tmp_path / "latency").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["key"] == lat.key

    def no_timing(*a, **k):
        raise AssertionError("a cached latency model was measured again")
    monkeypatch.setattr(objective, "time_rounds", no_timing)
    again = measure_latency_model(model, batch_size=2, repeats=5, align=8, min_remaining=16,
                                  cache_dir=tmp_path)
    assert again == lat
    with pytest.raises(AssertionError):  # another batch size is another model
        measure_latency_model(model, batch_size=3, repeats=5, align=8, min_remaining=16,
                              cache_dir=tmp_path)
    with pytest.raises(ValueError, match="repeats must be >= 5"):
        measure_latency_model(model, repeats=2)


def test_latency_model_narrows_every_block_of_a_kind_and_drops_a_sample(monkeypatch):
    """Grid widths and attention bypass change every block of a kind at once (what a plan does,
    and the largest difference to time); blocks are dropped SAMPLE_BLOCKS at most."""
    import vit_pruning.objective as objective
    seen: dict[str, list] = {"narrow": [], "bypass": [], "drop": []}
    narrow, bypass, remove = objective._narrowed, objective.remove_attention, objective.remove_blocks
    monkeypatch.setattr(objective, "_narrowed", lambda m, blocks, w: (
        seen["narrow"].append(list(blocks)), narrow(m, blocks, w))[1])
    monkeypatch.setattr(objective, "remove_attention", lambda m, blocks: (
        seen["bypass"].append(list(blocks)), bypass(m, blocks))[1])
    monkeypatch.setattr(objective, "remove_blocks", lambda m, blocks: (
        seen["drop"].append(list(blocks)), remove(m, blocks))[1])
    lat = measure_latency_model(tiny(6), batch_size=2, repeats=5, align=8, min_remaining=16)
    assert seen["narrow"] == [list(range(6))] * 4 and seen["bypass"] == [list(range(6))]
    assert seen["drop"] == [list(range(objective.SAMPLE_BLOCKS))]
    assert len(lat.blocks) == 6 and len(set(lat.blocks)) == 1  # one kind, one timing


def test_latency_model_for_another_shape_is_refused():
    lat = table(1.0, 0.0, 0.1, 0.0, blocks=3)
    with pytest.raises(ValueError, match="measured for MLP widths"):
        prune_2ssp(tiny(), 0.3, None, PruneConfig(objective="latency", latency_model=lat))


def run(tmp: Path, *args: str) -> int:
    """A CLI run timed in at least 5 rounds (a latency model's least), its cache under `tmp`."""
    return cli_run(tmp, *args, "--latency-repeats", "5", "--latency-cache", str(tmp / "cache"),
                   quick=False)


def report(tmp: Path) -> dict:
    return json.loads(next((tmp / "reports").glob("*.json")).read_text())


@pytest.mark.cli
def test_cli_flop_target(tmp_path, capsys):
    assert run(tmp_path, "--model", "embedded", "--target-flops", "0.6", "--run-id", "f",
               "--calib-size", "32") == 0
    obj = report(tmp_path)["objective"]
    assert obj["objective"] == "flops" and obj["asked_ratio"] == pytest.approx(0.6)
    assert abs(obj["measured_ratio"] - 0.6) <= 1e-3 and obj["predicted_ratio"] == obj["measured_ratio"]
    out = capsys.readouterr().out
    assert "--target-flops 0.6: FLOPs ratio predicted" in out
    assert "objective: **FLOPs**" in (tmp_path / "reports" / "report-f.md").read_text()


@pytest.mark.cli
def test_cli_latency_targets_as_a_list(tmp_path, capsys):
    # this host's timing of a tiny model decides met or missed (a CI run on a busy machine
    # missed 0.8 by 0.06 once): whether a miss exits 3 is the scripted timing tests' matter
    assert run(tmp_path, "--model", "embedded", "--target-latency", "0.8,0.6", "--run-id", "l",
               "--calib-size", "32", "--accept-latency-miss") == 0
    rep = report(tmp_path)
    assert [p["asked_ratio"] for p in rep["points"]] == [0.8, 0.6]
    for p in rep["points"]:  # each timed and, where it missed, planned again: one kept
        assert p["attempts"] and sum(bool(a.get("chosen")) for a in p["attempts"]) == 1
        first = p["attempts"][0]  # planned at the asked ratio, or (where the measured table
        # puts it between the structures it can build, a timing-noise matter: seen once in
        # about ten runs) at the nearest below it; never above
        assert first["planned_ratio"] <= p["asked_ratio"] + 1e-9
        assert first["predicted_ratio"] <= p["asked_ratio"] + 1e-3
    # the latency model, cached: unless this host was too busy to time a plausible one
    lat = LatencyModel.from_dict(rep["latency_model"])
    cached = list((tmp_path / "cache" / "latency").glob("*.json"))
    assert len(cached) == (implausible(lat) is None)
    assert "latency ratio 0.8 (" in capsys.readouterr().out


@pytest.mark.cli
def test_cli_latency_targets_as_a_list_are_each_corrected_by_measurement(tmp_path, monkeypatch,
                                                                         capsys):
    """Several --target-latency values are met as a single one is: a first plan that misses
    (here the "timing" is the parameter ratio, far from the latency model) is planned again and
    the closest attempt is the point reported."""
    import vit_pruning.app.tradeoff as tradeoff
    import vit_pruning.objective as objective
    timed = []
    # a fixed latency model (this host's timings would move the plans): the blocks hold most
    # of the time, the MLP width a share of each block
    lat = table(block_s=1.0, slope_s=0.5 / 384, attention_s=0.3, fixed_s=0.3, blocks=6, width=384)
    monkeypatch.setattr(objective, "measure_latency_model", lambda *a, **k: lat)

    def fake_measure(args, loaded, data, ch):
        total = count_total_params(loaded.model)

        def measure(model):
            timed.append(count_total_params(model) / total)
            return timed[-1]
        return measure
    monkeypatch.setattr(tradeoff, "latency_measure", fake_measure)
    assert run(tmp_path, "--model", "embedded", "--target-latency", "0.8,0.6", "--run-id", "lc",
               "--calib-size", "32", "--accept-latency-miss") == 0  # the fake timing may miss
    rep = report(tmp_path)
    assert len(timed) > 2  # at least one target was planned again
    for p in rep["points"]:
        chosen = next(a for a in p["attempts"] if a.get("chosen"))
        assert len(p["attempts"]) >= 2
        assert chosen["measured_ratio"] == min((a["measured_ratio"] for a in p["attempts"]),
                                               key=lambda m: abs(m - p["asked_ratio"]))
        assert p["params_ratio"] == pytest.approx(chosen["measured_ratio"])  # the model kept
        assert abs(chosen["measured_ratio"] - p["asked_ratio"]) < abs(
            p["attempts"][0]["measured_ratio"] - p["asked_ratio"])
    md = (tmp_path / "reports" / "report-lc.md").read_text()
    assert md.count("planned again at") == 2
    assert capsys.readouterr().out.count("planned again at") == 2


@pytest.mark.cli
def test_cli_dry_run_prints_predicted_ratios(tmp_path, capsys):
    assert run(tmp_path, "--model", "embedded", "--target-latency", "0.7", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "--target-latency 0.7: predicted latency ratio" in out and "latency model (" in out
    assert not (tmp_path / "reports").exists()


@pytest.fixture
def blocks_hold_the_time(monkeypatch):
    """The embedded model's latency model replaced by a table where its 6 blocks hold all the
    time and an attention sublayer a quarter of a block: 0.75 lies between one block and two."""
    import vit_pruning.objective as objective
    lat = table(block_s=1.0, slope_s=0.01 / 384, attention_s=0.25, fixed_s=0.0, blocks=6,
                width=384)
    monkeypatch.setattr(objective, "measure_latency_model", lambda *a, **k: lat)


@pytest.mark.cli
@pytest.mark.parametrize("flag", [[], ["--no-mixed-depth"]])
def test_cli_dry_run_shows_mixed_depth_units(tmp_path, capsys, blocks_hold_the_time, flag):
    assert run(tmp_path, "--model", "embedded", "--target-latency", "0.75", "--dry-run", *flag) == 0
    out = capsys.readouterr().out
    if flag:
        assert "remove 2 block unit(s):" in out and "predicted latency ratio 0.6667" in out
    else:
        assert "remove 1 block unit(s) and the attention sublayers of 2 kept blocks" in out
        assert "predicted latency ratio 0.7500" in out


@pytest.mark.cli
def test_cli_mixed_run_reports_the_attention_sublayers(tmp_path, blocks_hold_the_time, monkeypatch):
    import vit_pruning.app.tradeoff as tradeoff
    once = tradeoff.prune_to_measured  # the plan as made: no correction by this host's timing
    monkeypatch.setattr(tradeoff, "prune_to_measured",
                        lambda *a, **k: once(*a, **{**k, "corrections": 0}))
    assert run(tmp_path, "--model", "embedded", "--target-latency", "0.75", "--run-id", "mx",
               "--calib-size", "32", "--latency-batch-size", "1",
               "--accept-latency-miss") == 0  # real timing of the table's plan: met or not
    rep = report(tmp_path)
    plan = rep["plan"]
    assert plan["blocks_to_prune"] == 1 and len(plan["attention_indices"]) == 2
    assert any("attention sublayers of blocks" in n for n in rep["notes"])
    assert "removed too (mixed depth units)" in (tmp_path / "reports" / "report-mx.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--target-flops", "1.5"], "--target-flops must be in (0, 1), got 1.5"),
    (["--target-latency", "0"], "--target-latency must be in (0, 1), got 0"),
    (["--target-flops", "a,b"], "--target-flops must be a number or a comma list"),
    (["--target", "30"], "--target must be in (0, 1), got 30 (a fraction: 30% is 0.3)"),
    (["--target", "30%,45%"], "--target is a fraction in (0, 1), not a percentage: for 30%,45% "
                              "give 0.3,0.45"),
    (["--target", "0.3", "--target-flops", "0.7"], "--target and --target-flops are two targets"),
    (["--target-flops", "0.7", "--target-latency", "0.7"], "are two targets"),
    (["--target-latency", "0.7", "--latency-repeats", "2", "--latency-precision", "0"], "--latency-repeats must be >= 5"),
    (["--target-flops", "0.01"], "--target-flops 0.01 is below what the deepest feasible pruning reaches"),
    (["--target-flops", "0.7", "--max-kl", "0.01"], "--max-kl finds a parameter target itself"),
    (["--target-flops", "0.7", "--stage", "s1"], "--target-flops plans both stages together"),
])
@pytest.mark.cli
def test_cli_bad_objective_input(tmp_path, capsys, args, message):
    argv = ["--model", "embedded", *args, "--reports-dir", str(tmp_path / "reports"),
            "--artifacts-dir", str(tmp_path / "art"), "--pruned-output-dir", str(tmp_path / "pruned"),
            "--quiet", "--latency-cache", str(tmp_path / "cache")]
    if "--latency-repeats" not in args:
        argv += ["--latency-repeats", "5"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "reports").exists() and not (tmp_path / "pruned").exists()


def test_prune_to_measured_plans_again_when_the_measurement_misses():
    from vit_pruning.pipeline import Pruner
    from vit_pruning.sweep import prune_to_measured
    model = tiny()
    lat = table(block_s=1.0, slope_s=1.0 / 64, attention_s=0.0, fixed_s=1.0)
    pruner = Pruner(model, None, PruneConfig(objective="latency", latency_model=lat, align=1,
                                             min_remaining=8, split=0))
    total = count_total_params(model)

    def measure(m):  # a "measurement" the latency model does not predict: parameters kept
        return count_total_params(m) / total
    pruned, res, tries = prune_to_measured(pruner, 0.8, measure, tolerance=0.002)
    assert len(tries) == 2 and tries[0].measures["predicted_ratio"] == pytest.approx(0.8, abs=1e-3)
    first, second = (abs(t.measures["measured_ratio"] - 0.8) for t in tries)
    assert second < first and abs(measure(pruned) - 0.8) == min(first, second)
    assert [t.measures.get("chosen", False) for t in tries] == [False, True]
    assert count_total_params(model) == total  # the Pruner's model stays unpruned


def test_second_correction_is_the_secant_of_the_first_two_attempts():
    """A first correction that crosses to another depth count overshoots (DINOv2-B at R = 0.8
    timed 0.746, then 0.843): the next target interpolates the two attempts."""
    from vit_pruning.pipeline import Pruner
    from vit_pruning.sweep import _corrected_target, prune_to_measured

    def attempt(planned, measured):  # (planned target, measured saving)
        return planned, 1 - measured
    one = [attempt(0.2, 0.746)]
    assert _corrected_target(one, 0.8) == pytest.approx(0.2 * 0.2 / 0.254)  # proportional
    two = one + [attempt(0.157, 0.843)]
    assert _corrected_target(two, 0.8) == pytest.approx(0.157 + 0.043 * 0.043 / 0.097)
    # saving that falls as the target grows is no line to follow: proportional again
    assert _corrected_target([attempt(0.2, 0.75), attempt(0.25, 0.8)], 0.7) == pytest.approx(
        0.25 * 0.3 / 0.2)

    model = tiny()
    lat = table(block_s=1.0, slope_s=1.0 / 64, attention_s=0.0, fixed_s=1.0)
    pruner = Pruner(model, None, PruneConfig(objective="latency", latency_model=lat, align=1,
                                             min_remaining=8, split=0))
    timed = iter([0.746, 0.843, 0.805])
    pruned, res, tries = prune_to_measured(pruner, 0.8, lambda m: next(timed), tolerance=0.01,
                                           recheck=None)
    planned = [t.target for t in tries]
    assert len(tries) == 3 and planned[1] == pytest.approx(planned[0] * 0.2 / 0.254)
    s1, s2 = 0.254, 0.157
    assert planned[2] == pytest.approx(planned[1] + (0.2 - s2) * (planned[0] - planned[1]) / (s1 - s2))
    assert [t.measures.get("chosen", False) for t in tries] == [False, False, True]
    assert res.plan.target == pytest.approx(planned[2])


def test_a_correction_stays_between_the_closest_attempts_on_either_side():
    """ViT-B/16 at batch 8 on a 2-core CPU, before the allocator was steadied: MLP 2720 timed
    0.85 where its neighbours lay on the line near 0.93. After attempts that saved too little
    (0.16), too much (0.26) and then, by such an odd timing, far too much (0.35), the next
    target interpolates the first two, which bracket the goal, not the last two, which do not."""
    from vit_pruning.sweep import _corrected_target
    points = [(0.20, 0.16), (0.25, 0.26), (0.23, 0.35)]
    assert _corrected_target(points, 0.8) == pytest.approx(0.20 + 0.04 * 0.05 / 0.10)
    # the closest on each side, whatever their order
    points = [(0.30, 0.32), (0.10, 0.08), (0.22, 0.23), (0.15, 0.14)]
    assert _corrected_target(points, 0.8) == pytest.approx(0.15 + 0.06 * 0.07 / 0.09)
    # all on one side: the secant through the last two, as before
    assert _corrected_target([(0.2, 0.15), (0.23, 0.18)], 0.8) == pytest.approx(0.25)


@pytest.mark.cli
def test_cli_single_latency_target_records_its_attempts(tmp_path):
    assert run(tmp_path, "--model", "embedded", "--target-latency", "0.75", "--run-id", "one",
               "--calib-size", "32", "--accept-latency-miss") == 0  # real timing: met or not
    obj = report(tmp_path)["objective"]
    assert obj["missed"] == (abs(obj["measured_ratio"] - 0.75) > obj["tolerance"])
    assert obj["objective"] == "latency" and obj["attempts"]
    assert sum(bool(a.get("chosen")) for a in obj["attempts"]) == 1
    assert obj["measured_ratio"] == report(tmp_path)["stages"][-1]["latency_ratio"]


def test_a_correction_that_plans_the_same_structure_is_not_timed_again():
    """Blocks hold all the time and neurons none: a corrected target between the same two block
    counts plans the same structure, which is not pruned twice into the timing."""
    from vit_pruning.pipeline import Pruner
    from vit_pruning.sweep import prune_to_measured
    lat = table(block_s=1.0, slope_s=0.0, attention_s=0.0, fixed_s=0.0)
    pruner = Pruner(tiny(), None, PruneConfig(objective="latency", latency_model=lat, align=1,
                                              min_remaining=8, mixed_depth=False))
    calls = []

    def measure(m):
        calls.append(len(resolve(m).parts))
        return 0.525  # asked 0.6; the plan (two blocks out of four, 0.5) timed 0.525
    _, res, tries = prune_to_measured(pruner, 0.6, measure, tolerance=0.01)
    assert calls == [2] and len(tries) == 1 and res.plan.blocks_to_prune == 2


def test_a_measurement_far_from_the_prediction_is_taken_twice_more():
    """One slow spell of the baseline (0.726 where 0.800 was predicted) is outvoted by two
    more takes; a measurement near the prediction is taken once."""
    from vit_pruning.pipeline import Pruner
    from vit_pruning.sweep import prune_to_measured
    lat = table(block_s=1.0, slope_s=1.0 / 64, attention_s=0.0, fixed_s=1.0)
    pruner = Pruner(tiny(), None, PruneConfig(objective="latency", latency_model=lat, align=1,
                                              min_remaining=8, split=0))
    timed = iter([0.726, 0.795, 0.803])
    _, res, tries = prune_to_measured(pruner, 0.8, lambda m: next(timed), tolerance=0.01)
    assert len(tries) == 1 and tries[0].measures["takes"] == [0.726, 0.795, 0.803]
    assert tries[0].measures["measured_ratio"] == 0.795 and tries[0].accepted
    timed = iter([0.785, 0.801])  # 0.015 off: within 3 tolerances, so corrected, not retaken
    _, res, tries = prune_to_measured(pruner, 0.8, lambda m: next(timed), tolerance=0.01)
    assert len(tries) == 2 and "takes" not in tries[0].measures


def test_cpu_timing_fixes_the_allocator_thresholds_when_asked(monkeypatch):
    """With glibc's default (dynamic) mmap threshold, a pruned ViT-B timed in a pair with its
    parent ran 0.855 where 0.93 was right: its smaller activations reused the heap while the
    parent's were mapped afresh. A timing asked for the steady allocator fixes the thresholds
    first (the command line asks); a plain library call leaves the process's malloc alone."""
    import platform

    from vit_pruning import measure
    calls = []
    monkeypatch.setattr(measure, "steady_cpu_allocator", lambda: calls.append(1) or True)
    model = tiny()
    measure.interleaved_latency({"a": model, "b": model}, 1, 2, warmup=0)
    measure.measure_latency(model, 1, warmup=0, repeats=1)
    assert calls == []
    measure.interleaved_latency({"a": model, "b": model}, 1, 2, warmup=0, steady_allocator=True)
    assert calls == [1]
    measure.measure_latency(model, 1, warmup=0, repeats=1, steady_allocator=True)
    assert calls == [1, 1]
    monkeypatch.undo()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert measure.steady_cpu_allocator() is True
    else:
        assert measure.steady_cpu_allocator() is False


def test_time_rounds_times_without_autograd():
    """Timed forwards build no autograd graph, whoever calls time_rounds."""
    from vit_pruning.measure import time_rounds
    seen = []
    time_rounds({"a": lambda: seen.append(torch.is_grad_enabled())}, 2, 1, torch.device("cpu"))
    assert seen == [False, False, False]


def test_median_interval_is_the_order_statistic_interval_and_covers_95_percent():
    """The ~95% interval of a median: the 2nd and 9th of 10 values; over many samples of a skewed
    distribution it holds the true median about 95% of the time (not a normal-theory guess)."""
    from vit_pruning.measure import median_interval
    assert median_interval([9, 1, 8, 2, 7, 3, 6, 4, 5, 10]) == (2, 9)
    assert median_interval([0.5]) == (0.5, 0.5)
    gen = torch.Generator().manual_seed(0)
    true_median = math.log(2)  # of the exponential distribution with rate 1
    hits = 0
    for _ in range(2000):
        x = (-torch.rand(40, generator=gen).log()).tolist()
        lo, hi = median_interval(x)
        hits += lo <= true_median <= hi
    assert 0.93 <= hits / 2000 <= 0.985


def test_interleaved_latency_times_more_rounds_until_the_ratio_is_precise(monkeypatch):
    """With a precision, rounds double (from where the rotation left off) until the ratio's
    interval is within it, and stop at the cap; without, exactly the rounds asked."""
    from vit_pruning import measure
    gen = torch.Generator().manual_seed(1)
    chunks = []

    def fake_rounds(calls, repeats, warmup, device, start=0, steady_allocator=False, bar=None):
        chunks.append((repeats, start))
        noise = (torch.rand(repeats, generator=gen) - 0.5).tolist()  # ratio 0.8 +- 0.1, uniform
        return {"a": [1.0] * repeats, "b": [0.8 + 0.2 * e for e in noise]}
    monkeypatch.setattr(measure, "time_rounds", fake_rounds)
    model = tiny()
    fixed = measure.interleaved_latency({"a": model, "b": model}, 1, 10, warmup=0)
    assert fixed.repeats == 10 and chunks == [(10, 0)] and fixed.precision is None
    chunks.clear()
    comp = measure.interleaved_latency({"a": model, "b": model}, 1, 10, warmup=0,
                                       precision=0.01, max_repeats=10_000)
    assert [c[0] for c in chunks] == [10] + [10 * 2 ** (k - 1) for k in range(1, len(chunks))]
    assert [c[1] for c in chunks] == [sum(c[0] for c in chunks[:i]) for i in range(len(chunks))]
    lo, hi = comp.ratio_interval["b"]
    assert (hi - lo) / 2 <= 0.01 and lo <= comp.ratio["b"] <= hi and comp.repeats > 10
    assert abs(comp.ratio["b"] - 0.8) <= 0.01 and not comp.warnings()
    chunks.clear()
    capped = measure.interleaved_latency({"a": model, "b": model}, 1, 10, warmup=0,
                                         precision=0.001, max_repeats=50)
    assert [c[0] for c in chunks] == [10, 10, 20, 10] and capped.repeats == 50
    assert any("known only to" in w and "after 50 rounds" in w for w in capped.warnings())


def test_time_rounds_goes_on_with_the_rotation_it_left_off():
    """Rounds added later continue the order's rotation, so every model keeps its share of
    first and second places."""
    from vit_pruning.measure import time_rounds
    order = []
    calls = {n: (lambda n=n: order.append(n)) for n in "abc"}
    time_rounds(calls, 2, 0, torch.device("cpu"))
    time_rounds(calls, 2, 0, torch.device("cpu"), start=2)
    assert "".join(order) == "abc" "bca" "cab" "abc"


def test_fast_models_may_time_more_rounds_than_ten_times_the_asked(monkeypatch):
    """By default the cap is 10 x the rounds, or the rounds that fit in FAST_SECONDS where that
    is more: a 1 ms pair whose ratio needs hundreds of rounds gets them."""
    from vit_pruning import measure
    gen = torch.Generator().manual_seed(2)

    def fake_rounds(calls, repeats, warmup, device, start=0, steady_allocator=False, bar=None):
        noise = (torch.rand(repeats, generator=gen) - 0.5).tolist()
        return {"a": [1e-3] * repeats, "b": [0.8e-3 * (1 + 0.2 * e) for e in noise]}
    monkeypatch.setattr(measure, "time_rounds", fake_rounds)
    model = tiny()
    comp = measure.interleaved_latency({"a": model, "b": model}, 1, 10, warmup=0, precision=0.003)
    assert 0.95 < comp.max_repeats / (measure.FAST_SECONDS / 1.8e-3) < 1.05 and comp.repeats > 100
    lo, hi = comp.ratio_interval["b"]
    assert (hi - lo) / 2 <= 0.003 and not comp.warnings()


@pytest.fixture
def timing_stuck_at_095(monkeypatch, blocks_hold_the_time):
    """Every timing says a pruned model runs at 0.95 of the baseline, whatever was removed: a
    latency target of 0.7 cannot be met."""
    from vit_pruning import measure

    def rounds(calls, repeats, warmup, device, start=0, steady_allocator=False, bar=None):
        return {n: [1.0 if i == 0 else 0.95] * repeats for i, n in enumerate(calls)}
    monkeypatch.setattr(measure, "time_rounds", rounds)


@pytest.mark.cli
@pytest.mark.parametrize("accept", [False, True])
def test_a_missed_latency_target_is_called_a_miss(tmp_path, capsys, timing_stuck_at_095, accept):
    from vit_pruning.report import _plot_title
    code = run(tmp_path, "--model", "embedded", "--target-latency", "0.7", "--run-id", "m",
               "--calib-size", "32", *(["--accept-latency-miss"] if accept else []))
    assert code == (0 if accept else 3)
    out, err = capsys.readouterr()
    assert "--target-latency 0.7: MISSED: latency ratio" in out
    assert "latency target missed: --target-latency 0.7 asked, measured 0.950" in err
    assert ("exit 3" in err) != accept
    rep = report(tmp_path)
    obj = rep["objective"]
    assert obj["missed"] is True and obj["asked_ratio"] == 0.7 and obj["tolerance"] == 0.03
    assert obj["measured_ratio"] == pytest.approx(0.95) and len(obj["measured_interval"]) == 2
    assert "MISSED" in _plot_title(rep) and "--target-latency 0.7" in _plot_title(rep)
    md = (tmp_path / "reports" / "report-m.md").read_text()
    assert "**missed**" in md
    assert (tmp_path / "reports" / "report-m.png").exists()  # the outputs are written


@pytest.mark.cli
def test_a_latency_target_list_with_a_miss_exits_3(tmp_path, capsys, timing_stuck_at_095):
    assert run(tmp_path, "--model", "embedded", "--target-latency", "0.96,0.7", "--run-id", "s",
               "--calib-size", "32") == 3
    out, err = capsys.readouterr()
    points = {p["asked_ratio"]: p for p in report(tmp_path)["points"]}
    assert points[0.7]["missed"] and not points[0.96]["missed"]
    assert "latency ratio 0.7 (MISSED" in out and "latency ratio 0.96 (met" in out
    assert err.count("latency target missed") == 1


@pytest.mark.parametrize("narrow_s, cached", [(0.8, True), (1.6, False)])
def test_an_implausible_latency_model_is_measured_again_and_never_cached(
        tmp_path, monkeypatch, caplog, narrow_s, cached):
    """A block that times slower at a narrower MLP (a busy machine) is no latency model to
    plan on for good: measured again, and if it stays so, used for this run only, uncached."""
    import vit_pruning.objective as objective
    rounds = []

    def fake(calls, repeats, warmup, device, start=0, steady_allocator=False, bar=None):
        rounds.append(len(calls))
        times = {"model": 1.0}
        for name in calls:
            kind = name.split(":")[-1]
            times.setdefault(name, {"drop": 0.7, "no attention": 0.9}.get(kind, narrow_s))
        return {n: [times[n]] * repeats for n in calls}
    monkeypatch.setattr(objective, "time_rounds", fake)
    lat = objective.measure_latency_model(tiny(), cache_dir=tmp_path)
    assert (objective.implausible(lat) is None) == cached
    assert bool(list((tmp_path / "latency").glob("*.json")) if (tmp_path / "latency").exists()
                else []) == cached
    timed = [n for n in rounds if n > 1]  # the variant timings (the first call times one model)
    assert len(timed) == (1 if cached else objective.MEASURES)
    if not cached:
        assert "slower than" in caplog.text and "not cached" in caplog.text
