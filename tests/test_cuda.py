"""CUDA: the library and the CLI run on a GPU end to end, and what they save reloads there.
Skipped (with the reason) where CUDA is absent, as on CI; run it on a GPU machine."""
import json

import pytest
import torch
from transformers import ViTForImageClassification

from conftest import tiny_config
from vit_pruning import PruneConfig, count_total_params, load_pruned_model, prune_2ssp
from vit_pruning.cli import main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.mark.parametrize("unit", ["block", "attention"])
@pytest.mark.parametrize("selection", ["score", "lsq"])
def test_prune_2ssp_on_cuda(unit, selection):
    torch.manual_seed(0)
    model = ViTForImageClassification(tiny_config()).eval().cuda()
    x = torch.randn(32, 3, 16, 16, device="cuda")
    model, result = prune_2ssp(model, 0.3, [x], PruneConfig(unit=unit, selection=selection, min_remaining=8))
    assert count_total_params(model) == result.plan.params_after
    assert all(p.is_cuda for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model(pixel_values=x).logits).all()


@pytest.mark.parametrize("heads", ["off", 1])
def test_a_bf16_model_pruned_on_cuda_reloads_there_in_bf16(tmp_path, heads):
    """What a GPU user serves: pruned in bf16 on the device, saved, loaded back on the device
    in its own dtype (not float32) with the same logits."""
    from vit_pruning import save_pruned_model
    torch.manual_seed(0)
    model = ViTForImageClassification(tiny_config()).eval().cuda().to(torch.bfloat16)
    x = torch.randn(32, 3, 16, 16, device="cuda", dtype=torch.bfloat16)
    model, _ = prune_2ssp(model, 0.3, [x], PruneConfig(min_remaining=8, heads=heads))
    save_pruned_model(model, tmp_path / "m")
    back = load_pruned_model(tmp_path / "m", device="cuda")
    assert {(p.dtype, p.is_cuda) for p in back.parameters()} == {(torch.bfloat16, True)}
    with torch.no_grad():
        assert torch.equal(back(pixel_values=x).logits, model(pixel_values=x).logits)


@pytest.mark.cli
def test_cli_end_to_end_on_cuda(tmp_path):
    code = main(["--model", "embedded", "--target", "0.3", "--device", "cuda", "--use-adapter",
                 "--do-finetune", "--freeze-backbone", "--recover", "--save-adapter",
                 "--save-pruned-model", "--depth-unit", "auto", "--run-id", "g", "--eval-batches", "2",
                 "--calib-size", "32", "--reports-dir", str(tmp_path / "r"), "--artifacts-dir",
                 str(tmp_path / "a"), "--pruned-output-dir", str(tmp_path / "p"), "--quiet"])
    assert code == 0
    rep = json.loads((tmp_path / "r" / "report-g.json").read_text())
    assert rep["latency_setup"]["timer"] == "cuda events" and rep["latency_setup"]["dtype"] == "bfloat16"
    back = load_pruned_model(tmp_path / "p" / "g", device="cuda")
    assert count_total_params(back) == rep["params_final"]
    x = torch.randn(4, 3, 16, 16, device="cuda")
    with torch.no_grad():
        assert back(pixel_values=x).logits.is_cuda


@pytest.mark.parametrize("cache_limit", [None, 0])  # targets cached on the host / teacher every step
def test_layer_distillation_on_cuda(cache_limit):
    from vit_pruning.distillation import CACHE_LIMIT, distill, pruned_layers
    torch.manual_seed(0)
    teacher = ViTForImageClassification(tiny_config()).eval().cuda()
    student = ViTForImageClassification(tiny_config()).eval().cuda()
    student.load_state_dict(teacher.state_dict())
    x = torch.randn(64, 3, 16, 16, device="cuda")
    _, result = prune_2ssp(student, 0.45, [x], PruneConfig(unit="block", split=1, min_remaining=8))
    res = distill(student, teacher, [x.cpu()], 20, lr=1e-3, train="blocks", match="layers",
                  layers=pruned_layers(result), cache_limit=CACHE_LIMIT if cache_limit is None else 0)
    assert res.teacher_cached == (cache_limit is None) and len(res.losses) == 20
    assert all(p.is_cuda for p in student.parameters()) and all(torch.isfinite(torch.tensor(res.losses)))


def test_bf16_distillation_on_cuda_learns_and_stays_on_the_gpu():
    """accelerate's bf16 autocast on a GPU: finite losses, the student stays on CUDA in float32
    weights, and the held-out loss is not worse than before the first step (best check kept)."""
    from vit_pruning import distill
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU cannot run bf16")
    torch.manual_seed(0)
    teacher = ViTForImageClassification(tiny_config()).eval().cuda()
    x = torch.randn(128, 3, 16, 16, device="cuda")
    student = ViTForImageClassification(tiny_config()).eval().cuda()
    student.load_state_dict(teacher.state_dict())
    student, _ = prune_2ssp(student, 0.3, [x[:32]], PruneConfig(min_remaining=8))
    res = distill(student, teacher, [x.cpu()], 30, lr=1e-3, mixed_precision="bf16")
    assert res.mixed_precision == "bf16" and all(torch.isfinite(torch.tensor(res.losses)))
    assert all(p.is_cuda and p.dtype == torch.float32 for p in student.parameters())
    assert res.heldout[res.kept_step] <= res.heldout[0]


@pytest.mark.cli
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpu_distillation_under_torchrun(tmp_path):
    """NCCL: two processes, one GPU each, distill one model; one report, one saved model."""
    import os
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "vit_pruning",
           "--model", "embedded", "--target", "0.5", "--distill-steps", "40", "--save-pruned-model",
           "--reports-dir", str(tmp_path / "r"), "--pruned-output-dir", str(tmp_path / "p"),
           "--artifacts-dir", str(tmp_path / "a"), "--quiet", "--latency-repeats", "2", "--run-id", "nccl"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-3000:]
    rep = json.loads((tmp_path / "r" / "report-nccl.json").read_text())
    assert rep["distillation"]["processes"] == 2 and rep["distillation"]["mixed_precision"] == "bf16"
    assert len(list((tmp_path / "p").iterdir())) == 1


@pytest.mark.cli
def test_a_bf16_checkpoint_on_cuda_is_pruned_in_float32_and_saved_in_bf16(tmp_path):
    """A bf16 hub checkpoint on a GPU (transformers 5.x loaded it in bf16): pruned and measured
    in float32 as its float32 copy is (the same plan), saved in bf16, reloaded on the device."""
    from transformers import ViTImageProcessor

    from vit_pruning.config import EMBEDDED
    model = ViTForImageClassification.from_pretrained(EMBEDDED)
    reps = {}
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype)[6:]
        model.to(torch.bfloat16).to(dtype).save_pretrained(tmp_path / name)
        ViTImageProcessor.from_pretrained(EMBEDDED).save_pretrained(tmp_path / name)
        assert main(["--model", str(tmp_path / name), "--dataset", "digits", "--target", "0.3",
                     "--device", "cuda", "--run-id", name, "--eval-batches", "2", "--calib-size",
                     "32", "--save-pruned-model", "--reports-dir", str(tmp_path / "r"),
                     "--pruned-output-dir", str(tmp_path / "p"), "--quiet"]) == 0
        reps[name] = json.loads((tmp_path / "r" / f"report-{name}.json").read_text())
    assert reps["bfloat16"]["plan"] == reps["float32"]["plan"]
    kl = [r["stages"][-1]["kl_to_baseline"] for r in reps.values()]
    assert kl[0] == pytest.approx(kl[1], rel=1e-3)
    back = load_pruned_model(tmp_path / "p" / "bfloat16", device="cuda")
    assert {(p.dtype, p.is_cuda) for p in back.parameters()} == {(torch.bfloat16, True)}
    assert reps["bfloat16"]["artifacts"]["pruned_model_dtype"] == "bfloat16"


@pytest.mark.cli
def test_a_device_this_machine_lacks_exits_2(tmp_path, capsys):
    """--device cuda:N past the last GPU is named before any work (it failed once the model
    was on its way, "invalid device ordinal")."""
    n = torch.cuda.device_count()
    assert main(["--model", "embedded", "--target", "0.3", "--device", f"cuda:{n}", "--dry-run",
                 "--reports-dir", str(tmp_path / "r")]) == 2
    assert f"this machine has {n} CUDA device(s)" in capsys.readouterr().err


@pytest.mark.cli
def test_a_latency_batch_too_large_for_the_device_is_refused_before_the_work(tmp_path, capsys):
    """--latency-batch-size past the device's memory is named in one line before any pruning
    (it failed at the end of the run, when the stages were timed), and nothing is written. The
    process is held to 1 GiB of the GPU so that the batch is too large on any card."""
    from conftest import one_line_error
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()  # what earlier tests left cached would not count against the cap
    torch.cuda.set_per_process_memory_fraction(min(1.0, 2**30 / total))
    try:
        code = main(["--model", "embedded", "--target", "0.3", "--device", "cuda",
                     "--latency-batch-size", "200000", "--run-id", "big", "--reports-dir",
                     str(tmp_path / "r"), "--artifacts-dir", str(tmp_path / "a"),
                     "--pruned-output-dir", str(tmp_path / "p"), "--save-pruned-model"])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    line = one_line_error(capsys)
    assert code == 2 and "--latency-batch-size 200000" in line and "lower it" in line, line
    assert not list(tmp_path.rglob("*"))
