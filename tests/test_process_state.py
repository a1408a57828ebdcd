"""No hidden process-wide state: a library call leaves malloc's thresholds alone, the command
line's run leaves no logging, verbosity or random-state change behind in the calling process,
and only the console entry point handles signals (a test run stops on Ctrl-C)."""
import logging
import platform
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

PROBE = """
import ctypes, sys
import torch
from transformers import ViTConfig, ViTForImageClassification
sys.path.insert(0, {src!r})
from vit_pruning import interleaved_latency


class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]


libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
call = {call!r}
if call != "none":
    model = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=4)).eval()
    interleaved_latency({{"a": model, "b": model}}, repeats=2, warmup=1,
                        steady_allocator=call == "steady")
before = libc.mallinfo2().hblks
block = libc.malloc(24 << 20)  # 24 MiB: mapped afresh unless the thresholds were raised
print(libc.mallinfo2().hblks - before)
libc.free(block)
"""


def mapped_blocks(call: str) -> int:
    """In a fresh process: after `call` ("none", "library": a plain interleaved_latency,
    "steady": one that asks for the steady allocator), whether a 24 MiB malloc is mapped (1)
    or served from the heap (0)."""
    out = subprocess.run([sys.executable, "-c", PROBE.format(src=str(ROOT / "src"), call=call)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="malloc's thresholds are glibc's")
def test_a_library_timing_leaves_mallocs_thresholds_as_they_were():
    assert mapped_blocks("none") == 1  # glibc's default: a large block is mapped
    assert mapped_blocks("library") == 1  # unchanged by a library call
    assert mapped_blocks("steady") == 0  # the probe sees it when the thresholds are fixed


def _state() -> dict:
    import datasets
    import transformers
    root = logging.getLogger()
    return {"handlers": list(root.handlers), "level": root.level,
            "onnx": logging.getLogger("onnxscript").level,
            "tf": transformers.utils.logging.get_verbosity(),
            "tf_bar": transformers.utils.logging.is_progress_bar_enabled(),
            "ds": datasets.utils.logging.get_verbosity(),
            "ds_bar": datasets.utils.logging.is_progress_bar_enabled(),
            "sigterm": signal.getsignal(signal.SIGTERM)}


@pytest.mark.cli
@pytest.mark.parametrize("quiet", [True, False])
def test_a_cli_run_leaves_no_process_state_behind(tmp_path, quiet):
    from vit_pruning.cli import main
    root = logging.getLogger()
    kept = list(root.handlers)  # a fresh process's root logger: no handlers (pytest adds its own)
    for h in kept:
        root.removeHandler(h)
    try:
        torch.manual_seed(1234)
        before, rng = _state(), torch.random.get_rng_state()
        argv = ["--model", "embedded", "--target", "0.3", "--cifar-test-pct", "1",
                "--eval-batches", "1", "--calib-size", "16", "--latency-repeats", "2",
                "--latency-precision", "0", "--reports-dir", str(tmp_path / "r"),
                "--run-id", "x", *(["--quiet"] if quiet else [])]
        assert main(argv) == 0
        assert _state() == before
        assert torch.equal(torch.random.get_rng_state(), rng)  # the run's seed was its own
    finally:
        for h in kept:
            root.addHandler(h)


def test_main_leaves_signals_alone_and_lets_an_interrupt_through(monkeypatch, capsys):
    import vit_pruning.app.run as app_run
    from vit_pruning.cli import console_main, main
    seen = []

    def interrupted(cfg, argv):
        seen.append(signal.getsignal(signal.SIGTERM))
        raise KeyboardInterrupt
    monkeypatch.setattr(app_run, "run", interrupted)
    outside = signal.getsignal(signal.SIGTERM)
    argv = ["--model", "embedded", "--target", "0.3", "--dry-run"]
    with pytest.raises(KeyboardInterrupt):  # a test runner (or a notebook) stops on Ctrl-C
        main(argv)
    assert seen[-1] is outside  # main installs no handler
    assert console_main(argv) == 130  # the console script: one line, exit 130
    assert seen[-1] is not outside  # it turns SIGTERM into a clean stop while it runs
    assert signal.getsignal(signal.SIGTERM) is outside  # and gives the handler back
    assert capsys.readouterr().err.strip() == "vit-2ssp: interrupted; nothing half-written was kept"


SLOW_TESTS = """
import pathlib
from vit_pruning.cli import main

HERE = pathlib.Path(__file__).parent


def test_a_long_cli_run():
    (HERE / "started").write_text("")
    main(["--model", "embedded", "--target", "0.3", "--eval-batches", "1", "--calib-size", "16",
          "--latency-repeats", "100000", "--latency-precision", "0", "--quiet",
          "--reports-dir", str(HERE / "r")])


def test_after():
    (HERE / "after").write_text("")
"""


@pytest.mark.cli
def test_ctrl_c_stops_a_test_run_in_the_middle_of_a_cli_run(tmp_path):
    import os
    import time
    (tmp_path / "test_slow.py").write_text(SLOW_TESTS)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "test_slow.py"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "started").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(5)  # inside main(): loading, pruning or timing its 100000 rounds
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out[-2000:]  # pytest's "interrupted"
    assert "KeyboardInterrupt" in out and not (tmp_path / "after").exists()
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").glob("*.json"))
