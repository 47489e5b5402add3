"""Checkpoints written in a background thread (`checkpoint.background_write`, on by default): each holds
the state of the moment it was asked for, one write at a time, errors reach the training thread, a
kill during the write leaves the previous checkpoint intact, and a run's checkpoints are the same
bytes' worth of state whether written in the background or not. The host copy goes into buffers the
saver reuses: what a background save writes is what a foreground save would, each file its own save's
state, whatever training does meanwhile; on a GPU the copy is queued, not waited for."""
from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

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
from handlers.checkpoints import CheckpointWriteError, HostBuffers, SaveThenRemove, best_model_checkpoint
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


def _trained(steps: int = 1) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A small model with what a recipe's checkpoint has: channels-last convolution weights, BatchNorm
    (its `_metadata` and integer counter) and SGD momentum buffers."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        _step(model, optimizer)
    return model, optimizer


def _step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    optimizer.zero_grad()
    model(torch.randn(2, 3, 6, 6)).square().mean().backward()
    optimizer.step()


def _assert_same(a: Any, b: Any, where: str = "checkpoint") -> None:
    """The same checkpoint: the same containers, keys and `_metadata`; tensors equal, with the same
    dtype and strides; everything else equal."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.stride()) == (b.dtype, b.shape, b.stride()) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b) and getattr(a, "_metadata", None) == getattr(b, "_metadata", None), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _load(path: Path) -> Any:
    return torch.load(path, weights_only=True)


def test_a_background_save_writes_the_same_checkpoint_as_a_foreground_one(tmp_path: Path) -> None:
    model, optimizer = _trained()
    engine = _engine_at(3)
    for background in (True, False):
        saver = SaveThenRemove(tmp_path / str(background), background=background)
        Checkpoint({"model": model, "optimizer": optimizer, "trainer": engine}, saver, filename_prefix="t",
                   score_function=lambda e: e.state.iteration)(engine)
        saver.wait()
    background, foreground = (_load(tmp_path / str(b) / "t_checkpoint_3.pt") for b in (True, False))
    assert background["model"]._metadata  # compared, not absent from both
    _assert_same(background, foreground)


class Recording(SaveThenRemove):
    """Writes in the background, noting where each write's tensors are in memory."""

    def __init__(self, dirname: Path) -> None:
        super().__init__(dirname, background=True)
        self.addresses: list[dict[str, int]] = []

    def _save_func(self, checkpoint, path, func) -> None:
        self.addresses.append({k: v.data_ptr() for k, v in checkpoint.items()})
        super()._save_func(checkpoint, path, func)


def test_the_next_save_reuses_the_buffers_and_each_file_holds_its_own_state(tmp_path: Path) -> None:
    model = nn.Linear(4, 4)
    saver = Recording(tmp_path)
    handler = Checkpoint({"model": model}, saver, filename_prefix="t", n_saved=2,
                         score_function=lambda e: e.state.iteration)
    states = []
    for iteration in (1, 2):
        states.append(copy.deepcopy(model.state_dict()))
        handler(_engine_at(iteration))
        with torch.no_grad():
            model.weight.add_(1.0)
            model.bias.mul_(-2.0)
    saver.wait()
    first, second = saver.addresses
    assert first == second  # the same host memory, not a new copy per save
    assert all(first[k] != v.data_ptr() for k, v in model.state_dict().items())  # and not the live tensors
    for iteration, state in zip((1, 2), states):
        _assert_same(_load(tmp_path / f"t_model_{iteration}.pt"), state, f"t_model_{iteration}.pt")
    assert not torch.equal(states[0]["weight"], states[1]["weight"])


class Gated(SaveThenRemove):
    """Writes in the background, serialising only once `go` is set."""

    def __init__(self, dirname: Path) -> None:
        super().__init__(dirname, background=True)
        self.go = threading.Event()

    def _save_func(self, checkpoint, path, func) -> None:
        assert self.go.wait(10), "never let go"
        super()._save_func(checkpoint, path, func)


def test_training_right_after_a_save_returns_does_not_change_what_it_writes(tmp_path: Path) -> None:
    model, optimizer = _trained()
    saver = Gated(tmp_path)
    handler = Checkpoint({"model": model, "optimizer": optimizer}, saver, filename_prefix="t",
                         score_function=lambda e: e.state.iteration)
    expected = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    handler(_engine_at(1))
    _step(model, optimizer)  # weights and momentum changed in place, before the write has read them
    assert not (tmp_path / "t_checkpoint_1.pt").exists()
    saver.go.set()
    saver.wait()
    _assert_same(_load(tmp_path / "t_checkpoint_1.pt"), expected)


@pytest.mark.gpu
def test_on_a_gpu_the_copy_is_queued_into_pinned_buffers_and_not_waited_for(tmp_path: Path) -> None:
    model = nn.Linear(256, 256).cuda()
    expected = {k: v.cpu() for k, v in model.state_dict().items()}
    torch.cuda._sleep(500_000_000)  # a busy GPU (a quarter of a second): the copies queue behind it
    snapshot = HostBuffers().copy(model.state_dict())
    assert len(snapshot.events) == 1 and not snapshot.events[0].query()  # returned, the copy still queued
    assert all(t.device.type == "cpu" and t.is_pinned() for t in snapshot.value.values())
    snapshot.wait()
    assert all(torch.equal(snapshot.value[k], v) for k, v in expected.items())

    saver = Gated(tmp_path)  # and through the saver: training's next kernels run after the copies
    handler = Checkpoint({"model": model}, saver, filename_prefix="t", score_function=lambda e: e.state.iteration)
    torch.cuda._sleep(500_000_000)
    handler(_engine_at(1))
    with torch.no_grad():
        model.weight.add_(1.0)
    saver.go.set()
    saver.wait()
    saved = _load(tmp_path / "t_model_1.pt")
    assert all(torch.equal(saved[k], v) for k, v in expected.items())
