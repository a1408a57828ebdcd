"""Save a pruned tiny ViT under one transformers major and reload it under the other (CI).

    python scripts/cross_layout_check.py save DIR    # writes DIR/model and DIR/expected.pt
    python scripts/cross_layout_check.py load DIR    # reloads, compares logits (< 1e-5)
"""
import sys
from pathlib import Path

import torch
import transformers
from transformers import ViTConfig, ViTForImageClassification

from vit_pruning import PruneConfig, load_pruned_model, prune_2ssp
from vit_pruning.persistence import save_pruned_model


def main(mode: str, folder: Path) -> None:
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    if mode == "save":
        torch.manual_seed(0)
        cfg = ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, image_size=16, patch_size=4, num_labels=5)
        model = ViTForImageClassification(cfg).eval()
        prune_2ssp(model, 0.4, [x], PruneConfig(unit="attention", min_remaining=8, allocation="global"))
        save_pruned_model(model, folder / "model")
        with torch.no_grad():
            torch.save(model(pixel_values=x).logits, folder / "expected.pt")
    else:
        model = load_pruned_model(folder / "model")
        with torch.no_grad():
            diff = (model(pixel_values=x).logits - torch.load(folder / "expected.pt")).abs().max()
        assert diff < 1e-5, diff
    print(f"{mode} ok with transformers {transformers.__version__}")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
