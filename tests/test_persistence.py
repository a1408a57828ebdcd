"""Saved pruned models load where they are deployed: plain transformers, remote code without
this package, model.save_pretrained, ONNX; bad folders are refused in one line; the seed's API."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, ViTForImageClassification, ViTImageProcessor

from conftest import cli_run, tiny_config, tiny_model
from vit_pruning import (PruneConfig, load_pruned_model, prune_2ssp, save_cifar_adapter,
                         save_pruned_model)
from vit_pruning.anatomy import resolve
from vit_pruning.cli import main
from vit_pruning.heads import AdapterHead, install_head, load_adapter

ONNX = all(__import__("importlib").util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))


def pruned_vit(unit="block", policy="uniform", align=4, target=0.3, adapter=False):
    torch.manual_seed(0)
    model = ViTForImageClassification(tiny_config()).eval()
    if adapter:
        install_head(model, AdapterHead(32, 5, bottleneck=8))
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    prune_2ssp(model, target, [x], PruneConfig(unit=unit, min_remaining=8, align=align,
                                               width_policy=policy, split=1))
    return model, x


LOADER = """
import sys
sys.path = [p for p in sys.path if p not in ("", {cwd!r}) and not p.endswith("src")]
sys.modules["vit_pruning"] = None  # any import of the package fails
import torch, transformers
try:
    import vit_pruning
    raise SystemExit("vit_pruning importable")
except ImportError:
    pass
for folder, auto, remote, kind in {jobs!r}:
    x = torch.load(folder + "/../inputs-" + folder.split("/")[-1] + ".pt")
    model = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=remote).eval()
    with torch.no_grad():
        out = model(pixel_values=x) if kind == "image" else model(input_ids=x)
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    torch.save(out, folder + "/../out-" + folder.split("/")[-1] + ".pt")
"""


def load_all_elsewhere(jobs: list[tuple[Path, str, bool, str, torch.Tensor]]) -> list[torch.Tensor]:
    """Load each (folder, Auto class, trust_remote_code, kind, inputs) in one fresh Python where
    vit_pruning cannot be imported; return each model's outputs on its inputs."""
    for folder, _, _, _, x in jobs:
        torch.save(x, folder.parent / f"inputs-{folder.name}.pt")
    code = LOADER.format(cwd=str(Path.cwd()), jobs=[(str(f), a, r, k) for f, a, r, k, _ in jobs])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=jobs[0][0].parent, env={**os.environ, "PYTHONPATH": ""})
    assert res.returncode == 0, res.stderr[-3000:]
    return [torch.load(f.parent / f"out-{f.name}.pt") for f, *_ in jobs]


def load_elsewhere(folder: Path, auto: str, remote: bool, inputs: torch.Tensor, kind: str = "image"):
    return load_all_elsewhere([(folder, auto, remote, kind, inputs)])[0]


def logits(model, x):
    with torch.no_grad():
        return model(pixel_values=x).logits


def test_uniform_aligned_plan_saves_a_plain_model(tmp_path):
    model, x = pruned_vit("block", "uniform", align=4)
    widths = {p.intermediate_size for p in resolve(model).parts}
    assert len(widths) == 1 and widths.pop() % 4 == 0
    assert type(model) is ViTForImageClassification
    saved = save_pruned_model(model, tmp_path / "m", ViTImageProcessor(size={"height": 16, "width": 16}))
    assert saved.format == "plain" and not (tmp_path / "m" / "modeling_vit_pruning.py").exists()
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "auto_map" not in cfg and cfg["num_hidden_layers"] == len(resolve(model).parts)
    out = load_elsewhere(tmp_path / "m", "AutoModelForImageClassification", False, x)
    assert (out - logits(model, x)).abs().max() < 1e-5


def test_plain_folder_runs_in_a_pipeline(tmp_path):
    from PIL import Image
    from transformers import pipeline
    model, _ = pruned_vit("block", "uniform", align=4)
    save_pruned_model(model, tmp_path / "m", ViTImageProcessor(size={"height": 16, "width": 16}))
    pipe = pipeline("image-classification", model=str(tmp_path / "m"))
    preds = pipe(Image.new("RGB", (20, 20), (120, 30, 200)))
    assert len(preds) == 5 and abs(sum(p["score"] for p in preds) - 1) < 1e-4


@pytest.mark.parametrize("unit,adapter", [("attention", False), ("block", True)])
def test_other_structures_load_with_their_own_modeling_file(tmp_path, unit, adapter):
    model, x = pruned_vit(unit, "per-block", align=1, target=0.33, adapter=adapter)
    saved = save_pruned_model(model, tmp_path / "m")
    assert saved.format == "remote-code" and (tmp_path / "m" / "modeling_vit_pruning.py").exists()
    out = load_elsewhere(tmp_path / "m", "AutoModelForImageClassification", True, x)
    assert (out - logits(model, x)).abs().max() < 1e-5
    back = load_pruned_model(tmp_path / "m")  # and through the package, without remote code
    assert torch.equal(logits(back, x), logits(model, x))


@pytest.mark.parametrize("unit", ["block", "attention"])
def test_model_save_pretrained_after_pruning_reloads(tmp_path, unit):
    model, x = pruned_vit(unit, "per-block" if unit == "attention" else "uniform", align=1 if unit == "attention" else 4)
    model.save_pretrained(tmp_path / "m")  # the seed notebook's advice
    out = load_elsewhere(tmp_path / "m", "AutoModelForImageClassification", True, x)
    assert (out - logits(model, x)).abs().max() < 1e-5


def test_bert_with_attention_removed_loads_with_automodel(tmp_path):
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=40), add_pooling_layer=False).eval()
    ids = torch.randint(1, 99, (6, 12), generator=torch.Generator().manual_seed(2))
    prune_2ssp(model, 0.2, [ids], PruneConfig(unit="attention", min_remaining=8, split=1, align=1,
                                              width_policy="per-block"))
    save_pruned_model(model, tmp_path / "m")
    out = load_elsewhere(tmp_path / "m", "AutoModel", True, ids, kind="text")
    with torch.no_grad():
        assert (out - model(input_ids=ids).last_hidden_state).abs().max() < 1e-5


@pytest.mark.skipif(not ONNX, reason="onnx/onnxscript/onnxruntime not installed (pip install 'vit-2ssp[export]')")
@pytest.mark.parametrize("unit", ["block", "attention"])
def test_onnx_export_matches_torch(tmp_path, unit):
    from vit_pruning import export_onnx
    model, _ = pruned_vit(unit, "per-block", align=1, adapter=unit == "block")
    rec = export_onnx(model, tmp_path / "model.onnx")
    assert rec["max_abs_diff"] < 1e-4 and rec["check_batch"] != 2
    with pytest.raises(FileExistsError):
        export_onnx(model, tmp_path / "model.onnx")


# ---- bad folders: exit 2, one line, nothing written; the library raises ValueError

def _saved(tmp_path) -> Path:
    model, _ = pruned_vit("block", "uniform", align=4)
    return save_pruned_model(model, tmp_path / "m", ViTImageProcessor(size={"height": 16, "width": 16})).path


def _truncate(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _wrong_width(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] += 4
    cfg["vit_pruning"]["intermediate_sizes"] = [w + 4 for w in cfg["vit_pruning"]["intermediate_sizes"]]
    (folder / "config.json").write_text(json.dumps(cfg))


def _missing(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def _lora(folder: Path) -> None:
    """What peft's save_pretrained writes: the adapter, no config.json."""
    (folder / "config.json").unlink()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": "google/vit-base-patch16-224", "r": 8}))


def _old_sentence_layout(folder: Path) -> None:
    """sentence-transformers before 1.0 kept the encoder in 0_Transformer/ (or 0_BERT/)."""
    (folder / "0_Transformer").mkdir()
    (folder / "config.json").rename(folder / "0_Transformer" / "config.json")
    (folder / "modules.json").write_text(json.dumps(
        [{"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.BERT"},
         {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))


def _other_arch(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["Swinv2ForImageClassification"]
    (folder / "config.json").write_text(json.dumps(cfg))


def _mismatched_arch(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["BeitForImageClassification"]  # supported, but this is a ViT config
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("spoil,message", [
    (_truncate, "model.safetensors is truncated or unreadable"),
    (_wrong_width, "config says block 0 has MLP width"),
    (_missing, "no model.safetensors"),
    (_lora, "it holds a PEFT adapter (LORA weights for google/vit-base-patch16-224), not a model: "
            "merge it into its base first"),
    (_old_sentence_layout, "it is a sentence-transformers folder of the old layout, its encoder "
                           "in 0_Transformer/: pass --model "),
    (_other_arch, "architecture 'Swinv2ForImageClassification' is not one vit_pruning saves"),
    (_mismatched_arch, "architecture 'BeitForImageClassification' does not match model_type 'vit'"),
])
@pytest.mark.cli
def test_bad_saved_folders_exit_2_in_one_line(tmp_path, capsys, spoil, message):
    folder = _saved(tmp_path)
    spoil(folder)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_pruned_model(folder)
    code = main(["--model", str(folder), "--target", "0.1", "--reports-dir", str(tmp_path / "r"),
                 "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err and str(folder) in err
    assert not (tmp_path / "r").exists()


# ---- the seed's API, whole

def test_seed_notebook_snippet_runs_as_written(tmp_path):
    torch.manual_seed(0)
    base_model = ViTForImageClassification(tiny_config(intermediate_size=96)).eval()
    gen = torch.Generator().manual_seed(3)
    test_loader = [{"pixel_values": torch.randn(4, 3, 16, 16, generator=gen), "labels": torch.randint(0, 5, (4,), generator=gen)}
                   for _ in range(3)]
    device = "cpu"
    from src.vit_pruning import (plan_2ssp_allocation, prune_vit_mlp_width, prune_vit_attention_blocks,  # noqa: F401
                                 count_total_params, save_report, compute_actual_sparsity, _get_encoder)
    before = count_total_params(base_model)
    TARGET_SPARSITY = 0.143
    plan = plan_2ssp_allocation(base_model, TARGET_SPARSITY, min_remaining=16)
    B = len(_get_encoder(base_model).layer)
    base_model = prune_vit_mlp_width(base_model, n_to_prune_per_block=[plan.per_block_neurons_to_prune] * B, min_remaining=16)
    depth_fraction = plan.blocks_to_prune / max(1, B)
    result = prune_vit_attention_blocks(base_model, sparsity=depth_fraction, dataloader=test_loader, device=device, batch_limit=5)
    base_model = result["model"]
    sparsity = compute_actual_sparsity(before, count_total_params(base_model))
    assert abs(sparsity - TARGET_SPARSITY) < 0.02
    json_path, md_path = save_report({"target": TARGET_SPARSITY, "achieved": sparsity, "plan": plan.to_dict()},
                                     tmp_path / "reports", run_id="nb")
    assert json.loads(json_path.read_text())["achieved"] == sparsity and "## plan" in md_path.read_text()
    with pytest.raises(FileExistsError):
        save_report({"x": 1}, tmp_path / "reports", run_id="nb")
    base_model.save_pretrained(tmp_path / "nb_model")  # the notebook's way of keeping it
    back = load_pruned_model(tmp_path / "nb_model")
    x = test_loader[0]["pixel_values"]
    assert torch.equal(logits(back, x), logits(base_model, x))


def test_save_cifar_adapter_round_trip(tmp_path):
    model, x = pruned_vit("block", "uniform", align=4, adapter=True)
    path = save_cifar_adapter(model, run_id="r", artifacts_dir=tmp_path, metadata={"model": "tiny"})
    assert path == tmp_path / "r" / "adapter.pt"
    payload = torch.load(path, weights_only=True)
    assert payload["classifier_type"] == "adapter" and payload["num_labels"] == 5 and payload["hidden_size"] == 32
    assert payload["label_names"] == [model.config.id2label[i] for i in range(5)]
    fresh = ViTForImageClassification(tiny_config())
    load_adapter(fresh, path, num_labels=5, label_names=list("edcba"))
    assert torch.equal(fresh.classifier.down.weight, model.classifier.down.weight)
    assert fresh.config.id2label == model.config.id2label  # the names it was trained on
    with pytest.raises(FileExistsError):
        save_cifar_adapter(model, path)


# ---- every family and structure the tool produces loads outside the package (one subprocess)

def _family(name: str):
    """(model, inputs, kind, Auto class) for a tiny random model of each supported class."""
    from transformers import (DeiTConfig, DeiTForImageClassification, DeiTModel, RobertaConfig,
                              RobertaModel, ViTModel)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    vit = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
               image_size=16, patch_size=4)
    text = dict(vocab_size=99, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=40)
    pixels = torch.randn(12, 3, 16, 16, generator=gen)
    ids = torch.randint(3, 99, (12, 10), generator=gen)
    return {
        "vit-cls": (ViTForImageClassification(tiny_config()), pixels, "image", "AutoModelForImageClassification"),
        "vit": (ViTModel(tiny_config()), pixels, "image", "AutoModel"),
        "deit-cls": (DeiTForImageClassification(DeiTConfig(**vit, num_labels=5)), pixels, "image",
                     "AutoModelForImageClassification"),
        "deit": (DeiTModel(DeiTConfig(**vit)), pixels, "image", "AutoModel"),
        "bert": (BertModel(BertConfig(**text), add_pooling_layer=False), ids, "text", "AutoModel"),
        "roberta": (RobertaModel(RobertaConfig(**text, pad_token_id=1), add_pooling_layer=False), ids,
                    "text", "AutoModel"),
    }[name]


STRUCTURES = {  # name -> (PruneConfig options, adapter head, expected format)
    "plain": (dict(unit="block", align=4, width_policy="uniform"), False, "plain"),
    "attention": (dict(unit="attention", align=1, width_policy="per-block"), False, "remote-code"),
    "adapter": (dict(unit="block", align=4, width_policy="uniform"), True, "remote-code"),
}
CASES = [(f, s) for f in ("vit-cls", "vit", "deit-cls", "deit", "bert", "roberta") for s in STRUCTURES
         if s != "adapter" or f.endswith("-cls")]


def _out(model, x, kind):
    with torch.no_grad():
        out = model(pixel_values=x) if kind == "image" else model(input_ids=x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_every_family_and_structure_reloads_outside_the_package(tmp_path):
    jobs, expected, models = [], [], {}
    for fam, struct in CASES:
        model, x, kind, auto = _family(fam)
        opts, adapter, fmt = STRUCTURES[struct]
        if adapter:
            install_head(model.eval(), AdapterHead(32, 5, bottleneck=8))
        prune_2ssp(model.eval(), 0.25, [x], PruneConfig(min_remaining=8, split=1, **opts))
        saved = save_pruned_model(model, tmp_path / f"{fam}-{struct}")
        assert saved.format == fmt, (fam, struct)
        jobs.append((saved.path, auto, fmt == "remote-code", kind, x))
        expected.append(_out(model, x, kind))
        models[(fam, struct)] = (model, x, kind)
        back = load_pruned_model(saved.path)  # and through the package
        assert torch.equal(_out(back, x, kind), expected[-1]), (fam, struct)
    for (fam, struct), got, want in zip(CASES, load_all_elsewhere(jobs), expected):
        assert (got - want).abs().max() < 1e-5, (fam, struct)
    if ONNX:
        from vit_pruning import export_onnx
        for (fam, struct), (model, _, _) in models.items():
            rec = export_onnx(model, tmp_path / f"{fam}-{struct}.onnx")
            assert rec["max_abs_diff"] < 1e-4, (fam, struct, rec)


def test_loading_names_a_missing_folder_or_a_file(tmp_path):
    """A missing path is "no such folder" and a file is named as one (both used to read "no
    config.json"); saving never goes over an existing path, and says so without CLI flags."""
    with pytest.raises(ValueError, match=r"nope: no such folder$"):
        load_pruned_model(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"config.json is a file; give the saved model's folder"):
        load_pruned_model(tmp_path / "config.json")
    with pytest.raises(FileExistsError, match=r"already exists; save into a new folder \(never over "
                                              r"an existing one\)"):
        save_pruned_model(tiny_model(), tmp_path)


@pytest.mark.parametrize("heads", ["off", 1])
def test_a_model_pruned_in_bf16_reloads_in_bf16_with_its_logits(tmp_path, heads):
    """load_pruned_model built every model in float32: a bf16 model came back twice its size,
    with other logits (0.016 on the embedded ViT), where from_pretrained keeps bf16."""
    model = tiny_model(4).to(torch.bfloat16)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    pruned, _ = prune_2ssp(model, 0.3, [x], PruneConfig(min_remaining=8, heads=heads))
    save_pruned_model(pruned, tmp_path / "m")
    back = load_pruned_model(tmp_path / "m")
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    assert torch.equal(logits(back, x), logits(pruned, x))
    wide = load_pruned_model(tmp_path / "m", dtype=torch.float32)
    assert {p.dtype for p in wide.parameters()} == {torch.float32}


def _auto_dtype() -> dict:
    """from_pretrained's argument that loads weights in the dtype the folder says (4.56 renamed
    torch_dtype to dtype)."""
    from vit_pruning.persistence import float32_weights
    return {next(iter(float32_weights())): "auto"}


def test_a_model_saved_in_another_dtype_says_so_in_its_config(tmp_path):
    """save_pruned_model(dtype=...) casts every floating weight, and the config names the saved
    weights' dtype (as save_pretrained does), whatever it said before: from_pretrained(dtype=
    "auto") and load_pruned_model load them in it."""
    from safetensors import safe_open

    from vit_pruning.persistence import config_dtype
    model, x = pruned_vit(unit="attention")
    for name in ("torch_dtype", "dtype"):  # what 4.46 leaves on a bf16 checkpoint loaded in float32
        setattr(model.config, name, torch.bfloat16)
    save_pruned_model(model, tmp_path / "wide")
    assert config_dtype(load_pruned_model(tmp_path / "wide").config) == torch.float32
    plain, _ = pruned_vit(align=8)
    save_pruned_model(plain, tmp_path / "half", dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "half" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    back = load_pruned_model(tmp_path / "half")
    assert config_dtype(back.config) == torch.bfloat16
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    half = x.to(torch.bfloat16)
    assert torch.equal(logits(back, half), logits(plain.to(torch.bfloat16), half))
    stock = ViTForImageClassification.from_pretrained(  # the attention kernel it was saved with
        tmp_path / "half", attn_implementation=back.config._attn_implementation, **_auto_dtype())
    assert stock.dtype == torch.bfloat16 and torch.equal(logits(stock, half), logits(back, half))
    with pytest.raises(ValueError, match="floating dtype"):
        save_pruned_model(plain, tmp_path / "int", dtype=torch.int8)


@pytest.mark.cli
def test_a_bf16_checkpoint_is_pruned_in_float32_and_saved_in_bf16(tmp_path):
    """transformers 5.x loads a checkpoint in the dtype it stores (4.x in float32): a bf16
    checkpoint was pruned, measured and timed in bf16 there, under a report saying float32.
    Now every version prunes in float32 (the same numbers as the float32 copy of the same
    weights) and saves the pruned model in the checkpoint's dtype, or --save-dtype's."""
    from vit_pruning.config import EMBEDDED
    from vit_pruning.persistence import config_dtype
    model = ViTForImageClassification.from_pretrained(EMBEDDED)
    for dtype in (torch.bfloat16, torch.float32):  # the same weights, stored two ways
        model.to(torch.bfloat16).to(dtype).save_pretrained(tmp_path / str(dtype)[6:])
        ViTImageProcessor.from_pretrained(EMBEDDED).save_pretrained(tmp_path / str(dtype)[6:])
    reports = {}
    for name, extra in (("bfloat16", []), ("float32", ["--save-dtype", "float16"])):
        out = tmp_path / f"run-{name}"
        assert cli_run(out, "--model", str(tmp_path / name), "--dataset", "digits", "--target",
                       "0.3", "--cifar-test-pct", "0.3", "--eval-batches", "2", "--run-id", "r",
                       "--save-pruned-model", *extra) == 0
        reports[name] = json.loads((out / "reports" / "report-r.json").read_text())
        saved = load_pruned_model(out / "pruned" / "r")
        assert reports[name]["artifacts"]["pruned_model_dtype"] == (extra[-1] if extra else name)
        assert {p.dtype for p in saved.parameters()} == {config_dtype(saved.config)}
    assert str(config_dtype(saved.config)) == "torch.float16"
    a, b = reports["bfloat16"], reports["float32"]
    assert a["plan"] == b["plan"]
    assert [(s["params"], s["top1"], s["kl_to_baseline"]) for s in a["stages"]] == \
        [(s["params"], s["top1"], s["kl_to_baseline"]) for s in b["stages"]]
    assert a["latency_setup"]["dtype"] == "float32"
