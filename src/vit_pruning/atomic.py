"""Write output files atomically (temp file in the same folder + rename), never over existing ones.

Temporary names are ``.vit-2ssp-partial.<pid>.<name>.<random>``: a later run recognizes one
whose process is gone (killed mid-write) and removes it (:mod:`vit_pruning.outputs`)."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

PARTIAL = ".vit-2ssp-partial"


def partial_prefix(name: str) -> str:
    """The prefix of a temporary file or folder written on the way to `name`."""
    return f"{PARTIAL}.{os.getpid()}.{name[:40]}."


def partial_owner_alive(entry_name: str) -> bool:
    """Whether the process that made a temporary entry (see :func:`partial_prefix`) still runs."""
    try:
        pid = int(entry_name[len(PARTIAL) + 1:].split(".", 1)[0])
    except ValueError:
        return True  # not ours to judge
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def atomic_write(path: str | Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Write a file via `write(tmp_path)` then rename into place; nothing half-written survives."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; not overwriting it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=partial_prefix(path.name), dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600: readable as any file the user writes
        if overwrite:
            os.replace(tmp, path)
        else:  # link fails if the name was taken meanwhile: never over another writer's file
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"{path} already exists; not overwriting it") from None
            except OSError:  # a file system without hard links: checked, then renamed
                if path.exists():
                    raise FileExistsError(f"{path} already exists; not overwriting it") from None
                os.replace(tmp, path)
            else:
                os.unlink(tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux's
    /proc/self/status): setting it to read it back would, for a moment, leave files another
    thread creates open to everyone."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # elsewhere: the briefest change, to the safer side
    os.umask(mask)
    return mask


def _finite(value: Any) -> Any:
    """JSON has no NaN or Infinity: such floats become null (strict readers reject them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def atomic_write_text(path: str | Path, text: str, overwrite: bool = False) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), overwrite)


def atomic_write_json(path: str | Path, data: Any, overwrite: bool = False) -> Path:
    text = json.dumps(_finite(json.loads(json.dumps(data, default=str))), indent=2,
                      sort_keys=False, allow_nan=False)
    return atomic_write_text(path, text + "\n", overwrite)
