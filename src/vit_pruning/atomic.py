"""Write output files atomically (temp file in the same folder + rename), never over existing ones."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: str | Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Write a file via `write(tmp_path)` then rename into place; nothing half-written survives."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; not overwriting it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str, overwrite: bool = False) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), overwrite)


def atomic_write_json(path: str | Path, data: Any, overwrite: bool = False) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n",
                             overwrite)
