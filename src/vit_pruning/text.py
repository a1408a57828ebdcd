"""Text for BERT-family encoders: sentences (a file, or Python's own documentation, offline),
deterministic calibration/evaluation splits, tokenized batches, and sentence embeddings.

The fidelity measures on the embeddings (mean cosine, nearest-neighbour agreement) live in
:mod:`vit_pruning.measure`.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from .anatomy import sentence_pool
from .modes import eval_mode

ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
ST_MODULE_FILES = ("config.json", "model.safetensors", "pytorch_model.bin")  # in a module's folder
ST_POOLINGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
MAX_LENGTH = 128  # tokens per sentence (sentence encoders are trained at this length or less)
PYTHON_DOCS = "python-docs"  # the built-in corpus's name in reports


def _prose_sentences(texts, found: set[str]) -> None:
    """Add the prose sentences of `texts` to `found`: indented code and grammar blocks and
    doctests dropped, 6-60 words, mostly letters, ending a sentence."""
    for text in texts:
        for para in re.split(r"\n\s*\n", text):
            if para.startswith("   ") or ">>>" in para:  # indented: code, grammar, tables
                continue
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(para.split())):
                letters = sum(c.isalpha() or c == " " for c in s) / max(1, len(s))
                if 6 <= len(s.split()) <= 60 and letters > 0.85 and s[-1] in ".!?":
                    found.add(s)


def python_doc_sentences() -> tuple[str, ...]:
    """Prose sentences of the documentation topics shipped with Python (``pydoc_data.topics``),
    unique, sorted: the default calibration and evaluation text."""
    from pydoc_data.topics import topics
    found: set[str] = set()
    _prose_sentences((topics[k] for k in sorted(topics)), found)
    return tuple(sorted(found))


def python_docstring_sentences() -> tuple[str, ...]:
    """Prose sentences of the docstrings in Python's standard library source (read with ``ast``,
    nothing imported; tests and IDLE left out), minus any that are also documentation-topic
    sentences: unlabeled text for distillation that never overlaps the default evaluation
    sentences. About 12,000 sentences, 3 s."""
    import ast
    import sysconfig
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if {"test", "tests", "idlelib", "site-packages"} & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs += [ast.get_docstring(n) or "" for n in ast.walk(tree)
                 if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    found: set[str] = set()
    _prose_sentences(docs, found)
    return tuple(sorted(found - set(python_doc_sentences())))


def augment_sentences(sentences: list[str] | tuple[str, ...], copies: int, seed: int = 0,
                      exclude: Iterable[str] = ()) -> list[str]:
    """`copies` word-level variants of every sentence, for distillation (the teacher labels any
    input, so a variant is as good a training input as a real sentence, and variants of
    in-domain sentences widen the few a user has; EDA, Wei & Zou 2019; TinyBERT's augmentation,
    Jiao et al. 2020). Each variant takes one edit, drawn at random: drop words (each with
    probability 0.15), keep a contiguous 50-90% of them, replace words (each with probability
    0.15) by words drawn from all the sentences, or join its first half to the second half of
    another sentence. Deterministic in `seed`; variants in order (copy by copy, sentence by
    sentence), less any that equals a sentence of `exclude` (e.g. the evaluation sentences)."""
    if copies < 0:
        raise ValueError(f"copies must be >= 0, got {copies}")
    rng = random.Random(seed)
    excluded = set(exclude)
    split = [s.split() for s in sentences]
    vocabulary = [w for words in split for w in words]
    out = []
    for _ in range(copies):
        for words in split:
            op = rng.random()
            if op < 0.3:
                new = [w for w in words if rng.random() > 0.15] or words
            elif op < 0.55:
                k = max(3, int(len(words) * rng.uniform(0.5, 0.9)))
                start = rng.randint(0, max(0, len(words) - k))
                new = words[start:start + k]
            elif op < 0.8:
                new = [rng.choice(vocabulary) if rng.random() < 0.15 else w for w in words]
            else:
                other = rng.choice(split)
                new = words[:len(words) // 2] + other[len(other) // 2:]
            out.append(" ".join(new))
    return [t for t in out if t not in excluded]


MAX_TEXT_BYTES = 64 * 2**20  # a --text-file larger than this is refused (read in bounded chunks)


def read_sentences(path: str | Path, max_bytes: int = MAX_TEXT_BYTES) -> tuple[str, ...]:
    """The distinct non-empty lines of a UTF-8 text file, one sentence (or passage) per line,
    in first-seen order (see :func:`read_sentences_counted`)."""
    return read_sentences_counted(path, max_bytes)[0]


def read_sentences_counted(path: str | Path, max_bytes: int = MAX_TEXT_BYTES
                           ) -> tuple[tuple[str, ...], int]:
    """(distinct non-empty lines, how many repeated lines were dropped). Repeats are dropped
    before any split, so no evaluation sentence can also be a calibration sentence. Reads at
    most `max_bytes` (ValueError beyond: ``/dev/zero`` or a runaway file never fills memory)."""
    with open(path, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path} is larger than {max_bytes // 2**20} MiB, the limit; pass a "
                         f"smaller file (a sample of your sentences)")
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise ValueError(f"{path} is UTF-16 text (it starts with a UTF-16 byte-order mark); save "
                         f"it as UTF-8")
    lines = data.decode("utf-8-sig").splitlines()  # a UTF-8 byte-order mark is not text
    seen: dict[str, None] = {}
    total = 0
    for line in lines:
        line = line.strip()
        if line:
            total += 1
            seen.setdefault(line, None)
    return tuple(seen), total - len(seen)


@dataclass(frozen=True)
class SentenceModules:
    """What a sentence-transformers model folder adds to its encoder: the Pooling module's
    mode, the modules after it that change the embedding's direction (Dense; Normalize does
    not), and its module files (name in the folder -> file), to keep beside a pruned model."""

    pooling: str  # "mean" or "cls" (vit_pruning.anatomy.POOLINGS)
    after: tuple[str, ...]
    files: dict[str, Path]


def _model_file(source: str, name: str) -> Path | None:
    """File `name` of a model folder or hub id (from the hub cache or a download), or None."""
    folder = Path(source)
    if folder.is_dir():
        return folder / name if (folder / name).is_file() else None
    from transformers.utils import cached_file
    try:
        found = cached_file(source, name, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except Exception:  # noqa: BLE001 - an id the hub does not know: the model load says why
        return None
    return Path(found) if found else None


def sentence_modules(source: str) -> SentenceModules | None:
    """The sentence-transformers modules of `source` (a folder or hub id), or None where it has
    no modules.json. ValueError for a pooling fidelity cannot be measured on here (max, last
    token, weighted mean, or several modes concatenated)."""
    import json
    index = _model_file(source, "modules.json")
    if index is None:
        return None
    files = {name: f for name in ST_FILES if (f := _model_file(source, name)) is not None}
    pooling, after, pooled = "mean", [], False
    for module in json.loads(index.read_text(encoding="utf-8")):
        kind, where = str(module.get("type", "")).rsplit(".", 1)[-1], module.get("path", "")
        for name in ST_MODULE_FILES if where else ():
            if (f := _model_file(source, f"{where}/{name}")) is not None:
                files[f"{where}/{name}"] = f
        if kind == "Pooling":
            cfg = json.loads(files[f"{where}/config.json"].read_text(encoding="utf-8")) \
                if f"{where}/config.json" in files else {}
            modes = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True]
            if len(modes) != 1 or modes[0] not in ST_POOLINGS:
                raise ValueError(f"its sentence-transformers pooling is {modes or 'not set'}; "
                                 f"fidelity is measured on mean or CLS pooling "
                                 f"({', '.join(ST_POOLINGS)})")
            pooling, pooled = ST_POOLINGS[modes[0]], True
        elif pooled and kind != "Normalize":
            after.append(kind)
    return SentenceModules(pooling, tuple(after), files)


@dataclass
class TextSplit:
    calibration: list[str]
    evaluation: list[str]


def split_sentences(sentences: tuple[str, ...] | list[str], n_calib: int, n_eval: int,
                    seed: int = 0, eval_seed: int = 0) -> TextSplit:
    """Disjoint calibration and evaluation sentences: the evaluation set is the first `n_eval`
    of a shuffle by `eval_seed` (fixed while calibration draws vary), calibration `n_calib`
    drawn by `seed` from the rest."""
    pool = list(sentences)
    random.Random(eval_seed).shuffle(pool)
    evaluation, rest = pool[:n_eval], pool[n_eval:]
    if n_calib > len(rest):
        raise ValueError(f"only {len(rest)} sentences are left for calibration after {len(evaluation)} "
                         f"evaluation sentences; asked for {n_calib}")
    return TextSplit(random.Random(seed).sample(rest, n_calib), evaluation)


def tokenize(tokenizer, texts: list[str], batch_size: int = 32,
             by_length: bool = False) -> list[dict[str, torch.Tensor]]:
    """Padded batches {input_ids, attention_mask} (at most MAX_LENGTH tokens per sentence), in
    the order of `texts`; with `by_length`, ordered by token count instead (ties in text order),
    so each batch pads little: for training inputs, whose order does not matter (on MiniLM's
    distillation sentences, 0.6% padding instead of 44% when sorted by characters)."""
    if by_length:
        counts = [len(ids) for ids in tokenizer(list(texts), truncation=True,
                                                max_length=MAX_LENGTH)["input_ids"]]
        texts = [t for _, _, t in sorted(zip(counts, range(len(texts)), texts))]
    return [dict(tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                           max_length=MAX_LENGTH, return_tensors="pt", return_token_type_ids=False))
            for i in range(0, len(texts), batch_size)]


@torch.no_grad()
def sentence_embeddings(model, batches: list[dict[str, torch.Tensor]],
                        device: str | torch.device = "cpu") -> torch.Tensor:
    """Sentence embeddings: the model's own forward with the attention mask, its real tokens
    pooled as sentence-transformers pools them (:func:`vit_pruning.anatomy.sentence_pool`)."""
    with eval_mode(model):
        out = []
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            out.append(sentence_pool(model.config, model(**b).last_hidden_state,
                                     b["attention_mask"]))
        return torch.cat(out)
