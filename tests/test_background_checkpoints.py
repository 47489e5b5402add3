"""Checkpoints written in a background thread (`checkpoint.background_write`, on by default): each holds
the state of the moment it was asked for, one write at a time, errors reach the training thread, a
kill during the write leaves the previous checkpoint intact, and a run's checkpoints are the same
bytes' worth of state whether written in the background or not."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from ignite.handlers import Checkpoint
from torch import nn

from app.checkpoint import load_checkpoint
from app.runs import lock_run_dir
from app.errors import UserError
from app.training import WiredRun, finish
from handlers.atomic import TEMP_PREFIX, write_atomic
from handlers.checkpoints import CheckpointWriteError, SaveThenRemove, best_model_checkpoint
from handlers.results import RunResults
from tests.support import ROOT, run_config, run_main


class SlowSaver(SaveThenRemove):
    """The real atomic write, held for `delay` seconds after the data is written, before the rename."""

    def __init__(self, dirname: Path, delay: float) -> None:
        super().__init__(dirname, background=True)
        self.delay = delay

    def _save_func(self, checkpoint, path, func) -> None:
        def write(f) -> None:
            func(checkpoint, f, **self.kwargs)
            time.sleep(self.delay)
        write_atomic(path, write)


def _engine_at(iteration: int) -> Engine:
    engine = Engine(lambda e, b: None)
    engine.state.iteration = iteration
    return engine


def test_a_background_save_holds_the_state_of_the_moment_it_was_asked_for(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saver = SlowSaver(tmp_path, delay=0.3)
    handler = Checkpoint({"model": model}, saver, filename_prefix="t", score_function=lambda e: e.state.iteration)
    handler(_engine_at(1))
    with torch.no_grad():  # training goes on while the file is written
        for p in model.parameters():
            p.add_(1.0)
    assert not (tmp_path / "t_model_1.pt").exists()  # still being written
    saver.wait()
    saved = load_checkpoint(tmp_path / "t_model_1.pt")  # one object: the file is its state_dict
    assert all(torch.equal(saved[k], v) for k, v in before.items())
    nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).load_state_dict(saved)  # strict, with its metadata


def test_the_next_save_waits_for_the_one_in_flight_and_removes_it_after(tmp_path: Path) -> None:
    model = nn.Linear(4, 4)
    saver = SlowSaver(tmp_path, delay=0.3)
    handler = Checkpoint({"model": model}, saver, filename_prefix="t", n_saved=1,
                         score_function=lambda e: e.state.iteration)
    handler(_engine_at(1))
    handler(_engine_at(2))  # returns once the first is on disk, the second in flight
    assert (tmp_path / "t_model_1.pt").exists()
    saver.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t_model_2.pt"]


def test_a_failed_background_write_is_raised_in_the_training_thread(tmp_path: Path) -> None:
    class FullDisk(SaveThenRemove):
        def _save_func(self, checkpoint, path, func) -> None:
            raise OSError(28, "No space left on device")

    saver = FullDisk(tmp_path, background=True)
    handler = Checkpoint({"model": nn.Linear(2, 2)}, saver, filename_prefix="t",
                         score_function=lambda e: e.state.iteration)
    handler(_engine_at(1))  # returns: the write runs in its thread
    with pytest.raises(CheckpointWriteError, match=r"t_model_1\.pt: cannot write checkpoint \(No space left"):
        saver.wait()
    saver.wait()  # raised once


def test_the_end_of_a_run_waits_for_every_writer_and_releases_the_folder_even_when_one_failed(
        tmp_path: Path) -> None:
    """And results.json says the run failed, with the line that says why: the write's error, or the
    error that ended the run."""
    class FullDisk(SaveThenRemove):
        def _save_func(self, checkpoint, path, func) -> None:
            raise OSError(28, "No space left on device")

    for report in (True, False):  # the run ended well / the run ended with its own error
        folder = tmp_path / str(report)
        folder.mkdir()
        failing, slow = FullDisk(folder, background=True), SlowSaver(folder, delay=0.5)
        for i, saver in enumerate((failing, slow)):
            Checkpoint({"model": nn.Linear(2, 2)}, saver, filename_prefix=f"w{i}",
                       score_function=lambda e: e.state.iteration)(_engine_at(1))
        lock = lock_run_dir(folder)
        trainer = _engine_at(7)
        trainer.state.epoch_length = 5
        run = WiredRun(trainer, _engine_at(0), {}, [failing, slow], None, RunResults(folder / "results.json"))
        if report:
            with pytest.raises(CheckpointWriteError, match="No space left"):
                finish(run, lock, None)
            reason = "cannot write checkpoint (No space left on device)"
        else:
            finish(run, lock, UserError("data/cifar-100-python/train: truncated"))
            reason = "data/cifar-100-python/train: truncated"
        assert (folder / "w1_model_1.pt").is_file()  # the second writer was waited for
        lock_run_dir(folder).release()  # and the folder released: another process may take it
        results = json.loads((folder / "results.json").read_text())
        assert results["status"] == "failed" and reason in results["error"], results
        assert (results["epochs"], results["iterations"]) == (1, 7)  # epochs completed, not the one begun


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from ignite.engine import Engine
    from ignite.handlers import Checkpoint
    from handlers.atomic import write_atomic
    from handlers.checkpoints import SaveThenRemove

    folder, marker = Path(sys.argv[1]), Path(sys.argv[2])

    class Held(SaveThenRemove):
        def _save_func(self, checkpoint, path, func):
            def write(f):
                func(checkpoint, f, **self.kwargs)
                marker.touch()  # everything written, not yet flushed or renamed
                time.sleep(600)
            write_atomic(path, write) if self.background else super()._save_func(checkpoint, path, func)

    model = torch.nn.Linear(64, 64)
    saver = Held(folder)
    handler = Checkpoint({"model": model}, saver, filename_prefix="t", n_saved=1,
                         score_function=lambda e: e.state.iteration)
    engine = Engine(lambda e, b: None)
    engine.state.iteration = 1
    handler(engine)  # written in the foreground
    torch.save(model.state_dict(), folder.parent / "expected.pt")
    with torch.no_grad():
        model.weight.add_(1.0)
    saver.background = True
    engine.state.iteration = 2
    handler(engine)  # in the background; then training would go on
    while True:
        time.sleep(1)
""")


@pytest.mark.slow
def test_a_kill_during_a_background_write_leaves_the_previous_checkpoint_intact(tmp_path: Path) -> None:
    folder, marker = tmp_path / "checkpoints", tmp_path / "written"
    folder.mkdir()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(marker)], cwd=ROOT)
    deadline = time.monotonic() + 120
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert marker.exists(), "the background write never started"
    names = sorted(p.name for p in folder.iterdir())  # the new file never appeared; its temporary did
    assert len(names) == 2 and names[0].startswith(TEMP_PREFIX) and names[1] == "t_model_1.pt"
    saved = load_checkpoint(folder / "t_model_1.pt")
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in expected.items())


def test_a_run_saves_the_same_state_in_the_background_as_in_the_foreground(tmp_path: Path, small_data: Path) -> None:
    """Two real runs, the second with background_write off: every training checkpoint holds the same
    weights, optimizer state, generator and trainer state."""
    files = {}
    for background in (True, False):
        name = f"bg-{background}".lower()
        cfg = run_config(tmp_path / f"{name}.json", small_data, tmp_path / "runs", train={"epochs": 1},
                         checkpoint={"every_iters": 2, "keep_last": 4, "background_write": background})
        ran = run_main("--config", str(cfg), "--run-name", name)
        assert ran.returncode == 0, ran.stderr
        files[background] = sorted((tmp_path / "runs" / name / "checkpoints").glob("training_checkpoint_*.pt"))
    assert [p.name for p in files[True]] == [p.name for p in files[False]] == [
        f"training_checkpoint_{i}.pt" for i in (2, 4, 5)]  # two in the background, the last not
    for a, b in zip(files[True], files[False]):
        x, y = load_checkpoint(a), load_checkpoint(b)
        for name, value in x["model"].items():
            assert torch.equal(value, y["model"][name]), (a.name, name)
        for key, state in x["optimizer"]["state"].items():
            assert torch.equal(state["momentum_buffer"], y["optimizer"]["state"][key]["momentum_buffer"])
        assert torch.equal(x["augment"]["generators"], y["augment"]["generators"])
        assert x["trainer"] == y["trainer"]


def test_a_training_checkpoint_lands_only_after_the_best_model_asked_for_before_it(tmp_path: Path) -> None:
    """One saver for both: a slow best-model write (the last epoch's, say) is on disk before the training
    checkpoint that follows it, so a run that its last checkpoint calls finished has its best model."""
    saver = SlowSaver(tmp_path, delay=0.5)
    trainer = _engine_at(4)
    best = best_model_checkpoint(saver, {"model": nn.Linear(2, 2)}, trainer, metric="top1")
    training = Checkpoint({"model": nn.Linear(2, 2)}, saver, filename_prefix="training",
                          score_function=lambda e: e.state.iteration)
    evaluator = _engine_at(1)
    evaluator.state.metrics = {"top1": 0.5}
    best(evaluator)  # in the background
    saver.background = False
    training(trainer)  # waits for the best model first
    assert (tmp_path / "best.pt").is_file() and (tmp_path / "training_model_4.pt").is_file()
