"""The real CIFAR-100 and CIFAR-10 reader on files written in the real format, good and bad, pickled as
the original archives are (Python 2, protocol 2) and as Python 3 pickles."""
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
from app.data import Split, ensure_dataset, load_dataset
from app.errors import UserError
from tests.support import TEST_IMAGES, TRAIN_IMAGES, write_cifar10, write_cifar100

CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")


def load_cifar100(root: Path):
    return load_dataset(root, "cifar100")


def test_reads_images_labels_and_class_names(small_data: Path) -> None:
    data = load_cifar100(small_data)
    assert data.train.images.shape == (TRAIN_IMAGES, 3, 32, 32) and data.train.images.dtype == torch.uint8
    assert data.test.images.shape == (TEST_IMAGES, 3, 32, 32)
    assert data.train.labels.dtype == torch.int64 and len(data.train.labels) == TRAIN_IMAGES
    assert len(data.classes) == 100 and data.classes[7] == "class_07"


def _batch(path: Path) -> dict:
    """A data file as torchvision reads it (latin-1: a Python 2 pickle's byte strings as text)."""
    return pickle.loads(path.read_bytes(), encoding="latin1")


@pytest.mark.parametrize("python2", [True, False], ids=["python2-protocol2", "python3"])
def test_reads_cifar10s_five_training_batches_in_order_and_its_class_names(tmp_path: Path, python2: bool) -> None:
    """13 images: batches of 3, 3, 3, 2 and 2; the split is the five one after the other, as torchvision's."""
    root = write_cifar10(tmp_path, 13, 4, python2=python2)
    data = load_dataset(root, "cifar10")
    assert data.train.images.shape == (13, 3, 32, 32) and data.test.images.shape == (4, 3, 32, 32)
    assert data.train.images.dtype == torch.uint8 and data.train.labels.dtype == torch.int64
    files = [_batch(root / "cifar-10-batches-py" / name) for name in CIFAR10_FILES]
    assert [len(f["labels"]) for f in files[:5]] == [3, 3, 3, 2, 2]
    assert data.train.images.flatten(1).numpy().tolist() == np.concatenate([f["data"] for f in files[:5]]).tolist()
    assert data.train.labels.tolist() == sum((f["labels"] for f in files[:5]), [])
    assert data.test.labels.tolist() == files[5]["labels"]
    assert data.classes[:3] == ("airplane", "automobile", "bird") and len(data.classes) == 10


@pytest.mark.parametrize("dataset,write", [("cifar100", write_cifar100), ("cifar10", write_cifar10)])
def test_python2_and_python3_pickles_of_the_same_data_read_alike(tmp_path: Path, dataset, write) -> None:
    old, new = (load_dataset(write(tmp_path / str(p), 10, 5, python2=p), dataset) for p in (True, False))
    assert old.train.images.equal(new.train.images) and old.test.images.equal(new.test.images)
    assert old.train.labels.equal(new.train.labels) and old.classes == new.classes


def test_planes_are_red_then_green_then_blue(tmp_path: Path) -> None:
    root = write_cifar100(tmp_path, 4, 2)
    train_file = root / "cifar-100-python" / "train"
    d = pickle.loads(train_file.read_bytes())
    d["data"][0] = np.concatenate([np.full(1024, 10), np.full(1024, 20), np.full(1024, 30)]).astype(np.uint8)
    train_file.write_bytes(pickle.dumps(d))
    first = load_cifar100(root).train.images[0]
    assert first[0].unique().tolist() == [10] and first[1].unique().tolist() == [20]
    assert first[2].unique().tolist() == [30]


def _corrupt(root: Path, name: str, change, folder: str = "cifar-100-python") -> Path:
    path = root / folder / name
    d = _batch(path)
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


@pytest.mark.parametrize("name,change,words", [
    ("data_batch_3", lambda d: d.pop("labels"), "missing key 'labels'"),
    ("data_batch_5", lambda d: d.update(labels=[10] * len(d["labels"])), "labels must lie in 0..9, found 10..10"),
    ("test_batch", lambda d: d.update(data=d["data"][:, :100]), "shape (N, 3072)"),
    ("data_batch_2", lambda d: d.update(data=d["data"][:0], labels=[]), "holds no images ('data' has 0 rows); use a "
                                                                        "complete copy of CIFAR-10"),
    ("data_batch_4", lambda d: d["labels"].__setitem__(0, 1.5), "'labels' must be a list of integers, found 1.5"),
    ("batches.meta", lambda d: d.update(label_names=d["label_names"][:9]), "'label_names' must be a list of 10 "
                                                                           "strings"),
])
def test_a_malformed_cifar10_file_is_named(tmp_path: Path, name, change, words) -> None:
    path = _corrupt(write_cifar10(tmp_path, 10, 4, python2=True), name, change, "cifar-10-batches-py")
    with pytest.raises(UserError) as e:
        load_dataset(tmp_path, "cifar10")
    assert str(path) in str(e.value) and words in str(e.value)


def test_a_missing_or_truncated_cifar10_file_is_named(tmp_path: Path) -> None:
    root = write_cifar10(tmp_path, 10, 4, python2=True)
    folder = root / "cifar-10-batches-py"
    (folder / "data_batch_4").unlink()
    with pytest.raises(UserError, match=f"^{folder / 'data_batch_4'}: CIFAR-10 file not found$"):
        load_dataset(root, "cifar10")
    with pytest.raises(UserError) as e:
        ensure_dataset(root, "cifar10", download=False)
    assert str(e.value) == (f"{folder / 'data_batch_4'}: CIFAR-10 not found and data.download is false; download "
                            f"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it into {root}/ "
                            f"(so that {folder / 'data_batch_1'} exists)")
    write_cifar10(root, 10, 4, python2=True)
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:300])
    with pytest.raises(UserError, match=f"^{folder / 'test_batch'}: not a readable CIFAR-10 pickle"):
        load_dataset(root, "cifar10")


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
