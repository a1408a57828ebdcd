"""Recovery by distillation: label-free, the teacher never changes, the chosen parameters
alone learn, it helps where pruning hurt, and the CLI reports it (and leaves nothing
half-written when interrupted)."""
import copy
import json
import re

import pytest
import torch
from transformers import BertConfig, BertModel, ViTForImageClassification

from conftest import cli_run, tiny_config
from vit_pruning import PruneConfig, prune_2ssp
from vit_pruning.accel import adamw
from vit_pruning.distillation import (WARMUP, block_outputs, distill, layer_loss, pruned_layers,
                                      teacher_layers, teacher_outputs, trainable_parameters,
                                      warmup_cosine)
from vit_pruning.measure import collect_outputs, kl_divergence, mean_cosine


def _vit_pair():
    torch.manual_seed(0)
    teacher = ViTForImageClassification(tiny_config()).eval()
    gen = torch.Generator().manual_seed(1)
    train = [torch.randn(64, 3, 16, 16, generator=gen) for _ in range(2)]
    held = [torch.randn(32, 3, 16, 16, generator=gen)]
    student = copy.deepcopy(teacher)
    prune_2ssp(student, 0.5, train[:1], PruneConfig(min_remaining=8, split=1, align=1))
    return teacher, student, train, held


def test_distillation_brings_the_student_closer_and_leaves_the_teacher_alone():
    teacher, student, train, held = _vit_pair()
    before_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    ref = collect_outputs(teacher, held)
    kl0 = kl_divergence(collect_outputs(student, held), ref)
    res = distill(student, teacher, train, steps=80, lr=1e-3, batch_size=32, train="all")
    kl1 = kl_divergence(collect_outputs(student, held), ref)
    assert kl1 < 0.5 * kl0, (kl0, kl1)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before_state.items())
    assert res.loss == "kl" and len(res.losses) == 80 and res.seconds > 0
    assert not any(p.requires_grad for p in student.parameters()) and not student.training


@pytest.mark.parametrize("train", ["fc2", "norms", "mlp", "blocks"])
def test_only_the_chosen_parameters_learn(train):
    teacher, student, data, _ = _vit_pair()
    chosen = {id(p) for p in trainable_parameters(student, train)}
    before = {n: p.clone() for n, p in student.named_parameters()}
    distill(student, None, data, steps=5, lr=1e-2, cached=teacher_outputs(teacher, data), train=train, heldout=0)
    for n, p in student.named_parameters():
        assert torch.equal(p, before[n]) != (id(p) in chosen), n


def _bert_data(padding: bool):
    """A 4-block BERT teacher, 96 training sentences (half padded after 9 tokens if `padding`)
    and 32 held-out ones, as token ids."""
    torch.manual_seed(0)
    teacher = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=40), add_pooling_layer=False).eval()
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 99, (96, 12), generator=gen)
    mask = torch.ones_like(ids)
    if padding:
        mask[::2, 9:] = 0  # half the sentences end early: padding must not count
    held = {"input_ids": torch.randint(1, 99, (32, 12), generator=gen)}
    held["attention_mask"] = torch.ones_like(held["input_ids"])
    return teacher, ids, {"input_ids": ids, "attention_mask": mask}, held


def test_text_encoder_learns_the_teachers_embeddings():
    teacher, ids, batch, held = _bert_data(padding=False)
    student = copy.deepcopy(teacher)
    prune_2ssp(student, 0.3, [ids[:32]], PruneConfig(min_remaining=8, split=1, align=1, compensation="none",
                                                     selection="score"))
    ref = teacher_outputs(teacher, [held])[0]
    cos0 = mean_cosine(teacher_outputs(student, [held])[0], ref)
    res = distill(student, teacher, [batch], steps=60, lr=3e-4, batch_size=32, train="all")
    cos1 = mean_cosine(teacher_outputs(student, [held])[0], ref)
    assert res.loss == "cosine" and 1 - cos1 < 0.5 * (1 - cos0), (cos0, cos1)


def test_text_encoder_can_learn_every_token():
    """match="tokens": the student learns each real token's final hidden state (padding masked)
    and their mean; the cached targets are (B, T, H); an image model refuses it."""
    teacher, ids, batch, held = _bert_data(padding=True)
    student = copy.deepcopy(teacher)
    prune_2ssp(student, 0.3, [ids[:32]], PruneConfig(min_remaining=8, split=1, align=1, compensation="none",
                                                     selection="score"))
    assert teacher_outputs(teacher, [batch], match="tokens")[0].shape == (96, 12, 32)
    ref = teacher_outputs(teacher, [held])[0]
    cos0 = mean_cosine(teacher_outputs(student, [held])[0], ref)
    res = distill(student, teacher, [batch], steps=60, lr=3e-4, batch_size=32, train="all", match="tokens")
    cos1 = mean_cosine(teacher_outputs(student, [held])[0], ref)
    assert res.loss == "tokens" and res.match == "tokens" and 1 - cos1 < 0.5 * (1 - cos0), (cos0, cos1)
    vit_teacher, vit_student = _vit_pair()[:2]
    with pytest.raises(ValueError, match="match='tokens' is for text encoders"):
        distill(vit_student, vit_teacher, [torch.zeros(2, 3, 16, 16)], steps=1, match="tokens")


def test_token_match_pools_as_the_model_does():
    """match="tokens" on a CLS-pooled encoder: the sentence term is the [CLS] token's distance,
    not the tokens' mean (the held-out check before any step is the loss exactly)."""
    teacher, _, batch, held = _bert_data(padding=True)
    teacher.config.sentence_pooling = "cls"
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.encoder.layer[-1].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
        s, t = student(**held).last_hidden_state, teacher(**held).last_hidden_state
    res = distill(student, teacher, [batch], steps=1, lr=0.0, batch_size=32, train="all",
                  match="tokens", check_inputs=[held])
    tokens = (1 - torch.cosine_similarity(s, t, dim=-1)).mean()
    cls, mean = ((1 - torch.cosine_similarity(a, b, dim=-1)).mean()
                 for a, b in ((s[:, 0], t[:, 0]), (s.mean(1), t.mean(1))))
    assert abs(cls - mean) > 1e-3  # the two poolings differ here
    assert res.heldout[0] == pytest.approx(float(tokens + cls), rel=1e-5)


def test_blocks_trains_every_block_and_nothing_else():
    _, student, _, _ = _vit_pair()
    chosen = {id(p) for p in trainable_parameters(student, "blocks")}
    in_blocks = {id(p) for n, p in student.named_parameters() if re.search(r"\.layers?\.\d", n)}  # 4.x, 5.x
    assert chosen == in_blocks
    assert not chosen & {id(p) for p in student.vit.embeddings.parameters()}
    assert not chosen & {id(p) for p in student.classifier.parameters()}


def test_teacher_layers_maps_each_kept_block_to_the_last_block_it_stands_for():
    assert teacher_layers(6, [1, 2, 3]) == [3, 4, 5]
    assert teacher_layers(6) == [0, 1, 2, 3, 4, 5]
    assert teacher_layers(4, [0]) == [1, 2, 3]  # nothing precedes block 1: it learns its own output
    assert teacher_layers(4, [3]) == [0, 1, 3]  # the last kept block learns the teacher's last
    with pytest.raises(ValueError, match="do not leave a block"):
        teacher_layers(2, [0, 1])
    with pytest.raises(ValueError, match="do not leave a block"):
        teacher_layers(2, [5])


def _block_pruned_pair():
    """A 4-block ViT pruned to 0.45 with one whole block removed, and its PruneResult."""
    torch.manual_seed(0)
    teacher = ViTForImageClassification(tiny_config(num_hidden_layers=4)).eval()
    gen = torch.Generator().manual_seed(1)
    train = [torch.randn(64, 3, 16, 16, generator=gen) for _ in range(2)]
    held = [torch.randn(32, 3, 16, 16, generator=gen)]
    student = copy.deepcopy(teacher)
    _, res = prune_2ssp(student, 0.45, train[:1], PruneConfig(min_remaining=8, split=1, align=1,
                                                              unit="block"))
    return teacher, student, train, held, res


def test_layer_matching_learns_every_kept_blocks_teacher_state():
    """match="layers": each kept block's output moves towards the teacher block the map names,
    the output too; the map comes from the PruneResult; cached and on-the-fly teacher agree."""
    teacher, student, train, held, res = _block_pruned_pair()
    layers = pruned_layers(res)
    assert len(res.depth_order) == 1 and layers == teacher_layers(4, res.depth_order) and len(layers) == 3
    with block_outputs(teacher) as t_out:
        ref = collect_outputs(teacher, held)
    with block_outputs(student) as s_out:
        kl0 = kl_divergence(collect_outputs(student, held), ref)
    gap0 = [1 - mean_cosine(s_out[i].flatten(0, 1), t_out[j].flatten(0, 1)) for i, j in enumerate(layers)]
    twin = copy.deepcopy(student)
    res1 = distill(student, teacher, train, steps=60, lr=1e-3, batch_size=32, train="blocks",
                   match="layers", layers=layers)
    with block_outputs(student) as s_out:
        kl1 = kl_divergence(collect_outputs(student, held), ref)
    gap1 = [1 - mean_cosine(s_out[i].flatten(0, 1), t_out[j].flatten(0, 1)) for i, j in enumerate(layers)]
    assert kl1 < 0.5 * kl0, (kl0, kl1)
    # the blocks pruning disturbed most come closest; one already ~1e-4 away may move a little
    assert sum(gap1) < 0.5 * sum(gap0) and max(gap1) < max(gap0), (gap0, gap1)
    assert res1.match == "layers" and res1.layers == layers and res1.teacher_cached
    res2 = distill(twin, teacher, train, steps=60, lr=1e-3, batch_size=32, train="blocks",
                   match="layers", layers=layers, cache_limit=0)  # teacher at every step
    assert not res2.teacher_cached
    assert res2.losses == pytest.approx(res1.losses, rel=2e-2)  # half-precision cache vs fp32


def test_layer_matching_needs_a_map_that_fits():
    teacher, student, train, _, _ = _block_pruned_pair()
    with pytest.raises(ValueError, match="pass layers=pruned_layers"):
        distill(student, teacher, train, steps=1, match="layers")
    with pytest.raises(ValueError, match="names 2 teacher blocks for 3 student blocks"):
        distill(student, teacher, train, steps=1, match="layers", layers=[2, 3])
    with pytest.raises(ValueError, match="name a block the teacher"):
        distill(student, teacher, train, steps=1, match="layers", layers=[0, 2, 7])


def test_text_encoder_layer_matching_masks_padding():
    teacher, ids, batch, held = _bert_data(padding=True)
    student = copy.deepcopy(teacher)
    _, res = prune_2ssp(student, 0.3, [ids[:32]], PruneConfig(min_remaining=8, split=1, align=1,
                                                              unit="block"))
    cached = teacher_outputs(teacher, [batch], match="layers", layers=pruned_layers(res))[0]
    assert [tuple(t.shape) for t in cached] == [(96, 12, 32)] * 4  # output, then 3 kept blocks
    assert cached[1].dtype == torch.float16 and cached[0].dtype == torch.float32
    ref = teacher_outputs(teacher, [held])[0]
    cos0 = mean_cosine(teacher_outputs(student, [held])[0], ref)
    out = distill(student, teacher, [batch], steps=60, lr=1e-3, batch_size=32, train="blocks",
                  match="layers", layers=pruned_layers(res))
    cos1 = mean_cosine(teacher_outputs(student, [held])[0], ref)
    assert out.loss == "tokens" and 1 - cos1 < 0.5 * (1 - cos0), (cos0, cos1)
    s, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    m = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    s2, t2 = s.clone(), t.clone()
    s2[0, 3:], t2[0, 3:] = 9.0, -9.0  # what padded positions hold does not count
    assert torch.equal(layer_loss([s], [t], m), layer_loss([s2], [t2], m))
    assert not torch.equal(layer_loss([s], [t]), layer_loss([s2], [t2]))


def _run(tmp, *args, target="0.6"):
    return cli_run(tmp, "--model", "embedded", "--target", target, "--cifar-test-pct", "1",
                   "--eval-batches", "2", "--calib-size", "32", *args, dirs=("r", "a", "p"))


@pytest.mark.cli
def test_cli_distilled_stage_and_report(tmp_path):
    # heads off: the subject is distillation recovering what whole blocks took (with heads the
    # plan at 0.7 keeps the model so close that 100 steps have nothing left to learn)
    assert _run(tmp_path, "--distill-steps", "100", "--distill-size", "256", "--cifar-train-pct", "1",
                "--run-id", "d", "--heads", "off", target="0.7") == 0
    rep = json.loads((tmp_path / "r" / "report-d.json").read_text())
    st = {s["name"]: s for s in rep["stages"]}
    assert list(st) == ["baseline", "stage1", "stage2", "distilled"]
    assert st["distilled"]["params"] == st["stage2"]["params"]
    assert st["distilled"]["kl_to_baseline"] < st["stage2"]["kl_to_baseline"]
    d = rep["distillation"]
    assert d["steps"] == 100 and len(d["losses"]) == 100 and d["inputs"] == 256 and d["train"] == "blocks"
    assert d["match"] == "layers" and d["layers"] == teacher_layers(rep["model"]["num_blocks"], rep["plan"]["removed_indices"])
    assert 0 < d["kept_step"] <= 100 and d["heldout"]["0"] > d["heldout"][str(d["kept_step"])]
    md = (tmp_path / "r" / "report-d.md").read_text()
    assert "## Distillation" in md and f"- learned: layers; kept block i learns teacher block {d['layers']}[i]" in md


@pytest.mark.cli
def test_cli_layer_matching_uses_the_plans_block_map(tmp_path):
    assert _run(tmp_path, "--distill-steps", "60", "--distill-size", "256", "--cifar-train-pct", "1",
                "--distill-match", "layers", "--distill-train", "blocks", "--run-id", "l",
                "--heads", "off", target="0.7") == 0  # whole blocks removed: the map to test
    rep = json.loads((tmp_path / "r" / "report-l.json").read_text())
    st = {s["name"]: s for s in rep["stages"]}
    d = rep["distillation"]
    removed = rep["plan"]["removed_indices"]
    assert rep["depth_unit"] == "block" and removed
    assert d["match"] == "layers" and d["train"] == "blocks" and d["teacher_cached"]
    assert d["layers"] == teacher_layers(rep["model"]["num_blocks"], removed)
    assert st["distilled"]["kl_to_baseline"] < st["stage2"]["kl_to_baseline"]


@pytest.mark.parametrize("args,flag", [(["--distill-steps", "-1"], "--distill-steps"),
                                       (["--distill-steps", "5", "--distill-lr", "0"], "--distill-lr"),
                                       (["--distill-steps", "5", "--distill-batch-size", "0"], "--distill-batch-size"),
                                       (["--distill-steps", "5", "--distill-match", "tokens"], "--distill-match"),
                                       (["--distill-steps", "5", "--distill-augment", "-1"], "--distill-augment"),
                                       (["--distill-steps", "5", "--distill-augment", "4"], "--distill-augment")])
@pytest.mark.cli
def test_cli_bad_distillation_flags_exit_2(tmp_path, capsys, args, flag):
    assert _run(tmp_path, *args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err and not (tmp_path / "r").exists()


@pytest.mark.cli
def test_interrupted_distillation_writes_nothing(tmp_path, monkeypatch, capsys):
    import vit_pruning.distillation as d
    from vit_pruning.cli import console_main

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(d, "distill", interrupted)
    with pytest.raises(KeyboardInterrupt):  # main() lets it through (a test run stops on Ctrl-C)
        _run(tmp_path, "--distill-steps", "10", "--save-pruned-model", "--run-id", "x")
    assert not (tmp_path / "p").exists() and not (tmp_path / "r").exists()
    capsys.readouterr()
    argv = ["--model", "embedded", "--target", "0.6", "--cifar-test-pct", "1", "--eval-batches", "2",
            "--calib-size", "32", "--reports-dir", str(tmp_path / "r"), "--pruned-output-dir",
            str(tmp_path / "p"), "--artifacts-dir", str(tmp_path / "a"), "--quiet",
            "--latency-repeats", "2", "--latency-precision", "0", "--distill-steps", "10",
            "--save-pruned-model", "--run-id", "x"]
    assert console_main(argv) == 130  # the console script: one line, exit 130
    assert capsys.readouterr().err.strip().endswith("interrupted; nothing half-written was kept")
    assert not (tmp_path / "p").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize("steps", [1, 3, 20, 1000])
def test_schedule_warms_up_from_the_first_step_and_decays_to_zero(steps):
    """The first step already trains (1/warm of the rate, never 0: a zero-rate step still moves
    Adam's moments), the rate peaks after the warm-up and the last step's is the smallest."""
    warm = max(1, int(WARMUP * steps))
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warm, steps)
    rates = []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[0] == pytest.approx(1 / warm)
    assert max(rates) == pytest.approx(1.0)
    assert min(rates) > 0
    if steps > warm:
        assert rates[warm] == pytest.approx(1.0)
        assert rates[-1] == min(rates) < 0.01 + (steps <= 3)
        assert all(a >= b for a, b in zip(rates[warm:], rates[warm + 1:]))


def test_adamw_is_fused_on_the_cpu_and_keeps_plain_semantics():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    fused = adamw(ps, 1e-2)
    assert fused.defaults["fused"] is True and fused.defaults["weight_decay"] == 0.0
    plain = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ref = torch.optim.AdamW(plain, lr=1e-2, weight_decay=0.0)
    for _ in range(5):
        for group in (ps, plain):
            for p in group:
                p.grad = torch.ones_like(p) * p.detach().sum()
        fused.step()
        ref.step()
    for a, b in zip(ps, plain):
        torch.testing.assert_close(a, b)
