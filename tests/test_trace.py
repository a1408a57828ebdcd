"""The unpruned trace and the faster depth selection: pruning with the trace gives what pruning
without it gives (ViT, post-norm BERT, Swin; both depth units), the attention-only stream is the
block's own, and the greedy first step's screening scores its finalists on every batch."""
import pytest
import torch
from transformers import BertConfig, BertModel

from vit_pruning import PruneConfig, prune_2ssp
from vit_pruning import pipeline
from vit_pruning.anatomy import resolve
from vit_pruning.depth import greedy_order
from vit_pruning.importance import accumulate, add_gram, block_mlp_stats, block_output_and_sum
from vit_pruning.measure import forward_output
from vit_pruning.trace import regroup, trace_bytes, trace_unpruned

from conftest import tiny_config
from test_families import build, images


def _bert() -> BertModel:
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=4,
                                num_attention_heads=4, intermediate_size=64)).eval()


def _model_and_batches(name: str):
    if name == "bert":
        g = torch.Generator().manual_seed(1)
        return _bert(), [torch.randint(1, 50, (8, n), generator=g) for n in (5, 7, 9, 6)]
    if name == "vit":
        from transformers import ViTForImageClassification
        torch.manual_seed(0)
        return ViTForImageClassification(tiny_config()).eval(), list(torch.split(images(32), 8))
    return build(name), list(torch.split(images(32), 8))


def _prune(name: str, unit: str, trace: bool, monkeypatch):
    monkeypatch.setattr(pipeline, "TRACE_LIMIT", pipeline.TRACE_LIMIT if trace else 0)
    model, batches = _model_and_batches(name)
    cfg = PruneConfig(unit=unit, min_remaining=8, align=1, max_search=3)
    _, res = prune_2ssp(model, 0.35, batches, cfg)
    with torch.no_grad():
        return res, torch.cat([forward_output(model, x) for x in batches])


@pytest.mark.parametrize("name,unit", [("vit", "block"), ("vit", "attention"), ("bert", "block"),
                                       ("bert", "attention"), ("swin", "block")])
def test_pruning_with_the_trace_equals_pruning_without(name, unit, monkeypatch):
    with_trace, out = _prune(name, unit, True, monkeypatch)
    without, ref = _prune(name, unit, False, monkeypatch)
    assert "unpruned trace" in with_trace.timings and "reference outputs" in without.timings
    assert with_trace.depth_order == without.depth_order
    assert with_trace.kept_neurons == without.kept_neurons
    assert with_trace.selection == without.selection
    assert with_trace.search.keys() == without.search.keys()
    for k in with_trace.search:
        assert with_trace.search[k] == pytest.approx(without.search[k], rel=1e-4, abs=1e-8)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_trace_holds_every_block_input_and_the_outputs():
    model, batches = _model_and_batches("vit")
    an = resolve(model)
    tr = trace_unpruned(an, batches)
    assert len(tr.inputs) == len(an.parts) + 1 and len(tr.sums) == len(an.parts)
    h = an.embed(batches[1])
    for i in range(len(an.parts)):
        torch.testing.assert_close(tr.inputs[i][1], h)
        h, total, _ = block_output_and_sum(an, i, h)
        torch.testing.assert_close(tr.sums[i][1], total)
    with torch.no_grad():
        torch.testing.assert_close(tr.outputs, torch.cat([forward_output(model, x) for x in batches]),
                                   rtol=1e-5, atol=1e-5)
    rows = sum(len(x) for x in batches)
    assert trace_bytes(an, batches) == rows * tr.inputs[0][0][0].numel() * 4 * (len(an.parts) + 1)
    assert trace_bytes(resolve(_bert()), [torch.ones(2, 5, dtype=torch.long)]) == 2 * 5 * 32 * 4 * 5 * 2


def test_regroup_cuts_rows_across_batches():
    a, b = torch.arange(6).reshape(3, 2), torch.arange(6, 14).reshape(4, 2)
    parts = regroup([a, b], [2, 3, 1])
    assert [p[:, 0].tolist() for p in parts] == [[0, 2], [4, 6, 8], [10]]
    assert parts[0].data_ptr() == a.data_ptr()  # a view where one batch holds the piece
    with pytest.raises(ValueError, match="asked for 8 rows, the batches hold 7"):
        regroup([a, b], [4, 4])


@pytest.mark.parametrize("name", ["vit", "bert", "swin", "dinov2"])
def test_attention_stream_is_the_stream_the_block_feeds_its_mlp(name):
    model, batches = _model_and_batches(name)
    an = resolve(model)
    h = an.embed(batches[0])
    parts = an.parts[0]
    capture = [parts.fc2] if parts.post_norm else [parts.fc2, parts.norm_after]
    with torch.no_grad():
        out, total, seen = block_output_and_sum(an, 0, h, capture)
        mid = total - seen[0][1] if parts.post_norm else seen[1][0]
        torch.testing.assert_close(an.attention_stream(0, h), mid)
        torch.testing.assert_close(parts.mlp_residual(an.attention_stream(0, h)), out)


@pytest.mark.parametrize("name", ["vit", "bert", "swin", "dinov2-swiglu"])
def test_model_refit_statistics_stop_at_fc2_and_equal_the_full_blocks(name):
    """With refit "model" the unpruned MLP runs only as far as fc2's input (run_until): the
    statistics, streams after attention and the MLP's activations are the full forward's, and
    no output is returned (the caller reruns the refit MLP)."""
    model, batches = _model_and_batches(name)
    an = resolve(model)
    hidden = [an.embed(x) for x in batches[:2]]
    parts = an.parts[0]
    with torch.no_grad():
        full = [block_output_and_sum(an, 0, h, [parts.fc2]) for h in hidden]
        targets = [total + 0.1 for _, total, _ in full]  # any residual sums
        calls = []
        handle = parts.fc2.register_forward_hook(lambda *_: calls.append(1))
        try:
            stats, outputs, mids = block_mlp_stats(an, 0, hidden, "model", targets)
        finally:
            handle.remove()
        assert calls == [] and outputs == [None, None]
        for h, mid, (_, total, seen) in zip(hidden, mids, full):
            torch.testing.assert_close(an.attention_stream(0, h), mid)
            torch.testing.assert_close(total, mid + parts.mlp_out(
                mid if parts.post_norm else parts.norm_after(mid)))
        ref = None  # the statistics from the full forward's activations
        for (_, _, seen), t, mid in zip(full, targets, mids):
            w = 1 / t.std(-1, unbiased=False).clamp_min(1e-6) if parts.post_norm else None
            ref = accumulate(ref, seen[0][0], t - mid, w)
        for got, want in ((stats.gram, ref.gram), (stats.cross, ref.cross),
                          (stats.score_sum, ref.score_sum)):
            torch.testing.assert_close(got, want)
    with pytest.raises(RuntimeError, match="finished without calling"):
        an.run_until(0, hidden[0], an.parts[1].fc2)


def test_attention_stream_of_a_bypassed_attention_is_the_block_input():
    from vit_pruning.surgery import TemporaryBypass
    model, batches = _model_and_batches("vit")
    h = resolve(model).embed(batches[0])
    with TemporaryBypass(model) as bypass, torch.no_grad():
        bypass.add(1)
        an = resolve(model)
        torch.testing.assert_close(an.attention_stream(1, h), h)
        torch.testing.assert_close(an.parts[1].mlp_residual(an.attention_stream(1, h)),
                                   an.block_forward(1, h))


def test_first_half_counts_rows_not_batches():
    from vit_pruning.depth import _first_half
    sizes = lambda *n: [torch.zeros(k, 2) for k in n]
    assert _first_half(sizes(8, 8, 8, 8)) == 2
    assert _first_half(sizes(2, 2, 2, 26)) == 3  # 6 of 32 rows: the last batch alone is more
    assert _first_half(sizes(30, 1, 1)) == 1 and _first_half(sizes(5)) == 0


def test_add_gram_is_the_full_product():
    rows = torch.randn(50, 23, generator=torch.Generator().manual_seed(0))
    for panels in (1, 4, 6, 30):
        gram = torch.ones(23, 23)
        add_gram(gram, rows, panels)
        torch.testing.assert_close(gram, 1 + rows.T @ rows)


def test_greedy_first_step_screens_on_half_and_finishes_the_best_on_all():
    model, batches = _model_and_batches("vit")
    tr = trace_unpruned(resolve(model), batches)
    exhaustive, steps_all = greedy_order(model, batches, 1, unpruned=tr)
    order, steps = greedy_order(model, batches, 1, rescore=2, unpruned=tr)
    half, _ = greedy_order(model, batches[:2], 1)
    _, steps_half = greedy_order(model, batches[:2], 1)
    finalists = sorted(steps_half[0], key=lambda c: (steps_half[0][c], c))[:2]
    for c, v in steps[0].items():  # finalists: every batch; the others: the first half
        want = steps_all[0][c] if c in finalists else steps_half[0][c]
        assert v == pytest.approx(want, rel=1e-5)
    assert order == [min(finalists, key=lambda c: (steps_all[0][c], c))]
    # without the trace the same scores come out
    _, plain = greedy_order(model, batches, 1, rescore=2)
    assert plain[0] == pytest.approx(steps[0], rel=1e-5)
