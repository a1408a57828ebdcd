import pytest
import torch
from torch import nn
from transformers import DeiTConfig, DeiTForImageClassification, ViTModel

from src.vit_pruning import _get_encoder, resolve
from conftest import tiny_config


def test_segmented_forward_matches_model(tiny_vit, pixels):
    an = resolve(tiny_vit)
    with torch.no_grad():
        full = tiny_vit(pixel_values=pixels).logits
        seg = an.head(an.run_blocks(an.embed(pixels)))
    torch.testing.assert_close(seg, full, rtol=0, atol=1e-6)
    assert an.has_classifier and an.hidden_size == 32 and an.num_heads == 4
    assert [p.intermediate_size for p in an.parts] == [64] * 4


def test_headless_vit_model(pixels):
    torch.manual_seed(0)
    model = ViTModel(tiny_config(), add_pooling_layer=False).eval()
    an = resolve(model)
    assert not an.has_classifier
    with torch.no_grad():
        torch.testing.assert_close(an.head(an.run_blocks(an.embed(pixels))),
                                   model(pixel_values=pixels).last_hidden_state, rtol=0, atol=1e-6)


def test_deit_is_supported(pixels):
    cfg = DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, image_size=16, patch_size=4, num_labels=3)
    model = DeiTForImageClassification(cfg).eval()
    an = resolve(model)
    assert len(an.parts) == 2
    with torch.no_grad():
        torch.testing.assert_close(an.head(an.run_blocks(an.embed(pixels))),
                                   model(pixel_values=pixels).logits, rtol=0, atol=1e-6)


def test_get_encoder_has_live_layer_list(tiny_vit):
    enc = _get_encoder(tiny_vit)
    assert len(enc.layer) == 4
    assert enc.layer[0] is resolve(tiny_vit).parts[0].block


def test_unsupported_model_names_class():
    with pytest.raises(ValueError, match="unsupported model class Linear.*ViTForImageClassification"):
        resolve(nn.Linear(3, 3))


def test_mlp_residual_is_the_blocks_second_half(tiny_vit):
    an = resolve(tiny_vit)
    h = torch.randn(2, 17, 32)
    parts = an.parts[1]
    with torch.no_grad():
        att = parts.attention(parts.norm_before(h))
        mid = h + (att[0] if isinstance(att, tuple) else att)
        torch.testing.assert_close(parts.mlp_residual(mid), an.run_blocks(h, 1, 2), rtol=0, atol=1e-6)


def test_other_heads_are_rejected():
    from transformers import ViTForMaskedImageModeling
    with pytest.raises(ValueError, match="unsupported model class ViTForMaskedImageModeling"):
        resolve(ViTForMaskedImageModeling(tiny_config()))
