"""A graceful stop on SIGTERM or SIGINT: what SLURM, Kubernetes, systemd and Ctrl-C send before a kill.

The signal handler only notes the signal. Before the next step starts, the engine fires
StopEvents.STOP_REQUESTED, with its state set back to the last completed step: attach to it whatever a
checkpoint needs (the same handlers as on the checkpoint events: losses, generators, TensorBoard, the
training checkpoint, results). Then the run ends with TrainingInterrupted, whose exit code is the
shell's for that signal (143 for SIGTERM, 130 for SIGINT). Checking before a step, not after one, means
an epoch's last step is followed by its evaluation and epoch-end checkpoint as usual; attach this
handler before the learning-rate scheduler, so that the saved schedule has not moved past the step.

With several processes they agree first: every `every` iterations (the losses' flush interval) one
all_reduce tells each whether any was signalled, so that all stop before the same step; and they
leave together, after the saving handlers of every process (rank 0's checkpoint) have run, so that a
launcher that stops the others when one exits cannot cut the checkpoint short. A launcher
may deliver one request twice (the terminal signals the whole process group, and torchrun or our
spawn launcher forwards what it gets), so a second signal within a second of the first counts as the
same request. A later one is the user insisting: the process dies of it at once; the checkpoint saved
before is intact, as every checkpoint is written to a temporary file first.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Any, Optional, Sequence

import ignite.distributed as idist
from ignite.engine import Engine, EventEnum, Events

SAME_REQUEST_SECONDS = 1.0


class StopEvents(EventEnum):
    STOP_REQUESTED = "stop_requested"


class TrainingInterrupted(Exception):
    def __init__(self, signum: int, iteration: int, epoch: int) -> None:
        self.signum, self.iteration, self.epoch = signum, iteration, epoch
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name} after iteration {iteration} (epoch {epoch})")


class GracefulStop:
    def __init__(self, every: int = 1, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        """Takes over the signals at once: create it as the process starts its work, so that a request
        while the run is still being built is kept (the run then stops before its first step, with a
        checkpoint of the state it starts from); they stay taken until `restore`."""
        self.every, self.signals = every, tuple(signals)
        self.signum: Optional[int] = None
        self._first_at = 0.0
        self._previous = {s: signal.signal(s, self._on_signal) for s in self.signals}

    def attach(self, engine: Engine) -> "GracefulStop":
        engine.register_events(*StopEvents)
        engine.add_event_handler(Events.ITERATION_STARTED, self._check)
        return self

    def restore(self) -> None:
        """The signal handlers from before."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
        elif now - self._first_at > SAME_REQUEST_SECONDS:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _check(self, engine: Engine) -> None:
        requested = self.signum
        if idist.get_world_size() > 1:
            if engine.state.iteration % self.every:
                return
            requested = int(idist.all_reduce(float(self.signum or 0), op="MAX")) or None
        if requested:
            # Ignite counts an iteration as it starts: the step about to run is not done, and what is
            # saved (the trainer's state included) must be the last completed step.
            engine.state.iteration -= 1
            engine.fire_event(StopEvents.STOP_REQUESTED)
            if idist.get_world_size() > 1:
                idist.barrier()  # all leave once rank 0's checkpoint is written, none while it is
            iteration = engine.state.iteration
            raise TrainingInterrupted(requested, iteration, -(-iteration // engine.state.epoch_length))
