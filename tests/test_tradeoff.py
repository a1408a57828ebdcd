"""Many targets from one model: the library's sweep and budget search share the target-free
work and leave the model unpruned; the CLI's --target list and budgets, and their bad inputs."""
import copy
import json

import pytest
import torch
from transformers import AutoModelForImageClassification, ViTForImageClassification

from conftest import tiny_config
from vit_pruning import PruneConfig, count_total_params, prune_2ssp
from vit_pruning.config import EMBEDDED
from vit_pruning.pipeline import Pruner
from vit_pruning.sweep import grid, search_target, sweep


from conftest import cli_run as run
from conftest import output_files as files
from conftest import tiny_model


def tiny():
    """A 6-block tiny ViT and 16 calibration images."""
    return tiny_model(6), torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))


CFG = PruneConfig(min_remaining=8, align=1, width_policy="per-block")


def logits(model, x):
    with torch.no_grad():
        return model(pixel_values=x).logits


def test_sweep_leaves_the_model_and_equals_prune_2ssp():
    model, x = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    points = sweep(model, [0.2, 0.45], [x], CFG)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    for target, (pruned, res) in zip([0.2, 0.45], points):
        alone, res_alone = prune_2ssp(copy.deepcopy(model), target, [x], CFG)
        assert res.depth_order == res_alone.depth_order
        assert res.neurons_removed == res_alone.neurons_removed
        assert count_total_params(pruned) == count_total_params(alone) == res.plan.params_after
        assert torch.allclose(logits(pruned, x), logits(alone, x), atol=1e-5)


def test_the_greedy_order_is_computed_once_for_every_target(monkeypatch):
    import vit_pruning.pipeline as pipeline
    model, x = tiny()
    calls = []
    real = pipeline.select_depth

    def counted(*a, **k):
        calls.append(a[1])
        return real(*a, **k)
    monkeypatch.setattr(pipeline, "select_depth", counted)
    sweep(model, [0.1, 0.3, 0.5], [x], CFG)
    assert len(calls) == 1  # the largest target first: its order serves the smaller ones


def test_search_target_finds_the_largest_accepted_target_by_bisection():
    model, x = tiny()
    reference = logits(model, x)
    pruner = Pruner(model, [x], CFG)

    def accept(m):
        kl = float(torch.nn.functional.kl_div(logits(m, x).log_softmax(-1), reference.log_softmax(-1),
                                              log_target=True, reduction="batchmean"))
        return kl <= 5e-3, {"kl": kl}
    res = search_target(model, accept, resolution=0.05, pruner=pruner)
    assert res.target is not None and len(res.trials) <= 5
    accepted = {t.target for t in res.trials if t.accepted}
    rejected = {t.target for t in res.trials if not t.accepted}
    assert res.target == max(accepted) and (not rejected or res.first_rejected == min(rejected))
    assert res.first_rejected is None or res.first_rejected == pytest.approx(res.target + 0.05)
    assert count_total_params(model) == pruner.shape.total_params  # the model is untouched
    never = search_target(model, lambda m: False, resolution=0.05, pruner=pruner)
    assert never.target is None and never.trials[-1].target == 0.05


def test_grid():
    assert grid(0.01, 0.05, 0.01) == [0.01, 0.02, 0.03, 0.04, 0.05]
    with pytest.raises(ValueError):
        grid(0.1, 0.5, 0)


def test_library_defaults_work_on_the_embedded_model():
    model = AutoModelForImageClassification.from_pretrained(EMBEDDED).eval()
    _, res = prune_2ssp(model, 0.3)  # min_remaining is the CLI's: a quarter of a 384-wide MLP
    assert res.config.min_remaining == 96 and abs(res.achieved_sparsity - 0.3) < 1e-3
    with pytest.raises(ValueError, match="min_remaining must be in"):
        prune_2ssp(AutoModelForImageClassification.from_pretrained(EMBEDDED), 0.3, None,
                   PruneConfig(min_remaining=384))


@pytest.mark.cli
def test_cli_target_list_reports_every_point(tmp_path, capsys):
    assert run(tmp_path, "--model", "embedded", "--target", "0.1,0.3", "--run-id", "sw",
               "--calib-size", "32", "--eval-batches", "2", "--save-pruned-model") == 0
    out = capsys.readouterr().out
    rep = json.loads((tmp_path / "reports" / "report-sw.json").read_text())
    assert [p["target"] for p in rep["points"]] == [0.1, 0.3] and rep["kind"] == "sweep"
    for p in rep["points"]:
        assert abs(p["achieved_sparsity"] - p["target"]) < 1e-3
        assert p["latency_ratio"] == rep["latency_setup"]["ratio"][f"target {p['target']:g}"]
        assert p["top1"] is not None and p["kl"] is not None
        assert (tmp_path / "pruned" / "sw" / f"target-{p['target']:g}" / "config.json").is_file()
    assert "target 0.3: achieved" in out
    md = (tmp_path / "reports" / "report-sw.md").read_text()
    assert "| 0.1 |" in md and "| 0.3 |" in md and (tmp_path / "reports" / "report-sw.png").is_file()


@pytest.mark.cli
@pytest.mark.parametrize("budget", [["--max-kl", "1e-3"], ["--max-accuracy-drop", "1.5"]])
def test_cli_budget_chooses_a_target_and_goes_on(tmp_path, capsys, budget):
    assert run(tmp_path, "--model", "embedded", *budget, "--run-id", "b", "--calib-size", "16",
               "--eval-batches", "2", "--target-resolution", "0.1", "--save-pruned-model") == 0
    rep = json.loads((tmp_path / "reports" / "report-b.json").read_text())
    search = rep["budget_search"]
    assert rep["target"] == search["chosen"] and search["prunings"] <= 8
    kept = [t for t in search["trials"] if t["accepted"]]
    assert max(t["target"] for t in kept) == search["chosen"]
    chosen = next(t for t in kept if t["target"] == search["chosen"])
    if budget[0] == "--max-kl":  # kept on the inputs it was chosen on
        assert chosen["measures"]["kl"] <= 1e-3 + 1e-12
    assert (tmp_path / "pruned" / "b" / "config.json").is_file()
    assert (tmp_path / "reports" / "report-b.tradeoff.png").is_file()
    md = (tmp_path / "reports" / "report-b.md").read_text()
    assert "Budget search" in md and "not a proof that no larger target keeps it" in md
    # 2 evaluation batches of 32 digits images: chosen on 32, reported on the other 32
    assert search["selection_inputs"] == search["report_inputs"] == 32
    assert search["report_inputs_shared"] == 0 and "on the other 32" in search["selection_note"]
    assert "the 32 the budget search did not choose on" in rep["accuracy_note"]
    if budget[0] == "--max-kl":  # the report's numbers are the other half's: measured anew
        assert rep["stages"][-1]["kl_to_baseline"] != chosen["measures"]["kl"]
    out = capsys.readouterr().out
    assert "first over budget" not in out and "a bracket, assuming fidelity falls" in out
    assert f"pruned model: {tmp_path / 'pruned' / 'b'} (" in out  # and its format


@pytest.mark.cli
def test_cli_min_cosine_on_a_text_encoder(tmp_path):
    from test_text import bert_folder
    folder = bert_folder(tmp_path)
    (tmp_path / "t.txt").write_text("\n".join(f"the sentence number {i} is here." for i in range(200)))
    assert run(tmp_path, "--model", str(folder), "--min-cosine", "0.99", "--text-file",
               str(tmp_path / "t.txt"), "--calib-size", "32", "--eval-batches", "1",
               "--min-remaining", "4", "--target-resolution", "0.1", "--run-id", "c") in (0, 2)
    rep = json.loads((tmp_path / "reports" / "report-c.json").read_text())
    trials = rep.get("budget_search", rep).get("trials")
    assert trials and all("cosine" in t["measures"] for t in trials if "error" not in t["measures"])


@pytest.mark.cli
def test_a_budget_nothing_keeps_writes_the_search_and_exits_2(tmp_path, capsys):
    assert run(tmp_path, "--model", "embedded", "--max-kl", "1e-12", "--run-id", "n",
               "--calib-size", "32", "--eval-batches", "1", "--save-pruned-model",
               "--target-resolution", "0.05") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "even the smallest target, 0.05" in err[0]
    rep = json.loads((tmp_path / "reports" / "report-n.json").read_text())
    assert rep["chosen"] is None and rep["trials"][-1]["target"] == 0.05
    assert not (tmp_path / "pruned").exists()


BAD = {
    "malformed": (["--target", "0.1,x"], "--target must be a number or a comma list"),
    "empty": (["--target", ""], "--target must be a number or a comma list"),
    "duplicate": (["--target", "0.1,0.1"], "given twice"),
    "outside": (["--target", "0.2,1.2"], "--target must be in (0, 1)"),
    "too-high": (["--target", "0.2,0.97"], "maximum feasible target"),
    "budget-and-target": (["--target", "0.2", "--max-kl", "0.01"], "drop --target"),
    "two-budgets": (["--max-kl", "0.01", "--max-accuracy-drop", "1"], "two budgets"),
    "no-target": ([], "give --target"),
    "drop-without-labels": (["--max-accuracy-drop", "1", "--model", "TINY"], "needs labelled data"),
    "kl-without-logits": (["--max-kl", "0.01", "--model", "BACKBONE"], "needs a model with logits"),
    "cosine-range": (["--min-cosine", "1.5"], "--min-cosine must be in (0, 1]"),
    "list-with-distill": (["--target", "0.1,0.2", "--distill-steps", "5"], "applies to one model"),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from transformers import ViTImageProcessor, ViTModel
    root = tmp_path_factory.mktemp("folders")
    torch.manual_seed(0)
    ViTForImageClassification(tiny_config()).save_pretrained(root / "tiny")
    ViTModel(tiny_config()).save_pretrained(root / "backbone")
    for name in ("tiny", "backbone"):
        ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(root / name)
    return root


@pytest.mark.cli
@pytest.mark.parametrize("name", BAD)
def test_bad_tradeoff_inputs(tmp_path, capsys, folders, name):
    args, msg = BAD[name]
    args = [str(folders / "tiny") if a == "TINY" else str(folders / "backbone") if a == "BACKBONE"
            else a for a in args]
    if "--model" not in args:
        args = ["--model", "embedded", *args]
    assert run(tmp_path, *args) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1, err
    assert files(tmp_path) == []
