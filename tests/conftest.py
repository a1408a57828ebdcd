"""Shared by every test module: tiny ViT configs and models built in the tests (no download,
both transformers layouts), one CLI runner and one output lister, and the `cli` marker.

A test that runs the whole command line (in-process or in a subprocess) is marked
``@pytest.mark.cli``; ``pytest -m "not cli"`` is the fast unit suite. An unmarked test that
reaches :func:`vit_pruning.app.run.run` fails, naming the marker, so the split cannot drift."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import transformers  # noqa: E402

transformers.utils.logging.disable_progress_bar()  # the tests' own saves and loads: no bars in
# the stderr a test reads (the CLI's run sets its own and restores this)

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification


def tiny_config(**kw) -> ViTConfig:
    base = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                image_size=16, patch_size=4, num_labels=5)
    base.update(kw)
    return ViTConfig(**base)


def tiny_model(layers: int = 4, seed: int = 0, **kw) -> ViTForImageClassification:
    """A tiny ViT classifier in eval mode, its weights drawn from `seed`."""
    torch.manual_seed(seed)
    return ViTForImageClassification(tiny_config(num_hidden_layers=layers, **kw)).eval()


@pytest.fixture
def tiny_vit() -> ViTForImageClassification:
    return tiny_model()


QUICK = ("--latency-repeats", "2", "--latency-precision", "0")  # timings of 2 fixed rounds


def cli_run(tmp: Path, *args: str, quick: bool = True, dirs: tuple = ("reports", "art", "pruned")
            ) -> int:
    """The command line in-process, its outputs under `tmp` (reports, artifacts and pruned
    models in `dirs`), --quiet; with `quick`, timed in 2 fixed rounds unless `args` say
    otherwise (later flags win)."""
    from vit_pruning.cli import main
    reports, art, pruned = (str(tmp / d) for d in dirs)
    return main([*(QUICK if quick else ()), *args, "--reports-dir", reports, "--artifacts-dir", art,
                 "--pruned-output-dir", pruned, "--quiet"])


def one_line_error(capsys) -> str:
    """The run's stderr, which must be one error line (warnings aside) and no traceback."""
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if "WARNING" not in ln]
    assert len(lines) == 1 and lines[0].startswith("vit-2ssp: error:") and "Traceback" not in err, err
    return lines[0]


def vit_folder(path: Path, model=None) -> Path:
    """A tiny ViT classifier (or `model`) saved with its image processor."""
    from transformers import ViTImageProcessor
    torch.manual_seed(0)
    model = model or ViTForImageClassification(tiny_config())
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(path)
    return path


def read_report(tmp: Path, run_id: str, reports: str = "reports") -> dict:
    """The JSON report a run with `run_id` wrote under `tmp`."""
    import json
    return json.loads((tmp / reports / f"report-{run_id}.json").read_text())


def output_files(tmp: Path) -> list[str]:
    """Every file and folder under `tmp`, hidden ones included (half-written outputs)."""
    return sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*"))


def pytest_configure(config):
    config.addinivalue_line("markers", "cli: runs the whole command line (the slow part of the "
                                       "suite; -m 'not cli' leaves the unit tests)")


@pytest.fixture(autouse=True)
def _cli_marker_is_honest(request, monkeypatch):
    """An unmarked test may not run the command line's steps."""
    if request.node.get_closest_marker("cli") is None:
        import vit_pruning.app.run as app_run

        def refuse(*a, **k):
            raise AssertionError(f"{request.node.nodeid} runs the command line: mark it "
                                 f"@pytest.mark.cli")
        monkeypatch.setattr(app_run, "run", refuse)


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def cifar_like(tmp_path_factory) -> Path:
    """A DatasetDict on disk with the CIFAR-10 schema ("img", "label"), 32x32 RGB."""
    import datasets
    from PIL import Image
    rng = np.random.default_rng(0)
    feats = datasets.Features({"img": datasets.Image(),
                               "label": datasets.ClassLabel(names=[f"c{i}" for i in range(10)])})

    def split(n):
        return datasets.Dataset.from_dict(
            {"img": [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)],
             "label": [i % 10 for i in range(n)]}, features=feats)
    path = tmp_path_factory.mktemp("data") / "cifar_like"
    datasets.DatasetDict({"train": split(48), "test": split(24)}).save_to_disk(str(path))
    return path
