"""Every option of a run, and every default, stated once with why.

Two layers:

- the library's configs, what the functions below the command line take: :class:`PruneConfig`
  (what :func:`vit_pruning.prune_2ssp`, :class:`vit_pruning.Pruner`, :func:`vit_pruning.sweep`
  and :func:`vit_pruning.search_target` do) and :class:`DistillConfig` (what
  :func:`vit_pruning.distill` does);
- the command line's :class:`RunConfig`: one typed section per concern (targets, pruning, data,
  head, recovery, timing, outputs), each field named as its flag (``cifar_train_pct`` is
  ``--cifar-train-pct``). The parser reads its defaults and choices from here
  (:mod:`vit_pruning.cli`), and :meth:`RunConfig.check` is where a value's range is checked
  (one :class:`UsageError` naming the flag).

A field marked ``job=False`` does not change what a run computes (where it writes, how it is
timed, how much it says): :meth:`RunConfig.job` is every other field, which a resumed run must
agree with (:mod:`vit_pruning.checkpoint`), so no new flag can be left out of it.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import UsageError
from .planner import (WIDTH_POLICIES, ModelShape, PruningPlan, check_targets, default_align,
                      make_plan, max_depth_units, units_of)

# ---- the library's vocabularies (one table each) ----
OBJECTIVES = ("params", "flops", "latency")  # what a target removes a fraction of
SPLITS = ("auto", "alpha", "search")
NEURON_SELECTIONS = ("score", "lsq")  # how width.prune_width_sequential ranks neurons
SELECTIONS = ("auto", *NEURON_SELECTIONS)  # "auto": both tried on held-out calibration data
REFIT_PRIORS = ("zero", "unpruned")  # what the least-squares refit's damping pulls toward
PRIORS = ("auto", *REFIT_PRIORS)  # "auto": "unpruned" where the held-out rows clearly prefer it
PRIOR_RIDGE = 1e-2  # refit_prior="unpruned": damping added to `ridge`, toward the unpruned
# weights. all-MiniLM-L6-v2 (calibration draw 0, targets 0.2 / 0.3 / 0.4): ridge 1e-3 toward zero
# gives cosine 0.9548 / 0.8996 / 0.8115, 1.1e-2 toward the unpruned weights 0.9556 / 0.9012 /
# 0.8152 (3e-3: 0.9553 / 0.9006 / 0.8143); the embedded ViT's KL rises 1.5x-2x at 0.3-0.5 with
# it, and its held-out rows clearly prefer it only at 0.1 (KL 9.9e-6 -> 5.4e-6, 3 draws), so
# "auto" keeps zero there from 0.2 on
STAGES = ("both", "s1", "s2")
DEPTH_UNITS = ("block", "attention", "auto")
HEADS = ("auto", "off")  # attention heads as a unit: tried by the split search, or never;
# an int is a fixed count removed from every block that keeps its attention
HEAD_FRACTIONS = (0.125, 0.25, 0.375, 0.5)  # heads="auto": shares of all heads the split
# search tries, in order, at each depth count: the first two that can meet the target, each
# further one while the last improved
HEAD_GAIN_Z = 3.0  # heads="auto": a head plan's held-out gain over the best plan without heads
# must be this many standard errors clear, in per-row log ratios (pipeline.clear_gain). On the
# embedded ViT, 10 calibration draws x targets 0.3-0.7: plain differences at z > 2 refused 21
# head plans, 16 of them closer to the unpruned model on the test split; log ratios at z > 3
# accept every plan that rule did and 9 it refused (8 closer on the test split, one 1.12x
# further) and refuse the 6 that were further by 1.6x to 3.1x
TRAINABLE = ("all", "blocks", "mlp", "norms", "fc2")  # what distillation trains
MATCHES = ("output", "tokens", "layers")  # what the student matches
PRECISIONS = ("auto", "no", "bf16", "fp16")  # of training steps (accelerate)
LATENCY_DTYPES = ("auto", "float32", "bfloat16", "float16")
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")  # a saved pruned model's weights (auto:
# the dtype the checkpoint stores its weights in)

SEED_MIN_REMAINING = 512  # the seed's fewest neurons per block
NARROW_FRACTION = 4  # on MLPs no wider than 512, min_remaining defaults to width // 4
DISTILL_CACHE_LIMIT = 4 << 30  # bytes of cached layer targets beyond which the teacher runs every step


def default_min_remaining(shape: ModelShape) -> tuple[int, str]:
    """(min_remaining, where it comes from) for a model of `shape`: the seed's 512 where the
    widest MLP is wider than that, else a quarter of its width."""
    width = max(shape.widths)
    if width > SEED_MIN_REMAINING:
        return SEED_MIN_REMAINING, "seed default 512"
    return max(1, width // NARROW_FRACTION), f"default capped to width/{NARROW_FRACTION}"


@dataclass(frozen=True)
class WidthLimits:
    """min_remaining and align for one model, and where each came from (the one place that
    resolves "auto" and None; :meth:`PruneConfig.resolved` and the CLI both ask here)."""

    min_remaining: int
    min_remaining_source: str
    align: int
    align_source: str


def _is_count(value: Any) -> bool:
    """Whether `value` is an int and not a bool (True is not a count of heads or units)."""
    return isinstance(value, int) and not isinstance(value, bool)


def fixed_heads_problem(shape: ModelShape, per_block: int) -> str | None:
    """Why a fixed count of heads per block (heads=N, N > 0) cannot be removed, or None: N must
    be below the most heads a block has, since every block keeps at least one (losing all of
    them is the attention depth unit) and a larger N would silently mean fewer. Blocks with
    fewer heads than N (Swin's early stages) keep one. Shapes that do not count heads are left
    to the planner."""
    if not per_block or shape.heads is None:
        return None
    most = max(shape.heads, default=0)
    if per_block < most:
        return None
    allowed = f"allowed 1..{most - 1}" if most > 1 else "none can go: use auto or off"
    return (f"this model's blocks have at most {most} attention heads and each keeps at least "
            f"one ({allowed})")


def width_limits(shape: ModelShape, min_remaining: int | None, align: int | str) -> WidthLimits:
    """Resolve `min_remaining` (None: :func:`default_min_remaining`) and `align` ("auto":
    :func:`vit_pruning.planner.default_align`) for `shape`; ValueError for values no model of
    this shape can take."""
    if min_remaining is None:
        mr, mr_source = default_min_remaining(shape)
    else:
        mr, mr_source = min_remaining, "--min-remaining"
    widest = max(shape.widths)
    if not isinstance(mr, int) or not 1 <= mr < widest:
        raise ValueError(f"min_remaining must be in [1, {widest}) (below the widest MLP, "
                         f"{widest} neurons), got {mr}")
    if align == "auto":
        a = default_align(shape)
        a_source = ("auto: 8, what bf16/fp16 tensor cores need" if a == 8 else
                    f"auto: {a}, as half a group of 8 neurons would exceed 0.1 pp of this "
                    f"model's parameters")
        return WidthLimits(mr, mr_source, a, a_source)
    if not isinstance(align, int) or isinstance(align, bool) or align < 1:
        raise ValueError(f"align must be 'auto' or an integer >= 1, got {align!r}")
    return WidthLimits(mr, mr_source, align, "--align")


@dataclass(frozen=True)
class PruneConfig:
    """Options of :func:`prune_2ssp`; each default is what the benchmarks rewarded."""

    unit: str = "block"  # "block" (whole blocks, seed docs), "attention" (2SSP paper), or
    # "auto": try both and keep the one with the better calibration fidelity
    min_remaining: int | None = None  # fewest MLP neurons a block keeps; None: the seed's 512
    # where the MLP is wider than 512, else a quarter of its width (default_min_remaining)
    split: str | int = "auto"  # "search" with calibration data, "alpha" without; or an int count
    alpha: float = 1.5  # 2SSP paper's split exponent
    depth_method: str = "greedy"  # "greedy" (output fidelity) or "bi" (Block Influence)
    allocation: str = "uniform"  # "uniform" per block or "global" least-important neurons
    compensation: str = "lsq"  # refit fc2 by least squares ("lsq"), "bias", or "none"
    refit_target: str = "model"  # lsq fits the unpruned model's block outputs, or "block" its own MLP
    ridge: float = 1e-3  # lsq damping, relative to the mean activation energy
    refit_prior: str = "auto"  # what the lsq refit's damping pulls toward: "zero" (`ridge`,
    # the plans and weights of earlier versions exactly), "unpruned" (`ridge` + PRIOR_RIDGE
    # toward the unpruned weights of the kept columns), or "auto": after the split search and
    # the neuron selection, "unpruned" is tried on the chosen split and kept only where its
    # held-out gain is clear (pipeline.clear_gain); passes run outside that choice use "zero"
    selection: str = "auto"  # neurons dropped: lowest 2SSP activation "score", lowest
    # least-squares cost given the refit ("lsq", needs compensation="lsq"), or "auto": after the
    # split search, both are tried on the chosen split and the one with the better held-out
    # calibration fidelity is used (split trials themselves rank by the score: cheaper)
    sequential: bool = True  # calibrate each block on the already-pruned model's activations
    max_search: int = 6  # most depth counts tried by split="search"
    greedy_rescore: int | None = 3  # the first greedy step screens every unit on half the
    # calibration batches and finishes the 3 best on all; later steps rescore only the 3 best
    # (lazy); None: every candidate on every batch at every step
    search_tokens: int | None = None  # calibration tokens fit per split trial (None: 4x the
    # widest MLP), at most half the calibration images; as many other images score the trial.
    # The final stage 1 always fits every calibration image
    stages: str = "both"  # "both", "s1" (width only) or "s2" (depth only, nearest count)
    align: int | str = "auto"  # kept MLP widths are multiples of this: bf16/fp16 tensor cores run
    # a matmul 5x slower when its width is not a multiple of 8 (measured on an H200). "auto": 8,
    # halved on small models until half a group of neurons is <= 0.1 pp of the parameters
    width_policy: str = "auto"  # "uniform": one width for every surviving block (the saved model
    # is plain transformers), "per-block": as even as the target allows, "auto": uniform when
    # align > 1 and it misses the target by at most 0.1 pp
    objective: str = "params"  # what the target removes a fraction of: "params", "flops" (of
    # one forward) or "latency" (predicted by `latency_model`, see vit_pruning.objective)
    latency_model: Any = None  # objective="latency": the measured objective.LatencyModel to plan
    # on (None: measured on the model's device at batch 1, float32, when the Pruner starts)
    seq_len: int = 128  # text encoders: tokens per sentence of the FLOP / latency count
    heads: str | int = "auto"  # attention heads as a unit: "auto": the split search also tries
    # removing an eighth, a quarter (and on while that helps, up to half) of all heads, the
    # cheapest on calibration data (refit like the MLP), and keeps them only where the held-out
    # calibration distance is lower than without; "off": today's
    # units only (the plans of earlier versions exactly); an int: that many heads from every
    # block that keeps its attention (the depth counts tried are those that meet the target
    # with them). Any objective; "auto" needs calibration data
    mixed_depth: bool = True  # objective="latency" with unit "block" (or "auto"): a target that
    # falls between two counts of whole blocks (a block costs more time than every MLP width can
    # make up, as at batch 1) is met by removing attention sublayers of kept blocks as well,
    # instead of one block more than asked (see planner.mixed_attention)

    def plan(self, shape: ModelShape, target: float, unit: str | None = None, **kw) -> PruningPlan:
        """make_plan with this config's unit, min_remaining, alpha, align and width policy
        (resolved for `shape` first, see :meth:`resolved`)."""
        cfg = self.resolved(shape)
        return make_plan(shape, target, unit or cfg.unit, cfg.min_remaining, alpha=cfg.alpha,
                         align=int(cfg.align), width_policy=cfg.width_policy, **kw)

    @property
    def refit_damping(self) -> tuple[float, bool]:
        """(damping, anchored) of the lsq refit: `ridge` toward zero, or with refit_prior
        "unpruned" `ridge` + PRIOR_RIDGE toward the unpruned weights ("auto" undecided: zero)."""
        if self.refit_prior == "unpruned":
            return self.ridge + PRIOR_RIDGE, True
        return self.ridge, False

    @property
    def fixed_heads(self) -> int:
        """Heads removed from every block that keeps its attention (heads=N > 0), else 0."""
        return self.heads if _is_count(self.heads) and self.heads > 0 else 0

    def _check_split(self, shape: ModelShape) -> None:
        """ValueError for a split no run on `shape` can take: a depth count outside 0 to the
        most removable units, or any count where one stage runs alone (as the CLI's --split)."""
        if self.split in SPLITS:
            return
        if not _is_count(self.split):
            raise ValueError(f"split must be one of {SPLITS} or an int, got {self.split!r}")
        if self.stages != "both" and self.split != (0 if self.stages == "s1" else None):
            raise ValueError(f"split={self.split} does not apply to stages={self.stages!r}: "
                             f"stage {self.stages[1]} alone chooses no width/depth split")
        most = max(max_depth_units(shape, u) for u in units_of(self.unit)) if self.unit in \
            DEPTH_UNITS else None
        if self.split < 0 or (most is not None and self.split > most):
            raise ValueError(f"split must be a count of depth units in 0..{most} for this model "
                             f"(unit {self.unit!r}), got {self.split}")

    def resolved(self, shape: ModelShape) -> "PruneConfig":
        """This config with align="auto" and min_remaining=None replaced by what they mean for
        `shape` (:func:`width_limits`); ValueError for values no model of this shape can take."""
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.width_policy not in WIDTH_POLICIES:
            raise ValueError(f"width_policy must be one of {WIDTH_POLICIES}, got {self.width_policy!r}")
        if self.refit_prior not in PRIORS:
            raise ValueError(f"refit_prior must be one of {PRIORS}, got {self.refit_prior!r}")
        if self.heads not in HEADS and not (_is_count(self.heads) and self.heads >= 0):
            raise ValueError(f"heads must be one of {HEADS} or a count >= 0, got {self.heads!r}")
        if self.fixed_heads and self.stages == "s2":
            raise ValueError(f"heads={self.heads} removes heads in stage 1; stages='s2' runs "
                             f"stage 2 alone")
        self._check_split(shape)
        problem = fixed_heads_problem(shape, self.fixed_heads)
        if problem:
            raise ValueError(f"heads={self.heads}: {problem}")
        limits = width_limits(shape, self.min_remaining, self.align)
        return replace(self, min_remaining=limits.min_remaining, align=limits.align)


@dataclass(frozen=True)
class DistillConfig:
    """What :func:`distill` does; every field is also a keyword of :func:`distill`."""

    steps: int  # optimizer steps
    lr: float = 1e-3  # what the distillation table rewarded (bench distillation)
    batch_size: int = 32  # rows per step and micro-batch, over all processes together
    temperature: float = 2.0
    train: str = "blocks"  # which parameters learn (see distillation.trainable_parameters);
    # "blocks" is what the benchmarks rewarded
    seed: int = 0
    heldout: float = 0.1  # share of the inputs held out for the checks (without check_inputs)
    checks: int = 10  # held-out checks over the run; the best check's weights are kept
    match: str = "output"  # "output", "tokens" (text) or "layers" (see distill); the command
    # line's auto is DISTILL_MATCH, which needs the pruning result to say which teacher block
    # each kept block stands for
    layers: tuple[int, ...] | None = None  # match="layers": the teacher block of each kept block
    # (None: pruned_layers of the result, or the output alone where nothing says which)
    cache_limit: int = DISTILL_CACHE_LIMIT  # bytes of cached half-precision layer targets at most
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" (accel.resolve_precision for "auto")
    grad_accumulation: int = 1  # micro-batches of batch_size rows per optimizer step
    checkpoint_every: int = 0  # optimizer steps between calls of the checkpoint hook (0: none)
    progress: bool = False  # a progress bar (on the main process)

    def check(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.match not in MATCHES:
            raise ValueError(f"match must be one of {MATCHES}, got {self.match!r}")
        if self.train not in TRAINABLE:
            raise ValueError(f"train must be one of {TRAINABLE}, got {self.train!r}")
        if self.grad_accumulation < 1:
            raise ValueError(f"grad_accumulation must be >= 1, got {self.grad_accumulation}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")


# ---- the command line's run config ----
DEFAULT_MODEL = "google/vit-base-patch16-224"  # the seed's model
EMBEDDED = Path(__file__).resolve().parent / "embedded" / "vit-tiny-digits"
IMAGE_CALIB, TEXT_CALIB = 64, 512  # default calibration images / sentences
DISTILL_IMAGES = 2048  # default unlabeled train images for distillation
DISTILL_AUGMENT = 32  # default variants of each calibration sentence a text encoder distills on
# (what the distillation table rewarded)
DISTILL_MATCH = "layers"  # --distill-match auto: every kept block's hidden states too (the
# distillation table rewarded it; the CLI knows the pruning result that pairs the blocks)
DISTILL_SENTENCES = 50_000  # default bound on distillation sentences held (--distill-size)
LATENCY_TOLERANCE = 0.01  # a --target-latency run re-plans (up to twice) while the measured ratio
# misses the asked one by more than this (the latency model is a prediction; the timing is not)
LATENCY_MIN_REPEATS = 5  # fewer timed rounds than this cannot give a median worth planning on
LATENCY_MODEL_ROUNDS = 20  # a latency model is timed at least this many rounds: it is cached and
# planned on by every later run with its key, so its medians are worth twice a timing's 10
BUDGETS = {"max_accuracy_drop": "--max-accuracy-drop", "max_kl": "--max-kl",
           "min_cosine": "--min-cosine"}
OBJECTIVE_FLAGS = {"params": "--target", "flops": "--target-flops", "latency": "--target-latency"}


def flag(name: str) -> str:
    """The command-line flag of a config field."""
    return "--" + name.replace("_", "-")


def _opt(default: Any = None, job: bool = True) -> Any:
    """A field of a run config; job=False where it does not change what the run computes."""
    return field(default=default, metadata={"job": job})


@dataclass(frozen=True)
class TargetConfig:
    """What to prune to: one or several targets of one objective, or a budget. `targets` are
    fractions removed (a FLOP or latency ratio R is planned as 1 - R); `target` is the one
    target of a single run (None for several, or a budget before its search)."""

    targets: tuple[float, ...] = ()
    objective: str = "params"
    target: float | None = None
    target_flops: str | None = None  # as given (the parsed values are `targets`)
    target_latency: str | None = None
    max_accuracy_drop: float | None = None
    max_kl: float | None = None
    min_cosine: float | None = None
    target_resolution: float = 0.01  # budget search grid: 100 targets, about 8 prunings

    @property
    def budget(self) -> tuple[str, float] | None:
        """(budget name, value) of a budget run, else None."""
        return next(((k, getattr(self, k)) for k in BUDGETS if getattr(self, k) is not None), None)

    @property
    def flag(self) -> str:
        return OBJECTIVE_FLAGS[self.objective]


@dataclass(frozen=True)
class PruningConfig:
    """How the structure is chosen (the CLI's side of :class:`PruneConfig`)."""

    stage: str = "both"
    depth_unit: str = "block"  # whole blocks (the seed's docs)
    heads: str = "auto"  # attention heads: auto (tried by the split search), off, or a count
    no_mixed_depth: bool = False
    min_remaining: int | None = None  # None: default_min_remaining
    split: str = "auto"
    allocation: str = "uniform"
    compensation: str = "lsq"
    neuron_selection: str = "auto"
    refit_prior: str = "auto"
    depth_method: str = "greedy"
    align: str = "auto"
    width_policy: str = "auto"


@dataclass(frozen=True)
class DataConfig:
    """What is calibrated on and measured on."""

    load_cifar: bool = False
    dataset: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    test_split: str | None = None  # the split measured on; None: test, else validation
    cifar_train_pct: float = 0.25
    cifar_test_pct: float = 0.25
    skip_bad_images: bool = False
    calib_size: int | None = None  # None: IMAGE_CALIB images or TEXT_CALIB sentences
    batch_size: int = 32
    eval_batches: int = 5  # the seed's 5 evaluation batches
    text_file: str | None = None


@dataclass(frozen=True)
class HeadConfig:
    """The classifier head: replaced, adapted, loaded, fine-tuned, re-tuned after pruning."""

    replace_classifier: bool = False
    use_adapter: bool = False
    adapter_reduction: int = 4
    load_adapter: str | None = None
    do_finetune: bool = False
    freeze_backbone: bool = False
    ft_epochs: int = 1
    ft_lr: float | None = None  # None: 1e-3 head only, 1e-4 full
    recover: bool = False
    save_adapter: bool = _opt(False, job=False)


@dataclass(frozen=True)
class RecoveryConfig:
    """Label-free distillation after pruning (defaults are DistillConfig's)."""

    distill_steps: int = 0
    distill_lr: float = DistillConfig.lr
    distill_batch_size: int = DistillConfig.batch_size
    distill_train: str = DistillConfig.train
    distill_match: str = "auto"  # auto: DistillConfig.match
    distill_temperature: float = DistillConfig.temperature
    distill_size: int | None = None  # None: DISTILL_IMAGES images, or the sentence pool
    distill_augment: int | None = None  # None: DISTILL_AUGMENT
    mixed_precision: str = "auto"
    grad_accumulation: int = DistillConfig.grad_accumulation
    checkpoint_every: int = DistillConfig.checkpoint_every
    resume: bool = _opt(False, job=False)


@dataclass(frozen=True)
class TimingConfig:
    """How latency is timed (never part of the job: a resume times every stage again)."""

    latency_batch_size: int = _opt(1, job=False)
    latency_repeats: int = _opt(10, job=False)
    latency_precision: float = _opt(0.01, job=False)  # each ratio's 95% interval within +-0.01
    latency_max_repeats: int | None = _opt(None, job=False)  # None: measure.round_cap
    latency_cache: str | None = _opt(None, job=False)
    latency_dtype: str = _opt("auto", job=False)
    latency_tolerance: float = _opt(0.03, job=False)  # a latency target is met when the final
    # timing is within this of it (what the speed-target benchmark holds its runs to); else the
    # run says "missed" in its summary, report and plot, and exits 3
    accept_latency_miss: bool = _opt(False, job=False)  # a missed latency target exits 0
    steady_allocator: bool = _opt(True, job=False)  # CPU timings fix glibc malloc's thresholds
    # first (measure.steady_cpu_allocator; for the rest of the process: glibc cannot give the
    # dynamic ones back): a model's time then does not depend on what ran before it


@dataclass(frozen=True)
class OutputConfig:
    """Where the run writes and how much it says."""

    save_pruned_model: bool = _opt(False, job=False)
    pruned_output_dir: str = _opt("experiments/vit_pruning/pruned_models", job=False)
    reports_dir: str = _opt("experiments/vit_pruning/reports", job=False)
    artifacts_dir: str = _opt("experiments/vit_pruning/artifacts", job=False)
    run_id: str | None = _opt(None, job=False)
    export_onnx: bool = _opt(False, job=False)
    save_dtype: str = _opt("auto", job=False)
    dry_run: bool = _opt(False, job=False)
    quiet: bool = _opt(False, job=False)


MAX_RUN_ID = 150  # bytes: report-<id>.tradeoff.png and its staging name stay below the
# 255-byte file name limit of common file systems

SECTIONS = ("targets", "pruning", "data", "head", "recovery", "timing", "output")


@dataclass(frozen=True)
class RunConfig:
    """One run of the command line: every flag, in its section."""

    model: str = DEFAULT_MODEL
    seed: int = 0
    device: str = _opt("auto", job=False)
    targets: TargetConfig = field(default_factory=TargetConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    data: DataConfig = field(default_factory=DataConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    timing: TimingConfig = field(default_factory=TimingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def flat(self) -> dict:
        """Every flag's value by its field name (the report's `config`)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in SECTIONS}
        for name in SECTIONS:
            out.update(asdict(getattr(self, name)))
        return out

    def job(self) -> dict:
        """What decides the job (every field not marked job=False), by field name: a resume
        must agree with all of it."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in SECTIONS and f.metadata.get("job", True)}
        for name in SECTIONS:
            section = getattr(self, name)
            out.update({f.name: getattr(section, f.name) for f in fields(section)
                        if f.metadata.get("job", True)})
        for derived in ("targets", "objective", "target", "target_flops", "target_latency"):
            out.pop(derived, None)
        return {**self._asked(), **out}

    def _asked(self) -> dict:
        """The targets as the user gave them, by flag field (a budget run's are all None: its
        budget is in the job; the target its search chooses is not)."""
        t = self.targets
        values = [round(1 - v, 12) if t.objective != "params" else v for v in t.targets]
        asked = {"target": None, "target_flops": None, "target_latency": None}
        if values:
            field_name = OBJECTIVE_FLAGS[t.objective][2:].replace("-", "_")
            asked[field_name] = values[0] if len(values) == 1 else values
        return asked

    def with_target(self, target: float) -> "RunConfig":
        """This run with one target (what a budget search chose)."""
        return replace(self, targets=replace(self.targets, target=target))

    def quieter(self) -> "RunConfig":
        return replace(self, output=replace(self.output, quiet=True))

    @property
    def budget(self) -> tuple[str, float] | None:
        return self.targets.budget


# ---- from flags, and the checks that need no model ----
_CLASSES = {"targets": TargetConfig, "pruning": PruningConfig, "data": DataConfig,
            "head": HeadConfig, "recovery": RecoveryConfig, "timing": TimingConfig,
            "output": OutputConfig}
_AT_LEAST = (("distill_steps", 0), ("distill_batch_size", 1), ("distill_size", 1),
             ("grad_accumulation", 1), ("checkpoint_every", 0), ("distill_augment", 0),
             ("eval_batches", 1), ("min_remaining", 1), ("calib_size", 1), ("batch_size", 1),
             ("ft_epochs", 1), ("adapter_reduction", 1), ("latency_batch_size", 1),
             ("latency_repeats", 1))


PATH_FIELDS = ("model", "dataset", "text_file", "load_adapter", "latency_cache", "reports_dir",
               "artifacts_dir", "pruned_output_dir")  # a leading ~ is the home folder here: the
# shell leaves it as typed in --reports-dir=~/x, and every use of the value then agrees


def from_flags(values: dict[str, Any]) -> RunConfig:
    """The run config of parsed command-line values (field name -> value; unknown names are an
    error), with every check that needs no model done (:func:`check`). The targets are parsed
    here: `target`, `target_flops` and `target_latency` are given as text."""
    values = {k: os.path.expanduser(v) if k in PATH_FIELDS and isinstance(v, str) else v
              for k, v in values.items()}
    raw = {k: values.pop(k, None) for k in ("target",)}
    sections = {}
    for name, cls in _CLASSES.items():
        names = {f.name for f in fields(cls)}
        sections[name] = cls(**{k: values.pop(k) for k in list(values) if k in names})
    cfg = RunConfig(**values, **sections)
    targets, objective, one = parse_targets(cfg, raw["target"])
    cfg = replace(cfg, targets=replace(cfg.targets, targets=tuple(targets), objective=objective,
                                       target=one))
    check(cfg)
    return cfg


def value(cfg: RunConfig, name: str) -> Any:
    """A field of any section by its name (names are unique across sections: the flag's)."""
    for section in SECTIONS:
        part = getattr(cfg, section)
        if name in {f.name for f in fields(part)}:
            return getattr(part, name)
    return getattr(cfg, name)


def parse_targets(cfg: RunConfig, target: str | float | None) -> tuple[list[float], str, float | None]:
    """(targets as fractions removed, objective, the one target of a plain run or None) from
    --target / --target-flops / --target-latency and the budgets; every malformed or
    conflicting value is a UsageError naming the flag."""
    t = cfg.targets
    budgets = [f for k, f in BUDGETS.items() if getattr(t, k) is not None]
    if len(budgets) > 1:
        raise UsageError(f"{budgets[0]} and {budgets[1]} are two budgets: give one")
    given_by = {"params": target, "flops": t.target_flops, "latency": t.target_latency}
    asked = [OBJECTIVE_FLAGS[k] for k, v in given_by.items() if v is not None]
    if len(asked) > 1:
        raise UsageError(f"{asked[0]} and {asked[1]} are two targets: give one of --target, "
                         f"--target-flops, --target-latency")
    objective = next((k for k, f in OBJECTIVE_FLAGS.items() if f in asked), "params")
    name = OBJECTIVE_FLAGS[objective]
    if objective != "params":
        if budgets:
            raise UsageError(f"{budgets[0]} finds a parameter target itself: drop {name}")
        if objective == "latency" and cfg.timing.latency_repeats < LATENCY_MIN_REPEATS:
            raise UsageError(f"--latency-repeats must be >= {LATENCY_MIN_REPEATS} with "
                             f"--target-latency (fewer rounds cannot measure the latency model), "
                             f"got {cfg.timing.latency_repeats}", "latency_repeats")
        if cfg.pruning.stage != "both":
            raise UsageError(f"{name} plans both stages together: drop --stage", "stage")
    if budgets and target is not None:
        raise UsageError(f"{budgets[0]} finds the target itself: drop --target", "target")
    _check_budgets(t)
    if budgets:
        return [], objective, None
    if t.target_resolution != TargetConfig.target_resolution:
        raise UsageError("--target-resolution is the grid of a budget search: give a budget "
                         "(--max-accuracy-drop, --max-kl or --min-cosine), or drop it",
                         "target_resolution")
    given = given_by[objective]
    if given is None:
        raise UsageError("give --target (one value or a comma list), --target-flops, "
                         "--target-latency, or a budget (--max-accuracy-drop, --max-kl or "
                         "--min-cosine)", "target")
    values = _target_values(name, given)
    if objective != "params":  # planned as the fraction removed, like a parameter target
        values = [round(1 - v, 12) for v in values]
    if len(values) > 1:
        for one in ("distill_steps", "recover", "save_adapter"):
            if value(cfg, one):
                raise UsageError(f"{flag(one)} applies to one model: with several targets give "
                                 f"one --target, or a budget, to go on with", one)
        if cfg.pruning.stage != "both":
            raise UsageError("several targets take --stage both (the default)", "stage")
    return values, objective, values[0] if len(values) == 1 else None


def _check_budgets(t: TargetConfig) -> None:
    if t.max_accuracy_drop is not None and not 0 < t.max_accuracy_drop < 100:
        raise UsageError(f"--max-accuracy-drop must be in (0, 100) percentage points, got "
                         f"{t.max_accuracy_drop}", "max_accuracy_drop")
    if t.max_kl is not None and not t.max_kl > 0:
        raise UsageError(f"--max-kl must be > 0, got {t.max_kl}", "max_kl")
    if t.min_cosine is not None and not 0 < t.min_cosine <= 1:
        raise UsageError(f"--min-cosine must be in (0, 1], got {t.min_cosine}", "min_cosine")
    if not 0 < t.target_resolution <= 0.1:
        raise UsageError(f"--target-resolution must be in (0, 0.1], got {t.target_resolution}",
                         "target_resolution")


def _target_values(name: str, given: str | float) -> list[float]:
    """A target flag's comma list as checked floats in (0, 1)."""
    parts = [p.strip() for p in str(given).split(",")]
    try:
        values = [float(p.removesuffix("%")) / (100 if p.endswith("%") else 1) for p in parts]
    except ValueError:
        raise UsageError(f"{name} must be a number or a comma list of numbers in (0, 1), got "
                         f"{given!r}") from None
    if any(p.endswith("%") for p in parts):
        raise UsageError(f"{name} is a fraction in (0, 1), not a percentage: for {given} give "
                         f"{','.join(f'{v:g}' for v in values)}")
    bad = [v for v in values if not 0 < v < 1]
    if bad:
        whole = bad[0].is_integer() and 1 < bad[0] < 100  # a percentage, most likely
        hint = f" (a fraction: {bad[0]:g}% is {bad[0] / 100:g})" if whole else ""
        raise UsageError(f"{name} must be in (0, 1), got {bad[0]:g}{hint}")
    try:
        return check_targets(values)
    except ValueError as exc:
        raise UsageError(f"{name}: {exc}") from exc


def check(cfg: RunConfig) -> None:
    """Every range and combination that needs no model and no file: one UsageError naming the
    flag (the field) at the first that fails."""
    for name in ("cifar_train_pct", "cifar_test_pct"):
        v = value(cfg, name)
        if not 0 < v <= 1:
            raise UsageError(f"{flag(name)} must be in (0, 1], got {v}", name)
    h, r, p, tm = cfg.head, cfg.recovery, cfg.pruning, cfg.timing
    if h.replace_classifier and h.use_adapter:
        raise UsageError("--replace-classifier and --use-adapter are exclusive: choose one head")
    if h.load_adapter and (h.replace_classifier or h.use_adapter):
        raise UsageError("--load-adapter brings its own head: drop --replace-classifier/--use-adapter")
    if r.checkpoint_every and not r.distill_steps:
        raise UsageError("--checkpoint-every checkpoints distillation: add --distill-steps")
    if r.resume and cfg.output.run_id is None:
        raise UsageError("--resume goes on from the checkpoint of a run: give its --run-id")
    if r.resume and not r.distill_steps:
        raise UsageError("--resume goes on distilling: give the run's --distill-steps")
    for name, low in _AT_LEAST:
        v = value(cfg, name)
        if v is not None and v < low:
            raise UsageError(f"{flag(name)} must be >= {low}, got {v}", name)
    if not 0 <= cfg.seed < 2**32:  # what every generator the run seeds takes (numpy's least)
        raise UsageError(f"--seed must be in 0..{2**32 - 1}, got {cfg.seed}", "seed")
    if not 0 <= tm.latency_precision < 1:
        raise UsageError(f"--latency-precision must be in [0, 1) (0: fixed rounds), got "
                         f"{tm.latency_precision}", "latency_precision")
    if not 0 < tm.latency_tolerance < 1:
        raise UsageError(f"--latency-tolerance must be in (0, 1), got {tm.latency_tolerance}",
                         "latency_tolerance")
    if tm.latency_max_repeats is not None and tm.latency_max_repeats < tm.latency_repeats:
        raise UsageError(f"--latency-max-repeats must be >= --latency-repeats "
                         f"({tm.latency_repeats}), got {tm.latency_max_repeats}",
                         "latency_max_repeats")
    _check_structure(cfg)
    _check_inert(cfg)
    _check_run_id(cfg.output.run_id)
    if cfg.device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", cfg.device):
        raise UsageError(f"--device must be auto, cpu or cuda[:N], got {cfg.device!r}", "device")
    for name in ("distill_lr", "distill_temperature"):
        if not value(cfg, name) > 0:
            raise UsageError(f"{flag(name)} must be > 0, got {value(cfg, name)}", name)
    if p.align != "auto" and not (p.align.isdigit() and int(p.align) >= 1):
        raise UsageError(f"--align must be auto or an integer >= 1, got {p.align!r}", "align")
    if tm.latency_dtype == "float16" and cfg.device == "cpu":
        raise UsageError("--latency-dtype float16 needs CUDA; on the CPU use float32 or bfloat16",
                         "latency_dtype")


_ACTS_ONLY_WITH = (  # (flags that change nothing without another, what that is, whether given)
    (("distill_lr", "distill_batch_size", "distill_train", "distill_match", "distill_temperature",
      "distill_size", "distill_augment", "grad_accumulation"), "--distill-steps",
     lambda c: c.recovery.distill_steps > 0),
    (("freeze_backbone", "ft_epochs", "ft_lr"), "--do-finetune or --recover",
     lambda c: c.head.do_finetune or c.head.recover),
    (("mixed_precision",), "--distill-steps, --do-finetune or --recover",
     lambda c: c.recovery.distill_steps > 0 or c.head.do_finetune or c.head.recover),
    (("adapter_reduction",), "--use-adapter", lambda c: c.head.use_adapter),
    (("latency_tolerance", "accept_latency_miss", "no_mixed_depth"), "--target-latency",
     lambda c: c.targets.objective == "latency"),
    (("save_dtype",), "--save-pruned-model or --export-onnx",
     lambda c: c.output.save_pruned_model or c.output.export_onnx),
)  # (output folders are settings, not actions: a wrapper may always pass them)


def _check_inert(cfg: RunConfig) -> None:
    """A flag given (not at its default) where it changes nothing is refused, naming what it
    needs: a user who asks for it expects it to act."""
    defaults = RunConfig()
    for names, needs, present in _ACTS_ONLY_WITH:
        given = [n for n in names if value(cfg, n) != value(defaults, n)]
        if given and not present(cfg):
            raise UsageError(f"{flag(given[0])} acts only with {needs}: add it, or drop "
                             f"{flag(given[0])}", given[0])


def _check_structure(cfg: RunConfig) -> None:
    p = cfg.pruning
    if p.split not in ("auto", "search", "alpha") and not p.split.isdigit():
        raise UsageError(f"--split must be auto, search, alpha or a non-negative integer, got "
                         f"{p.split!r}", "split")
    if p.stage == "s2" and p.split != "auto":
        raise UsageError(f"--split {p.split} does not apply to --stage s2: stage 2 alone removes "
                         f"the count of depth units nearest the target; drop --split", "split")
    if p.stage == "s2" and p.depth_unit == "auto":
        raise UsageError("--depth-unit auto compares whole splits; with --stage s2 choose block "
                         "or attention", "depth_unit")
    if p.heads not in HEADS and not p.heads.isdigit():
        raise UsageError(f"--heads must be auto, off or a count of heads per block >= 0, got "
                         f"{p.heads!r}", "heads")
    if p.stage == "s1" and p.split not in ("auto", "0"):
        raise UsageError(f"--split {p.split} does not apply to --stage s1: width pruning alone "
                         f"removes no depth units; drop --split", "split")
    if p.stage == "s1" and p.depth_unit == "attention":
        raise UsageError("--depth-unit attention does not apply to --stage s1: width pruning alone "
                         "removes no depth units; drop --depth-unit", "depth_unit")
    if p.heads.isdigit() and int(p.heads) and p.stage == "s2":
        raise UsageError(f"--heads {p.heads} removes heads in stage 1; --stage s2 runs stage 2 "
                         f"alone", "heads")


def _check_run_id(run_id: str | None) -> None:
    if run_id is None:
        return
    if not run_id or "/" in run_id or run_id.startswith("."):
        raise UsageError(f"--run-id must be a plain name (no '/', not starting with '.'), got "
                         f"{run_id!r}", "run_id")
    if "\0" in run_id:
        raise UsageError(f"--run-id must be a plain name, got {run_id!r}", "run_id")
    if len(run_id.encode()) > MAX_RUN_ID:
        raise UsageError(f"--run-id must be at most {MAX_RUN_ID} bytes (it names files and "
                         f"folders), got {len(run_id.encode())}", "run_id")
