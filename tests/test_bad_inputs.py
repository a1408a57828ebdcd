"""Bad inputs end in one line and exit 2 with nothing written: images that cannot be used,
broken configs and folders, text files, settings taken otherwise are said; repeated text lines
never reach both calibration and evaluation."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from transformers import (BertConfig, BertModel, ViTForImageClassification, ViTImageProcessor,
                          ViTModel)

from conftest import cli_run as run
from conftest import one_line_error, output_files as files, read_report, tiny_config, vit_folder

ROOT = Path(__file__).resolve().parents[1]


# 6b. repeated text lines never reach both calibration and evaluation

def test_repeated_lines_are_dropped_before_the_split(tmp_path):
    from vit_pruning.text import read_sentences_counted, split_sentences
    lines = [f"Sentence number {i % 40} of a file with repeats." for i in range(400)]
    (tmp_path / "t.txt").write_text("\n".join(lines) + "\n\n")
    sentences, repeats = read_sentences_counted(tmp_path / "t.txt")
    assert len(sentences) == 40 and repeats == 360
    split = split_sentences(sentences, 20, 16)
    assert not set(split.calibration) & set(split.evaluation)


def test_a_byte_order_mark_is_not_text(tmp_path):
    """Notepad's UTF-8 files start with a byte-order mark, which stayed in the first sentence
    (so it and the same line without it were two sentences); UTF-16 files are named as such."""
    from vit_pruning.text import read_sentences_counted
    (tmp_path / "bom.txt").write_bytes("A line.\r\nB line.\r\nA line.\r\n".encode("utf-8-sig"))
    assert read_sentences_counted(tmp_path / "bom.txt") == (("A line.", "B line."), 1)
    (tmp_path / "u16.txt").write_text("A line.\n", encoding="utf-16")
    with pytest.raises(ValueError, match=r"u16.txt is UTF-16 text \(it starts with a UTF-16 "
                                         r"byte-order mark\); save it as UTF-8"):
        read_sentences_counted(tmp_path / "u16.txt")


def test_text_file_is_bounded(tmp_path):
    from vit_pruning.text import read_sentences_counted
    (tmp_path / "big.txt").write_text("a sentence of words.\n" * 1000)
    with pytest.raises(ValueError, match="larger than"):
        read_sentences_counted(tmp_path / "big.txt", max_bytes=2**10)
    if Path("/dev/zero").exists():
        with pytest.raises(ValueError, match="larger than"):
            read_sentences_counted("/dev/zero", max_bytes=2**20)



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


@pytest.mark.cli
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


def no_processor(tmp: Path) -> Path:
    folder = vit_folder(tmp / "bare")
    (folder / "preprocessor_config.json").unlink()  # a model saved alone (model.save_pretrained)
    return folder


def _without(tmp: Path, name: str, drop: str, headless: bool = False) -> Path:
    """A tiny ViT folder whose weights lack those starting with `drop` (a backbone saved without
    its config naming its class, with `headless`: transformers builds it as a classifier)."""
    from transformers import ViTModel
    from safetensors.torch import load_file, save_file
    folder = vit_folder(tmp / name, ViTModel(tiny_config(), add_pooling_layer=False)
                        if headless else None)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("architectures", None) if headless else None
    (folder / "config.json").write_text(json.dumps(cfg))
    state = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith(drop)}, folder / "model.safetensors",
              metadata={"format": "pt"})
    return folder


def _processor_of_another_size(tmp: Path) -> Path:
    """A 16-pixel ViT beside a 32-pixel image processor (a fine-tune at another resolution saved
    with its base checkpoint's processor)."""
    folder = vit_folder(tmp / "sizes")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _file(path):
    path.write_text("not a model\n")
    return path


BAD_INPUTS = {
    "image-size-0": (lambda t: ["--model", str(broken_config(t, image_size=0))], "image_size 0"),
    "heads-0": (lambda t: ["--model", str(broken_config(t, num_attention_heads=0))], "num_attention_heads 0"),
    "patch-0": (lambda t: ["--model", str(broken_config(t, patch_size=0))], "patch_size 0"),
    "hidden-mismatch": (lambda t: ["--model", str(broken_config(t, hidden_size=64))], "--model: cannot load"),
    "pickle": (lambda t: ["--model", str(pickle_folder(t))], "--model: cannot load"),
    "no-processor": (lambda t: ["--model", str(no_processor(t))],
                     "has no usable image processor config (no preprocessor_config.json); a model "
                     "saved alone needs the one it was trained with beside it: AutoImageProcessor"),
    "missing-model": (lambda t: ["--model", "/nonexistent/dir"], "no such folder /nonexistent/dir"),
    "model-is-a-file": (lambda t: ["--model", str(_file(t / "notes.txt"))],
                        "is a file; give a model folder (with its config.json), a hub id or embedded"),
    "missing-dataset": (lambda t: ["--model", "embedded", "--dataset", "./nope_ds"], "--dataset: no such folder"),
    "split-s2": (lambda t: ["--model", "embedded", "--stage", "s2", "--split", "3"], "--split 3 does not apply"),
    "split-too-big": (lambda t: ["--model", "embedded", "--split", "99"], "--split 99"),
    "empty-text": (lambda t: ["--model", "embedded", "--text-file", str(t)], "--text-file"),
    # transformers fills what a checkpoint lacks with random values, and said so only in its log
    "headless-no-architectures": (
        lambda t: ["--model", str(_without(t, "bb", "none", headless=True)), "--dataset", "digits"],
        "has no weights for classifier.bias, classifier.weight of the ViTForImageClassification "
        "its config builds (transformers would fill them with random values); it is a backbone "
        "without a classifier: add --replace-classifier"),
    "processor-size": (lambda t: ["--model", str(_processor_of_another_size(t)), "--dataset",
                                  "digits"],
                       "its image processor's images do not fit the model (ValueError: Input "
                       "image size (32*32) doesn't match model (16*16).); put the processor it "
                       "was trained with beside it"),
    "missing-weights": (lambda t: ["--model", str(_without(t, "part", "vit.layernorm."))],
                        "has no weights for vit.layernorm.bias, vit.layernorm.weight of the "
                        "ViTForImageClassification its config builds (transformers would fill "
                        "them with random values); its weights do not match its config"),
}


@pytest.mark.cli
@pytest.mark.parametrize("make", [
    lambda t: vit_folder(t / "vit", ViTModel(tiny_config(), add_pooling_layer=False)),
    lambda t: vit_folder(t / "bert", BertModel(BertConfig(
        vocab_size=99, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32), add_pooling_layer=False))])
def test_a_pooler_the_output_does_not_use_may_be_missing(tmp_path, capsys, make):
    """DINO's ViTModel checkpoints (and some text encoders) have no pooler weights: the class
    builds a random one, which the measured output (the last hidden state, the pooled sentence
    embedding) never reads, so the checkpoint is taken."""
    folder = make(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] in (["ViTModel"], ["BertModel"])
    if cfg["architectures"] == ["BertModel"]:  # a tokenizer beside it
        from transformers import BertTokenizerFast
        (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                       *"abcdefgh"]) + "\n")
        BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(folder)
    assert run(tmp_path, "--model", str(folder), "--target", "0.2", "--dry-run") == 0, \
        capsys.readouterr().err


@pytest.mark.cli
@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_inputs_end_in_one_line(tmp_path, capsys, name):
    make, msg = BAD_INPUTS[name]
    args = make(tmp_path)
    before = files(tmp_path)
    assert run(tmp_path, *args, "--target", "0.2") == 2
    assert msg in one_line_error(capsys)
    assert files(tmp_path) == before
    if name in ("missing-dataset", "split-too-big", "processor-size"):  # the dry run refuses
        # what the run refuses (the processor: one blank image, no dataset read)
        assert run(tmp_path, *args, "--target", "0.2", "--dry-run") == 2
        assert msg in one_line_error(capsys)


@pytest.mark.cli
def test_empty_text_file_is_named(tmp_path, capsys):
    from test_text import bert_folder
    folder = bert_folder(tmp_path)
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    capsys.readouterr()  # the folder's own save progress bar
    (tmp_path / "two.txt").write_text("one sentence\nanother one\n")
    for dry in ([], ["--dry-run"]):  # the dry run refuses what the run refuses
        assert run(tmp_path, "--model", str(folder), "--target", "0.2", "--min-remaining", "4",
                   "--text-file", str(tmp_path / "empty.txt"), *dry) == 2
        assert "holds no sentences" in one_line_error(capsys)
        assert run(tmp_path, "--model", str(folder), "--target", "0.2", "--min-remaining", "4",
                   "--text-file", str(tmp_path / "two.txt"), "--calib-size", "1", *dry) == 2
        assert ("--calib-size/--eval-batches: only 0 sentences are left for calibration after 2 "
                "evaluation sentences; asked for 1") in one_line_error(capsys)
    assert not (tmp_path / "reports").exists()


def test_symlink_loop_model_is_named(tmp_path, capsys):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert run(tmp_path, "--model", str(tmp_path / "a"), "--target", "0.2") == 2
    assert "symbolic link loop" in one_line_error(capsys)


@pytest.mark.cli
def test_settings_taken_otherwise_are_said(tmp_path, capsys):
    assert run(tmp_path, "--model", "embedded", "--target", "0.0001", "--run-id", "n",
               "--eval-batches", "1", "--calib-size", "1") == 0
    out = capsys.readouterr().out
    notes = " ".join(read_report(tmp_path, "n")["notes"])
    assert "nothing was removed" in notes and "one calibration input" in notes
    assert "note: nothing was removed" in out
    assert "nothing was removed" in (tmp_path / "reports" / "report-n.md").read_text()



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


@pytest.mark.cli
def test_text_distillation_inputs_are_bounded(tmp_path, monkeypatch):
    import vit_pruning.app.inputs as inputs
    from test_text import bert_folder
    monkeypatch.setattr(inputs, "DISTILL_SENTENCES", 20)
    folder = bert_folder(tmp_path)
    (tmp_path / "t.txt").write_text("\n".join(f"sentence {i} of many, plain words." for i in range(300)))
    assert run(tmp_path, "--model", str(folder), "--target", "0.2", "--min-remaining", "4",
               "--text-file", str(tmp_path / "t.txt"), "--calib-size", "32", "--eval-batches", "1",
               "--distill-steps", "1", "--distill-augment", "0", "--run-id", "d") == 0
    rep = json.loads((tmp_path / "reports" / "report-d.json").read_text())
    assert rep["distillation"]["inputs"] == 20


@pytest.mark.parametrize("argv, message", [
    (["--target", "0.3,0.3000001"], "both print as 0.3"),
    (["--target", "0.3", "--target-resolution", "0.05"], "--target-resolution is the grid of a budget search"),
    (["--target", "0.3", "--run-id", "x" * 250], "--run-id must be at most 150 bytes"),
    (["--target", "0.3", "--latency-tolerance", "0"], "--latency-tolerance must be in (0, 1)")])
def test_refused_before_any_work(tmp_path, capsys, argv, message):
    (tmp_path / "reports").mkdir()  # an existing reports folder: the name is checked first
    assert run(tmp_path, "--model", "embedded", *argv) == 2
    assert message in one_line_error(capsys)
    assert files(tmp_path) == ["reports"]


@pytest.mark.cli
def test_a_dry_run_beside_an_earlier_report_is_not_refused(tmp_path, capsys):
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "report-x.json").write_text("{}")
    assert run(tmp_path, "--model", "embedded", "--target", "0.3", "--run-id", "x", "--dry-run") == 0
    assert "predicted parameters" in capsys.readouterr().out
    assert (tmp_path / "reports" / "report-x.json").read_text() == "{}"


def test_checkpoint_folders_get_the_users_permissions(tmp_path):
    import stat

    from conftest import tiny_model
    from vit_pruning.atomic import current_umask
    from vit_pruning.checkpoint import Checkpoint
    saved = Checkpoint.of(tmp_path, "r")
    step = saved.write(1, tiny_model(), {"step": 1}, {"stages": []}, {"model": "x"}, None)
    want = 0o777 & ~current_umask()
    assert stat.S_IMODE(step.stat().st_mode) == want
    saved.write_snapshots({"stage1": tiny_model()}, None)
    assert stat.S_IMODE((saved.folder / "snapshots").stat().st_mode) == want


def test_every_missing_hub_resource_is_named_at_once(tmp_path, capsys):
    import time
    t0 = time.perf_counter()
    assert run(tmp_path, "--target", "0.3", "--model", "google/vit-base-patch16-224",
               "--dataset", "cifar10") == 2
    line = one_line_error(capsys)
    assert "--model google/vit-base-patch16-224 and --dataset uoft-cs/cifar10" in line
    assert "hf download google/vit-base-patch16-224 --local-dir DIR" in line
    assert "hf download uoft-cs/cifar10 --repo-type dataset" in line and "HF_HUB_OFFLINE=1" in line
    assert "or use --model embedded and --dataset digits (" in line  # what runs offline instead
    assert time.perf_counter() - t0 < 30  # no download was retried
    assert files(tmp_path) == []


@pytest.mark.cli
def test_a_missing_hub_dataset_offers_the_offline_one(tmp_path, capsys):
    """Only the dataset is missing: the error offers --dataset digits, not --model embedded
    (which the run already uses)."""
    assert run(tmp_path, "--target", "0.3", "--model", "embedded", "--dataset", "cifar10") == 2
    line = one_line_error(capsys)
    assert line.startswith("vit-2ssp: error: --dataset uoft-cs/cifar10: not in the local cache")
    assert "or use --dataset digits (" in line and "--model embedded" not in line
    assert files(tmp_path) == []


def test_local_and_embedded_resources_need_no_hub(tmp_path):
    from vit_pruning.app.hub import needed
    from vit_pruning.cli import build_parser, config_from_args

    def cfg(*argv):
        return config_from_args(build_parser().parse_args(["--target", "0.3", *argv]))
    assert needed(cfg("--model", "embedded")) == []
    assert needed(cfg("--model", str(vit_folder(tmp_path / "m")), "--dataset", "digits")) == []
    assert needed(cfg("--model", "embedded", "--load-cifar", "--dry-run")) == []  # no data read
    assert needed(cfg("--model", "org/m", "--dataset", "org/d")) == [
        ("--model", "org/m", "model"), ("--dataset", "org/d", "dataset")]


@pytest.mark.cli
def test_a_latency_batch_too_large_for_memory_is_named_before_the_work(tmp_path, capsys,
                                                                       monkeypatch):
    """--latency-batch-size is tried in one forward of the unpruned model before any pruning:
    a batch the device's memory cannot hold (here the CPU allocator refusing it, faked: the
    real refusal takes a batch this machine's memory cannot hold) ends the run in one line
    naming the flag, with nothing written; it used to surface after pruning, when the stages
    were timed. (tests/test_cuda.py runs it for real on a GPU held to 1 GiB.)"""
    import vit_pruning.measure as measure
    real, seen = measure.run_model, []

    def run_model(model, inputs):
        batch = len(next(iter(inputs.values())))
        seen.append(batch)
        if batch >= 4096:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                               "allocate memory: you tried to allocate 53687091200 bytes.")
        return real(model, inputs)
    monkeypatch.setattr(measure, "run_model", run_model)
    assert run(tmp_path, "--model", "embedded", "--target", "0.3", "--latency-batch-size",
               "4096", "--save-pruned-model") == 2
    line = one_line_error(capsys)
    assert line.endswith("--latency-batch-size 4096: one forward of the unpruned model at this "
                         "batch does not fit in the memory of cpu; lower it"), line
    assert seen == [4096] and files(tmp_path) == []


def test_the_latency_batch_check_passes_a_batch_that_fits_and_keeps_other_errors(monkeypatch):
    import torch

    import vit_pruning.measure as measure
    from conftest import tiny_model
    from vit_pruning.app.checks import check_latency_batch
    model = tiny_model().train()
    check_latency_batch(model, 3, torch.bfloat16)  # runs under autocast, changes nothing
    assert model.training and all(p.grad is None for p in model.parameters())

    def broken(model, inputs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    monkeypatch.setattr(measure, "run_model", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        check_latency_batch(model, 3, None)
