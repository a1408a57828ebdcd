"""Promises kept off the main path: saved folders never load as a different model, targets are
met or refused on models pruned before, unsupported classes are refused, the report names
files that exist, and every bad input, file or output location ends in one line and exit 2
with nothing written (or, once the work is done, all outputs or none)."""
from dataclasses import replace
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (AutoModelForImageClassification, BertConfig,
                          BertForSequenceClassification, Dinov2Backbone, Dinov2Config,
                          ViTForImageClassification, ViTForMaskedImageModeling, ViTImageProcessor)

from conftest import tiny_config
from vit_pruning import PruneConfig, load_pruned_model, prune_2ssp, save_pruned_model
from vit_pruning.atomic import PARTIAL
from vit_pruning.cli import main
from vit_pruning.outputs import Output, OutputError, RunOutputs
from vit_pruning.pipeline import check_achieved, model_shape
from vit_pruning.planner import target_bound

ROOT = Path(__file__).resolve().parents[1]


def run(tmp: Path, *args: str) -> int:
    return main([*args, "--reports-dir", str(tmp / "reports"), "--artifacts-dir", str(tmp / "art"),
                 "--pruned-output-dir", str(tmp / "pruned"), "--quiet", "--latency-repeats", "2", "--latency-precision", "0"])


def files(tmp: Path) -> list[str]:
    """Every file and folder under `tmp`, hidden ones included (half-written outputs)."""
    return sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*"))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if "WARNING" not in ln]
    assert len(lines) == 1 and lines[0].startswith("vit-2ssp: error:") and "Traceback" not in err, err
    return lines[0]


def vit_folder(path: Path, model=None) -> Path:
    torch.manual_seed(0)
    model = model or ViTForImageClassification(tiny_config())
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(path)
    return path


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


def test_dry_run_does_not_call_an_attention_plan_plain(tmp_path, capsys):
    assert run(tmp_path, "--model", "embedded", "--target", "0.5", "--depth-unit", "attention",
               "--width-policy", "uniform", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "plain transformers model" not in out and "saved with its modeling file" in out


# 2. models pruned before: the target is met within the planner's bound, or refused

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
        try:
            _, res = prune_2ssp(again, target, [x], cfg)
        except ValueError as exc:  # refused in one line, not missed
            assert "target" in str(exc)
            continue
        achieved = 1 - sum(p.numel() for p in again.parameters()) / before
        assert abs(achieved - target) <= target_bound(model_shape(model), res.plan, "per-block") + 1e-12


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


# 4. the report names files that exist

def test_onnx_path_in_the_report_exists(tmp_path):
    pytest.importorskip("onnxruntime", reason="the [export] extra is not installed")
    assert run(tmp_path, "--model", "embedded", "--target", "0.3", "--export-onnx", "--run-id", "o",
               "--eval-batches", "1", "--calib-size", "16") == 0
    rep = json.loads((tmp_path / "reports" / "report-o.json").read_text())
    assert Path(rep["artifacts"]["onnx"]["path"]) == tmp_path / "pruned" / "o" / "model.onnx"
    assert Path(rep["artifacts"]["onnx"]["path"]).is_file() and Path(rep["artifacts"]["plot"]).is_file()
    md = (tmp_path / "reports" / "report-o.md").read_text()
    assert f"onnx: {tmp_path / 'pruned' / 'o' / 'model.onnx'} (onnxruntime" in md and "{'path'" not in md
    assert not [f for f in files(tmp_path) if PARTIAL in f]
    for p in (tmp_path / "pruned" / "o").iterdir():  # readable by others, as any file made by the user
        assert p.stat().st_mode & 0o044 == 0o044, p


# 5. one definition of the latency ratio, its spread, and a warning when it is not to be trusted

def test_latency_ratio_is_one_definition_with_a_warning():
    from vit_pruning.measure import LatencyComparison
    comp = LatencyComparison(["baseline", "stage2"], {"baseline": 1.63, "stage2": 5.52},
                             {"baseline": 1.0, "stage2": 1.112}, {"baseline": 1.0, "stage2": 0.04},
                             {"baseline": 1.0, "stage2": 7.2}, 1, 10, 3, "perf_counter", "float32")
    warnings = comp.to_dict()["warnings"]
    assert len(warnings) == 1 and "too wide to trust" in warnings[0]
    calm = LatencyComparison(["baseline", "stage2"], {"baseline": 1.0, "stage2": 0.8},
                             {"baseline": 1.0, "stage2": 0.8}, {"baseline": 1.0, "stage2": 0.79},
                             {"baseline": 1.0, "stage2": 0.81}, 1, 10, 3, "perf_counter", "float32")
    assert calm.warnings() == []
    vague = replace(calm, precision=0.01, max_repeats=10,  # timed to +-0.01, reached +-0.03
                    ratio_interval={"baseline": (1.0, 1.0), "stage2": (0.77, 0.83)})
    assert vague.warnings() == ["stage2: latency ratio 0.800 known only to [0.770, 0.830] (95%) "
                                "after 10 rounds, not to +-0.01 as asked: the machine is noisy; "
                                "rerun on an idle machine or raise --latency-max-repeats"]
    assert replace(vague, ratio_interval={"stage2": (0.795, 0.805)}).warnings() == []


def test_report_and_console_share_the_ratio(tmp_path, capsys):
    assert run(tmp_path, "--model", "embedded", "--target", "0.3", "--run-id", "l",
               "--eval-batches", "1", "--calib-size", "16") == 0
    out = capsys.readouterr().out
    rep = json.loads((tmp_path / "reports" / "report-l.json").read_text())
    final = rep["stages"][-1]
    assert f"latency ratio {final['latency_ratio']:.3f}" in out
    md = (tmp_path / "reports" / "report-l.md").read_text()
    assert f"{final['latency_ratio']:.3f} [{final['latency_ratio_iqr'][0]:.3f}" in md
    assert rep["summary"]["latency"]["stage2_delta_vs_baseline_pct"] == pytest.approx(
        100 * (final["latency_ratio"] - 1))
    assert "kept widths" in md and "multiples of 4" in md and "the planner's bound" in md


# 6b. repeated text lines never reach both calibration and evaluation

def test_repeated_lines_are_dropped_before_the_split(tmp_path):
    from vit_pruning.text import read_sentences_counted, split_sentences
    lines = [f"Sentence number {i % 40} of a file with repeats." for i in range(400)]
    (tmp_path / "t.txt").write_text("\n".join(lines) + "\n\n")
    sentences, repeats = read_sentences_counted(tmp_path / "t.txt")
    assert len(sentences) == 40 and repeats == 360
    split = split_sentences(sentences, 20, 16)
    assert not set(split.calibration) & set(split.evaluation)


def test_text_file_is_bounded(tmp_path):
    from vit_pruning.text import read_sentences_counted
    (tmp_path / "big.txt").write_text("a sentence of words.\n" * 1000)
    with pytest.raises(ValueError, match="larger than"):
        read_sentences_counted(tmp_path / "big.txt", max_bytes=2**10)
    if Path("/dev/zero").exists():
        with pytest.raises(ValueError, match="larger than"):
            read_sentences_counted("/dev/zero", max_bytes=2**20)


# 6c. NaN or Inf in the weights is refused before the work

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


def test_report_json_is_strict():
    from vit_pruning.atomic import atomic_write_json
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = atomic_write_json(Path(d) / "r.json", {"a": float("nan"), "b": [1.0, float("inf")]})
        assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(c)) == {"a": None, "b": [1.0, None]}


# 6d, 8. output locations are checked before the model loads, all or nothing after the work

@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the CLI gets as far as loading a model."""
    import vit_pruning.cli as cli

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the outputs were checked")
    monkeypatch.setattr(cli, "load_model", boom)


@pytest.mark.parametrize("flag", ["--reports-dir", "--pruned-output-dir", "--artifacts-dir"])
@pytest.mark.parametrize("kind", ["file", "through-file", "stale-output"])
def test_bad_output_locations_are_refused_before_loading(tmp_path, capsys, no_load, flag, kind):
    (tmp_path / "afile").write_text("x")
    dirs = {"--reports-dir": tmp_path / "r", "--pruned-output-dir": tmp_path / "p",
            "--artifacts-dir": tmp_path / "a"}
    if kind == "file":
        dirs[flag] = tmp_path / "afile"
    elif kind == "through-file":
        dirs[flag] = tmp_path / "afile" / "sub"
    else:  # a previous run's file (a plot left without its JSON, say)
        stale = {"--reports-dir": dirs[flag] / "report-x.png", "--pruned-output-dir": dirs[flag] / "x",
                 "--artifacts-dir": dirs[flag] / "x" / "adapter.pt"}[flag]
        stale.parent.mkdir(parents=True)
        stale.write_text("old")
    before = files(tmp_path)
    args = ["--model", "embedded", "--target", "0.3", "--run-id", "x", "--save-pruned-model",
            "--quiet", "--use-adapter", "--dataset", "digits", "--save-adapter"]
    for f, d in dirs.items():
        args += [f, str(d)]
    assert main(args) == 2
    err = one_line_error(capsys)
    assert (flag in err) if kind != "stale-output" else ("already exists" in err)
    assert files(tmp_path) == before


def test_long_run_id_is_refused_before_loading(tmp_path, capsys, no_load):
    assert run(tmp_path, "--model", "embedded", "--target", "0.3", "--run-id", "x" * 250) == 2
    assert "too long" in one_line_error(capsys)
    assert files(tmp_path) == []


def test_read_only_reports_dir_is_refused_before_loading(tmp_path, capsys, no_load):
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = False
    if os.geteuid() == 0:  # root writes through permission bits: use a read-only mount
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                                 capture_output=True).returncode == 0
        if not mounted:
            pytest.skip("running as root where tmpfs cannot be mounted: no read-only directory to try")
    else:
        ro.chmod(0o555)
    try:
        assert main(["--model", "embedded", "--target", "0.3", "--reports-dir", str(ro / "r"),
                     "--quiet"]) == 2
        err = one_line_error(capsys)
        assert "--reports-dir" in err and ("not writable" in err or "cannot write" in err)
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)])
        else:
            ro.chmod(0o755)


def test_full_disk_leaves_nothing_and_one_line(tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)],
                      capture_output=True).returncode != 0:
        pytest.skip("tmpfs cannot be mounted here (needs root and mount rights): no small disk to fill")
    try:
        code = main(["--model", "embedded", "--target", "0.3", "--run-id", "f", "--quiet",
                     "--save-pruned-model", "--pruned-output-dir", str(full / "p"),
                     "--reports-dir", str(tmp_path / "r"), "--eval-batches", "1",
                     "--calib-size", "16", "--latency-repeats", "2", "--latency-precision", "0"])
        assert code == 2
        err = one_line_error(capsys)
        assert "No space left on device" in err and "nothing was kept" in err
        assert files(full) == [] and not (tmp_path / "r").exists()
    finally:
        subprocess.run(["umount", str(full)])


def test_a_failed_write_keeps_nothing(tmp_path, capsys, monkeypatch):
    import vit_pruning.report as report

    def full(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "reports" / "report-w.md"))
    monkeypatch.setattr(report, "markdown", full)
    assert run(tmp_path, "--model", "embedded", "--target", "0.3", "--run-id", "w", "--eval-batches",
               "1", "--calib-size", "16", "--save-pruned-model", "--dataset", "digits",
               "--use-adapter", "--save-adapter") == 2
    assert "No space left on device" in one_line_error(capsys)
    assert files(tmp_path) == []  # no model folder, adapter, plot, partial file or empty folder
    monkeypatch.undo()  # the run id is free again
    assert run(tmp_path, "--model", "embedded", "--target", "0.3", "--run-id", "w", "--eval-batches",
               "1", "--calib-size", "16") == 0


# 6e. one run id, two runs: one wins, the other exits 2 in one line

def test_a_claimed_run_id_is_refused():
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        outs = [Output("json", Path(d) / "report-a.json", "--reports-dir")]
        with RunOutputs("a", outs):
            with pytest.raises(OutputError, match="another vit-2ssp run is writing"):
                with RunOutputs("a", list(outs)):
                    pass
        with RunOutputs("a", list(outs)):  # released with the first run
            pass


def cli_process(tmp: Path, run_id: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vit_pruning", "--model", "embedded", "--target", "0.3", "--run-id",
         run_id, "--reports-dir", str(tmp / "r"), "--pruned-output-dir", str(tmp / "p"),
         "--save-pruned-model", "--eval-batches", "1", "--calib-size", "16", "--quiet", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1",
             "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])})


def test_two_runs_with_one_run_id(tmp_path):
    procs = [cli_process(tmp_path, "same", "--latency-repeats", "2", "--latency-precision", "0") for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 2], results
    err = next(e for c, e in results if c == 2).strip().splitlines()
    assert len(err) == 1 and ("another vit-2ssp run" in err[0] or "already exists" in err[0])
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "report-same.json", "report-same.md", "report-same.png"]
    assert [p.name for p in (tmp_path / "p").iterdir()] == ["same"]


# 6f. a terminated run leaves nothing; a killed run's leftovers are removed by the next

def claimed(path: Path) -> bool:
    """Whether a run holds the lock on the output `path`."""
    import fcntl
    from vit_pruning.outputs import _lock_path
    lock = _lock_path(path)
    if not lock.exists():
        return False
    with open(lock) as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def test_sigterm_leaves_nothing(tmp_path):
    proc = cli_process(tmp_path, "t", "--latency-repeats", "100000")
    deadline = time.time() + 120
    while not claimed(tmp_path / "r" / "report-t.json") and time.time() < deadline:
        time.sleep(0.2)  # the run has started its work (its handler is installed) once it claims
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    err = proc.stderr.read().strip().splitlines()
    assert code == 143 and err[-1] == "vit-2ssp: terminated (SIGTERM); nothing half-written was kept"
    assert not (tmp_path / "r" / "report-t.json").exists()
    assert not [f for f in files(tmp_path) if PARTIAL in f]


def test_stale_partial_outputs_are_removed(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / "reports" / f"{PARTIAL}.{dead}.x.abcd1234"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"0" * 1000)
    assert run(tmp_path, "--model", "embedded", "--target", "0.3", "--run-id", "s", "--eval-batches",
               "1", "--calib-size", "16") == 0
    assert not stale.exists()
    assert any("killed while writing" in r.getMessage() for r in caplog.records)


# 7. images that cannot be used are named before the work, or left out when asked

@pytest.fixture
def folder_with_bad_image(tmp_path) -> Path:
    from PIL import Image
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in ("a", "b"):
            d = root / split / label
            d.mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(d / f"{i}.png")
    good = (root / "train" / "a" / "0.png").read_bytes()
    (root / "train" / "b" / "truncated.png").write_bytes(good[:len(good) // 2])
    return root


def test_bad_image_is_named_before_the_work(tmp_path, capsys, folder_with_bad_image):
    model = vit_folder(tmp_path / "m", ViTForImageClassification(tiny_config(num_labels=2)))
    assert run(tmp_path, "--model", str(model), "--dataset", str(folder_with_bad_image),
               "--target", "0.2", "--cifar-train-pct", "1", "--cifar-test-pct", "1") == 2
    err = one_line_error(capsys)
    assert "truncated.png" in err and "--skip-bad-images" in err
    assert not (tmp_path / "reports").exists()
    assert run(tmp_path, "--model", str(model), "--dataset", str(folder_with_bad_image),
               "--target", "0.2", "--cifar-train-pct", "1", "--cifar-test-pct", "1", "--run-id", "s",
               "--skip-bad-images", "--calib-size", "8") == 0
    rep = json.loads((tmp_path / "reports" / "report-s.json").read_text())
    assert len(rep["skipped_images"]) == 1 and "truncated.png" in rep["skipped_images"][0]
    assert "truncated.png" in (tmp_path / "reports" / "report-s.md").read_text()


# 7b, 9, 10. inputs that ended in tracebacks or were taken without a word

def broken_config(tmp: Path, **kw) -> Path:
    folder = vit_folder(tmp / "cfg")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(kw)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def pickle_folder(tmp: Path) -> Path:
    folder = tmp / "pickle"
    model = ViTForImageClassification(tiny_config())
    model.config.save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))
    with open(folder / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"x": Evil()}, fh)
    return folder


BAD_INPUTS = {
    "image-size-0": (lambda t: ["--model", str(broken_config(t, image_size=0))], "image_size 0"),
    "heads-0": (lambda t: ["--model", str(broken_config(t, num_attention_heads=0))], "num_attention_heads 0"),
    "patch-0": (lambda t: ["--model", str(broken_config(t, patch_size=0))], "patch_size 0"),
    "hidden-mismatch": (lambda t: ["--model", str(broken_config(t, hidden_size=64))], "--model: cannot load"),
    "pickle": (lambda t: ["--model", str(pickle_folder(t))], "--model: cannot load"),
    "missing-model": (lambda t: ["--model", "/nonexistent/dir"], "no such folder /nonexistent/dir"),
    "missing-dataset": (lambda t: ["--model", "embedded", "--dataset", "./nope_ds"], "--dataset: no such folder"),
    "split-s2": (lambda t: ["--model", "embedded", "--stage", "s2", "--split", "3"], "--split 3 does not apply"),
    "split-too-big": (lambda t: ["--model", "embedded", "--split", "99"], "--split 99"),
    "empty-text": (lambda t: ["--model", "embedded", "--text-file", str(t)], "--text-file"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_inputs_end_in_one_line(tmp_path, capsys, name):
    make, msg = BAD_INPUTS[name]
    args = make(tmp_path)
    before = files(tmp_path)
    assert run(tmp_path, *args, "--target", "0.2") == 2
    assert msg in one_line_error(capsys)
    assert files(tmp_path) == before
    if name in ("missing-dataset", "split-too-big"):  # the dry run refuses what the run refuses
        assert run(tmp_path, *args, "--target", "0.2", "--dry-run") == 2
        assert msg in one_line_error(capsys)


def test_empty_text_file_is_named(tmp_path, capsys):
    from test_text import bert_folder
    folder = bert_folder(tmp_path)
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    capsys.readouterr()  # the folder's own save progress bar
    assert run(tmp_path, "--model", str(folder), "--target", "0.2", "--min-remaining", "4",
               "--text-file", str(tmp_path / "empty.txt")) == 2
    assert "holds no sentences" in one_line_error(capsys)


def test_symlink_loop_model_is_named(tmp_path, capsys):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert run(tmp_path, "--model", str(tmp_path / "a"), "--target", "0.2") == 2
    assert "symbolic link loop" in one_line_error(capsys)


def test_settings_taken_otherwise_are_said(tmp_path, capsys):
    assert run(tmp_path, "--model", "embedded", "--target", "0.0001", "--run-id", "n",
               "--eval-batches", "1", "--calib-size", "1") == 0
    out = capsys.readouterr().out
    rep = json.loads((tmp_path / "reports" / "report-n.json").read_text())
    notes = " ".join(rep["notes"])
    assert "nothing was removed" in notes and "one calibration input" in notes
    assert "note: nothing was removed" in out
    assert "nothing was removed" in (tmp_path / "reports" / "report-n.md").read_text()


# 13. quiet means quiet

def test_export_is_quiet_under_quiet(tmp_path):
    pytest.importorskip("onnxruntime", reason="the [export] extra is not installed")
    proc = cli_process(tmp_path, "q", "--export-onnx", "--latency-repeats", "2", "--latency-precision", "0")
    assert proc.wait(timeout=300) == 0
    err = proc.stderr.read()
    assert "INFO" not in err and len(err.strip().splitlines()) <= 3, err[-2000:]


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


def test_each_kind_of_unusable_image_is_named(tmp_path, monkeypatch):
    import io
    from PIL import Image
    import vit_pruning.data as data
    png = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 200, 30)).save(png, "PNG")
    good = png.getvalue()
    assert data._image_problem({"bytes": good, "path": None}) is None
    assert "Unidentified" in data._image_problem({"bytes": b"", "path": "zero.png"})
    assert "Unidentified" in data._image_problem({"bytes": b"just some text\n" * 9, "path": "t.png"})
    assert "Truncated" in data._image_problem({"bytes": good[:len(good) // 2], "path": "half.png"})
    monkeypatch.setattr(data, "MAX_PIXELS", 100)  # a 20,000 x 20,000 image, scaled down
    assert "over the limit" in data._image_problem({"bytes": good, "path": "huge.png"})


def test_text_distillation_inputs_are_bounded(tmp_path, monkeypatch):
    import vit_pruning.cli as cli
    from test_text import bert_folder
    monkeypatch.setattr(cli, "DISTILL_SENTENCES", 20)
    folder = bert_folder(tmp_path)
    (tmp_path / "t.txt").write_text("\n".join(f"sentence {i} of many, plain words." for i in range(300)))
    assert run(tmp_path, "--model", str(folder), "--target", "0.2", "--min-remaining", "4",
               "--text-file", str(tmp_path / "t.txt"), "--calib-size", "32", "--eval-batches", "1",
               "--distill-steps", "1", "--distill-augment", "0", "--run-id", "d") == 0
    rep = json.loads((tmp_path / "reports" / "report-d.json").read_text())
    assert rep["distillation"]["inputs"] == 20
