"""Run reports: per-stage measurements, JSON + Markdown + PNG plot, written atomically."""
from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

from .atomic import atomic_write, atomic_write_json, atomic_write_text
from .config import HEAD_GAIN_Z


@dataclass
class StageMetrics:
    """Measurements of the model after one stage, all on the same evaluation images."""

    name: str  # "baseline", "stage1", "stage2", "recovered"
    params: int
    flops: int
    latency_ms: float
    top1: float | None  # None when no labelled data / not applicable
    kl_to_baseline: float | None  # mean KL(stage || baseline) of logits on the eval images
    cosine: float | None = None  # text encoders: mean cosine of sentence embeddings to baseline
    agreement: float | None = None  # text encoders: nearest-neighbour agreement with baseline
    latency_ratio: float | None = None  # median over interleaved rounds of t(stage) / t(baseline)
    latency_ratio_iqr: tuple[float, float] | None = None  # 25th and 75th percentile of that ratio
    latency_noisy: bool = False  # the timing judged that ratio too wide to trust (warnings say why)


def rounds_text(ls: dict) -> str:
    """"12 interleaved rounds", and the precision they were timed to if one was asked (a
    `latency_setup` entry: LatencyComparison.to_dict)."""
    out = f"{ls['repeats']} interleaved rounds"
    if ls.get("precision"):
        out += (f" (timed until every ratio's 95% interval was within +-{ls['precision']:g}, "
                f"at most {ls['max_repeats']} rounds)")
    return out


def _pct(new: float, old: float) -> float:
    """Relative change in percent (negative = smaller)."""
    return 100.0 * (new - old) / old if old else 0.0


def _removed_pct(new: float, old: float) -> float:
    return 100.0 * (old - new) / old if old else 0.0


def versions() -> dict:
    import datasets
    import torch
    import transformers

    from ._version import __version__
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "datasets": datasets.__version__,
            "vit_pruning": __version__}


def summarize(stages: list[StageMetrics]) -> dict:
    """The seed's sections (P0 -> P1 -> P2, latency deltas, accuracy drops) from stage metrics."""
    by = {s.name: s for s in stages}
    base = by["baseline"]
    out: dict = {"parameters": {}, "latency": {}, "accuracy": {}, "flops": {}, "fidelity": {}}
    prev = base
    for s in stages:
        out["parameters"][s.name] = s.params
        out["flops"][s.name] = s.flops
        out["latency"][s.name + "_ms"] = s.latency_ms
        out["accuracy"][s.name] = s.top1
        if s.cosine is not None:
            out["fidelity"][s.name] = {"embedding_cosine": s.cosine, "neighbour_agreement": s.agreement}
        if s is not base:
            out["parameters"][f"{s.name}_reduction_vs_previous_pct"] = _removed_pct(s.params, prev.params)
            # one definition of a latency change everywhere: the median per-round ratio
            out["latency"][f"{s.name}_delta_vs_baseline_pct"] = (
                100.0 * (s.latency_ratio - 1) if s.latency_ratio is not None
                else _pct(s.latency_ms, base.latency_ms))
            out["flops"][f"{s.name}_ratio_to_baseline"] = s.flops / base.flops if base.flops else None
            if s.top1 is not None and base.top1 is not None:
                out["accuracy"][f"{s.name}_drop"] = base.top1 - s.top1
            prev = s
    final = by.get("stage2", stages[-1])
    out["parameters"]["final_reduction_pct"] = _removed_pct(final.params, base.params)
    return out


def _objective_line(rep: dict) -> str | None:
    """The target line of a FLOP or latency target (None for a parameter target)."""
    obj = rep.get("objective") or {}
    if obj.get("asked_ratio") is None:
        return None
    what = "FLOPs" if obj["objective"] == "flops" else "latency"
    line = (f"- objective: **{what}**, {obj['flag']} {obj['asked_ratio']:g}: predicted ratio "
            f"**{obj['predicted_ratio']:.4f}**, measured **{obj['measured_ratio']:.4f}**")
    if obj["objective"] == "latency":
        q1, q3 = obj["latency_ratio_iqr"]
        lm = obj.get("latency_model") or {}
        line += (f" [quartiles {q1:.3f}, {q3:.3f}] (the latency model: {lm.get('device')}, "
                 f"{lm.get('dtype')}, batch {lm.get('batch_size')}, "
                 f"{1e3 * lm.get('total_s', 0):.3f} ms per forward of which "
                 f"{1e3 * lm.get('fixed_s', 0):.3f} ms outside the blocks)")
    if "missed" in obj:
        lo, hi = obj["measured_interval"]
        line += (f"; **missed**: the measured ratio (95% interval [{lo:.3f}, {hi:.3f}]) is more "
                 f"than {obj['tolerance']:g} from the asked one" if obj["missed"] else
                 f"; met: within {obj['tolerance']:g} of the asked ratio (95% interval "
                 f"[{lo:.3f}, {hi:.3f}])")
    attempts = obj.get("attempts") or []
    if len(attempts) > 1:
        first = attempts[0]
        again = ", then at ".join(f"{a['planned_ratio']:.4f} (measured {a['measured_ratio']:.4f})"
                                  for a in attempts[1:])
        line += (f"; the first plan (predicted {first['predicted_ratio']:.4f}) measured "
                 f"{first['measured_ratio']:.4f}, so it was planned again at {again}; "
                 f"the closest one was kept")
    elif abs(obj["planned_ratio"] - obj["asked_ratio"]) > 1e-9:
        line += (f"; no structure lands on the asked ratio, so the nearest below it was planned "
                 f"({obj['planned_ratio']:.4f})")
    return (line + f"; parameters {obj['params_ratio']:.4f}x, FLOPs {obj['flops_ratio']:.4f}x "
            f"(parameter sparsity {rep['achieved_sparsity']:.4f})")


def markdown(rep: dict) -> str:
    """Render a report dict as Markdown: the header, the stages, the plan, the budget search
    and the distillation where there are any, the calibration, artifacts and versions."""
    text = any(s.get("cosine") is not None for s in rep["stages"])
    lines = (_md_header(rep) + _md_stages(rep, text) + _md_plan(rep) + _md_budget(rep)
             + _md_distillation(rep) + _md_rest(rep, text))
    return "\n".join(lines)


def _md_header(rep: dict) -> list[str]:
    al = rep.get("alignment") or {}
    bound = rep.get("target_bound")
    lines = [f"# vit-2ssp report `{rep['run_id']}`", "",
             f"- model: `{rep['model']['id']}` ({rep['model']['class']}, {rep['model']['num_blocks']} blocks, "
             f"hidden {rep['model']['hidden_size']}, MLP {rep['model']['intermediate_size']})",
             _objective_line(rep) or
             f"- target sparsity: **{rep['target']:.4f}**, achieved **{rep['achieved_sparsity']:.4f}** "
             f"(error {rep['target_error']:.2e}" + (
                 f"; the planner's bound {bound:.2e}: {rep.get('target_bound_why', '')})" if bound
                 is not None else f"; one MLP neuron = {rep['one_neuron_sparsity']:.2e})"),
             f"- depth unit: **{rep['depth_unit']}**, stages run: {rep['config']['stage']}, seed {rep['seed']}",
             f"- min_remaining used: {rep['min_remaining']} ({rep['min_remaining_source']})"]
    if al:
        lines.append(f"- alignment: kept MLP widths are multiples of {al['align']} ({al['source']}); "
                     f"width policy {al['width_policy']}" + (
                         f"; one width for every block, {al['uniform_width']}"
                         if al.get("uniform_width") is not None else "; widths per block"))
    lines += [f"- accuracy: {rep['accuracy_note']}"]
    lines += [f"- note: {n}" for n in rep.get("notes", [])]
    return lines


def _md_stages(rep: dict, text: bool) -> list[str]:
    st = rep["stages"]
    lines: list[str] = []
    lines += ["", "## Stages", "",
              "| stage | params | params vs previous | FLOPs (G) | latency (ms, median) | latency ratio [quartiles] | top-1 | top-1 drop | KL to baseline |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    if text:  # a text encoder: fidelity of sentence embeddings instead of accuracy
        lines[-2:] = ["| stage | params | params vs previous | FLOPs (G) | latency (ms, median) | latency "
                      "ratio [quartiles] | top-1 | embedding cosine | neighbour agreement |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = st[0]
    prev = base
    for s in st:
        dparams = "" if s is base else f"{_removed_pct(s['params'], prev['params']):.2f}% removed"
        dlat = "1" if s is base else _ratio_text(s)
        top1 = "n/a" if s["top1"] is None else f"{s['top1']:.4f}"
        drop = "" if s is base or s["top1"] is None or base["top1"] is None else \
            f"{100 * (base['top1'] - s['top1']):.2f} pp"
        kl = "" if s["kl_to_baseline"] is None else f"{s['kl_to_baseline']:.4g}"
        if text:
            drop = "" if s.get("cosine") is None else f"{s['cosine']:.4f}"
            kl = "" if s.get("agreement") is None else f"{100 * s['agreement']:.1f}%"
        lines.append(f"| {s['name']} | {s['params']:,} | {dparams} | {s['flops'] / 1e9:.4f} | "
                     f"{s['latency_ms']:.2f} | {dlat} | {top1} | {drop} | {kl} |")
        if s is not base:
            prev = s
    return lines


def _md_plan(rep: dict) -> list[str]:
    base = rep["stages"][0]
    lines: list[str] = []
    p = rep["plan"]
    ls = rep["latency_setup"]
    lines += ["", f"Final: P0 {base['params']:,} -> P2 {rep['params_final']:,} "
                  f"({rep['summary']['parameters']['final_reduction_pct']:.2f}% removed).", "",
              f"Latency: every stage timed back to back in {rounds_text(ls)} after "
              f"{ls['warmup']} warm-up, batch {ls['batch_size']}, {ls.get('dtype', 'float32')}, "
              f"{ls['threads']} threads, device {ls['device']}. The ratio is the median over rounds of "
              f"t(stage) / t(baseline), with its quartiles; the milliseconds are each stage's "
              f"median time."]
    lines += [f"- **warning**: {w}" for w in ls.get("warnings", [])]
    widths = p.get("kept_widths")
    lines += ["", "## Plan", "",
              f"- split between stages: {p['split']}; {p['unit']} units removed: {p['blocks_to_prune']} "
              f"at indices {p['removed_indices']} (greedy order {p['removal_order']})"
              + (f"; attention sublayers of kept blocks {p['attention_indices']} removed too "
                 f"(mixed depth units)" if p.get("attention_indices") else ""),
              f"- MLP neurons removed per block: {p['neurons_removed_per_block']}"
              + (f"; kept widths {widths} (0: block removed)" if widths else ""),
              *([f"- attention heads removed per block: {list(p['heads_to_prune'])}; kept heads "
                 f"{p['kept_heads']} (0: block or attention removed)"]
                if any(p.get("heads_to_prune") or ()) else []),
              f"- estimated removal: {p['estimated_params_removed']:,} parameters; achieved: "
              f"{p['achieved_params_removed']:,}"]
    for note in p.get("notes", []):
        lines.append(f"- note: {note}")
    if p.get("neuron_selection"):
        tried = p.get("neuron_selection_search") or {}
        lines.append(f"- neuron selection: {p['neuron_selection']}" + (
            " (held-out calibration distance: " + ", ".join(f"{k} {v:.4g}" for k, v in tried.items())
            + ")" if tried else ""))
    if p.get("refit_prior"):
        lines.append("- refit damped toward: " + ("the unpruned weights" if p["refit_prior"] == "unpruned"
                                                 else "zero"))
    if p.get("split_search"):
        lines.append("- split search (depth units -> held-out calibration distance): " + ", ".join(
            f"{k}: {v:.4g}" for k, v in p["split_search"].items()))
    if p.get("gates"):
        lines.append(f"- held-out gates (a plan or prior is taken only where its per-row gain is "
                     f"clear: paired z above {HEAD_GAIN_Z:g}): " + "; ".join(
                         f"{name}: {g['tried']} against {g['against']}, z {g['z']:.2f}, "
                         + ("taken" if g["kept"] else "not clear, not taken")
                         for name, g in p["gates"].items()))
    return lines


def _md_budget(rep: dict) -> list[str]:
    lines: list[str] = []
    search = rep.get("budget_search")
    if search:
        lines += ["", "## Budget search", "",
                  f"- budget {search['budget']} {search['value']:g}: target **{search['chosen']:g}** "
                  f"chosen by bisection on a grid of {search['resolution']:g}, "
                  f"{search['prunings']} prunings, each measured on the inputs it chose on. "
                  f"Bisection assumes fidelity falls as the target grows: it ends on a bracket "
                  f"(this target kept the budget, {search['first_rejected']} next above it did "
                  f"not), not a proof that no larger target keeps it.",
                  f"- {search['selection_note']}"]
        for t in search["trials"]:
            lines.append(f"  - target {t['target']:g}: "
                         + ("kept" if t["accepted"] else "over budget")
                         + (" (" + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in t["measures"].items()) + ")"
                            if t["measures"] else ""))
        if rep["artifacts"].get("tradeoff_plot"):
            lines += ["", f"![trade-off]({Path(rep['artifacts']['tradeoff_plot']).name})"]
    return lines


def _md_distillation(rep: dict) -> list[str]:
    lines: list[str] = []
    dist = rep.get("distillation")
    if dist:
        losses = dist["losses"]
        lines += ["", "## Distillation", "",
                  f"- {dist['steps']} steps on {dist['inputs']} unlabeled inputs"
                  + (f" ({dist['augmented']} of them variants of calibration sentences)"
                     if dist.get("augmented") else "") + f", {dist['seconds']:.1f} s; "
                  f"loss {dist['loss']}" + (f" at temperature {dist['temperature']:g}" if dist["loss"] == "kl" else "")
                  + f"; trained: {dist['train']} ({dist['trainable_params']:,} parameters), lr {dist['lr']:g}, "
                  f"batch {dist['batch_size']}",
                  f"- learned: {dist.get('match', 'output')}" + (
                      f"; kept block i learns teacher block {dist['layers']}[i]"
                      + ("" if dist.get("teacher_cached", True) else
                         " (targets over the cache limit: the teacher ran at every step)")
                      if dist.get("layers") is not None else ""),
                  f"- loss: first step {losses[0]:.4g}, mean of the last 5% of steps "
                  f"{sum(losses[-max(1, len(losses) // 20):]) / max(1, len(losses) // 20):.4g}"
                  if losses else "- no steps",
                  f"- weights kept from step {dist['kept_step']} (loss on the held-out "
                  f"inputs by step: " + ", ".join(f"{k}: {v:.4g}" for k, v in dist["heldout"].items())
                  + ")" if dist.get("heldout") else "- no held-out inputs: the last step's weights kept"]
    return lines


def _md_rest(rep: dict, text: bool) -> list[str]:
    lines: list[str] = []
    c = rep["calibration"]
    what = "sentences" if text else "images"
    lines += ["", "## Calibration", "",
              f"- {c['count']} {what} from {c['dataset']} ({c['split']}), fingerprint `{c['fingerprint']}`"
              + (f"; {c['asked']} were asked, the train slice holds no more" if c.get("asked") else "")
              if c["count"] else "- none (weight-magnitude width scores, weight-norm depth proxy)"]
    skipped = rep.get("skipped_images") or []
    if skipped:
        lines += [f"- {len(skipped)} unusable images left out (--skip-bad-images): "
                  + "; ".join(skipped[:20]) + (" ..." if len(skipped) > 20 else "")]
    lines += ["", "## Artifacts", ""]
    for k, v in rep["artifacts"].items():
        if isinstance(v, dict) and "path" in v:  # the ONNX export's record
            v = onnx_line(v)
        lines.append(f"- {k}: {v if v else 'not written'}")
    if rep["artifacts"].get("plot"):
        lines += ["", f"![stages]({Path(rep['artifacts']['plot']).name})"]
    lines += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in rep["versions"].items()), ""]
    return lines


NOISY = " (noisy)"  # beside every latency ratio the timing judged too wide to trust


def _ratio_text(stage: dict) -> str:
    r, iqr = stage.get("latency_ratio"), stage.get("latency_ratio_iqr")
    if r is None:
        return ""
    return (f"{r:.3f}" + (NOISY if stage.get("latency_noisy") else "")
            + (f" [{iqr[0]:.3f}, {iqr[1]:.3f}]" if iqr else ""))


def _save_figure(fig, path: Path, title: str | None, bottom: float = 0.0) -> Path:
    """Title, lay out (leaving `bottom` of the figure free, for a legend) and write a figure as
    PNG (atomically), then close it."""
    import matplotlib.pyplot as plt
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    try:
        return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    finally:
        plt.close(fig)


def plot(stages: list[dict], path: Path, losses: list[float] | None = None,
         title: str | None = None, kept_step: int | None = None,
         asked_latency: float | None = None, plan: dict | None = None) -> Path:
    """The stage plot (:func:`stage_figure`) written as PNG, atomically."""
    return _save_figure(stage_figure(stages, losses, kept_step, asked_latency, plan), path, title)


def stage_figure(stages: list[dict], losses: list[float] | None = None,
                 kept_step: int | None = None, asked_latency: float | None = None,
                 plan: dict | None = None):
    """Bar charts of parameters, latency ratio (with its quartiles; a latency target's asked
    ratio drawn across), top-1 and embedding cosine by stage (fidelity axes zoomed to the
    values, so drops show), what each block keeps of its MLP width and heads (from the report's
    `plan`), and the distillation loss curve with the kept step marked when there is one."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["name"] for s in stages]
    ratios = [s.get("latency_ratio") or 1.0 for s in stages]
    iqr = [s.get("latency_ratio_iqr") or (r, r) for s, r in zip(stages, ratios)]
    panels = [("parameters (M)", [s["params"] / 1e6 for s in stages], "%.3g", None),
              ("latency ratio to baseline\n(median of rounds, quartiles; ? = noisy)", ratios,
               "%.3f", [[r - q[0] for r, q in zip(ratios, iqr)], [q[1] - r for r, q in zip(ratios, iqr)]])]
    noisy = [bool(s.get("latency_noisy")) for s in stages]
    if all(s["top1"] is not None for s in stages):
        panels.append(("top-1", [s["top1"] for s in stages], "%.4f", None))
    if all(s.get("cosine") is not None for s in stages[1:]) and len(stages) > 1:
        panels.append(("embedding cosine to baseline", [1.0] + [s["cosine"] for s in stages[1:]],
                       "%.4f", None))
    kept = _kept_per_block(plan)
    n = len(panels) + bool(losses) + bool(kept)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.4))
    if losses:
        _loss_panel(axes[-1], losses, kept_step)
    if kept:
        _kept_panel(axes[len(panels)], *kept)
    for ax, (name, vals, fmt, err) in zip(axes, panels):
        ax.set_title(name, fontsize=10)
        if fmt == "%.4f":
            _fidelity_panel(ax, names, vals, fmt)
        else:
            _bar_panel(ax, names, vals, fmt, err, noisy if err else None)
        ax.tick_params(axis="x", labelrotation=20)
    if asked_latency is not None:  # the latency panel is the second
        axes[1].axhline(asked_latency, color="#c33", ls="--", lw=1)
        axes[1].text(0.99, asked_latency, f"asked {asked_latency:g}", color="#c33", va="bottom",
                     ha="right", fontsize=8, transform=axes[1].get_yaxis_transform(),
                     bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    return fig


def _kept_per_block(plan: dict | None) -> tuple[list[float], list[float] | None] | None:
    """(share of its MLP width, share of its heads) each block keeps under a report's plan (0
    where the block goes; heads None where the plan does not count them), or None."""
    if not plan or plan.get("kept_widths") is None:
        return None
    widths = [k / (k + r) if k + r else 0.0 for k, r in
              zip(plan["kept_widths"], plan["neurons_removed_per_block"])]
    heads = None
    if plan.get("kept_heads") is not None:
        removed = plan.get("heads_to_prune") or [0] * len(widths)
        heads = [k / (k + r) if k else 0.0 for k, r in zip(plan["kept_heads"], removed)]
    return widths, heads


def _kept_panel(ax, widths: list[float], heads: list[float] | None) -> None:
    x = range(len(widths))
    step = 0.4 if heads is not None else 0.8
    ax.bar([i - step / 2 if heads is not None else i for i in x], widths, step,
           color="#4a7", label="MLP width")
    if heads is not None:
        ax.bar([i + step / 2 for i in x], heads, step, color="#47a", label="attention heads")
    ax.set_title("kept per block (0: block or attention removed)", fontsize=10)
    ax.set_xlabel("block")
    ax.set_ylim(0, 1.15)
    ax.set_xticks(list(x))
    ax.legend(fontsize=7, loc="upper right", ncols=2)


def _loss_panel(ax, losses: list[float], kept_step: int | None) -> None:
    """The distillation loss per step and its moving average, the kept step marked."""
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, color="#bbb", lw=0.6, label="per step")
    k = max(1, len(losses) // 50)  # a moving average over ~2% of the steps
    smooth = [sum(losses[max(0, i - k):i + 1]) / (i + 1 - max(0, i - k)) for i in range(len(losses))]
    ax.plot(steps, smooth, color="#3a7", label=f"mean of {k + 1} steps")
    if kept_step is not None:
        x = max(kept_step, 0.5)
        ax.axvline(x, color="#c33", ls="--", lw=1, label=f"kept: step {kept_step}")
    ax.set_yscale("log")
    ax.set_title("distillation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (log scale)")
    ax.legend(fontsize=7, loc="upper right")


def _bar_panel(ax, names: list[str], vals: list[float], fmt: str, err,
               noisy: list[bool] | None = None) -> None:
    """Bars from zero (parameters, latency ratio), each value written above its error bar; a
    value the timing does not trust is hatched and marked "?"."""
    noisy = noisy or [False] * len(vals)
    bars = ax.bar(names, vals, yerr=err, capsize=3 if err else 0,
                  color=["#777"] + ["#3a7"] * (len(vals) - 1))
    tops = [v + (err[1][i] if err else 0.0) for i, v in enumerate(vals)]
    for i, (v, top) in enumerate(zip(vals, tops)):
        if noisy[i]:
            bars[i].set_hatch("//")
            bars[i].set_alpha(0.6)
        ax.annotate(fmt % v + ("?" if noisy[i] else ""), (i, top), textcoords="offset points",
                    xytext=(0, 3), ha="center", fontsize=8, color="#c33" if noisy[i] else "black")
    ax.set_ylim(0, max(tops) * 1.15)


def _fidelity_panel(ax, names: list[str], vals: list[float], fmt: str) -> None:
    """Top-1 or cosine as points on an axis zoomed to them (bars from a cut axis would make one
    image in 360 look like a collapse), never past 1, each value written beside its point."""
    ax.plot(names, vals, "o-", color="#3a7", ms=6)
    ax.plot(names[:1], vals[:1], "o", color="#777", ms=6)
    lo, hi = min(vals), max(vals)
    pad = max(hi - lo, 2e-3) * 0.5
    bottom, top = max(0.0, lo - pad), min(1.0, hi + pad)  # a fraction never reads past 1
    top = max(top, hi)
    ax.set_ylim(bottom, top + (top - bottom) * 0.02)
    for i, v in enumerate(vals):  # labels below points at the top of the axis, else above
        below = v > top - (top - bottom) * 0.15
        ax.annotate(fmt % v, (i, v), textcoords="offset points", xytext=(5, -12 if below else 5),
                    ha="left", fontsize=8)
    ax.grid(axis="y", color="#eee")
    ax.margins(x=0.15)


def _plot_title(rep: dict) -> str:
    """What was asked and what came of it: a parameter target and the sparsity achieved, or a
    FLOP / latency target and the ratio measured (and whether a latency target was missed)."""
    run_id, obj = rep["run_id"], rep.get("objective") or {}
    if obj.get("asked_ratio") is not None:
        what = "FLOPs" if obj["objective"] == "flops" else "latency"
        verdict = "" if "missed" not in obj else (" MISSED" if obj["missed"] else " (met)")
        return (f"{run_id}: {obj['flag']} {obj['asked_ratio']:g}, {what} ratio measured "
                f"{obj['measured_ratio']:.3f}{verdict}")
    if "target" in rep and "achieved_sparsity" in rep:
        return f"{run_id}: target {rep['target']:.4f}, achieved {rep['achieved_sparsity']:.4f}"
    return run_id


def write_report(rep: dict, reports_dir: Path, final_dir: Path | None = None) -> tuple[Path, Path]:
    """Write report-<run_id>.json/.md/.png of a single run (its stages) or of several targets
    (its trade-off points); refuses to overwrite an existing report. `final_dir`: where the
    files will be once moved (the CLI writes into a staging folder), as the report names its
    plot."""
    run_id = rep["run_id"]
    reports_dir = Path(reports_dir)
    json_path = reports_dir / f"report-{run_id}.json"
    md_path = reports_dir / f"report-{run_id}.md"
    for p in (json_path, md_path):
        if p.exists():
            raise FileExistsError(f"{p} already exists; choose another --run-id")
    png = reports_dir / f"report-{run_id}.png"
    rep["artifacts"]["plot"] = str(Path(final_dir or reports_dir) / png.name)  # before the
    # Markdown is rendered: it embeds the plot and lists it
    if "stages" in rep:
        dist = rep.get("distillation") or {}
        obj = rep.get("objective") or {}
        plot(rep["stages"], png, dist.get("losses"), _plot_title(rep), dist.get("kept_step"),
             obj.get("asked_ratio") if obj.get("objective") == "latency" else None, rep.get("plan"))
        text = markdown(rep)
    else:
        tradeoff_plot(rep["points"], png, rep.get("budget"), rep.get("chosen"),
                      rep["baseline"].get("top1"), f"{run_id}: {len(rep['points'])} targets")
        text = tradeoff_markdown(rep)
    atomic_write_json(json_path, rep)
    atomic_write_text(md_path, text)
    return json_path, md_path


def stage_dicts(stages: list[StageMetrics]) -> list[dict]:
    return [asdict(s) for s in stages]


def _generic_markdown(rep: dict) -> str:
    """Markdown of any report dict: scalars as a list, each nested dict as its own section."""
    lines = [f"# vit-2ssp report `{rep['run_id']}`", ""]
    lines += [f"- {k}: {v}" for k, v in rep.items() if not isinstance(v, dict) and k != "run_id"]
    for k, v in rep.items():
        if isinstance(v, dict):
            lines += ["", f"## {k}", ""] + [f"- {kk}: {json.dumps(vv, default=str)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def save_report(report, reports_dir: str | Path = "experiments/vit_pruning/reports",
                run_id: str | None = None) -> tuple[Path, Path]:
    """The seed's consolidated report: write ``report-<run_id>.json`` and ``.md`` into
    `reports_dir`, atomically, never over an existing report.

    Args:
        report: the CLI's report dict (rendered with its stage table and plot), or any dict a
            notebook builds, or an object with ``to_dict()`` (a PruneResult or PruningPlan).
        run_id: the report's name (default: the report's own ``run_id``, else the UTC time).
    Returns:
        (json path, markdown path).
    """
    import datetime as _dt
    rep = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    rep["run_id"] = run_id or rep.get("run_id") or \
        _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    reports_dir = Path(reports_dir)
    if {"stages", "plan", "artifacts", "model"} <= set(rep):
        return write_report(rep, reports_dir)
    json_path = reports_dir / f"report-{rep['run_id']}.json"
    md_path = reports_dir / f"report-{rep['run_id']}.md"
    for p in (json_path, md_path):
        if p.exists():
            raise FileExistsError(f"{p} already exists; choose another run_id")
    atomic_write_json(json_path, rep)
    atomic_write_text(md_path, _generic_markdown(rep))
    return json_path, md_path


def _fidelity(point: dict) -> tuple[str, float | None]:
    """The measure a point is judged by: top-1 where there is one, else cosine, else KL."""
    for key in ("top1", "cosine", "kl"):
        if point.get(key) is not None:
            return key, point[key]
    return "none", None


def _replanned(p: dict) -> str:
    """For a latency point planned again after its first plan was timed: how (else "")."""
    attempts = p.get("attempts") or []
    chosen = next((a for a in attempts if a.get("chosen")), None)
    if len(attempts) < 2 or chosen is None or chosen is attempts[0]:
        return ""
    return (f"first plan measured {attempts[0]['measured_ratio']:.3f}, planned again at "
            f"{chosen['planned_ratio']:.3f}, ")


def point_line(p: dict) -> str:
    """One trade-off point as a line of the console summary."""
    name, value = _fidelity(p)
    fid = "" if value is None else f", {name} {value:.4g}" + (
        f" (drop {p['top1_drop_pp']:.2f} pp)" if name == "top1" and p.get("top1_drop_pp") is not None else "")
    iqr = p["latency_ratio_iqr"]
    noisy = NOISY if p.get("latency_noisy") else ""
    verdict = "" if "missed" not in p else ("MISSED, " if p["missed"] else "met, ")
    head = (f"target {p['target']:g}: " if p.get("asked_ratio") is None else
            f"{p['objective']} ratio {p['asked_ratio']:g} ({verdict}{_replanned(p)}predicted "
            f"{p['predicted_ratio']:.4f}): ")
    return (head + f"achieved {p['achieved_sparsity']:.4f}, params "
            f"{p['params']:,}, FLOPs {p['flops_ratio']:.3f}x, latency ratio {p['latency_ratio']:.3f}"
            f"{noisy} [{iqr[0]:.3f}, {iqr[1]:.3f}]{fid}")


def tradeoff_markdown(rep: dict) -> str:
    """A sweep or a budget search as Markdown: one row per target."""
    b = rep.get("budget")
    lines = [f"# vit-2ssp trade-off `{rep['run_id']}`", "",
             f"- model: `{rep['model']['id']}` ({rep['model']['class']}, {rep['model']['num_blocks']} "
             f"blocks, hidden {rep['model']['hidden_size']}, MLP {rep['model']['intermediate_size']})",
             f"- baseline: {rep['baseline']['params']:,} parameters, "
             f"{rep['baseline']['flops'] / 1e9:.4f} GFLOPs"
             + ("" if rep["baseline"]["top1"] is None else f", top-1 {rep['baseline']['top1']:.4f}")]
    if b:
        lines.append(f"- budget: {b['flag']} {b['value']:g}; chosen target: "
                     f"**{rep['chosen'] if rep['chosen'] is not None else 'none (even the smallest breaks it)'}**; "
                     f"the next target above it broke it: {rep.get('first_rejected')} (bisection "
                     f"on a grid of {rep['config']['target_resolution']:g}, {len(rep['trials'])} "
                     f"prunings; it assumes fidelity falls as the target grows)")
    lines += [f"- accuracy: {rep['accuracy_note']}",
              "- shared work (once for every target): " + ", ".join(
                  f"{k} {v:.1f} s" for k, v in rep["shared_work_s"].items()), "",
              "## Points", "",
              "| target | achieved | params | FLOPs ratio | latency ratio [quartiles] | top-1 | drop (pp) "
              "| KL | cosine | depth units removed | MLP widths (heads where removed) |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]

    def num(v, fmt):
        return "" if v is None else format(v, fmt)
    for p in rep["points"]:
        mark = " **(chosen)**" if rep.get("chosen") == p["target"] else ""
        if p.get("asked_ratio") is not None:  # a FLOP or latency target: the ratio asked
            mark += f" ({p['objective']} {p['asked_ratio']:g}, {_replanned(p)}predicted {p['predicted_ratio']:.3f})"
        lines.append(
            f"| {p['target']:g}{mark} | {p['achieved_sparsity']:.4f} | {p['params']:,} | "
            f"{num(p['flops_ratio'], '.3f')} | {p['latency_ratio']:.3f}"
            f"{NOISY if p.get('latency_noisy') else ''} [{p['latency_ratio_iqr'][0]:.3f}, "
            f"{p['latency_ratio_iqr'][1]:.3f}] | {num(p['top1'], '.4f')} | {num(p['top1_drop_pp'], '.2f')} | "
            f"{num(p['kl'], '.3g')} | {num(p['cosine'], '.4f')} | "
            f"{p.get('depth_unit', '')} {p.get('depth_removed', '')} | {p.get('kept_widths', '')}"
            + (f"; heads {p['kept_heads']}" if any(p.get("heads_removed") or ()) else "") + " |")
    ls = rep["latency_setup"]
    lines += ["", f"Latency: every target timed back to back with the baseline in {rounds_text(ls)}, "
                  f"batch {ls['batch_size']}, {ls['dtype']}, {ls['threads']} "
                  f"threads, device {ls['device']}; the ratio is the median over rounds of "
                  f"t(target) / t(baseline)."]
    lines += [f"- **warning**: {w}" for w in ls.get("warnings", [])]
    if rep.get("trials"):
        lines += ["", "## Budget search", ""] + [
            f"- target {t['target']:g}: {'kept the budget' if t['accepted'] else 'broke the budget'}"
            + (f" ({', '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in t['measures'].items())})"
               if t["measures"] else "") for t in rep["trials"]]
    lines += ["", "## Artifacts", ""]
    for k, v in rep["artifacts"].items():
        if isinstance(v, dict):  # per target: a folder, or an ONNX export's record
            lines += [f"- {k}:"] + [f"  - {kk}: {onnx_line(vv) if isinstance(vv, dict) else vv}"
                                    for kk, vv in v.items()]
        else:
            lines.append(f"- {k}: {v if v else 'not written'}")
    if rep["artifacts"].get("plot"):
        lines += ["", f"![trade-off]({Path(rep['artifacts']['plot']).name})"]
    lines += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in rep["versions"].items()), ""]
    return "\n".join(lines)


def onnx_line(record: dict) -> str:
    """An ONNX export's record (:func:`vit_pruning.export.export_onnx`) in one line."""
    return (f"{record['path']} (onnxruntime {record.get('onnxruntime')}, opset "
            f"{record.get('opset')}: max |difference| to torch "
            f"{record.get('max_abs_diff', float('nan')):.2e} at batch {record.get('check_batch')})")


def tradeoff_plot(points: list[dict], path: Path, budget: dict | None = None,
                  chosen: float | None = None, baseline_top1: float | None = None,
                  title: str | None = None) -> Path:
    """The trade-off plot (:func:`tradeoff_figure`) written as PNG, atomically."""
    fig, bottom = tradeoff_figure(points, budget, chosen, baseline_top1)
    return _save_figure(fig, path, title, bottom)


def tradeoff_figure(points: list[dict], budget: dict | None = None, chosen: float | None = None,
                    baseline_top1: float | None = None):
    """(figure, the share of its height its legend takes at the bottom). Fidelity against latency ratio (with its quartiles) and against parameters kept, one
    point per target (labelled; a latency ratio the timing does not trust drawn hollow and
    marked "?"), the budget as a line, the chosen target marked.
    One row per measure: the budget's, or top-1 (or cosine) and, where there is one, the KL on
    its own log axis. Lines join the points in the order of the axis they are drawn on."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("top1", "cosine", "kl") if points and all(p.get(k) is not None for p in points)]
    if budget is not None:
        keys = [{"top1_drop_pp": "top1", "kl": "kl", "cosine": "cosine"}[budget["measure"]]]
    elif "kl" in keys and len(keys) > 1:
        keys = [keys[0], "kl"]
    keys = keys or ["params_ratio"]
    fig, axes = plt.subplots(len(keys), 2, figsize=(11, 3.6 * len(keys)), squeeze=False)
    for row, key in enumerate(keys):
        for ax, xkey, xlabel in ((axes[row][0], "latency_ratio", "latency ratio to the unpruned model"),
                                 (axes[row][1], "params_ratio", "parameters kept (ratio)")):
            _tradeoff_panel(ax, points, key, xkey, chosen)
            if budget is not None:
                line = budget["value"]
                if budget["measure"] == "top1_drop_pp":
                    line = (baseline_top1 or 0) - budget["value"] / 100
                ax.axhline(line, color="#c33", ls="--", lw=1,
                           label=f"budget {budget['flag']} {budget['value']:g}")
            ax.set_xlabel(xlabel)
    handles, labels = axes[0][0].get_legend_handles_labels()
    bottom = 0.0
    if handles:  # below the panels, where it hides no point
        fig.legend(handles, labels, loc="lower center", ncol=len(handles), fontsize=8,
                   frameon=False)
        bottom = 0.1 / len(keys)
    return fig, bottom


TRADEOFF_LABELS = {"top1": "top-1", "cosine": "cosine to the unpruned model",
                   "kl": "KL to the unpruned model", "params_ratio": "parameters kept (ratio)"}


def _tradeoff_panel(ax, points: list[dict], key: str, xkey: str, chosen: float | None) -> None:
    """One measure against one axis: the points joined in x order, each labelled with its
    target (labels alternate above and below so neighbours do not overprint)."""
    order = sorted(points, key=lambda p: p[xkey])
    xs, ys = [p[xkey] for p in order], [p[key] for p in order]
    ax.plot(xs, ys, "-", color="#3a7", lw=1)
    for i, (p, x, y) in enumerate(zip(order, xs, ys)):
        noisy = xkey == "latency_ratio" and p.get("latency_noisy")
        ax.plot([x], [y], "o", ms=5, color="#3a7", mfc="white" if noisy else "#3a7")
        if xkey == "latency_ratio":
            ax.plot(p["latency_ratio_iqr"], [y, y], color="#3a7", lw=1, alpha=0.5)
        ax.annotate(f"{p['target']:g}" + ("?" if noisy else ""), (x, y), textcoords="offset points",
                    xytext=(4, 5 if i % 2 == 0 else -11), fontsize=7,
                    color="#c33" if noisy else "black")
        if chosen is not None and p["target"] == chosen:
            ax.plot([x], [y], "*", color="#c33", ms=14, label=f"chosen: {chosen:g}")
    if key == "kl":
        ax.set_yscale("log")
    ax.set_ylabel(TRADEOFF_LABELS[key])
    ax.margins(x=0.08, y=0.12)
