"""Several processes (real torch.distributed, gloo): one code path, rank-0-only files, exact metrics."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.evaluate import evaluate_checkpoint
from handlers.metrics_csv import read_metrics_csv
from tests.support import ROOT, app_env, run_app, run_lines, write_cifar100, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory) -> Path:
    """The test set (51 images) does not split evenly over 2 processes."""
    return write_cifar100(tmp_path_factory.mktemp("uneven"), 128, 51, seed=3)


def _config(tmp_path: Path, data: Path, epochs: int = 1, **sections: dict) -> Path:
    return write_config(tmp_path / "c.json", data={"root": str(data), "download": False},
                        train={"epochs": epochs, "batch_size": 32},
                        eval={"batch_size": 10},
                        logging={"output_dir": str(tmp_path / "runs"), "log_every_iters": 2,
                                 # a progress line off the loss intervals: its flush is a collective, which
                                 # every process must join, not only rank 0, which writes the line
                                 "progress_every_iters": 3}, **sections)


def test_two_spawned_processes_give_the_one_process_metrics_of_the_same_checkpoint(tmp_path: Path,
                                                                                    uneven_data: Path) -> None:
    """The model's figures and, beside them, the weights' EMA's: each process keeps its own EMA, whose BatchNorm
    statistics (averaged, ema.buffers "update", after a warm-up) come from its own batches, so the logged figures
    are the checkpoint's only if every process evaluated rank 0's EMA."""
    ema = {"decay": 0.9, "warmup_iters": 3, "warmup_decay": 0.5, "buffers": "update"}
    result = run_app("--config", str(_config(tmp_path, uneven_data, ema=ema)), "--run-name", "ddp",
                     "--nproc-per-node", "2", "--backend", "gloo")
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "ddp"
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["ddp"]
    epoch_lines = [line for line in run_lines(result.stdout) if line.startswith("epoch ")]
    assert len(epoch_lines) == 1  # printed by rank 0 only
    assert [line.split()[1] for line in run_lines(result.stdout) if line.startswith("iteration ")] == ["3/4"]
    logged = json.loads((run_dir / "results.json").read_text())["final"]
    # 128 images, global batch 32 = 16 per process: 4 iterations per epoch
    checkpoint = run_dir / "checkpoints" / "training_checkpoint_4.pt"
    alone = evaluate_checkpoint(checkpoint, str(uneven_data))
    assert logged["top1"] == alone["top1"] and logged["top5"] == alone["top5"]
    assert logged["loss"] == pytest.approx(alone["loss"], rel=1e-5)
    # 51 images counted once each: accuracies are multiples of 1/51
    assert round(alone["top5"] * 51, 6) == round(alone["top5"] * 51)
    [row] = read_metrics_csv(run_dir / "metrics.csv")  # rank 0's, of the one epoch
    ema_alone = evaluate_checkpoint(checkpoint, str(uneven_data), ema=True)
    assert (float(row["ema_top1"]), float(row["ema_top5"])) == (ema_alone["top1"], ema_alone["top5"])
    assert float(row["ema_loss"]) == pytest.approx(ema_alone["loss"], rel=1e-5)
    assert ema_alone["loss"] != pytest.approx(alone["loss"], rel=1e-5)  # the EMA's figures, not the model's again


def test_torchrun_runs_the_same_code_path(tmp_path: Path, uneven_data: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "app", "--config", str(_config(tmp_path, uneven_data)), "--run-name", "tr"]
    result = subprocess.run(cmd, cwd=ROOT, env=app_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tr"
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["tr"]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "finished"
    assert (run_dir / "checkpoints" / "training_checkpoint_4.pt").exists()
