"""Fidelity at equal latency: the structures a latency target and a parameter target choose from.

The embedded digits ViT (its 64 calibration images; KL of the test-split logits to the unpruned
model), at one batch size and one latency ratio R. The latency model is measured once; the
latency target is pruned as the CLI plans it, then once per depth count the planner finds
feasible for it (`split=<count>`, block and attention units); parameter targets 0.4 to 0.7 are
pruned as the CLI does. Every model and the baseline are then
timed back to back, interleaved (median ratio over rounds, quartiles).

Columns: the depth units removed and the kept MLP widths; the latency model's predicted ratio
and the measured one; the held-out calibration distance of that depth count (what the split
search ranks counts by: the latency run's own trial for its counts, the parameter run's for its
chosen count); the test KL (what the speed table judges fidelity by). Both objectives choose
among the same kind of structure (a depth count, then the widths that meet the target), so at
equal latency they differ only where the split search's calibration distances rank two counts
the other way from the test KL, or where the widths that meet a latency ratio differ from the
ones that meet the matching parameter count.
"""
from __future__ import annotations

import copy
import logging

import torch

from vit_pruning import PruneConfig, count_total_params
from vit_pruning.measure import collect_outputs, interleaved_latency, kl_divergence
from vit_pruning.objective import measure_latency_model
from vit_pruning.pipeline import Pruner, default_min_remaining, model_shape
from vit_pruning.tradeoff import LATENCY_TOLERANCE as TOLERANCE

from .common import digits_tensors, embedded_model, md_table
from .speed_target import _structure

log = logging.getLogger(__name__)

PARAM_TARGETS = (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)


def run(batch: int = 8, ratio: float = 0.7, repeats: int = 10, smoke: bool = False) -> dict:
    d = digits_tensors()
    base = embedded_model().eval()
    calib, x_test = list(torch.split(d.x_train[:64], 32)), d.x_test
    ref = collect_outputs(base, [x_test])
    shape = model_shape(base)
    widths, params0 = shape.widths, count_total_params(base)
    mr = default_min_remaining(shape)[0]
    lat = measure_latency_model(base, batch_size=batch, align=int(PruneConfig().resolved(shape).align),
                                min_remaining=mr, **({"repeats": 5} if smoke else {}))

    def predicted(res) -> float:
        w = [a - r for a, r in zip(widths, res.neurons_removed)]
        return lat.predict(w, res.plan.removed_blocks, res.plan.removed_attention) / lat.model_s

    target = round(1 - ratio, 12)
    rows, models = [], {}

    def add(label, objective, asked, model, res, distance, chosen_here):
        models[label] = model
        rows.append({"label": label, "objective": objective, "asked": asked,
                     "structure": _structure(res, widths),
                     "params": count_total_params(model) / params0,
                     "predicted": predicted(res), "distance": distance, "chosen": chosen_here,
                     "kl": kl_divergence(collect_outputs(model, [x_test]), ref)})

    units = ("block",) if smoke else ("block", "attention")
    for unit in units:
        pruner = Pruner(base, calib, PruneConfig(min_remaining=mr, objective="latency",
                                                 latency_model=lat, unit=unit))
        try:  # the unit's own search: its trials' distances, per depth count; with the
            # default unit it is what the CLI plans
            _, searched = pruner.prune(target, copy.deepcopy(base))
        except ValueError as exc:
            log.info("latency %s: %s", unit, exc)
            continue
        # trial keys: the depth count, or "<blocks>+<sublayers> attention" for mixed units
        trials = {int(k.split("+")[0]): v for k, v in searched.search.items()}
        for count in sorted(trials) or [len(searched.depth_order)]:
            forced = Pruner(base, calib, PruneConfig(min_remaining=mr, objective="latency",
                                                     latency_model=lat, unit=unit, split=count))
            model, res = forced.prune(target, copy.deepcopy(base))
            is_chosen = unit == PruneConfig().unit and count == len(searched.depth_order)
            add(f"latency {unit} {count}", "latency", ratio, model, res, trials.get(count),
                is_chosen)
    param = Pruner(base, calib, PruneConfig(min_remaining=mr))
    for t in (PARAM_TARGETS[2:4] if smoke else PARAM_TARGETS):
        model, res = param.prune(t, copy.deepcopy(base))
        add(f"params {t}", "params", t, model, res, res.search.get(str(len(res.depth_order))), False)
    timing = interleaved_latency({"base": base, **models}, batch, repeats, warmup=2)
    for r in rows:
        r["measured"] = timing.ratio[r["label"]]
        r["iqr"] = (timing.ratio_q1[r["label"]], timing.ratio_q3[r["label"]])
    log.info("latency_choice rows: %s", rows)
    return {"batch": batch, "ratio": ratio, "repeats": repeats, "rows": rows}


def table(res: dict) -> str:
    rows = [[r["objective"], f"{r['asked']:g}", r["structure"], f"{r['params']:.3f}", f"{r['predicted']:.3f}",
             f"{r['measured']:.3f} [{r['iqr'][0]:.3f}, {r['iqr'][1]:.3f}]",
             "" if r["distance"] is None else f"{r['distance']:.3g}", f"{r['kl']:.3g}",
             "**chosen**" if r["chosen"] else ""] for r in res["rows"]]
    out = [f"Embedded digits ViT, batch {res['batch']}, latency ratio R = {res['ratio']:g}, "
           f"{res['repeats']} rounds:", "",
           md_table(["objective", "asked", "depth units removed, kept MLP widths", "param ratio",
                     "predicted latency ratio", "measured latency ratio [quartiles]",
                     "held-out calibration distance", "test KL", "the latency target's choice"],
                    rows), ""]
    out.append(summary(res))
    return "\n".join(out)


def _g(value: float | None) -> str:
    return "none (a single candidate: no trial)" if value is None else f"{value:.3g}"


def summary(res: dict) -> str:
    """One measured sentence: where the latency target's choice stands among its own candidates
    and against the parameter targets timed within its quartiles (at least 0.02 either side)."""
    lat = [r for r in res["rows"] if r["objective"] == "latency"]
    chosen = next((r for r in lat if r["chosen"]), None)
    if chosen is None:
        return "The latency target's choice was not among the forced counts (see the log)."
    best = min(lat, key=lambda r: r["kl"])
    lo, hi = chosen["iqr"]
    near = [r for r in res["rows"] if r["objective"] == "params"
            and min(lo, chosen["measured"] - 0.02) <= r["measured"] <= max(hi, chosen["measured"] + 0.02)]
    parts = [f"The split search chose {chosen['label']} (held-out distance "
             f"{_g(chosen['distance'])}, test KL {chosen['kl']:.3g})"]
    if best is not chosen:
        parts.append(f"; by test KL the best of its candidates is {best['label']} ({best['kl']:.3g}, "
                     f"held-out distance {_g(best['distance'])}): the calibration distance ranks "
                     f"them the other way")
    else:
        parts.append("; it is also the best of its candidates by test KL")
    if near:
        p = min(near, key=lambda r: r["kl"])
        parts.append(f". Parameter targets timed within its quartiles (or 0.02): best {p['label']} at "
                     f"{p['measured']:.3f} (test KL {p['kl']:.3g}, {p['structure']})")
        if p["kl"] < chosen["kl"] and p["predicted"] > res["ratio"] + TOLERANCE:
            parts.append(f", which the latency model predicted at {p['predicted']:.3f} (measured "
                         f"{p['measured']:.3f}): off by {p['predicted'] - p['measured']:+.3f}, it "
                         f"could not be among the latency target's candidates, which must meet "
                         f"{res['ratio']:g} as predicted")
        elif p["kl"] < chosen["kl"] and p["params"] > chosen["params"]:
            parts.append(f", which keeps more parameters ({p['params']:.3f} against "
                         f"{chosen['params']:.3f}) in the same measured time: the latency model "
                         f"predicts it {p['predicted'] - chosen['predicted']:+.3f} slower, a "
                         f"difference the timing does not show, so the latency target pays "
                         f"fidelity for predicted time it does not get")
    return "".join(parts) + "."
