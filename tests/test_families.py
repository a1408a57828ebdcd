"""Every supported vision family on tiny random configs, in whichever transformers major runs
the tests: (a) plans land within one neuron of the target, (b) removing dead neurons changes
nothing, (c) removing a block and an attention sublayer matches a hand-written reference
forward, (d) saved models reload with identical outputs, (e) the CLI runs end to end on a saved
folder (and --dry-run); plus the explicit class table and layer scale."""
import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from torch import nn

from vit_pruning import PruneConfig, load_pruned_model, prune_2ssp, save_pruned_model
from vit_pruning.anatomy import SUPPORTED_CLASSES, resolve
from vit_pruning.cli import main
from vit_pruning.measure import count_total_params, forward_output
from vit_pruning.surgery import is_plain, prune_mlp_neurons, remove_attention, remove_blocks

V = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
         image_size=16, patch_size=4)
DINO = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=2,
            image_size=16, patch_size=4, layerscale_value=0.5)
SWIN = dict(image_size=16, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
            window_size=4)
TXT = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
           vocab_size=99, max_position_embeddings=16)

# name -> (model class, config); layer scales are not 1 and relative position biases are on,
# so the tests see what makes each family different
FAMILIES = {
    "dinov2": ("Dinov2Model", lambda: tf.Dinov2Config(**DINO)),
    "dinov2-swiglu": ("Dinov2ForImageClassification",
                      lambda: tf.Dinov2Config(**DINO, use_swiglu_ffn=True, num_labels=5)),
    "beit": ("BeitForImageClassification",
             lambda: tf.BeitConfig(**V, use_relative_position_bias=True, layer_scale_init_value=0.5,
                                   use_mean_pooling=True, num_labels=5)),
    "beit-shared-bias": ("BeitModel", lambda: tf.BeitConfig(
        **V, use_shared_relative_position_bias=True, layer_scale_init_value=0.5)),
    "data2vec-vision": ("Data2VecVisionForImageClassification", lambda: tf.Data2VecVisionConfig(
        **V, use_relative_position_bias=True, layer_scale_init_value=0.5, num_labels=5)),
    "clip-vision": ("CLIPVisionModel", lambda: tf.CLIPVisionConfig(**V)),
    "clip": ("CLIPModel", lambda: tf.CLIPConfig(vision_config=V, text_config=TXT, projection_dim=8)),
    "clip-cls": ("CLIPForImageClassification",
                 lambda: tf.CLIPConfig(vision_config=V, text_config=TXT, num_labels=5)),
    "siglip-vision": ("SiglipVisionModel", lambda: tf.SiglipVisionConfig(**V)),
    "siglip": ("SiglipModel", lambda: tf.SiglipConfig(vision_config=V, text_config=TXT)),
    "siglip-cls": ("SiglipForImageClassification",
                   lambda: tf.SiglipConfig(vision_config=V, text_config=TXT, num_labels=5)),
    "vitmae": ("ViTMAEModel", lambda: tf.ViTMAEConfig(**V, mask_ratio=0.0)),
    "deit-distilled": ("DeiTForImageClassificationWithTeacher",
                       lambda: tf.DeiTConfig(**V, num_labels=10)),  # the test data's classes
    # two stages (8x8 then 4x4 tokens), windows of 4: stage 0 shifts every second block
    "swin": ("SwinForImageClassification", lambda: tf.SwinConfig(**SWIN, num_labels=5)),
    "swin-headless": ("SwinModel", lambda: tf.SwinConfig(**SWIN)),
}


def build(name: str, seed: int = 0) -> nn.Module:
    cls, cfg = FAMILIES[name]
    torch.manual_seed(seed)
    model = getattr(tf, cls)(cfg()).eval()
    with torch.no_grad():  # random init leaves layer scales and biases at constants: vary them
        for n, p in model.named_parameters():
            if "lambda" in n or "relative_position_bias_table" in n:
                p.mul_(1 + 0.5 * torch.rand_like(p)).add_(0.01 * torch.randn_like(p))
    return model


def images(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return forward_output(model, x)


@pytest.mark.parametrize("name", FAMILIES)
def test_segmented_forward_is_the_models_own(name):
    model, x = build(name), images(4)
    an = resolve(model)
    with torch.no_grad():
        seg = an.head(an.run_blocks(an.embed(x)))
    torch.testing.assert_close(seg, out(model, x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("target", [0.1, 0.3, 0.5])
def test_plan_lands_within_one_neuron(name, target):
    model, x = build(name), images(16)
    before = count_total_params(model)
    _, res = prune_2ssp(model, target, [x], PruneConfig(align=1, min_remaining=4))
    per_neuron = resolve(model).parts[0].neuron_params
    assert abs(before - count_total_params(model) - target * before) <= per_neuron
    assert res.params_after_stage2 == count_total_params(model)
    assert out(model, x).isfinite().all()


def _kill(model: nn.Module, dead: dict[int, list[int]]) -> None:
    """Neurons that add nothing: their fc2 columns are zero."""
    an = resolve(model)
    with torch.no_grad():
        for b, idx in dead.items():
            an.parts[b].fc2.weight[:, idx] = 0.0


@pytest.mark.parametrize("name", FAMILIES)
def test_removing_dead_neurons_changes_nothing(name):
    model, x = build(name), images(4)
    dead = {0: [1, 5, 9], 2: [0, 3]}
    _kill(model, dead)
    ref = out(model, x)
    before = count_total_params(model)
    an = resolve(model)
    for b, idx in dead.items():
        width = an.parts[b].intermediate_size
        prune_mlp_neurons(an.parts[b], torch.tensor([j for j in range(width) if j not in idx]))
    assert count_total_params(model) == before - sum(len(idx) * an.parts[b].neuron_params
                                                     for b, idx in dead.items())
    torch.testing.assert_close(out(model, x), ref, rtol=0, atol=1e-5)


def _mlp_by_hand(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP sublayer of a pre-norm block written out: LN, the MLP kind, the layer scale."""
    norm = next(getattr(block, n) for n in ("layernorm_after", "norm2", "layer_norm2") if hasattr(block, n))
    mlp, h = getattr(block, "mlp", None), norm(x)
    if hasattr(mlp, "gate_proj"):
        y = mlp.down_proj(nn.functional.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
    elif hasattr(mlp, "weights_in"):
        g, u = mlp.weights_in(h).chunk(2, dim=-1)
        y = mlp.weights_out(nn.functional.silu(g) * u)
    elif hasattr(mlp, "fc1"):
        act = next(getattr(mlp, a) for a in ("activation_fn", "activation", "act_fn") if hasattr(mlp, a))
        y = mlp.fc2(act(mlp.fc1(h)))
    else:
        y = block.output.dense(block.intermediate.intermediate_act_fn(block.intermediate.dense(h)))
    if hasattr(block, "layer_scale2"):
        y = y * block.layer_scale2.lambda1
    elif isinstance(getattr(block, "lambda_2", None), torch.Tensor):
        y = y * block.lambda_2
    return x + y


def _hooked_reference(model: nn.Module, x: torch.Tensor, drop: int, no_attention: int) -> torch.Tensor:
    """The unpruned model's own forward with block `drop` made an identity and block
    `no_attention` replaced by its MLP sublayer alone, by forward hooks."""
    blocks = resolve(model).blocks

    def replace(fn):
        def hook(_m, args, kwargs, output):
            h = args[0] if args else kwargs["hidden_states"]
            new = fn(h)
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook
    handles = [blocks[drop].register_forward_hook(replace(lambda h: h), with_kwargs=True),
               blocks[no_attention].register_forward_hook(
                   replace(lambda h: _mlp_by_hand(blocks[no_attention], h)), with_kwargs=True)]
    try:
        return out(model, x)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("name", FAMILIES)
def test_block_and_attention_removal_match_a_hand_written_forward(name):
    model, x = build(name), images(4)
    ref = _hooked_reference(model, x, drop=1, no_attention=2)
    an = resolve(model)
    freed = an.parts[2].attention_params + sum(p.numel() for p in an.parts[1].block.parameters())
    before = count_total_params(model)
    remove_attention(model, [2])
    remove_blocks(model, [1])
    assert count_total_params(model) == before - freed
    assert resolve(model).parts[1].attention_removed and len(resolve(model).parts) == 3
    torch.testing.assert_close(out(model, x), ref, rtol=0, atol=1e-5)
    # layer scale, LayerNorm and relative position bias of the removed sublayer are gone too
    names = [n for n, _ in resolve(model).parts[1].block.named_parameters()]
    assert not [n for n in names if "lambda_1" in n or "layer_scale1" in n or "relative_position" in n
                or n.startswith(("norm1", "layernorm_before", "layer_norm1"))]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("unit", ["block", "attention"])
def test_saved_model_reloads_identically(name, unit, tmp_path):
    model, x = build(name), images(16)
    prune_2ssp(model, 0.3, [x], PruneConfig(unit=unit, align=1, min_remaining=4, split=1,
                                            width_policy="per-block"))
    ref = out(model, x)
    saved = save_pruned_model(model, tmp_path / "m")
    assert saved.format == ("plain" if is_plain(resolve(model)) else "remote-code")
    assert unit == "block" or saved.format == "remote-code"
    again = load_pruned_model(tmp_path / "m")
    assert torch.equal(out(again, x), ref)
    assert count_total_params(again) == count_total_params(model)
    auto = getattr(tf, FAMILIES[name][0]).__name__
    remote = (tf.AutoModelForImageClassification if "ForImage" in auto else tf.AutoModel
              ).from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    # from_pretrained may pick another attention kernel (sdpa / eager): equal to the last bits
    torch.testing.assert_close(out(remote, x), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["beit", "data2vec-vision", "clip", "clip-vision", "vitmae"])
def test_uniform_width_saves_plain(name, tmp_path):
    model, x = build(name), images(16)
    prune_2ssp(model, 0.25, [x], PruneConfig(align=8, min_remaining=8, split=1,
                                             width_policy="uniform"))
    ref = out(model, x)
    saved = save_pruned_model(model, tmp_path / "m")
    assert saved.format == "plain"
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "auto_map" not in cfg
    plain = getattr(tf, FAMILIES[name][0]).from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(out(plain, x), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,removed,plain", [
    ("dinov2", 32, True),  # width 32 = mlp_ratio 1
    ("dinov2", 24, False),  # width 40: no ratio says it (an int in transformers 5.x)
    ("siglip-vision", 16, False),  # the pooling head keeps intermediate_size for itself
])
def test_plain_only_where_the_config_can_state_the_width(name, removed, plain, tmp_path):
    from vit_pruning import prune_vit_mlp_width
    model, x = build(name), images(4)
    prune_vit_mlp_width(model, [removed] * 4, min_remaining=8)
    ref = out(model, x)
    saved = save_pruned_model(model, tmp_path / "m")
    if int(tf.__version__.split(".")[0]) >= 5 or name != "dinov2":
        assert (saved.format == "plain") == plain
    again = (getattr(tf, FAMILIES[name][0]).from_pretrained(tmp_path / "m") if saved.format == "plain"
             else load_pruned_model(tmp_path / "m"))
    torch.testing.assert_close(out(again.eval(), x), ref, rtol=0, atol=1e-6)


def test_clip_text_tower_is_untouched():
    model, x = build("clip"), images(16)
    text = {k: v.clone() for k, v in model.text_model.state_dict().items()}
    tower = sum(p.numel() for p in model.vision_model.parameters()) + model.visual_projection.weight.numel()
    assert count_total_params(model) == tower  # sparsity is of the image path
    prune_2ssp(model, 0.3, [x], PruneConfig(align=1, min_remaining=4, split=1))
    assert all(torch.equal(v, model.text_model.state_dict()[k]) for k, v in text.items())
    ids = torch.randint(0, 99, (2, 5))
    with torch.no_grad():  # the whole dual model still runs (image-text logits)
        assert model(input_ids=ids, pixel_values=x[:2]).logits_per_image.shape == (2, 2)


@pytest.mark.parametrize("name", ["dinov2", "beit"])
def test_refit_is_not_hurt_by_small_layer_scale(name):
    """The refit fits what the scaled MLP adds to the stream: with layer scale 0.1 it keeps at
    least the fidelity it keeps with 1.0 (same weights otherwise)."""
    x = images(64, seed=2)
    held = images(32, seed=3)
    cos = {}
    for scale in (1.0, 0.1):
        model = build(name)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lambda" in n:
                    p.fill_(scale)
        ref = out(model, held)
        prune_2ssp(model, 0.2, [x], PruneConfig(align=1, min_remaining=4, split=0))
        cos[scale] = float(nn.functional.cosine_similarity(
            out(model, held).flatten(1), ref.flatten(1)).mean())
    assert cos[0.1] >= cos[1.0] - 1e-4, cos


def test_unknown_classes_are_refused_by_name():
    for cls, cfg in [("Swinv2Model", tf.Swinv2Config(image_size=32, patch_size=4, embed_dim=16,
                                                     depths=[1, 1], num_heads=[2, 2], window_size=2)),
                     ("ViTMAEForPreTraining", tf.ViTMAEConfig(**V)),
                     ("BeitForMaskedImageModeling", tf.BeitConfig(**V)),
                     ("Dinov2Backbone", tf.Dinov2Config(**DINO))]:
        model = getattr(tf, cls)(cfg)
        with pytest.raises(ValueError, match=f"unsupported model class {cls}: vit_pruning supports ViTModel"):
            resolve(model)
    assert len(SUPPORTED_CLASSES) == 22
    # one table (in the standalone modeling file): every supported class has its pruned twin
    from vit_pruning.modeling_vit_pruning import PRUNED_CLASSES
    assert list(PRUNED_CLASSES) == list(SUPPORTED_CLASSES)


def _folder(tmp: Path, name: str) -> Path:
    path = tmp / name
    build(name).save_pretrained(path)
    tf.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(path)
    return path


@pytest.mark.parametrize("name,head,cls", [
    ("swin", "--replace-classifier", None),
    ("dinov2-swiglu", "--replace-classifier", None),  # its head takes ([CLS], mean patch)
    ("beit", "--use-adapter", None),
    ("clip", "--replace-classifier", "CLIPForImageClassification"),  # a head asked of a dual model
    ("clip", None, None),  # headless: fidelity by the image embedding
    ("siglip-vision", None, None),
    ("vitmae", None, None),
    ("deit-distilled", "--do-finetune", None),  # two heads, both trained
])
@pytest.mark.cli
def test_cli_end_to_end_on_a_saved_folder(name, head, cls, tmp_path, cifar_like, capsys):
    folder = _folder(tmp_path, name)
    common = ["--model", str(folder), "--target", "0.3", "--reports-dir", str(tmp_path / "r"),
              "--dataset", str(cifar_like), "--cifar-train-pct", "1", "--cifar-test-pct", "1",
              "--batch-size", "8", "--eval-batches", "2", "--calib-size", "16", "--quiet",
              "--latency-repeats", "2", "--align", "1", "--min-remaining", "4",
              *([head] if head else [])]
    assert main([*common, "--dry-run"]) == 0
    assert "predicted parameters" in capsys.readouterr().out and not (tmp_path / "r").exists()
    assert main([*common, "--run-id", "x", "--save-pruned-model",
                 "--pruned-output-dir", str(tmp_path / "p")]) == 0
    rep = json.loads((tmp_path / "r" / "report-x.json").read_text())
    assert abs(rep["achieved_sparsity"] - 0.3) <= rep["one_neuron_sparsity"]
    assert rep["model"]["class"] == (cls or FAMILIES[name][0])
    again = load_pruned_model(tmp_path / "p" / "x")
    assert count_total_params(again) == rep["params_final"]


@pytest.mark.parametrize("drop,plain", [(1, True), (0, False)])
def test_swin_block_removal_keeps_window_shifts(drop, plain, tmp_path):
    """Stage 0 alternates unshifted / shifted windows. Removing its second block leaves the
    stock pattern (plain folder); removing its first leaves a shifted block first, which the
    stock class would rebuild unshifted: the folder then records each block's shift."""
    model, x = build("swin"), images(8)
    shifts = [int(b.shift_size) for b in resolve(model).blocks]
    assert shifts[:2] == [0, 2]
    remove_blocks(model, [drop])
    assert model.config.depths == [1, 2]
    assert int(resolve(model).blocks[0].shift_size) == shifts[1 - drop]
    ref = out(model, x)
    saved = save_pruned_model(model, tmp_path / "m")
    assert (saved.format == "plain") == plain
    again = (tf.SwinForImageClassification.from_pretrained(tmp_path / "m") if plain
             else load_pruned_model(tmp_path / "m"))
    torch.testing.assert_close(out(again.eval(), x), ref, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="cannot remove every block of stage 0"):
        remove_blocks(model, [0])


def test_swin_depth_selection_keeps_a_block_per_stage():
    from vit_pruning.depth import select_depth
    model, x = build("swin"), images(8)
    order, _ = select_depth(model, 3, "block", [x])
    stages = resolve(model).stage_of
    assert len(order) == 2 and {stages[i] for i in order} == {0, 1}  # one of each stage's two


ONNX = all(__import__("importlib").util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))


@pytest.mark.skipif(not ONNX, reason="the [export] extra (onnx, onnxscript, onnxruntime) is not installed")
@pytest.mark.parametrize("name", ["dinov2-swiglu", "beit", "clip", "siglip-vision", "vitmae", "swin"])
def test_pruned_family_exports_to_onnx(name, tmp_path):
    from vit_pruning.export import export_onnx
    model, x = build(name), images(16)
    prune_2ssp(model, 0.3, [x], PruneConfig(unit="attention", align=1, min_remaining=4, split=1))
    record = export_onnx(model, tmp_path / "m.onnx")
    assert record["max_abs_diff"] < 1e-4 and (tmp_path / "m.onnx").is_file()


def test_blocks_narrower_than_min_remaining_are_left_whole():
    """Swin's first stage (MLP 64 wide here) sits under min_remaining=80: it keeps its width, the
    wider stage is pruned, and the plan still lands within one neuron."""
    model, x = build("swin"), images(16)
    widths = [p.intermediate_size for p in resolve(model).parts]
    before = count_total_params(model)
    prune_2ssp(model, 0.1, [x], PruneConfig(align=1, min_remaining=80, split=0))
    after = [p.intermediate_size for p in resolve(model).parts]
    assert widths[:2] == after[:2] == [64, 64] and all(a < w for a, w in zip(after[2:], widths[2:]))
    assert abs(before - count_total_params(model) - 0.1 * before) <= resolve(model).parts[2].neuron_params


@pytest.mark.cli
def test_a_distilled_deit_is_pruned_with_its_two_heads(tmp_path, capsys):
    """facebook/deit-*-distilled-* are DeiTForImageClassificationWithTeacher: their logits are
    the mean of a [CLS] head and a distillation-token head. They were refused as unsupported;
    now they prune like any classifier, and a flag that replaces or saves one classifier exits 2
    before any work."""
    from vit_pruning.heads import finetune, head_parameters, install_head
    model = build("deit-distilled")
    assert len(head_parameters(model)) == 4  # two linear heads
    with pytest.raises(ValueError, match="has two heads"):
        install_head(model, nn.Linear(32, 3))
    before = {n: p.clone() for n, p in model.named_parameters()}
    finetune(model, [(images(8), torch.arange(8) % 5)], freeze_backbone=True, progress=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"cls_classifier.weight", "cls_classifier.bias",
                       "distillation_classifier.weight", "distillation_classifier.bias"}
    folder = _folder(tmp_path, "deit-distilled")
    for flag in ("--replace-classifier", "--use-adapter", "--save-adapter"):
        assert main(["--model", str(folder), "--target", "0.3", "--dry-run", flag,
                     "--dataset", "digits"]) == 2
        err = capsys.readouterr().err
        assert f"{flag}: DeiTForImageClassificationWithTeacher has two heads" in err
