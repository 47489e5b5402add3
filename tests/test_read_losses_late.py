"""logging.read_losses_late: each interval's losses read at the next interval's end, TensorBoard's loss
scalars written by a thread of their own; the same rows, values and event files as without it, later.
Real Ignite engines, checkpoints and TensorBoard's own reader; the device half (pinned copies, CUDA
events, no synchronisation at an interval's end) only where there is a GPU."""
from __future__ import annotations

import errno
import io
import time
import warnings
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from handlers.atomic import OutputWriteError
from handlers.checkpoints import SaveThenRemove
from handlers.loss_buffer import LossBuffer, LossEvents, LossNotFinite
from handlers.progress import attach_progress_bar
from handlers.tensorboard import EventLog, TensorBoardLogging, WriterThread

EPOCH_LENGTH, EVERY, SAVE_EVERY = 10, 3, 4  # saves mid-epoch and mid-interval, and at an interval's end (12)


def step_values(engine: Engine, _: object, nan_at: int = 0) -> torch.Tensor:
    """[loss, top-1] of a step, different at every iteration (and exact in binary)."""
    it = engine.state.iteration
    return torch.tensor([float("nan") if it == nan_at else 2.0 + it / 8, (it % 4) / 4])


def toy_run(late: bool, every: int = EVERY, save_every: int = SAVE_EVERY, epochs: int = 2):
    """A trainer with a LossBuffer and a save every `save_every` iterations flushing it first (as wire_run
    does): each LOSS_FLUSHED as (iteration at the event, its rows), and what each save saw."""
    trainer = Engine(step_values)
    losses = LossBuffer(every, scheduled=lambda: {"lr": trainer.state.iteration / 100}, late=late).attach(trainer)
    delivered, at_saves = [], []
    trainer.add_event_handler(LossEvents.LOSS_FLUSHED, lambda e: delivered.append(
        (e.state.iteration, e.state.flushed_losses)))
    saves = Events.ITERATION_COMPLETED(every=save_every) | Events.EPOCH_COMPLETED
    trainer.add_event_handler(saves, losses.flush)
    trainer.add_event_handler(saves, lambda e: at_saves.append(
        (e.state.iteration, e.state.flushed_losses[-1][0], losses.state_dict()["running_loss"])))
    trainer.run(range(EPOCH_LENGTH), max_epochs=epochs)
    return delivered, at_saves


def test_late_reads_deliver_the_same_rows_in_the_same_batches_later_and_everything_at_saves() -> None:
    """Every LOSS_FLUSHED carries what it carries without the option, in the same order, at the same
    iteration or later; at every save (mid-epoch, at epoch ends) the newest row is the save's iteration
    and the smoothed loss a checkpoint would hold is the same: nothing buffered, nothing different."""
    now, late = toy_run(late=False), toy_run(late=True)
    assert [rows for _, rows in late[0]] == [rows for _, rows in now[0]]
    assert all(at_late >= at_now for (at_late, _), (at_now, _) in zip(late[0], now[0]))
    assert any(at_late > at_now for (at_late, _), (at_now, _) in zip(late[0], now[0]))
    assert late[1] == now[1] and all(it == newest for it, newest, _ in late[1])
    assert [it for it, _, _ in late[1]] == [4, 8, 10, 12, 16, 20, 20]  # 20: its 4th iteration, then the epoch


def test_loss_flushed_at_iteration_2k_carries_the_interval_before() -> None:
    """Intervals of 2, no saves but the epoch's end: at iteration 4 the rows of 1-2, at 6 those of 3-4; at
    the epoch's end (10) the interval before (7-8), then its last (9-10), each in its own event."""
    delivered, _ = toy_run(late=True, every=2, save_every=10_000, epochs=1)
    delivered = [(at, [it for it, _, _ in rows]) for at, rows in delivered]
    assert delivered == [(4, [1, 2]), (6, [3, 4]), (8, [5, 6]), (10, [7, 8]), (10, [9, 10])]


def test_a_nan_still_in_flight_raises_before_the_checkpoint_of_the_next_save(tmp_path: Path) -> None:
    """The NaN of iteration 3 is in the interval copied at 3, not read yet; the save at 4 reads it first
    and raises, so its checkpoint handler never runs; the one at 4 of a healthy run is written."""
    for nan_at, saved in ((0, ["model_4.pt"]), (3, [])):
        folder = tmp_path / f"nan{nan_at}"
        trainer = Engine(lambda e, b: step_values(e, b, nan_at))
        losses = LossBuffer(every=3, scheduled=lambda: {"lr": 0.1}, late=True).attach(trainer)
        saves = Events.ITERATION_COMPLETED(once=4)
        trainer.add_event_handler(saves, losses.flush)
        trainer.add_event_handler(saves, Checkpoint({"model": torch.nn.Linear(2, 2)}, SaveThenRemove(folder),
                                                    global_step_transform=lambda e, _: e.state.iteration))
        if nan_at:
            with pytest.raises(LossNotFinite, match="at iteration 3"):
                trainer.run(range(EPOCH_LENGTH), max_epochs=1)
        else:
            trainer.run(range(EPOCH_LENGTH), max_epochs=1)
        assert sorted(p.name for p in folder.iterdir()) == saved


def test_without_a_save_a_nan_raises_at_the_next_intervals_end() -> None:
    trainer = Engine(lambda e, b: step_values(e, b, nan_at=2))
    LossBuffer(every=3, scheduled=lambda: {"lr": 0.1}, late=True).attach(trainer)
    with pytest.raises(LossNotFinite, match="at iteration 2"):
        trainer.run(range(EPOCH_LENGTH), max_epochs=1)
    assert trainer.state.iteration == 6


def _log_to_tensorboard(run_dir: Path, late: bool, background: bool) -> list[tuple[int, int]]:
    """Two epochs of 10 iterations through the handlers a run attaches: losses every 3, a save every 4
    (TensorBoard flushed before it), an evaluation with figures at each epoch's end, config and hparams.
    At each save: (its iteration, the newest loss step in the file on disk then)."""
    trainer = Engine(step_values)
    losses = LossBuffer(EVERY, scheduled=lambda: {"lr": 0.1, "momentum": 0.9}, late=late).attach(trainer)
    evaluator = Engine(lambda e, b: None)
    evaluator.add_event_handler(Events.COMPLETED, lambda e: e.state.metrics.update(
        top1=0.375, top5=0.8125, loss=2.5, confusion=torch.tensor([[3, 1], [0, 4]])))
    # What EpochSummary sets at an epoch's end, for TensorBoard's epoch numbers
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: setattr(e.state, "epoch_seconds", 1.5))
    tb = TensorBoardLogging(run_dir, background=background)
    tb.attach(trainer, evaluator, best=lambda: {"top1": 0.375}, class_names=["a", "b"],
              sample_images=lambda: torch.full((2, 3, 4, 4), 0.5))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: evaluator.run([0]))
    saves = Events.ITERATION_COMPLETED(every=SAVE_EVERY)
    trainer.add_event_handler(saves, losses.flush)
    trainer.add_event_handler(saves, tb.flush)
    on_disk: list[tuple[int, int]] = []
    trainer.add_event_handler(saves, lambda e: on_disk.append((e.state.iteration, max(
        event.step for event in _read(run_dir / "train") if event.summary.value[:1]
        and event.summary.value[0].tag == "metrics/loss"))))
    tb.log_config({"seed": 0})
    tb.log_hparams({"seed": 0})
    trainer.run(range(EPOCH_LENGTH), max_epochs=2)
    tb.close()
    return on_disk


def _read(folder: Path) -> list:
    """The events of the folder's one file, in file order."""
    (path,) = folder.glob("events.out.tfevents.*")
    return list(EventFileLoader(str(path)).Load())


def _events(folder: Path) -> list[bytes]:
    """Every event of the folder's one file, in file order, without its wall time."""
    events = _read(folder)
    for event in events:
        event.wall_time = 0
    return [event.SerializeToString() for event in events]


def test_event_files_are_the_same_with_the_writer_thread_and_late_reads(tmp_path: Path, monkeypatch) -> None:
    """Byte for byte but the wall times, event by event in file order, in both runs of TensorBoard: the
    writer thread alone, and with late reads too (the epoch's numbers still follow its last losses); and at
    every save, every loss up to it on disk. Each push of the losses made slow, so that a write which did
    not wait for the thread would come first."""
    push = EventLog.push
    monkeypatch.setattr(EventLog, "push", lambda self: (time.sleep(0.01), push(self)))
    for name, late, background in (("now", False, False), ("thread", False, True), ("late", True, True)):
        on_disk = _log_to_tensorboard(tmp_path / name, late, background)
        assert on_disk == [(4, 4), (8, 8), (12, 12), (16, 16), (20, 20)], name
    for run in ("train", "validation"):
        reference = _events(tmp_path / "now" / run)
        assert len(reference) > 15
        assert _events(tmp_path / "thread" / run) == reference, run
        assert _events(tmp_path / "late" / run) == reference, run
    acc = EventAccumulator(str(tmp_path / "late" / "train"))
    acc.Reload()
    loss = [(e.step, e.value) for e in acc.Scalars("metrics/loss")]
    assert loss == [(it, 2.0 + it / 8) for it in range(1, 21)]
    assert [e.step for e in acc.Scalars("system/epoch_seconds")] == [10, 20]


def test_a_write_that_fails_in_the_writer_thread_ends_the_run_naming_the_folder(tmp_path: Path,
                                                                                 monkeypatch) -> None:
    """A full disk from iteration 4's losses on: the run raises the OutputWriteError that names the
    event folder, in the training thread; closing afterwards does not raise it again."""
    trainer = Engine(step_values)
    LossBuffer(every=2, scheduled=lambda: {"lr": 0.1}, late=True).attach(trainer)
    tb = TensorBoardLogging(tmp_path / "tb", background=True).attach(trainer, Engine(lambda e, b: None),
                                                                       best=dict)
    write_event = tb.train._writer.write_event

    def full_disk(event) -> None:
        if event.step >= 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        write_event(event)

    monkeypatch.setattr(tb.train._writer, "write_event", full_disk)
    with pytest.raises(OutputWriteError, match=r"tb/train: cannot write TensorBoard events \(No space left"):
        trainer.run(range(EPOCH_LENGTH), max_epochs=1)
    tb.close()
    acc = EventAccumulator(str(tmp_path / "tb" / "train"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("metrics/loss")] == [1, 2, 3]  # 4 failed: nothing after it


def test_the_writer_thread_runs_jobs_in_order_and_none_after_one_that_failed() -> None:
    writes = WriterThread("test")
    done: list[int] = []
    for i in range(50):
        writes.submit(lambda i=i: done.append(i))
    writes.drain()
    assert done == list(range(50))
    writes.submit(lambda: 1 / 0)
    writes.submit(lambda: done.append(50))
    with pytest.raises(ZeroDivisionError):
        writes.drain()
    writes.close()  # raised once
    assert done == list(range(50))


@pytest.mark.parametrize("late", [False, True])
def test_the_progress_bar_shows_the_loss_and_lr_with_late_reads_without_a_warning(late: bool) -> None:
    """The bar is redrawn only once a loss has been read (late: from the second interval on)."""
    trainer = Engine(lambda e, _: torch.tensor([2.5, 0.5]))
    LossBuffer(every=2, scheduled=lambda: {"lr": 0.05}, late=late).attach(trainer)
    stream = io.StringIO()
    attach_progress_bar(trainer, every=2).tqdm_kwargs["file"] = stream
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Ignite warns of a None it cannot show
        trainer.run(range(6), max_epochs=2)
    shown = stream.getvalue()
    assert "Epoch [2/2]" in shown and "lr=0.05" in shown and "running_loss=2.5" in shown


def _busy_gpu_run(late: bool, sync_debug: str) -> tuple[list, list[bool]]:
    """Two epochs of 10 steps that each keep the GPU busy for a few ms (a sleep kernel) and return their
    values made on the device (no copy from the host): the rows delivered, and at each interval's end
    inside an epoch whether the copy just started is still queued behind the steps (late only)."""
    def busy(engine: Engine, _: object) -> torch.Tensor:
        torch.cuda._sleep(5_000_000)
        it = engine.state.iteration
        out = torch.full((2,), 2.0 + it / 8, device="cuda")
        out[1] = (it % 4) / 4
        return out

    trainer = Engine(busy)
    losses = LossBuffer(4, scheduled=lambda: {"lr": 0.1}, late=late).attach(trainer)
    delivered, queued = [], []
    trainer.add_event_handler(LossEvents.LOSS_FLUSHED, lambda e: delivered.append(e.state.flushed_losses))
    if late:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=4), lambda e: queued.append(
            not losses._in_flight.ready.query()) if e.state.iteration % EPOCH_LENGTH else None)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode(sync_debug)
    try:
        trainer.run(range(EPOCH_LENGTH), max_epochs=2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return delivered, queued


@pytest.mark.gpu
def test_on_cuda_late_reads_never_synchronise_and_deliver_what_reads_at_once_do() -> None:
    """CUDA's sync debug mode raises at a synchronising copy: reading at once does one at every interval's
    end; late reads none in two whole epochs (they wait on CUDA events only, the previous interval's
    mid-epoch), and the copy each interval's end starts is still queued behind the busy steps then."""
    with pytest.raises(RuntimeError, match="synchroniz"):
        _busy_gpu_run(late=False, sync_debug="error")
    late, queued = _busy_gpu_run(late=True, sync_debug="error")
    now, _ = _busy_gpu_run(late=False, sync_debug="default")
    assert late == now and [it for it, _, _ in now[0]] == [1, 2, 3, 4]
    assert now[0][0][1] == {"loss": 2.125, "top1": 0.25}
    assert queued == [True] * 4  # at iterations 4, 8, 12, 16
