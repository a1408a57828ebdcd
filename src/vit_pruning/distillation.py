"""Recovery by distillation: train the pruned model to reproduce the unpruned model's outputs
on unlabeled inputs, without labels.

- a classifier learns the teacher's logits by KL divergence at a temperature (Hinton et al.
  2015: ``T^2 * KL(softmax(t/T) || softmax(s/T))``);
- a headless encoder learns the teacher's output by cosine distance: the sentence embedding
  for a text encoder (pooled as its config says: mean or CLS), every token's final hidden state
  for a headless ViT; with ``match="tokens"`` a text encoder learns every real token's final
  hidden state as well as their pooling (one target per token instead of one per sentence);
- with ``match="layers"`` every block the student kept also learns, token by token, the hidden
  state the teacher has where that block's output goes: the output of the teacher block just
  before the next kept block (see :func:`teacher_layers`), so a kept block learns to stand in for
  the removed blocks after it (layer-wise distillation, as in TinyBERT, Jiao et al. 2020).

The teacher's outputs are computed once and cached (they never change, and for the inputs this
tool distills on they are small: one row of logits or one embedding per input, or with
``match="tokens"`` one hidden state per token, about 150 MB for 3,000 sentences), so each step
runs only the student. Layer targets are cached in half precision while they fit in
``cache_limit`` bytes; beyond that the teacher runs beside the student at every step. Which of
the student's parameters train is ``train``: all of them, every block (attention, MLP and
LayerNorms; the embeddings and the head stay), the MLPs (fc1 and fc2 of every block), the
LayerNorms, or only the fc2s the refit wrote. AdamW (fused) with torch's linear warm-up and
cosine decay (:func:`warmup_cosine`), dropout off; the teacher is never modified.

The loop runs on Hugging Face ``accelerate`` (:mod:`vit_pruning.accel`): mixed precision,
gradient accumulation, and under ``accelerate launch`` / ``torchrun`` every process trains on
its own shard of the inputs (its own slice of the cached teacher outputs) with gradients
averaged, the held-out checks summed over all processes so each keeps the same step. A
checkpoint hook receives the whole state (:class:`DistillState`) to resume from exactly.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from functools import partial
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .accel import adamw, make_accelerator, reduce_sum, shard_rows, train_device
from .anatomy import mean_pool, resolve, sentence_pool
from .config import DISTILL_CACHE_LIMIT, MATCHES, TRAINABLE, DistillConfig  # noqa: F401
from .measure import forward_output
from .modes import device_of, eval_mode
from .batches import batch_len, model_input

log = logging.getLogger(__name__)
WARMUP = 0.05  # share of the steps spent warming the learning rate up
CACHE_LIMIT = DISTILL_CACHE_LIMIT


@dataclass
class DistillResult:
    steps: int
    seconds: float
    train: str
    lr: float
    batch_size: int
    temperature: float
    loss: str  # "kl" (classifier logits), "cosine" (embeddings / hidden states) or "tokens"
    # (a text encoder's every token and their pooling)
    losses: list[float] = field(default_factory=list)  # the training loss, one value per step
    trainable_params: int = 0
    heldout: dict[int, float] = field(default_factory=dict)  # step -> loss on the held-out inputs
    kept_step: int = 0  # the step whose weights were kept (0: the one-shot model was best)
    match: str = "output"  # what the student learned (see distill)
    layers: list[int] | None = None  # match="layers": the teacher block each kept block learned
    teacher_cached: bool = True  # False: the teacher ran at every step (targets over cache_limit)
    mixed_precision: str = "no"
    grad_accumulation: int = 1
    processes: int = 1  # processes that trained together (each on its shard)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def trainable_parameters(model: nn.Module, train: str) -> list[nn.Parameter]:
    """The parameters `train` names: "all", "blocks" (every parameter of every block: attention,
    MLP, LayerNorms, layer scales; not the embeddings, final norm or head), "mlp" (every block's
    fc1, SwiGLU gate and fc2), "norms" (LayerNorms) or "fc2" (every block's fc2: what the
    least-squares refit wrote)."""
    if train not in TRAINABLE:
        raise ValueError(f"train must be one of {TRAINABLE}, got {train!r}")
    if train == "all":
        return [p for p in model.parameters()]
    anatomy = resolve(model)
    if train == "blocks":
        mods = list(anatomy.blocks)
    elif train == "norms":
        mods = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    else:
        mods = [m for parts in anatomy.parts
                for m in ((parts.fc2,) if train == "fc2" else (*parts.in_projections, parts.fc2))]
    seen, out = set(), []
    for m in mods:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def teacher_layers(num_blocks: int, removed: Iterable[int] = ()) -> list[int]:
    """For each block a pruned model kept, in order, the teacher block whose output it learns
    with match="layers": the block just before the next kept one (the kept block stands in for
    itself and the removed blocks after it), and the teacher's last block for the last kept one.
    `removed`: the blocks depth pruning removed (original numbering); none when it removed
    attention sublayers only, which leaves every block in place."""
    gone = set(removed)
    kept = [i for i in range(num_blocks) if i not in gone]
    if not kept or not gone <= set(range(num_blocks)):
        raise ValueError(f"removed blocks {sorted(gone)} do not leave a block of {num_blocks}")
    return [nxt - 1 for nxt in kept[1:]] + [num_blocks - 1]


def pruned_layers(result) -> list[int]:
    """:func:`teacher_layers` of what :func:`vit_pruning.prune_2ssp` did (its PruneResult)."""
    removed = result.depth_order if result.plan.unit == "block" else ()
    return teacher_layers(len(result.neurons_removed), removed)


@contextmanager
def block_outputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects the hidden states every block of `model` outputs during the forward passes run
    inside the context (in block order), by forward hooks removed on exit."""
    outs: list[torch.Tensor] = []

    def keep(module, args, output):
        outs.append(output[0] if isinstance(output, (tuple, list)) else output)

    hooks = [b.register_forward_hook(keep) for b in resolve(model).blocks]
    try:
        yield outs
    finally:
        for h in hooks:
            h.remove()


def _text_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids, attention_mask) of a text batch: a padded dict, or padding-free token ids."""
    if isinstance(batch, dict):
        return batch["input_ids"], batch.get("attention_mask")
    return batch, None


def _forward(model: nn.Module, batch, match: str = "output") -> torch.Tensor:
    """Logits (classifier), pooled sentence embedding (text: a padded dict with attention_mask,
    or padding-free token ids), or the last hidden state (headless ViT). With match="tokens" a
    text encoder gives every token's final hidden state (B, T, H) instead of their pooling."""
    if isinstance(batch, dict) or (match == "tokens" and not batch.is_floating_point()):
        ids, mask = _text_batch(batch)
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden if match == "tokens" else sentence_pool(model.config, hidden, mask)
    return forward_output(model, batch)


def _rows(batch, idx: torch.Tensor, device: torch.device):
    """Rows `idx` of a batch, moved to `device` (inputs may stay in host memory)."""
    if isinstance(batch, dict):
        return {k: v[idx].to(device) for k, v in batch.items()}
    return batch[idx].to(device)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str,
                 temperature: float = 1.0, mask: torch.Tensor | None = None,
                 pool: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = mean_pool
                 ) -> torch.Tensor:
    """KL at a temperature for logits, mean cosine distance for embeddings/hidden states;
    "tokens": the cosine distance of every real token's hidden state (`mask`) plus that of the
    sentence embedding `pool` makes of them (the model's pooling, see :func:`pooling`)."""
    if kind == "kl":
        t = temperature
        return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1),
                        reduction="batchmean", log_target=True) * t * t
    if kind == "tokens":
        s, t = student.float(), teacher.float()
        m = _token_mask(s, mask)
        pooled = 1 - F.cosine_similarity(pool(s, m), pool(t, m), dim=-1)
        return _token_distance(s, t, m) + pooled.mean()
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def pooling(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The sentence pooling of `model` (its config's, :func:`vit_pruning.anatomy.sentence_pool`)
    as `distill_loss`'s `pool`: (token states, mask) -> sentence embeddings."""
    return partial(sentence_pool, model.config)


def _token_mask(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T) float weights of the real tokens of `hidden` (B, T, H): `mask`, or all ones."""
    if mask is None:
        return torch.ones(hidden.shape[:2], device=hidden.device)
    return mask.to(hidden.device).float()


def _token_distance(s: torch.Tensor, t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean cosine distance of the real tokens' hidden states (weights `m`, (B, T))."""
    return ((1 - F.cosine_similarity(s, t, dim=-1)) * m).sum() / m.sum().clamp_min(1)


def layer_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over blocks of the mean cosine distance of every (real, `mask`) token's hidden state."""
    if not student:
        raise ValueError("layer_loss needs at least one block's hidden states")
    return sum(_token_distance(s.float(), t.to(s.device).float(), _token_mask(s, mask))
               for s, t in zip(student, teacher))


def _mask(batch, idx: torch.Tensor | None = None) -> torch.Tensor | None:
    mask = _text_batch(batch)[1] if isinstance(batch, dict) else None
    return mask if mask is None or idx is None else mask[idx]


def _outputs(model: nn.Module, batch, match: str,
             layers: Sequence[int] | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The output `distill_loss` compares, and the outputs of the blocks `layers` (none if None)."""
    if layers is None:
        return _forward(model, batch, match), []
    with block_outputs(model) as outs:
        final = _forward(model, batch, match)
    return final, [outs[i] for i in layers]


def _take(target, idx: torch.Tensor, device: torch.device | str = "cpu"):
    """Rows `idx` of a cached target: a tensor, or [output, *block outputs] with match="layers"."""
    if isinstance(target, list):
        return [t[idx].to(device) for t in target]
    return target[idx].to(device)


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, inputs: Sequence, micro: int = 64,
                    match: str = "output", layers: Sequence[int] | None = None) -> list:
    """The teacher's output for every input batch (computed once, in eval mode, kept on the
    host): what the student learns (every token's hidden state with match="tokens"). With
    `layers` (teacher block indices), each batch's entry is [output, *those blocks' outputs],
    the block outputs in half precision."""
    device = device_of(teacher)
    final = "tokens" if match in ("tokens", "layers") else "output"
    with eval_mode(teacher):
        out = []
        for b in inputs:
            n = batch_len(b)
            if not n:  # a process's empty shard of a small batch: never drawn from
                out.append(None)
                continue
            parts = []
            for i in range(0, n, micro):
                y, hs = _outputs(teacher, _rows(b, torch.arange(i, min(n, i + micro)), device),
                                 final, layers)
                parts.append([y.float().cpu()] + [h.half().cpu() for h in hs])
            cols = [torch.cat(c) for c in zip(*parts)]
            out.append(cols if layers is not None else cols[0])
        return out


@torch.no_grad()
def _heldout_sums(model: nn.Module, inputs: Sequence, targets: Sequence[torch.Tensor], kind: str,
                  temperature: float, device: torch.device) -> tuple[float, float]:
    """(summed loss, rows) of the held-out inputs."""
    total = count = 0.0
    match = "tokens" if kind == "tokens" else "output"
    for b, t in zip(inputs, targets):
        n = batch_len(b)
        for i in range(0, n, 64):
            idx = torch.arange(i, min(n, i + 64))
            total += float(distill_loss(_forward(model, _rows(b, idx, device), match),
                                        t[idx].to(device), kind, temperature,
                                        _mask(b, idx), pooling(model))) * len(idx)
            count += len(idx)
    return total, count


def _split_heldout(inputs: Sequence, targets: Sequence | None, share: float):
    """The last `share` of the rows of every batch (at least one row, none if a batch has one)
    are held out to choose which step's weights to keep (their targets: the output only; none
    without `targets`, when the teacher runs every step)."""
    fit_x, fit_t, held_x, held_t = [], [], [], []
    for b, t in zip(inputs, targets if targets is not None else [None] * len(inputs)):
        n = batch_len(b)
        h = min(n - 1, max(1, int(round(share * n)))) if share > 0 else 0
        keep, out = torch.arange(n - h), torch.arange(n - h, n)
        fit_x.append(_rows(b, keep, "cpu") if h else b)
        if t is not None:
            fit_t.append(_take(t, keep))
        if h:
            held_x.append(_rows(b, out, "cpu"))
            if t is not None:
                held_t.append((t[0] if isinstance(t, list) else t)[out])
    return fit_x, fit_t, held_x, held_t


def _resolve_layers(pruned: nn.Module, teacher: nn.Module | None,
                    layers: Sequence[int] | None) -> list[int]:
    """Check (or default to identity) the teacher block of every student block."""
    n_student = len(resolve(pruned).blocks)
    n_teacher = len(resolve(teacher).blocks) if teacher is not None else None
    if layers is None:
        if n_teacher is not None and n_teacher != n_student:
            raise ValueError(f"match='layers': the student has {n_student} blocks and the teacher "
                             f"{n_teacher}; pass layers=pruned_layers(result) (which teacher block "
                             "each kept block learns)")
        layers = list(range(n_student))
    layers = [int(i) for i in layers]
    if len(layers) != n_student:
        raise ValueError(f"layers names {len(layers)} teacher blocks for {n_student} student blocks")
    if n_teacher is not None and not all(0 <= i < n_teacher for i in layers):
        raise ValueError(f"layers {layers} name a block the teacher (of {n_teacher}) lacks")
    return layers


def _layer_bytes(teacher: nn.Module, inputs: Sequence, layers: Sequence[int], match: str) -> int:
    """Host bytes the half-precision block targets of every input would take (one probe row)."""
    b0 = inputs[0]
    probe = teacher_outputs(teacher, [_rows(b0, torch.arange(1), "cpu")], match=match,
                            layers=layers)[0][1:]
    row = sum(h.numel() for h in probe) * 2
    if isinstance(b0, dict):  # text: proportional to each batch's padded length
        t0 = b0["input_ids"].shape[1]
        return int(sum(batch_len(b) * row * b["input_ids"].shape[1] / t0 for b in inputs))
    return row * sum(batch_len(b) for b in inputs)


@dataclass
class DistillState:
    """Everything a distillation needs to go on exactly where it stopped (with the student's
    weights, which the caller saves with the model): the step, the optimizer and schedule, the
    draw generators, the best check so far and the result so far."""

    step: int
    optimizer: dict
    scheduler: dict
    generators: list[torch.Tensor]
    best_loss: float | None
    best_step: int
    best_params: list[torch.Tensor] | None
    result: DistillResult


@dataclass
class _Data:
    """The inputs this process trains on, their cached targets (None: the teacher runs every
    step), and the held-out inputs and targets of the checks."""

    inputs: list
    targets: list | None
    held_x: list
    held_t: list


class _Student(nn.Module):
    """The student's forward as one module (what a data-parallel wrapper must run): the output
    `distill_loss` compares and the hidden states of `layers`."""

    def __init__(self, model: nn.Module, final: str, layers: Sequence[int] | None):
        super().__init__()
        self.model, self.final, self.layers = model, final, layers

    def forward(self, batch):
        return _outputs(self.model, batch, self.final, self.layers)


def _prepare_data(teacher, inputs, cfg: DistillConfig, cached, check_inputs, final: str,
                  teacher_at, on_the_fly: bool, rank: int, count: int) -> _Data:
    """The inputs this process trains on with the teacher's outputs on them, and the held-out
    inputs of the checks (`check_inputs`, else a `heldout` share of every batch). With several
    processes the held-out rows are split off first, then every batch is sharded (rows rank,
    rank + count, ...), and each process computes the teacher's outputs on its shard only."""
    if count > 1:
        if cached is not None:
            inputs, fit_t, held_x, held_t = _split_heldout(inputs, list(cached), 0 if check_inputs
                                                             else cfg.heldout)
        else:
            inputs, _, held_x, _ = _split_heldout(inputs, None, 0 if check_inputs else cfg.heldout)
            fit_t = held_t = None
        inputs = shard_rows(inputs, rank, count)
        if check_inputs:
            if teacher is None:
                raise ValueError("check_inputs needs the teacher model (its outputs there are not cached)")
            held_x, held_t = shard_rows(list(check_inputs), rank, count), None
        else:
            held_x = shard_rows(held_x, rank, count)
            held_t = shard_rows(held_t, rank, count) if held_t is not None else None
        keep = [i for i, b in enumerate(held_x) if batch_len(b)]  # a shard can be empty
        held_x = [held_x[i] for i in keep]
        if held_t is None:
            held_t = teacher_outputs(teacher, held_x, match=final)
        else:
            held_t = [held_t[i] for i in keep]
        targets = (None if on_the_fly else shard_rows(fit_t, rank, count) if fit_t is not None
                   else teacher_outputs(teacher, inputs, match=cfg.match, layers=teacher_at))
        # (a shard of a small batch can be empty: teacher_outputs gives it empty targets)
        return _Data(inputs, targets, held_x, held_t)
    if on_the_fly:
        targets = None
    elif cached is not None:
        targets = list(cached)
    else:
        targets = teacher_outputs(teacher, inputs, match=cfg.match, layers=teacher_at)
    if check_inputs:
        if teacher is None:
            raise ValueError("check_inputs needs the teacher model (its outputs there are not cached)")
        held_x = list(check_inputs)
        return _Data(inputs, targets, held_x, teacher_outputs(teacher, held_x, match=final))
    if targets is None:  # targets come per step: only the held-out rows' output is computed
        inputs, _, held_x, _ = _split_heldout(inputs, None, cfg.heldout)
        return _Data(inputs, None, held_x, teacher_outputs(teacher, held_x, match=final))
    inputs, targets, held_x, held_t = _split_heldout(inputs, targets, cfg.heldout)
    return _Data(inputs, targets, held_x, held_t)


def warmup_cosine(opt: torch.optim.Optimizer, warm: int, steps: int
                  ) -> torch.optim.lr_scheduler.LRScheduler:
    """torch's linear warm-up over `warm` steps, the first step already at 1/warm of the rate,
    then its cosine to zero at `steps`. (transformers' get_cosine_schedule_with_warmup spends
    its first step at rate 0, which still moves Adam's moments: on the digits table's `blocks`
    row at 0.7 it left KL 30% higher, paired over 4 seeds: 0.0097 against 0.0075 on average.)"""
    sched = torch.optim.lr_scheduler
    if warm >= steps:  # nothing left to anneal
        return sched.LinearLR(opt, 1 / warm, 1.0, max(1, warm - 1))
    return sched.SequentialLR(opt, [sched.LinearLR(opt, 1 / warm, 1.0, max(1, warm - 1)),
                                    sched.CosineAnnealingLR(opt, steps - warm)], milestones=[warm])


def _freeze(model: nn.Module, train: str) -> list[nn.Parameter]:
    """Only the parameters `train` names learn."""
    params = trainable_parameters(model, train)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params


def _sum_losses(acc, result: DistillResult, synced: int) -> int:
    """With several processes each records its own share-weighted step losses; summed over the
    processes (one exchange for all the steps since the last, not one per step) they are the
    steps' losses over every row. Returns how many losses are summed now."""
    if acc.num_processes > 1 and len(result.losses) > synced:
        total = reduce_sum(acc, result.losses[synced:])
        result.losses[synced:] = [v / acc.num_processes for v in total]
    return len(result.losses)


def distill(pruned: nn.Module, teacher: nn.Module | None, inputs: Sequence,
            steps: int | None = None, *, config: DistillConfig | None = None,
            cached: Sequence | None = None, check_inputs: Sequence | None = None,
            checkpoint: Callable[[DistillState], None] | None = None,
            resume: DistillState | None = None, **options) -> DistillResult:
    """Train `pruned` in place for `steps` optimizer steps to reproduce `teacher` on unlabeled
    `inputs`, on Hugging Face accelerate (one process, or each process of ``accelerate launch``
    / ``torchrun`` on its own shard of the inputs, gradients averaged; mixed precision and
    gradient accumulation from `config`).

    The loss on inputs it does not train on is measured before the first step and
    `config.checks` times during training (summed over every process), and the weights of the
    best check are kept, so distillation never leaves the model further from the teacher there
    than one-shot pruning did. Those inputs are `check_inputs` if given (best: drawn like the
    inputs the model will be judged on, e.g. the calibration images or sentences; needs
    `teacher`), else a `heldout` share of `inputs`. The checks compare the output only (what
    fidelity is measured on), whatever `match` trains.

    Args:
        teacher: the unpruned model (left unchanged), or None when `cached` holds its outputs.
        inputs: batches of pixel values, or of tokenized sentences (dicts with input_ids and
            attention_mask), on any device (rows move to the student's device per step).
        steps, config, options: a DistillConfig, or its fields as keywords (`steps`, `lr`,
            `batch_size`, `temperature`, `train`, `seed`, `heldout`, `checks`, `match`,
            `layers`, `cache_limit`, `mixed_precision`, `grad_accumulation`,
            `checkpoint_every`, `progress`). match: "output" (what fidelity is measured on: logits, the
            sentence embedding, hidden states); for a text encoder "tokens": every token's final
            hidden state as well as their pooling; "layers": the output (every token's, for a text
            encoder) and every block's hidden states, each kept block against teacher block
            `layers[i]` (:func:`pruned_layers` of the PruneResult; default: the same block).
        cached: the teacher's outputs per input batch (:func:`teacher_outputs`, with the same
            `match` and `layers`), if already known.
        checkpoint: called on the main process with the state every `checkpoint_every` steps
            (and the student's weights as they are then): save both to go on later.
        resume: a state `checkpoint` was given, to go on from (the student must hold the
            weights saved with it).
    Returns:
        DistillResult with the loss of every step. The student ends in eval mode with
        requires_grad off.
    """
    cfg = _config(steps, config, options)
    inputs = [model_input(b) for b in inputs]  # a tokenizer's BatchEncoding, (x, y) pairs ...
    check_inputs = None if check_inputs is None else [model_input(b) for b in check_inputs]
    if not inputs:
        raise ValueError("distill needs at least one batch of unlabeled inputs")
    if cfg.match == "tokens" and not resolve(pruned).is_text:
        raise ValueError("match='tokens' is for text encoders (a headless ViT already matches "
                         "every token's hidden state)")
    run = _Run(pruned, teacher, inputs, cfg, cached, check_inputs)
    start = run.begin(resume)
    bar = tqdm(range(start, cfg.steps), desc=f"distill ({cfg.train})",
               disable=not (cfg.progress and run.main), leave=False, initial=start, total=cfg.steps)
    try:
        for step in bar:
            run.step(step)
            bar.set_postfix(loss=f"{run.running:.4g}")
            # every process enters (the loss exchange and the barrier are collective); only
            # the main one is given the hook
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                run.save(step + 1, checkpoint)
        run.keep_best()
    finally:
        run.end()
    if cfg.steps and run.main:
        run.log()
    return run.result


def _config(steps: int | None, config: DistillConfig | None, options: dict) -> DistillConfig:
    """The DistillConfig of distill's arguments, checked."""
    if config is None:
        config = DistillConfig(steps=0 if steps is None else steps, **options)
    elif steps is not None or options:
        config = replace(config, **({"steps": steps} if steps is not None else {}), **options)
    if config.layers is not None and not isinstance(config.layers, tuple):
        config = replace(config, layers=tuple(config.layers))
    config.check()
    return config


class _Run:
    """One distillation: the accelerator, the student and its optimizer and schedule, the draw
    generator, the teacher's targets, the held-out checks and the best weights so far."""

    def __init__(self, pruned: nn.Module, teacher: nn.Module | None, inputs: Sequence,
                 cfg: DistillConfig, cached: Sequence | None, check_inputs: Sequence | None):
        self.pruned, self.teacher, self.cfg = pruned, teacher, cfg
        anatomy = resolve(pruned)
        text_tokens = anatomy.is_text and cfg.match != "output"
        self.kind = "kl" if anatomy.has_classifier else ("tokens" if text_tokens else "cosine")
        self.final = "tokens" if text_tokens else "output"
        self.pool = pooling(pruned)  # the sentence term of the "tokens" loss
        self.student_layers = self.teacher_at = None
        self.on_the_fly = False
        if cfg.match == "layers":
            self.teacher_at = _resolve_layers(pruned, teacher, cfg.layers)
            self.student_layers = list(range(len(self.teacher_at)))
            self.on_the_fly = (cached is None and teacher is not None and _layer_bytes(
                teacher, inputs, self.teacher_at, cfg.match) > cfg.cache_limit)
        acc = self.acc = make_accelerator(device_of(pruned), cfg.mixed_precision, cfg.grad_accumulation)
        self.rank, self.count, self.main = acc.process_index, acc.num_processes, acc.is_main_process
        self.device = train_device(acc, pruned)
        if self.count > 1:  # each process trains on its own device
            pruned.to(self.device)
            if teacher is not None:
                teacher.to(self.device)
        self.data = _prepare_data(teacher, inputs, cfg, cached, check_inputs, self.final,
                                  self.teacher_at, self.on_the_fly, self.rank, self.count)
        self.params = _freeze(pruned, cfg.train)
        raw_opt = adamw(self.params, cfg.lr)
        self.sched = warmup_cosine(raw_opt, max(1, int(WARMUP * cfg.steps)), cfg.steps)
        self.student, self.opt = acc.prepare(_Student(pruned, self.final, self.student_layers), raw_opt)
        self._draw_setup()
        self.result = DistillResult(
            cfg.steps, 0.0, cfg.train, cfg.lr, cfg.batch_size, cfg.temperature, self.kind,
            trainable_params=sum(p.numel() for p in self.params), match=cfg.match,
            layers=self.teacher_at, teacher_cached=not self.on_the_fly,
            mixed_precision=cfg.mixed_precision, grad_accumulation=cfg.grad_accumulation,
            processes=self.count)

    def _draw_setup(self) -> None:
        """Every process draws the same global rows (the draw of one process); each trains on
        those in its shard, its loss weighted by its share, so the averaged gradient is one
        process's."""
        data = self.data
        self.full = [batch_len(b) for b in data.inputs] if self.count == 1 else reduce_sum(
            self.acc, [batch_len(b) for b in data.inputs])
        self.sizes = torch.tensor(self.full, dtype=torch.float64)
        self.spare = next((i for i, b in enumerate(data.inputs) if batch_len(b)), None)
        if self.spare is None:
            raise ValueError(f"process {self.rank} of {self.count} has no distillation inputs: "
                             f"give more inputs than processes")
        self.gen = torch.Generator().manual_seed(self.cfg.seed)

    def begin(self, resume: DistillState | None) -> int:
        """Eval mode (no dropout: the student matches the teacher's deterministic outputs), the
        state to go on from or the first held-out check; returns the first step."""
        cfg, data = self.cfg, self.data
        self.prior = resume.result.seconds if resume is not None else 0.0
        self.t0 = time.perf_counter()
        self.pruned.eval()
        self.teacher_was = self.teacher.training if self.on_the_fly else False
        if self.on_the_fly:
            self.teacher.eval()  # it runs every step (teacher_outputs sets and restores its own mode)
        self.check_at = ({round(cfg.steps * (c + 1) / cfg.checks) for c in range(cfg.checks)}
                         if data.held_x or self.count > 1 else set())
        self.best = None  # (held-out loss, step, copy of the trainable parameters then)
        start = 0
        if resume is not None:
            start = resume.step
            self.opt.optimizer.load_state_dict(resume.optimizer)
            self.sched.load_state_dict(resume.scheduler)
            self.gen.set_state(resume.generators[0])
            self.result = resume.result
            if resume.best_params is not None:
                self.best = (resume.best_loss, resume.best_step,
                             [t.to(self.device) for t in resume.best_params])
        elif self.check_at:
            self.result.heldout[0] = self.heldout()
            self.best = (self.result.heldout[0], 0, [p.detach().clone() for p in self.params])
        self.running = self.result.losses[-1] if self.result.losses else None
        self.synced = len(self.result.losses)  # losses before this are over every process
        return start

    def heldout(self) -> float:
        total, n = _heldout_sums(self.pruned, self.data.held_x, self.data.held_t, self.kind,
                                 self.cfg.temperature, self.device)
        total, n = reduce_sum(self.acc, [total, n])
        return total / max(1.0, n)

    def _micro_batch(self) -> float:
        """Draw one micro-batch, take its gradient step; returns its loss."""
        cfg, data, count = self.cfg, self.data, self.count
        k = int(torch.multinomial(self.sizes, 1, generator=self.gen))  # a batch, by its size
        idx = torch.randperm(int(self.full[k]), generator=self.gen)[:cfg.batch_size]
        mine = idx[idx % count == self.rank] // count  # rows of this process's shard
        share = len(mine) * count / len(idx)
        if not len(mine):  # none drawn here: one row, weighted 0, keeps DDP in step
            k, mine, share = self.spare, torch.zeros(1, dtype=torch.long), 0.0
        idx = mine
        x, mask = _rows(data.inputs[k], idx, self.device), _mask(data.inputs[k], idx)
        if data.targets is None:
            with torch.no_grad():
                y, hs = _outputs(self.teacher, x, self.final, self.teacher_at)
            target = [y, *hs] if self.teacher_at is not None else y
        else:
            target = _take(data.targets[k], idx, self.device)
        with self.acc.accumulate(self.student):
            out, hs = self.student(x)
            if self.student_layers is None:
                loss = distill_loss(out.float(), target, self.kind, cfg.temperature, mask, self.pool)
            else:
                loss = (distill_loss(out.float(), target[0], self.kind, cfg.temperature, mask,
                                     self.pool)
                        + layer_loss(hs, target[1:], mask))
            if count > 1:
                loss = loss * share
            self.acc.backward(loss)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def step(self, step: int) -> None:
        """One optimizer step (its micro-batches), the schedule, and a held-out check where due."""
        value = 0.0
        for _ in range(self.cfg.grad_accumulation):
            value += self._micro_batch() / self.cfg.grad_accumulation
        if not self.acc.optimizer_step_was_skipped:
            self.sched.step()
        self.running = value if self.running is None else 0.95 * self.running + 0.05 * value
        self.result.losses.append(value)
        if step + 1 in self.check_at:
            loss_now = self.heldout()
            self.result.heldout[step + 1] = loss_now
            if loss_now < self.best[0]:
                self.best = (loss_now, step + 1, [p.detach().clone() for p in self.params])

    def save(self, step: int, checkpoint: Callable[[DistillState], None] | None) -> None:
        """The state after `step` to the checkpoint hook (main process; every process waits)."""
        self.synced = _sum_losses(self.acc, self.result, self.synced)
        if self.main and checkpoint is not None:  # the state only where it is written
            best = self.best
            self.result.seconds = self.prior + time.perf_counter() - self.t0
            checkpoint(DistillState(
                step, self.opt.optimizer.state_dict(), self.sched.state_dict(),
                [self.gen.get_state()], None if best is None else best[0],
                0 if best is None else best[1],
                None if best is None else [t.detach().cpu().clone() for t in best[2]],
                self.result))
        self.acc.wait_for_everyone()

    def keep_best(self) -> None:
        """The losses summed over processes; the best held-out check's weights put back."""
        self.synced = _sum_losses(self.acc, self.result, self.synced)
        if self.best is not None:
            self.result.kept_step = self.best[1]
            with torch.no_grad():
                for p, saved in zip(self.params, self.best[2]):
                    p.copy_(saved)
        else:
            self.result.kept_step = self.cfg.steps

    def end(self) -> None:
        """Eval mode, no gradients, the teacher's mode back, the accelerator's memory freed."""
        self.pruned.eval()
        if self.on_the_fly:
            self.teacher.train(self.teacher_was)
        for p in self.pruned.parameters():
            p.requires_grad_(False)
        self.result.seconds = self.prior + time.perf_counter() - self.t0
        self.acc.free_memory()

    def log(self) -> None:
        cfg, result = self.cfg, self.result
        log.info("distilled %d steps (%s, %s, lr %g, %s precision, %d process(es)) in %.1f s: loss "
                 "%.4g -> %.4g; kept step %d (held-out loss %s)", cfg.steps, cfg.train, cfg.match,
                 cfg.lr, cfg.mixed_precision, self.count, result.seconds, result.losses[0],
                 self.running, result.kept_step,
                 ", ".join(f"{k}: {v:.3g}" for k, v in result.heldout.items()))
