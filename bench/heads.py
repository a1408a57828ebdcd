"""Attention heads as a unit: the tool's default (`ours`, `--heads auto`: the split search also
tries removing the cheapest heads, refit like the MLP, and keeps them where held-out calibration
data says they help) against the same tool with today's units before heads (`ours (heads off)`:
MLP neurons and depth units only; both with the default refit prior, `--refit-prior auto`), in
one run, on the same calibration data:

- the embedded digits ViT at targets 0.1 to 0.7: KL(pruned || unpruned) of the logits and
  top-1 on the 360 held-out images, no fine-tuning, mean over calibration seeds;
- all-MiniLM-L6-v2 at 0.1 to 0.4 on the default text: embedding cosine, neighbour agreement,
  parameter, FLOP and CPU latency ratios (batch 8, 32 tokens) (see the text section);
- the pruning cost of one target (0.25) on the ViT-B/16 shape with 64 calibration images, with
  and without heads, each run twice alternately and the fastest kept (see the cost section).

The peers, at the same parameter count (their plans keep up to 0.05% more parameters than
ours): Torch-Pruning's own head pruning (`tp-heads`: its Hugging Face ViT recipe, group
magnitude, a quarter of every block's heads and MLP channels for the rest, no depth stage, no
refit) and, on MiniLM, TextPruner (`textpruner`: the same shape, its iterative gradient x weight
importance on an unsupervised loss, no refit) and Intel Neural Compressor's retrain-free pruner
(`inc-retrain-free`: Kwon et al.'s mask search and rearrangement, FFN neurons only, no mask
tuning); those two need older stacks and run in child processes (bench/peers.py; the notes
below the MiniLM table say how each ran). Equal measured latency is its own part
(`python -m bench --only heads_latency`, below: :func:`equal_latency`)."""
from __future__ import annotations

import logging
from dataclasses import replace

from vit_pruning import PruneConfig
from vit_pruning.config import LATENCY_TOLERANCE
from vit_pruning.measure import interleaved_latency
from vit_pruning.objective import measure_latency_model
from vit_pruning.pipeline import Pruner, default_min_remaining, model_shape
from vit_pruning.sweep import prune_to_measured

from . import cost, fidelity, peers, text
from .common import md_table, mean_spread
from .latency_choice import Subject
from .speed_target import _structure

log = logging.getLogger(__name__)

METHODS = ("ours (heads off)", "ours", "tp-heads")


def run(smoke: bool = False) -> dict:
    vit_targets = (0.3, 0.6) if smoke else (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    seeds = (0,) if smoke else (0, 1, 2)
    vit = fidelity.run(vit_targets, seeds, list(METHODS), retune=False)
    text_targets = (0.3,) if smoke else (0.1, 0.2, 0.3, 0.4)
    txt = text.run(targets=text_targets, methods=METHODS, ideas={}, smoke=smoke,
                   repeats=2 if smoke else 10)
    txt["peers"] = {}
    for name in peers.PEERS:  # the text-only peers, each where it runs (bench.peers)
        peer_rows, txt["peers"][name] = peers.rows(name, text_targets, txt["n_calib"],
                                                   txt["n_eval"], smoke)
        txt["rows"] += peer_rows
    costs = cost.run("tiny" if smoke else "vit-b16", 16 if smoke else cost.CALIB,
                     methods=COST_METHODS * (1 if smoke else COST_RUNS))
    return {"vit": vit, "text": txt, "cost": costs}


def vit_table(vit: dict) -> str:
    rows = []
    for t, row in vit["targets"].items():
        off, on, tp = (row.get(m) for m in METHODS)
        if off is None or on is None:
            rows.append([f"{t:g}", "out of reach"] + [""] * 7)
            continue
        kl_off, kl_on = mean_spread(off["kl"])[0], mean_spread(on["kl"])[0]
        kl_tp = mean_spread(tp["kl"])[0] if tp else None
        rows.append([f"{t:g}", f"{kl_off:.3g}", f"{kl_on:.3g}", f"{kl_on / kl_off:.2f}",
                     f"{kl_tp:.3g}" if tp else "out of reach",
                     f"{mean_spread(off['top1'])[0]:.4f}", f"{mean_spread(on['top1'])[0]:.4f}",
                     "met" if kl_on <= 1.05 * kl_off else "MISSED",
                     "" if tp is None else ("yes" if kl_on < kl_tp else "NO")])
    return md_table(["target", "KL heads off", "KL default (heads auto)", "KL ratio",
                     "KL tp-heads", "top-1 heads off", "top-1 default",
                     "never worse (KL within 5%)", "ahead of tp-heads"], rows)


def text_table(txt: dict) -> str:
    by = {(r["target"], r["method"]): r for r in txt["rows"] if "reach" not in r}
    rows = []
    for t in sorted({r["target"] for r in txt["rows"]}):
        off, on, tp = (by.get((t, m)) for m in METHODS)
        if off is None or on is None:
            rows.append([f"{t:g}", "out of reach"] + [""] * (10 + len(peers.PEERS)))
            continue
        others = {name: by.get((t, name)) for name in peers.PEERS}
        cosines = [p["cosine"] for p in (tp, *others.values()) if p]
        rows.append([f"{t:g}", f"{off['cosine']:.4f}", f"{on['cosine']:.4f}",
                     f"{tp['cosine']:.4f}" if tp else "out of reach",
                     *(f"{p['cosine']:.4f}" if p else
                       ("not run" if txt.get("peers", {}).get(name) else "out of reach")
                       for name, p in others.items()),
                     "" if not cosines else ("yes" if on["cosine"] > max(cosines) else "NO"),
                     f"{100 * off['agreement']:.1f}", f"{100 * on['agreement']:.1f}",
                     f"{on['params']:.3f}", f"{off['flops']:.3f} / {on['flops']:.3f}",
                     f"{off['latency']:.3f} / {on['latency']:.3f}",
                     f"{off['seconds']:.0f} / {on['seconds']:.0f}",
                     "met" if on["cosine"] >= off["cosine"] - 0.002 else "MISSED"])
    return md_table(["target", "cosine heads off", "cosine default", "cosine tp-heads",
                     *(f"cosine {p.label}" for p in peers.PEERS.values()),
                     "ahead of every peer", "agreement % off", "agreement % default", "param ratio",
                     "FLOP ratio off / default", "latency ratio b8 off / default",
                     "prune s off / default", "never worse (cosine within 0.002)"], rows)


COST_METHODS = ("ours-heads-off", "ours")
COST_RUNS = 2  # each method's pruning is timed this often, alternating; the fastest run is its
# cost (the others were slowed by the host: one run of each differed by 10% between sessions)


def cost_table(costs: list[dict]) -> str:
    best = {m: min((r for r in costs if r["method"] == m), key=lambda r: r["wall_s"])
            for m in COST_METHODS}
    rows = [[m.replace("ours-heads-off", "ours (heads off)"),
             " / ".join(f"{r['wall_s']:.1f}" for r in costs if r["method"] == m),
             f"{best[m]['wall_s']:.1f}",
             "; ".join(f"{k} {v:.1f}s" for k, v in best[m]["timings"].items())]
            for m in COST_METHODS]
    off, on = (best[m]["wall_s"] for m in COST_METHODS)
    search = [best[m]["timings"].get("split search") for m in COST_METHODS]
    trials = "" if None in search else (
        f" The split search alone takes {search[1] - search[0]:.1f} s more with heads "
        f"({100 * (search[1] - search[0]) / off:.0f}% of the heads-off run): its head trials, each "
        f"a whole stage-1 pass over the fitted and held-out calibration images, as every split "
        f"trial is.")
    return md_table(["method", "wall time of each run (s)", "fastest (s)", "phases (fastest run)"],
                    rows) + (f"\n\nHeads add {100 * (on / off - 1):+.0f}% to the pruning time of "
                             f"this target, fastest run against fastest run (goal: at most "
                             f"+25%).{trials}")


def peer_notes(txt: dict) -> str:
    """The notes below the MiniLM table: where each child-process peer ran, or why not."""
    lines = []
    for name, peer in peers.PEERS.items():
        ran = [r for r in txt["rows"] if r["method"] == name and "reach" not in r]
        if ran:
            lines.append(f"- `{name}` ({peer.label}) ran on transformers "
                         f"{ran[0]['transformers']} ({peer.env}; bench/peers.py): "
                         f"{peers.ROUNDS} rounds, the same calibration and evaluation sentences "
                         f"as ours; targets it cannot reach say so.")
        else:
            why = txt.get("peers", {}).get(name) or "out of reach at every target"
            lines.append(f"- `{name}` ({peer.label}) is not in the table: {why}.")
    return "\n".join(lines)


def tables(res: dict) -> str:
    return "\n".join(["### Embedded digits ViT", "", vit_table(res["vit"]), "",
                      f"### {res['text']['model']}", "", text_table(res["text"]), "",
                      peer_notes(res["text"]), "",
                      "### Pruning cost, target 0.25, ViT-B/16 shape, 64 calibration images", "",
                      cost_table(res["cost"]), ""])


LATENCY_DOC = """Equal measured latency: `--target-latency R` with today's units (`--heads off`) and
with the default (`--heads auto`), all-MiniLM-L6-v2 (128 calibration sentences, cosine of the
mean-pooled embeddings of 512 evaluation sentences, batch 8 x 32 tokens) and the embedded
digits ViT (its 64 calibration images, KL on the test split, batch 8). Per model one latency
model (measured once, with its head-count timings) serves both; each is pruned as the command
line prunes a latency target (`prune_to_measured`: planned, timed against the baseline, planned
again while it misses R by more than 0.01, the closest attempt kept), then each pruned model is
timed against the baseline alone over 100 interleaved rounds (median of per-round ratios,
quartiles)."""


def equal_latency(smoke: bool = False, ratios=(0.5,)) -> list[dict]:
    """Rows of the equal-latency table (see LATENCY_DOC)."""
    subjects = [("minilm", 8), ("embedded", 8)] if not smoke else [("text", 8)]
    rows = []
    for name, batch in subjects:
        s = Subject(name, smoke)
        shape = model_shape(s.base)
        mr = 64 if smoke and s.text else default_min_remaining(shape)[0]
        cfg = PruneConfig(min_remaining=mr, objective="latency", **s.size())
        lat = measure_latency_model(s.base, batch_size=batch, align=int(cfg.resolved(shape).align),
                                    min_remaining=mr, **s.size(), **({"repeats": 5} if smoke else {}))

        def measure(model):
            return interleaved_latency({"base": s.base, "pruned": model}, batch, 3 if smoke else 10,
                                       warmup=2, **s.size()).ratio["pruned"]

        for r in ratios:
            for heads in ("off", "auto"):
                pruner = Pruner(s.base, s.calib, replace(cfg, latency_model=lat, heads=heads))
                try:
                    model, res, _ = prune_to_measured(pruner, r, measure, LATENCY_TOLERANCE)
                except ValueError as exc:
                    log.info("%s b%d latency %g heads %s: %s", name, batch, r, heads, exc)
                    continue
                timing = interleaved_latency({"base": s.base, "pruned": model}, batch,
                                             3 if smoke else 100, warmup=2, **s.size())
                rows.append({"model": "all-MiniLM-L6-v2" if name == "minilm" else (
                    "tiny random BERT (smoke)" if s.text else "embedded digits ViT"),
                    "batch": batch, "asked": r, "heads": heads, "measure": s.measure_name,
                    "fidelity": s.fidelity(model), "structure": _structure(res, shape.widths),
                    "kept_heads": sum(len(k) for k in res.kept_heads) if res.kept_heads else None,
                    "measured": timing.ratio["pruned"],
                    "iqr": (timing.ratio_q1["pruned"], timing.ratio_q3["pruned"]),
                    "search": dict(res.search)})
                log.info("heads_latency %s", rows[-1])
                del model
    return rows


def latency_table(rows: list[dict]) -> str:
    out = [[r["model"], str(r["batch"]), f"{r['asked']:g}", r["heads"], r["structure"],
            "all" if r["kept_heads"] is None else str(r["kept_heads"]),
            f"{r['measured']:.3f} [{r['iqr'][0]:.3f}, {r['iqr'][1]:.3f}]",
            f"{r['fidelity']:.4f}" if r["measure"] == "cosine" else f"{r['fidelity']:.3g}"]
           for r in rows]
    by = {(r["model"], r["asked"], r["heads"]): r for r in rows}
    notes = []
    for (m, a, h), r in by.items():
        off = by.get((m, a, "off"))
        if h == "auto" and off is not None:
            gap = (r["fidelity"] - off["fidelity"]) if r["measure"] == "cosine" else None
            notes.append(f"- {m}, {a:g}: " + (
                f"cosine {gap:+.4f} with heads (goal: +0.02 on MiniLM)" if gap is not None else
                f"KL ratio heads / off {r['fidelity'] / off['fidelity']:.2f}") +
                f"; measured latency {r['measured']:.3f} vs {off['measured']:.3f}")
    return md_table(["model", "batch", "latency target", "--heads", "structure", "heads kept",
                     "measured latency ratio [quartiles]", "cosine / KL"], out) + "\n\n" + "\n".join(notes)
