"""The real pipeline learns: on generated data whose classes are learnable, accuracy climbs far above chance."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import run_app, write_cifar100, write_config


@pytest.mark.slow
def test_climbs_well_above_chance_within_minutes(tmp_path: Path) -> None:
    data = write_cifar100(tmp_path / "data", 320, 100, used_classes=10, seed=1, learnable=True)
    cfg = write_config(tmp_path / "c.json", data={"root": str(data), "download": False},
                       train={"epochs": 5, "batch_size": 32},
                       logging={"output_dir": str(tmp_path / "runs"), "log_every_iters": 5})
    result = run_app("--config", str(cfg), "--run-name", "learn")
    assert result.returncode == 0, result.stderr
    best = json.loads((tmp_path / "runs" / "learn" / "results.json").read_text())["best"]
    # Chance is 0.1 on these 10 classes. 4 epochs of 10 steps were too few for a safe margin: this seed
    # reached 0.63 with 2 threads on the 2-core AMD EPYC machine but 0.36 with 1 (the suite's workers, whose
    # sums round in another order), and 3 epochs 0.22 there; the short run leaves BatchNorm's running
    # statistics behind the weights. 5 epochs reached 0.89 (1 thread) and 0.63 (2 threads) with this seed,
    # 0.58 with seed 1 (1 thread).
    assert best["top1"] >= 0.4, best
