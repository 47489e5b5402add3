"""The real CIFAR-100 reader on files written in the real format, good and bad."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from app.checkpoint import data_fingerprint, data_fingerprint_in_background
from app.data import Split, load_cifar100
from app.errors import UserError
from tests.support import TEST_IMAGES, TRAIN_IMAGES, write_cifar100


def test_reads_images_labels_and_class_names(small_data: Path) -> None:
    data = load_cifar100(small_data)
    assert data.train.images.shape == (TRAIN_IMAGES, 3, 32, 32) and data.train.images.dtype == torch.uint8
    assert data.test.images.shape == (TEST_IMAGES, 3, 32, 32)
    assert data.train.labels.dtype == torch.int64 and len(data.train.labels) == TRAIN_IMAGES
    assert len(data.classes) == 100 and data.classes[7] == "class_07"


def test_planes_are_red_then_green_then_blue(tmp_path: Path) -> None:
    root = write_cifar100(tmp_path, 4, 2)
    train_file = root / "cifar-100-python" / "train"
    d = pickle.loads(train_file.read_bytes())
    d["data"][0] = np.concatenate([np.full(1024, 10), np.full(1024, 20), np.full(1024, 30)]).astype(np.uint8)
    train_file.write_bytes(pickle.dumps(d))
    first = load_cifar100(root).train.images[0]
    assert first[0].unique().tolist() == [10] and first[1].unique().tolist() == [20]
    assert first[2].unique().tolist() == [30]


def _corrupt(root: Path, name: str, change) -> Path:
    path = root / "cifar-100-python" / name
    d = pickle.loads(path.read_bytes())
    change(d)
    path.write_bytes(pickle.dumps(d))
    return path


@pytest.mark.parametrize("name,change,words", [
    ("train", lambda d: d.pop("fine_labels"), "missing key 'fine_labels'"),
    ("test", lambda d: d.update(data=d["data"][:, :100]), "shape (N, 3072)"),
    ("train", lambda d: d.update(data=d["data"].astype(np.float32)), "uint8"),
    ("test", lambda d: d.update(fine_labels=d["fine_labels"][:-1]), "fine_labels"),
    ("train", lambda d: d.update(fine_labels=[100] * len(d["fine_labels"])), "0..99"),
    ("meta", lambda d: d.update(fine_label_names=["a"] * 3), "fine_label_names"),
    ("train", lambda d: d.update(data=d["data"][:0], fine_labels=[]), "holds no images ('data' has 0 rows)"),
    ("test", lambda d: d.update(data=d["data"][:0], fine_labels=[]), "holds no images ('data' has 0 rows)"),
    ("train", lambda d: d["fine_labels"].__setitem__(3, 1.5), "must be a list of integers, found 1.5 at index 3"),
    ("test", lambda d: d["fine_labels"].__setitem__(0, True), "must be a list of integers, found True at index 0"),
    ("train", lambda d: d["fine_labels"].__setitem__(1, "7"), "must be a list of integers, found '7' at index 1"),
    ("train", lambda d: d.update(fine_labels=np.asarray(d["fine_labels"], dtype=np.float64)),
     "must be a list of integers, found an array of float64"),
    ("test", lambda d: d["fine_labels"].__setitem__(2, 2**70), "0..99, found an integer beyond 64 bits"),
])
def test_malformed_file_is_named(tmp_path: Path, name, change, words) -> None:
    path = _corrupt(write_cifar100(tmp_path, 8, 4), name, change)
    with pytest.raises(UserError) as e:
        load_cifar100(tmp_path)
    assert str(path) in str(e.value) and words in str(e.value)


def test_data_file_cannot_run_code(tmp_path: Path) -> None:
    root = write_cifar100(tmp_path, 8, 4)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (root / "cifar-100-python" / "train").write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(UserError, match="refusing to load global"):
        load_cifar100(root)
    assert not marker.exists()


def test_truncated_file_is_named(tmp_path: Path) -> None:
    root = write_cifar100(tmp_path, 8, 4)
    path = root / "cifar-100-python" / "test"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match=str(path)):
        load_cifar100(root)


def test_the_fingerprint_hashes_every_byte_as_checkpoints_have_it_also_in_the_background(small_data: Path) -> None:
    """Checkpoints hold the fingerprint, so hashing the tensors in place must give what hashing their
    copies as bytes gave (train images, train labels, test images, test labels); the one computed in a
    thread (while a run's device is set up) is the same, and what fails there is raised to the caller."""
    data = load_cifar100(small_data)
    copied = hashlib.sha256()
    for split in (data.train, data.test):
        copied.update(split.images.numpy().tobytes())
        copied.update(split.labels.numpy().tobytes())
    assert data_fingerprint(data) == copied.hexdigest()[:16]
    assert data_fingerprint_in_background(data).result(timeout=60) == data_fingerprint(data)
    images = data.test.images.clone()
    images[-1, -1, -1, -1] ^= 1  # one bit of the last pixel hashed
    assert data_fingerprint(dataclasses.replace(data, test=Split(images, data.test.labels))) != data_fingerprint(data)
    broken = dataclasses.replace(data, test=Split(None, data.test.labels))  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        data_fingerprint_in_background(broken).result(timeout=60)
