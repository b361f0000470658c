"""Atomic file writes: write to a temporary name in the same folder, then rename.

A process killed or interrupted mid-write leaves either the old file or nothing, never half a file
(the data is not fsynced: after a power loss the new file may be empty).
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    if path.is_dir():  # else the rename's error would name the temporary file
        raise IsADirectoryError(errno.EISDIR, "a folder where a file is to be written", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def occupied(path: str | os.PathLike) -> bool:
    """Whether ``path`` exists as anything but an empty folder (an output folder must not be:
    outputs of two runs in one folder would read as one run)."""
    path = Path(path)
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def require_new_folder(path: str | os.PathLike) -> None:
    """A usage error unless ``path`` is absent or an empty folder."""
    from exporter.errors import UsageError

    if occupied(path):
        raise UsageError(f"{path} exists and is not an empty folder; choose another --out or delete it")


def require_staged_folder(path: str | os.PathLike) -> Path:
    """``require_new_folder`` for an output written beside it as ``<name>.partial`` and renamed into
    place at the end (export, build): a name to put beside (not ``.`` or ``..``) and a folder, not a
    symbolic link to one (the rename would fail after all the work)."""
    from exporter.errors import UsageError

    path = Path(path)
    if path.name in ("", ".", ".."):
        raise UsageError(f"--out {path}: give the output folder a name (it is written as <name>.partial beside it)")
    if path.is_symlink():
        raise UsageError(f"--out {path} is a symbolic link; give the folder it points to, or a new one")
    require_new_folder(path)
    return path
