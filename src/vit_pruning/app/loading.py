"""Loading the model a run prunes: 'embedded', a local folder (pruned by this tool or not) or a
hub id, with its image processor or tokenizer; refusing what cannot be pruned or measured."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import EMBEDDED, RunConfig
from ..config import value as flag_value
from ..errors import UsageError, exc_summary

log = logging.getLogger("vit_pruning")

# pre-training wrappers whose encoder is what gets pruned
PRETRAINING_ENCODERS = {"ViTMAEForPreTraining": "ViTMAEModel"}


def load_model(name: str, want_head: bool = False):
    """(model, processor, source, stored dtype) from 'embedded', a local folder (pruned or not)
    or a hub id; the processor is an image processor, or a tokenizer for a text encoder. The
    weights are loaded in float32 on every transformers version (the pruning's refits and the
    measurements are float32 math; 5.x would load a bf16 checkpoint in bf16), and the dtype the
    checkpoint stores them in is returned, the dtype a pruned model is saved in by default.

    An image model is built as the supported class its config names (a headless backbone stays
    headless, a dual CLIP / SigLIP model keeps its text tower); `want_head` (a head is to be
    installed) or a config naming no supported class builds the image-classification class."""
    import transformers

    from ..anatomy import SUPPORTED_CLASSES, is_text_config, resolve
    from ..persistence import (check_saved_folder, config_dtype, dtype_name, float32_weights,
                               is_pruned_folder, load_pruned_model)
    path = EMBEDDED if name == "embedded" else Path(name)
    source = str(path) if path.is_dir() else name
    if path.is_dir():
        try:
            check_saved_folder(path)
        except ValueError as exc:
            raise UsageError(f"--model: {exc}") from exc
    try:
        if path.is_dir() and is_pruned_folder(path):  # this package's folder (its own model
            model = load_pruned_model(path, dtype=torch.float32)  # type when it needs its
            text, stored = is_text_config(model.config), config_dtype(model.config)  # modeling file)
        else:
            config = transformers.AutoConfig.from_pretrained(source)
            check_config(config, source)
            text, stored = is_text_config(config), config_dtype(config)
            arch = (getattr(config, "architectures", None) or [""])[0]
            arch = PRETRAINING_ENCODERS.get(arch, arch)
            if arch and arch not in SUPPORTED_CLASSES:  # never built as another class (a head
                # dropped or a random one added without a word)
                raise UsageError(
                    f"--model: unsupported model class {arch} ({source}); vit_pruning prunes "
                    f"{', '.join(SUPPORTED_CLASSES)}: save the supported model it contains (e.g. "
                    f"its encoder) to a folder and pass that")
            headless = SUPPORTED_CLASSES.get(arch, ("", ""))[1] != "logits"
            if arch and not (want_head and headless):
                cls = getattr(transformers, arch)
            elif text:  # a config naming no class: the headless encoder
                cls = transformers.AutoModel
            else:
                cls = transformers.AutoModelForImageClassification
            model, info = cls.from_pretrained(source, output_loading_info=True, **float32_weights())
            check_complete(model, info["missing_keys"], source, want_head)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - loading raises many kinds (size mismatch,
        # unpickling refused, a config transformers cannot build): each is one line here
        if path.exists() or name == "embedded":
            raise UsageError(f"--model: cannot load {path} ({exc_summary(exc, 150)})") from exc
        raise UsageError(
            f"--model: cannot load {name!r} (offline or unknown id); download it where there is "
            f"network (hf download {name} --local-dir DIR) and pass --model DIR, or use "
            f"--model embedded (HF_HUB_OFFLINE=1 skips the download retries)") from exc
    try:
        resolve(model)
    except ValueError as exc:
        raise UsageError(f"--model: {exc}") from exc
    if getattr(model.config, "mask_ratio", 0):  # ViTMAE: prune the encoder as a backbone
        log.info("%s: patch masking off (mask_ratio %s -> 0): the encoder is pruned and measured "
                 "on every patch", type(model).__name__, model.config.mask_ratio)
        model.config.mask_ratio = 0.0
    if stored != torch.float32:
        log.info("%s: its weights are stored in %s; pruned and measured in float32 (a saved "
                 "pruned model is %s again: --save-dtype)", source, dtype_name(stored),
                 dtype_name(stored))
    return model.eval(), load_processor(source, text), source, stored


def load_processor(source: str, text: bool):
    """The tokenizer (text) or image processor of a model folder or hub id; exits 2 naming what
    a folder lacks."""
    import transformers
    path = Path(source)
    try:
        if text:
            return transformers.AutoTokenizer.from_pretrained(source)
        return transformers.AutoImageProcessor.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, or an ImportError of a
        # library a fallback tokenizer needs (protobuf, sentencepiece)
        what, cls = ("tokenizer files", "AutoTokenizer") if text else \
            ("image processor config", "AutoImageProcessor")
        files = ("preprocessor_config.json", "processor_config.json")
        missing = not text and path.is_dir() and not any((path / f).exists() for f in files)
        why = "no preprocessor_config.json" if missing else exc_summary(exc, 120)
        raise UsageError(f"--model: {source} has no usable {what} ({why}); a model saved alone "
                         f"needs the one it was trained with beside it: {cls}.from_pretrained("
                         f"<its base checkpoint>).save_pretrained(<this folder>)") from exc


def check_complete(model, missing: list[str], source: str, want_head: bool) -> None:
    """Refuse a model that transformers completed with random weights: the checkpoint lacks
    some the class needs (a backbone saved without its config naming its class is built as a
    classifier with a random head). A head about to be replaced may be missing, and so may a
    pooler the measured output does not use (DINO's ViTModel checkpoints have none)."""
    from ..anatomy import output_kind
    try:
        unused_pooler = output_kind(model) in ("hidden", "text")
    except ValueError:  # an unsupported class: refused by name once loaded
        unused_pooler = False
    missing = sorted(k for k in missing if not (want_head and k.startswith("classifier."))
                     and not (unused_pooler and k.startswith("pooler.")))
    if not missing:
        return
    head = all(k.startswith("classifier.") for k in missing)
    raise UsageError(
        f"--model: {source} has no weights for {', '.join(missing[:3])}"
        f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''} of the "
        f"{type(model).__name__} its config builds (transformers would fill them with random "
        f"values); " + ("it is a backbone without a classifier: add --replace-classifier (or "
                        "--use-adapter) to train a head on --dataset, or name its class in "
                        "config.json's architectures (e.g. [\"ViTModel\"]) to prune it headless"
                        if head else "its weights do not match its config"))


def check_processor(model, processor, source: str, mode: str) -> None:
    """Refuse an image processor whose images the model cannot take (a 224-pixel processor
    beside a 384-pixel fine-tune fails inside the first forward, after the data is loaded):
    one blank image through both, before any work."""
    from PIL import Image

    from ..measure import forward_output
    from ..modes import device_of
    try:
        pixels = processor(images=[Image.new(mode, (64, 64))], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            forward_output(model, pixels.to(device_of(model)))
    except Exception as exc:  # noqa: BLE001 - whatever the model's own checks raise
        raise UsageError(f"--model: {source}: its image processor's images do not fit the model "
                         f"({exc_summary(exc, 150)}); put the processor it was trained with "
                         f"beside it (preprocessor_config.json)") from exc


def check_config(config, source: str) -> None:
    """Refuse a config whose sizes cannot build a model (0, negative, or heads that do not
    divide the hidden size), naming the field, before transformers fails somewhere inside."""
    cfg = getattr(config, "vision_config", None) or config
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                "image_size", "patch_size", "num_channels"):
        value = getattr(cfg, key, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        if value is not None and not all(isinstance(v, int) and v > 0 for v in values):
            raise UsageError(f"--model: {source} has {key} {value!r} in its config; it must be a "
                             f"positive integer")
    hidden, heads = getattr(cfg, "hidden_size", None), getattr(cfg, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and hidden % heads:
        raise UsageError(f"--model: {source} has hidden_size {hidden}, not a multiple of "
                         f"num_attention_heads {heads}")


def check_finite(model, what: str) -> None:
    """Refuse weights holding NaN or Inf (they would run to meaningless numbers or fail deep
    inside the refit), naming the first such tensor."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UsageError(f"{what}: the weights hold NaN or Inf (first in {name}); the model "
                             f"cannot be pruned or measured")


IMAGE_ONLY_FLAGS = ("dataset", "load_cifar", "replace_classifier", "use_adapter", "load_adapter",
                    "do_finetune", "recover", "save_adapter")


def check_text_flags(cfg: RunConfig) -> None:
    """Text encoders are headless: refuse the flags about labelled images and heads."""
    for flag in IMAGE_ONLY_FLAGS:
        if flag_value(cfg, flag):
            raise UsageError(f"--{flag.replace('_', '-')} does not apply to a text encoder (it is "
                             f"headless and measured by sentence-embedding fidelity); drop it")


@dataclass
class Loaded:
    model: Any
    processor: Any
    model_id: str
    text: bool
    shape: Any  # planner.ModelShape of the model as loaded
    layout: str
    extra_files: dict = field(default_factory=dict)  # name -> file kept beside a pruned model
    # (a sentence-transformers folder's module files)
    stored_dtype: torch.dtype = torch.float32  # what the checkpoint stores its weights in


def load_step(cfg: RunConfig) -> Loaded:
    """Load the model and its processor; refuse flags that do not fit its kind."""
    from ..anatomy import resolve
    from ..pipeline import model_shape
    model, processor, model_id, stored = load_model(
        cfg.model, bool(cfg.head.replace_classifier or cfg.head.use_adapter or cfg.head.load_adapter))
    anatomy = resolve(model)
    check_finite(model, "--model")
    from ..measure import single_output_problem
    problem = single_output_problem(model)
    if problem and not (cfg.head.replace_classifier or cfg.head.use_adapter or cfg.head.load_adapter):
        raise UsageError(f"--model: {problem}; add --replace-classifier (or --use-adapter) with a "
                         f"labelled --dataset, or prune the backbone saved alone")
    from ..heads import TWO_HEADS
    given = [f for f in ("replace_classifier", "use_adapter", "load_adapter", "save_adapter")
             if flag_value(cfg, f)]
    if hasattr(model, TWO_HEADS[1]) and given:
        raise UsageError(f"--{given[0].replace('_', '-')}: {type(model).__name__} has two heads "
                         f"(its logits are the mean of the [CLS] and distillation-token heads), "
                         f"not one classifier to replace or save; prune it with its own heads "
                         f"(--do-finetune trains them)")
    if anatomy.is_text:
        check_text_flags(cfg)
    elif cfg.data.text_file:
        raise UsageError("--text-file is for text encoders; this model takes images (use --dataset)")
    if not anatomy.is_text and cfg.recovery.distill_match == "tokens":
        raise UsageError("--distill-match tokens is for text encoders; an image model learns its "
                         "output (use auto or output)")
    if not anatomy.is_text and cfg.recovery.distill_augment:
        raise UsageError("--distill-augment is for text encoders; an image model distills on "
                         "train-split images (see --distill-size)")
    from .hub import check_hub
    check_hub(cfg)  # the dataset's hub resources, before any download is tried
    files = sentence_pooling(model, model_id) if anatomy.is_text else {}
    return Loaded(model, processor, model_id, anatomy.is_text, model_shape(model), anatomy.layout,
                  files, stored)


def sentence_pooling(model, source: str) -> dict:
    """A sentence-transformers model's pooling set on the model's config (what its embedding
    is, so what fidelity and the pruning's own trials measure); returns its module files, to
    keep beside a pruned model. A pooling that cannot be measured exits 2."""
    from ..text import sentence_modules
    try:
        found = sentence_modules(source)
    except (ValueError, OSError) as exc:
        raise UsageError(f"--model: {exc}") from exc
    if found is None:
        return {}
    model.config.sentence_pooling = found.pooling
    log.info("%s: sentence-transformers model, %s pooling", source, found.pooling)
    if found.after:
        log.warning("--model: its sentence-transformers module(s) after the pooling (%s) are not "
                    "applied: fidelity is measured on the pooled embeddings (they are kept, "
                    "unpruned, beside a saved model)", ", ".join(found.after))
    return found.files
