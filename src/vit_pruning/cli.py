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
import contextlib
import os
import signal
import sys
import threading
from dataclasses import fields

import torch

from .config import (DEFAULT_MODEL, DEPTH_UNITS, DISTILL_AUGMENT, DISTILL_MATCH, DISTILL_SENTENCES,
                     EMBEDDED, LATENCY_DTYPES, MATCHES, PRECISIONS, PRIORS, SAVE_DTYPES, SECTIONS,
                     SELECTIONS, STAGES, TRAINABLE, RunConfig, from_flags)
from .errors import UsageError, out_of_memory_line

__all__ = ["EMBEDDED", "UsageError", "build_parser", "config_from_args", "main", "console_main"]


def _defaults() -> dict:
    """Every flag's default, read from the run config's fields (the one home of defaults)."""
    out = {}
    top = RunConfig()
    for f in fields(RunConfig):
        if f.name not in SECTIONS:
            out[f.name] = getattr(top, f.name)
    for name in SECTIONS:
        section = getattr(top, name)
        out.update({f.name: getattr(section, f.name) for f in fields(section)})
    out["target"] = None  # given as text: parsed into targets
    return out


DEFAULTS = _defaults()


def build_parser() -> argparse.ArgumentParser:
    """The command line: one group of flags per concern; defaults and choices from the config."""
    ap = argparse.ArgumentParser(
        prog="vit-2ssp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _structure_flags(_targets_flags(ap))
    _data_flags(ap)
    _head_flags(ap)
    _recovery_flags(ap)
    _run_flags(_output_flags(ap))
    _timing_flags(ap)
    return ap


def _targets_flags(ap) -> argparse._ArgumentGroup:
    """The targets (--target, --target-flops, --target-latency) and the budgets; returns the
    "what to prune" group."""
    g = ap.add_argument_group("what to prune")
    g.add_argument("--target", default=DEFAULTS["target"],
                   help="global parameter sparsity in (0, 1): fraction of ALL model parameters to "
                        "remove; a comma list (0.1,0.2,0.3) prunes the unpruned model to each, "
                        "sharing every step that does not depend on the target, and reports the "
                        "trade-off")
    g.add_argument("--target-flops", default=DEFAULTS["target_flops"], metavar="R",
                   help="keep a fraction R in (0, 1) of the model's FLOPs per forward instead of a "
                        "parameter target (a comma list prunes to each); depth and width are "
                        "traded by their FLOPs")
    g.add_argument("--target-latency", default=DEFAULTS["target_latency"], metavar="R",
                   help="keep a fraction R in (0, 1) of the model's latency on --device at "
                        "--latency-dtype and --latency-batch-size (a comma list prunes to each): "
                        "a latency model is measured there first (seconds; cached, see "
                        "--latency-cache) and the structure planned on it")
    b = ap.add_argument_group("budgets instead of a target: the largest target that keeps one")
    b.add_argument("--max-accuracy-drop", type=float, default=DEFAULTS["max_accuracy_drop"], metavar="P",
                   help="top-1 percentage points the pruned model may lose against the baseline "
                        "(needs labelled data)")
    b.add_argument("--max-kl", type=float, default=DEFAULTS["max_kl"], metavar="X",
                   help="largest mean KL of the logits to the unpruned model's (classifiers, "
                        "label-free)")
    b.add_argument("--min-cosine", type=float, default=DEFAULTS["min_cosine"], metavar="X",
                   help="smallest mean cosine of the outputs to the unpruned model's, in (0, 1] "
                        "(backbones and text encoders, label-free)")
    b.add_argument("--target-resolution", type=float, default=DEFAULTS["target_resolution"], metavar="R",
                   help="grid of the budget search: targets R, 2R, ... up to the largest feasible "
                        "(default 0.01); bisection prunes about log2(grid size) + 1 times")
    return g


def _structure_flags(g) -> None:
    """How the structure is chosen (the "what to prune" group, `g`)."""
    g.add_argument("--model", default=DEFAULTS["model"],
                   help=f"hub id, local model folder, or 'embedded' (offline digits ViT); default {DEFAULT_MODEL}")
    g.add_argument("--stage", choices=STAGES, default=DEFAULTS["stage"],
                   help="both stages (default), s1 = width only (MLP neurons, and the heads of --heads N), "
                        "s2 = depth only (nearest count, not exact)")
    g.add_argument("--depth-unit", choices=DEPTH_UNITS, default=DEFAULTS["depth_unit"],
                   help="stage 2 removes whole blocks (default), only attention sublayers (2SSP "
                        "paper), or auto: try both on calibration data and keep the better")
    g.add_argument("--heads", default=DEFAULTS["heads"], metavar="{auto,off,N}",
                   help="attention heads as a unit of stage 1: auto (default): the split search "
                        "also tries removing the cheapest eighth, quarter (and more while it "
                        "helps) of all heads, refit like the MLP, and keeps them only where "
                        "held-out calibration data says they help; off: MLP neurons and depth "
                        "units only (the plans of earlier versions); N: N heads from every block "
                        "that keeps its attention, each keeping at least one (N below the most "
                        "heads a block has)")
    g.add_argument("--no-mixed-depth", action="store_true",
                   help="with --target-latency: a target between two counts of whole blocks is "
                        "met by one block more, not by removing attention sublayers of kept "
                        "blocks too (the default)")
    g.add_argument("--min-remaining", type=int, default=DEFAULTS["min_remaining"],
                   help="fewest MLP neurons left in a block (default: the seed's 512 where the MLP is wider "
                        "than 512, else width/4)")
    g.add_argument("--split", default=DEFAULTS["split"],
                   help="width/depth split: auto (search with data, alpha without), search, alpha, or a depth count")
    g.add_argument("--allocation", choices=("uniform", "global"), default=DEFAULTS["allocation"],
                   help="neurons per block: uniform (default) or the globally least important")
    g.add_argument("--compensation", choices=("lsq", "bias", "none"), default=DEFAULTS["compensation"],
                   help="after removing neurons refit fc2 by least squares (default), fold the bias, or nothing")
    g.add_argument("--neuron-selection", choices=SELECTIONS, default=DEFAULTS["neuron_selection"],
                   help="which MLP neurons go: the 2SSP activation score, the least-squares cost "
                        "given the refit, or auto (default): both tried on held-out calibration "
                        "images, the better kept")
    g.add_argument("--refit-prior", choices=PRIORS, default=DEFAULTS["refit_prior"],
                   help="what the least-squares refit's damping pulls toward: zero (the plans and "
                        "weights of earlier versions), the unpruned weights (stronger damping), "
                        "or auto (default): the unpruned weights only where held-out calibration "
                        "images clearly prefer them")
    g.add_argument("--depth-method", choices=("greedy", "bi"), default=DEFAULTS["depth_method"],
                   help="greedy by output fidelity (default) or one-shot Block Influence")
    g.add_argument("--align", default=DEFAULTS["align"],
                   help="kept MLP widths are multiples of N, as GPU tensor cores need (bf16 runs 5x "
                        "slower at widths not a multiple of 8); auto (default): 8, halved on small "
                        "models until half a group of neurons is <= 0.1 pp of the parameters; 1 = "
                        "exact to one neuron")
    g.add_argument("--width-policy", choices=("auto", "uniform", "per-block"), default=DEFAULTS["width_policy"],
                   help="uniform: one MLP width for every surviving block (the saved model is a plain "
                        "transformers model); per-block: widths as even as the target allows; auto "
                        "(default): uniform when --align > 1 and it misses the target by <= 0.1 pp")


def _data_flags(ap) -> None:
    """What is calibrated and measured on."""
    d = ap.add_argument_group("data")
    d.add_argument("--load-cifar", action="store_true", help="evaluate on CIFAR-10 (same as --dataset cifar10)")
    d.add_argument("--dataset", default=DEFAULTS["dataset"],
                   help="cifar10, cifar100, digits (offline), a hub id or a local dataset folder "
                        "(load_from_disk or imagefolder with train/ and test/ or val/); default: digits for "
                        "--model embedded, none otherwise")
    d.add_argument("--image-column", default=DEFAULTS["image_column"], help="image column name when not obvious")
    d.add_argument("--label-column", default=DEFAULTS["label_column"], help="label column name when not obvious")
    d.add_argument("--test-split", default=DEFAULTS["test_split"], metavar="NAME",
                   help="the dataset's split that accuracy is measured on (default: test, or "
                        "validation where there is no test split, as in an image folder with "
                        "train/ and val/); calibration images always come from train")
    d.add_argument("--cifar-train-pct", type=float, default=DEFAULTS["cifar_train_pct"], help="fraction of the train split in (0, 1] (default 0.25): its first rows, or evenly spaced rows where the split is ordered by label (an image folder)")
    d.add_argument("--cifar-test-pct", type=float, default=DEFAULTS["cifar_test_pct"], help="fraction of the test split in (0, 1] (default 0.25), taken as --cifar-train-pct")
    d.add_argument("--skip-bad-images", action="store_true",
                   help="leave out images that cannot be read (corrupt, truncated, not images, over "
                        "89 million pixels), named in the report; default: refuse the dataset "
                        "before any work, naming the first such image")
    d.add_argument("--calib-size", type=int, default=DEFAULTS["calib_size"],
                   help="calibration images from the train split (default 64), or sentences for a text "
                        "encoder (default 512)")
    d.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="batch size for evaluation, calibration, fine-tuning (32)")
    d.add_argument("--eval-batches", type=int, default=DEFAULTS["eval_batches"],
                   help="test batches used for accuracy, or of evaluation sentences (default 5)")
    d.add_argument("--text-file", default=DEFAULTS["text_file"], metavar="PATH",
                   help="text encoders: UTF-8 file, one sentence per line, split into disjoint "
                        "calibration and evaluation sentences (default: Python's documentation, offline)")


def _head_flags(ap) -> None:
    """The classifier head."""
    h = ap.add_argument_group("head")
    h.add_argument("--replace-classifier", action="store_true", help="fresh linear head for the dataset's classes")
    h.add_argument("--use-adapter", action="store_true", help="bottleneck adapter + head instead")
    h.add_argument("--adapter-reduction", type=int, default=DEFAULTS["adapter_reduction"], help="adapter bottleneck = hidden / reduction (4)")
    h.add_argument("--load-adapter", default=DEFAULTS["load_adapter"], metavar="PATH", help="install a head saved by --save-adapter")
    h.add_argument("--do-finetune", action="store_true", help="train the head before measuring the baseline")
    h.add_argument("--freeze-backbone", action="store_true", help="fine-tune only the head/adapter")
    h.add_argument("--ft-epochs", type=int, default=DEFAULTS["ft_epochs"], help="fine-tuning epochs (1)")
    h.add_argument("--ft-lr", type=float, default=DEFAULTS["ft_lr"], help="fine-tuning learning rate (1e-3 head only, 1e-4 full)")
    h.add_argument("--recover", action="store_true", help="re-tune the head after pruning; reported as stage 'recovered'")
    h.add_argument("--save-adapter", action="store_true", help="write artifacts/<run_id>/adapter.pt")


def _recovery_flags(ap) -> None:
    """Label-free distillation after pruning, and its checkpoints."""
    r = ap.add_argument_group("recovery by distillation (label-free)")
    r.add_argument("--distill-steps", type=int, default=DEFAULTS["distill_steps"],
                   help="train the pruned model to reproduce the unpruned one on unlabeled inputs for N "
                        "steps (0 = off, default); reported as stage 'distilled'")
    r.add_argument("--distill-lr", type=float, default=DEFAULTS["distill_lr"], help=f"learning rate ({DEFAULTS['distill_lr']:g})")
    r.add_argument("--distill-batch-size", type=int, default=DEFAULTS["distill_batch_size"], help="inputs per step (32)")
    r.add_argument("--distill-train", choices=TRAINABLE, default=DEFAULTS["distill_train"],
                   help=f"which parameters learn: all, every block (attention, MLP, LayerNorms), the "
                        f"blocks' MLPs, the LayerNorms, or the fc2s (default {DEFAULTS['distill_train']}: what the "
                        f"benchmarks rewarded)")
    r.add_argument("--distill-match", choices=("auto", *MATCHES), default=DEFAULTS["distill_match"],
                   help=f"what the student learns: the output fidelity is measured on (logits, "
                        f"embedding); for a text encoder every token's final hidden state and their "
                        f"pooling (tokens); or that and every kept block's hidden states, each against "
                        f"the teacher block whose place it takes (layers; a text encoder's every "
                        f"token). auto: {DISTILL_MATCH}")
    r.add_argument("--distill-temperature", type=float, default=DEFAULTS["distill_temperature"],
                   help="softmax temperature of the KL for classifiers (2)")
    r.add_argument("--distill-size", type=int, default=DEFAULTS["distill_size"],
                   help="unlabeled inputs distilled on: train-split images drawn by --seed (default "
                        "2048, held in host memory), or sentences for a text encoder (default: every "
                        "--text-file sentence that is neither calibration nor evaluation, at most "
                        f"{DISTILL_SENTENCES:,} drawn by --seed; with Python's docs, the standard "
                        "library's docstrings)")
    r.add_argument("--distill-augment", type=int, default=DEFAULTS["distill_augment"], metavar="K",
                   help=f"text encoders: also distill on K word-level variants of every calibration "
                        f"sentence (words dropped, cropped, replaced or spliced; the teacher labels "
                        f"them), in-domain inputs the sentence pool lacks (default {DISTILL_AUGMENT}: "
                        f"what the distillation table rewarded; 0 = off)")
    r.add_argument("--mixed-precision", choices=PRECISIONS, default=DEFAULTS["mixed_precision"],
                   help="precision of distillation and head fine-tuning steps (accelerate): auto = "
                        "bf16 on a CUDA device that runs it, no (float32) on the CPU")
    r.add_argument("--grad-accumulation", type=int, default=DEFAULTS["grad_accumulation"], metavar="N",
                   help="micro-batches of --distill-batch-size accumulated per optimizer step (1)")
    r.add_argument("--checkpoint-every", type=int, default=DEFAULTS["checkpoint_every"], metavar="N",
                   help="write the distillation's state every N steps, atomically, to "
                        "<artifacts-dir>/<run-id>/checkpoint (0 = never); --resume goes on from it")
    r.add_argument("--resume", action="store_true",
                   help="go on from the checkpoint of --run-id: skips pruning, loads the student, "
                        "optimizer, schedule and draw state, and distills the remaining steps")


def _output_flags(ap) -> argparse._ArgumentGroup:
    """Where the run writes, its seed and device."""
    o = ap.add_argument_group("output and run")
    o.add_argument("--save-pruned-model", action="store_true", help="save the pruned model (off by default)")
    o.add_argument("--pruned-output-dir", default=DEFAULTS["pruned_output_dir"], metavar="DIR",
                   help="where --save-pruned-model writes <run-id>/ (default %(default)s)")
    o.add_argument("--reports-dir", default=DEFAULTS["reports_dir"], metavar="DIR",
                   help="where report-<run-id>.{json,md,png} go (default %(default)s)")
    o.add_argument("--artifacts-dir", default=DEFAULTS["artifacts_dir"], metavar="DIR",
                   help="where --save-adapter and --checkpoint-every write <run-id>/ (default "
                        "%(default)s)")
    o.add_argument("--run-id", default=DEFAULTS["run_id"], help="name of this run (default: UTC timestamp)")
    o.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed for calibration choice, heads and shuffling, in 0..2**32-1 (0)")
    o.add_argument("--device", default=DEFAULTS["device"], help="auto (cuda if present, else cpu), cpu, cuda, cuda:1 ...")
    o.add_argument("--export-onnx", action="store_true",
                   help="also write model.onnx beside the saved pruned model (implies "
                        "--save-pruned-model; needs pip install 'vit-2ssp[export]')")
    o.add_argument("--save-dtype", choices=SAVE_DTYPES, default=DEFAULTS["save_dtype"], help="saved "
                   "weights' dtype: auto = the checkpoint's (runs prune in float32; onnx stays float32)")
    return o


def _timing_flags(ap) -> None:
    """How latency is timed."""
    t = ap.add_argument_group("latency timing (quick, for a run whose latency does not matter: --latency-precision 0 --latency-repeats 3)")
    t.add_argument("--latency-batch-size", type=int, default=DEFAULTS["latency_batch_size"], help="batch size of latency timing (1)")
    t.add_argument("--latency-repeats", type=int, default=DEFAULTS["latency_repeats"],
                   help="timed rounds at least; each round times every stage once, back to back (10)")
    t.add_argument("--latency-precision", type=float, default=DEFAULTS["latency_precision"],
                   help="time more rounds (doubling them) until every latency ratio's 95%% "
                        "interval is within +- this, up to --latency-max-repeats; 0 times "
                        "exactly --latency-repeats rounds (0.01)")
    t.add_argument("--latency-max-repeats", type=int, default=DEFAULTS["latency_max_repeats"],
                   help="the most rounds --latency-precision may time (10 x --latency-repeats, "
                        "or as many as fit in 10 s where that is more)")
    t.add_argument("--latency-cache", default=DEFAULTS["latency_cache"], metavar="DIR",
                   help="where measured latency models are kept (default $VIT_2SSP_CACHE, else "
                        "~/.cache/vit-2ssp; safe to delete); 'none' measures every run")
    t.add_argument("--latency-dtype", choices=LATENCY_DTYPES, default=DEFAULTS["latency_dtype"],
                   help="precision of latency timing (autocast): auto = bfloat16 on CUDA, float32 on CPU")
    t.add_argument("--latency-tolerance", type=float, default=DEFAULTS["latency_tolerance"],
                   metavar="T", help="a --target-latency R is met when the final timing is within "
                                     "T of R (0.03); otherwise the summary, report and plot say "
                                     "it was missed and the run exits 3")
    t.add_argument("--accept-latency-miss", action="store_true",
                   help="a missed --target-latency still exits 0 (the miss is reported)")
    t.add_argument("--no-steady-allocator", dest="steady_allocator", action="store_false",
                   help="CPU timings leave glibc malloc's thresholds as they are; by default the "
                        "first timing fixes them for the rest of the process, so that a model's "
                        "time does not depend on which model freed memory before it (recorded "
                        "in the report's latency_setup)")


def _run_flags(o) -> None:
    """Dry run and verbosity."""
    o.add_argument("--dry-run", action="store_true", help="print the plan and exit; prune nothing, write nothing")
    o.add_argument("--quiet", action="store_true", help="only warnings and the final summary")


def config_from_args(ns: argparse.Namespace) -> RunConfig:
    """The run config of parsed arguments: the only code that reads the Namespace. Every check
    that needs no model is done here (a UsageError naming the flag)."""
    return from_flags(vars(ns))


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is so that every write in progress is undone."""


def _who() -> str:
    """The name errors are printed under: with the process's rank under a launcher."""
    from .accel import launched, world
    if not launched():
        return "vit-2ssp"
    rank, count = world()
    return f"vit-2ssp (rank {rank} of {count})"


def _peer_line(exc: BaseException) -> str | None:
    """The error line for a collective operation failing because another process of a launched
    job died (gloo / NCCL connection errors); None for any other error."""
    from .accel import launched
    backend = getattr(torch.distributed, "DistBackendError", ())
    text = str(exc).lower()
    if not launched() or not (isinstance(exc, backend) or any(w in text for w in (
            "gloo", "nccl", "connection closed", "connection reset", "broken pipe", "timed out"))):
        return None
    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    return f"another process of this job stopped ({first}); nothing half-written was kept"


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Run the command line in this process and return its exit code: 0, or 2 for bad input (one
    line on stderr). Logging, verbosity and the random state are set for the run and restored
    after. Signals are left alone and an interrupt propagates (after every staged write is
    undone), so a caller such as a test runner stops on Ctrl-C (see :func:`console_main`)."""
    from .app.checks import check_environment
    from .app.run import run
    from .app.scope import run_scope
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    who = _who()
    try:
        cfg = config_from_args(args)
        check_environment(cfg)
        with run_scope(quiet=cfg.output.quiet):
            return run(cfg, argv)
    except UsageError as exc:
        print(f"{who}: error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError, MemoryError) as exc:
        line = out_of_memory_line(exc, bool(args.distill_steps)) or _peer_line(exc)
        if line is None:
            raise
        print(f"{who}: error: {line}", file=sys.stderr)
        return 1


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises Terminated (so every write in progress is undone) while inside."""
    previous = signal.signal(signal.SIGTERM, _terminate) if \
        threading.current_thread() is threading.main_thread() else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def console_main(argv: list[str] | None = None) -> int:
    """The `vit-2ssp` console script (and `python -m vit_pruning`): :func:`main` with SIGTERM
    and Ctrl-C turned into one line and exit codes 143 and 130. Only this process-owning entry
    point installs a signal handler."""
    who = _who()
    try:
        with _sigterm_raises():
            return main(argv)
    except Terminated:
        print(f"{who}: terminated (SIGTERM); nothing half-written was kept", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{who}: interrupted; nothing half-written was kept", file=sys.stderr)
        return 130
    except BrokenPipeError:  # whoever read the output stopped (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(console_main())
