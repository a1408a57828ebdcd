"""Attention heads as a unit: the tool's default (`ours`, `--heads auto`: the split search also
tries removing the cheapest heads, refit like the MLP, and keeps them where held-out calibration
data says they help) against the same tool with today's units before heads (`ours (heads off)`:
MLP neurons and depth units only), in one run, on the same calibration data:

- the embedded digits ViT at targets 0.1 to 0.7: KL(pruned || unpruned) of the logits and
  top-1 on the 360 held-out images, no fine-tuning, mean over calibration seeds;
- all-MiniLM-L6-v2 at 0.1 to 0.4 on the default text: embedding cosine, neighbour agreement,
  parameter, FLOP and CPU latency ratios (batch 8, 32 tokens) (see the text section);
- the pruning cost of one target (0.25) on the ViT-B/16 shape with 64 calibration images, with
  and without heads (see the cost section).

Peers that prune heads (Torch-Pruning's head pruning, TextPruner, Intel Neural Compressor's
retraining-free pruner) and the equal-latency comparison (`--target-latency`) are not in this
table yet."""
from __future__ import annotations

from . import cost, fidelity, text
from .common import md_table, mean_spread

METHODS = ("ours (heads off)", "ours")


def run(smoke: bool = False) -> dict:
    vit_targets = (0.3, 0.6) if smoke else (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    seeds = (0,) if smoke else (0, 1, 2)
    vit = fidelity.run(vit_targets, seeds, list(METHODS), retune=False)
    txt = text.run(targets=(0.3,) if smoke else (0.1, 0.2, 0.3, 0.4), methods=METHODS, ideas={},
                   smoke=smoke, repeats=2 if smoke else 10)
    costs = cost.run("tiny" if smoke else "vit-b16", 16 if smoke else cost.CALIB,
                     methods=("ours-heads-off", "ours"))
    return {"vit": vit, "text": txt, "cost": costs}


def vit_table(vit: dict) -> str:
    rows = []
    for t, row in vit["targets"].items():
        off, on = row.get(METHODS[0]), row.get(METHODS[1])
        if off is None or on is None:
            rows.append([f"{t:g}", "out of reach", "", "", "", "", ""])
            continue
        kl_off, kl_on = mean_spread(off["kl"])[0], mean_spread(on["kl"])[0]
        rows.append([f"{t:g}", f"{kl_off:.3g}", f"{kl_on:.3g}", f"{kl_on / kl_off:.2f}",
                     f"{mean_spread(off['top1'])[0]:.4f}", f"{mean_spread(on['top1'])[0]:.4f}",
                     "met" if kl_on <= 1.05 * kl_off else "MISSED"])
    return md_table(["target", "KL heads off", "KL default (heads auto)", "KL ratio",
                     "top-1 heads off", "top-1 default", "never worse (KL within 5%)"], rows)


def text_table(txt: dict) -> str:
    by = {(r["target"], r["method"]): r for r in txt["rows"] if "reach" not in r}
    rows = []
    for t in sorted({r["target"] for r in txt["rows"]}):
        off, on = by.get((t, METHODS[0])), by.get((t, METHODS[1]))
        if off is None or on is None:
            rows.append([f"{t:g}", "out of reach"] + [""] * 8)
            continue
        rows.append([f"{t:g}", f"{off['cosine']:.4f}", f"{on['cosine']:.4f}",
                     f"{100 * off['agreement']:.1f}", f"{100 * on['agreement']:.1f}",
                     f"{on['params']:.3f}", f"{off['flops']:.3f} / {on['flops']:.3f}",
                     f"{off['latency']:.3f} / {on['latency']:.3f}",
                     f"{off['seconds']:.0f} / {on['seconds']:.0f}",
                     "met" if on["cosine"] >= off["cosine"] - 0.002 else "MISSED"])
    return md_table(["target", "cosine heads off", "cosine default", "agreement % off",
                     "agreement % default", "param ratio", "FLOP ratio off / default",
                     "latency ratio b8 off / default", "prune s off / default",
                     "never worse (cosine within 0.002)"], rows)


def cost_table(costs: list[dict]) -> str:
    rows = [[r["method"].replace("ours-heads-off", "ours (heads off)"), f"{r['wall_s']:.1f}",
             "; ".join(f"{k} {v:.1f}s" for k, v in r["timings"].items())] for r in costs]
    off, on = costs[0]["wall_s"], costs[1]["wall_s"]
    return md_table(["method", "wall time (s)", "phases"], rows) + (
        f"\n\nHeads add {100 * (on / off - 1):+.0f}% to the pruning time of this target "
        f"(goal: at most +25%).")


def tables(res: dict) -> str:
    return "\n".join(["### Embedded digits ViT", "", vit_table(res["vit"]), "",
                      f"### {res['text']['model']}", "", text_table(res["text"]), "",
                      "### Pruning cost, target 0.25, ViT-B/16 shape, 64 calibration images", "",
                      cost_table(res["cost"]), ""])
