"""End to end: a real run on a few hundred images, its files, its TensorBoard scalars, and resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from app.checkpoint import load_checkpoint
from conftest import run_app, run_until, write_config


def _config(tmp_path: Path, data: Path, epochs: int = 2, **extra) -> Path:
    return write_config(tmp_path / "c.json", data={"root": str(data), "download": False},
                        train={"epochs": epochs, "batch_size": 48, **extra.pop("train", {})},
                        logging={"output_dir": str(tmp_path / "runs"), "log_every_iters": 2,
                                 **extra.pop("logging", {})}, **extra)


def _scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, small_data: Path):
    tmp = tmp_path_factory.mktemp("e2e")
    result = run_app("--config", str(_config(tmp, small_data)), "--run-name", "r1")
    assert result.returncode == 0, result.stderr
    return tmp / "runs" / "r1", result


def test_prints_one_summary_line_per_epoch(finished_run) -> None:
    _, result = finished_run
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]
    assert all("val top-1" in line and "top-5" in line and "img/s" in line for line in lines)


def test_writes_config_results_and_checkpoints(finished_run) -> None:
    run_dir, _ = finished_run
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["train"]["epochs"] == 2 and saved["optimizer"]["lr"] == 0.1
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "finished" and results["epochs"] == 2
    assert set(results["best"]) >= {"top1", "top5", "loss", "epoch"}
    assert results["best"]["top1"] >= results["final"]["top1"] and results["wall_time_seconds"] > 0
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == [f"best_checkpoint_{results['best']['epoch']}_top1={results['best']['top1']:.4f}.pt",
                     "training_checkpoint_10.pt", "training_checkpoint_5.pt"]
    ckpt = load_checkpoint(run_dir / "checkpoints" / "training_checkpoint_10.pt")
    assert {"trainer", "model", "optimizer", "lr_scheduler", "augment", "best_checkpoint", "results"} <= set(ckpt)
    assert ckpt["trainer"]["iteration"] == 10 and ckpt["trainer"]["epoch_length"] == 5


def test_tensorboard_overlays_training_and_validation_on_the_trainers_iterations(finished_run) -> None:
    """Training: loss, top-1, lr and momentum at every iteration; validation: loss, top-1, top-5 at the
    iteration each epoch ended; the same tags in both runs, so TensorBoard draws them in one chart."""
    run_dir, _ = finished_run
    train, validation = run_dir / "tb" / "train", run_dir / "tb" / "validation"
    loss, top1 = _scalars(train, "metrics/loss"), _scalars(train, "metrics/top1")
    lr, momentum = _scalars(train, "schedule/lr"), _scalars(train, "schedule/momentum")
    assert [s for s, _ in loss] == [s for s, _ in top1] == [s for s, _ in lr] == [s for s, _ in momentum] \
        == list(range(1, 11))
    assert all(abs(v * 48 - round(v * 48)) < 1e-4 and 0 <= v <= 1 for _, v in top1)  # a share of a batch of 48
    assert max(v for _, v in lr) == pytest.approx(0.1, rel=1e-3) and lr[-1][1] < 1e-4  # one cycle
    # ... and momentum the other way: lowest where the learning rate peaks
    assert momentum[0][1] == pytest.approx(0.95) and momentum[-1][1] == pytest.approx(0.95)
    peak = max(range(10), key=lambda i: lr[i][1])
    assert min(v for _, v in momentum) == pytest.approx(0.85) == momentum[peak][1]
    results = json.loads((run_dir / "results.json").read_text())
    for tag in ("top1", "top5", "loss"):
        values = _scalars(validation, f"metrics/{tag}")
        assert [s for s, _ in values] == [5, 10]
        assert values[-1][1] == pytest.approx(results["final"][tag], rel=1e-5)
        best = _scalars(validation, f"summary/best_{tag}")
        assert [s for s, _ in best] == [5, 10] and best[-1][1] == pytest.approx(results["best"][tag], rel=1e-5)
    groups = {tag.split("/")[0] for folder in (train, validation) for tag in _tags(folder)}
    assert sorted(groups)[:2] == ["metrics", "schedule"]  # the two groups Time Series opens
    assert "hparam" not in groups and "epoch" not in groups


def _tags(folder: Path) -> list[str]:
    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    return [tag for kind in ("scalars", "images", "histograms") for tag in acc.Tags()[kind]]


def test_tensorboard_has_images_histograms_epoch_figures_and_hparams(finished_run) -> None:
    run_dir, _ = finished_run
    train = EventAccumulator(str(run_dir / "tb" / "train"), size_guidance={"images": 0})
    train.Reload()
    grid = train.Images("train/augmented_images")
    assert len(grid) == 1 and (grid[0].width, grid[0].height) == (272, 272)  # 8 x 8 images of 32 + 2
    assert [e.step for e in train.Scalars("system/images_per_second")] == [5, 10]
    assert all(e.value > 0 for e in train.Scalars("system/epoch_seconds"))
    val = EventAccumulator(str(run_dir / "tb" / "validation"),
                           size_guidance={"images": 0, "histograms": 0, "tensors": 0})
    val.Reload()
    matrices = val.Images("validation/confusion_matrix")
    assert [e.step for e in matrices] == [5, 10] and matrices[0].width >= 600
    assert [e.step for e in val.Histograms("validation/per_class_accuracy")] == [5, 10]
    table = val.Tensors("validation/most_confused/text_summary")  # tensorboardX names text tags so
    assert [e.step for e in table] == [5, 10] and b"| true class | predicted as |" in table[-1].tensor_proto.string_val[0]
    hparams = val.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(hparams)
    start = hparams["_hparams_/session_start_info"]
    assert b"batch_size" in start and b"momentum_min" in start and b"momentum_max" in start


def test_without_a_terminal_logs_one_line_per_epoch_and_no_bar(finished_run) -> None:
    _, result = finished_run
    assert "it/s" not in result.stderr and "\r" not in result.stdout + result.stderr
    assert len(result.stdout.strip().splitlines()) == 3  # the run line and one line per epoch


def test_progress_bar_can_be_forced_on(tmp_path: Path, small_data: Path) -> None:
    cfg = _config(tmp_path, small_data, epochs=2, logging={"progress_bar": "on"})
    result = run_app("--config", str(cfg))
    assert result.returncode == 0 and "Epoch [2/2]" in result.stderr and "lr=" in result.stderr


def test_dry_run_checks_and_describes_without_writing(tmp_path: Path, small_data: Path) -> None:
    result = run_app("--config", str(_config(tmp_path, small_data)), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert '"batch_size": 48' in result.stdout and "11,220,132 parameters" in result.stdout
    assert "240 training and 50 test images" in result.stdout
    # 240 images, batch 48: 5 iterations per epoch, 10 in all, the peak at 30%
    assert "learning rate: 0.004 at iteration 1, 0.1 at iteration 3, 4e-07 at iteration 10" in result.stdout
    assert ("momentum: 0.95 at iteration 1, 0.85 at iteration 3, 0.95 at iteration 10, cycled by the schedule"
            in result.stdout)
    assert not (tmp_path / "runs").exists()


def test_resume_after_kill_continues_same_run_without_repeating_an_epoch(tmp_path: Path, small_data: Path) -> None:
    cfg = _config(tmp_path, small_data, epochs=3)
    run_dir = tmp_path / "runs" / "r"
    run_until(run_dir / "checkpoints" / "training_checkpoint_5.pt", "--config", str(cfg), "--run-name", "r")
    assert not (run_dir / "checkpoints" / "training_checkpoint_15.pt").exists()

    result = run_app("--config", str(cfg), "--resume")
    assert result.returncode == 0, result.stderr
    epochs = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert epochs[0] in ("2/3", "3/3") and epochs[-1] == "3/3" and "1/3" not in epochs
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["r"]
    steps = [s for s, _ in _scalars(run_dir / "tb" / "validation", "metrics/top1")]
    assert steps == [5, 10, 15]
    assert [s for s, _ in _scalars(run_dir / "tb" / "train", "metrics/loss")] == list(range(1, 16))
    assert json.loads((run_dir / "results.json").read_text())["epochs"] == 3

    again = run_app("--config", str(cfg), "--resume")
    assert again.returncode == 0 and "finished" in again.stdout
