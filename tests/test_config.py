"""The run config: one home for every default, the parser built from it, the checks that need no
model, and the job a resume must agree with (derived from it, so no flag can be left out)."""
from dataclasses import fields, replace

import pytest

from conftest import tiny_model
from vit_pruning.checkpoint import _differs
from vit_pruning.cli import DEFAULTS, build_parser, config_from_args
from vit_pruning.config import (SECTIONS, PruneConfig, RunConfig, from_flags, width_limits)
from vit_pruning.errors import UsageError
from vit_pruning.pipeline import model_shape


def config(*argv: str) -> RunConfig:
    return config_from_args(build_parser().parse_args(["--target", "0.3", *argv]))


def test_every_flag_is_a_config_field_with_the_configs_default():
    ns = build_parser().parse_args([])
    given = vars(ns)
    fields_by_name = {f.name: f for f in fields(RunConfig) if f.name not in SECTIONS}
    for name in SECTIONS:
        fields_by_name.update({f.name: f for f in fields(getattr(RunConfig(), name))})
    for name, value in given.items():
        assert name in fields_by_name, f"--{name} has no config field"
        assert value == DEFAULTS[name], name
    # and every config field a user can set has a flag (derived fields excepted)
    assert set(fields_by_name) - set(given) == {"targets", "objective"}


def test_from_flags_refuses_unknown_names():
    with pytest.raises(TypeError):
        from_flags({**vars(build_parser().parse_args(["--target", "0.3"])), "no_such_flag": 1})


def test_the_parsed_config_holds_what_was_asked():
    cfg = config("--cifar-train-pct", "0.5", "--depth-unit", "attention", "--latency-repeats", "7")
    assert cfg.data.cifar_train_pct == 0.5 and cfg.pruning.depth_unit == "attention"
    assert cfg.timing.latency_repeats == 7 and cfg.targets.targets == (0.3,)
    assert cfg.targets.target == 0.3 and cfg.targets.objective == "params"
    flops = config_from_args(build_parser().parse_args(["--target-flops", "0.6,0.8"]))
    assert flops.targets.targets == (0.4, 0.2) and flops.targets.target is None


@pytest.mark.parametrize("argv, field", [
    (["--cifar-train-pct", "2"], "cifar_train_pct"), (["--eval-batches", "0"], "eval_batches"),
    (["--latency-precision", "1"], "latency_precision"), (["--align", "x"], "align"),
    (["--split", "some"], "split"), (["--run-id", ".hidden"], "run_id"),
    (["--stage", "s1", "--split", "2"], "split"), (["--seed", "-1"], "seed"),
    (["--seed", str(2**32)], "seed"), (["--no-mixed-depth"], "no_mixed_depth"),
    (["--freeze-backbone"], "freeze_backbone"), (["--ft-lr", "0.1"], "ft_lr"),
    (["--distill-train", "mlp"], "distill_train"), (["--mixed-precision", "no"], "mixed_precision"),
    (["--adapter-reduction", "8"], "adapter_reduction"),
    (["--accept-latency-miss"], "accept_latency_miss"),
    (["--stage", "s1", "--depth-unit", "attention"], "depth_unit"),
    (["--distill-lr", "0"], "distill_lr"), (["--save-dtype", "bfloat16"], "save_dtype"),
    (["--device", "cuda:x"], "device"), (["--device", "cudа"], "device")])
def test_a_bad_value_names_its_field_and_flag(argv, field):
    with pytest.raises(UsageError) as err:
        config(*argv)
    assert err.value.field == field
    assert str(err.value).startswith("--" + field.replace("_", "-"))


@pytest.mark.parametrize("argv", [
    ["--do-finetune", "--freeze-backbone", "--ft-lr", "0.1", "--mixed-precision", "no"],
    ["--recover", "--ft-epochs", "2"], ["--use-adapter", "--adapter-reduction", "8"],
    ["--distill-steps", "3", "--distill-train", "mlp", "--grad-accumulation", "2"],
    ["--export-onnx", "--save-dtype", "float16"],
    ["--pruned-output-dir", "elsewhere"]])  # folders are settings a wrapper may always pass
def test_a_flag_with_what_it_acts_on_is_taken(argv):
    assert config(*argv).seed == 0


@pytest.mark.parametrize("flag, value", [("--cifar-train-pct", "0.5"), ("--skip-bad-images", None),
                                         ("--image-column", "img"), ("--eval-batches", "2"),
                                         ("--batch-size", "16"), ("--calib-size", "8"),
                                         ("--model", "other"), ("--distill-lr", "0.01")])
def test_every_flag_that_changes_the_job_is_in_it(flag, value):
    before = config("--distill-steps", "5").job()
    after = config("--distill-steps", "5", flag, *([value] if value else [])).job()
    why = _differs(before, after)
    assert why is not None and why.startswith(flag + " was ")


@pytest.mark.parametrize("flag, value", [("--reports-dir", "elsewhere"), ("--quiet", None),
                                         ("--latency-repeats", "20"), ("--device", "cpu"),
                                         ("--save-pruned-model", None)])
def test_flags_that_do_not_change_the_job_are_not_in_it(flag, value):
    before = config("--distill-steps", "5").job()
    assert _differs(before, config("--distill-steps", "5", flag, *([value] if value else [])).job()) is None


def test_a_job_names_the_target_as_given():
    a = config_from_args(build_parser().parse_args(["--target-flops", "0.6"])).job()
    b = config_from_args(build_parser().parse_args(["--target-flops", "0.7"])).job()
    assert a["target_flops"] == 0.6 and _differs(a, b) == "--target-flops was 0.6 there, 0.7 now"
    old = {k: v for k, v in a.items() if k != "skip_bad_images"}  # written before the flag existed
    assert _differs(old, a).startswith("--skip-bad-images is not recorded there")


def test_a_budget_run_with_its_chosen_target_is_the_same_job():
    cfg = config_from_args(build_parser().parse_args(["--max-kl", "0.01"]))
    assert _differs(cfg.job(), cfg.with_target(0.42).job()) is None
    other = config_from_args(build_parser().parse_args(["--max-kl", "0.02"]))
    assert _differs(cfg.job(), other.job()) == "--max-kl was 0.01 there, 0.02 now"


def test_min_remaining_and_align_are_resolved_in_one_place():
    shape = model_shape(tiny_model())
    limits = width_limits(shape, None, "auto")
    resolved = PruneConfig().resolved(shape)
    assert (resolved.min_remaining, resolved.align) == (limits.min_remaining, limits.align)
    assert limits.min_remaining == 16 and "width/4" in limits.min_remaining_source
    given = width_limits(shape, 8, 2)
    assert (given.min_remaining, given.align, given.align_source) == (8, 2, "--align")
    with pytest.raises(ValueError, match="min_remaining must be in"):
        width_limits(shape, 64, 1)


@pytest.mark.parametrize("kw, message", [
    ({"split": -1}, r"split must be a count of depth units in 0..3 for this model \(unit 'block'\), got -1"),
    ({"split": 4}, r"in 0..3 for this model"),
    ({"split": 5, "unit": "attention"}, r"in 0..4 for this model \(unit 'attention'\), got 5"),
    ({"split": True}, r"split must be one of \('auto', 'alpha', 'search'\) or an int, got True"),
    ({"split": 2, "stages": "s1"}, r"split=2 does not apply to stages='s1'"),
    ({"split": 1, "stages": "s2", "unit": "block"}, r"split=1 does not apply to stages='s2'"),
    ({"heads": True}, r"heads must be one of \('auto', 'off'\) or a count >= 0, got True"),
    ({"heads": 2, "stages": "s2"}, r"heads=2 removes heads in stage 1; stages='s2' runs stage 2 alone"),
])
def test_a_config_no_run_can_take_is_refused_before_any_work(kw, message):
    """Values the pipeline used to take silently: split=-1 planned with order[:-1] and ended
    on whatever the head trials left, heads=True meant 1, heads=2 with stages="s2" removed none."""
    shape = model_shape(tiny_model(layers=4))
    with pytest.raises(ValueError, match=message):
        PruneConfig(min_remaining=8, **kw).resolved(shape)
    assert PruneConfig(min_remaining=8, split=3).resolved(shape).split == 3
    assert PruneConfig(min_remaining=8, split=0, stages="s1").resolved(shape).split == 0


def test_the_config_is_frozen():
    cfg = config()
    with pytest.raises(AttributeError):
        cfg.data.batch_size = 3
    assert replace(cfg.data, batch_size=3).batch_size == 3 and cfg.data.batch_size == 32


@pytest.mark.parametrize("device, count, message", [
    ("cuda:1", 1, "--device cuda:1: this machine has 1 CUDA device(s), cuda:0 to cuda:0"),
    ("cuda:3", 2, "--device cuda:3: this machine has 2 CUDA device(s), cuda:0 to cuda:1"),
    ("cuda", 0, "--device cuda: no CUDA device is available here; use --device cpu")])
def test_a_cuda_device_this_machine_lacks_is_refused_before_any_work(monkeypatch, device, count,
                                                                      message):
    """--device cuda:1 on a one-GPU machine got past the checks and failed in a traceback
    ("invalid device ordinal") once the model was on its way."""
    import torch

    from vit_pruning.app.checks import check_environment
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(UsageError) as err:
        check_environment(config("--device", device))
    assert str(err.value) == message and err.value.field == "device"
    if count:
        check_environment(config("--device", f"cuda:{count - 1}", "--model", "embedded"))  # taken


@pytest.mark.cli
def test_a_path_given_from_the_home_folder_is_the_same_path_everywhere(tmp_path, monkeypatch,
                                                                      capsys):
    """`--model=~/vit` and `--reports-dir=~/r` reach the tool with their ~ (the shell expands it
    only at the start of a word): the checks expanded it, the loader did not (the folder was
    taken for a hub id), and the reports went into a folder named "~" in the working folder."""
    import shutil

    from vit_pruning.cli import main
    from vit_pruning.config import EMBEDDED, PATH_FIELDS, value
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = config(*(a for f in PATH_FIELDS if f != "model" for a in (f"--{f.replace('_', '-')}",
                                                                    f"~/{f}")))
    for f in PATH_FIELDS[1:]:
        assert value(cfg, f) == str(tmp_path / f), f
    shutil.copytree(EMBEDDED, tmp_path / "vit")
    monkeypatch.chdir(tmp_path)
    assert main(["--model=~/vit", "--target", "0.3", "--dry-run", "--reports-dir=~/r"]) == 0
    assert "cannot load" not in capsys.readouterr().err and not (tmp_path / "~").exists()
