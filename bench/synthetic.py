"""Synthetic CIFAR-100 and CIFAR-10 in the real on-disk format, for tests and benchmarks on machines without the data.

`python -m bench.synthetic DIR --train 50000 --test 10000` writes DIR/cifar-100-python/{train,test,meta};
with `--dataset cifar10`, DIR/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}. The pickles are
Python 3's, or with `--python2` protocol 2 as Python 2 wrote the original archives.
"""
from __future__ import annotations

import argparse
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np

CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class _Python2Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table can be changed
    """Protocol 2 as Python 2 wrote it, which is how the original archives are: every string (keys, class
    names, an array's pixels) a Python 2 byte string (BINSTRING), and numpy's module numpy.core. Python 3's
    protocol 2 is another file: text as unicode, bytes through `_codecs.encode`, numpy 2's numpy._core."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_byte_string(self, obj: str | bytes) -> None:
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        head = pickle.SHORT_BINSTRING + bytes([len(data)]) if len(data) < 256 else \
            pickle.BINSTRING + struct.pack("<i", len(data))
        self.write(head + data)
        self.memoize(obj)

    dispatch[str] = _save_byte_string
    dispatch[bytes] = _save_byte_string

    def save_global(self, obj: Any, name: str | None = None) -> None:
        module = getattr(obj, "__module__", "") or ""
        if module.startswith("numpy._core"):
            self.write(pickle.GLOBAL + f"{module.replace('numpy._core', 'numpy.core', 1)}\n{name or obj.__name__}\n"
                       .encode("ascii"))
            self.memoize(obj)
            return
        super().save_global(obj, name)


def _dump(path: Path, obj: dict, python2: bool) -> None:
    with open(path, "wb") as f:
        if python2:
            _Python2Pickler(f, protocol=2).dump(obj)
        else:
            pickle.dump(obj, f)


def _images(n_train: int, n_test: int, used_classes: int, seed: int, learnable: bool, hard: bool
            ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(images (N, 3072) uint8, labels (N,)) of the training and the test split; see `write_cifar100`."""
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, size=(used_classes, 3, 1, 1)).astype(np.float32)
    freqs = rng.integers(1, 5, size=used_classes)
    layouts = rng.integers(0, 256, size=(used_classes, 3, 4, 4)).astype(np.float32).repeat(8, 2).repeat(8, 3)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, used_classes, size=n)
        if hard:
            data = np.empty((n, 3072), dtype=np.uint8)
            for i in range(0, n, 5000):  # in chunks: a float copy of 50,000 images would be 600 MB
                y = labels[i:i + 5000]
                other = rng.integers(0, used_classes, size=len(y))
                images = 0.6 * layouts[y] + 0.4 * layouts[other] + rng.normal(0, 40, size=(len(y), 3, 32, 32))
                data[i:i + 5000] = np.clip(images, 0, 255).astype(np.uint8).reshape(len(y), 3072)
            noisy = rng.random(n) < 0.25
            labels = np.where(noisy, rng.integers(0, used_classes, size=n), labels)
        elif learnable:
            yy = np.arange(32, dtype=np.float32)[None, None, :, None]
            stripes = np.sin(yy * freqs[labels][:, None, None, None] * np.pi / 16) * 60
            images = protos[labels] + stripes + rng.normal(0, 20, size=(n, 3, 32, 32))
            data = np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072)
        else:
            data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        return data, labels

    return [split(n_train), split(n_test)]


def write_cifar100(root: Path, n_train: int, n_test: int, *, used_classes: int = 100, seed: int = 0,
                   learnable: bool = False, hard: bool = False, python2: bool = False) -> Path:
    """Write cifar-100-python/{train,test,meta} as pickled dicts, exactly as the real files are laid out
    (`python2`: pickled as the original archive's are, else by Python 3).

    Labels are drawn from the first `used_classes` of the 100. With `learnable`, each class has its own
    colour and stripe pattern plus noise, so a model can learn it (quickly: a few epochs reach almost
    100%). With `hard`, each class is a coarse 4x4 layout of colours, every image is 60% its class's
    layout and 40% another class's, plus noise, and a quarter of the labels (in both splits) are replaced
    by a random class: top-1 cannot pass about 75% and validation loss stays near 1 or above, as on the
    real CIFAR-100, so two trainings can be compared by either. (Without the noisy labels, an H200 took
    this data to 99.99% top-1 and a loss of 0.005 in 4 epochs, where relative loss differences say
    nothing.)
    """
    root = Path(root)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, (data, labels) in zip(("train", "test"), _images(n_train, n_test, used_classes, seed, learnable, hard)):
        _dump(folder / name, {"filenames": [f"img_{i}.png" for i in range(len(labels))], "batch_label": "synthetic",
                              "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist(), "data": data},
              python2)
    _dump(folder / "meta", {"fine_label_names": [f"class_{i:02d}" for i in range(100)],
                            "coarse_label_names": [f"super_{i}" for i in range(20)]}, python2)
    return root


def write_cifar10(root: Path, n_train: int, n_test: int, *, used_classes: int = 10, seed: int = 0,
                  learnable: bool = False, hard: bool = False, python2: bool = False) -> Path:
    """Write cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} as pickled dicts, as the real
    files are laid out: the training images in five batches (of n_train / 5, the first ones one larger where
    5 does not divide it), the class names CIFAR-10's. The images and labels are `write_cifar100`'s, of
    `used_classes` of the 10."""
    if n_train < 5:
        raise ValueError(f"CIFAR-10 has five training batches: n_train must be at least 5, got {n_train}")
    root = Path(root)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    (train, train_labels), (test, test_labels) = _images(n_train, n_test, used_classes, seed, learnable, hard)

    def batch(label: str, data: np.ndarray, labels: np.ndarray) -> dict:
        return {"batch_label": label, "labels": labels.tolist(), "data": data,
                "filenames": [f"img_{i}.png" for i in range(len(labels))]}

    batches = list(zip(np.array_split(train, 5), np.array_split(train_labels, 5)))
    for i, (data, labels) in enumerate(batches, 1):
        _dump(folder / f"data_batch_{i}", batch(f"training batch {i} of 5", data, labels), python2)
    _dump(folder / "test_batch", batch("testing batch 1 of 1", test, test_labels), python2)
    _dump(folder / "batches.meta", {"num_cases_per_batch": len(batches[0][1]), "label_names": list(CIFAR10_NAMES),
                                    "num_vis": 3072}, python2)
    return root


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.synthetic", description=__doc__)
    p.add_argument("root")
    p.add_argument("--train", type=int, default=50_000)
    p.add_argument("--test", type=int, default=10_000)
    p.add_argument("--learnable", action="store_true", help="classes a model learns in a few epochs")
    p.add_argument("--hard", action="store_true", help="learnable, to about 75%% top-1 at most")
    p.add_argument("--dataset", choices=["cifar100", "cifar10"], default="cifar100")
    p.add_argument("--python2", action="store_true", help="pickled as Python 2 wrote the original archives")
    args = p.parse_args()
    write = write_cifar10 if args.dataset == "cifar10" else write_cifar100
    write(Path(args.root), args.train, args.test, learnable=args.learnable, hard=args.hard, python2=args.python2)
    print(f"wrote {args.train} training and {args.test} test images to {args.root} ({args.dataset})")


if __name__ == "__main__":
    main()
