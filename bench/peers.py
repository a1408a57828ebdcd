"""Peers of the heads table that cannot run beside this project's pinned stack (transformers 5,
numpy 2), each in a child process on an interpreter of its own, named by an environment
variable; each prunes all-MiniLM-L6-v2 to the same parameter count as ours, label-free (the
loss both differentiate is the unsupervised SimCSE loss of the calibration batches, the one
`tp-taylor` uses; both run the model in eval mode, so a sentence's two views are the same and
the other sentences of its batch are the negatives), with no refit:

- `textpruner`: TextPruner 1.1 (Yang et al., ACL 2022 demo; `pip install --no-deps
  textpruner==1.1.post2`, its metadata asks for numpy<1.22), its `TransformerPruner`, 8
  iterative rounds of gradient x weight importance of heads and FFN neurons, the shape
  `tp-heads` gets (:func:`bench.methods.heads_peer_plan`). It removes heads with
  `PreTrainedModel.prune_heads`, which transformers 5 removed: BENCH_TEXTPRUNER_PYTHON names
  an interpreter with transformers 4.x and textpruner (for example this project's
  `.venv-tf4/bin/python`, see .ci/run).
- `inc-retrain-free`: Intel Neural Compressor 2.6's retrain-free pruner (`pruning_type
  "retrain_free"`: Kwon et al.'s mask search by the masks' squared gradients and their mask
  rearrangement, without the least-squares mask tuning), on the FFN neurons (the `channelx1`
  pattern on each block's FFN output projection: it takes channel patterns only, so heads are
  not a unit it has), 8 rounds over the calibration batches, as many neurons per block as our
  planner gives a width-only plan; the masked neurons are then removed with this project's
  surgery. INC 3.x has no pruning API and 2.6 declares numpy<2: BENCH_INC_PYTHON names an
  interpreter with `neural-compressor==2.6` (numpy 1.26, transformers 4.57.6 here).

The child gets the MiniLM folder (BENCH_MINILM_DIR, so its interpreter needs no model package,
which pulls transformers 5) and prints the rows of :func:`bench.text.run` as JSON: cosine and
neighbour agreement on the same evaluation sentences, calibrated on the same sentences."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROUNDS = 8  # the peers' iterative rounds (TextPruner's examples use 8 to 16; 1 was worse here)
ROOT = Path(__file__).resolve().parent.parent


def _simcse_loss(outputs) -> torch.Tensor:
    """:func:`bench.methods.simcse_loss` of one padding-free batch's mean-pooled embeddings,
    both views the same (the peers run the model in eval mode)."""
    from .methods import simcse_loss
    e = outputs.last_hidden_state.mean(1)
    return simcse_loss(e, e)


def textpruner(model, target, calib_x, calib_y, eval_batches, mr, seed):
    """A bench method (see bench.methods.METHODS): TextPruner to `target`'s parameter count."""
    from textpruner import GeneralConfig, TransformerPruner, TransformerPruningConfig

    from .methods import heads_peer_plan
    shape, heads, plan = heads_peer_plan(model, target, mr)
    config = TransformerPruningConfig(
        target_ffn_size=shape.widths[0] - plan.neurons_to_prune[0],
        target_num_of_heads=shape.heads[0] - heads[0], pruning_method="iterative",
        n_iters=ROUNDS)
    with tempfile.TemporaryDirectory() as out:
        pruner = TransformerPruner(model, config, GeneralConfig(use_device="cpu", output_dir=out))
        pruner.prune(dataloader=[{"input_ids": x} for x in calib_x if len(x) > 1],
                     adaptor=_simcse_loss, save_model=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def inc_retrain_free(model, target, calib_x, calib_y, eval_batches, mr, seed):
    """A bench method: INC 2.6's retrain-free pruner on the FFN neurons to `target`'s parameter
    count, the masked neurons then removed (fc1 rows, fc2 columns) by this project's surgery."""
    from neural_compressor.compression.pruner import prepare_pruning
    from neural_compressor.training import WeightPruningConfig

    from vit_pruning import resolve
    from vit_pruning.pipeline import model_shape
    from vit_pruning.planner import make_plan
    from vit_pruning.width import prune_vit_mlp_width
    shape = model_shape(model)
    plan = make_plan(shape, target, "block", mr, depth_indices=[])  # ValueError: out of reach
    an = resolve(model)
    names = {m: n for n, m in model.named_modules()}
    batches = [x for x in calib_x if len(x) > 1]
    config = WeightPruningConfig([{
        "op_names": [re.escape(names[p.fc2]) + "$" for p in an.parts], "pattern": "channelx1",
        "pruning_type": "retrain_free", "pruning_scope": "local",
        "target_sparsity": plan.neurons_to_prune[0] / shape.widths[0], "start_step": 0,
        "end_step": len(batches) - 1, "pruning_frequency": max(1, (len(batches) - 1) // ROUNDS)}])
    loader = torch.utils.data.DataLoader([(x, 0) for x in batches], batch_size=None)
    prepare_pruning(model, config, dataloader=loader,
                    loss_func=lambda outputs, _target: _simcse_loss(outputs))
    masked = [int((p.fc2.weight.abs().sum(0) == 0).sum()) for p in an.parts]
    prune_vit_mlp_width(model, masked, 1, importance=[p.fc2.weight.detach().abs().sum(0)
                                                      for p in an.parts])
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _textpruner_why() -> str | None:
    try:
        import textpruner  # noqa: F401
    except ImportError:
        return "textpruner is not installed"
    from transformers import PreTrainedModel
    if not hasattr(PreTrainedModel, "prune_heads"):
        import transformers
        return (f"TextPruner removes heads with PreTrainedModel.prune_heads, which transformers "
                f"{transformers.__version__} no longer has")
    return None


def _inc_why() -> str | None:
    try:
        from neural_compressor.compression.pruner import prepare_pruning  # noqa: F401
    except ImportError:
        return ("Intel Neural Compressor's pruning API is not importable here (3.x has none; "
                "2.6 declares numpy<2)")
    return None


@dataclass(frozen=True)
class Peer:
    label: str  # as the table names it
    env: str  # the environment variable naming its interpreter
    why_not_here: Callable[[], str | None]  # None where it runs in this process


PEERS = {"textpruner": Peer("TextPruner 1.1", "BENCH_TEXTPRUNER_PYTHON", _textpruner_why),
         "inc-retrain-free": Peer("INC 2.6 retrain-free", "BENCH_INC_PYTHON", _inc_why)}


def rows(name: str, targets, n_calib: int, n_eval: int, smoke: bool
         ) -> tuple[list[dict], str | None]:
    """Peer `name`'s rows of the text table at `targets`, and why there are none (None if
    there are): in this process where it runs here, else in the child process of its
    interpreter (:data:`PEERS`)."""
    if smoke:
        return [], "not run in the smoke run"
    peer = PEERS[name]
    why = peer.why_not_here()
    if why is None:
        return _run(name, targets, n_calib, n_eval), None
    python = os.environ.get(peer.env)
    if not python:
        return [], f"{why}; set {peer.env} to an interpreter where it runs (see bench/peers.py)"
    from . import text_data
    env = {**os.environ, "BENCH_MINILM_DIR": str(text_data.model_dir()),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    args = [python, "-m", "bench.peers", name, ",".join(map(str, targets)), str(n_calib),
            str(n_eval)]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return [], f"{why}; its run on {python} failed: {tail[0]}"
    return json.loads(done.stdout.strip().splitlines()[-1]), None


def _run(name: str, targets, n_calib: int, n_eval: int) -> list[dict]:
    import transformers

    from . import text
    out = text.run(targets, methods=(name,), ideas={}, n_calib=n_calib, n_eval=n_eval,
                   repeats=2)["rows"]
    for r in out:
        r["transformers"] = transformers.__version__
    return out


def main(argv: list[str]) -> None:
    """`python -m bench.peers NAME TARGETS N_CALIB N_EVAL`: the rows as JSON, last line."""
    import logging

    import transformers
    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()
    why = PEERS[argv[0]].why_not_here()
    if why is not None:
        raise SystemExit(why)
    targets = tuple(float(t) for t in argv[1].split(","))
    print(json.dumps(_run(argv[0], targets, int(argv[2]), int(argv[3]))))


if __name__ == "__main__":
    main(sys.argv[1:])
