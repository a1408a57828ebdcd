"""TextPruner (Yang et al., ACL 2022 demo: `pip install textpruner`) as a peer of the heads table:
its `TransformerPruner`, iterative (8 rounds), removing attention heads and FFN neurons by
gradient x weight importance, with no refit. No labels: the loss it differentiates is the
unsupervised SimCSE loss of the calibration batches (the one `tp-taylor` uses; TextPruner runs
the model in eval mode, so a sentence's two views are the same and the other sentences of its
batch are the negatives). Its shape is the one `tp-heads` gets at the same target: a quarter of
every block's heads and, uniformly, as many FFN neurons as our planner gives a width-only plan
with those heads (`bench.methods.heads_peer_plan`).

TextPruner removes heads through `PreTrainedModel.prune_heads`, which transformers 5 removed:
under transformers 5 it runs in a child process on an interpreter with transformers 4.x and
`textpruner` installed, named by the environment variable BENCH_TF4_PYTHON (for example this
project's `.venv-tf4/bin/python`, see .ci/run), with the MiniLM folder passed to it (so that
interpreter does not need the model package, which pulls transformers 5). The child prints the
rows of :func:`bench.text.run` as JSON (cosine and neighbour agreement on the same evaluation
sentences, calibrated on the same sentences)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

ENV = "BENCH_TF4_PYTHON"
N_ITERS = 8  # TextPruner's iterative rounds (its examples use 8 to 16; 1 was worse here)
ROOT = Path(__file__).resolve().parent.parent


def _simcse_loss(outputs, temperature: float = 0.05) -> torch.Tensor:
    """The unsupervised SimCSE loss of one padding-free batch's mean-pooled embeddings."""
    e = outputs.last_hidden_state.mean(1)
    sim = F.cosine_similarity(e.unsqueeze(1), e.unsqueeze(0), dim=-1) / temperature
    return F.cross_entropy(sim, torch.arange(len(e), device=sim.device))


def prune(model, target, calib_x, calib_y, eval_batches, mr, seed):
    """A bench method (see bench.methods.METHODS): TextPruner to `target`'s parameter count."""
    from textpruner import GeneralConfig, TransformerPruner, TransformerPruningConfig

    from .methods import heads_peer_plan
    shape, heads, plan = heads_peer_plan(model, target, mr)
    config = TransformerPruningConfig(
        target_ffn_size=shape.widths[0] - plan.neurons_to_prune[0],
        target_num_of_heads=shape.heads[0] - heads[0], pruning_method="iterative",
        n_iters=N_ITERS)
    with tempfile.TemporaryDirectory() as out:
        pruner = TransformerPruner(model, config, GeneralConfig(use_device="cpu", output_dir=out))
        pruner.prune(dataloader=[{"input_ids": x} for x in calib_x if len(x) > 1],
                     adaptor=_simcse_loss, save_model=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def runs_here() -> str | None:
    """None where TextPruner can run in this process, else why not."""
    try:
        import textpruner  # noqa: F401
    except ImportError:
        return "textpruner is not installed (`pip install textpruner`)"
    from transformers import PreTrainedModel
    if not hasattr(PreTrainedModel, "prune_heads"):
        import transformers
        return (f"TextPruner removes heads with PreTrainedModel.prune_heads, which transformers "
                f"{transformers.__version__} no longer has")
    return None


def rows(targets, n_calib: int, n_eval: int, smoke: bool) -> tuple[list[dict], str | None]:
    """TextPruner's rows of the text table at `targets` and why there are none (None if there
    are): in this process where it runs here, else in the child process of BENCH_TF4_PYTHON."""
    if smoke:
        return [], "not run in the smoke run"
    why = runs_here()
    if why is None:
        from . import text
        return text.run(targets, methods=("textpruner",), ideas={}, n_calib=n_calib,
                        n_eval=n_eval, repeats=2)["rows"], None
    python = os.environ.get(ENV)
    if not python:
        return [], f"{why}; set {ENV} to an interpreter with transformers 4.x and textpruner"
    from . import text_data
    env = {**os.environ, "BENCH_MINILM_DIR": str(text_data.model_dir()),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    args = [python, "-m", "bench.textpruner_peer", ",".join(map(str, targets)), str(n_calib),
            str(n_eval)]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return [], f"{why}; its run on {python} failed: {tail[0]}"
    return json.loads(done.stdout.strip().splitlines()[-1]), None


def main(argv: list[str]) -> None:
    import logging

    import transformers

    from . import text
    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()
    why = runs_here()
    if why is not None:
        raise SystemExit(why)
    targets = tuple(float(t) for t in argv[0].split(","))
    res = text.run(targets, methods=("textpruner",), ideas={}, n_calib=int(argv[1]),
                   n_eval=int(argv[2]), repeats=2)
    for r in res["rows"]:
        r["transformers"] = transformers.__version__
    print(json.dumps(res["rows"]))


if __name__ == "__main__":
    main(sys.argv[1:])
