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
                       train={"epochs": 4, "batch_size": 32},
                       logging={"output_dir": str(tmp_path / "runs"), "log_every_iters": 5})
    result = run_app("--config", str(cfg), "--run-name", "learn")
    assert result.returncode == 0, result.stderr
    best = json.loads((tmp_path / "runs" / "learn" / "results.json").read_text())["best"]
    # Chance is 0.1 on these 10 classes. This seed reaches 0.63 on the 2-core AMD EPYC machine; with 3 epochs
    # it reached 0.61 on an earlier machine and only 0.22 on this one, whose float rounding differs: 3 epochs
    # of 10 steps leave BatchNorm's running statistics too far behind the weights for a safe margin.
    assert best["top1"] >= 0.4, best
