"""End to end: a real run on a few dozen images, its files, its TensorBoard scalars, and resume."""
from __future__ import annotations

import io
import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from ignite.engine import Engine, Events
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from app.checkpoint import load_checkpoint
from app.datasets import DATASETS
from handlers.loss_buffer import LossBuffer
from handlers.metrics_csv import read_metrics_csv
from handlers.progress import ProgressLines, attach_progress_bar
from handlers.tensorboard import EventLog
from tests.support import (BATCH, EPOCHS, TEST_IMAGES, TRAIN_IMAGES, TIMESTAMP, epochs_printed, run_app, run_config,
                           run_lines, run_main, run_until, scalars, write_cifar10)


def test_prints_one_summary_line_per_epoch(finished_run) -> None:
    lines = [line for line in run_lines(finished_run.stdout) if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]
    assert all("val top-1" in line and "top-5" in line and "img/s" in line for line in lines)


def test_writes_config_results_and_checkpoints(finished_run) -> None:
    run_dir = finished_run.run_dir
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["train"]["epochs"] == EPOCHS and saved["optimizer"]["lr"] == 0.1
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "finished" and results["epochs"] == EPOCHS
    assert set(results["best"]) >= {"top1", "top5", "loss", "epoch"}
    assert results["best"]["top1"] >= results["final"]["top1"] and results["wall_time_seconds"] > 0
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["best.pt", "last.pt", "training_checkpoint_10.pt", "training_checkpoint_5.pt"]
    # last.pt names the newest training checkpoint, by a relative link (it holds when the folder moves)
    assert os.readlink(run_dir / "checkpoints" / "last.pt") == "training_checkpoint_10.pt"
    # the best model says which epoch it is and what it scored: the best that results.json reports
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    epoch = results["best"]["epoch"]
    assert (best["meta"]["epoch"], best["meta"]["iteration"]) == (epoch, 5 * epoch)
    assert json.loads(best["meta"]["metrics"]) == {k: v for k, v in results["best"].items() if k != "epoch"}
    ckpt = load_checkpoint(run_dir / "checkpoints" / "training_checkpoint_10.pt")
    assert {"trainer", "model", "optimizer", "lr_scheduler", "augment", "best_checkpoint", "results"} <= set(ckpt)
    assert ckpt["trainer"]["iteration"] == 10 and ckpt["trainer"]["epoch_length"] == 5


def test_tensorboard_overlays_training_and_validation_on_the_trainers_iterations(finished_run) -> None:
    """Training: loss, top-1, lr and momentum at every iteration; validation: loss, top-1, top-5 at the
    iteration each epoch ended; the same tags in both runs, so TensorBoard draws them in one chart.
    Accuracies in per cent, as on the console (results.json keeps fractions)."""
    run_dir = finished_run.run_dir
    train, validation = run_dir / "tb" / "train", run_dir / "tb" / "validation"
    loss, top1 = scalars(train, "metrics/loss"), scalars(train, "metrics/top1")
    lr, momentum = scalars(train, "schedule/lr"), scalars(train, "schedule/momentum")
    assert [s for s, _ in loss] == [s for s, _ in top1] == [s for s, _ in lr] == [s for s, _ in momentum] \
        == list(range(1, 11))
    assert all(abs(v * BATCH / 100 - round(v * BATCH / 100)) < 1e-4 and 0 <= v <= 100 for _, v in top1)  # of a batch
    assert max(v for _, v in lr) == pytest.approx(0.1, rel=1e-3) and lr[-1][1] < 1e-4  # one cycle
    # ... and momentum the other way: lowest where the learning rate peaks
    assert momentum[0][1] == pytest.approx(0.95) and momentum[-1][1] == pytest.approx(0.95)
    peak = max(range(10), key=lambda i: lr[i][1])
    assert min(v for _, v in momentum) == pytest.approx(0.85) == momentum[peak][1]
    results = json.loads((run_dir / "results.json").read_text())
    for tag, unit in (("top1", 100), ("top5", 100), ("loss", 1)):
        values = scalars(validation, f"metrics/{tag}")
        assert [s for s, _ in values] == [5, 10]
        assert values[-1][1] == pytest.approx(unit * results["final"][tag], rel=1e-5)
        best = scalars(validation, f"summary/best_{tag}")
        assert [s for s, _ in best] == [5, 10] and best[-1][1] == pytest.approx(unit * results["best"][tag], rel=1e-5)
    groups = {tag.split("/")[0] for folder in (train, validation) for tag in _tags(folder)}
    assert sorted(groups)[:2] == ["metrics", "schedule"]  # the two groups Time Series opens
    assert "hparam" not in groups and "epoch" not in groups


def _tags(folder: Path) -> list[str]:
    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    return [tag for kind in ("scalars", "images", "histograms") for tag in acc.Tags()[kind]]


def test_tensorboard_has_images_histograms_epoch_figures_and_hparams(finished_run) -> None:
    run_dir = finished_run.run_dir
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
    assert [e.step for e in table] == [5, 10]
    assert b"| true class | predicted as |" in table[-1].tensor_proto.string_val[0]
    hparams = val.PluginTagToContent("hparams")
    # the run's session only, no experiment summary (handlers/tensorboard.py says why)
    assert set(hparams) == {"_hparams_/session_start_info", "_hparams_/session_end_info"}
    start = hparams["_hparams_/session_start_info"]
    assert b"batch_size" in start and b"momentum_min" in start and b"momentum_max" in start
    assert b"dataset" in start and b"cifar100" in start


def test_without_a_terminal_every_line_has_its_time_and_progress_lines_come_every_n_iterations(finished_run) -> None:
    """No bar in a log file: the run's line; in each epoch of 5 iterations a line at iterations 2 and 4
    (`logging.progress_every_iters` 2; none at the epoch's last, whose own line follows); the epoch's line;
    the summary. Each line starts with the time it was written."""
    assert "it/s" not in finished_run.stderr and "\r" not in finished_run.stdout + finished_run.stderr
    printed = finished_run.stdout.strip().splitlines()
    assert all(TIMESTAMP.match(line) for line in printed), printed
    kinds = [line.split()[0] for line in run_lines(finished_run.stdout)]
    assert kinds == ["run", "iteration", "iteration", "epoch", "iteration", "iteration", "epoch",
                     "finished", "best", "best", "run"], printed
    progress = [line for line in run_lines(finished_run.stdout) if line.startswith("iteration")]
    assert progress[2].startswith(f"iteration 2/5 of epoch 2/{EPOCHS}  loss ")
    assert re.search(r"  lr \d\.\d{5}  \d+ img/s  ETA epoch 0:\d\d:\d\d, run 0:\d\d:\d\d$", progress[2]), progress[2]


def test_a_finished_run_ends_with_its_summary_the_numbers_of_results_json(finished_run) -> None:
    results = json.loads((finished_run.run_dir / "results.json").read_text())
    best, final = results["best"], results["final"]
    assert results["best_checkpoint"] == "checkpoints/best.pt" and results["train_seconds"] > 0
    assert results["images_per_second"] == pytest.approx(EPOCHS * TRAIN_IMAGES / results["train_seconds"], abs=0.06)
    summary = run_lines(finished_run.stdout)[-4:]
    assert summary[0].startswith(f"finished {EPOCHS} epochs in ") and summary[0].endswith(
        f", training at {results['images_per_second']:.0f} img/s")
    assert summary[1] == (f"best top-1 {100 * best['top1']:.2f}% at epoch {best['epoch']} "
                          f"(top-5 {100 * best['top5']:.2f}%, loss {best['loss']:.4f}); "
                          f"final top-1 {100 * final['top1']:.2f}%")
    assert summary[2:] == [f"best model: {finished_run.run_dir / 'checkpoints' / 'best.pt'}",
                           f"run folder: {finished_run.run_dir}"]


def test_metrics_csv_has_one_row_per_epoch_with_the_epochs_figures(finished_run) -> None:
    rows = read_metrics_csv(finished_run.run_dir / "metrics.csv")
    results = json.loads((finished_run.run_dir / "results.json").read_text())
    assert [(r["epoch"], r["iteration"]) for r in rows] == [("1", "5"), ("2", "10")]
    last = rows[-1]
    assert float(last["val_top1"]) == results["final"]["top1"] and float(last["val_loss"]) == results["final"]["loss"]
    lr = scalars(finished_run.run_dir / "tb" / "train", "schedule/lr")
    assert float(last["lr"]) == pytest.approx(lr[-1][1], rel=1e-6) and float(last["train_loss"]) > 0
    assert all(float(r["epoch_seconds"]) > 0 and float(r["images_per_second"]) > 0 for r in rows)
    assert float(rows[0]["wall_time_seconds"]) < float(rows[1]["wall_time_seconds"])


def test_the_progress_bar_shows_the_epoch_the_loss_and_the_learning_rate() -> None:
    """What `logging.progress_bar` "on" attaches (a terminal gets it with "auto"): tqdm's bar, advanced
    when the losses are read, with the smoothed loss and the learning rate."""
    trainer = Engine(lambda e, _: torch.tensor([2.5, 0.5]))
    LossBuffer(every=2, scheduled=lambda: {"lr": 0.05, "momentum": 0.9}).attach(trainer)
    stream = io.StringIO()
    attach_progress_bar(trainer, every=2).tqdm_kwargs["file"] = stream  # where tqdm draws (stderr in a run)
    trainer.run(range(4), max_epochs=2)
    shown = stream.getvalue()
    assert "Epoch [2/2]" in shown and "lr=0.05" in shown and "running_loss=2.5" in shown


def test_without_an_interval_progress_lines_come_about_once_a_minute(monkeypatch) -> None:
    """`logging.progress_every_iters` unset: a line at the first loss flush a minute or more after the last
    (a slow device is never long silent), none in an epoch that takes less (a fast one prints its epoch
    line only); the time left at the epoch's measured pace."""
    clock = iter(range(0, 10_000, 25))  # each reading of the clock 25 s after the one before
    monkeypatch.setattr("handlers.progress.time.perf_counter", lambda: next(clock))
    trainer, evaluator = Engine(lambda e, b: torch.tensor([1.0, 0.5])), Engine(lambda e, b: None)
    LossBuffer(every=1, scheduled=lambda: {"lr": 0.1}).attach(trainer)
    lines: list[str] = []
    ProgressLines(lines.append, evaluator).attach(trainer)
    trainer.state.batch = None
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: setattr(e.state, "batch", (None, [0] * 8)))
    trainer.run(range(8), max_epochs=1)
    # the epoch starts at 0; iterations 1-7 read the clock at 25, 50, 75 (a line: 75 s since the start),
    # 100, 125, 150 (a line: 75 s since the last), 175; the last iteration, none: the epoch's line follows
    assert [line.split()[1] for line in lines] == ["3/8", "6/8"]
    assert lines[0] == "iteration 3/8 of epoch 1/1  loss 1.0000  lr 0.10000  0 img/s  ETA epoch 0:02:05, run 0:02:05"


@pytest.mark.parametrize("dataset,classes,parameters", [("cifar100", 100, "11,220,132"), ("cifar10", 10, "11,173,962")])
def test_dry_run_checks_and_describes_without_writing(tmp_path: Path, request, dataset, classes, parameters) -> None:
    """The config as resolved: the data set's class count and normalisation where the file leaves them null."""
    data = request.getfixturevalue("small_data" if dataset == "cifar100" else "small_cifar10")
    cfg = run_config(tmp_path / "c.json", data, tmp_path / "runs")
    ran = run_main("--config", str(cfg), "--set", f"data.dataset={dataset}", "--dry-run")
    assert ran.returncode == 0, ran.stderr
    assert f'"batch_size": {BATCH}' in ran.stdout and f"{parameters} parameters" in ran.stdout
    resolved = json.loads(ran.stdout[:ran.stdout.index("\n}\n") + 2])
    spec = DATASETS[dataset]
    assert resolved["data"]["dataset"] == dataset and resolved["model"]["num_classes"] == classes
    assert (resolved["augment"]["mean"], resolved["augment"]["std"]) == (list(spec.mean), list(spec.std))
    assert f"{spec.title}, {TRAIN_IMAGES} training and {TEST_IMAGES} test images of {classes} classes" in ran.stdout
    # 80 images, batch 16: 5 iterations per epoch, 10 in all, the peak at 30%
    assert "learning rate: 0.004 at iteration 1, 0.1 at iteration 3, 4e-07 at iteration 10" in ran.stdout
    assert ("momentum: 0.95 at iteration 1, 0.85 at iteration 3, 0.95 at iteration 10, cycled by the schedule"
            in ran.stdout)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_run_killed_after_a_checkpoint_has_it_in_tensorboard_and_resumes_without_repeating(
        tmp_path: Path, small_data: Path) -> None:
    """SIGKILL the moment training_checkpoint_7.pt appears (epochs of 5 iterations, a checkpoint every 7
    iterations as well): the event files, read back with TensorBoard's reader, have every iteration up
    to 7 and all of epoch 1's figures; `--resume` then continues in the same folder from iteration 7,
    no epoch repeated, every iteration and epoch in TensorBoard once."""
    cfg = run_config(tmp_path / "c.json", small_data, tmp_path / "runs", train={"epochs": 3},
                     checkpoint={"every_iters": 7})
    run_dir = tmp_path / "runs" / "r"
    run_until(run_dir / "checkpoints" / "training_checkpoint_7.pt", "--config", str(cfg), "--run-name", "r")
    assert not (run_dir / "checkpoints" / "training_checkpoint_15.pt").exists()
    train = EventAccumulator(str(run_dir / "tb" / "train"))
    train.Reload()
    for tag in ("metrics/loss", "metrics/top1", "schedule/lr", "schedule/momentum"):
        assert [e.step for e in train.Scalars(tag)][:7] == list(range(1, 8)), tag
    for tag in ("system/epoch_seconds", "system/images_per_second"):
        assert [e.step for e in train.Scalars(tag)][:1] == [5], tag
    val = EventAccumulator(str(run_dir / "tb" / "validation"), size_guidance={"images": 0, "histograms": 0})
    val.Reload()
    for tag in ("metrics/top1", "metrics/loss", "summary/best_top1"):
        assert [e.step for e in val.Scalars(tag)][:1] == [5], tag
    assert [e.step for e in val.Histograms("validation/per_class_accuracy")][:1] == [5]
    assert [e.step for e in val.Images("validation/confusion_matrix")][:1] == [5]
    assert "_hparams_/session_start_info" in val.PluginTagToContent("hparams")  # from the start

    result = run_app("--config", str(cfg), "--resume")
    assert result.returncode == 0, result.stderr
    assert re.search(r"resuming .* from training_checkpoint_(7|10)\.pt", result.stdout)  # 10: killed after it
    printed = epochs_printed(result.stdout)
    assert printed[0] in ("2/3", "3/3") and printed[-1] == "3/3" and "1/3" not in printed
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["r"]
    assert [s for s, _ in scalars(run_dir / "tb" / "validation", "metrics/top1")] == [5, 10, 15]
    assert [s for s, _ in scalars(run_dir / "tb" / "train", "metrics/loss")] == list(range(1, 16))
    assert json.loads((run_dir / "results.json").read_text())["epochs"] == 3

    again = run_main("--config", str(cfg), "--resume")
    assert again.returncode == 0 and "finished" in again.stdout


def test_a_resumed_runs_event_files_lose_what_was_logged_after_its_checkpoint(tmp_path: Path) -> None:
    """Texts too, which TensorBoard's reader does not purge on a restart: a resume from iteration 3 shows
    the killed process's step-5 text and scalar once, the resumed process's."""
    killed = EventLog(tmp_path)
    killed.text("config", "x", 0)
    killed.scalar("loss", 1.0, 0)
    killed.text("most_confused", "before the kill", 5)
    killed.scalar("loss", 2.0, 5)
    killed.flush()
    killed.close()
    time.sleep(1.1)  # event files are named by the second
    resumed = EventLog(tmp_path, purge_step=4)
    resumed.text("most_confused", "resumed", 5)
    resumed.scalar("loss", 3.0, 5)
    resumed.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(0, 1.0), (5, 3.0)]
    assert [e.step for e in acc.Tensors("config/text_summary")] == [0]
    assert [e.step for e in acc.Tensors("most_confused/text_summary")] == [5]


@pytest.mark.slow
def test_a_cifar10_run_keeps_its_data_set_through_evaluate_predict_and_resume(tmp_path: Path) -> None:
    """One epoch of 5 steps on 40 CIFAR-10 images (pickled as the original archive is): its config,
    checkpoints, evaluation and predictions have the data set's 10 classes and names, and a resume cannot
    switch the data set."""
    data = write_cifar10(tmp_path / "data", 40, 10, python2=True)
    cfg = run_config(tmp_path / "c.json", data, tmp_path / "runs", train={"batch_size": 8, "epochs": 1})
    ran = run_main("--config", str(cfg), "--set", "data.dataset=cifar10", "--run-name", "r", "--device", "cpu")
    assert ran.returncode == 0, ran.stderr
    run_dir = tmp_path / "runs" / "r"
    saved = json.loads((run_dir / "config.json").read_text())
    assert (saved["data"]["dataset"], saved["model"]["num_classes"]) == ("cifar10", 10)
    assert saved["augment"]["mean"] == list(DATASETS["cifar10"].mean)
    best = run_dir / "checkpoints" / "best.pt"
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert json.loads(load_checkpoint(best)["meta"]["classes"]) == names
    evaluated = run_main("evaluate", "--checkpoint", str(best), "--json", "--device", "cpu")
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    assert report["images"] == 10 and set(report["per_class_accuracy"]) <= set(names)
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    predicted = run_main("predict", "--checkpoint", str(best), str(image), "--topk", "10", "--json")
    assert predicted.returncode == 0, predicted.stderr
    assert sorted(t["class"] for t in json.loads(predicted.stdout)[0]["top"]) == sorted(names)
    refused = run_main("--resume", str(run_dir), "--set", "data.dataset=cifar100")
    assert refused.returncode == 2 and "data.dataset cannot change when a run is resumed" in refused.stderr
