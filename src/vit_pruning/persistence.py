"""Saving and reloading pruned models, and checking saved folders before loading them.

A saved folder is a normal Hugging Face folder (``config.json`` + ``model.safetensors`` + the
processor's files). Its weights use the 4.x names (``encoder.layer.N.intermediate.dense``),
which both transformers majors load (5.x renames them at load time). Two kinds:

- **plain**: every surviving block keeps one MLP width and its attention, with a linear head
  (or none). ``intermediate_size`` and ``num_hidden_layers`` describe the model, and
  ``AutoModel*.from_pretrained(folder)`` or ``pipeline(...)`` load it with neither this package
  nor remote code.
- **remote code**: per-block widths, removed attention sublayers or an adapter head. The folder
  also holds ``modeling_vit_pruning.py`` (torch + transformers only) and its config an
  ``auto_map``, so ``from_pretrained(folder, trust_remote_code=True)`` loads it anywhere.

Both carry a ``vit_pruning`` config entry (per-block ``intermediate_sizes``,
``attention_removed``, head); :func:`load_pruned_model` loads either without remote code.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from . import modeling_vit_pruning
from .atomic import current_umask, partial_prefix
from .anatomy import resolve
from .modeling_vit_pruning import (_TF_VERSION, PRUNED_CLASSES, PRUNED_CONFIGS, PRUNED_PREFIX,
                                   SUPPORTED)
from .surgery import is_plain, stock_class, sync_config

FORMAT_VERSION = 3  # 3: remote-code folders have model_type pruned_<type>
SUPPORTED_CLASSES = tuple(SUPPORTED)
MODELING_FILE = Path(modeling_vit_pruning.__file__).name


# transformers 4.x <-> 5.x names inside a ViT/DeiT backbone (everything else is the same)
_NAME_PAIRS = [  # (4.x, 5.x)
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
    (".intermediate.dense.", ".mlp.fc1."),
    (".output.dense.", ".mlp.fc2."),
]


def translate_keys(state: dict[str, torch.Tensor], to: str) -> dict[str, torch.Tensor]:
    """Rename a state dict's block parameters to the `to` layout ("v4" or "v5")."""
    if to not in ("v4", "v5"):
        raise ValueError(f"layout must be 'v4' or 'v5', got {to!r}")
    pairs = _NAME_PAIRS if to == "v5" else [(new, old) for old, new in _NAME_PAIRS]
    blocks = (r"\.encoder\.layer\.(\d+)\.", r".layers.\1.") if to == "v5" else \
        (r"\.layers\.(\d+)\.", r".encoder.layer.\1.")
    out = {}
    for key, value in state.items():
        new = re.sub(blocks[0], blocks[1], "." + key)
        for old_name, new_name in pairs:
            new = new.replace(old_name, new_name)
        out[new[1:]] = value
    return out


@dataclass(frozen=True)
class SavedModel:
    path: Path
    format: str  # "plain" or "remote-code"
    extra: dict | None = None  # what the `extra` writer returned (the ONNX export's record)

    def __fspath__(self) -> str:  # usable wherever the folder's path is
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)


def saved_state(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The state dict as saved: contiguous tensors (each floating one cast to `dtype` if given),
    ViT/DeiT block names in the 4.x layout (other families keep the names of the transformers
    that saved them)."""
    state = {k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point()
                 else v.detach()).contiguous() for k, v in model.state_dict().items()}
    return translate_keys(state, "v4") if resolve(model).layout == "v5" else state


def _dtype_fields(config) -> list[str]:
    """The config attributes naming its weights' dtype, the one this transformers reads first:
    `dtype` from 4.56 (which also reads an older `torch_dtype` as it), `torch_dtype` before (a
    config saved by a later version carries `dtype` beside it)."""
    return [name for name in ("torch_dtype", "dtype") if name in vars(config)] or ["torch_dtype"]


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as configs and reports write it ("bfloat16", not "torch.bfloat16")."""
    return str(dtype).removeprefix("torch.")


def config_dtype(config) -> torch.dtype:
    """The dtype a config says its checkpoint's weights are stored in; float32 where it names
    none (or no floating dtype)."""
    value = next((v for v in (vars(config).get(n) for n in _dtype_fields(config)) if v), None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


def float32_weights() -> dict:
    """from_pretrained's argument that loads every weight in float32, as transformers 4.x does
    by default; 5.x loads a checkpoint in the dtype it is stored in (a bf16 checkpoint would
    be pruned and measured in bf16 there, and in float32 on 4.x)."""
    return {"dtype" if _TF_VERSION >= (4, 56) else "torch_dtype": torch.float32}


def saved_config(model: nn.Module, metadata: dict | None = None,
                 dtype: torch.dtype | None = None):
    """The config as saved: plain, or with the pruned class, ``auto_map`` and format fields,
    naming the saved weights' dtype (`dtype`, else the model's) as save_pretrained does."""
    anatomy = resolve(model)
    sync_config(anatomy)
    stock = stock_class(model)
    cfg = copy.deepcopy(model.config)
    weights = dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()),
                            torch.float32)
    for name in _dtype_fields(cfg):
        setattr(cfg, name, dtype_name(weights))
    plain = is_plain(anatomy)
    cfg.vit_pruning = {**cfg.vit_pruning, "format": FORMAT_VERSION, "layout":
                       "v4" if anatomy.layout in ("v4", "v5") else anatomy.layout,
                       "saved_as": "plain" if plain else "remote-code",
                       "loader": "vit_pruning.load_pruned_model",
                       # the attention kernel the pruned model ran with (sdpa and eager differ in
                       # the last bits): load_pruned_model rebuilds it the same way
                       "attn_implementation": getattr(model.config, "_attn_implementation", None),
                       **({"metadata": metadata} if metadata else {})}
    if plain:
        cfg.architectures = [stock.__name__]
        if hasattr(cfg, "auto_map"):
            del cfg.auto_map
    else:
        pruned, autos = PRUNED_CLASSES[stock.__name__]
        cfg.architectures = [pruned.__name__]
        # its own model type (pruned_<type>, see sync_config) with its config class in this
        # file: plain from_pretrained refuses the folder instead of building the stock class
        cfg.auto_map = {a: f"{Path(MODELING_FILE).stem}.{c}" for a, c in
                        (("AutoConfig", type(cfg).__name__), *((a, pruned.__name__) for a in autos))}
    return cfg


def save_pruned_model(model: nn.Module, out_dir: str | Path, processor=None,
                      metadata: dict | None = None,
                      extra: Callable[[Path], dict | None] | None = None,
                      dtype: torch.dtype | None = None) -> SavedModel:
    """Save a (pruned) model into a new folder `out_dir` (plain or remote code, see the module
    docstring); refuses an existing path. `extra(folder)` may add files (the ONNX export)
    before the folder appears: it is written whole or not at all. `dtype`: every floating
    weight saved in it (default: each as the model holds it)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; save into a new folder (never over "
                              f"an existing one)")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    cfg = saved_config(model, metadata, dtype)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=partial_prefix(out_dir.name), dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700: readable like any folder the user makes
        cfg.save_pretrained(tmp)
        _save_weights(saved_state(model, dtype), tmp / "model.safetensors")
        if cfg.vit_pruning["saved_as"] == "remote-code":
            shutil.copyfile(modeling_vit_pruning.__file__, tmp / MODELING_FILE)
        if processor is not None:  # image processor or tokenizer: the folder stays usable
            processor.save_pretrained(tmp)
        record = extra(tmp) if extra is not None else None
        for f in tmp.rglob("*"):  # safetensors writes 0600: readable like any file the user makes
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~current_umask())
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SavedModel(out_dir, cfg.vit_pruning["saved_as"], record)


def _save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, its I/O failures (a full disk) raised as the OSError they are."""
    try:
        save_file(state, str(path), metadata={"format": "pt"})
    except Exception as exc:  # safetensors raises its own error type
        found = re.search(r"os error (\d+)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from exc


_MLP_IN = re.compile(r"(?:^|\.)(?:layers|encoder\.layer)\.(\d+)\.(?:mlp\.fc1|intermediate\.dense)\.weight$")
_BLOCK = re.compile(r"(?:^|\.)(?:layers|encoder\.layer)\.(\d+)\.")


def _adapter_hint(path: Path) -> str:
    """What to do with a PEFT adapter folder (LoRA weights without their base model), or ""."""
    try:
        peft = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    base = peft.get("base_model_name_or_path") if isinstance(peft, dict) else None
    return (f"; it holds a PEFT adapter ({peft.get('peft_type', 'adapter')} weights for "
            f"{base or 'a base model'}), not a model: merge it into its base first, "
            f"PeftModel.from_pretrained(<base model>, '{path}').merge_and_unload()"
            f".save_pretrained(<new folder>), and pass that folder")


def _sentence_hint(path: Path) -> str:
    """Where the encoder of an old-layout sentence-transformers folder is (its modules.json
    names a Transformer module in a subfolder: 0_Transformer/, 0_BERT/), or ""."""
    try:
        modules = json.loads((path / "modules.json").read_text(encoding="utf-8"))
        where = next(m["path"] for m in modules if str(m.get("type", "")).endswith(
            (".Transformer", ".BERT", ".RoBERTa")) and m.get("path"))
    except (OSError, ValueError, TypeError, KeyError, StopIteration, AttributeError):
        return ""
    if not (path / where / "config.json").is_file():
        return ""
    return (f"; it is a sentence-transformers folder of the old layout, its encoder in "
            f"{where}/: pass --model {path / where} (its sentence embedding is then mean-pooled, "
            f"the default: check that {path}'s Pooling module says so)")


def check_saved_folder(path: str | Path) -> None:
    """Raise ValueError, in one line naming the folder, if a local model folder cannot load:
    missing files, truncated or unreadable weights, an unsupported architecture, or a config
    whose depth or MLP widths disagree with the weights. Reads only headers."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such folder")
    if not path.is_dir():
        raise ValueError(f"{path} is a file; give the saved model's folder")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: no config.json (not a saved model folder)"
                         + _adapter_hint(path) + _sentence_hint(path))
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: config.json is not valid JSON ({type(exc).__name__})") from exc
    weights = path / "model.safetensors"
    if not weights.is_file():
        if any(path.glob("*.bin")) or any(path.glob("model-*.safetensors")):
            return  # another weight format: transformers reads (and checks) it
        raise ValueError(f"{path}: no model.safetensors (weights missing)")
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        with open(weights, "rb") as fh:  # the header says how long the data is
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if weights.stat().st_size < 8 + header_len + end:
            raise ValueError("file shorter than its header says")
    except Exception as exc:  # safetensors raises its own error type
        raise ValueError(f"{path}: model.safetensors is truncated or unreadable "
                         f"({str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__})") from exc
    info = raw.get("vit_pruning") or {}
    arch = (raw.get("architectures") or [None])[0]
    if info and arch not in SUPPORTED_CLASSES and arch not in {c.__name__ for c, _ in PRUNED_CLASSES.values()}:
        raise ValueError(f"{path}: architecture {arch!r} is not one vit_pruning saves "
                         f"({', '.join(SUPPORTED_CLASSES)})")
    if info and arch:
        stock = arch[len("Pruned"):] if arch.startswith("Pruned") else arch
        expected = getattr(getattr(transformers, stock, None), "config_class", None)
        if expected is not None and raw.get("model_type") not in (
                expected.model_type, PRUNED_PREFIX + expected.model_type):
            raise ValueError(f"{path}: architecture {arch!r} does not match model_type "
                             f"{raw.get('model_type')!r} in config.json")
    shapes = {k: v for k, v in shapes.items() if not k.startswith("text_model.")}  # CLIP/SigLIP
    # text towers are never pruned; their blocks are not the ones the config entry describes
    blocks = {int(m.group(1)) for k in shapes for m in [_BLOCK.search(k)] if m}
    if not blocks:
        return  # not a block-structured model: transformers decides
    tower_raw = raw.get("vision_config") or raw
    depth = tower_raw.get("num_hidden_layers")
    widths = info.get("intermediate_sizes") or [tower_raw.get("intermediate_size")] * len(blocks)
    if depth is not None and (len(blocks) != depth or len(widths) != depth):
        raise ValueError(f"{path}: config says {depth} blocks (num_hidden_layers), the weights "
                         f"hold {len(blocks)}")
    for key, shape in shapes.items():
        m = _MLP_IN.search(key)
        if m and int(m.group(1)) < len(widths) and widths[int(m.group(1))] not in (None, shape[0]):
            raise ValueError(f"{path}: config says block {m.group(1)} has MLP width "
                             f"{widths[int(m.group(1))]}, the weights have {shape[0]}")


def is_pruned_folder(path: str | Path) -> bool:
    """Whether a folder's config.json carries this package's ``vit_pruning`` entry."""
    try:
        raw = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(raw, dict) and bool(raw.get("vit_pruning"))


def load_pruned_model(path: str | Path, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None) -> nn.Module:
    """Load a folder saved by :func:`save_pruned_model` (plain or remote code, either
    transformers major) with this package's classes, each weight in the dtype it was saved in
    (a model pruned in bf16 comes back in bf16, with its logits), or all in `dtype`; raises
    ValueError naming the folder and what is wrong with it."""
    path = Path(path)
    check_saved_folder(path)
    raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    arch = (raw.get("architectures") or [None])[0]
    by_pruned = {c.__name__: stock for stock, (c, _) in PRUNED_CLASSES.items()}
    stock = by_pruned.get(arch, arch)
    if stock not in PRUNED_CLASSES:
        raise ValueError(f"{path}: architecture {arch!r} is not one of {SUPPORTED_CLASSES}")
    stock_cfg = getattr(transformers, stock).config_class  # the model type decides the class:
    # pruned_<type> (format 3) or the stock type (plain folders; format 2 remote-code folders)
    config = (PRUNED_CONFIGS[stock_cfg.__name__] if str(raw.get("model_type", "")).startswith(
        PRUNED_PREFIX) else stock_cfg).from_pretrained(path)
    info = getattr(config, "vit_pruning", None) or {}
    if info.get("attn_implementation"):
        try:
            config._attn_implementation = info["attn_implementation"]
        except (AttributeError, ValueError):
            pass  # an implementation this transformers does not have: its default
    model = PRUNED_CLASSES[stock][0](config)
    state = load_file(str(path / "model.safetensors"))
    layout = resolve(model).layout
    if layout in ("v4", "v5") and any(".layers." in "." + k for k in state) != (layout == "v5"):
        state = translate_keys(state, to=layout)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)  # as saved
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the saved structure "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    sync_config(resolve(model))  # a plain structure goes back to its stock class
    return model.to(device=device, dtype=dtype).eval()
