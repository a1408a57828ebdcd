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

``job`` (every field of the run config that decides what is computed:
:meth:`vit_pruning.config.RunConfig.job`) is stored with it: a resume that asks for another
model, target, data, plan or distillation is refused, naming the flag. The files are pickles this tool wrote for
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

from .config import flag
from .errors import exc_summary
from .atomic import atomic_write_json, current_umask, partial_prefix
from .persistence import load_pruned_model, save_pruned_model

FORMAT = 1


def _differs(saved: dict, now: dict) -> str | None:
    """The first field of the job that differs, as one line naming its flag. `now` is
    :meth:`vit_pruning.config.RunConfig.job`: every field that decides the job, so a flag added
    later is compared too (a checkpoint written before it existed is refused, naming it)."""
    for k in now:
        if k not in saved:
            return (f"{flag(k)} is not recorded there (the checkpoint was written by an older "
                    f"version of vit-2ssp)")
        if saved[k] != now[k]:
            return f"{flag(k)} was {saved[k]!r} there, {now[k]!r} now"
    return None


def _folder(parent: Path, prefix: str) -> Path:
    """A new temporary folder in `parent` with the permissions of any folder the user makes
    (mkdtemp's are 0700, which a checkpoint renamed into place would keep)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    tmp.chmod(0o777 & ~current_umask())
    return tmp


def _load(path: Path):
    """torch.load of a file this tool wrote, or ValueError in one line naming it."""
    try:
        return torch.load(path, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - truncated, not a pickle, missing: one line
        raise ValueError(f"{path} cannot be read ({exc_summary(exc, 120)})") from exc


@dataclass
class Checkpoint:
    """The checkpoint folder of one run (see the module docstring)."""

    folder: Path

    @classmethod
    def of(cls, artifacts_dir: str | Path, run_id: str) -> "Checkpoint":
        return cls(Path(artifacts_dir) / run_id / "checkpoint")

    @property
    def latest(self) -> Path | None:
        """The complete step folder to resume from, or None; ValueError in one line, naming the
        file, where the pointer cannot be read."""
        pointer = self.folder / "latest.json"
        if not pointer.exists():
            return None
        try:
            step = self.folder / json.loads(pointer.read_text())["folder"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{pointer} cannot be read ({exc_summary(exc, 120)}); it is not a "
                             f"checkpoint this tool wrote whole: remove {self.folder}") from exc
        return step if (step / "state.pt").exists() else None

    def write_snapshots(self, models: dict[str, nn.Module], processor) -> None:
        """The models of the stages before distillation (once: later checkpoints share them)."""
        target = self.folder / "snapshots"
        if target.exists():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = _folder(self.folder, partial_prefix("snapshots"))
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
        tmp = _folder(self.folder, partial_prefix(name))
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

    def check(self, job: dict) -> tuple[Path, dict]:
        """(the latest step folder, its run record) if it was made for `job`; ValueError in one
        line if there is none, it was made for another job, or a file cannot be read."""
        step = self.latest
        if step is None:
            raise ValueError(f"no checkpoint in {self.folder}")
        run = _load(step / "run.pt")
        if not isinstance(run, dict) or run.get("format") != FORMAT:
            raise ValueError(f"{step / 'run.pt'}: not a checkpoint record of format {FORMAT}")
        why = _differs(run["job"], job)
        if why:
            raise ValueError(f"the checkpoint in {self.folder} was made for another job ({why})")
        for path in (step / "state.pt", step / "model", *self._snapshots(run).values()):
            if not path.exists():
                raise ValueError(f"{path} is missing: the checkpoint is incomplete (remove "
                                 f"{self.folder} to start again)")
        return step, run

    def _snapshots(self, run: dict) -> dict[str, Path]:
        """The snapshot folders of the stages the run record measured before distilling."""
        return {s.name: self.folder / "snapshots" / s.name for s in run.get("stages", [])
                if getattr(s, "name", None) in ("stage1", "stage2")}

    def load(self, job: dict, device: torch.device) -> tuple[nn.Module, object, dict, dict]:
        """(student, DistillState, run record, snapshot models) of the latest checkpoint;
        ValueError in one line if there is none, it was made for another job, or a file of it
        is missing or cannot be read."""
        step, run = self.check(job)
        state = _load(step / "state.pt")
        folders = {"model": step / "model", **self._snapshots(run)}
        models = {}
        for name, path in folders.items():
            try:
                models[name] = load_pruned_model(path, device)
            except Exception as exc:  # noqa: BLE001 - a missing or damaged folder, one line
                raise ValueError(f"{path} cannot be loaded ({exc_summary(exc, 120)})") from exc
        student = models.pop("model")
        return student, state, run, models

    def remove(self) -> None:
        """Drop the checkpoint once the run's outputs are all written."""
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            self.folder.parent.rmdir()  # the run's artifacts folder, if nothing else is in it
        except OSError:
            pass
