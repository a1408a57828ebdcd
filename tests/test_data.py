"""Data loading through the real `datasets` paths, with local files made here."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTImageProcessor

from vit_pruning.data import (DataError, calibration_subset, fingerprint, load_splits,
                              make_loader)


def test_digits_split_is_fixed_and_disjoint():
    a = load_splits("digits", 1.0, 1.0)
    b = load_splits("digits", 1.0, 1.0)
    assert (len(a.train), len(a.test)) == (1437, 360) and a.num_labels == 10
    assert a.train["label"] == b.train["label"]
    assert a.image_column == "img" and a.label_column == "label"
    sub = load_splits("digits", 0.5, 0.25)
    assert (len(sub.train), len(sub.test)) == (718, 90)


def test_imagefolder_dataset(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 4)):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(d / f"{i}.png")
    s = load_splits(str(tmp_path), 1.0, 1.0)
    assert s.num_labels == 2 and s.label_names == ["cat", "dog"]
    assert (len(s.train), len(s.test)) == (12, 8)
    proc = ViTImageProcessor(size={"height": 16, "width": 16})
    batch = next(iter(make_loader(s.test, proc, s, batch_size=8)))
    assert batch["pixel_values"].shape == (8, 3, 16, 16) and batch["labels"].dtype == torch.long


def test_unknown_dataset_and_missing_columns(tmp_path):
    with pytest.raises(DataError, match="--dataset: unknown dataset 'nope'"):
        load_splits("nope")
    with pytest.raises(DataError, match="--image-column: column 'pic'"):
        load_splits("digits", image_column="pic")


def test_a_folder_without_images_is_a_data_error(tmp_path):
    """An empty folder, or one of text files, used to end in datasets' EmptyDatasetError
    traceback; it is a DataError (exit 2 on the command line) that says what a folder needs."""
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("no images here")
    for folder in (tmp_path / "notes", tmp_path):
        with pytest.raises(DataError, match=r"--dataset: cannot read .* as an image folder "
                                            r"\(\w+: .*\); give a folder with train/"):
            load_splits(str(folder))


def test_calibration_subset_and_fingerprint_are_seeded():
    s = load_splits("digits", 1.0, 1.0)
    _, i0 = calibration_subset(s.train, 16, seed=0)
    _, i0b = calibration_subset(s.train, 16, seed=0)
    _, i1 = calibration_subset(s.train, 16, seed=1)
    assert i0 == i0b and i0 != i1 and len(set(i0)) == 16
    x = [torch.ones(2, 3, 4, 4)]
    assert fingerprint(x) == fingerprint([t.clone() for t in x]) != fingerprint([x[0] * 2])
