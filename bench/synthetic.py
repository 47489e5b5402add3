"""Synthetic CIFAR-100 in the real on-disk format, for tests and benchmarks on machines without the data.

`python -m bench.synthetic DIR --train 50000 --test 10000` writes DIR/cifar-100-python/{train,test,meta}.
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np


def write_cifar100(root: Path, n_train: int, n_test: int, *, used_classes: int = 100, seed: int = 0,
                   learnable: bool = False, hard: bool = False) -> Path:
    """Write cifar-100-python/{train,test,meta} as pickled dicts, exactly as the real files are laid out.

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
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    protos = rng.integers(0, 256, size=(used_classes, 3, 1, 1)).astype(np.float32)
    freqs = rng.integers(1, 5, size=used_classes)
    layouts = rng.integers(0, 256, size=(used_classes, 3, 4, 4)).astype(np.float32).repeat(8, 2).repeat(8, 3)

    def split(n: int) -> dict:
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
        return {"filenames": [f"img_{i}.png" for i in range(n)], "batch_label": "synthetic",
                "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist(), "data": data}

    for name, n in (("train", n_train), ("test", n_test)):
        with open(folder / name, "wb") as f:
            pickle.dump(split(n), f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class_{i:02d}" for i in range(100)],
                     "coarse_label_names": [f"super_{i}" for i in range(20)]}, f)
    return root


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.synthetic", description=__doc__)
    p.add_argument("root")
    p.add_argument("--train", type=int, default=50_000)
    p.add_argument("--test", type=int, default=10_000)
    p.add_argument("--learnable", action="store_true", help="classes a model learns in a few epochs")
    p.add_argument("--hard", action="store_true", help="learnable, to about 75%% top-1 at most")
    args = p.parse_args()
    write_cifar100(Path(args.root), args.train, args.test, learnable=args.learnable, hard=args.hard)
    print(f"wrote {args.train} training and {args.test} test images to {Path(args.root) / 'cifar-100-python'}")


if __name__ == "__main__":
    main()
