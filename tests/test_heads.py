"""Attention heads as a pruning unit: every supported family on tiny random configs, in
whichever transformers major runs the tests. Removing heads is checked against the unpruned
model with those heads silenced (their output-projection columns zeroed: what a removed head
adds is exactly nothing), parameters are counted exactly, and a head-pruned model saves,
reloads with identical outputs and refuses plain from_pretrained."""
import pytest
import torch
import transformers as tf
from test_families import FAMILIES, TXT, V, build, images, out

from vit_pruning import load_pruned_model, save_pruned_model
from vit_pruning.anatomy import resolve
from vit_pruning.measure import count_total_params
from vit_pruning.surgery import (attention_refs, is_plain, prune_heads, remove_attention,
                                 restore_attention_refs, sync_config)

TEXT = {"bert": ("BertModel", lambda: tf.BertConfig(**{**TXT, "num_hidden_layers": 3, "num_attention_heads": 4})),
        "roberta": ("RobertaModel", lambda: tf.RobertaConfig(
            **{**TXT, "num_hidden_layers": 3, "num_attention_heads": 4, "max_position_embeddings": 20}))}
VIT = {"vit": ("ViTForImageClassification", lambda: tf.ViTConfig(**V, num_labels=5)),
       "deit": ("DeiTModel", lambda: tf.DeiTConfig(**V))}
ALL = {**{k: v for k, v in FAMILIES.items() if k != "beit-shared-bias"}, **VIT, **TEXT}


def make(name: str) -> torch.nn.Module:
    if name in FAMILIES:
        return build(name)
    cls, cfg = ALL[name]
    torch.manual_seed(0)
    return getattr(tf, cls)(cfg()).eval()


def inputs(name: str) -> torch.Tensor:
    if name in TEXT:
        return torch.randint(3, 99, (4, 7), generator=torch.Generator().manual_seed(1))
    return images(4)


def silenced(model, heads: dict[int, list[int]]):
    """The model's output with heads silenced: their columns of the output projection zeroed."""
    an = resolve(model)
    saved = []
    with torch.no_grad():
        for b, hs in heads.items():
            slots = an.parts[b].heads
            o = slots.linear("o")
            saved.append((o, o.weight.clone()))
            for h in hs:
                o.weight[:, h * slots.head_dim:(h + 1) * slots.head_dim] = 0
    try:
        return out(model, x_of[0])
    finally:
        with torch.no_grad():
            for o, w in saved:
                o.weight.copy_(w)


x_of: list = [None]


def drop(model, heads: dict[int, list[int]]) -> None:
    an = resolve(model)
    for b, hs in heads.items():
        n = an.parts[b].num_heads
        prune_heads(an.parts[b], torch.tensor([h for h in range(n) if h not in hs]))
    sync_config(resolve(model))


@pytest.mark.parametrize("name", ALL)
def test_removed_heads_are_silenced_heads(name):
    model = make(name)
    x_of[0] = x = inputs(name)
    an = resolve(model)
    n, last = an.parts[0].num_heads, len(an.parts) - 1
    heads = {0: [1], last: list(range(1, an.parts[last].num_heads))}  # the last keeps one head
    ref = silenced(model, heads)
    per_head = [an.parts[b].head_params for b in heads]
    before = count_total_params(model)
    drop(model, heads)
    an = resolve(model)
    assert [an.parts[b].num_heads for b in heads] == [n - 1, 1]
    assert count_total_params(model) == before - sum(p * len(hs) for p, hs in zip(per_head, heads.values()))
    torch.testing.assert_close(out(model, x), ref, rtol=0, atol=2e-5)
    assert not is_plain(an)
    assert model.config.vit_pruning["attention_heads"][0] == n - 1


@pytest.mark.parametrize("name", ALL)
def test_head_pruned_model_saves_and_reloads(name, tmp_path):
    model = make(name)
    x = inputs(name)
    an = resolve(model)
    heads = {0: [0], 1: list(range(an.parts[1].num_heads))}  # block 1 loses every head
    drop(model, heads)
    assert resolve(model).parts[1].attention_removed
    ref = out(model, x)
    saved = save_pruned_model(model, tmp_path / "m")
    assert saved.format == "remote-code"
    again = load_pruned_model(tmp_path / "m")
    assert torch.equal(out(again, x), ref)
    assert count_total_params(again) == count_total_params(model)
    assert [p.num_heads for p in resolve(again).parts] == [p.num_heads for p in resolve(model).parts]
    auto = tf.AutoModelForImageClassification if "ForImage" in ALL[name][0] else tf.AutoModel
    with pytest.raises(Exception):
        auto.from_pretrained(tmp_path / "m")  # plain transformers: refused, never a wrong model
    remote = auto.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    torch.testing.assert_close(out(remote, x), ref, rtol=0, atol=1e-5)


def test_losing_every_head_is_removing_the_sublayer():
    a, b = make("beit"), make("beit")
    x_of[0] = x = images(4)
    drop(a, {2: list(range(resolve(a).parts[2].num_heads))})
    remove_attention(b, [2])
    assert count_total_params(a) == count_total_params(b)
    assert a.config.vit_pruning["attention_removed"] == [2] == b.config.vit_pruning["attention_removed"]
    assert torch.equal(out(a, x), out(b, x))


def test_refs_undo_head_pruning():
    model = make("clip-vision")
    x = images(4)
    ref = out(model, x)
    parts = resolve(model).parts[0]
    saved = attention_refs(parts)
    prune_heads(parts, torch.tensor([0, 2]))
    assert not torch.equal(out(model, x), ref)
    restore_attention_refs(saved)
    assert torch.equal(out(model, x), ref) and resolve(model).parts[0].num_heads == 4


def test_bad_head_indices_are_refused():
    parts = resolve(make("vit")).parts[0]
    with pytest.raises(ValueError, match=r"keep_heads must be indices in \[0, 4\)"):
        prune_heads(parts, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="duplicates"):
        prune_heads(parts, torch.tensor([1, 1]))


def test_shared_relative_position_bias_is_known():
    assert resolve(build("beit-shared-bias")).shared_head_bias
    assert not resolve(build("beit")).shared_head_bias
