"""Shared fixtures: small CIFAR-100 data sets written in the real on-disk format, and a way to run the CLI."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def write_cifar100(root: Path, n_train: int, n_test: int, *, used_classes: int = 100, seed: int = 0,
                   learnable: bool = False) -> Path:
    """Write cifar-100-python/{train,test,meta} as pickled dicts, exactly as the real files are laid out.

    Labels are drawn from the first `used_classes` of the 100. With `learnable`, each class has its own
    colour and stripe pattern plus noise, so a model can learn it.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    if learnable:
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


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """240 training and 50 test images: enough for an end-to-end run in seconds."""
    return write_cifar100(tmp_path_factory.mktemp("cifar"), 240, 50)


def write_config(path: Path, **sections) -> Path:
    """A config file that is the project's config.json with some sections overridden."""
    cfg = json.loads((ROOT / "config.json").read_text())
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg[section].update(values)
        else:
            cfg[section] = values
    path.write_text(json.dumps(cfg, indent=2))
    return path


def run_app(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """`python -m app ARGS` in a fresh process, the way a user runs it."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
