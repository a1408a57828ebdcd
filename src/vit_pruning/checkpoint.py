"""Resumable recovery: the state of a distillation, written atomically every N steps.

A run's checkpoint lives in ``<artifacts-dir>/<run-id>/checkpoint/``:

- ``step-000300/``: one complete checkpoint, written in a temporary folder and renamed into
  place: ``model/`` (the student at that step, as :func:`save_pruned_model` saves it: structure
  and weights), ``state.pt`` (the optimizer, learning-rate schedule, the draw generators, the
  step, the best held-out check and its weights, the losses so far) and ``run.pt`` (what the
  report needs from before distillation: the pruning result and each stage's measurements);
- ``snapshots/``: the models after stage 1 and stage 2, written once, for the latency table;
- ``latest.json``: which step folder is the checkpoint (replaced atomically once the folder is
  complete; older step folders are removed after). A run killed at any moment leaves the last
  complete checkpoint.

``job`` (the flags that decide the pruning and distillation) is stored with it: a resume that
asks for another model, target or plan is refused. The files are pickles this tool wrote for
itself: resume only from checkpoints you made.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_write_json, partial_prefix
from .persistence import load_pruned_model, save_pruned_model

FORMAT = 1
JOB_FLAGS = ("model", "target", "target_flops", "target_latency", "stage", "depth_unit",
             "depth_method", "split", "allocation", "compensation", "neuron_selection",
             "min_remaining", "align", "width_policy", "seed", "calib_size", "dataset",
             "load_cifar", "text_file", "replace_classifier", "use_adapter", "load_adapter",
             "do_finetune", "distill_steps", "distill_lr", "distill_batch_size",
             "distill_temperature", "distill_train", "distill_match", "distill_size",
             "distill_augment", "grad_accumulation", "mixed_precision", "checkpoint_every")


def job_of(args) -> dict:
    """The flags a checkpoint must agree with to be resumed."""
    return {k: getattr(args, k, None) for k in JOB_FLAGS}


def _differs(saved: dict, now: dict) -> str | None:
    for k in JOB_FLAGS:
        if saved.get(k) != now.get(k):
            return f"--{k.replace('_', '-')} was {saved.get(k)!r} there, {now.get(k)!r} now"
    return None


@dataclass
class Checkpoint:
    """The checkpoint folder of one run (see the module docstring)."""

    folder: Path

    @classmethod
    def of(cls, artifacts_dir: str | Path, run_id: str) -> "Checkpoint":
        return cls(Path(artifacts_dir) / run_id / "checkpoint")

    @property
    def latest(self) -> Path | None:
        """The complete step folder to resume from, or None."""
        pointer = self.folder / "latest.json"
        if not pointer.exists():
            return None
        step = self.folder / json.loads(pointer.read_text())["folder"]
        return step if (step / "state.pt").exists() else None

    def write_snapshots(self, models: dict[str, nn.Module], processor) -> None:
        """The models of the stages before distillation (once: later checkpoints share them)."""
        target = self.folder / "snapshots"
        if target.exists():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=partial_prefix("snapshots"), dir=self.folder))
        try:
            for name, model in models.items():
                save_pruned_model(model, tmp / name, processor)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def write(self, step: int, student: nn.Module, state, run: dict, job: dict, processor) -> Path:
        """One complete checkpoint at `step`, then the pointer to it, then older ones removed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:06d}"
        tmp = Path(tempfile.mkdtemp(prefix=partial_prefix(name), dir=self.folder))
        try:
            save_pruned_model(student, tmp / "model", processor)
            torch.save(state, tmp / "state.pt")
            torch.save({"format": FORMAT, "job": job, **run}, tmp / "run.pt")
            final = self.folder / name
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_json(self.folder / "latest.json", {"folder": name, "step": step}, overwrite=True)
        for old in self.folder.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self, job: dict, device: torch.device) -> tuple[nn.Module, object, dict, dict]:
        """(student, DistillState, run record, snapshot models) of the latest checkpoint;
        ValueError in one line if there is none or it was made for another job."""
        step = self.latest
        if step is None:
            raise ValueError(f"no checkpoint in {self.folder}")
        run = torch.load(step / "run.pt", weights_only=False)
        if run.get("format") != FORMAT:
            raise ValueError(f"{step}: checkpoint format {run.get('format')}, this tool reads {FORMAT}")
        why = _differs(run["job"], job)
        if why:
            raise ValueError(f"the checkpoint in {self.folder} was made for another job ({why})")
        state = torch.load(step / "state.pt", weights_only=False)
        student = load_pruned_model(step / "model", device)
        snaps = {p.name: load_pruned_model(p, device)
                 for p in sorted((self.folder / "snapshots").iterdir()) if p.is_dir()} \
            if (self.folder / "snapshots").is_dir() else {}
        return student, state, run, snaps

    def remove(self) -> None:
        """Drop the checkpoint once the run's outputs are all written."""
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            self.folder.parent.rmdir()  # the run's artifacts folder, if nothing else is in it
        except OSError:
            pass
