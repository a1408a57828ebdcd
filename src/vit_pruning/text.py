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

import torch

from .anatomy import mean_pool

MAX_LENGTH = 128  # tokens per sentence (sentence encoders are trained at this length or less)
PYTHON_DOCS = "python-docs"  # the built-in corpus's name in reports


def python_doc_sentences() -> tuple[str, ...]:
    """Prose sentences of the documentation topics shipped with Python (``pydoc_data.topics``):
    indented code and grammar blocks dropped, 6-60 words, mostly letters, unique, sorted."""
    from pydoc_data.topics import topics
    found = set()
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            if para.startswith("   "):  # indented: code, grammar, tables
                continue
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(para.split())):
                letters = sum(c.isalpha() or c == " " for c in s) / max(1, len(s))
                if 6 <= len(s.split()) <= 60 and letters > 0.85 and s[-1] in ".!?":
                    found.add(s)
    return tuple(sorted(found))


def read_sentences(path: str | Path) -> tuple[str, ...]:
    """Non-empty lines of a UTF-8 text file, one sentence (or passage) per line."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return tuple(s.strip() for s in lines if s.strip())


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


def tokenize(tokenizer, texts: list[str], batch_size: int = 32) -> list[dict[str, torch.Tensor]]:
    """Padded batches {input_ids, attention_mask} (at most MAX_LENGTH tokens per sentence)."""
    return [dict(tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                           max_length=MAX_LENGTH, return_tensors="pt", return_token_type_ids=False))
            for i in range(0, len(texts), batch_size)]


@torch.no_grad()
def sentence_embeddings(model, batches: list[dict[str, torch.Tensor]],
                        device: str | torch.device = "cpu") -> torch.Tensor:
    """Mean-pooled sentence embeddings: the model's own forward with the attention mask, the
    real tokens averaged (sentence-transformers' pooling)."""
    was_training = model.training
    model.eval()
    try:
        out = []
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            out.append(mean_pool(model(**b).last_hidden_state, b["attention_mask"]))
        return torch.cat(out)
    finally:
        model.train(was_training)
