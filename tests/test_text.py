"""BERT-family text encoders (post-LayerNorm): anatomy, both depth units, the pipeline, saving,
and the CLI. Tiny random BertModels built here: no download."""
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

from vit_pruning import PruneConfig, count_total_params, load_pruned_model, prune_2ssp, resolve
from vit_pruning.anatomy import PostNormAttentionBypass, mean_pool
from vit_pruning.batches import take_inputs, unpad
from vit_pruning.measure import collect_outputs, count_flops
from vit_pruning.persistence import save_pruned_model
from vit_pruning.pipeline import model_shape, plan_2ssp_allocation
from vit_pruning.surgery import remove_attention, remove_blocks
from conftest import cli_run

H, I, VOCAB = 32, 128, 100


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=I, max_position_embeddings=64)
    return BertModel(cfg).eval()


def padded_batches(n_batches: int = 3, size: int = 8, seed: int = 1) -> list[dict]:
    """Right-padded batches of sentences of random lengths 4..20 (like a tokenizer's output)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        lengths = torch.randint(4, 21, (size,), generator=g)
        ids = torch.zeros(size, int(lengths.max()), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, n in enumerate(lengths.tolist()):
            ids[i, :n] = torch.randint(1, VOCAB, (n,), generator=g)
            mask[i, :n] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def embeddings(model, batches) -> torch.Tensor:
    """The model's own forward on padded batches, masked mean pooling (the bench's measure)."""
    with torch.no_grad():
        return torch.cat([mean_pool(model(**b).last_hidden_state, b["attention_mask"]) for b in batches])


def test_resolve_bert_is_post_norm_with_exact_attention_params():
    an = resolve(tiny_bert())
    assert an.layout == "bert" and an.is_text and not an.has_classifier
    assert all(p.post_norm and not p.attention_removed for p in an.parts)
    # q, k, v, o weights and biases; the attention LayerNorm stays on the residual stream
    assert [p.attention_params for p in an.parts] == [4 * (H * H + H)] * 4
    assert [p.intermediate_size for p in an.parts] == [I] * 4


def test_segmented_forward_on_unpadded_sentences_equals_masked_model_forward():
    model = tiny_bert()
    batches = padded_batches()
    an = resolve(model)
    sentences = take_inputs(batches)
    assert sum(len(x) for x in sentences) == 24
    assert all(bool((x != 0).all()) for x in sentences)  # no padding token left
    with torch.no_grad():
        seg = {tuple(row.tolist()): e for x in sentences
               for row, e in zip(x, an.head(an.run_blocks(an.embed(x))))}
    full = embeddings(model, batches)
    rows = [tuple(r.tolist()) for b in batches for r in unpad(b["input_ids"], b["attention_mask"])]
    assert torch.allclose(torch.stack([seg[r] for r in rows]), full, atol=1e-5)


def test_unpad_left_and_right_padding_agree():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    right = unpad(ids, torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]))
    left = unpad(torch.tensor([[0, 5, 6, 7], [0, 0, 8, 9]]), torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]]))
    assert [r.tolist() for r in right] == [r.tolist() for r in left] == [[5, 6, 7], [8, 9]]


def test_removed_attention_keeps_the_post_norm_layernorm():
    model = tiny_bert()
    an = resolve(model)
    x = torch.randn(2, 7, H)
    block, ln1 = an.parts[1].block, an.parts[1].norm_before
    before = count_total_params(model)
    remove_attention(model, [1])
    parts = resolve(model).parts[1]
    assert parts.attention_removed and isinstance(parts.attention, PostNormAttentionBypass)
    assert count_total_params(model) == before - 4 * (H * H + H)
    with torch.no_grad():
        a = ln1(x)  # LN1(x + attn(x)) -> LN1(x)
        expected = parts.norm_after(a + parts.fc2(parts.act_fn(parts.fc1(a))))
        out = block(x)
    assert torch.allclose(out[0] if isinstance(out, tuple) else out, expected, atol=1e-6)
    assert "encoder.layer.1.attention.output.LayerNorm.weight" in model.state_dict()
    assert "encoder.layer.1.attention.self.query.weight" not in model.state_dict()
    with pytest.raises(ValueError, match="already removed"):
        remove_attention(model, [1])


@pytest.mark.parametrize("unit", ["block", "attention"])
def test_prune_2ssp_on_bert_hits_the_plan_exactly_and_stays_close(unit):
    model = tiny_bert()
    batches = padded_batches()
    ref = embeddings(model, batches)
    plan = plan_2ssp_allocation(model, 0.3, min_remaining=32, unit=unit, depth=1)
    model, res = prune_2ssp(model, 0.3, batches, PruneConfig(unit=unit, min_remaining=32, split=1))
    assert res.params_after_stage2 == plan.params_after == count_total_params(model)
    assert abs(res.achieved_sparsity - 0.3) <= (2 * H + 1) / res.params_before
    an = resolve(model)
    if unit == "block":
        assert len(an.parts) == 3
    else:
        assert sum(p.attention_removed for p in an.parts) == 1
    out = embeddings(model, batches)
    cos = torch.nn.functional.cosine_similarity(out, ref).mean()
    assert torch.isfinite(out).all() and cos > 0.9


def test_bert_pruning_is_deterministic():
    runs = []
    for _ in range(2):
        model, res = prune_2ssp(tiny_bert(), 0.25, padded_batches(), PruneConfig(min_remaining=32, split=0))
        runs.append(res.kept_neurons)
    assert runs[0] == runs[1]


def test_lsq_keep_drops_a_neuron_the_others_can_replace():
    from vit_pruning.importance import accumulate
    from vit_pruning.width import keep_indices, lsq_keep
    g = torch.Generator().manual_seed(0)
    act = torch.randn(1, 400, 6, generator=g)
    act[..., 2:5] *= 0.1  # weak but independent: the activation score would drop one of these
    act[..., 5] = act[..., 0] + act[..., 1]  # 0, 1 and 5 are linearly dependent: any one of
    # them is replaceable by the other two at no cost
    target = act @ torch.randn(6, 4, generator=g)
    stats = accumulate(None, act, target)
    by_score = set(range(6)) - set(keep_indices(stats.score, 1).tolist())
    by_lsq = set(range(6)) - set(lsq_keep(stats, 1, ridge=1e-9).tolist())
    assert by_score <= {2, 3, 4} and by_lsq <= {0, 1, 5}
    assert lsq_keep(stats, 0).tolist() == list(range(6))


def test_save_and_reload_pruned_bert_gives_identical_embeddings(tmp_path):
    model = tiny_bert()
    batches = padded_batches()
    model, _ = prune_2ssp(model, 0.35, batches, PruneConfig(unit="attention", min_remaining=32, split=2))
    assert sum(p.attention_removed for p in resolve(model).parts) == 2
    out = save_pruned_model(model, tmp_path / "pruned")
    back = load_pruned_model(out)
    assert isinstance(back, BertModel) and type(back).__name__ == "PrunedBertModel"  # attention removed
    assert count_total_params(back) == count_total_params(model)
    assert torch.equal(embeddings(back, batches), embeddings(model, batches))


def test_text_flops_shrink_with_the_model():
    model = tiny_bert()
    before = count_flops(model, seq_len=16)
    remove_blocks(model, [0])
    assert count_flops(model, seq_len=16) == pytest.approx(before * 3 / 4, rel=0.05)


def test_model_shape_and_plan_on_bert():
    shape = model_shape(tiny_bert())
    assert shape.widths == (I,) * 4 and shape.neuron_params == 2 * H + 1
    with pytest.raises(ValueError, match="maximum"):
        plan_2ssp_allocation(tiny_bert(), 0.99, min_remaining=32)


def bert_folder(tmp_path) -> Path:
    """A tiny random BertModel saved with a character-level WordPiece tokenizer."""
    import string
    from transformers import BertTokenizerFast
    chars = list(string.ascii_lowercase + string.digits + ".,;:'\"()-_?!")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=H, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=I, max_position_embeddings=512)
    folder = tmp_path / "bert"
    BertModel(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def cli(tmp_path, *args) -> int:
    return cli_run(tmp_path, *args, dirs=("r", "a", "p"))


@pytest.mark.cli
def test_cli_prunes_a_text_encoder_and_reports_fidelity(tmp_path):
    import json
    folder = bert_folder(tmp_path)
    code = cli(tmp_path, "--model", str(folder), "--target", "0.2", "--calib-size", "48",
               "--eval-batches", "2", "--batch-size", "16", "--min-remaining", "32", "--run-id", "t",
               "--save-pruned-model")
    assert code == 0
    rep = json.loads((tmp_path / "r" / "report-t.json").read_text())
    assert rep["model"]["layout"] == "bert"
    assert rep["accuracy_note"].startswith("not applicable (text encoder)")
    assert rep["calibration"]["count"] == 48 and rep["calibration"]["dataset"] == "python-docs"
    final = rep["stages"][-1]
    assert final["top1"] is None and 0.5 < final["cosine"] <= 1 and 0 <= final["agreement"] <= 1
    assert rep["stages"][0]["cosine"] is None  # the baseline is the reference
    assert abs(rep["achieved_sparsity"] - 0.2) <= rep["one_neuron_sparsity"]
    assert rep["latency_setup"]["seq_len"] > 1
    md = (tmp_path / "r" / "report-t.md").read_text()
    assert "embedding cosine" in md and "48 sentences from python-docs" in md
    back = load_pruned_model(tmp_path / "p" / "t")
    assert count_total_params(back) == final["params"]
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(tmp_path / "p" / "t")("a b")["input_ids"][0] == 2  # [CLS]


@pytest.mark.cli
def test_cli_text_encoder_reads_a_text_file_and_refuses_image_flags(tmp_path, capsys):
    folder = bert_folder(tmp_path)
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(f"sentence number {i} about pruning." for i in range(40)) + "\n\n")
    assert cli(tmp_path, "--model", str(folder), "--target", "0.1", "--text-file", str(lines),
               "--calib-size", "24", "--eval-batches", "1", "--batch-size", "16", "--min-remaining",
               "32", "--run-id", "f") == 0
    assert cli(tmp_path, "--model", str(folder), "--target", "0.1", "--text-file", str(lines),
               "--calib-size", "30", "--eval-batches", "1", "--batch-size", "16") == 2
    assert "only 24 sentences are left for calibration" in capsys.readouterr().err
    for flag in ("--use-adapter", "--do-finetune", "--load-cifar"):
        assert cli(tmp_path, "--model", str(folder), "--target", "0.1", flag) == 2
        err = capsys.readouterr().err
        assert f"{flag} does not apply to a text encoder" in err and "Traceback" not in err
    assert cli(tmp_path, "--model", str(folder), "--target", "0.1", "--dry-run") == 0
    assert "GFLOPs per sentence of 128 tokens" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["report-f.json", "report-f.md",
                                                                  "report-f.png"]


def test_collect_outputs_on_token_ids_is_the_pooled_embedding():
    model = tiny_bert()
    ids = torch.randint(1, VOCAB, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state.mean(1)
    assert torch.allclose(collect_outputs(model, [ids]), expected)


def test_roberta_resolves_and_segments_like_its_own_forward():
    from transformers import RobertaConfig, RobertaModel
    torch.manual_seed(0)
    model = RobertaModel(RobertaConfig(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=I)).eval()
    an = resolve(model)
    assert an.layout == "bert" and all(p.post_norm for p in an.parts)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        seg = an.head(an.run_blocks(an.embed(ids)))
    assert torch.allclose(seg, collect_outputs(model, [ids]), atol=1e-6)


@pytest.mark.parametrize("name", ["ElectraModel", "DistilBertModel", "BertForSequenceClassification"])
def test_other_text_models_are_refused_by_name(name):
    import transformers
    small = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=I)
    if name == "DistilBertModel":
        cfg = transformers.DistilBertConfig(vocab_size=VOCAB, dim=H, n_layers=2, n_heads=4, hidden_dim=I)
    elif name == "ElectraModel":
        cfg = transformers.ElectraConfig(**small)
    else:
        cfg = transformers.BertConfig(**small)
    with pytest.raises(ValueError, match=f"unsupported model class {name}"):
        resolve(getattr(transformers, name)(cfg))


@pytest.mark.cli
def test_cli_distills_a_text_encoder_block_by_block(tmp_path):
    """--distill-steps on a text encoder: sentences of the text file that are neither calibration
    nor evaluation are the inputs, every kept block learns the teacher block it stands for."""
    import json
    from vit_pruning.distillation import teacher_layers
    folder = bert_folder(tmp_path)
    lines = tmp_path / "lines.txt"
    words = "pruning removes blocks neurons while distillation recovers what the model lost".split()
    lines.write_text("\n".join(f"case {i}: " + " ".join(words[(i * 7 + j) % len(words)] for j in range(4 + i % 5))
                               + "." for i in range(200)))
    assert cli(tmp_path, "--model", str(folder), "--target", "0.35", "--text-file", str(lines),
               "--calib-size", "48", "--eval-batches", "2", "--batch-size", "16", "--min-remaining", "32",
               "--distill-steps", "60", "--depth-unit", "block", "--distill-augment", "2",
               "--heads", "off", "--run-id", "d") == 0  # blocks removed: the map to test
    rep = json.loads((tmp_path / "r" / "report-d.json").read_text())
    st = {s["name"]: s for s in rep["stages"]}
    d = rep["distillation"]
    removed = rep["plan"]["removed_indices"]
    assert removed and d["match"] == "layers" and d["loss"] == "tokens" and d["train"] == "blocks"
    assert d["layers"] == teacher_layers(4, removed)
    # the other sentences, and 2 variants of each calibration sentence (none an evaluation one)
    assert d["augmented"] == 2 * 48 and d["inputs"] == 200 - 48 - 32 + d["augmented"]
    assert f"{d['augmented']} of them variants of calibration sentences" in (tmp_path / "r" / "report-d.md").read_text()
    assert st["distilled"]["params"] == st["stage2"]["params"]
    # the random tiny encoder keeps cosine ~0.999999 one-shot: distillation must learn (the
    # loss falls) and, keeping its best check, never end further from the teacher
    losses = d["losses"]
    assert len(losses) == 60 and sum(losses[-10:]) < 0.5 * sum(losses[:10]), losses
    assert st["distilled"]["cosine"] >= st["stage2"]["cosine"], (st["stage2"]["cosine"], st["distilled"]["cosine"])


def test_augment_sentences_is_deterministic_and_draws_only_their_words():
    from vit_pruning.text import augment_sentences
    sents = [f"sentence {i} says the pruned encoder keeps {i % 7} blocks of its teacher." for i in range(40)]
    a = augment_sentences(sents, 3, seed=1)
    assert a == augment_sentences(sents, 3, seed=1) and a != augment_sentences(sents, 3, seed=2)
    assert len(a) == 3 * len(sents) and augment_sentences(sents, 0) == []
    vocabulary = {w for s in sents for w in s.split()}
    assert all(t and set(t.split()) <= vocabulary for t in a)
    assert sum(t not in sents for t in a) > 0.8 * len(a)  # almost every variant is a new sentence
    held = set(a[:20])  # exclude drops exactly the variants equal to one of its sentences
    assert augment_sentences(sents, 3, seed=1, exclude=held) == [t for t in a if t not in held]
    with pytest.raises(ValueError, match="copies must be >= 0"):
        augment_sentences(sents, -1)


def test_tokenize_by_length_orders_sentences_by_token_count_and_keeps_them_all(tmp_path):
    from transformers import AutoTokenizer
    from vit_pruning.text import tokenize
    tok = AutoTokenizer.from_pretrained(bert_folder(tmp_path))
    texts = [("word " * (1 + (7 * i) % 13)).strip() + f" {i}." for i in range(40)]
    plain, ordered = tokenize(tok, texts, 8), tokenize(tok, texts, 8, by_length=True)

    def rows(batches):
        return [tuple(int(t) for t, m in zip(ids, mask) if m)
                for b in batches for ids, mask in zip(b["input_ids"], b["attention_mask"])]
    assert sorted(rows(plain)) == sorted(rows(ordered))  # the same sentences, reordered
    counts = [len(r) for r in rows(ordered)]
    assert counts == sorted(counts)
    assert sum(b["input_ids"].numel() for b in ordered) < sum(b["input_ids"].numel() for b in plain)


def sentence_transformers_files(folder: Path, pooling: dict, dense: bool = False) -> None:
    """The module files sentence-transformers writes beside its encoder."""
    import json
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if dense:
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
        (folder / "2_Dense").mkdir()
        (folder / "2_Dense" / "config.json").write_text(json.dumps({"in_features": H, "out_features": 8}))
    modules.append({"idx": len(modules), "name": "n", "path": "n_Normalize",
                    "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": H, "pooling_mode_cls_token": False,
         "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False, **pooling}))


def test_sentence_transformers_pooling_is_read_from_the_folder(tmp_path):
    """A CLS-pooled sentence model (BGE and others) was measured, and its trials scored, on
    the mean of its tokens: not the embedding it gives."""
    from vit_pruning.text import sentence_modules
    folder = tmp_path / "st"
    folder.mkdir()
    assert sentence_modules(str(folder)) is None
    sentence_transformers_files(folder, {"pooling_mode_cls_token": True}, dense=True)
    found = sentence_modules(str(folder))
    assert found.pooling == "cls" and found.after == ("Dense",)
    assert sorted(found.files) == ["1_Pooling/config.json", "2_Dense/config.json", "modules.json",
                                   "sentence_bert_config.json"]
    (tmp_path / "max").mkdir()
    sentence_transformers_files(tmp_path / "max", {})
    (tmp_path / "max" / "1_Pooling" / "config.json").write_text('{"pooling_mode_max_tokens": true}')
    with pytest.raises(ValueError, match=r"its sentence-transformers pooling is "
                                         r"\['pooling_mode_max_tokens'\]; fidelity is measured on "
                                         r"mean or CLS pooling"):
        sentence_modules(str(tmp_path / "max"))


def test_cls_pooling_takes_the_first_real_token_on_every_path():
    from vit_pruning.anatomy import sentence_pool
    model = tiny_bert()
    model.config.sentence_pooling = "cls"
    ids = torch.randint(1, VOCAB, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden = model(input_ids=ids).last_hidden_state
        assert torch.equal(collect_outputs(model, [ids]), hidden[:, 0])
        assert torch.allclose(resolve(model).head(hidden), hidden[:, 0])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])  # left and right padding
    states = torch.arange(2 * 4 * 2.0).reshape(2, 4, 2)
    assert torch.equal(sentence_pool(model.config, states, mask), states[[0, 1], [2, 0]])
    model.config.sentence_pooling = "max"
    with pytest.raises(ValueError, match="sentence_pooling must be one of"):
        sentence_pool(model.config, states, mask)


@pytest.mark.cli
def test_cli_keeps_a_sentence_transformers_folder_whole(tmp_path, caplog):
    """The pruned folder had lost modules.json and the Pooling module, so sentence-transformers
    loaded it with its default pooling; the run now measures and saves the folder's own."""
    import json
    folder = bert_folder(tmp_path)
    sentence_transformers_files(folder, {"pooling_mode_cls_token": True}, dense=True)
    caplog.set_level("INFO", logger="vit_pruning")
    assert cli(tmp_path, "--model", str(folder), "--target", "0.2", "--calib-size", "24",
               "--eval-batches", "1", "--batch-size", "16", "--min-remaining", "32",
               "--run-id", "st", "--save-pruned-model") == 0
    assert "sentence-transformers model, cls pooling" in caplog.text
    assert "module(s) after the pooling (Dense) are not applied" in caplog.text
    saved = tmp_path / "p" / "st"
    for name in ("modules.json", "1_Pooling/config.json", "2_Dense/config.json"):
        assert (saved / name).read_bytes() == (folder / name).read_bytes()
    assert json.loads((saved / "config.json").read_text())["sentence_pooling"] == "cls"
    assert load_pruned_model(saved).config.sentence_pooling == "cls"
    rep = json.loads((tmp_path / "r" / "report-st.json").read_text())
    assert "fidelity is the cosine of cls-pooled sentence embeddings" in rep["accuracy_note"]
