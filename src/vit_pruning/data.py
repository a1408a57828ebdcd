"""Labelled image data: CIFAR-10/100 from the hub, any hub id or local dataset folder, and
scikit-learn's digits (offline), all as ``datasets.Dataset`` and preprocessed by the model's
own image processor.

Calibration images always come from the train split; accuracy is measured on the test split.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from .errors import exc_summary

# name -> (hub id, train split, test split, image column, label column)
KNOWN = {
    "cifar10": ("uoft-cs/cifar10", "train", "test", "img", "label"),
    "cifar100": ("uoft-cs/cifar100", "train", "test", "img", "fine_label"),
}
IMAGE_COLUMNS = ("img", "image", "images", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "fine_label", "target")
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


class DataError(ValueError):
    """Bad dataset choice (unknown name, missing column, empty split); message names the flag."""


@dataclass
class Splits:
    """A train and a test split with resolved column names and class count."""

    name: str
    train: Any  # datasets.Dataset
    test: Any
    image_column: str
    label_column: str
    num_labels: int
    label_names: list[str] | None
    skipped: list[str] = field(default_factory=list)  # unusable images left out (--skip-bad-images)
    spaced: tuple[str, ...] = ()  # splits ordered by label: sliced into evenly spaced rows, shuffled
    test_split: str = "test"  # the dataset's name of the split measured on ("test", "validation")


def _digits_split():
    """scikit-learn digits (1,797 8x8 images, 10 classes), fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # (N, 8, 8), 0..255
    idx = np.arange(len(images))
    train_idx, test_idx = train_test_split(idx, test_size=DIGITS_TEST_FRACTION,
                                           random_state=DIGITS_SPLIT_SEED, stratify=digits.target)
    return images, digits.target.astype(np.int64), np.sort(train_idx), np.sort(test_idx)


def digits_dataset():
    """The digits split as ``datasets`` objects with the CIFAR schema ("img", "label")."""
    import datasets
    from PIL import Image

    images, labels, train_idx, test_idx = _digits_split()
    features = datasets.Features({"img": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})

    def build(ix):
        return datasets.Dataset.from_dict(
            {"img": [Image.fromarray(images[i]).convert("RGB") for i in ix],
             "label": [int(labels[i]) for i in ix]}, features=features)

    return build(train_idx), build(test_idx)


SLICE_SEED = 0  # the fixed order of a split ordered by label (not --seed: the test set stays)


def _slice(ds, pct: float, labels: list):
    """The first `pct` of a split's rows, or, where the split is ordered by label (an image
    folder lists its classes one after another, as do hub datasets uploaded from one), as many
    rows evenly spaced over it, in a fixed shuffled order: a slice holds every class, and so
    does any first part of it (--eval-batches measures the first test batches). `labels`: the
    split's labels, row by row. Returns (the slice, whether it was ordered by label)."""
    n = len(ds)
    keep = min(n, max(1, int(round(n * pct))))
    if n > 1 and _ordered_by_label(labels):
        spaced = [i * n // keep for i in range(keep)]
        order = np.random.default_rng(SLICE_SEED).permutation(keep)
        return ds.select([spaced[j] for j in order]), True
    return (ds if keep == n else ds.select(range(keep))), False


def _ordered_by_label(labels: list) -> bool:
    """Whether labels run in order (non-decreasing), with more than one class."""
    try:
        return labels[0] != labels[-1] and all(a <= b for a, b in zip(labels, labels[1:]))
    except TypeError:  # labels that do not compare (None, mixed kinds): class_labels refuses them
        return False


def _pick_column(ds, given: str | None, candidates: tuple[str, ...], kind: str, flag: str) -> str:
    cols = list(ds.column_names)
    if given:
        if given not in cols:
            raise DataError(f"{flag}: column {given!r} not in the dataset (columns: {cols})")
        return given
    for c in candidates:
        if c in cols:
            return c
    raise DataError(f"{flag}: no {kind} column found among {cols}; name it with {flag}")


TEST_SPLITS = ("test", "validation")  # the split measured on where --test-split is not given
# (the first a dataset has: ImageNet's test labels are hidden, its validation split is labelled)


def _load_local(path: Path):
    """Every split of a local image folder (train/, test/ or val/, ... subfolders) or saved
    DatasetDict."""
    import datasets

    saved = (path / "dataset_dict.json").exists() or (path / "state.json").exists()
    try:
        loaded = (datasets.load_from_disk(str(path)) if saved else
                  datasets.load_dataset("imagefolder", data_dir=str(path)))
    except Exception as exc:  # no images, unreadable files, a half-written save...
        raise DataError(f"--dataset: cannot read {path} as "
                        f"{'a saved dataset' if saved else 'an image folder'} "
                        f"({exc_summary(exc)}); "
                        f"give a folder with train/ and test/ (or val/) subfolders of class folders of "
                        f"images, or one saved by datasets' save_to_disk") from exc
    if not isinstance(loaded, datasets.DatasetDict):
        raise DataError(f"--dataset: {path} holds one split; save a DatasetDict with train and test")
    return loaded


def _pick_splits(splits, test_split: str | None, where: str):
    """(train split, measured split, its name) of a DatasetDict: `test_split`, or the first of
    TEST_SPLITS it has."""
    found = list(splits)
    name = test_split or next((s for s in TEST_SPLITS if s in splits), None)
    if "train" not in splits:
        raise DataError(f"--dataset: {where} has no train split (splits: {found}); calibration "
                        f"images come from it (an image folder names it train/)")
    if name == "train":
        raise DataError("--test-split train: calibration images come from the train split; "
                        "measure on another")
    if name not in splits:
        raise DataError(f"--test-split: {where} has no {name or 'test or validation'} split "
                        f"(splits: {found}); name the one to measure on with --test-split")
    return splits["train"], splits[name], name


def load_splits(name: str, train_pct: float = 0.25, test_pct: float = 0.25,
                image_column: str | None = None, label_column: str | None = None,
                skip_bad_images: bool = False, test_split: str | None = None) -> Splits:
    """Load `name` ("cifar10", "cifar100", "digits", a local folder or a hub id), its train
    split and the one measured on (`test_split`, or the first of TEST_SPLITS it has), sliced
    (:func:`_slice`; CIFAR's rows are shuffled, so it is sliced by datasets' own split syntax, as
    the seed did); every image is checked (:func:`check_images`) before it is used."""
    import datasets

    pcts = {"train": train_pct, "test": test_pct}
    if name == "digits":
        if test_split not in (None, "test"):
            raise DataError(f"--test-split {test_split}: digits has a train and a test split")
        train, test = digits_dataset()
        test_split = "test"
    elif Path(name).exists():
        train, test, test_split = _pick_splits(_load_local(Path(name)), test_split, name)
    else:
        hub, tr, te = (KNOWN[name][:3] if name in KNOWN else (name, "train", None))
        if "/" not in hub and name not in KNOWN:
            raise DataError(f"--dataset: unknown dataset {name!r}; use cifar10, cifar100, digits, "
                            f"a local dataset folder, or a hub id like owner/name")
        pct = lambda p: f"[:{round(p * 100, 6):g}%]"  # noqa: E731
        try:  # datasets prepares every split either way; others are sliced below
            if name in KNOWN:
                test_split = test_split or te
                train = datasets.load_dataset(hub, split=f"{tr}{pct(train_pct)}")
                test = datasets.load_dataset(hub, split=f"{test_split}{pct(test_pct)}")
                pcts = {"train": 1.0, "test": 1.0}
            else:
                every = datasets.load_dataset(hub)
        except Exception as exc:  # offline, missing, private, no such split...
            raise DataError(f"--dataset: cannot load {hub!r} ({exc_summary(exc)}); without network "
                            f"use --dataset digits or a local folder") from exc
        if name not in KNOWN:
            train, test, test_split = _pick_splits(every, test_split, hub)
    if name in KNOWN:
        image_column = image_column or KNOWN[name][3]
        label_column = label_column or KNOWN[name][4]
    img = _pick_column(train, image_column, IMAGE_COLUMNS, "image", "--image-column")
    hint = ("; an image folder's labels are its class folders (train/<class>/<image>)"
            if Path(name).is_dir() and not (Path(name) / "dataset_dict.json").exists() else "")
    try:  # an image folder without class folders has no labels
        lab = _pick_column(train, label_column, LABEL_COLUMNS, "label", "--label-column")
    except DataError as exc:
        raise DataError(f"{exc}{hint}") from exc
    for split_name, ds in (("train", train), ("test", test)):
        if len(ds) == 0:
            raise DataError(f"--dataset: the {split_name} split is empty")
        if img not in ds.column_names or lab not in ds.column_names:
            raise DataError(f"--dataset: {split_name} split lacks column {img!r} or {lab!r}")
        feature = ds.features[img]
        if not (isinstance(feature, datasets.Image) or getattr(feature, "dtype", None) == "string"):
            raise DataError(f"--image-column: column {img!r} of the {split_name} split holds "
                            f"{getattr(feature, 'dtype', None) or type(feature).__name__} values, "
                            f"not images or image paths (columns: {list(ds.column_names)})")
    try:
        train, test, names = class_labels(train, test, lab)  # every row: rows are the split's
    except DataError as exc:
        raise DataError(f"{exc}{hint}") from exc
    labels = {"train": train[lab], "test": test[lab]}  # read once, as class ids
    num = len(names) if names else max(max(labels["train"]), max(labels["test"])) + 1
    (train, spaced_train), (test, spaced_test) = (_slice(train, pcts["train"], labels["train"]),
                                                  _slice(test, pcts["test"], labels["test"]))
    spaced = ("train",) * spaced_train + ("test",) * spaced_test
    skipped: list[str] = []
    if name != "digits":  # built here from arrays: nothing to check
        train, bad_train = check_images(train, img, "train", skip_bad_images)
        test, bad_test = check_images(test, img, "test", skip_bad_images)
        skipped = bad_train + bad_test
        # a column of image file paths (checked above) is read as images
        train, test = (ds if isinstance(ds.features[img], datasets.Image) else
                       ds.cast_column(img, datasets.Image()) for ds in (train, test))
    return Splits(name, train, test, img, lab, num, names, skipped, spaced, test_split)


def class_labels(train, test, column: str):
    """(train, test, class names or None) with `column` checked to hold class ids in both
    splits: ints >= 0 (or integral floats) below the ClassLabel's count where it has one, or
    class names (strings), which are encoded by their sorted union so both splits share the
    ids. Unlabelled rows (-1 or None, as hub test splits often have), fractional or other
    values raise a DataError naming the split and row: top-1 would silently count them wrong."""
    import datasets
    feature = train.features.get(column)
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    values = {"train": train[column], "test": test[column]}
    if names is None and all(isinstance(v, str) for vs in values.values() for v in vs):
        names = sorted({v for vs in values.values() for v in vs})
        labels = datasets.ClassLabel(names=names)
        return (train.cast_column(column, labels), test.cast_column(column, labels), names)
    for split, vs in values.items():
        bad = [(i, v) for i, v in enumerate(vs) if not _is_class_id(v, len(names) if names else None)]
        if bad:
            i, v = bad[0]
            kind = ("unlabelled" if v is None or v == -1 else
                    f"not one of the {len(names)} class ids" if names and _is_class_id(v, None)
                    else "not a class id")
            shown = repr(v) if v is None or isinstance(v, (str, int, float)) else (
                f"a {type(v).__name__}")
            raise DataError(f"--label-column: the {split} split's {column!r} is {shown} in row {i} "
                            f"({kind}){f' and {len(bad) - 1} more rows' if len(bad) > 1 else ''}; "
                            f"top-1 needs every row labelled with an integer class id >= 0 or a "
                            f"class name: measure on a labelled split (--test-split) or name "
                            f"another --label-column")
    if names is None and any(isinstance(v, float) for vs in values.values() for v in vs):
        train, test = (ds.cast_column(column, datasets.Value("int64")) for ds in (train, test))
    return train, test, names


def align_to_head(splits: Splits, id2label: dict) -> tuple[Splits, str | None]:
    """`splits` measured against a classifier head whose classes are named by `id2label`: where
    the dataset's class names are the head's in another order (compared lowercased and
    stripped, as datasets' align_labels_with_mapping does), its labels renumbered to the head's
    ids; where the names differ, unchanged with a warning to give. Unchanged and silent where
    either side has no names (transformers' placeholder LABEL_i). Returns (splits, message)."""
    names = splits.label_names
    head = [str(id2label[i]) for i in sorted(id2label)] if id2label else []
    if not names or not head or all(re.fullmatch(r"LABEL_\d+", n) for n in head):
        return splits, None
    ours, theirs = ([n.strip().lower() for n in ns] for ns in (names, head))
    if ours == theirs:
        return splits, None
    if sorted(ours) == sorted(theirs) and len(set(ours)) == len(ours):
        ids = [theirs.index(n) for n in ours]
        moved = next(i for i, j in enumerate(ids) if i != j)
        train, test = (_renumber(ds, splits.label_column, ids, head) for ds in (splits.train, splits.test))
        return (replace(splits, train=train, test=test, label_names=head),
                f"--dataset's classes are the model head's in another order: labels renumbered to "
                f"the head's ids (e.g. {names[moved]!r}: {moved} -> {ids[moved]})")
    missing = [n for n, o in zip(names, ours) if o not in set(theirs)][:3]
    return splits, (f"--dataset's class names are not the model head's ({missing} are not among its "
                    f"{len(head)}: {head[:4]}{' ...' if len(head) > 4 else ''}): top-1 compares "
                    f"class ids as they are; add --replace-classifier or --use-adapter if the "
                    f"classes differ")


def _renumber(ds, column: str, ids: list[int], names: list[str]):
    """`ds` with label `i` of `column` replaced by `ids[i]`, named by `names` (in memory: a
    dataset loaded from a user's folder gets no cache file written beside it)."""
    import datasets
    values = [ids[v] for v in ds[column]]
    out = ds.remove_columns(column).add_column(column, values)
    return out.cast_column(column, datasets.ClassLabel(names=names))


def _is_class_id(value, count: int | None) -> bool:
    """Whether a label value is a class id: an int (not a bool) or integral float >= 0, below
    `count` where given."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return float(value).is_integer() and 0 <= value < (count if count is not None else float("inf"))


MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold


def _image_problem(value) -> str | None:
    """Why one undecoded dataset image cannot be used (None if it can): unreadable, not an
    image, truncated, or larger than MAX_PIXELS. Decodes PNGs' checksums only and JPEGs at
    reduced size, so a whole split is checked in seconds."""
    import io
    import warnings

    from PIL import Image
    if isinstance(value, Image.Image):
        return _mode_problem(value.mode)
    data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (None, value)
    try:
        source = io.BytesIO(data) if data is not None else path
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    return f"{w}x{h} pixels, over the limit of {MAX_PIXELS:,}"
                if (problem := _mode_problem(im.mode)) is not None:
                    return problem
                if im.format == "PNG":
                    im.verify()
                else:
                    im.draft("RGB", (64, 64))
                    im.load()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        return f"too large ({str(exc).split('.')[0]})"
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for bad files
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else 'unreadable'}"
    return None


def check_images(ds, image_column: str, split: str, skip: bool):
    """Check every image of a split before any work: returns (the split, the names of the
    images dropped). An unusable image raises DataError naming it, or with `skip` is dropped
    (and named)."""
    import datasets
    feature = ds.features.get(image_column)
    raw = ds.cast_column(image_column, datasets.Image(decode=False)) \
        if isinstance(feature, datasets.Image) else ds
    bad: list[tuple[int, str, str]] = []
    for i, value in enumerate(raw[image_column]):
        problem = _image_problem(value)
        if problem is not None:
            name = (value.get("path") or f"row {i}") if isinstance(value, dict) else f"row {i}"
            bad.append((i, f"{split}: {name}", problem))
    if not bad:
        return ds, []
    if not skip:
        i, name, problem = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"--dataset: image {name} cannot be used ({problem}){more}; fix or remove "
                        f"it, or pass --skip-bad-images to leave such images out")
    drop = {i for i, _, _ in bad}
    kept = ds.select([i for i in range(len(ds)) if i not in drop])
    if len(kept) == 0:
        raise DataError(f"--dataset: every image of the {split} split is unusable ({bad[0][2]})")
    return kept, [f"{name} ({problem})" for _, name, problem in bad]


IMAGE_MODES = {1: "L", 3: "RGB"}  # a model's input channels -> the PIL mode images are read in
WIDE_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grayscale (older Pillow opens a
# 16-bit PNG as I): read at their bit depth, 0..65535 -> 0..255


def read_image(image, mode: str):
    """`image` in `mode` ("L" or "RGB"). 16-bit grayscale (medical, microscopy, depth images) is
    first scaled to 8 bits by its bit depth: Pillow's convert clips every value above 255, so
    a 16-bit PNG would come out white."""
    from PIL import Image
    if image.mode in WIDE_GRAY:
        eight = np.clip(np.rint(np.asarray(image, dtype=np.float64) / 257), 0, 255)
        image = Image.fromarray(eight.astype(np.uint8))
    return image.convert(mode)


def _mode_problem(mode: str) -> str | None:
    """Why an image of PIL mode `mode` cannot be read as a picture (None if it can)."""
    if mode == "F":
        return ("32-bit float pixels (mode F): no fixed range reads them as an 8-bit image; save "
                "them as 8- or 16-bit integers")
    return None


def image_mode(channels: int) -> str:
    """The PIL mode a model of `channels` input channels reads images in (grayscale or RGB),
    or a DataError for a count no image file gives."""
    if channels not in IMAGE_MODES:
        raise DataError(f"the model takes {channels} input channels; images are read as "
                        f"grayscale (1 channel) or RGB (3)")
    return IMAGE_MODES[channels]


class ImageCollator:
    """Batch of dataset rows -> {"pixel_values", "labels"} through the model's image processor,
    each image read in `mode` first (grayscale for a one-channel model, else RGB)."""

    def __init__(self, processor, image_column: str, label_column: str, mode: str = "RGB"):
        self.processor = processor
        self.image_column = image_column
        self.label_column = label_column
        self.mode = mode

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        images = [read_image(r[self.image_column], self.mode) for r in rows]
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        labels = torch.tensor([int(r[self.label_column]) for r in rows], dtype=torch.long)
        return {"pixel_values": pixels, "labels": labels}


def make_loader(ds, processor, splits: Splits, batch_size: int, shuffle: bool = False,
                seed: int = 0, workers: int = 0, channels: int = 3) -> DataLoader:
    """A deterministic DataLoader (shuffling driven by `seed`) of images read for a model of
    `channels` input channels."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen,
                      collate_fn=ImageCollator(processor, splits.image_column, splits.label_column,
                                               image_mode(channels)),
                      num_workers=workers)


def calibration_subset(train, size: int, seed: int):
    """`size` train rows chosen by `seed` (never test rows), and their indices."""
    n = len(train)
    size = min(size, n)
    idx = sorted(np.random.default_rng(seed).choice(n, size=size, replace=False).tolist())
    return train.select(idx), idx


def fingerprint(pixel_batches: list[torch.Tensor]) -> str:
    """SHA-256 of the exact preprocessed calibration tensors (first 16 hex digits)."""
    h = hashlib.sha256()
    for x in pixel_batches:
        h.update(x.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def default_workers() -> int:
    """DataLoader workers that fit the machine (0 on 2 cores: decoding is cheap next to the model)."""
    import os
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(4, cores // 2)
