"""CIFAR-100 from its on-disk python format into uint8 tensors, checked by structure rather than md5.

Any faithful copy of `cifar-100-python/{train,test,meta}` works; a file with the wrong keys, shapes,
dtype or label range is rejected with an error that names it. The files are pickles, so they are read
with an unpickler that only rebuilds numpy arrays and plain containers: a data file cannot run code.
"""
from __future__ import annotations

import io
import pickle
import reprlib
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from app.errors import UserError

FOLDER = "cifar-100-python"
IMAGE_SHAPE = (3, 32, 32)
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("builtins", "bytearray"),
    ("_codecs", "encode"),
}


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # (N, 3, 32, 32) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Cifar100:
    train: Split
    test: Split
    classes: tuple[str, ...]


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(io.BufferedReader(f), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise UserError(f"{path}: not a readable CIFAR-100 pickle ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return obj


def _first_non_integer(labels: Any) -> str:
    """What in `labels` is not an integer ("" if nothing): a cast to int64 would turn 1.5 into 1, True
    into 1 and "7" into 7, and training would use labels that the file does not hold."""
    if isinstance(labels, np.ndarray):
        return "" if labels.dtype.kind in "iu" else f"an array of {labels.dtype}"
    if not isinstance(labels, (list, tuple)):
        return type(labels).__name__

    def integer(t: type) -> bool:
        return t is int or issubclass(t, np.integer)  # exact: bool, a subclass of int, is refused

    if all(integer(t) for t in set(map(type, labels))):  # one check per distinct type: fast for 50,000
        return ""
    index, value = next((i, v) for i, v in enumerate(labels) if not integer(type(v)))
    return f"{reprlib.repr(value)} at index {index}"


def _read_split(path: Path, num_classes: int) -> Split:
    d = _unpickle(path)
    for key in ("data", "fine_labels"):
        if key not in d:
            raise UserError(f"{path}: missing key '{key}'")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}"
        raise UserError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), found {desc}")
    if data.shape[0] == 0:
        raise UserError(f"{path}: holds no images ('data' has 0 rows); use a complete copy of CIFAR-100")
    not_integer = _first_non_integer(d["fine_labels"])
    if not_integer:
        raise UserError(f"{path}: 'fine_labels' must be a list of integers, found {not_integer}")
    try:
        labels = np.asarray(d["fine_labels"], dtype=np.int64)
    except OverflowError:
        raise UserError(f"{path}: fine_labels must lie in 0..{num_classes - 1}, found an integer beyond 64 bits"
                        ) from None
    if labels.shape != (data.shape[0],):
        raise UserError(f"{path}: {data.shape[0]} images but {labels.size} fine_labels")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"{path}: fine_labels must lie in 0..{num_classes - 1}, "
                        f"found {labels.min()}..{labels.max()}")
    images = torch.from_numpy(data.reshape(-1, *IMAGE_SHAPE).copy())
    return Split(images=images, labels=torch.from_numpy(labels))


def _read_classes(path: Path, num_classes: int) -> tuple[str, ...]:
    names = _unpickle(path).get("fine_label_names")
    if not isinstance(names, list) or len(names) != num_classes or not all(isinstance(n, str) for n in names):
        raise UserError(f"{path}: 'fine_label_names' must be a list of {num_classes} strings")
    return tuple(names)


def dataset_dir(root: str | Path) -> Path:
    return Path(root) / FOLDER


def missing_files(root: str | Path) -> list[Path]:
    folder = dataset_dir(root)
    return [folder / name for name in ("train", "test", "meta") if not (folder / name).is_file()]


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def ensure_dataset(root: str | Path, download: bool) -> None:
    """Make sure the three files exist under `root`, downloading them once if allowed.

    Fails fast (a short socket timeout) on a machine without network, with a message saying how to get
    the data by hand.
    """
    missing = missing_files(root)
    if not missing:
        return
    how = (f"download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and extract it into {root}/ "
           f"(so that {dataset_dir(root)}/train exists)")
    if not download:
        raise UserError(f"{missing[0]}: CIFAR-100 not found and data.download is false; {how}")
    from torchvision.datasets import CIFAR100  # imported here: only needed for the one-off download

    try:
        with _socket_timeout(10.0):
            CIFAR100(root=str(root), train=True, download=True)
    except Exception as e:  # noqa: BLE001 - any failure of the download ends in the same advice
        raise UserError(f"{dataset_dir(root)}: CIFAR-100 not found and the download failed ({e}); {how}") from None
    if missing_files(root):
        raise UserError(f"{missing_files(root)[0]}: still missing after the download; {how}")


def load_cifar100(root: str | Path, num_classes: int = 100) -> Cifar100:
    """Read and check the three files. Call `ensure_dataset` first."""
    folder = dataset_dir(root)
    missing = missing_files(root)
    if missing:
        raise UserError(f"{missing[0]}: CIFAR-100 file not found")
    return Cifar100(
        train=_read_split(folder / "train", num_classes),
        test=_read_split(folder / "test", num_classes),
        classes=_read_classes(folder / "meta", num_classes),
    )
