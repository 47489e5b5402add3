"""What a person watching the run sees: a tqdm bar per epoch in a terminal; in a log file (no terminal),
a line every so often inside each epoch, with the iteration, the loss, the lr, the throughput and the
time left. Every line the run prints starts with the time (`timestamped`), so a log file says when.

Neither forces a device synchronisation of its own: the bar advances when LossBuffer flushes and
reads `state.running_loss` and `state.lr`, which the flush sets (attach LossBuffer first); the lines
are written at flushes too, `ProgressLines` says when. With LossBuffer's `late` both show the loss and
lr an interval behind the iteration they show (the lines of `every_iters` excepted: they flush).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar

from handlers.clock import clock
from handlers.loss_buffer import LossEvents

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
EVERY_SECONDS = 60.0  # progress_every_iters unset: about one line a minute


def attach_progress_bar(trainer: Engine, every: int) -> ProgressBar:
    """Redrawn every `every` iterations (after LossBuffer's flush of the same iteration) once a loss has been
    read: with logging.read_losses_late the first interval's losses come at the second's end, and Ignite
    would warn of the None before them. The loss and lr shown are then an interval behind the bar."""
    def due(engine: Engine, iteration: int) -> bool:
        return iteration % every == 0 and engine.state.running_loss is not None

    bar = ProgressBar(persist=False, bar_format=None)
    bar.attach(trainer, event_name=Events.ITERATION_COMPLETED(event_filter=due),
               state_attributes=["running_loss", "lr"])
    return bar


def timestamped(write: Callable[[str], None]) -> Callable[[str], None]:
    """`write` with every line of a text prefixed by the local time, as 2026-12-02 05:10:11."""
    def write_timestamped(text: str) -> None:
        now = time.strftime(TIME_FORMAT)
        write("\n".join(f"{now}  {line}" for line in text.split("\n")))

    return write_timestamped


def line_iterations(every_iters: int) -> Any:
    """The iterations that get a progress line with `logging.progress_every_iters`: every `every_iters`-th of
    each epoch, but not its last (the epoch's own line follows). Every process flushes its losses there
    (app/training.py), rank 0 then writes the line."""
    def due(engine: Engine, iteration: int) -> bool:
        in_epoch = (iteration - 1) % engine.state.epoch_length + 1
        return in_epoch % every_iters == 0 and in_epoch != engine.state.epoch_length

    return Events.ITERATION_COMPLETED(event_filter=due)


class ProgressLines:
    """One line inside an epoch: every `every_iters` iterations of it (the losses read then by a LossBuffer
    flush attached at `line_iterations` before this handler, in every process), or, with None,
    at the first loss flush a minute or more after the last line, so that a slow device (a CPU epoch
    takes many minutes) is never long silent while a fast one (a GPU epoch of seconds) prints only its
    epoch line. No line at an epoch's last iteration: the epoch's own line follows.

    The throughput is this epoch's, in this process's time; the time left is the epoch's and the
    run's, at that throughput, with each evaluation still to come taking what the last one took."""

    def __init__(self, write: Callable[[str], None], evaluator: Engine, every_iters: Optional[int] = None,
                 world_size: int = 1) -> None:
        self.write, self.evaluator = write, evaluator
        self.every_iters, self.world_size = every_iters, world_size
        self._epoch_start = self._last_line = 0.0
        self._first_iteration = 0

    def attach(self, trainer: Engine) -> "ProgressLines":
        trainer.add_event_handler(Events.EPOCH_STARTED, self._started)
        if self.every_iters:
            trainer.add_event_handler(line_iterations(self.every_iters), self._at_interval)
        else:
            trainer.add_event_handler(LossEvents.LOSS_FLUSHED, self._if_due)
        return self

    def _started(self, trainer: Engine) -> None:
        self._epoch_start = self._last_line = time.perf_counter()
        self._first_iteration = trainer.state.iteration

    def _at_interval(self, trainer: Engine) -> None:
        # The losses up to this iteration were read by the flush that every process attaches at
        # `line_iterations` before this handler: under several processes a flush is a collective (the
        # divergence check's all-reduce), so this rank-0 handler must not flush on its own.
        self._line(trainer, time.perf_counter())

    def _if_due(self, trainer: Engine) -> None:
        if self._epoch_end(trainer):
            return
        now = time.perf_counter()
        if now - self._last_line >= EVERY_SECONDS:
            self._line(trainer, now)

    @staticmethod
    def _epoch_end(trainer: Engine) -> bool:
        return trainer.state.iteration % trainer.state.epoch_length == 0

    def _line(self, trainer: Engine, now: float) -> None:
        s = trainer.state
        self._last_line = now
        steps = s.iteration - self._first_iteration
        # Every batch before an epoch's last is full, and no line comes at the last: no count per step needed.
        images = steps * len(s.batch[1]) * self.world_size
        seconds_per_step = (now - self._epoch_start) / max(steps, 1)
        in_epoch = s.iteration - (s.epoch - 1) * s.epoch_length
        left_in_epoch = s.epoch_length - in_epoch
        left_in_run = s.epoch_length * s.max_epochs - s.iteration
        evaluation = self.evaluator.state.times.get("COMPLETED") or 0.0
        run_left = left_in_run * seconds_per_step + (s.max_epochs - s.epoch + 1) * evaluation
        loss = "–" if s.running_loss is None else f"{s.running_loss:.4f}"
        lr = "–" if s.lr is None else f"{s.lr:.5f}"
        self.write(f"iteration {in_epoch}/{s.epoch_length} of epoch {s.epoch}/{s.max_epochs}  loss {loss}  lr {lr}  "
                   f"{images / max(now - self._epoch_start, 1e-9):.0f} img/s  "
                   f"ETA epoch {clock(left_in_epoch * seconds_per_step)}, run {clock(run_left)}")

