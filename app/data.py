"""CIFAR-100 or CIFAR-10 from its on-disk python format into uint8 tensors, checked by structure rather than md5.

Any faithful copy of a data set's files works (app/datasets.py: `cifar-100-python/{train,test,meta}`,
`cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`); a file with the wrong keys, shapes,
dtype or label range is rejected with an error that names it. The files are pickles, so they are read
with an unpickler that only rebuilds numpy arrays and plain containers: a data file cannot run code.
The original archives hold Python 2 pickles (protocol 2), whose byte strings (the keys, the class names,
an array's pixels) read as text through latin-1, as torchvision reads them; Python 3 pickles read alike.
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

from app.datasets import DATASETS, DataSet
from app.errors import UserError

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
class CifarData:
    train: Split
    test: Split
    classes: tuple[str, ...]


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _unpickle(path: Path, spec: DataSet) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(io.BufferedReader(f), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise UserError(f"{path}: not a readable {spec.title} pickle ({e})") from None
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


def _read_batch(path: Path, spec: DataSet) -> tuple[np.ndarray, np.ndarray]:
    """One data file's images (N, 3072) and labels (N,), checked."""
    d = _unpickle(path, spec)
    key = spec.labels_key
    for k in ("data", key):
        if k not in d:
            raise UserError(f"{path}: missing key '{k}'")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}"
        raise UserError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), found {desc}")
    if data.shape[0] == 0:
        raise UserError(f"{path}: holds no images ('data' has 0 rows); use a complete copy of {spec.title}")
    not_integer = _first_non_integer(d[key])
    if not_integer:
        raise UserError(f"{path}: '{key}' must be a list of integers, found {not_integer}")
    last = spec.classes - 1
    try:
        labels = np.asarray(d[key], dtype=np.int64)
    except OverflowError:
        raise UserError(f"{path}: {key} must lie in 0..{last}, found an integer beyond 64 bits") from None
    if labels.shape != (data.shape[0],):
        raise UserError(f"{path}: {data.shape[0]} images but {labels.size} {key}")
    if labels.min() < 0 or labels.max() > last:
        raise UserError(f"{path}: {key} must lie in 0..{last}, found {labels.min()}..{labels.max()}")
    return data, labels


def _read_split(paths: list[Path], spec: DataSet) -> Split:
    """The images and labels of `paths` (CIFAR-10's five training batches, say), in that order."""
    images, labels = zip(*(_read_batch(path, spec) for path in paths))
    # One array of its own: an unpickled array can be read-only, which torch.from_numpy warns of.
    data = np.concatenate(images) if len(images) > 1 else images[0].copy()
    return Split(images=torch.from_numpy(data.reshape(-1, *IMAGE_SHAPE)),
                 labels=torch.from_numpy(np.concatenate(labels)))


def _read_classes(path: Path, spec: DataSet) -> tuple[str, ...]:
    names = _unpickle(path, spec).get(spec.names_key)
    if not isinstance(names, list) or len(names) != spec.classes or not all(isinstance(n, str) for n in names):
        raise UserError(f"{path}: '{spec.names_key}' must be a list of {spec.classes} strings")
    return tuple(names)


def dataset_dir(root: str | Path, dataset: str) -> Path:
    return Path(root) / DATASETS[dataset].folder


def missing_files(root: str | Path, dataset: str) -> list[Path]:
    spec, folder = DATASETS[dataset], dataset_dir(root, dataset)
    names = (*spec.train_files, spec.test_file, spec.meta_file)
    return [folder / name for name in names if not (folder / name).is_file()]


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def ensure_dataset(root: str | Path, dataset: str, download: bool) -> None:
    """Make sure the data set's files exist under `root`, downloading them once (through torchvision) if allowed.

    Fails fast (a short socket timeout) on a machine without network, with a message saying how to get
    the data by hand.
    """
    missing = missing_files(root, dataset)
    if not missing:
        return
    spec, folder = DATASETS[dataset], dataset_dir(root, dataset)
    how = (f"download {spec.archive} and extract it into {root}/ "
           f"(so that {folder}/{spec.train_files[0]} exists)")
    if not download:
        raise UserError(f"{missing[0]}: {spec.title} not found and data.download is false; {how}")
    import torchvision.datasets  # imported here: only needed for the one-off download

    try:
        with _socket_timeout(10.0):
            getattr(torchvision.datasets, spec.torchvision_class)(root=str(root), train=True, download=True)
    except Exception as e:  # noqa: BLE001 - any failure of the download ends in the same advice
        raise UserError(f"{folder}: {spec.title} not found and the download failed ({e}); {how}") from None
    if missing_files(root, dataset):
        raise UserError(f"{missing_files(root, dataset)[0]}: still missing after the download; {how}")


def load_dataset(root: str | Path, dataset: str) -> CifarData:
    """Read and check the data set's files (`dataset`: a key of app/datasets.py's DATASETS). Call
    `ensure_dataset` first."""
    spec, folder = DATASETS[dataset], dataset_dir(root, dataset)
    missing = missing_files(root, dataset)
    if missing:
        raise UserError(f"{missing[0]}: {spec.title} file not found")
    return CifarData(
        train=_read_split([folder / name for name in spec.train_files], spec),
        test=_read_split([folder / spec.test_file], spec),
        classes=_read_classes(folder / spec.meta_file, spec),
    )
