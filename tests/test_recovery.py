"""Recovery at scale: distillation on accelerate (config object, mixed precision, gradient
accumulation), checkpoints that resume to exactly the same weights, several processes under
torchrun (one report, one model, the same held-out losses as one process), a dead rank, and the
bad inputs of the new flags."""
import copy
import json
import shutil
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import ViTForImageClassification

from vit_pruning.config import EMBEDDED
from conftest import cli_run, tiny_config
from vit_pruning import DistillConfig, PruneConfig, distill, load_pruned_model, prune_2ssp
from vit_pruning.cli import main

REPO = Path(__file__).resolve().parents[1]


def pair():
    torch.manual_seed(0)
    teacher = ViTForImageClassification(tiny_config(num_hidden_layers=4)).eval()
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    student, _ = prune_2ssp(copy.deepcopy(teacher), 0.4, [x[:16]],
                            PruneConfig(min_remaining=8, align=1, split=1))
    return teacher, student, x


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_config_and_keywords_are_one_distillation():
    teacher, student, x = pair()
    twin = copy.deepcopy(student)
    r1 = distill(student, teacher, [x], 12, lr=1e-3, batch_size=16)
    r2 = distill(twin, teacher, [x], config=DistillConfig(steps=12, lr=1e-3, batch_size=16))
    assert same(weights(student), weights(twin)) and r1.losses == r2.losses


def test_accumulation_and_bf16_run_and_are_recorded():
    teacher, student, x = pair()
    res = distill(student, teacher, [x], 6, batch_size=8, grad_accumulation=2,
                  mixed_precision="bf16")
    assert res.grad_accumulation == 2 and res.mixed_precision == "bf16"
    assert len(res.losses) == 6 and all(torch.isfinite(torch.tensor(res.losses)))
    with pytest.raises(ValueError, match="grad_accumulation must be >= 1"):
        distill(student, teacher, [x], 2, grad_accumulation=0)
    with pytest.raises(ValueError, match="mixed_precision must be"):
        distill(student, teacher, [x], 2, mixed_precision="fp8")


def test_interrupted_and_resumed_distillation_ends_with_the_same_weights():
    teacher, student, x = pair()
    whole = copy.deepcopy(student)
    distill(whole, teacher, [x], 24, batch_size=16, checks=4)
    saved = {}

    class Stop(Exception):
        pass

    def hook(state):  # what the CLI writes to disk: the student's weights and the state
        saved["weights"] = weights(student)
        saved["state"] = copy.deepcopy(state)
        raise Stop
    with pytest.raises(Stop):
        distill(student, teacher, [x], 24, batch_size=16, checks=4, checkpoint_every=10,
                checkpoint=hook)
    assert saved["state"].step == 10
    _, fresh, _ = pair()
    fresh.load_state_dict(saved["weights"])
    res = distill(fresh, teacher, [x], 24, batch_size=16, checks=4, checkpoint_every=10,
                  resume=saved["state"])
    assert same(weights(fresh), weights(whole))
    assert len(res.losses) == 24 and sorted(res.heldout) == [0, 6, 12, 18, 24]


def cli(tmp: Path, *args: str) -> int:
    return cli_run(tmp, "--model", "embedded", "--target", "0.5", "--calib-size", "32",
                   "--distill-size", "256", *args)


@pytest.mark.cli
def test_cli_kill_and_resume_gives_the_uninterrupted_weights(tmp_path, monkeypatch, capsys):
    from vit_pruning import checkpoint as ckpt
    steps = ["--distill-steps", "30", "--distill-batch-size", "16", "--save-pruned-model"]
    assert cli(tmp_path / "a", *steps, "--run-id", "whole") == 0
    real = ckpt.Checkpoint.write

    def write_then_die(self, *a, **k):
        real(self, *a, **k)
        raise KeyboardInterrupt  # killed right after the first checkpoint landed
    monkeypatch.setattr(ckpt.Checkpoint, "write", write_then_die)
    b = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):  # main() lets it through; console_main says 130
        cli(b, *steps, "--checkpoint-every", "10", "--run-id", "r")
    assert (b / "art" / "r" / "checkpoint" / "latest.json").exists()
    assert not (b / "reports").exists() or not list((b / "reports").glob("*.json"))
    monkeypatch.setattr(ckpt.Checkpoint, "write", real)
    capsys.readouterr()
    assert cli(b, *steps, "--checkpoint-every", "10", "--run-id", "r") == 2  # not without --resume
    assert "add --resume" in capsys.readouterr().err
    assert cli(b, *steps, "--checkpoint-every", "10", "--run-id", "r", "--resume") == 0
    w1 = load_file(str(tmp_path / "a" / "pruned" / "whole" / "model.safetensors"))
    w2 = load_file(str(b / "pruned" / "r" / "model.safetensors"))
    assert same(w1, w2)
    rep = json.loads((b / "reports" / "report-r.json").read_text())
    assert [s["name"] for s in rep["stages"]] == ["baseline", "stage1", "stage2", "distilled"]
    assert not (b / "art" / "r" / "checkpoint").exists()  # spent once the run is whole


@pytest.mark.cli
def test_a_checkpoint_of_another_job_is_refused(tmp_path, monkeypatch, capsys):
    from vit_pruning import checkpoint as ckpt
    real = ckpt.Checkpoint.write

    def write_then_die(self, *a, **k):
        real(self, *a, **k)
        raise KeyboardInterrupt
    monkeypatch.setattr(ckpt.Checkpoint, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):  # main() lets it through; console_main says 130
        cli(tmp_path, "--distill-steps", "20", "--checkpoint-every", "5", "--run-id", "j")
    monkeypatch.setattr(ckpt.Checkpoint, "write", real)
    capsys.readouterr()
    argv = ["--model", "embedded", "--target", "0.4", "--calib-size", "32", "--distill-size", "256",
            "--reports-dir", str(tmp_path / "reports"), "--artifacts-dir", str(tmp_path / "art"),
            "--quiet", "--distill-steps", "20", "--checkpoint-every", "5", "--run-id", "j", "--resume"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "made for another job (--target was 0.5 there, 0.4 now)" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--distill-steps", "5", "--grad-accumulation", "0"], "--grad-accumulation must be >= 1, got 0"),
    (["--checkpoint-every", "5"], "--checkpoint-every checkpoints distillation: add --distill-steps"),
    (["--distill-steps", "5", "--resume"], "--resume goes on from the checkpoint of a run: give its --run-id"),
    (["--distill-steps", "5", "--resume", "--run-id", "none"], "--resume: no checkpoint of --run-id none"),
    (["--distill-steps", "5", "--mixed-precision", "fp16", "--device", "cpu"],
     "--mixed-precision fp16: fp16 needs a CUDA device"),
])
@pytest.mark.cli
def test_bad_recovery_flags(tmp_path, capsys, args, message):
    assert cli(tmp_path, *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "reports").exists() and not (tmp_path / "pruned").exists()


def torchrun(tmp: Path, nproc: int, *args: str, script: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    entry = [script] if script else ["-m", "vit_pruning"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(29500 + os.getpid() % 1000), *entry,
           "--model", "embedded", "--target", "0.5", "--calib-size", "32", "--distill-size", "512",
           "--reports-dir", str(tmp / "reports"), "--artifacts-dir", str(tmp / "art"),
           "--pruned-output-dir", str(tmp / "pruned"), "--quiet", "--latency-repeats", "2", "--latency-precision", "0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.cli
def test_two_processes_distill_one_model_like_one_process(tmp_path):
    args = ["--distill-steps", "40", "--distill-batch-size", "32", "--save-pruned-model", "--run-id", "ddp"]
    two = torchrun(tmp_path / "two", 2, *args)
    assert two.returncode == 0, two.stderr[-3000:]
    one = torchrun(tmp_path / "one", 1, *args)
    assert one.returncode == 0, one.stderr[-3000:]
    reports = list((tmp_path / "two" / "reports").glob("*.json"))
    assert len(reports) == 1 and len(list((tmp_path / "two" / "pruned").iterdir())) == 1
    r2, r1 = (json.loads(next((tmp_path / d / "reports").glob("*.json")).read_text())["distillation"]
              for d in ("two", "one"))
    assert r2["processes"] == 2 and r1["processes"] == 1
    assert r1["heldout"].keys() == r2["heldout"].keys()
    for step, loss in r1["heldout"].items():
        assert abs(r2["heldout"][step] - loss) <= 0.02 * loss, (step, loss, r2["heldout"][step])
    model = load_pruned_model(tmp_path / "two" / "pruned" / "ddp")
    assert model(pixel_values=torch.zeros(1, 3, 16, 16)).logits.isfinite().all()


DIE = """
import os, sys
import vit_pruning.distillation as d
if os.environ.get("RANK") == "1":  # this process dies in the middle of distillation
    real, calls = d.distill_loss, [0]
    def dying(*a, **k):
        calls[0] += 1
        if calls[0] == 5:
            os._exit(9)
        return real(*a, **k)
    d.distill_loss = dying
from vit_pruning.cli import console_main  # a process's entry point: its signal handling
sys.exit(console_main())
"""


@pytest.mark.cli
def test_a_dead_rank_stops_the_job_in_one_line(tmp_path):
    script = tmp_path / "die.py"
    script.write_text(DIE)
    out = torchrun(tmp_path, 2, "--distill-steps", "200", "--checkpoint-every", "2", "--run-id", "dead",
                   script=str(script))
    assert out.returncode != 0
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("vit-2ssp (rank 0 of 2)")]
    assert len(lines) == 1 and ("another process of this job stopped" in lines[0]
                                or "terminated" in lines[0]), out.stderr[-3000:]
    assert "Traceback" not in "\n".join(ln for ln in out.stderr.splitlines() if "rank 0" in ln)
    assert not (tmp_path / "reports").exists() or not list((tmp_path / "reports").glob("*.json"))
    assert (tmp_path / "art" / "dead" / "checkpoint" / "latest.json").exists()  # the last survives


@pytest.mark.parametrize("target, message", [
    (["--target", "0.3,0.5"], "several processes distill one model"),
    (["--target-latency", "0.7"], "--target-latency plans on timings that every process"),
])
@pytest.mark.cli
def test_a_launched_job_refuses_what_one_process_must_do(tmp_path, monkeypatch, capsys, target, message):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    argv = ["--model", "embedded", *target, "--reports-dir", str(tmp_path / "r"), "--quiet",
            "--artifacts-dir", str(tmp_path / "a"), "--latency-repeats", "5"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("vit-2ssp (rank 0 of 2): error:")
    assert not (tmp_path / "r").exists()


@pytest.mark.cli
def test_checkpoint_place_is_checked_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    argv = ["--model", "embedded", "--target", "0.5", "--distill-steps", "5", "--checkpoint-every",
            "2", "--reports-dir", str(tmp_path / "r"), "--artifacts-dir", str(blocker), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--artifacts-dir" in err and "not a directory" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists() and blocker.read_text() == "not a folder"


def fake_checkpoint(tmp: Path, argv: list[str], run_id: str = "r") -> Path:
    """A checkpoint folder of `run_id` whose job is that of `argv` (what a run killed during
    distillation leaves), without running one: the checks before any work read only this."""
    from vit_pruning.cli import build_parser, config_from_args
    cfg = config_from_args(build_parser().parse_args(argv))
    step = tmp / "art" / run_id / "checkpoint" / "step-000010"
    step.mkdir(parents=True)
    torch.save({"format": 1, "job": cfg.job(), "stages": [], "result": None}, step / "run.pt")
    torch.save({"step": 10}, step / "state.pt")
    shutil.copytree(EMBEDDED, step / "model")  # a student folder (never trained here)
    (step.parent / "latest.json").write_text(json.dumps({"folder": step.name, "step": 10}))
    return step


BASE = ["--model", "embedded", "--target", "0.5", "--calib-size", "32", "--distill-size", "256",
        "--distill-steps", "30", "--checkpoint-every", "10", "--run-id", "r"]


@pytest.mark.cli
@pytest.mark.parametrize("flag, value, message", [
    ("--cifar-train-pct", "0.5", "--cifar-train-pct was 0.25 there, 0.5 now"),
    ("--eval-batches", "2", "--eval-batches was 5 there, 2 now"),
    ("--skip-bad-images", None, "--skip-bad-images was False there, True now"),
    ("--image-column", "image", "--image-column was None there, 'image' now"),
    ("--target", "0.6", "--target was 0.5 there, 0.6 now")])
def test_a_resume_that_changes_the_job_is_refused_before_any_work(tmp_path, capsys, monkeypatch,
                                                                  flag, value, message):
    import vit_pruning.app.loading as loading
    fake_checkpoint(tmp_path, BASE)
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    argv = [*BASE, "--resume", flag, *([value] if value else [])]
    assert cli(tmp_path, *argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and err.startswith("vit-2ssp: error: --resume:")


@pytest.mark.cli
@pytest.mark.parametrize("damage", ["state-truncated", "run-truncated", "state-random",
                                    "latest-garbage", "latest-list", "snapshots-gone"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(tmp_path, capsys, damage):
    step = fake_checkpoint(tmp_path, BASE)
    latest = step.parent / "latest.json"
    if damage == "state-truncated":
        torch.save({"step": 10, "pad": torch.zeros(1000)}, step / "state.pt")
        data = (step / "state.pt").read_bytes()
        (step / "state.pt").write_bytes(data[:len(data) // 2])
        named = "state.pt"
    elif damage == "run-truncated":
        (step / "run.pt").write_bytes((step / "run.pt").read_bytes()[:40])
        named = "run.pt"
    elif damage == "state-random":
        (step / "state.pt").write_bytes(bytes(range(256)) * 8)
        named = "state.pt"
    elif damage == "latest-garbage":
        latest.write_text("{garbage")
        named = "latest.json"
    elif damage == "latest-list":
        latest.write_text("[]")
        named = "latest.json"
    else:  # the run record names stages whose snapshots are gone
        from vit_pruning.checkpoint import Checkpoint
        record = torch.load(step / "run.pt", weights_only=False)
        from vit_pruning.report import StageMetrics
        record["stages"] = [StageMetrics("baseline", 1, 1, 0.0, None, None),
                            StageMetrics("stage1", 1, 1, 0.0, None, None)]
        torch.save(record, step / "run.pt")
        assert Checkpoint(step.parent).latest == step
        named = "snapshots"
    assert cli(tmp_path, *BASE, "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and "Traceback" not in err, err
    if damage.startswith("latest"):  # a plain run with that run id is refused as plainly
        assert cli(tmp_path, *BASE) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "latest.json" in err and "--run-id r" in err
