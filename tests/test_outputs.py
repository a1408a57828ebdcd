"""A run's outputs: the report names files that exist, one latency ratio with its spread,
output locations checked before the model loads, all outputs or none after the work (full
disk, a failed write, SIGTERM, two runs with one run id, a killed run's leftovers), quiet
means quiet."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import cli_run as run
from conftest import one_line_error, output_files as files, read_report
from vit_pruning.atomic import PARTIAL
from vit_pruning.cli import main
from vit_pruning.outputs import Output, OutputError, RunOutputs

ROOT = Path(__file__).resolve().parents[1]


# 4. the report names files that exist

@pytest.mark.cli
def test_onnx_path_in_the_report_exists(tmp_path):
    pytest.importorskip("onnxruntime", reason="the [export] extra is not installed")
    assert run(tmp_path, "--model", "embedded", "--target", "0.3", "--export-onnx", "--run-id", "o",
               "--eval-batches", "1", "--calib-size", "16") == 0
    rep = json.loads((tmp_path / "reports" / "report-o.json").read_text())
    assert Path(rep["artifacts"]["onnx"]["path"]) == tmp_path / "pruned" / "o" / "model.onnx"
    assert Path(rep["artifacts"]["onnx"]["path"]).is_file() and Path(rep["artifacts"]["plot"]).is_file()
    md = (tmp_path / "reports" / "report-o.md").read_text()
    assert f"onnx: {tmp_path / 'pruned' / 'o' / 'model.onnx'} (onnxruntime" in md and "{'path'" not in md
    # the plot is listed and shown (the Markdown used to be rendered before its path was set)
    assert f"- plot: {tmp_path / 'reports' / 'report-o.png'}\n" in md and "![stages](report-o.png)" in md
    assert not [f for f in files(tmp_path) if PARTIAL in f]
    for p in (tmp_path / "pruned" / "o").iterdir():  # readable by others, as any file made by the user
        assert p.stat().st_mode & 0o044 == 0o044, p


@pytest.mark.cli
def test_several_targets_export_each_model(tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="the [export] extra is not installed")
    assert run(tmp_path, "--model", "embedded", "--target", "0.2,0.4", "--export-onnx",
               "--run-id", "mo", "--eval-batches", "1", "--calib-size", "16") == 0
    out = capsys.readouterr().out
    rep = json.loads((tmp_path / "reports" / "report-mo.json").read_text())
    md = (tmp_path / "reports" / "report-mo.md").read_text()
    for t in ("0.2", "0.4"):
        folder = tmp_path / "pruned" / "mo" / f"target-{t}"
        record = rep["artifacts"]["onnx"][t]
        assert rep["artifacts"]["pruned_models"][t] == str(folder)
        assert Path(record["path"]) == folder / "model.onnx" and (folder / "model.onnx").is_file()
        assert record["max_abs_diff"] < 1e-4
        assert f"  - {t}: {folder / 'model.onnx'} (onnxruntime" in md
        assert f"pruned model, target {t}: {folder} (model.onnx: onnxruntime within" in out
    assert "![trade-off](report-mo.png)" in md and "plot: not written" not in md
    assert not [f for f in files(tmp_path) if PARTIAL in f]


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


@pytest.mark.cli
def test_report_and_console_share_the_ratio(tmp_path, capsys):
    assert run(tmp_path, "--model", "embedded", "--target", "0.3", "--run-id", "l",
               "--eval-batches", "1", "--calib-size", "16") == 0
    out = capsys.readouterr().out
    rep = read_report(tmp_path, "l")
    final = rep["stages"][-1]
    assert f"latency ratio {final['latency_ratio']:.3f}" in out
    md = (tmp_path / "reports" / "report-l.md").read_text()
    from vit_pruning.report import NOISY, _ratio_text
    assert _ratio_text(final) in md  # the ratio, "(noisy)" where the timing says so, quartiles
    assert (NOISY in _ratio_text(final)) == final["latency_noisy"]
    assert rep["summary"]["latency"]["stage2_delta_vs_baseline_pct"] == pytest.approx(
        100 * (final["latency_ratio"] - 1))
    assert "kept widths" in md and "multiples of 4" in md and "the planner's bound" in md



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
    import vit_pruning.app.loading as loading

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the outputs were checked")
    monkeypatch.setattr(loading, "load_model", boom)


@pytest.mark.cli
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


@pytest.mark.cli
def test_long_run_id_is_refused_before_loading(tmp_path, capsys, no_load):
    assert run(tmp_path, "--model", "embedded", "--target", "0.3", "--run-id", "x" * 250) == 2
    assert "--run-id must be at most 150 bytes" in one_line_error(capsys)
    assert files(tmp_path) == []


@pytest.mark.cli
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


@pytest.mark.cli
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


@pytest.mark.cli
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


@pytest.mark.cli
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


@pytest.mark.cli
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


@pytest.mark.cli
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



# 13. quiet means quiet

@pytest.mark.cli
def test_export_is_quiet_under_quiet(tmp_path):
    pytest.importorskip("onnxruntime", reason="the [export] extra is not installed")
    proc = cli_process(tmp_path, "q", "--export-onnx", "--latency-repeats", "2", "--latency-precision", "0")
    assert proc.wait(timeout=300) == 0
    err = proc.stderr.read()
    assert "INFO" not in err and len(err.strip().splitlines()) <= 3, err[-2000:]


@pytest.mark.cli
@pytest.mark.parametrize("error, said", [
    (lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a "
                                    "total capacity of 79.1 GiB of which 1.2 GiB is free."),
     "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB"),
    (lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                          "can't allocate memory: you tried to allocate 40000000000000 bytes."),
     "DefaultCPUAllocator: can't allocate memory"),
    (MemoryError, "MemoryError")])
def test_running_out_of_memory_is_one_line_naming_what_sizes_it(tmp_path, capsys, monkeypatch,
                                                                 error, said):
    """An allocation that fails in the middle of a run (a --batch-size too large for the GPU)
    ended in a traceback. Now it is one line that names the flags sizing the run's memory, exit
    1, and nothing of the run is left (its outputs are all or nothing)."""
    import vit_pruning.app.run as app_run

    def exhausted(*a, **k):
        raise error()
    monkeypatch.setattr(app_run, "latency_step", exhausted)  # after the pruning: all staged
    assert run(tmp_path, "--model", "embedded", "--target", "0.3", "--run-id", "m",
               "--save-pruned-model", "--cifar-test-pct", "0.2", "--eval-batches", "1",
               "--calib-size", "16") == 1
    err = one_line_error(capsys)
    assert "out of memory (" in err and said in err and "lower --batch-size" in err
    assert "--latency-batch-size" in err and "--distill-batch-size" not in err
    assert files(tmp_path) == []
