"""vit-2ssp: prune a Hugging Face ViT to one global sparsity target with 2SSP and report it.

Examples:
  # offline, on the embedded digits ViT (a minute or two on a laptop CPU)
  vit-2ssp --model embedded --dataset digits --target 0.3 --do-finetune --freeze-backbone
  # the seed's recipe on CIFAR-10 (needs network for the hub model and dataset)
  vit-2ssp --target 0.143 --load-cifar --cifar-train-pct 0.02 --cifar-test-pct 0.05 \\
      --replace-classifier --do-finetune --freeze-backbone --save-adapter
  # look before you prune: print the plan, write nothing
  vit-2ssp --model embedded --target 0.5 --dry-run
  # a BERT-family text encoder (e.g. a sentence-transformers folder): fidelity of the sentence
  # embeddings instead of accuracy, on --text-file or Python's own documentation (offline)
  vit-2ssp --model path/to/all-MiniLM-L6-v2 --target 0.1 --calib-size 512

Outputs: experiments/vit_pruning/reports/report-<run_id>.{json,md,png}; with --save-adapter
experiments/vit_pruning/artifacts/<run_id>/adapter.pt; with --save-pruned-model
<pruned-output-dir>/<run_id>/ (reload with vit_pruning.load_pruned_model).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import errno
import logging
import signal
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .accel import PRECISIONS
from .distillation import MATCHES, TRAINABLE

log = logging.getLogger("vit_pruning")

DEFAULT_MODEL = "google/vit-base-patch16-224"
EMBEDDED = Path(__file__).resolve().parent / "embedded" / "vit-tiny-digits"
IMAGE_CALIB, TEXT_CALIB = 64, 512  # default calibration images / sentences
DISTILL_LR, DISTILL_TRAIN = 1e-3, "blocks"  # what the distillation table rewarded
DISTILL_MATCH = "layers"  # every kept block's hidden states too (the table rewarded it)
DISTILL_IMAGES = 2048  # default unlabeled train images for distillation
DISTILL_AUGMENT = 32  # default variants of each calibration sentence a text encoder distills on
DISTILL_SENTENCES = 50_000  # default bound on distillation sentences held (--distill-size)


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="vit-2ssp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("what to prune")
    g.add_argument("--target", default=None,
                   help="global parameter sparsity in (0, 1): fraction of ALL model parameters to "
                        "remove; a comma list (0.1,0.2,0.3) prunes the unpruned model to each, "
                        "sharing every step that does not depend on the target, and reports the "
                        "trade-off")
    g.add_argument("--target-flops", default=None, metavar="R",
                   help="keep a fraction R in (0, 1) of the model's FLOPs per forward instead of a "
                        "parameter target (a comma list prunes to each); depth and width are "
                        "traded by their FLOPs")
    g.add_argument("--target-latency", default=None, metavar="R",
                   help="keep a fraction R in (0, 1) of the model's latency on --device at "
                        "--latency-dtype and --latency-batch-size (a comma list prunes to each): "
                        "a latency model is measured there first (seconds; cached, see "
                        "--latency-cache) and the structure planned on it")
    b = ap.add_argument_group("budgets instead of a target: the largest target that keeps one")
    b.add_argument("--max-accuracy-drop", type=float, default=None, metavar="P",
                   help="top-1 percentage points the pruned model may lose against the baseline "
                        "(needs labelled data)")
    b.add_argument("--max-kl", type=float, default=None, metavar="X",
                   help="largest mean KL of the logits to the unpruned model's (classifiers, "
                        "label-free)")
    b.add_argument("--min-cosine", type=float, default=None, metavar="X",
                   help="smallest mean cosine of the outputs to the unpruned model's, in (0, 1] "
                        "(backbones and text encoders, label-free)")
    b.add_argument("--target-resolution", type=float, default=0.01, metavar="R",
                   help="grid of the budget search: targets R, 2R, ... up to the largest feasible "
                        "(default 0.01); bisection prunes about log2(grid size) + 1 times")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"hub id, local model folder, or 'embedded' (offline digits ViT); default {DEFAULT_MODEL}")
    g.add_argument("--stage", choices=("both", "s1", "s2"), default="both",
                   help="both stages (default), s1 = width only, s2 = depth only (nearest count, not exact)")
    g.add_argument("--depth-unit", choices=("block", "attention", "auto"), default="block",
                   help="stage 2 removes whole blocks (default), only attention sublayers (2SSP "
                        "paper), or auto: try both on calibration data and keep the better")
    g.add_argument("--no-mixed-depth", action="store_true",
                   help="with --target-latency: a target between two counts of whole blocks is "
                        "met by one block more, not by removing attention sublayers of kept "
                        "blocks too (the default)")
    g.add_argument("--min-remaining", type=int, default=None,
                   help="fewest MLP neurons left in a block (default: the seed's 512 where the MLP is wider "
                        "than 512, else width/4)")
    g.add_argument("--split", default="auto",
                   help="width/depth split: auto (search with data, alpha without), search, alpha, or a depth count")
    g.add_argument("--allocation", choices=("uniform", "global"), default="uniform",
                   help="neurons per block: uniform (default) or the globally least important")
    g.add_argument("--compensation", choices=("lsq", "bias", "none"), default="lsq",
                   help="after removing neurons refit fc2 by least squares (default), fold the bias, or nothing")
    g.add_argument("--neuron-selection", choices=("auto", "score", "lsq"), default="auto",
                   help="which MLP neurons go: the 2SSP activation score, the least-squares cost "
                        "given the refit, or auto (default): both tried on held-out calibration "
                        "images, the better kept")
    g.add_argument("--depth-method", choices=("greedy", "bi"), default="greedy",
                   help="greedy by output fidelity (default) or one-shot Block Influence")
    g.add_argument("--align", default="auto",
                   help="kept MLP widths are multiples of N, as GPU tensor cores need (bf16 runs 5x "
                        "slower at widths not a multiple of 8); auto (default): 8, halved on small "
                        "models until half a group of neurons is <= 0.1 pp of the parameters; 1 = "
                        "exact to one neuron")
    g.add_argument("--width-policy", choices=("auto", "uniform", "per-block"), default="auto",
                   help="uniform: one MLP width for every surviving block (the saved model is a plain "
                        "transformers model); per-block: widths as even as the target allows; auto "
                        "(default): uniform when --align > 1 and it misses the target by <= 0.1 pp")
    d = ap.add_argument_group("data")
    d.add_argument("--load-cifar", action="store_true", help="evaluate on CIFAR-10 (same as --dataset cifar10)")
    d.add_argument("--dataset", default=None,
                   help="cifar10, cifar100, digits (offline), a hub id or a local dataset folder "
                        "(load_from_disk or imagefolder with train/ and test/); default: digits for "
                        "--model embedded, none otherwise")
    d.add_argument("--image-column", default=None, help="image column name when not obvious")
    d.add_argument("--label-column", default=None, help="label column name when not obvious")
    d.add_argument("--cifar-train-pct", type=float, default=0.25, help="fraction of the train split in (0, 1] (default 0.25)")
    d.add_argument("--cifar-test-pct", type=float, default=0.25, help="fraction of the test split in (0, 1] (default 0.25)")
    d.add_argument("--skip-bad-images", action="store_true",
                   help="leave out images that cannot be read (corrupt, truncated, not images, over "
                        "89 million pixels), named in the report; default: refuse the dataset "
                        "before any work, naming the first such image")
    d.add_argument("--calib-size", type=int, default=None,
                   help="calibration images from the train split (default 64), or sentences for a text "
                        "encoder (default 512)")
    d.add_argument("--batch-size", type=int, default=32, help="batch size for evaluation, calibration, fine-tuning (32)")
    d.add_argument("--eval-batches", type=int, default=5,
                   help="test batches used for accuracy, or of evaluation sentences (default 5)")
    d.add_argument("--text-file", default=None, metavar="PATH",
                   help="text encoders: UTF-8 file, one sentence per line, split into disjoint "
                        "calibration and evaluation sentences (default: Python's documentation, offline)")
    h = ap.add_argument_group("head")
    h.add_argument("--replace-classifier", action="store_true", help="fresh linear head for the dataset's classes")
    h.add_argument("--use-adapter", action="store_true", help="bottleneck adapter + head instead")
    h.add_argument("--adapter-reduction", type=int, default=4, help="adapter bottleneck = hidden / reduction (4)")
    h.add_argument("--load-adapter", default=None, metavar="PATH", help="install a head saved by --save-adapter")
    h.add_argument("--do-finetune", action="store_true", help="train the head before measuring the baseline")
    h.add_argument("--freeze-backbone", action="store_true", help="fine-tune only the head/adapter")
    h.add_argument("--ft-epochs", type=int, default=1, help="fine-tuning epochs (1)")
    h.add_argument("--ft-lr", type=float, default=None, help="fine-tuning learning rate (1e-3 head only, 1e-4 full)")
    h.add_argument("--recover", action="store_true", help="re-tune the head after pruning; reported as stage 'recovered'")
    h.add_argument("--save-adapter", action="store_true", help="write artifacts/<run_id>/adapter.pt")
    r = ap.add_argument_group("recovery by distillation (label-free)")
    r.add_argument("--distill-steps", type=int, default=0,
                   help="train the pruned model to reproduce the unpruned one on unlabeled inputs for N "
                        "steps (0 = off, default); reported as stage 'distilled'")
    r.add_argument("--distill-lr", type=float, default=DISTILL_LR, help=f"learning rate ({DISTILL_LR:g})")
    r.add_argument("--distill-batch-size", type=int, default=32, help="inputs per step (32)")
    r.add_argument("--distill-train", choices=TRAINABLE, default=DISTILL_TRAIN,
                   help=f"which parameters learn: all, every block (attention, MLP, LayerNorms), the "
                        f"blocks' MLPs, the LayerNorms, or the fc2s (default {DISTILL_TRAIN}: what the "
                        f"benchmarks rewarded)")
    r.add_argument("--distill-match", choices=("auto", *MATCHES), default="auto",
                   help=f"what the student learns: the output fidelity is measured on (logits, "
                        f"embedding); for a text encoder every token's final hidden state and their "
                        f"mean (tokens); or that and every kept block's hidden states, each against "
                        f"the teacher block whose place it takes (layers; a text encoder's every "
                        f"token). auto: {DISTILL_MATCH}")
    r.add_argument("--distill-temperature", type=float, default=2.0,
                   help="softmax temperature of the KL for classifiers (2)")
    r.add_argument("--distill-size", type=int, default=None,
                   help="unlabeled inputs distilled on: train-split images drawn by --seed (default "
                        "2048, held in host memory), or sentences for a text encoder (default: every "
                        "--text-file sentence that is neither calibration nor evaluation, at most "
                        f"{DISTILL_SENTENCES:,} drawn by --seed; with Python's docs, the standard "
                        "library's docstrings)")
    r.add_argument("--distill-augment", type=int, default=None, metavar="K",
                   help=f"text encoders: also distill on K word-level variants of every calibration "
                        f"sentence (words dropped, cropped, replaced or spliced; the teacher labels "
                        f"them), in-domain inputs the sentence pool lacks (default {DISTILL_AUGMENT}: "
                        f"what the distillation table rewarded; 0 = off)")
    r.add_argument("--mixed-precision", choices=PRECISIONS, default="auto",
                   help="precision of distillation and head fine-tuning steps (accelerate): auto = "
                        "bf16 on a CUDA device that runs it, no (float32) on the CPU")
    r.add_argument("--grad-accumulation", type=int, default=1, metavar="N",
                   help="micro-batches of --distill-batch-size accumulated per optimizer step (1)")
    r.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="write the distillation's state every N steps, atomically, to "
                        "<artifacts-dir>/<run-id>/checkpoint (0 = never); --resume goes on from it")
    r.add_argument("--resume", action="store_true",
                   help="go on from the checkpoint of --run-id: skips pruning, loads the student, "
                        "optimizer, schedule and draw state, and distills the remaining steps")
    o = ap.add_argument_group("output and run")
    o.add_argument("--save-pruned-model", action="store_true", help="save the pruned model (off by default)")
    o.add_argument("--pruned-output-dir", default="experiments/vit_pruning/pruned_models")
    o.add_argument("--reports-dir", default="experiments/vit_pruning/reports")
    o.add_argument("--artifacts-dir", default="experiments/vit_pruning/artifacts")
    o.add_argument("--run-id", default=None, help="name of this run (default: UTC timestamp)")
    o.add_argument("--seed", type=int, default=0, help="seed for calibration choice, heads and shuffling (0)")
    o.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:1 ...")
    o.add_argument("--export-onnx", action="store_true",
                   help="also write model.onnx beside the saved pruned model (implies "
                        "--save-pruned-model; needs pip install 'vit-2ssp[export]')")
    o.add_argument("--latency-batch-size", type=int, default=1, help="batch size of latency timing (1)")
    o.add_argument("--latency-repeats", type=int, default=10,
                   help="timed rounds at least; each round times every stage once, back to back (10)")
    o.add_argument("--latency-precision", type=float, default=0.01,
                   help="time more rounds (doubling them) until every latency ratio's 95%% "
                        "interval is within +- this, up to --latency-max-repeats; 0 times "
                        "exactly --latency-repeats rounds (0.01)")
    o.add_argument("--latency-max-repeats", type=int, default=None,
                   help="the most rounds --latency-precision may time (10 x --latency-repeats, "
                        "or as many as fit in 10 s where that is more)")
    o.add_argument("--latency-cache", default=None, metavar="DIR",
                   help="where measured latency models are kept (default $VIT_2SSP_CACHE, else "
                        "~/.cache/vit-2ssp; safe to delete); 'none' measures every run")
    o.add_argument("--latency-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="precision of latency timing (autocast): auto = bfloat16 on CUDA, float32 on CPU")
    o.add_argument("--dry-run", action="store_true", help="print the plan and exit; prune nothing, write nothing")
    o.add_argument("--quiet", action="store_true", help="only warnings and the final summary")
    return ap


def validate(args: argparse.Namespace) -> None:
    """Checks that need no model; each failure names the flag and the allowed range."""
    args.targets = parse_targets(args)
    for flag in ("cifar_train_pct", "cifar_test_pct"):
        v = getattr(args, flag)
        if not 0 < v <= 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be in (0, 1], got {v}")
    if args.replace_classifier and args.use_adapter:
        raise UsageError("--replace-classifier and --use-adapter are exclusive: choose one head")
    if args.load_adapter and (args.replace_classifier or args.use_adapter):
        raise UsageError("--load-adapter brings its own head: drop --replace-classifier/--use-adapter")
    if args.checkpoint_every and not args.distill_steps:
        raise UsageError("--checkpoint-every checkpoints distillation: add --distill-steps")
    if args.resume and args.run_id is None:
        raise UsageError("--resume goes on from the checkpoint of a run: give its --run-id")
    if args.resume and not args.distill_steps:
        raise UsageError("--resume goes on distilling: give the run's --distill-steps")
    for flag, low in (("distill_steps", 0), ("distill_batch_size", 1), ("distill_size", 1),
                      ("grad_accumulation", 1), ("checkpoint_every", 0),
                      ("distill_augment", 0),
                      ("eval_batches", 1), ("min_remaining", 1), ("calib_size", 1), ("batch_size", 1),
                      ("ft_epochs", 1), ("adapter_reduction", 1), ("latency_batch_size", 1),
                      ("latency_repeats", 1)):
        v = getattr(args, flag)
        if v is not None and v < low:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= {low}, got {v}")
    if not 0 <= args.latency_precision < 1:
        raise UsageError(f"--latency-precision must be in [0, 1) (0: fixed rounds), got "
                         f"{args.latency_precision}")
    if args.latency_max_repeats is not None and args.latency_max_repeats < args.latency_repeats:
        raise UsageError(f"--latency-max-repeats must be >= --latency-repeats "
                         f"({args.latency_repeats}), got {args.latency_max_repeats}")
    if args.split not in ("auto", "search", "alpha") and not args.split.isdigit():
        raise UsageError(f"--split must be auto, search, alpha or a non-negative integer, got {args.split!r}")
    if args.run_id is not None and (not args.run_id or "/" in args.run_id or args.run_id.startswith(".")):
        raise UsageError(f"--run-id must be a plain name (no '/', not starting with '.'), got {args.run_id!r}")
    if args.stage == "s2" and args.split != "auto":
        raise UsageError(f"--split {args.split} does not apply to --stage s2: stage 2 alone removes "
                         f"the count of depth units nearest the target; drop --split")
    if args.run_id is not None and ("\0" in args.run_id or args.run_id in ("..",)):
        raise UsageError(f"--run-id must be a plain name, got {args.run_id!r}")
    if args.stage == "s2" and args.depth_unit == "auto":
        raise UsageError("--depth-unit auto compares whole splits; with --stage s2 choose block or attention")
    if args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda[:N], got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device is available here; use --device cpu")
    for flag in ("distill_lr", "distill_temperature"):
        if not getattr(args, flag) > 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    if args.align != "auto" and not (args.align.isdigit() and int(args.align) >= 1):
        raise UsageError(f"--align must be auto or an integer >= 1, got {args.align!r}")
    check_input_path("--model", args.model, ("embedded",))
    if args.dataset:
        from .data import KNOWN
        check_input_path("--dataset", args.dataset, ("digits", *KNOWN))
    for flag in ("text_file", "load_adapter"):
        value = getattr(args, flag)
        if value is not None:
            name = f"--{flag.replace('_', '-')}"
            check_input_path(name, value, ())
            if not Path(value).exists():
                raise UsageError(f"{name}: no such file {value}")
            if Path(value).is_dir():
                raise UsageError(f"{name}: {value} is a directory, not a file")
    if args.export_onnx:
        from .export import OnnxUnavailable, require_onnx
        try:
            require_onnx()
        except OnnxUnavailable as exc:
            raise UsageError(f"--export-onnx: {exc}") from exc
    if args.latency_dtype == "float16" and args.device == "cpu":
        raise UsageError("--latency-dtype float16 needs CUDA; on the CPU use float32 or bfloat16")


BUDGETS = {"max_accuracy_drop": "--max-accuracy-drop", "max_kl": "--max-kl",
           "min_cosine": "--min-cosine"}
OBJECTIVE_FLAGS = {"params": "--target", "flops": "--target-flops", "latency": "--target-latency"}


def budget_of(args: argparse.Namespace) -> tuple[str, float] | None:
    """(budget name, value) of a budget run, else None."""
    given = [(k, getattr(args, k)) for k in BUDGETS if getattr(args, k, None) is not None]
    return given[0] if given else None


def parse_targets(args: argparse.Namespace) -> list[float]:
    """--target as a list of floats (one for a plain run, several for a sweep, none with a
    budget); every malformed or conflicting value is a UsageError naming the flag. Sets
    `args.target` to the one target of a plain run (None otherwise)."""
    budgets = [f for k, f in BUDGETS.items() if getattr(args, k) is not None]
    if len(budgets) > 1:
        raise UsageError(f"{budgets[0]} and {budgets[1]} are two budgets: give one")
    asked = [f for f in OBJECTIVE_FLAGS.values() if getattr(args, f[2:].replace("-", "_")) is not None]
    if len(asked) > 1:
        raise UsageError(f"{asked[0]} and {asked[1]} are two targets: give one of --target, "
                         f"--target-flops, --target-latency")
    args.objective = next((k for k, f in OBJECTIVE_FLAGS.items() if f in asked), "params")
    flag = OBJECTIVE_FLAGS[args.objective]
    if args.objective != "params":
        if budgets:
            raise UsageError(f"{budgets[0]} finds a parameter target itself: drop {flag}")
        from .objective import MIN_REPEATS
        if args.objective == "latency" and args.latency_repeats < MIN_REPEATS:
            raise UsageError(f"--latency-repeats must be >= {MIN_REPEATS} with "
                             f"--target-latency (fewer rounds cannot measure the latency model), "
                             f"got {args.latency_repeats}")
        if args.stage != "both":
            raise UsageError(f"{flag} plans both stages together: drop --stage")
    if budgets and args.target is not None:
        raise UsageError(f"{budgets[0]} finds the target itself: drop --target")
    if args.max_accuracy_drop is not None and not 0 < args.max_accuracy_drop < 100:
        raise UsageError(f"--max-accuracy-drop must be in (0, 100) percentage points, got "
                         f"{args.max_accuracy_drop}")
    if args.max_kl is not None and not args.max_kl > 0:
        raise UsageError(f"--max-kl must be > 0, got {args.max_kl}")
    if args.min_cosine is not None and not 0 < args.min_cosine <= 1:
        raise UsageError(f"--min-cosine must be in (0, 1], got {args.min_cosine}")
    if not 0 < args.target_resolution <= 0.1:
        raise UsageError(f"--target-resolution must be in (0, 0.1], got {args.target_resolution}")
    if budgets:
        args.target = None
        return []
    given = getattr(args, flag[2:].replace("-", "_"))
    if given is None:
        raise UsageError("give --target (one value or a comma list), --target-flops, "
                         "--target-latency, or a budget (--max-accuracy-drop, --max-kl or "
                         "--min-cosine)")
    parts = [p.strip() for p in str(given).split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise UsageError(f"{flag} must be a number or a comma list of numbers in (0, 1), got "
                         f"{given!r}") from None
    bad = [v for v in values if not 0 < v < 1]
    if bad:
        raise UsageError(f"{flag} must be in (0, 1), got {bad[0]:g}")
    from .sweep import check_targets
    try:
        values = check_targets(values)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from exc
    if args.objective != "params":  # planned as the fraction removed, like a parameter target
        values = [round(1 - v, 12) for v in values]
    if len(values) > 1:
        for one in ("distill_steps", "recover", "export_onnx", "save_adapter"):
            if getattr(args, one):
                raise UsageError(f"--{one.replace('_', '-')} applies to one model: with several "
                                 f"targets give one --target, or a budget, to go on with")
        if args.stage != "both":
            raise UsageError("several targets take --stage both (the default)")
    args.target = values[0] if len(values) == 1 else None
    return values


def check_input_path(flag: str, value: str, names: tuple[str, ...]) -> None:
    """A value that is a path must lead somewhere: a broken link, a link loop or a missing
    local path is named as such (not taken for a hub id to download). Hub ids (owner/name)
    and the built-in `names` pass."""
    import os
    if value in names:
        return
    path = Path(os.path.expanduser(value))
    if path.is_symlink() and not path.exists():
        try:
            path.resolve(strict=True)
        except (RuntimeError, OSError) as exc:  # RuntimeError or ELOOP: a loop
            if isinstance(exc, RuntimeError) or getattr(exc, "errno", None) == errno.ELOOP:
                raise UsageError(f"{flag}: {value} is a symbolic link loop") from exc
        raise UsageError(f"{flag}: {value} is a broken symbolic link (it points to "
                         f"{os.readlink(path)}, which does not exist)")
    try:
        path.exists()
    except OSError as exc:  # ELOOP through a directory link, or a name too long
        raise UsageError(f"{flag}: {value} cannot be reached ({exc.strerror})") from exc
    local = value.startswith(("/", "./", "../", "~")) or value.count("/") > 1 or \
        value.endswith(("/", ".json", ".txt", ".pt", ".safetensors"))
    if local and not path.exists():
        raise UsageError(f"{flag}: no such {'file' if path.suffix else 'folder'} {value}")


# pre-training wrappers whose encoder is what gets pruned
PRETRAINING_ENCODERS = {"ViTMAEForPreTraining": "ViTMAEModel"}


def load_model(name: str, want_head: bool = False):
    """(model, processor, source) from 'embedded', a local folder (pruned or not) or a hub id;
    the processor is an image processor, or a tokenizer for a text encoder.

    An image model is built as the supported class its config names (a headless backbone stays
    headless, a dual CLIP / SigLIP model keeps its text tower); `want_head` (a head is to be
    installed) or a config naming no supported class builds the image-classification class."""
    import transformers

    from .anatomy import SUPPORTED_CLASSES, is_text_config, resolve
    from .persistence import check_saved_folder, is_pruned_folder, load_pruned_model
    path = EMBEDDED if name == "embedded" else Path(name)
    source = str(path) if path.is_dir() else name
    if path.is_dir():
        try:
            check_saved_folder(path)
        except ValueError as exc:
            raise UsageError(f"--model: {exc}") from exc
    try:
        if path.is_dir() and is_pruned_folder(path):  # this package's folder (its own model
            model = load_pruned_model(path)  # type when it needs its modeling file)
            text = is_text_config(model.config)
        else:
            config = transformers.AutoConfig.from_pretrained(source)
            check_config(config, source)
            text = is_text_config(config)
            arch = (getattr(config, "architectures", None) or [""])[0]
            arch = PRETRAINING_ENCODERS.get(arch, arch)
            if arch and arch not in SUPPORTED_CLASSES:  # never built as another class (a head
                # dropped or a random one added without a word)
                raise UsageError(
                    f"--model: unsupported model class {arch} ({source}); vit_pruning prunes "
                    f"{', '.join(SUPPORTED_CLASSES)}: save the supported model it contains (e.g. "
                    f"its encoder) to a folder and pass that")
            headless = SUPPORTED_CLASSES.get(arch, ("", ""))[1] != "logits"
            if arch and not (want_head and headless):
                model = getattr(transformers, arch).from_pretrained(source)
            elif text:  # a config naming no class: the headless encoder
                model = transformers.AutoModel.from_pretrained(source)
            else:
                model = transformers.AutoModelForImageClassification.from_pretrained(source)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - loading raises many kinds (size mismatch,
        # unpickling refused, a config transformers cannot build): each is one line here
        if path.exists() or name == "embedded":
            detail = str(exc).strip().splitlines()[0][:150] if str(exc).strip() else ""
            raise UsageError(f"--model: cannot load {path} ({type(exc).__name__}"
                             f"{': ' + detail if detail else ''})") from exc
        raise UsageError(
            f"--model: cannot load {name!r} (offline or unknown id); download it where there is "
            f"network (huggingface-cli download {name}) and pass --model /path/to/folder, or use "
            f"--model embedded") from exc
    try:
        resolve(model)
    except ValueError as exc:
        raise UsageError(f"--model: {exc}") from exc
    if getattr(model.config, "mask_ratio", 0):  # ViTMAE: prune the encoder as a backbone
        log.info("%s: patch masking off (mask_ratio %s -> 0): the encoder is pruned and measured "
                 "on every patch", type(model).__name__, model.config.mask_ratio)
        model.config.mask_ratio = 0.0
    try:
        if text:
            processor = transformers.AutoTokenizer.from_pretrained(source)
        else:
            processor = transformers.AutoImageProcessor.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, or an ImportError of a
        # library a fallback tokenizer needs (protobuf, sentencepiece)
        what = "tokenizer files" if text else "image processor config (preprocessor_config.json)"
        raise UsageError(f"--model: {source} has no usable {what}") from exc
    return model.eval(), processor, source


def check_config(config, source: str) -> None:
    """Refuse a config whose sizes cannot build a model (0, negative, or heads that do not
    divide the hidden size), naming the field, before transformers fails somewhere inside."""
    cfg = getattr(config, "vision_config", None) or config
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                "image_size", "patch_size", "num_channels"):
        value = getattr(cfg, key, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        if value is not None and not all(isinstance(v, int) and v > 0 for v in values):
            raise UsageError(f"--model: {source} has {key} {value!r} in its config; it must be a "
                             f"positive integer")
    hidden, heads = getattr(cfg, "hidden_size", None), getattr(cfg, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and hidden % heads:
        raise UsageError(f"--model: {source} has hidden_size {hidden}, not a multiple of "
                         f"num_attention_heads {heads}")


def check_finite(model, what: str) -> None:
    """Refuse weights holding NaN or Inf (they would run to meaningless numbers or fail deep
    inside the refit), naming the first such tensor."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UsageError(f"{what}: the weights hold NaN or Inf (first in {name}); the model "
                             f"cannot be pruned or measured")


IMAGE_ONLY_FLAGS = ("dataset", "load_cifar", "replace_classifier", "use_adapter", "load_adapter",
                    "do_finetune", "recover", "save_adapter")


def check_text_flags(args: argparse.Namespace) -> None:
    """Text encoders are headless: refuse the flags about labelled images and heads."""
    for flag in IMAGE_ONLY_FLAGS:
        if getattr(args, flag):
            raise UsageError(f"--{flag.replace('_', '-')} does not apply to a text encoder (it is "
                             f"headless and measured by sentence-embedding fidelity); drop it")


def all_sentences(args: argparse.Namespace) -> tuple[tuple[str, ...], int]:
    """Every distinct sentence of --text-file (or of Python's documentation), and how many
    repeated lines were dropped."""
    from .text import python_doc_sentences, read_sentences_counted
    if not args.text_file:
        return python_doc_sentences(), 0
    try:
        sentences, repeats = read_sentences_counted(args.text_file)
    except UnicodeDecodeError as exc:
        raise UsageError(f"--text-file: {args.text_file} is not UTF-8 text (byte {exc.start})") from exc
    except ValueError as exc:
        raise UsageError(f"--text-file: {exc}") from exc
    except OSError as exc:
        raise UsageError(f"--text-file: cannot read {args.text_file} "
                         f"({exc.strerror or type(exc).__name__})") from exc
    if not sentences:
        raise UsageError(f"--text-file: {args.text_file} holds no sentences (no non-empty line)")
    return sentences, repeats


def load_text(args: argparse.Namespace, calib_size: int, sentences: tuple[str, ...]):
    """Calibration and evaluation sentences for a text encoder (--text-file or Python's docs)."""
    from .text import split_sentences
    n_eval = args.eval_batches * args.batch_size
    try:
        return split_sentences(sentences, calib_size, n_eval, args.seed)
    except ValueError as exc:
        raise UsageError(f"--calib-size/--eval-batches: {exc} ({len(sentences)} distinct sentences "
                         f"in {args.text_file or 'the default text'})") from exc


def print_dry_run(model, model_id, shape, probes, args, ch: "Choices", target: float) -> None:
    """Show the plan (and its predicted FLOPs, measured on a scratch copy); the model is untouched."""
    import copy

    from .anatomy import resolve
    from .depth import apply_depth
    from .measure import count_flops, count_total_params
    from .width import prune_vit_mlp_width
    flops = count_flops(model)
    print(f"model {model_id}: {shape.num_blocks} blocks, hidden {shape.hidden_size}, MLP "
          f"{max(shape.widths)}, {shape.total_params:,} parameters, {flops / 1e9:.4f} GFLOPs per "
          f"{'sentence of 128 tokens' if resolve(model).is_text else 'image'}")
    dataset = resolve(model).is_text or args.dataset or args.load_cifar or args.model == "embedded"
    searched = bool(dataset) and args.split == "auto" and args.stage == "both"
    print(f"target {target}: min_remaining {ch.min_remaining} ({ch.min_remaining_source}); "
          f"MLP widths aligned to multiples of {ch.align} ({ch.align_source}); width policy "
          f"{ch.width_policy}; split "
          f"{'searched on calibration data when pruning (shown: 2SSP alpha formula)' if searched else args.split}")
    for unit, plan in probes.items():
        scratch = copy.deepcopy(model)
        prune_vit_mlp_width(scratch, list(plan.neurons_to_prune), max(1, plan.min_remaining))
        apply_depth(scratch, plan.depth_indices, unit, plan.attention_indices)
        pred_flops, pred_params = count_flops(scratch), count_total_params(scratch)
        del scratch
        mixed = (f" and the attention sublayers of {len(plan.attention_indices)} kept blocks "
                 f"(the target lies between two counts of whole blocks; --no-mixed-depth: blocks "
                 f"only)" if plan.attention_indices else "")
        print(f"[{unit}] remove {plan.blocks_to_prune} {unit} unit(s){mixed} (chosen from "
              f"calibration data when pruning; weight proxy without data)")
        gone = set(plan.depth_indices) if unit == "block" else set()
        widths = ["removed" if i in gone else str(w - n)
                  for i, (w, n) in enumerate(zip(shape.widths, plan.neurons_to_prune))]
        print(f"[{unit}] MLP widths after stage 1 (placeholder depth indices): {', '.join(widths)}"
              + ("" if plan.uniform_width is None else
                 f" (one width, {plan.uniform_width}: plain transformers model)" if unit == "block"
                 and not args.use_adapter and not args.load_adapter else
                 f" (one width, {plan.uniform_width}; saved with its modeling file, as "
                 f"{'attention sublayers are removed' if unit == 'attention' else 'it has an adapter head'})"))
        if ch.objective != "params":
            what = "FLOPs" if ch.objective == "flops" else "latency"
            print(f"[{unit}] {OBJECTIVE_FLAGS[ch.objective]} {1 - target:g}: predicted {what} "
                  f"ratio {1 - plan.predicted_sparsity:.4f}; parameters {pred_params:,} "
                  f"({pred_params / shape.total_params:.3f}x), FLOPs {pred_flops / 1e9:.4f} G "
                  f"({pred_flops / flops:.3f}x); smallest reachable {what} ratio "
                  f"{1 - plan.max_feasible_target:.4f}")
            if ch.latency_model is not None:
                lm = ch.latency_model
                print(f"[{unit}] latency model ({lm.device}, {lm.dtype}, batch {lm.batch_size}): "
                      f"{1e3 * lm.total_s:.3f} ms per forward, {1e3 * lm.fixed_s:.3f} ms outside "
                      f"the blocks, a block {1e3 * lm.blocks[0].at(lm.widths[0]):.3f} ms "
                      f"(attention {1e3 * lm.blocks[0].attention_s:.3f} ms, "
                      f"{1e6 * lm.blocks[0].slope_s:.3f} us per MLP neuron)")
            continue
        print(f"[{unit}] predicted parameters {plan.params_after:,} (sparsity "
              f"{plan.predicted_sparsity:.5f}, error {plan.target_error:.2e} = "
              f"{100 * plan.target_error:.3f} pp; align {plan.align}), FLOPs "
              f"{pred_flops / 1e9:.4f} G ({pred_flops / flops:.3f}x); max feasible target "
              f"{plan.max_feasible_target:.4f}")
        for note in plan.notes:
            print(f"[{unit}] note: {note}")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is so that every write in progress is undone."""


def _who() -> str:
    """The name errors are printed under: with the process's rank under a launcher."""
    from .accel import launched, world
    if not launched():
        return "vit-2ssp"
    rank, count = world()
    return f"vit-2ssp (rank {rank} of {count})"


def _peer_failure(exc: BaseException) -> bool:
    """Whether `exc` is a collective operation failing because another process of a launched
    job died (gloo / NCCL connection errors)."""
    from .accel import launched
    if not launched():
        return False
    backend = getattr(torch.distributed, "DistBackendError", ())
    text = str(exc).lower()
    return isinstance(exc, backend) or any(w in text for w in (
        "gloo", "nccl", "connection closed", "connection reset", "broken pipe", "timed out"))


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate) if \
        threading.current_thread() is threading.main_thread() else None
    who = _who()
    try:
        validate(args)
        return run(args, argv)
    except UsageError as exc:
        print(f"{who}: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"{who}: terminated (SIGTERM); nothing half-written was kept", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{who}: interrupted; nothing half-written was kept", file=sys.stderr)
        return 130
    except (RuntimeError, OSError) as exc:
        if not _peer_failure(exc):
            raise
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        print(f"{who}: error: another process of this job stopped ({first}); nothing "
              f"half-written was kept", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@dataclass
class Choices:
    """Every run-wide choice, made once in :func:`choose`: where it runs, at what precision it is
    timed, how widths are aligned, and where its outputs go."""

    device: torch.device
    latency_dtype: torch.dtype
    run_id: str
    min_remaining: int
    min_remaining_source: str
    align: int
    align_source: str
    width_policy: str
    calib_size: int
    mixed_precision: str = "no"  # of training steps (accel.resolve_precision of --mixed-precision)
    objective: str = "params"  # what the targets count (see objective_step)
    seq_len: int = 128  # text: tokens per sentence the FLOPs and latency are counted at
    cost_shape: Any = None  # planner.ModelShape in the objective's units (None: parameters)
    latency_model: Any = None  # objective.LatencyModel of a --target-latency run


@dataclass
class Loaded:
    model: Any
    processor: Any
    model_id: str
    text: bool
    shape: Any  # planner.ModelShape of the model as loaded
    layout: str


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


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """The CLI's steps, in order; each is a function below."""
    import transformers

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import datasets
    datasets.utils.logging.set_verbosity_error()
    if args.quiet:  # their bars on stderr, and the ONNX exporter's notes (it logs at INFO)
        datasets.utils.logging.disable_progress_bar()
        for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export"):
            logging.getLogger(name).setLevel(logging.WARNING)
    torch.manual_seed(args.seed)
    from .accel import is_main, launched
    from .checkpoint import Checkpoint
    from .outputs import OutputError, check_outputs
    run_id = args.run_id or _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    outputs = run_outputs(args, run_id)
    if launched() and (args.dry_run or len(args.targets) > 1 or budget_of(args)):
        raise UsageError("several processes distill one model: give one --target and "
                         "--distill-steps (a dry run, sweep or budget search runs in one process)")
    if launched() and args.objective == "latency":
        raise UsageError("--target-latency plans on timings that every process would measure "
                         "differently: plan it in one process (or use --target-flops here)")
    if not is_main():  # under a launcher only the main process logs, measures and writes
        logging.getLogger().setLevel(logging.WARNING)
        args.quiet = True
        return helper_run(args, run_id)
    saved = Checkpoint.of(args.artifacts_dir, run_id)
    if args.resume and saved.latest is None:
        raise UsageError(f"--resume: no checkpoint of --run-id {run_id} in {saved.folder}")
    if not args.resume and saved.latest is not None:
        raise UsageError(f"--run-id {run_id} has a checkpoint in {saved.folder}: add --resume to go "
                         f"on from it, or choose another --run-id")
    try:
        check_outputs(outputs.outputs)  # before the model loads: a bad path costs nothing
        if args.checkpoint_every:  # written during the run, not staged: its place checked too
            from .outputs import Output
            check_outputs([Output("checkpoint", saved.folder / "latest.json.probe", "--artifacts-dir")])
        if args.dry_run:
            loaded = load_step(args)
            ch = choose(args, loaded, run_id)
            loaded.model.to(ch.device)
            objective_step(args, loaded, ch, None)
            probes = {t: plan_probes(args, loaded, ch, t) for t in args.targets}
            if not args.targets:
                print_budget_dry_run(args, loaded, ch)
            for t, p in probes.items():
                print_dry_run(loaded.model, loaded.model_id, loaded.shape, p, args, ch, t)
            return 0
        with outputs:  # claims the names: a second run with this --run-id stops here
            loaded = load_step(args)
            ch = choose(args, loaded, run_id)
            if args.objective == "params":  # FLOP and latency targets are checked once their
                for t in args.targets:  # cost model is known (objective_step)
                    plan_probes(args, loaded, ch, t)
            loaded.model.to(ch.device)
            data = data_step(args, loaded, ch)
            objective_step(args, loaded, ch, data.seq_len)
            check_budget(args, loaded, data)
            evaluator = Evaluator(args, loaded, data, ch)
            if len(args.targets) > 1:
                from .tradeoff import sweep_run
                return sweep_run(args, argv, loaded, data, ch, evaluator, outputs)
            search = None
            if budget_of(args):
                from .tradeoff import budget_search
                search = budget_search(args, argv, loaded, data, ch, evaluator, outputs)
            elif ch.objective == "latency" and not args.resume:
                from .tradeoff import latency_run  # planned, timed, corrected once if it misses
                search = latency_run(args, loaded, data, ch, evaluator)
            stages, snapshots, result, distilled = prune_step(args, loaded, data, ch, evaluator,
                                                              search)
            latency = latency_step(args, loaded, data, ch, stages, snapshots)
            del snapshots
            try:  # every output is written beside its place, then all renamed into place
                artifacts = save_step(args, loaded, data, ch, outputs)
                rep = build_report(args, argv, loaded, data, ch, stages, result, latency,
                                   artifacts, distilled)
                if search is not None and not budget_of(args):  # a --target-latency run
                    rep["objective"]["attempts"] = [t.measures for t in search.search.trials]
                if search is not None and budget_of(args):
                    from .report import tradeoff_plot
                    from .tradeoff import search_section
                    rep["budget_search"] = section = search_section(args, search)
                    b = {"flag": section["budget"], "value": section["value"],
                         "measure": section["measure"]}
                    tradeoff_plot(section["points"], outputs.stage("tradeoff"), b, section["chosen"],
                                  stages[0].top1, f"{run_id}: budget {b['flag']} {b['value']:g}")
                    rep["artifacts"]["tradeoff_plot"] = str(outputs.by_role("tradeoff").path)
                from .report import write_report
                write_report(rep, outputs.stage("json").parent, final_dir=Path(args.reports_dir))
                outputs.commit()
            except OSError as exc:
                raise write_error(exc) from exc
            if args.checkpoint_every or args.resume:  # the run is whole: its checkpoint is spent
                saved.remove()
    except OutputError as exc:
        raise UsageError(str(exc)) from exc
    print_summary(args, rep, stages, result, outputs.by_role("json").path,
                  outputs.by_role("md").path)
    return 0


def helper_run(args: argparse.Namespace, run_id: str) -> int:
    """A process other than the main one under a launcher: the same loading, data and pruning
    (so the plan is the same everywhere, which distillation checks), its share of the
    distillation, and nothing written."""
    loaded = load_step(args)
    ch = choose(args, loaded, run_id)
    loaded.model.to(ch.device)
    data = data_step(args, loaded, ch)
    objective_step(args, loaded, ch, data.seq_len)
    prune_step(args, loaded, data, ch, Evaluator(args, loaded, data, ch))
    return 0


def write_error(exc: OSError) -> UsageError:
    """A failed write of a run's outputs (a full disk, say) as the one line the user reads;
    the caller's staging is undone, so nothing was kept."""
    return UsageError(f"cannot write the outputs ({exc.strerror or type(exc).__name__}"
                      f"{': ' + str(exc.filename) if exc.filename else ''}); nothing was kept")


def run_outputs(args: argparse.Namespace, run_id: str):
    """Every file and folder this run will write, with the flag that places it (the JSON
    report last: its presence means the rest is there)."""
    from .outputs import Output, RunOutputs
    outs = []
    if args.save_pruned_model or args.export_onnx:
        outs.append(Output("model", Path(args.pruned_output_dir) / run_id, "--pruned-output-dir", True))
    if args.save_adapter:
        outs.append(Output("adapter", Path(args.artifacts_dir) / run_id / "adapter.pt", "--artifacts-dir"))
    if budget_of(args):  # the search's trade-off plot beside the stages' plot
        outs.append(Output("tradeoff", Path(args.reports_dir) / f"report-{run_id}.tradeoff.png",
                           "--reports-dir"))
    outs += [Output(kind, Path(args.reports_dir) / f"report-{run_id}.{kind}", "--reports-dir")
             for kind in ("png", "md", "json")]
    return RunOutputs(run_id, outs)


def load_step(args: argparse.Namespace) -> Loaded:
    """Load the model and its processor; refuse flags that do not fit its kind."""
    from .anatomy import resolve
    from .pipeline import model_shape
    model, processor, model_id = load_model(
        args.model, bool(args.replace_classifier or args.use_adapter or args.load_adapter))
    anatomy = resolve(model)
    check_finite(model, "--model")
    if anatomy.is_text:
        check_text_flags(args)
    elif args.text_file:
        raise UsageError("--text-file is for text encoders; this model takes images (use --dataset)")
    if not anatomy.is_text and args.distill_match == "tokens":
        raise UsageError("--distill-match tokens is for text encoders; an image model learns its "
                         "output (use auto or output)")
    if not anatomy.is_text and args.distill_augment:
        raise UsageError("--distill-augment is for text encoders; an image model distills on "
                         "train-split images (see --distill-size)")
    return Loaded(model, processor, model_id, anatomy.is_text, model_shape(model), anatomy.layout)


def choose(args: argparse.Namespace, loaded: Loaded, run_id: str) -> Choices:
    """Device, timing precision, min_remaining and alignment, decided in one place."""
    from .planner import default_align
    from .accel import launched, resolve_precision
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if launched() and device.type == "cuda" and device.index is None:  # one GPU per process
        import os
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    try:
        precision = resolve_precision(args.mixed_precision, device)
    except ValueError as exc:
        raise UsageError(f"--mixed-precision {args.mixed_precision}: {exc}") from exc
    if args.latency_dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.latency_dtype)
        if dtype == torch.float16 and device.type != "cuda":
            raise UsageError("--latency-dtype float16 needs CUDA; on the CPU use float32 or bfloat16")
    from .pipeline import default_min_remaining
    shape = loaded.shape
    width = max(shape.widths)
    if args.min_remaining is not None:
        mr, mr_source = args.min_remaining, "--min-remaining"
    else:
        mr, mr_source = default_min_remaining(shape)
    if mr >= width:
        raise UsageError(f"--min-remaining must be below the MLP width {width}, got {mr}")
    if args.align == "auto":
        align = default_align(shape)
        align_source = ("auto: 8, what bf16/fp16 tensor cores need" if align == 8 else
                        f"auto: {align}, as half a group of 8 neurons would exceed 0.1 pp of this "
                        f"model's parameters")
    else:
        align, align_source = int(args.align), "--align"
    calib = args.calib_size or (TEXT_CALIB if loaded.text else IMAGE_CALIB)
    return Choices(device, dtype, run_id, mr, mr_source, align, align_source, args.width_policy, calib,
                   mixed_precision=precision)


def check_budget(args: argparse.Namespace, loaded: Loaded, data: Data) -> None:
    """A budget needs what it is measured on: labels and a head, logits, or outputs to compare."""
    budget = budget_of(args)
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


def print_budget_dry_run(args: argparse.Namespace, loaded: Loaded, ch: Choices) -> None:
    from .planner import max_target_over, units_of
    flag, value = BUDGETS[budget_of(args)[0]], budget_of(args)[1]
    top = max_target_over(loaded.shape, units_of(args.depth_unit), ch.min_remaining, ch.align)
    print(f"budget {flag} {value:g}: the run searches targets {args.target_resolution:g} to "
          f"{top:.4f} in steps of {args.target_resolution:g} by bisection (pruning each tried "
          f"target, measuring it on the evaluation inputs), then goes on with the largest that "
          f"keeps the budget")


def prune_config(args: argparse.Namespace, ch: Choices):
    from .pipeline import PruneConfig
    return PruneConfig(unit=args.depth_unit, min_remaining=ch.min_remaining,
                       split=int(args.split) if args.split.isdigit() else args.split,
                       depth_method=args.depth_method, allocation=args.allocation,
                       compensation=args.compensation, selection=args.neuron_selection,
                       stages=args.stage, align=ch.align, width_policy=ch.width_policy,
                       objective=ch.objective, latency_model=ch.latency_model,
                       seq_len=ch.seq_len, mixed_depth=not args.no_mixed_depth)


def plan_probes(args: argparse.Namespace, loaded: Loaded, ch: Choices, target: float) -> dict:
    """Plans with the alpha split for each depth unit: validates a target before any work and
    is what --dry-run shows."""
    from .planner import (depth_only_plan, max_depth_units, max_target_over, units_of,
                          validate_target, width_only_max)
    shape, cfg = ch.cost_shape or loaded.shape, prune_config(args, ch)
    units = units_of(args.depth_unit)
    depth = int(args.split) if args.split.isdigit() else "alpha"
    if ch.objective != "params":
        return objective_probes(args, ch, shape, cfg, units, target)
    if args.split.isdigit() and args.stage == "both":
        most = max(max_depth_units(shape, u) for u in units)
        if depth > most:
            raise UsageError(f"--split {depth}: this model has at most {most} removable "
                             f"{' or '.join(units)} units")
    flag = "--split/--target" if args.split.isdigit() else "--target"
    try:
        if args.stage == "s1":
            validate_target(target, width_only_max(shape, ch.min_remaining, ch.align),
                            "for width pruning alone (--stage s1)")
            units, depth = units[:1], 0
        elif args.stage == "s2":
            depth_only_plan(shape, target, args.depth_unit)
        validate_target(target, max_target_over(shape, units, ch.min_remaining, ch.align))
        probes = {}
        for u in units:
            try:
                probes[u] = (depth_only_plan(shape, target, u) if args.stage == "s2" else
                             cfg.plan(shape, target, u, depth=depth))
            except ValueError:
                if len(units) == 1:
                    raise
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from exc
    return probes


def objective_step(args: argparse.Namespace, loaded: Loaded, ch: Choices,
                   seq_len: int | None) -> None:
    """For --target-flops / --target-latency: the planner's shape in FLOPs, or the latency model
    measured on the run's device, dtype and batch size (or found in the cache); then every
    target is checked against it, before anything is pruned."""
    if args.objective == "params":
        return
    from .objective import default_cache_dir, measure_latency_model, objective_shape
    ch.objective, ch.seq_len = args.objective, seq_len or 128
    if args.objective == "latency":
        cache = (None if args.latency_cache == "none" else
                 Path(args.latency_cache) if args.latency_cache else default_cache_dir())
        log.info("measuring the latency model on %s (%s, batch %d)", ch.device,
                 str(ch.latency_dtype).replace("torch.", ""), args.latency_batch_size)
        ch.latency_model = measure_latency_model(
            loaded.model, args.latency_batch_size, ch.latency_dtype, max(20, args.latency_repeats),
            seq_len=ch.seq_len, align=ch.align, min_remaining=ch.min_remaining, cache_dir=cache)
    ch.cost_shape = objective_shape(loaded.model, loaded.shape, ch.objective, ch.latency_model,
                                    ch.seq_len)
    for t in args.targets:
        plan_probes(args, loaded, ch, t)


def objective_probes(args: argparse.Namespace, ch: Choices, shape, cfg, units, target: float) -> dict:
    """plan_probes for a FLOP or latency target: the alpha-split plan per depth unit, or one
    line naming the smallest reachable ratio."""
    from .planner import max_target_over, reachable_target
    flag = OBJECTIVE_FLAGS[ch.objective]
    asked = round(1 - target, 12)
    what = "FLOPs" if ch.objective == "flops" else "latency (predicted)"
    top = max_target_over(shape, units, ch.min_remaining, ch.align)
    if target > top:
        raise UsageError(f"{flag} {asked:g} is below what the deepest feasible pruning reaches: "
                         f"{1 - top:.4f} of the {what} (min_remaining {ch.min_remaining}, "
                         f"{' or '.join(units)} units)")
    probes = {}
    for u in units:
        try:
            t = (reachable_target(shape, target, u, ch.min_remaining, ch.align)
                 if ch.objective == "latency" else target)
            probes[u] = cfg.plan(shape, t, u, depth="alpha")
        except ValueError as exc:
            if len(units) == 1:
                raise UsageError(f"{flag} {asked:g}: {exc}") from exc
    mixed = mixed_probe(shape, cfg, target) if ch.objective == "latency" and "block" in units \
        and all(p.target > target for p in probes.values()) else None
    if mixed is not None:
        probes = {"block": mixed}
    return probes


def mixed_probe(shape, cfg, target: float):
    """The dry run's mixed plan (placeholder units) when a latency target lies between two counts
    of whole blocks and mixing is on, as the pipeline plans it without data; None otherwise."""
    from .planner import default_depth_indices, mixed_choice, mixed_options
    need = mixed_options(shape, target, cfg.min_remaining, int(cfg.align)) if cfg.mixed_depth else {}
    if not need:
        return None
    d = mixed_choice(need)
    return cfg.plan(shape, target, "block", depth_indices=default_depth_indices(shape, "block", d),
                    attention_indices=need[d])


def data_step(args: argparse.Namespace, loaded: Loaded, ch: Choices) -> Data:
    """Dataset and head, calibration (and distillation) inputs, the head fine-tune, and the
    evaluation batches, all on the run's device."""
    from .text import PYTHON_DOCS
    dataset = args.dataset or ("cifar10" if args.load_cifar else ("digits" if args.model == "embedded" else None))
    if loaded.text:
        dataset = args.text_file or PYTHON_DOCS
    data = Data(dataset=dataset, calib_info={"dataset": None, "split": None, "count": 0,
                                             "fingerprint": None, "seed": args.seed})
    head_step(args, loaded, ch, data)
    test_loader = (text_inputs if loaded.text else image_inputs)(args, loaded, ch, data)
    data.ft_lr = args.ft_lr or (1e-3 if args.freeze_backbone else 1e-4)
    if args.do_finetune:
        from .heads import finetune
        log.info("fine-tuning the head on the unpruned model (%d epoch(s), lr %g)", args.ft_epochs, data.ft_lr)
        finetune(loaded.model, data.train_loader, args.ft_epochs, data.ft_lr, args.freeze_backbone,
                 ch.device, not args.quiet, ch.mixed_precision, args.grad_accumulation)
    loaded.model.eval()
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    if args.do_finetune or args.load_adapter:
        check_finite(loaded.model, "--do-finetune" if args.do_finetune else "--load-adapter")
    evaluation_batches(args, loaded, ch, data, test_loader)
    return data


def head_step(args: argparse.Namespace, loaded: Loaded, ch: Choices, data: Data) -> None:
    """Load the labelled splits; install a fresh head, an adapter or a saved one; refuse flags
    that need what the run does not have."""
    from .anatomy import resolve
    from .data import DataError, load_splits
    from .heads import AdapterFileError, build_head, head_in_features, install_head, load_adapter
    model = loaded.model
    if data.dataset and not loaded.text:
        try:
            data.splits = load_splits(data.dataset, args.cifar_train_pct, args.cifar_test_pct,
                                      args.image_column, args.label_column, args.skip_bad_images)
            for name in data.splits.skipped:
                log.warning("--skip-bad-images: left out %s", name)
        except DataError as exc:
            raise UsageError(str(exc)) from exc
    splits = data.splits
    data.head_cfg = {"kind": None, "adapter_reduction": args.adapter_reduction}
    if args.replace_classifier or args.use_adapter:
        if splits is None:
            raise UsageError("--replace-classifier/--use-adapter need labelled data: add --dataset or --load-cifar")
        kind = "adapter" if args.use_adapter else "linear"
        install_head(model, build_head(kind, head_in_features(model), splits.num_labels,
                                       args.adapter_reduction).to(ch.device), splits.label_names)
        data.head_cfg["kind"] = kind
    elif args.load_adapter:
        try:
            payload = load_adapter(model, args.load_adapter, splits.num_labels if splits else None,
                                   splits.label_names if splits else None)
        except AdapterFileError as exc:
            raise UsageError(str(exc)) from exc
        model.to(ch.device)
        data.head_cfg["kind"] = payload["classifier_type"]
    data.has_head = resolve(model).has_classifier
    if splits is not None and data.has_head and model.config.num_labels != splits.num_labels:
        raise UsageError(f"--dataset {data.dataset} has {splits.num_labels} classes but the model's head "
                         f"has {model.config.num_labels}: add --replace-classifier or --use-adapter")
    if args.distill_steps and splits is None and not loaded.text:
        raise UsageError("--distill-steps needs unlabeled images: add --dataset or --load-cifar")
    if args.do_finetune and splits is None:
        raise UsageError("--do-finetune needs labelled data: add --dataset or --load-cifar")
    if args.recover and (splits is None or not data.has_head):
        raise UsageError("--recover needs labelled data and a classifier head: add --dataset or --load-cifar")
    if args.save_adapter and data.head_cfg["kind"] is None:
        raise UsageError("--save-adapter needs a head: add --replace-classifier, --use-adapter or --load-adapter")


def image_inputs(args: argparse.Namespace, loaded: Loaded, ch: Choices, data: Data):
    """Train/test loaders, calibration images (device) and distillation images (host); returns
    the test loader (None without a dataset)."""
    from .batches import take_inputs
    from .data import calibration_subset, default_workers, fingerprint, make_loader
    splits = data.splits
    if splits is None:
        return None
    workers = default_workers()
    data.train_loader = make_loader(splits.train, loaded.processor, splits, args.batch_size, True,
                                    args.seed, workers)
    calib_ds, _ = calibration_subset(splits.train, ch.calib_size, args.seed)
    data.calib_inputs = take_inputs(make_loader(calib_ds, loaded.processor, splits, args.batch_size),
                                    None, ch.device)
    data.calib_info = {"dataset": data.dataset, "count": len(calib_ds), "seed": args.seed,
                       "split": f"train[:{args.cifar_train_pct * 100:g}%] (random {len(calib_ds)})",
                       "fingerprint": fingerprint(data.calib_inputs)}
    if args.distill_steps:
        size = min(args.distill_size or DISTILL_IMAGES, len(splits.train))
        pool, _ = calibration_subset(splits.train, size, args.seed + 1)
        data.distill_inputs = take_inputs(make_loader(pool, loaded.processor, splits, 256), None, "cpu")
    return make_loader(splits.test, loaded.processor, splits, args.batch_size, False, args.seed, workers)


def text_inputs(args: argparse.Namespace, loaded: Loaded, ch: Choices, data: Data):
    """Calibration sentences (device), distillation sentences (host: neither calibration nor
    evaluation, plus --distill-augment variants of the calibration sentences); returns the
    tokenized evaluation sentences."""
    import random

    from .batches import take_inputs
    from .data import fingerprint
    from .text import augment_sentences, python_docstring_sentences, tokenize
    sentences, data.text_repeats = all_sentences(args)
    split = load_text(args, ch.calib_size, sentences)
    if args.distill_steps:
        used = set(split.calibration) | set(split.evaluation)
        rest = [t for t in sentences if t not in used]
        if not args.text_file and rest:  # train on the standard library's docstrings, check on the
            # topic sentences neither pruning nor evaluation uses (drawn like the evaluation ones)
            data.distill_checks = tokenize(loaded.processor, rest, args.batch_size)
            rest = list(python_docstring_sentences())
        size = args.distill_size if args.distill_size is not None else DISTILL_SENTENCES
        if args.distill_size is not None or len(rest) > size:  # never more than allowed
            rest = random.Random(args.seed).sample(rest, size)
        if not rest:
            raise UsageError("--distill-steps: every sentence is used for calibration or evaluation; "
                             "give a longer --text-file or lower --calib-size/--eval-batches")
        copies = DISTILL_AUGMENT if args.distill_augment is None else args.distill_augment
        variants = augment_sentences(split.calibration, copies, args.seed, exclude=split.evaluation)
        data.distill_augmented = len(variants)
        data.distill_inputs = tokenize(loaded.processor, [*rest, *variants], 256, by_length=True)
    data.calib_inputs = take_inputs(tokenize(loaded.processor, split.calibration, args.batch_size),
                                    None, ch.device)
    data.calib_info = {"dataset": data.dataset, "count": len(split.calibration), "seed": args.seed,
                       "split": f"sentences not used for evaluation (random {len(split.calibration)})",
                       "fingerprint": fingerprint(data.calib_inputs),
                       "repeated_lines_dropped": data.text_repeats,
                       "cut_to_max_length": cut_sentences(loaded.processor, split.calibration)}
    data.text_cut = cut_sentences(loaded.processor, split.evaluation)
    return tokenize(loaded.processor, split.evaluation, args.batch_size)


def cut_sentences(tokenizer, sentences: list[str]) -> int:
    """How many of `sentences` are longer than text.MAX_LENGTH tokens (and so cut)."""
    from .text import MAX_LENGTH
    return sum(len(ids) > MAX_LENGTH for ids in tokenizer(list(sentences))["input_ids"])


def evaluation_batches(args: argparse.Namespace, loaded: Loaded, ch: Choices, data: Data,
                       test_loader) -> None:
    """The first --eval-batches test batches (on the device), and what accuracy means here."""
    from .batches import batch_labels, batch_pixels, iter_limited
    data.eval_batches = list(iter_limited(test_loader, args.eval_batches)) if test_loader else []
    if loaded.text:
        lengths = torch.cat([b["attention_mask"].sum(1) for b in data.eval_batches])
        data.seq_len = max(1, round(float(lengths.double().mean())))  # FLOPs and latency at the mean length
        from .text import MAX_LENGTH, PYTHON_DOCS
        n = sum(len(b["input_ids"]) for b in data.eval_batches)
        data.accuracy_note = (
            f"not applicable (text encoder): fidelity is the cosine of mean-pooled sentence embeddings "
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
        f"top-1 on the first {args.eval_batches} test batches of {data.dataset} "
        f"({sum(len(x) for x in data.eval_pixels)} images)" if data.eval_pixels and data.has_head
        else "not applicable (no labelled data or headless model)")


class Evaluator:
    """Measures the model after each stage on the same evaluation inputs: parameters, FLOPs,
    top-1 and KL (images) or embedding cosine and agreement (text). Latency is timed later, all
    stages back to back (:func:`latency_step`)."""

    def __init__(self, args, loaded: Loaded, data: Data, ch: Choices):
        self.loaded, self.data, self.device = loaded, data, ch.device
        self.size = {"seq_len": data.seq_len} if loaded.text else {}
        self.reference = None  # the baseline's outputs

    def __call__(self, name: str, model):  # -> report.StageMetrics
        from .measure import collect_outputs, count_flops, count_total_params, kl_divergence, \
            mean_cosine, retrieval_agreement
        from .report import StageMetrics
        from .text import sentence_embeddings
        data = self.data
        top1 = kl = cos = agree = None
        if self.loaded.text:
            out = sentence_embeddings(model, data.eval_batches, self.device)
            if self.reference is not None:
                cos, agree = mean_cosine(out, self.reference), retrieval_agreement(out, self.reference)
        else:
            out = collect_outputs(model, data.eval_pixels) if data.eval_pixels else None
            if data.eval_pixels and data.has_head:
                top1 = int((out.argmax(-1) == data.eval_labels).sum()) / len(data.eval_labels)
                if self.reference is not None:
                    kl = kl_divergence(out, self.reference)
            elif data.eval_pixels and self.reference is not None:  # a backbone: its outputs
                cos = mean_cosine(out.flatten(1), self.reference.flatten(1))
                agree = retrieval_agreement(out.flatten(1), self.reference.flatten(1))
        if self.reference is None:
            if out is not None and not torch.isfinite(out).all():
                raise UsageError("--model: the unpruned model's outputs hold NaN or Inf on the "
                                 "evaluation inputs; it cannot be measured")
            self.reference = out
        m = StageMetrics(name, count_total_params(model), count_flops(model, **self.size), float("nan"),
                         top1, kl, cos, agree)
        log.info("%s: %s params, %.4f GFLOPs, top-1 %s%s", name, f"{m.params:,}", m.flops / 1e9,
                 "n/a" if top1 is None else f"{top1:.4f}",
                 "" if cos is None else f", cosine {cos:.4f}, agreement {agree:.3f}")
        return m


def prune_step(args, loaded: Loaded, data: Data, ch: Choices, evaluate: Evaluator, search=None):
    """Baseline, stage 1, stage 2 (and the head re-tune with --recover), each measured; keeps a
    copy of the model after each stage so that latency can be timed back to back at the end.
    After a budget search (`search`, a tradeoff.BudgetRun) its chosen model is stage 2."""
    import copy

    from .heads import finetune
    from .pipeline import prune_2ssp
    model = loaded.model
    if args.resume:  # pruned and measured before: the checkpoint holds it all
        stages, snapshots, result, model, state = resume_step(args, loaded, ch, evaluate)
        loaded.model = model
    elif search is not None:  # the search pruned copies: the loaded model is still the baseline
        state = None
        stages = [search.baseline] + ([search.stage1] if search.stage1 is not None else [])
        snapshots = {"baseline": model}
        if search.stage1_model is not None:
            snapshots["stage1"] = search.stage1_model
        model, result = search.search.model, search.search.result
        loaded.model = model
    else:
        state = None
        stages = [evaluate("baseline", model)]
        snapshots = {"baseline": copy.deepcopy(model)}

        def after_stage1(m):
            stages.append(evaluate("stage1", m))
            snapshots["stage1"] = copy.deepcopy(m)

        try:
            model, result = prune_2ssp(model, args.target, data.calib_inputs, prune_config(args, ch),
                                       device=ch.device, progress=not args.quiet,
                                       after_stage1=after_stage1)
        except ValueError as exc:
            raise UsageError(f"{OBJECTIVE_FLAGS[ch.objective]}: {exc}") from exc
    if not args.resume:
        stages.append(evaluate("stage2", model))
    distilled = None
    if args.distill_steps:
        snapshots.setdefault("stage2", copy.deepcopy(model))
        distilled = distill_step(args, loaded, data, ch, model, result, stages, snapshots, state)
        stages.append(evaluate("distilled", model))
    if args.recover:
        snapshots[stages[-1].name] = copy.deepcopy(model)
        finetune(model, data.train_loader, args.ft_epochs, data.ft_lr, args.freeze_backbone, ch.device,
                 not args.quiet, ch.mixed_precision, args.grad_accumulation)
        model.eval()
        stages.append(evaluate("recovered", model))
    snapshots[stages[-1].name] = model
    return stages, snapshots, result, distilled


def distill_step(args, loaded: Loaded, data: Data, ch: Choices, model, result, stages, snapshots,
                 state=None):
    """Distill the pruned `model` from the baseline (on accelerate: every process of a launched
    job on its own shard, after checking they all pruned the same plan); with
    --checkpoint-every its state is written every N steps (the main process), and with
    --resume it goes on from `state`."""
    from .accel import is_main, make_accelerator, same_everywhere
    from .checkpoint import Checkpoint, job_of
    from .distillation import DistillConfig, distill, pruned_layers
    match = DISTILL_MATCH if args.distill_match == "auto" else args.distill_match
    cfg = DistillConfig(steps=args.distill_steps, lr=args.distill_lr,
                        batch_size=args.distill_batch_size, temperature=args.distill_temperature,
                        train=args.distill_train, seed=args.seed, match=match,
                        layers=tuple(pruned_layers(result)) if match == "layers" else None,
                        mixed_precision=ch.mixed_precision, grad_accumulation=args.grad_accumulation,
                        checkpoint_every=args.checkpoint_every)
    acc = make_accelerator(ch.device, cfg.mixed_precision, cfg.grad_accumulation)
    try:
        same_everywhere(acc, plan_fingerprint(result), "the pruning plan")
    except RuntimeError as exc:
        raise UsageError(str(exc)) from exc
    hook = None
    if args.checkpoint_every and is_main():
        saved = Checkpoint.of(args.artifacts_dir, ch.run_id)
        saved.write_snapshots({k: snapshots[k] for k in ("stage1", "stage2") if k in snapshots},
                              loaded.processor)
        run_record = {"stages": list(stages), "result": result}

        def write(st):
            where = saved.write(st.step, model, st, run_record, job_of(args), loaded.processor)
            log.info("checkpoint: step %d written to %s", st.step, where)
        hook = write
    log.info("distilling from the unpruned model on %d unlabeled inputs%s", sum(
        len(b["input_ids"]) if isinstance(b, dict) else len(b) for b in data.distill_inputs),
        "" if acc.num_processes == 1 else f", sharded over {acc.num_processes} processes")
    return distill(model, snapshots["baseline"], data.distill_inputs, config=cfg,
                   check_inputs=data.distill_checks, progress=not args.quiet, checkpoint=hook,
                   resume=state)


def plan_fingerprint(result) -> str:
    """What must be the same in every process before they train one model together."""
    import hashlib
    text = repr((result.plan.to_dict(), result.depth_order, result.neurons_removed))
    return hashlib.sha256(text.encode()).hexdigest()


def resume_step(args, loaded: Loaded, ch: Choices, evaluate):
    """The checkpoint of --run-id: (stages measured before it, snapshots for the latency table,
    the PruneResult, the student with its weights then, the distillation state)."""
    from .checkpoint import Checkpoint, job_of
    try:
        student, state, run, snaps = Checkpoint.of(args.artifacts_dir, ch.run_id).load(
            job_of(args), ch.device)
    except ValueError as exc:
        raise UsageError(f"--resume: {exc}") from exc
    log.info("resuming run %s from step %d of %d", ch.run_id, state.step, args.distill_steps)
    base = evaluate("baseline", loaded.model)  # the reference of the stages measured next
    stages = [base] + [s for s in run["stages"] if s.name != "baseline"]
    snapshots = {"baseline": loaded.model, **snaps}
    return stages, snapshots, run["result"], student.eval(), state


def timing_options(args: argparse.Namespace, loaded: Loaded, data: Data, ch: Choices) -> dict:
    """interleaved_latency's keyword arguments for this run, the same for every timing it does:
    --latency-batch-size, --latency-repeats, the latency dtype, --latency-precision and
    --latency-max-repeats, and a text encoder's sequence length."""
    return {"batch_size": args.latency_batch_size, "repeats": args.latency_repeats,
            "dtype": ch.latency_dtype, "precision": args.latency_precision or None,
            "max_repeats": args.latency_max_repeats,
            **({"seq_len": data.seq_len} if loaded.text else {})}


def latency_step(args, loaded: Loaded, data: Data, ch: Choices, stages, snapshots) -> dict:
    """Time every stage's model back to back, interleaved (see measure.interleaved_latency), and
    write each stage's median and its ratio to the baseline into `stages`."""
    from .measure import interleaved_latency
    comp = interleaved_latency({s.name: snapshots[s.name] for s in stages}, warmup=3,
                               **timing_options(args, loaded, data, ch))
    for s in stages:
        s.latency_ms = comp.median_ms[s.name]
        s.latency_ratio = comp.ratio[s.name]
        s.latency_ratio_iqr = (comp.ratio_q1[s.name], comp.ratio_q3[s.name])
    return {**comp.to_dict(), "threads": torch.get_num_threads(), "device": str(ch.device),
            "seq_len": data.seq_len, "interleaved": True}


def save_step(args, loaded: Loaded, data: Data, ch: Choices, outputs) -> dict:
    """The head/adapter, the pruned model and its ONNX export, each only when asked, written
    to their staging places (`outputs`, renamed into place with the report); the artifacts
    record names the final paths."""
    from .heads import save_adapter
    from .persistence import save_pruned_model
    model = loaded.model
    artifacts = {"adapter": None, "pruned_model": None, "plot": None}
    meta = {"model": loaded.model_id, "target": args.target, "head": data.head_cfg, "run_id": ch.run_id}
    if args.save_adapter:
        save_adapter(model, outputs.stage("adapter"), data.head_cfg["kind"], meta)
        artifacts["adapter"] = str(outputs.by_role("adapter").path)
    if args.save_pruned_model or args.export_onnx:
        final = outputs.by_role("model").path

        def onnx(folder: Path) -> dict:  # written into the folder before it appears
            from .export import export_onnx
            record = export_onnx(model, folder / "model.onnx", seq_len=data.seq_len or 16)
            return {**record, "path": str(final / "model.onnx")}
        saved = save_pruned_model(model, outputs.stage("model"), loaded.processor,
                                  {**meta, "seed": args.seed}, extra=onnx if args.export_onnx else None)
        artifacts["pruned_model"] = str(final)
        artifacts["pruned_model_format"] = saved.format
        if saved.extra is not None:
            artifacts["onnx"] = saved.extra
            log.info("ONNX export %s: onnxruntime max |difference| to torch %.2e",
                     saved.extra["path"], saved.extra["max_abs_diff"])
    return artifacts


def build_report(args, argv, loaded: Loaded, data: Data, ch: Choices, stages, result, latency,
                 artifacts, distilled=None) -> dict:
    from .anatomy import supported_class
    from .planner import target_bound
    from .report import stage_dicts, summarize, versions
    shape, plan = loaded.shape, result.plan
    one_group = ch.align * shape.neuron_params / shape.total_params
    if args.stage == "s2":
        bound, why = None, "stage 2 alone removes whole units: it lands on the nearest count, not exactly"
    else:
        bound = target_bound(shape, plan, ch.width_policy)
        why = ("half a width step in every surviving block (one width for all, --width-policy uniform)"
               if plan.uniform_width is not None and ch.width_policy == "uniform" else
               "0.1 pp, as the automatic single width is only taken within it"
               if plan.uniform_width is not None and ch.width_policy == "auto" and bound > one_group / 2
               else f"half a group of {ch.align} MLP neurons" if ch.align > 1 else "half an MLP neuron")
    gone = set(plan.removed_blocks)
    kept_widths = [0 if i in gone else w - n for i, (w, n) in
                   enumerate(zip(shape.widths, result.neurons_removed))]
    return {
        "run_id": ch.run_id,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": ["vit-2ssp", *argv],
        "model": {"id": loaded.model_id, "class": supported_class(loaded.model), "layout": loaded.layout,
                  "num_blocks": shape.num_blocks, "hidden_size": shape.hidden_size,
                  "intermediate_size": max(shape.widths)},
        "config": {**vars(args), "device": str(ch.device), "ft_lr": data.ft_lr, "calib_size": ch.calib_size},
        "prune_config": asdict(result.config),
        "seed": args.seed,
        "depth_unit": plan.unit,
        "depth_unit_requested": args.depth_unit,
        "min_remaining": ch.min_remaining,
        "min_remaining_source": ch.min_remaining_source,
        "alignment": {"align": ch.align, "source": ch.align_source, "width_policy": ch.width_policy,
                      "uniform_width": plan.uniform_width,
                      "max_target_error": bound},
        "target": args.target,
        "objective": objective_section(args, ch, stages, result),
        "achieved_sparsity": result.achieved_sparsity,
        "target_error": (abs(result.achieved_sparsity - args.target) if ch.objective == "params"
                         else abs(1 - result.objective_ratio - args.target)),
        "target_bound": bound,
        "target_bound_why": why,
        "notes": run_notes(args, ch, result, data),
        "one_neuron_sparsity": shape.neuron_params / shape.total_params,
        "one_group_sparsity": one_group,
        "params_final": result.params_after_stage2,
        "stages": stage_dicts(stages),
        "summary": summarize(stages),
        "accuracy_note": data.accuracy_note,
        "latency_setup": latency,
        "plan": {**plan.to_dict(), "removed_indices": sorted(result.depth_order),
                 "kept_widths": kept_widths,
                 "removal_order": result.depth_order,
                 "neurons_removed_per_block": result.neurons_removed,
                 "estimated_params_removed": plan.params_before - plan.params_after,
                 "achieved_params_removed": result.params_before - result.params_after_stage2,
                 "split_search": {str(k): v for k, v in result.search.items()},
                 "neuron_selection": result.selection,
                 "neuron_selection_search": result.selection_search},
        "pruning_time_s": result.timings,
        "calibration": data.calib_info,
        "skipped_images": data.splits.skipped if data.splits is not None else [],
        "distillation": None if distilled is None else {
            **distilled.to_dict(), "inputs": sum(len(b["input_ids"]) if isinstance(b, dict) else len(b)
                                                 for b in data.distill_inputs),
            "augmented": data.distill_augmented},
        "versions": versions(),
        "artifacts": artifacts,
    }


def objective_section(args, ch: Choices, stages, result) -> dict:
    """What the target counted and how close the run came: the asked ratio of the objective, the
    planner's predicted one, the measured one (FLOPs counted; latency timed back to back with
    the baseline, with its spread), and the parameter and FLOP ratios that resulted. For a
    latency target the latency model is included."""
    by = {s.name: s for s in stages}
    base, final = by["baseline"], by["stage2"]
    out = {"objective": ch.objective, "flag": OBJECTIVE_FLAGS[ch.objective],
           "asked_ratio": 1 - args.target if ch.objective != "params" else None,
           "planned_ratio": 1 - result.plan.target,
           "predicted_ratio": result.objective_ratio,
           "params_ratio": final.params / base.params,
           "flops_ratio": final.flops / base.flops if base.flops else None,
           "latency_ratio": final.latency_ratio, "latency_ratio_iqr": final.latency_ratio_iqr}
    out["measured_ratio"] = {"params": out["params_ratio"], "flops": out["flops_ratio"],
                             "latency": out["latency_ratio"]}[ch.objective]
    if ch.latency_model is not None:
        out["latency_model"] = ch.latency_model.to_dict()
    return out


def run_notes(args, ch: Choices, result, data: Data) -> list[str]:
    """What the run did otherwise than a reader of its command might assume, said where the
    summary and the report show it."""
    notes = []
    plan = result.plan
    if args.stage == "s2":
        notes.append(f"--stage s2 removes whole {plan.unit} units only: {plan.blocks_to_prune} "
                     f"(the count nearest the target; --split does not apply)")
    elif args.split == "auto" and plan.split in ("alpha", "fixed") and args.stage == "both":
        notes.append(f"split between stages: {plan.split} ("
                     + ("no calibration data to search with" if not data.calib_inputs else
                        "one feasible depth count only") + ")")
    if data.calib_inputs and sum(len(b["input_ids"]) if isinstance(b, dict) else len(b)
                                 for b in data.calib_inputs) < 2:
        notes.append("one calibration input: nothing could be held out, so the 'held-out' "
                     "distances of the split and selection searches are measured on the input "
                     "pruning fitted (use --calib-size 2 or more)")
    if plan.attention_indices:
        notes.append(f"the {OBJECTIVE_FLAGS[ch.objective]} target lies between two counts of whole "
                     f"blocks: {plan.blocks_to_prune} block(s) and the attention sublayers of "
                     f"blocks {list(plan.attention_indices)} were removed (mixed depth units; "
                     f"--no-mixed-depth removes blocks only)")
    if result.params_after_stage2 == result.params_before:
        notes.append("nothing was removed: the target is below what one unit or neuron group removes")
    return notes


def print_summary(args, rep: dict, stages, result, json_path: Path, md_path: Path) -> None:
    from .report import markdown
    base, final = stages[0], stages[-1]
    acc = "" if base.top1 is None else f", top-1 {base.top1:.4f} -> {final.top1:.4f}"
    if final.cosine is not None:
        acc = f", embedding cosine {final.cosine:.4f}, neighbour agreement {100 * final.agreement:.1f}%"
    q1, q3 = final.latency_ratio_iqr
    obj = rep.get("objective") or {}
    if obj.get("asked_ratio") is not None:
        what = "FLOPs" if obj["objective"] == "flops" else "latency"
        print(f"{obj['flag']} {obj['asked_ratio']:g}: {what} ratio predicted "
              f"{obj['predicted_ratio']:.4f}, measured {obj['measured_ratio']:.4f}"
              + (f" [quartiles {q1:.3f}, {q3:.3f}]" if obj["objective"] == "latency" else "")
              + (f" (planned again after the first plan measured "
                 f"{obj['attempts'][0]['measured_ratio']:.4f})" if len(obj.get("attempts") or []) > 1
                 else f" (the structure nearest below the asked ratio: {obj['planned_ratio']:.4f})"
                 if abs(obj["planned_ratio"] - obj["asked_ratio"]) > 1e-9 else ""))
    print(f"vit-2ssp {rep['run_id']}: params {base.params:,} -> {final.params:,} "
          + (f"(target {args.target:.4f}, achieved {result.achieved_sparsity:.4f}), "
             if obj.get("objective", "params") == "params" else
             f"(parameter sparsity {result.achieved_sparsity:.4f}), ") +
          f"latency ratio {final.latency_ratio:.3f} [quartiles {q1:.3f}, {q3:.3f}] (median of "
          f"{rep['latency_setup']['repeats']} back-to-back rounds; median times "
          f"{base.latency_ms:.2f} -> {final.latency_ms:.2f} ms){acc}")
    if rep.get("budget_search"):
        b = rep["budget_search"]
        print(f"budget {b['budget']} {b['value']:g}: target {b['chosen']:g} chosen after "
              f"{b['prunings']} prunings (first over budget: {b['first_rejected']})")
    for note in rep.get("notes", []):
        print(f"note: {note}")
    for warning in rep["latency_setup"].get("warnings", []):
        log.warning("latency: %s", warning)
    print(f"report: {md_path} (json: {json_path})")
    if not args.quiet:
        print(markdown(rep).split("## Plan")[0].rstrip())


if __name__ == "__main__":
    sys.exit(main())
