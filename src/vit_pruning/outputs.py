"""A CLI run's outputs: checked before any work, claimed by one run, written all or nothing.

A run names its outputs up front (report JSON, Markdown and plot; the pruned model folder; the
adapter), and :func:`check_outputs` refuses, in one line naming the flag, any that cannot be
written: a path through a file, a directory that is a file, one that is not writable, a name
longer than the file system allows, or a previous run's file in the way. :class:`RunOutputs`
then claims the names for this process (an exclusive ``flock`` per output, released by the
kernel however the process ends, so two runs with one ``--run-id`` cannot both proceed) and
removes what killed runs left behind. Everything is written into hidden staging folders
beside its destination (``.vit-2ssp-partial.<pid>.<run_id>.<random>``) and renamed into place
in one quick sequence at the end, undone if any rename fails: a run leaves every output or
none, whatever stops it.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import PARTIAL, partial_owner_alive

log = logging.getLogger(__name__)

# the longest suffix a staged name gets beyond its final name (see atomic.partial_prefix)
STAGING_OVERHEAD = len(PARTIAL) + 2 + 10 + 12


class OutputError(ValueError):
    """An output location that cannot be written: one line naming the flag."""


class TakenError(OutputError):
    """An output name another run has: its output is there, or a run is writing it now."""


@dataclass(frozen=True)
class Output:
    """One output of a run: its final path, the flag that sets its directory, and whether it
    is a folder (the pruned model)."""

    role: str
    path: Path
    flag: str
    folder: bool = False


def _first_existing(path: Path) -> Path:
    p = path
    while not p.exists() and not p.is_symlink():
        if p.parent == p:
            break
        p = p.parent
    return p


def check_outputs(outputs: list[Output]) -> None:
    """Raise OutputError (one line) for the first output that cannot be written; writes
    nothing but, in an existing directory, a probe file it removes at once."""
    for out in outputs:
        parent = out.path.parent
        base = _first_existing(parent)
        if base.is_symlink() and not base.exists():
            raise OutputError(f"{out.flag} {parent}: {base} is a broken symbolic link")
        if not base.is_dir():
            where = "is a file" if base == parent else f"goes through the file {base}"
            raise OutputError(f"{out.flag} {parent}: the path {where}, not a directory")
        if out.path.exists() or out.path.is_symlink():
            raise TakenError(f"--run-id: {out.path} already exists (a previous run's output); "
                              f"choose another --run-id or move it away")
        try:
            name_max = os.pathconf(base, "PC_NAME_MAX")
        except (OSError, ValueError):
            name_max = 255
        for part in [*parent.relative_to(base).parts, out.path.name]:
            if len(part.encode()) + STAGING_OVERHEAD > name_max:
                raise OutputError(f"{out.flag} / --run-id: the name {part[:40]!r}... "
                                  f"({len(part.encode())} bytes) is too long for this file system "
                                  f"(at most {name_max - STAGING_OVERHEAD} here)")
        if not os.access(base, os.W_OK | os.X_OK):
            raise OutputError(f"{out.flag} {parent}: {base} is not writable")
        try:  # permissions can say yes where the file system says no (read-only mounts)
            with tempfile.TemporaryFile(dir=base, prefix=f"{PARTIAL}.probe."):
                pass
        except OSError as exc:
            raise OutputError(f"{out.flag} {parent}: cannot write in {base} "
                              f"({os.strerror(exc.errno) if exc.errno else exc})") from exc


def _lock_path(path: Path) -> Path:
    """The lock file of an output: in a shared folder of the system's temporary directory (sticky
    and world-writable, so every user's runs see each other), else in one of this user's."""
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:20]
    shared = Path(tempfile.gettempdir()) / "vit-2ssp-locks"
    try:
        shared.mkdir(exist_ok=True)
        if shared.stat().st_uid == os.getuid():
            shared.chmod(0o1777)
        if os.access(shared, os.W_OK | os.X_OK):
            return shared / f"{key}.lock"
    except OSError:
        pass
    own = Path(tempfile.gettempdir()) / f"vit-2ssp-locks-{os.getuid()}"
    own.mkdir(mode=0o700, exist_ok=True)
    return own / f"{key}.lock"


@dataclass
class RunOutputs:
    """The outputs of one run (see the module docstring). Use as a context manager around the
    work: it claims the names on entry and releases them on exit; :meth:`stage` gives the
    staging path of an output, :meth:`commit` renames everything staged into place."""

    run_id: str
    outputs: list[Output]
    _locks: list[int] = field(default_factory=list)
    _staging: dict[Path, Path] = field(default_factory=dict)  # destination dir -> staging dir
    _created: list[Path] = field(default_factory=list)  # directories this run made
    committed: bool = False

    def by_role(self, role: str) -> Output:
        return next(o for o in self.outputs if o.role == role)

    def __enter__(self) -> "RunOutputs":
        try:
            for out in sorted(self.outputs, key=lambda o: str(o.path)):
                fd = os.open(_lock_path(out.path), os.O_RDONLY | os.O_CREAT, 0o644)  # flock needs no write
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    os.close(fd)
                    if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise TakenError(f"--run-id {self.run_id}: another vit-2ssp run is writing "
                                          f"{out.path} now; choose another --run-id") from exc
                    raise
                self._locks.append(fd)
            check_outputs(self.outputs)  # again, now that no other run can take the names
            self._remove_stale()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.discard()
        self._release()

    def _release(self) -> None:
        for fd in self._locks:
            os.close(fd)  # closing releases the flock
        self._locks.clear()

    def _remove_stale(self) -> None:
        """Remove staging folders and files that runs killed mid-write left behind (their
        process is gone); a warning names each."""
        for folder in {o.path.parent for o in self.outputs}:
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if entry.name.startswith(PARTIAL + ".") and not partial_owner_alive(entry.name):
                    log.warning("removing %s, left by a vit-2ssp run that was killed while writing",
                                entry)
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)

    def stage(self, role: str) -> Path:
        """Where to write the output `role` now: a path of the same name inside a staging
        folder beside its destination (created on first use, with the destination's missing
        parents)."""
        out = self.by_role(role)
        dest = out.path.parent
        if dest not in self._staging:
            missing = []
            p = dest
            while not p.exists():
                missing.append(p)
                p = p.parent
            dest.mkdir(parents=True, exist_ok=True)
            self._created.extend(reversed(missing))
            self._staging[dest] = Path(tempfile.mkdtemp(
                prefix=f"{PARTIAL}.{os.getpid()}.{self.run_id[:40]}.", dir=dest))
        return self._staging[dest] / out.path.name

    def commit(self) -> None:
        """Rename every staged output into place; if one rename fails, undo the others and
        raise (nothing of the run stays)."""
        done: list[tuple[Path, Path]] = []
        try:
            for out in self.outputs:
                staged = self._staging.get(out.path.parent, Path("/nonexistent")) / out.path.name
                if not (staged.exists() or staged.is_symlink()):
                    continue
                if out.path.exists() or out.path.is_symlink():  # cannot happen under the lock
                    raise OutputError(f"--run-id: {out.path} appeared during the run; nothing kept")
                os.rename(staged, out.path)
                done.append((out.path, staged))
        except BaseException:
            for final, staged in reversed(done):
                os.rename(final, staged)
            raise
        self.committed = True

    def discard(self) -> None:
        """Remove the staging folders (after a commit they hold nothing of value), and the
        directories this run created if they stayed empty."""
        for staging in self._staging.values():
            shutil.rmtree(staging, ignore_errors=True)
        self._staging.clear()
        if not self.committed:
            for d in reversed(self._created):
                try:
                    d.rmdir()
                except OSError:
                    pass
        self._created.clear()
