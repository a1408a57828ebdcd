"""What a run calibrates and measures on: the labelled splits and the head, calibration and
distillation inputs, the head fine-tune, the evaluation batches (images or sentences)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import DISTILL_AUGMENT, DISTILL_IMAGES, DISTILL_SENTENCES, RunConfig
from ..errors import UsageError
from .choices import Choices
from .loading import Loaded, check_finite

log = logging.getLogger("vit_pruning")


@dataclass
class Data:
    """Everything measured or calibrated on, prepared before the baseline."""

    dataset: str | None
    splits: Any = None
    train_loader: Any = None
    calib_inputs: list | None = None
    calib_info: dict = field(default_factory=dict)
    head_cfg: dict = field(default_factory=dict)
    has_head: bool = False
    ft_lr: float = 1e-3
    eval_batches: list = field(default_factory=list)  # text: tokenized sentence batches
    eval_pixels: list = field(default_factory=list)
    distill_inputs: list = field(default_factory=list)  # unlabeled batches, host memory
    distill_checks: list | None = None  # where distillation checks itself (None: 10% held out)
    distill_augmented: int = 0  # of the distillation sentences, variants of calibration sentences
    eval_labels: Any = None
    seq_len: int | None = None
    accuracy_note: str = ""
    text_repeats: int = 0  # repeated --text-file lines dropped before the split
    text_cut: int = 0  # evaluation sentences longer than text.MAX_LENGTH tokens (cut)


def data_step(cfg: RunConfig, loaded: Loaded, ch: Choices) -> Data:
    """Dataset and head, calibration (and distillation) inputs, the head fine-tune, and the
    evaluation batches, all on the run's device."""
    data = Data(dataset=run_dataset(cfg, loaded), calib_info={
        "dataset": None, "split": None, "count": 0, "fingerprint": None, "seed": cfg.seed})
    head_step(cfg, loaded, ch, data)
    test_loader = (text_inputs if loaded.text else image_inputs)(cfg, loaded, ch, data)
    data.ft_lr = cfg.head.ft_lr or (1e-3 if cfg.head.freeze_backbone else 1e-4)
    if cfg.head.do_finetune:
        from ..heads import finetune
        h = cfg.head
        log.info("fine-tuning the head on the unpruned model (%d epoch(s), lr %g)", h.ft_epochs,
                 data.ft_lr)
        finetune(loaded.model, data.train_loader, h.ft_epochs, data.ft_lr, h.freeze_backbone,
                 ch.device, not cfg.output.quiet, ch.mixed_precision, cfg.recovery.grad_accumulation)
    loaded.model.eval()
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    if cfg.head.do_finetune or cfg.head.load_adapter:
        check_finite(loaded.model, "--do-finetune" if cfg.head.do_finetune else "--load-adapter")
    evaluation_batches(cfg, loaded, ch, data, test_loader)
    return data


def run_dataset(cfg: RunConfig, loaded: Loaded) -> str | None:
    """What the run reads: a text encoder's sentences (--text-file, else the built-in text);
    for an image model --dataset, CIFAR-10 with --load-cifar, digits for the embedded model,
    else none."""
    from ..text import PYTHON_DOCS
    if loaded.text:
        return cfg.data.text_file or PYTHON_DOCS
    return cfg.data.dataset or ("cifar10" if cfg.data.load_cifar else
                                ("digits" if cfg.model == "embedded" else None))


def check_image_processor(loaded: Loaded) -> None:
    """The model's image processor against the model, before any image is read: one blank
    image of the model's channels through both (:func:`vit_pruning.app.loading.check_processor`)."""
    from ..anatomy import input_channels
    from ..data import DataError, image_mode
    from .loading import check_processor
    try:
        mode = image_mode(input_channels(loaded.model))  # images can be read for its channels
    except DataError as exc:
        raise _data_error(exc) from exc
    check_processor(loaded.model, loaded.processor, loaded.model_id, mode)


def _data_error(exc: Exception) -> UsageError:
    """A data problem as the one-line error: its own flag where it names one, else --model."""
    return UsageError(str(exc) if str(exc).startswith("--") else f"--model: {exc}")


def head_step(cfg: RunConfig, loaded: Loaded, ch: Choices, data: Data) -> None:
    """Load the labelled splits; install a fresh head, an adapter or a saved one; refuse flags
    that need what the run does not have."""
    from ..anatomy import resolve
    from ..data import DataError, align_to_head, load_splits
    from ..heads import AdapterFileError, build_head, head_in_features, install_head, load_adapter
    model = loaded.model
    if data.dataset and not loaded.text:
        check_image_processor(loaded)
        try:
            data.splits = load_splits(data.dataset, cfg.data.cifar_train_pct, cfg.data.cifar_test_pct,
                                      cfg.data.image_column, cfg.data.label_column,
                                      cfg.data.skip_bad_images, cfg.data.test_split)
            for name in data.splits.skipped:
                log.warning("--skip-bad-images: left out %s", name)
        except DataError as exc:
            raise _data_error(exc) from exc
    splits = data.splits
    data.head_cfg = {"kind": None, "adapter_reduction": cfg.head.adapter_reduction}
    if cfg.head.replace_classifier or cfg.head.use_adapter:
        if splits is None:
            raise UsageError("--replace-classifier/--use-adapter need labelled data: add --dataset "
                             "or --load-cifar")
        kind = "adapter" if cfg.head.use_adapter else "linear"
        install_head(model, build_head(kind, head_in_features(model), splits.num_labels,
                                       cfg.head.adapter_reduction).to(ch.device), splits.label_names)
        data.head_cfg["kind"] = kind
    elif cfg.head.load_adapter:
        try:
            payload = load_adapter(model, cfg.head.load_adapter, splits.num_labels if splits else None,
                                   splits.label_names if splits else None)
        except AdapterFileError as exc:
            raise UsageError(str(exc)) from exc
        model.to(ch.device)
        data.head_cfg["kind"] = payload["classifier_type"]
    data.has_head = resolve(model).has_classifier
    if splits is not None and data.has_head and model.config.num_labels != splits.num_labels:
        raise UsageError(f"--dataset {data.dataset} has {splits.num_labels} classes but the model's head "
                         f"has {model.config.num_labels}: add --replace-classifier or --use-adapter")
    if splits is not None and data.has_head and (data.head_cfg["kind"] is None  # its own head
                                                 or cfg.head.load_adapter):  # or a trained one
        data.splits, message = align_to_head(splits, model.config.id2label)
        if message:
            (log.info if data.splits is not splits else log.warning)(message)
    if cfg.recovery.distill_steps and splits is None and not loaded.text:
        raise UsageError("--distill-steps needs unlabeled images: add --dataset or --load-cifar")
    if cfg.head.do_finetune and splits is None:
        raise UsageError("--do-finetune needs labelled data: add --dataset or --load-cifar")
    if cfg.head.recover and (splits is None or not data.has_head):
        raise UsageError("--recover needs labelled data and a classifier head: add --dataset or "
                         "--load-cifar")
    if cfg.head.save_adapter and data.head_cfg["kind"] is None:
        raise UsageError("--save-adapter needs a head: add --replace-classifier, --use-adapter or "
                         "--load-adapter")


def image_inputs(cfg: RunConfig, loaded: Loaded, ch: Choices, data: Data):
    """Train/test loaders, calibration images (device) and distillation images (host); returns
    the test loader (None without a dataset)."""
    from ..anatomy import input_channels
    from ..batches import take_inputs
    from ..data import calibration_subset, default_workers, fingerprint, make_loader
    splits = data.splits
    if splits is None:
        return None
    workers, channels = default_workers(), input_channels(loaded.model)
    data.train_loader = make_loader(splits.train, loaded.processor, splits, cfg.data.batch_size, True,
                                    cfg.seed, workers, channels)
    from ..calibration import split_batches
    data.calib_inputs = split_batches(splits, loaded.processor, ch.calib_size, cfg.data.batch_size,
                                      cfg.seed, ch.device, channels)
    count = sum(len(b) for b in data.calib_inputs)
    data.calib_info = {"dataset": data.dataset, "count": count, "seed": cfg.seed,
                       "split": (f"train[:{cfg.data.cifar_train_pct * 100:g}%]"
                                 if "train" not in splits.spaced else
                                 f"train, {cfg.data.cifar_train_pct * 100:g}% of its rows evenly "
                                 f"spaced and shuffled (it is ordered by label)") + f" (random {count})",
                       "fingerprint": fingerprint(data.calib_inputs)}
    if count < ch.calib_size:  # the train slice holds fewer: said, never silently fewer
        data.calib_info["asked"] = ch.calib_size
        log.warning("calibrating on %d train images, not the %d of --calib-size%s: the train "
                    "slice (--cifar-train-pct %g) holds no more; raise --cifar-train-pct for more",
                    count, ch.calib_size, "" if cfg.data.calib_size else " (default)",
                    cfg.data.cifar_train_pct)
    if cfg.recovery.distill_steps:
        size = min(cfg.recovery.distill_size or DISTILL_IMAGES, len(splits.train))
        pool, _ = calibration_subset(splits.train, size, cfg.seed + 1)
        data.distill_inputs = take_inputs(make_loader(pool, loaded.processor, splits, 256,
                                                      channels=channels), None, "cpu")
    return make_loader(splits.test, loaded.processor, splits, cfg.data.batch_size, False, cfg.seed,
                       workers, channels)


def text_inputs(cfg: RunConfig, loaded: Loaded, ch: Choices, data: Data):
    """Calibration sentences (device), distillation sentences (host: neither calibration nor
    evaluation, plus --distill-augment variants of the calibration sentences); returns the
    tokenized evaluation sentences."""
    import random

    from ..batches import take_inputs
    from ..data import fingerprint
    from ..text import augment_sentences, python_docstring_sentences, tokenize
    sentences, data.text_repeats = all_sentences(cfg)
    split = load_text(cfg, ch.calib_size, sentences)
    if cfg.recovery.distill_steps:
        used = set(split.calibration) | set(split.evaluation)
        rest = [t for t in sentences if t not in used]
        if not cfg.data.text_file and rest:  # train on the standard library's docstrings, check on the
            # topic sentences neither pruning nor evaluation uses (drawn like the evaluation ones)
            data.distill_checks = tokenize(loaded.processor, rest, cfg.data.batch_size)
            rest = list(python_docstring_sentences())
        size = cfg.recovery.distill_size if cfg.recovery.distill_size is not None else DISTILL_SENTENCES
        if cfg.recovery.distill_size is not None or len(rest) > size:  # never more than allowed
            rest = random.Random(cfg.seed).sample(rest, size)
        if not rest:
            raise UsageError("--distill-steps: every sentence is used for calibration or evaluation; "
                             "give a longer --text-file or lower --calib-size/--eval-batches")
        asked = cfg.recovery.distill_augment
        copies = DISTILL_AUGMENT if asked is None else asked
        variants = augment_sentences(split.calibration, copies, cfg.seed, exclude=split.evaluation)
        data.distill_augmented = len(variants)
        data.distill_inputs = tokenize(loaded.processor, [*rest, *variants], 256, by_length=True)
    data.calib_inputs = take_inputs(tokenize(loaded.processor, split.calibration, cfg.data.batch_size),
                                    None, ch.device)
    data.calib_info = {"dataset": data.dataset, "count": len(split.calibration), "seed": cfg.seed,
                       "split": f"sentences not used for evaluation (random {len(split.calibration)})",
                       "fingerprint": fingerprint(data.calib_inputs),
                       "repeated_lines_dropped": data.text_repeats,
                       "cut_to_max_length": cut_sentences(loaded.processor, split.calibration)}
    data.text_cut = cut_sentences(loaded.processor, split.evaluation)
    return tokenize(loaded.processor, split.evaluation, cfg.data.batch_size)


def cut_sentences(tokenizer, sentences: list[str]) -> int:
    """How many of `sentences` are longer than text.MAX_LENGTH tokens (and so cut)."""
    from ..text import MAX_LENGTH
    return sum(len(ids) > MAX_LENGTH for ids in tokenizer(list(sentences))["input_ids"])


def evaluation_batches(cfg: RunConfig, loaded: Loaded, ch: Choices, data: Data,
                       test_loader) -> None:
    """The first --eval-batches test batches (on the device), and what accuracy means here."""
    from ..batches import batch_labels, batch_pixels, iter_limited
    data.eval_batches = list(iter_limited(test_loader, cfg.data.eval_batches)) if test_loader else []
    if loaded.text:
        lengths = torch.cat([b["attention_mask"].sum(1) for b in data.eval_batches])
        # FLOPs and latency at the mean length
        data.seq_len = max(1, round(float(lengths.double().mean())))
        from ..text import MAX_LENGTH, PYTHON_DOCS
        n = sum(len(b["input_ids"]) for b in data.eval_batches)
        data.accuracy_note = (
            f"not applicable (text encoder): fidelity is the cosine of "
            f"{getattr(loaded.model.config, 'sentence_pooling', None) or 'mean'}-pooled sentence embeddings "
            f"to the unpruned model's and nearest-neighbour agreement, on {n} evaluation sentences "
            f"from {data.dataset}" + (
                " (Python's documentation: fidelity on that text; it is lower on text of other "
                "domains, so pass your own sentences with --text-file for a number that holds on "
                "your data)" if data.dataset == PYTHON_DOCS else
                " (never used for calibration or distillation)")
            + (f"; {data.text_repeats} repeated lines of the file were dropped first"
               if data.text_repeats else "")
            + (f"; {data.text_cut} of them longer than {MAX_LENGTH} tokens were cut to {MAX_LENGTH}"
               if data.text_cut else "")
            + f"; FLOPs and latency at {data.seq_len} tokens (the mean tokenized length of the "
              f"evaluation sentences, each cut at {MAX_LENGTH})")
        return
    data.eval_pixels = [batch_pixels(b).to(ch.device) for b in data.eval_batches]
    if data.eval_batches:
        data.eval_labels = torch.cat([batch_labels(b) for b in data.eval_batches]).to(ch.device)
    data.accuracy_note = (
        f"top-1 on the first {cfg.data.eval_batches} {data.splits.test_split} batches of {data.dataset} "
        f"({sum(len(x) for x in data.eval_pixels)} images)" if data.eval_pixels and data.has_head
        else "not applicable (no labelled data or headless model)")


def all_sentences(cfg: RunConfig) -> tuple[tuple[str, ...], int]:
    """Every distinct sentence of --text-file (or of Python's documentation), and how many
    repeated lines were dropped."""
    from ..text import python_doc_sentences, read_sentences_counted
    if not cfg.data.text_file:
        return python_doc_sentences(), 0
    try:
        sentences, repeats = read_sentences_counted(cfg.data.text_file)
    except UnicodeDecodeError as exc:
        raise UsageError(f"--text-file: {cfg.data.text_file} is not UTF-8 text (byte "
                         f"{exc.start})") from exc
    except ValueError as exc:
        raise UsageError(f"--text-file: {exc}") from exc
    except OSError as exc:
        raise UsageError(f"--text-file: cannot read {cfg.data.text_file} "
                         f"({exc.strerror or type(exc).__name__})") from exc
    if not sentences:
        raise UsageError(f"--text-file: {cfg.data.text_file} holds no sentences (no non-empty line)")
    return sentences, repeats


def load_text(cfg: RunConfig, calib_size: int, sentences: tuple[str, ...]):
    """Calibration and evaluation sentences for a text encoder (--text-file or Python's docs)."""
    from ..text import split_sentences
    n_eval = cfg.data.eval_batches * cfg.data.batch_size
    try:
        return split_sentences(sentences, calib_size, n_eval, cfg.seed)
    except ValueError as exc:
        raise UsageError(f"--calib-size/--eval-batches: {exc} ({len(sentences)} distinct sentences "
                         f"in {cfg.data.text_file or 'the default text'})") from exc


def check_budget(cfg: RunConfig, loaded: Loaded, data: Data) -> None:
    """A budget needs what it is measured on: labels and a head, logits, or outputs to compare."""
    budget = cfg.budget
    if budget is None:
        return
    name = budget[0]
    if name == "max_accuracy_drop" and (data.eval_labels is None or not data.has_head):
        raise UsageError("--max-accuracy-drop needs labelled data and a classifier head: add "
                         "--dataset (or --load-cifar), or use --max-kl / --min-cosine")
    if name == "max_kl" and (loaded.text or not data.has_head):
        raise UsageError("--max-kl needs a model with logits (a classifier head); for a backbone "
                         "or text encoder use --min-cosine")
    if name == "max_kl" and not data.eval_pixels:
        raise UsageError("--max-kl needs evaluation images: add --dataset (labels are not used)")
    if name == "min_cosine" and not loaded.text and data.has_head:
        raise UsageError("--min-cosine is for backbones and text encoders; a classifier is "
                         "judged by --max-kl or --max-accuracy-drop")
    if name == "min_cosine" and not loaded.text and not data.eval_pixels:
        raise UsageError("--min-cosine needs evaluation images: add --dataset (labels are not used)")
