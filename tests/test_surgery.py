import pytest
import torch

from src.vit_pruning import (count_block_params, count_total_params, prune_vit_attention_blocks,
                             prune_vit_mlp_width, resolve)


def test_width_removes_exact_params_and_runs(tiny_vit, pixels):
    before = count_total_params(tiny_vit)
    counts = [3, 0, 10, 7]
    prune_vit_mlp_width(tiny_vit, counts, min_remaining=8)
    assert count_total_params(tiny_vit) == before - sum(counts) * (2 * 32 + 1)
    assert [p.intermediate_size for p in resolve(tiny_vit).parts] == [61, 64, 54, 57]
    assert tiny_vit.config.vit_pruning["intermediate_sizes"] == [61, 64, 54, 57]
    assert tiny_vit(pixel_values=pixels).logits.shape == (8, 5)


def test_removing_dead_neurons_is_lossless(tiny_vit, pixels):
    an = resolve(tiny_vit)
    dead = {0: [1, 5, 9], 2: [0, 63]}
    with torch.no_grad():
        for b, idx in dead.items():
            an.parts[b].fc2.weight[:, idx] = 0.0
        ref = tiny_vit(pixel_values=pixels).logits
    scores = [torch.ones(64) for _ in range(4)]
    for b, idx in dead.items():
        scores[b][idx] = 0.0
    prune_vit_mlp_width(tiny_vit, [3, 0, 2, 0], min_remaining=8, importance=scores)
    with torch.no_grad():
        torch.testing.assert_close(tiny_vit(pixel_values=pixels).logits, ref, rtol=0, atol=1e-6)


def test_width_respects_min_remaining(tiny_vit):
    with pytest.raises(ValueError, match="block 1: cannot remove 60 of 64 neurons with min_remaining=8"):
        prune_vit_mlp_width(tiny_vit, [0, 60, 0, 0], min_remaining=8)


def test_block_removal_updates_config(tiny_vit, pixels):
    before = count_total_params(tiny_vit)
    per_block = count_block_params(tiny_vit)
    res = prune_vit_attention_blocks(tiny_vit, selected_indices=[1, 3], unit="block")
    assert res["pruned_indices"] == [1, 3]
    assert tiny_vit.config.num_hidden_layers == 2
    assert count_total_params(tiny_vit) == before - per_block[1] - per_block[3]
    assert tiny_vit(pixel_values=pixels).logits.shape == (8, 5)


def test_attention_removal_makes_block_residual_mlp(tiny_vit, pixels):
    an = resolve(tiny_vit)
    block = an.parts[2]
    att_params = sum(p.numel() for p in block.attention.parameters()) + 2 * 32
    before = count_total_params(tiny_vit)
    prune_vit_attention_blocks(tiny_vit, selected_indices=[2], unit="attention")
    assert count_total_params(tiny_vit) == before - att_params
    an = resolve(tiny_vit)
    p = an.parts[2]
    assert p.attention_removed and an.parts[1].attention_removed is False
    h = torch.randn(2, 17, 32)
    with torch.no_grad():
        expected = h + p.fc2(torch.nn.functional.gelu(p.fc1(p.block.layernorm_after(h))))
        torch.testing.assert_close(an.run_blocks(h, 2, 3), expected, rtol=0, atol=1e-5)
    assert tiny_vit.config.vit_pruning["attention_removed"] == [2]


def test_greedy_picks_identity_block(tiny_vit, pixels):
    an = resolve(tiny_vit)
    with torch.no_grad():  # block 2 writes nothing into the residual stream: an identity
        for lin in (an.parts[2].fc2, an.parts[2].block.attention.o_proj
                    if hasattr(an.parts[2].block.attention, "o_proj")
                    else an.parts[2].block.attention.output.dense):
            lin.weight.zero_()
            lin.bias.zero_()
    res = prune_vit_attention_blocks(tiny_vit, num_to_prune=1, dataloader=[pixels], unit="block")
    assert res["pruned_indices"] == [2]
    assert res["scores"]["greedy_steps"][0]["2"] < 1e-10


def test_block_influence_picks_identity_block(tiny_vit, pixels):
    an = resolve(tiny_vit)
    with torch.no_grad():
        an.parts[1].fc2.weight.zero_()
        an.parts[1].fc2.bias.zero_()
        att = an.parts[1].block.attention
        out = att.o_proj if hasattr(att, "o_proj") else att.output.dense
        out.weight.zero_()
        out.bias.zero_()
    res = prune_vit_attention_blocks(tiny_vit, num_to_prune=1, dataloader=[pixels], method="bi")
    assert res["pruned_indices"] == [1]


def test_depth_needs_a_count(tiny_vit):
    with pytest.raises(ValueError, match="give one of sparsity"):
        prune_vit_attention_blocks(tiny_vit)
    with pytest.raises(ValueError, match=r"num_to_prune must be in \[0, 3\]"):
        prune_vit_attention_blocks(tiny_vit, num_to_prune=4, unit="block")


def test_temporary_bypass_restores_even_on_error(tiny_vit, pixels):
    from vit_pruning.surgery import TemporaryBypass
    with torch.no_grad():
        ref = tiny_vit(pixel_values=pixels).logits
    with pytest.raises(RuntimeError, match="boom"):
        with TemporaryBypass(tiny_vit) as bypass:
            bypass.add(1)
            bypass.add(3)
            assert [p.attention_removed for p in resolve(tiny_vit).parts] == [False, True, False, True]
            raise RuntimeError("boom")
    assert not any(p.attention_removed for p in resolve(tiny_vit).parts)
    with torch.no_grad():
        torch.testing.assert_close(tiny_vit(pixel_values=pixels).logits, ref, rtol=0, atol=0)
