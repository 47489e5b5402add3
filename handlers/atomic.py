"""Files that are never seen half-written: write a temporary file beside the target, flush it to disk,
rename it over the target, and flush the folder so that the rename itself survives a power cut."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable

TEMP_PREFIX = ".partial-"


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_partial_files(folder: str | Path) -> None:
    """Delete what a process killed in the middle of a write left behind."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(f"{TEMP_PREFIX}*"):
            p.unlink(missing_ok=True)
