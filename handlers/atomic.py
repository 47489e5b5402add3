"""Files that are never seen half-written: write a temporary file beside the target, flush it to disk,
rename it over the target, and flush the folder so that the rename itself survives a power cut.

The temporary file comes from mkstemp, which makes it private (0600) whatever the umask; it is given
the mode any other tool's file would have (0666 less the umask) before it takes the target's name, so
that a colleague, a backup job or a TensorBoard served by another account can read a run."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

TEMP_PREFIX = ".partial-"


class OutputWriteError(RuntimeError):
    """A file of the run could not be written (a full disk, say); the message names it."""

    @staticmethod
    @contextlib.contextmanager
    def naming(path: Path, what: str) -> Iterator[None]:
        """Turn an OSError inside into an OutputWriteError that names `path`."""
        try:
            yield
        except OSError as e:
            raise OutputWriteError(f"{path}: {what} ({e.strerror or e})") from None


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    path = Path(path)
    with OutputWriteError.naming(path, "cannot write"):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX)
        try:
            os.fchmod(fd, 0o666 & ~umask())
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_folder(path.parent)


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_atomic(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries, so that a rename into it survives a power cut."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def umask() -> int:
    """The process's umask, read without changing it (os.umask can only be read by setting it, which
    would briefly change the mode of files other threads create)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_partial_files(folder: str | Path) -> None:
    """Delete what a process killed in the middle of a write left behind."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(f"{TEMP_PREFIX}*"):
            p.unlink(missing_ok=True)
