"""Synthetic CIFAR-100 in the real on-disk format, for tests and benchmarks on machines without the data.

`python -m bench.synthetic DIR --train 50000 --test 10000` writes DIR/cifar-100-python/{train,test,meta}.
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np


def write_cifar100(root: Path, n_train: int, n_test: int, *, used_classes: int = 100, seed: int = 0,
                   learnable: bool = False) -> Path:
    """Write cifar-100-python/{train,test,meta} as pickled dicts, exactly as the real files are laid out.

    Labels are drawn from the first `used_classes` of the 100. With `learnable`, each class has its own
    colour and stripe pattern plus noise, so a model can learn it.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    protos = rng.integers(0, 256, size=(used_classes, 3, 1, 1)).astype(np.float32)
    freqs = rng.integers(1, 5, size=used_classes)

    def split(n: int) -> dict:
        labels = rng.integers(0, used_classes, size=n)
        if learnable:
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
    p.add_argument("--learnable", action="store_true")
    args = p.parse_args()
    write_cifar100(Path(args.root), args.train, args.test, learnable=args.learnable)
    print(f"wrote {args.train} training and {args.test} test images to {Path(args.root) / 'cifar-100-python'}")


if __name__ == "__main__":
    main()
