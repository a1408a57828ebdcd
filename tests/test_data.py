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


def _saved(tmp_path, name, train_labels, test_labels):
    """A saved DatasetDict of random 8x8 images with the labels given."""
    import datasets
    rng = np.random.default_rng(0)
    split = lambda labels: datasets.Dataset.from_dict(  # noqa: E731
        {"image": [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in labels],
         "label": labels})
    datasets.DatasetDict({"train": split(train_labels), "test": split(test_labels)}).save_to_disk(
        str(tmp_path / name))
    return str(tmp_path / name)


def test_class_names_as_labels_share_one_encoding(tmp_path):
    """String labels used to end in a ValueError traceback (int('dog')); they are encoded by
    the sorted names of both splits, so a class missing from one split keeps its id."""
    s = load_splits(_saved(tmp_path, "names", ["dog", "cat", "dog"], ["eel", "dog"]), 1.0, 1.0)
    assert s.label_names == ["cat", "dog", "eel"] and s.num_labels == 3
    assert s.train["label"] == [1, 0, 1] and s.test["label"] == [2, 1]
    s = load_splits(_saved(tmp_path, "floats", [0.0, 1.0, 2.0], [1.0]), 1.0, 1.0)
    assert s.num_labels == 3 and s.test["label"] == [1] and isinstance(s.test["label"][0], int)


@pytest.mark.parametrize("train, test, message", [
    ([0, 1], [-1, -1], r"the test split's 'label' is -1 in row 0 \(unlabelled\) and 1 more rows"),
    ([0, 1, 0.5], [0], r"the train split's 'label' is 0.5 in row 2 \(not a class id\);"),
])
def test_unlabelled_or_fractional_labels_are_refused(tmp_path, train, test, message):
    """Hub test splits often label every row -1; top-1 against them was silently wrong."""
    with pytest.raises(DataError, match="--label-column: " + message):
        load_splits(_saved(tmp_path, "bad", train, test), 1.0, 1.0)


def test_labels_beyond_the_class_names_are_refused(tmp_path):
    import datasets
    path = _saved(tmp_path, "cl", [0, 1], [0, 1, 2])
    d = datasets.load_from_disk(path)
    d["train"] = d["train"].cast_column("label", datasets.ClassLabel(names=["a", "b"]))
    d.save_to_disk(str(tmp_path / "cl2"))
    with pytest.raises(DataError, match=r"the test split's 'label' is 2 in row 2 \(not one of "
                                        r"the 2 class ids\)"):
        load_splits(str(tmp_path / "cl2"), 1.0, 1.0)


def test_a_slice_of_a_folder_ordered_by_class_holds_every_class(tmp_path):
    """An image folder lists its classes one after another: its first quarter was all "cat",
    so top-1 was measured on one class. A split ordered by label is sliced evenly."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog", "eel"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(d / f"{i}.png")
    s = load_splits(str(tmp_path), 0.5, 0.25)
    assert sorted(s.train["label"]) == [0, 0, 1, 1, 2, 2] and sorted(s.test["label"]) == [0, 1, 2]
    assert s.spaced == ("train", "test")  # the report says so
    whole = load_splits(str(tmp_path), 1.0, 1.0)  # --eval-batches reads the first rows: shuffled
    assert sorted(whole.test["label"]) == [0] * 4 + [1] * 4 + [2] * 4
    assert len(set(whole.test["label"][:4])) > 1 and whole.test["label"] == load_splits(
        str(tmp_path), 1.0, 1.0).test["label"]  # in one fixed order
    shuffled = _saved(tmp_path, "shuffled", [2, 0, 1, 1, 0, 2], [1, 0, 2, 2])
    s = load_splits(shuffled, 0.5, 0.5)  # not ordered: the first rows, as before
    assert s.train["label"] == [2, 0, 1] and s.test["label"] == [1, 0] and s.spaced == ()


def test_hub_datasets_are_sliced_here_and_cifar_by_split_syntax(tmp_path, monkeypatch):
    """The hub path with datasets.load_dataset standing in (no network here): a hub id is
    loaded whole and sliced like a local folder; CIFAR keeps the seed's split syntax."""
    import datasets
    local = datasets.load_from_disk(_saved(tmp_path, "hub", [0, 0, 1, 1], [0, 0, 1, 1]))
    asked = []

    def load_dataset(hub, split=None):
        asked.append((hub, split))
        return local if split is None else local[split.split("[")[0]]
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    s = load_splits("someone/sorted", 0.5, 0.5)
    assert asked == [("someone/sorted", None)] and s.test_split == "test"
    assert sorted(s.train["label"]) == [0, 1] and sorted(s.test["label"]) == [0, 1]
    asked.clear()
    s = load_splits("cifar10", 0.02, 0.5, image_column="image")
    assert asked == [("uoft-cs/cifar10", "train[:2%]"), ("uoft-cs/cifar10", "test[:50%]")]
    assert len(s.train) == 4  # sliced by the split syntax (here, the stand-in), not again


def test_classes_in_another_order_are_renumbered_to_the_head(tmp_path):
    """A head trained on ["dog", "cat", "eel"] against an image folder (sorted: cat, dog, eel)
    compared ids that name different classes; they are renumbered to the head's."""
    from vit_pruning.data import align_to_head
    s = load_splits(_saved(tmp_path, "names", ["dog", "cat", "eel"], ["eel", "cat"]), 1.0, 1.0)
    assert s.label_names == ["cat", "dog", "eel"] and s.train["label"] == [1, 0, 2]
    aligned, message = align_to_head(s, {0: "Dog", 1: "cat", 2: "eel"})
    assert aligned.train["label"] == [0, 1, 2] and aligned.test["label"] == [2, 1]
    assert aligned.label_names == ["Dog", "cat", "eel"] and aligned.num_labels == 3
    assert message == ("--dataset's classes are the model head's in another order: labels "
                       "renumbered to the head's ids (e.g. 'cat': 0 -> 1)")
    for same in ({0: "cat", 1: "dog", 2: "eel"}, {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}, {}):
        assert align_to_head(s, same) == (s, None)
    kept, message = align_to_head(s, {0: "cat", 1: "dog", 2: "fox"})
    assert kept is s and message.startswith("--dataset's class names are not the model head's "
                                            "(['eel'] are not among its 3: ['cat', 'dog', 'fox'])")


def test_the_image_column_must_hold_images_or_their_paths(tmp_path):
    """--image-column naming the labels ended in a traceback (digits) or took each label for
    a file name; a column of file paths passed the check and then failed in the collator."""
    import datasets
    with pytest.raises(DataError, match=r"--image-column: column 'label' of the train split "
                                        r"holds int64 values, not images or image paths"):
        load_splits("digits", image_column="label")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(paths[-1])
    split = lambda ps: datasets.Dataset.from_dict({"file": ps, "label": [0, 1] * (len(ps) // 2)})  # noqa: E731
    datasets.DatasetDict({"train": split(paths[:4]), "test": split(paths[4:])}).save_to_disk(
        str(tmp_path / "paths"))
    s = load_splits(str(tmp_path / "paths"), 1.0, 1.0, image_column="file")
    batch = next(iter(make_loader(s.test, ViTImageProcessor(size={"height": 8, "width": 8}), s, 2)))
    assert batch["pixel_values"].shape == (2, 3, 8, 8) and batch["labels"].tolist() == [0, 1]


def test_the_split_measured_on_is_test_or_validation_or_named(tmp_path):
    """ImageNet-style folders have train/ and val/, and ImageNet's hub test labels are hidden:
    such datasets were refused ("needs train/ and test/"), with no way to name another split."""
    import datasets
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = tmp_path / "inet" / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(d / f"{i}.png")
    s = load_splits(str(tmp_path / "inet"), 1.0, 1.0)
    assert s.test_split == "validation" and len(s.test) == 4
    path = _saved(tmp_path, "hidden", [0, 1], [-1, -1])  # a test split without labels
    d = datasets.load_from_disk(path)
    d["validation"] = d["train"]
    d.save_to_disk(str(tmp_path / "both"))
    with pytest.raises(DataError, match="unlabelled"):
        load_splits(str(tmp_path / "both"), 1.0, 1.0)
    assert load_splits(str(tmp_path / "both"), 1.0, 1.0, test_split="validation").test_split == "validation"
    for split, message in (("dev", r"--test-split: .* has no dev split \(splits: \['train', "
                                   r"'test', 'validation'\]\)"),
                           ("train", "--test-split train: calibration images come from the train")):
        with pytest.raises(DataError, match=message):
            load_splits(str(tmp_path / "both"), 1.0, 1.0, test_split=split)
    with pytest.raises(DataError, match="--test-split val: digits has a train and a test split"):
        load_splits("digits", test_split="val")


def test_an_image_folder_without_class_folders_is_told_where_labels_come_from(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / split / f"{i}.png")
    with pytest.raises(DataError, match=r"^--label-column: .*; an image folder's labels are its "
                                        r"class folders \(train/<class>/<image>\)$"):
        load_splits(str(tmp_path), 1.0, 1.0)


def _folder_of(tmp_path, name: str, images: dict[str, Image.Image]):
    """An image folder (train/ and test/, class folders a and b) holding `images` by file name
    in every class folder."""
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / name / split / cls).mkdir(parents=True)
            for fname, im in images.items():
                im.save(tmp_path / name / split / cls / fname)
    return str(tmp_path / name)


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_images_are_read_at_their_bit_depth(tmp_path, channels):
    """A 16-bit PNG (medical, microscopy, depth) was converted by Pillow, which clips every value
    above 255: the image came out white. It is now read as the 8-bit image of the same picture."""
    eight = np.tile(np.linspace(0, 255, 64).round(), (64, 1)).astype(np.uint8)  # black to white
    wide = Image.fromarray(eight.astype(np.uint16) * 257)
    assert wide.mode == "I;16"
    proc = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * channels,
                             image_std=[0.5] * channels)
    pixels = []
    for name, im in (("eight", Image.fromarray(eight)), ("wide", wide)):
        s = load_splits(_folder_of(tmp_path, name, {"x.png": im}), 1.0, 1.0)
        batch = next(iter(make_loader(s.test, proc, s, 4, channels=channels)))
        pixels.append(batch["pixel_values"])
    assert pixels[0].shape[1] == channels and pixels[0].std() > 0.5
    assert torch.equal(pixels[0], pixels[1])


def test_float_images_are_refused_before_any_work(tmp_path):
    """32-bit float pixels (a TIFF of measurements) have no fixed range to read them in: Pillow
    clipped them to 0..255 without a word. Now they are named, like any unusable image."""
    flt = Image.fromarray(np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64))
    folder = _folder_of(tmp_path, "f", {"x.tiff": flt})
    with pytest.raises(DataError, match=r"x\.tiff cannot be used \(32-bit float pixels"):
        load_splits(folder, 1.0, 1.0)
