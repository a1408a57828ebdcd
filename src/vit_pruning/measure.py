"""Measurement: parameters, FLOPs, latency, top-1 accuracy and output fidelity (KL)."""
from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from .anatomy import (DUAL_CLASSES, input_channels, is_text_config, mae_noise, output_kind,
                      resolve, sentence_pool)
from .modeling_vit_pruning import tower_config
from .batches import batch_labels, batch_pixels, iter_limited
from .modes import device_of, eval_mode

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 * 2**20  # the largest mmap threshold glibc accepts on 64-bit


def output_tensor(out) -> torch.Tensor:
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key) and getattr(out, key) is not None:
            return getattr(out, key)
    return out[0] if isinstance(out, (tuple, list)) else out


def forward_output(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """What fidelity is measured on (see :data:`vit_pruning.anatomy.SUPPORTED_CLASSES`): logits
    for a classifier, the last hidden state for a headless backbone, the image embedding for
    CLIP / SigLIP (towers and dual models: only the image path runs), and the pooled sentence
    embedding for a text encoder (`inputs`: padding-free token ids; see
    :func:`vit_pruning.anatomy.sentence_pool`)."""
    if not inputs.is_floating_point():
        return sentence_pool(model.config, output_tensor(model(input_ids=inputs)))
    kind = output_kind(model)
    if kind == "image_embeds":
        out = model.get_image_features(pixel_values=inputs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output  # 5.x: an output object
    noise = mae_noise(model, inputs.shape[0])  # shape[0], not len(): stays symbolic in export
    out = model(pixel_values=inputs, **({} if noise is None else {"noise": noise}))
    if kind == "pooled":
        return out.pooler_output
    return output_tensor(out)


def count_total_params(model: nn.Module) -> int:
    """All parameters of the model as passed (embeddings, blocks, norms, head), shared ones
    once; for a dual CLIP / SigLIP model those of its image path (vision tower and projection),
    the part pruning and fidelity concern."""
    if any(cls.__name__ in DUAL_CLASSES for cls in type(model).__mro__):
        parts = [model.vision_model] + [getattr(model, a) for a in ("visual_projection",)
                                        if isinstance(getattr(model, a, None), nn.Module)]
        return sum(p.numel() for m in parts for p in m.parameters())
    return sum(p.numel() for p in model.parameters())


def count_block_params(model: nn.Module) -> list[int]:
    """Parameters of each transformer block, in order."""
    return [sum(p.numel() for p in parts.block.parameters()) for parts in resolve(model).parts]


def compute_actual_sparsity(original_params: int, pruned_params: int) -> float:
    """1 - pruned/original: the fraction of parameters removed."""
    if original_params <= 0:
        raise ValueError("original_params must be positive")
    return 1.0 - pruned_params / original_params


def example_inputs(model: nn.Module, batch_size: int = 1, image_size: int | None = None,
                   seq_len: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    """A deterministic random input batch for the model: images of `image_size` (default: the
    config's), or `seq_len` token ids for a text encoder."""
    gen = torch.Generator().manual_seed(seed)
    cfg = tower_config(model.config)
    if is_text_config(cfg):
        ids = torch.randint(1, int(cfg.vocab_size), (batch_size, seq_len), generator=gen)
        return {"input_ids": ids.to(device_of(model))}
    size = image_size or int(cfg.image_size)
    channels = input_channels(model)
    x = torch.randn(batch_size, channels, size, size, generator=gen)
    return {"pixel_values": x.to(device_of(model))}


def run_model(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """One forward on :func:`example_inputs`, the path :func:`forward_output` measures (a dual
    CLIP / SigLIP model runs its image path only)."""
    return forward_output(model, next(iter(inputs.values())))


@torch.no_grad()
def count_flops(model: nn.Module, image_size: int | None = None, batch_size: int = 1,
                seq_len: int = 128) -> int:
    """FLOPs of one forward pass (torch.utils.flop_counter: 2 per multiply-add, matmuls/convs/attention)."""
    x = example_inputs(model, batch_size, image_size, seq_len)
    with eval_mode(model):
        with FlopCounterMode(display=False) as counter:
            run_model(model, x)
    return int(counter.get_total_flops())


@torch.no_grad()
def measure_latency(model: nn.Module, batch_size: int = 1, image_size: int | None = None,
                    warmup: int = 3, repeats: int = 10, seq_len: int = 128,
                    steady_allocator: bool = False) -> float:
    """Median wall time (seconds) of one forward pass after `warmup` untimed passes (on the
    CPU, with `steady_allocator`, malloc's thresholds fixed first: :func:`steady_cpu_allocator`,
    which changes them for the whole process)."""
    x = example_inputs(model, batch_size, image_size, seq_len)
    on_cuda = next(iter(x.values())).is_cuda
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    if not on_cuda and steady_allocator:
        steady_cpu_allocator()
    with eval_mode(model):
        for _ in range(warmup):
            run_model(model, x)
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            run_model(model, x)
            sync()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast to `dtype` on `device`, or nothing for float32/None."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class LatencyComparison:
    """Models timed back to back, interleaved, on the same input (see :func:`interleaved_latency`)."""

    names: list[str]
    median_ms: dict[str, float]  # median forward time per model
    ratio: dict[str, float]  # median over rounds of t(model) / t(first model)
    ratio_q1: dict[str, float]  # 25th percentile of the per-round ratios
    ratio_q3: dict[str, float]  # 75th percentile
    batch_size: int
    repeats: int  # rounds timed
    warmup: int
    timer: str  # "cuda events" or "perf_counter"
    dtype: str
    precision: float | None = None  # asked half-width of every ratio's interval (None: fixed rounds)
    max_repeats: int | None = None  # the most rounds timed to reach it
    # ~95% interval of each median ratio (median_interval); last, so that positional use stands
    ratio_interval: dict[str, tuple[float, float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**self.__dict__, "warnings": self.warnings()}

    def warnings(self) -> list[str]:
        """Why a ratio is not to be trusted: per-round ratios spread too wide (interquartile
        range over SPREAD_LIMIT of the median), or the ratio of the medians of the separate
        times disagreeing with it by more than that (the machine's speed changed mid-run)."""
        return [w for n in self.names[1:] for w in self._problems(n)]

    def untrusted(self) -> list[str]:
        """The models whose ratio :meth:`warnings` says not to trust."""
        return [n for n in self.names[1:] if self._problems(n)]

    def _problems(self, n: str) -> list[str]:
        """The warnings about model `n`'s ratio (none: it can be trusted)."""
        out = []
        r, q1, q3 = self.ratio[n], self.ratio_q1[n], self.ratio_q3[n]
        of_medians = self.median_ms[n] / self.median_ms[self.names[0]]
        lo, hi = self.ratio_interval.get(n, (r, r))
        if self.precision and (hi - lo) / 2 > self.precision:
            out.append(f"{n}: latency ratio {r:.3f} known only to [{lo:.3f}, {hi:.3f}] (95%) "
                       f"after {self.repeats} rounds, not to +-{self.precision:g} as asked: "
                       f"the machine is noisy; rerun on an idle machine or raise "
                       f"--latency-max-repeats")
        if q3 - q1 > SPREAD_LIMIT * r:
            out.append(f"{n}: per-round latency ratios spread from {q1:.3f} to {q3:.3f} "
                       f"(quartiles) around {r:.3f}: too wide to trust; rerun on an idle "
                       f"machine or raise --latency-repeats")
        elif abs(of_medians - r) > SPREAD_LIMIT * r:
            out.append(f"{n}: the ratio of median times ({of_medians:.3f}) and the median "
                       f"per-round ratio ({r:.3f}) disagree: the machine's speed changed "
                       f"during timing; rerun on an idle machine")
        return out


SPREAD_LIMIT = 0.25  # a latency ratio is flagged when its quartiles span more than 25% of it
FAST_SECONDS = 10.0  # fast models may time more than 10 x their rounds, as many as fit in this


def median_interval(values: Sequence[float], z: float = 1.96) -> tuple[float, float]:
    """A distribution-free confidence interval of the median of `values` (z = 1.96: about 95%):
    the order statistics of ranks n/2 - z*sqrt(n)/2 and n/2 + 1 + z*sqrt(n)/2 (normal approximation
    to the binomial), which bracket the true median with that probability whatever the timings'
    distribution. With 10 values it is the 2nd and 9th smallest."""
    ordered, n = sorted(values), len(values)
    half = z * math.sqrt(n) / 2
    lo = min(n - 1, max(0, round(n / 2 - half) - 1))
    hi = max(0, min(n - 1, round(n / 2 + 1 + half) - 1))
    return ordered[lo], ordered[hi]


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def steady_cpu_allocator() -> bool:
    """Fix glibc malloc's thresholds so that CPU timings do not depend on which model ran
    before: by default a freed block larger than the mmap threshold raises that threshold to
    its size (and the trim threshold to twice it), so whether the next forward's activations
    come from the heap or from fresh mmap'd pages (one page fault per 4 KiB) depends on the
    sizes the last forwards freed. Timed in a pair with ViT-B/16 at batch 8 on a 2-core CPU, a
    model with every MLP at width 2720 ran at 0.855 of the baseline with the default thresholds
    and at 0.926 with them fixed (0.928 predicted by the latency model); the default let the
    smaller model's activations reuse the heap while the baseline's were mapped afresh. Sets the
    mmap threshold to its maximum (32 MiB) and stops trimming, for the rest of this process
    (glibc has no call that gives the dynamic thresholds back, so only a caller that owns its
    process should ask: the command line does, unless --no-steady-allocator); returns False
    (and changes nothing) where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)  # the loaded C library: no ldconfig run (40 ms) at each timing
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
        ok = libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok
    except (OSError, AttributeError):
        return False
    if not ok:
        log.debug("mallopt refused the timing thresholds")
    return ok


@torch.no_grad()
def time_rounds(calls: Mapping[str, Callable[[], object]], repeats: int, warmup: int,
                device: torch.device, start: int = 0, steady_allocator: bool = False,
                bar=None) -> dict[str, list[float]]:
    """Seconds of each call per round: `warmup` untimed rounds, then `repeats` rounds of every
    call once, the order rotated each round (from rotation `start`, to go on from earlier
    rounds), so that a machine slowing down or speeding up hits all of them alike. CUDA calls
    are timed with CUDA events; CPU calls with perf_counter (with `steady_allocator`, after
    fixing malloc's thresholds for the whole process: :func:`steady_cpu_allocator`; a library
    call leaves them alone unless asked). `bar`, a progress bar, advances once per round."""
    if device.type == "cpu" and steady_allocator:
        steady_cpu_allocator()
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    for r in range(start, start + repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            if device.type == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                calls[n]()
                end.record()
                end.synchronize()
                times[n].append(begin.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                calls[n]()
                times[n].append(time.perf_counter() - t0)
        if bar is not None:
            bar.update(1)
    return times


@torch.no_grad()
def interleaved_latency(models: Mapping[str, nn.Module], batch_size: int = 1, repeats: int = 10,
                        warmup: int = 3, seq_len: int = 128, dtype: torch.dtype | None = None,
                        precision: float | None = None, max_repeats: int | None = None,
                        steady_allocator: bool = False, progress: bool = False
                        ) -> LatencyComparison:
    """Time several models on one input, one forward each per round, rounds interleaved and the
    order rotated each round, so that a machine slowing down or speeding up hits all of them
    alike. The first model is the reference of the ratios. CUDA forwards are timed with CUDA
    events; `dtype` (bfloat16/float16) times under autocast. With `precision`, rounds go on
    after the first `repeats` (doubling them each time, up to `max_repeats`; by default 10 x
    `repeats`, or as many as fit in FAST_SECONDS where that is more) until every ratio's ~95%
    interval (:func:`median_interval`) is at most 2 x `precision` wide: on a quiet machine 10
    rounds give ViT-B at batch 8 +-0.01, on a noisy one (per-round ratios with quartiles 0.19
    apart) they gave +-0.05, and two timings of one model minutes apart differed by 0.07; a 3 ms
    forward's ratio needed some 400 rounds (about a second) on a quiet one. `steady_allocator`:
    see :func:`time_rounds` (the command line asks for it; a library call changes nothing
    process-wide unless it does). `progress`: a bar of the rounds timed (the most they may
    take while the precision is not reached)."""
    names = list(models)
    first = models[names[0]]
    x = example_inputs(first, batch_size, seq_len=seq_len)
    device = next(iter(x.values())).device
    bar = tqdm(total=repeats, desc=f"timing {len(names)} models", unit="round", leave=False,
               disable=not progress)
    with eval_mode(*models.values()), bar:
        calls = {n: (lambda m=m: run_model(m, x)) for n, m in models.items()}
        with autocast_context(device, dtype):
            times = time_rounds(calls, repeats, warmup, device, steady_allocator=steady_allocator,
                                bar=bar)
            done = repeats
            cap = _round_cap(times, repeats, max_repeats)
            if precision:
                bar.total = cap  # the most the precision may take
                bar.set_postfix_str(f"until each ratio is known to +-{precision:g}")
            while precision and done < cap and _widest(times, names) > 2 * precision:
                more = min(cap - done, done)
                for n, t in time_rounds(calls, more, 0, device, start=done,
                                        steady_allocator=steady_allocator, bar=bar).items():
                    times[n] += t
                done += more
    ratios = _ratios(times, names)
    return LatencyComparison(
        names=names, median_ms={n: 1e3 * statistics.median(times[n]) for n in names},
        ratio={n: statistics.median(ratios[n]) for n in names},
        ratio_q1={n: _quantile(ratios[n], 0.25) for n in names},
        ratio_q3={n: _quantile(ratios[n], 0.75) for n in names},
        ratio_interval={n: median_interval(ratios[n]) for n in names},
        batch_size=batch_size, repeats=done, warmup=warmup,
        timer="cuda events" if device.type == "cuda" else "perf_counter",
        dtype=str(dtype or torch.float32).replace("torch.", ""),
        precision=precision or None, max_repeats=cap if precision else None)


def _round_cap(times: Mapping[str, list[float]], repeats: int, max_repeats: int | None) -> int:
    """The most rounds a precise timing may run: `max_repeats` if given, else 10 x `repeats` or
    the rounds that fit in FAST_SECONDS (at the first rounds' median times), whichever is more."""
    if max_repeats is not None:
        return max(repeats, max_repeats)
    round_s = sum(statistics.median(t) for t in times.values())
    return max(10 * repeats, int(FAST_SECONDS / max(round_s, 1e-9)))


def _ratios(times: Mapping[str, list[float]], names: list[str]) -> dict[str, list[float]]:
    """Per-round ratios t(model) / t(first model)."""
    return {n: [a / b for a, b in zip(times[n], times[names[0]])] for n in names}


def _widest(times: Mapping[str, list[float]], names: list[str]) -> float:
    """The widest ~95% interval of the median ratio among the models after the first."""
    ratios = _ratios(times, names)
    return max((hi - lo for lo, hi in map(median_interval, (ratios[n] for n in names[1:]))),
               default=0.0)


@torch.no_grad()
def evaluate_top1(model: nn.Module, loader: Iterable, device: str | torch.device | None = None,
                  max_batches: int | None = None) -> float:
    """Top-1 accuracy over the first `max_batches` batches of a labelled loader (seed API);
    batches go to `device` (default: the model's)."""
    device = device if device is not None else device_of(model)
    correct = total = 0
    with eval_mode(model):
        for batch in iter_limited(loader, max_batches):
            logits = forward_output(model, batch_pixels(batch).to(device))
            labels = batch_labels(batch).to(device)
            correct += int((logits.argmax(-1) == labels).sum())
            total += int(labels.numel())
    if total == 0:
        raise ValueError("evaluate_top1: the loader gave no batches")
    return correct / total


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> float:
    """Mean over samples of KL(softmax(p) || softmax(q)); p is the pruned, q the reference."""
    return float(_kl_rows(logits_p, logits_q).mean())


def _kl_rows(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits_p.double(), dim=-1)
    logq = F.log_softmax(logits_q.double(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def single_output_problem(model: nn.Module) -> str | None:
    """Why the outputs of `model` cannot be compared by KL (None where they can): a classifier
    head with one output, which transformers trains as a regression (num_labels=1), has no
    class probabilities; the softmax of one logit is 1 whatever the model does, so every
    pruned model would measure as unchanged."""
    if not resolve(model).has_classifier or int(getattr(model.config, "num_labels", 2)) != 1:
        return None
    return ("its classifier head has one output (a regression head, as transformers treats "
            "num_labels=1): fidelity is the KL of class probabilities, which one output does "
            "not have, so every pruned model would measure as unchanged")


def output_distance(out: torch.Tensor, ref: torch.Tensor, is_logits: bool) -> float:
    """KL for logits; 1 - mean cosine for hidden states (per token, headless ViT) or sentence
    embeddings (text encoders)."""
    if is_logits:
        return kl_divergence(out, ref)
    cos = F.cosine_similarity(out.double(), ref.double(), dim=-1)
    return float(1.0 - cos.mean())


def row_distances(out: torch.Tensor, ref: torch.Tensor, is_logits: bool) -> torch.Tensor:
    """:func:`output_distance` per input row (image or sentence): KL per row for logits, else
    1 - cosine averaged over each row's tokens. Their mean is the distance (to rounding); their
    spread says how sure a comparison of two models on these rows is."""
    if is_logits:
        return _kl_rows(out, ref)
    cos = F.cosine_similarity(out.double(), ref.double(), dim=-1)
    return 1.0 - (cos.reshape(len(cos), -1).mean(-1))


def mean_cosine(emb: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over rows of cos(emb_i, ref_i): how close pruned sentence embeddings stay."""
    return float(F.cosine_similarity(emb.double(), ref.double(), dim=-1).mean())


def nearest_neighbours(emb: torch.Tensor) -> torch.Tensor:
    """Index of each row's nearest *other* row by cosine similarity."""
    e = F.normalize(emb.double(), dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(-2.0)
    return sim.argmax(-1)


def retrieval_agreement(emb: torch.Tensor, ref: torch.Tensor) -> float:
    """Fraction of rows whose nearest neighbour (among the other rows) is the same in `emb`
    (pruned) as in `ref` (unpruned)."""
    return float((nearest_neighbours(emb) == nearest_neighbours(ref)).double().mean())


@torch.no_grad()
def collect_outputs(model: nn.Module, pixel_batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Concatenated model outputs (see :func:`forward_output`) over a list of input batches
    (model put in eval mode)."""
    with eval_mode(model):
        return torch.cat([forward_output(model, x) for x in pixel_batches])
