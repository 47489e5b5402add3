"""What TensorBoard itself shows of our runs (bench/tensorboard_view.py): its HParams plugin asked in
this process about runs logged by our handlers, and a real TensorBoard server on a loopback address,
asked through the data API its pages use, for one finished run and one that is still going (stopped
with SIGSTOP after its first evaluation, so it cannot finish meanwhile)."""
from __future__ import annotations

import json
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from app.config import Config, load_config, override
from app.hparams import hparams
from bench.tensorboard_view import HParamsInProcess, TensorBoardServer, sessions_table, shown_columns
from handlers.loss_buffer import LossBuffer
from handlers.tensorboard import TensorBoardLogging
from tests.support import BATCH, ROOT, run_config, scalars, start_app

# TensorBoard's own plugin code imports its vendored bleach, which warns of its own html5lib.
pytestmark = pytest.mark.filterwarnings("ignore:html5lib's sanitizer is deprecated:DeprecationWarning")
SWEEP = {f"lr{lr}-seed{seed}": (lr, seed) for lr in (0.05, 0.1) for seed in (0, 1)}
TOP1, TOP5 = 0.375, 0.8125  # what every run below reaches (exact in binary, and so in per cent)


def _log_run(run_dir: Path, cfg: Config) -> None:
    """What a run of one epoch of two iterations logs, through the handlers a run attaches: each step's
    loss and top-1 (as a training step returns them), then an evaluation with a confusion matrix."""
    trainer = Engine(lambda e, _: torch.tensor([2.0, TOP1]))
    LossBuffer(every=1, scheduled=lambda: {"lr": 0.1, "momentum": 0.9}).attach(trainer)
    evaluator = Engine(lambda e, _: None)
    confusion = torch.tensor([[3, 1], [0, 4]])
    evaluator.add_event_handler(Events.COMPLETED, lambda e: e.state.metrics.update(
        top1=TOP1, top5=TOP5, loss=2.5, confusion=confusion))
    best = {"top1": TOP1, "top5": TOP5, "loss": 2.5, "epoch": 1}
    tb = TensorBoardLogging(run_dir / "tb").attach(trainer, evaluator, best=lambda: best, class_names=["a", "b"])
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: evaluator.run([0]))
    tb.log_hparams(hparams(cfg, 1, torch.device("cpu")))
    trainer.run(range(2), max_epochs=1)
    tb.close()


def test_figures_every_n_epochs_and_at_the_last_the_numbers_every_epoch(tmp_path: Path) -> None:
    """`logging.figures_every_epochs` 2 over 5 epochs: the confusion matrix's image, table and histogram at
    epochs 2, 4 and 5 (the last); the validation numbers at every epoch, as with 1."""
    trainer = Engine(lambda e, _: torch.tensor([2.0, TOP1]))
    LossBuffer(every=1, scheduled=lambda: {"lr": 0.1}).attach(trainer)
    evaluator = Engine(lambda e, _: None)
    evaluator.add_event_handler(Events.COMPLETED, lambda e: e.state.metrics.update(
        top1=TOP1, top5=TOP5, loss=2.5, confusion=torch.tensor([[3, 1], [0, 4]])))
    tb = TensorBoardLogging(tmp_path / "tb", figures_every=2).attach(
        trainer, evaluator, best=lambda: {"top1": TOP1, "top5": TOP5, "loss": 2.5}, class_names=["a", "b"])
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: evaluator.run([0]))
    trainer.run(range(1), max_epochs=5)
    tb.close()
    acc = EventAccumulator(str(tmp_path / "tb" / "validation"), size_guidance={"images": 0, "histograms": 0,
                                                                               "tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("validation/confusion_matrix")] == [2, 4, 5]
    assert [e.step for e in acc.Tensors("validation/most_confused/text_summary")] == [2, 4, 5]
    assert [e.step for e in acc.Histograms("validation/per_class_accuracy")] == [2, 4, 5]
    assert [e.step for e in acc.Scalars("metrics/top1")] == [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    """`runs` with a sweep of two learning rates and two seeds, and one run of its own that shows a key
    more (`logging.hparams`)."""
    runs = tmp_path_factory.mktemp("hparams") / "runs"
    cfg = load_config(ROOT / "config.json")
    for name, (lr, seed) in SWEEP.items():
        _log_run(runs / "lr-seeds" / name, override(cfg, {"optimizer.lr": lr, "seed": seed,
                                                          "logging.hparams": ["optimizer.lr"]}))
    _log_run(runs / "plain", override(cfg, {"logging.hparams": ["augment.rotation"]}))
    return runs


def test_hparams_shows_first_the_hyperparameters_that_differ_between_runs(logdir: Path) -> None:
    """Seed among them: the tab shows five columns until more are ticked, those that differ first."""
    experiment = HParamsInProcess(logdir).experiment()
    shown, metrics = shown_columns(experiment)
    assert shown[:2] == ["lr", "seed"]
    types = {h["name"]: h["type"] for h in experiment["hparamInfos"]}
    assert types["lr"] == "DATA_TYPE_FLOAT64" and types["batch_size"] == types["seed"] == "DATA_TYPE_STRING"
    assert types["cycle_momentum"] == "DATA_TYPE_BOOL" and types["precision"] == "DATA_TYPE_STRING"
    assert "augment.rotation" in types  # a key that one run shows is a column too
    assert metrics == ["metrics/loss", "metrics/top1", "metrics/top5", "summary/best_loss", "summary/best_top1"]


def test_trial_names_start_with_what_tells_the_runs_apart(logdir: Path) -> None:
    """The table's "Trial ID" column shows some 12 characters (a Chromium screenshot of its page): the
    run folder's name first, then its parent's."""
    groups = HParamsInProcess(logdir).session_groups()
    trials = {name: row["trial"] for name, row in sessions_table(groups).items()}
    assert len(groups) == len(trials) == 5  # a row per run
    assert trials["lr-seeds/lr0.1-seed1/tb/validation"] == "lr0.1-seed1 in lr-seeds"
    assert trials["plain/tb/validation"] == "plain in runs"
    assert len({trial[:12] for trial in trials.values()}) == 5


def test_accuracies_are_in_per_cent_as_on_the_console(logdir: Path) -> None:
    """Training and validation top-1, top-5 and the best so far, and so the HParams tab's metrics; and
    the per-class accuracy histogram. The hyperparameters show the precision the run trained in."""
    run = logdir / "lr-seeds" / "lr0.1-seed0" / "tb"
    assert scalars(run / "train", "metrics/top1") == [(1, 37.5), (2, 37.5)]
    assert scalars(run / "train", "metrics/loss") == [(1, 2.0), (2, 2.0)]
    session = sessions_table(HParamsInProcess(logdir).session_groups())["lr-seeds/lr0.1-seed0/tb/validation"]
    metrics = {tag: value for tag, (value, _) in session["metrics"].items()}
    assert metrics == {"metrics/top1": 37.5, "metrics/top5": 81.25, "metrics/loss": 2.5,
                       "summary/best_top1": 37.5, "summary/best_top5": 81.25, "summary/best_loss": 2.5}
    assert session["hparams"]["precision"] == "fp32" and "amp" not in session["hparams"]
    validation = EventAccumulator(str(run / "validation"), size_guidance={"histograms": 0})
    validation.Reload()
    (histogram,) = validation.Histograms("validation/per_class_accuracy")
    assert (histogram.histogram_value.min, histogram.histogram_value.max) == (75.0, 100.0)  # 3 of 4, 4 of 4


def test_hparams_show_the_precision_a_run_trains_in_not_auto() -> None:
    cfg = load_config(ROOT / "config.json")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert hparams(cfg, 1, cpu)["precision"] == "fp32" and hparams(cfg, 1, cuda)["precision"] == "bf16"
    assert hparams(override(cfg, {"train.amp": "fp16"}), 1, cuda)["precision"] == "fp16"
    assert hparams(override(cfg, {"train.amp": "off"}), 1, cuda)["precision"] == "fp32"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, small_data: Path, finished_run):
    tmp = tmp_path_factory.mktemp("tbview")
    shutil.copytree(finished_run.run_dir, tmp / "runs" / "finished")
    cfg = run_config(tmp / "c.json", small_data, tmp / "runs")
    live = start_app("--config", str(cfg), "--run-name", "live", "--epochs", "3", stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    epoch1 = tmp / "runs" / "live" / "checkpoints" / "training_checkpoint_5.pt"
    deadline = time.monotonic() + 300
    while not epoch1.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    live.send_signal(signal.SIGSTOP)  # still going, frozen after its first evaluation and checkpoint
    try:
        with TensorBoardServer(tmp / "runs") as tb:
            runs, sessions = tb.wait_for_runs(4), tb.wait_for_sessions(2)
            deadline = time.monotonic() + 60
            while len(tb.get("/data/plugin/scalars/tags")) < 4 and time.monotonic() < deadline:
                time.sleep(0.5)  # every file read at least once
            yield tmp / "runs", tb, runs, sessions
    finally:
        live.kill()
        live.wait()


@pytest.mark.slow
def test_runs_are_named_after_their_run_folders(two_runs) -> None:
    _, _, runs, _ = two_runs
    assert sorted(runs) == ["finished/tb/train", "finished/tb/validation", "live/tb/train", "live/tb/validation"]


@pytest.mark.slow
def test_the_first_two_groups_are_the_curves_then_the_schedule(two_runs) -> None:
    _, tb, _, _ = two_runs
    groups = tb.time_series_groups()
    assert groups[:2] == ["metrics", "schedule"] and "hparam" not in groups
    tags = tb.get("/data/plugin/scalars/tags")
    for run in ("finished", "live"):  # the same tags in both, so one chart overlays them
        assert {"metrics/loss", "metrics/top1"} <= set(tags[f"{run}/tb/train"]) & set(tags[f"{run}/tb/validation"])
    points = tb.get("/data/plugin/scalars/scalars?run=finished/tb/validation&tag=metrics/top1")
    assert [step for _, step, _ in points] == [5, 10]  # the trainer's iteration at each epoch's end


@pytest.mark.slow
def test_hparams_lists_the_running_run_with_what_it_reached(two_runs) -> None:
    """Its accuracies in per cent, results.json's fractions times 100."""
    folder, tb, _, sessions = two_runs
    experiment = tb.experiment()
    types = {h["name"]: h["type"] for h in experiment["hparamInfos"]}
    assert types["lr"] == "DATA_TYPE_FLOAT64" and types["batch_size"] == "DATA_TYPE_STRING"
    assert types["cycle_momentum"] == "DATA_TYPE_BOOL"
    assert shown_columns(experiment)[0][0] == "epochs"  # the one that differs between these two
    assert set(sessions) == {"finished/tb/validation", "live/tb/validation"}
    finished, live = sessions["finished/tb/validation"], sessions["live/tb/validation"]
    assert finished["status"] == "STATUS_SUCCESS" and live["status"] == "STATUS_UNKNOWN"
    assert finished["hparams"]["batch_size"] == str(BATCH) and finished["hparams"]["lr"] == 0.1
    assert live["hparams"]["epochs"] == "3" and finished["hparams"]["epochs"] == "2"
    assert live["trial"] == "live in runs" and live["hparams"]["precision"] == "fp32"
    for name, session, step in (("finished", finished, 10), ("live", live, 5)):
        results = json.loads((folder / name / "results.json").read_text())
        for tag in ("top1", "top5", "loss"):
            unit = 1 if tag == "loss" else 100
            value, at = session["metrics"][f"metrics/{tag}"]
            assert at == step and value == pytest.approx(unit * results["final"][tag], rel=1e-5)
            value, at = session["metrics"][f"summary/best_{tag}"]
            assert at == step and value == pytest.approx(unit * results["best"][tag], rel=1e-5)


@pytest.mark.slow
def test_the_confusion_matrix_is_large_enough_to_read(two_runs) -> None:
    _, tb, _, _ = two_runs
    images = tb.get("/data/plugin/images/images?run=finished/tb/validation&tag=validation/confusion_matrix")
    assert [i["step"] for i in images] == [5, 10]
    png = tb.get("/data/plugin/images/" + images[-1]["query"].join(["individualImage?", ""]))
    width, height = struct.unpack(">II", png[16:24])  # the PNG header's size
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and width >= 600 and height >= 600
