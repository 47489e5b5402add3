"""What TensorBoard itself shows of our runs: a real TensorBoard server on a loopback address, asked
through the data API its pages use (bench/tensorboard_view.py), for one finished run and one that is
still going (stopped with SIGSTOP after its first evaluation, so it cannot finish meanwhile)."""
from __future__ import annotations

import json
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from bench.tensorboard_view import TensorBoardServer
from tests.support import BATCH, run_config, start_app

pytestmark = pytest.mark.slow


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


def test_runs_are_named_after_their_run_folders(two_runs) -> None:
    _, _, runs, _ = two_runs
    assert sorted(runs) == ["finished/tb/train", "finished/tb/validation", "live/tb/train", "live/tb/validation"]


def test_the_first_two_groups_are_the_curves_then_the_schedule(two_runs) -> None:
    _, tb, _, _ = two_runs
    groups = tb.time_series_groups()
    assert groups[:2] == ["metrics", "schedule"] and "hparam" not in groups
    tags = tb.get("/data/plugin/scalars/tags")
    for run in ("finished", "live"):  # the same tags in both, so one chart overlays them
        assert {"metrics/loss", "metrics/top1"} <= set(tags[f"{run}/tb/train"]) & set(tags[f"{run}/tb/validation"])
    points = tb.get("/data/plugin/scalars/scalars?run=finished/tb/validation&tag=metrics/top1")
    assert [step for _, step, _ in points] == [5, 10]  # the trainer's iteration at each epoch's end


def test_hparams_lists_the_running_run_with_what_it_reached(two_runs) -> None:
    folder, tb, _, sessions = two_runs
    types = {h["name"]: h["type"] for h in tb.experiment()["hparamInfos"]}
    assert types["lr"] == "DATA_TYPE_FLOAT64" and types["batch_size"] == "DATA_TYPE_STRING"
    assert types["cycle_momentum"] == "DATA_TYPE_BOOL"
    assert set(sessions) == {"finished/tb/validation", "live/tb/validation"}
    finished, live = sessions["finished/tb/validation"], sessions["live/tb/validation"]
    assert finished["status"] == "STATUS_SUCCESS" and live["status"] == "STATUS_UNKNOWN"
    assert finished["hparams"]["batch_size"] == str(BATCH) and finished["hparams"]["lr"] == 0.1
    assert live["hparams"]["epochs"] == "3" and finished["hparams"]["epochs"] == "2"
    for name, session, step in (("finished", finished, 10), ("live", live, 5)):
        results = json.loads((folder / name / "results.json").read_text())
        for tag in ("top1", "top5", "loss"):
            value, at = session["metrics"][f"metrics/{tag}"]
            assert at == step and value == pytest.approx(results["final"][tag], rel=1e-5)
            value, at = session["metrics"][f"summary/best_{tag}"]
            assert at == step and value == pytest.approx(results["best"][tag], rel=1e-5)


def test_the_confusion_matrix_is_large_enough_to_read(two_runs) -> None:
    _, tb, _, _ = two_runs
    images = tb.get("/data/plugin/images/images?run=finished/tb/validation&tag=validation/confusion_matrix")
    assert [i["step"] for i in images] == [5, 10]
    png = tb.get("/data/plugin/images/" + images[-1]["query"].join(["individualImage?", ""]))
    width, height = struct.unpack(">II", png[16:24])  # the PNG header's size
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and width >= 600 and height >= 600
