"""Save pruned tiny ViTs under one transformers major and reload them under the other (CI):
remote-code models (attention removed, per-block widths; attention heads removed) through
vit_pruning and through
``from_pretrained(..., trust_remote_code=True)``, and a plain model (one aligned width) through
plain ``AutoModelForImageClassification.from_pretrained``.

    python scripts/cross_layout_check.py save DIR    # writes DIR/{remote,plain} and expected logits
    python scripts/cross_layout_check.py load DIR    # reloads each way, compares logits (< 1e-5)
"""
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

from vit_pruning import PruneConfig, load_pruned_model, prune_2ssp
from vit_pruning.persistence import save_pruned_model

CASES = {  # folder -> (config, expected format)
    "remote": (PruneConfig(unit="attention", min_remaining=8, allocation="global", align=1), "remote-code"),
    "plain": (PruneConfig(unit="block", min_remaining=8, align=4, width_policy="uniform", split=1,
                          heads="off"), "plain"),
    "heads": (PruneConfig(unit="block", min_remaining=8, align=1, split=1, heads=1), "remote-code"),
}


def main(mode: str, folder: Path) -> None:
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for name, (cfg, fmt) in CASES.items():
        if mode == "save":
            torch.manual_seed(0)
            vit = ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=64, image_size=16, patch_size=4, num_labels=5)
            model = ViTForImageClassification(vit).eval()
            prune_2ssp(model, 0.4, [x], cfg)
            assert save_pruned_model(model, folder / name).format == fmt
            with torch.no_grad():
                torch.save(model(pixel_values=x).logits, folder / f"{name}.pt")
            continue
        expected = torch.load(folder / f"{name}.pt")
        loaders = [lambda: load_pruned_model(folder / name),
                   lambda: AutoModelForImageClassification.from_pretrained(
                       folder / name, trust_remote_code=fmt == "remote-code")]
        for load in loaders:
            with torch.no_grad():
                diff = (load().eval()(pixel_values=x).logits - expected).abs().max()
            assert diff < 1e-5, (name, diff)
    print(f"{mode} ok with transformers {transformers.__version__}")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
