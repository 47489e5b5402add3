"""A graceful stop on SIGTERM, SIGINT or SIGHUP: what schedulers, Ctrl-C and a closed terminal send
before a kill.

The signal handler only notes the signal. Before a step starts, the engine fires
StopEvents.STOP_REQUESTED, with its state set back to the last completed step: attach to it whatever a
checkpoint needs (the same handlers as on the checkpoint events: losses, generators, TensorBoard, the
training checkpoint and the wait for it to be on disk, results). Then the run ends with
TrainingInterrupted, whose exit code is the shell's for that signal (143 for SIGTERM, 130 for SIGINT,
129 for SIGHUP). Checking before a step, not after one, means an epoch's last step is followed by its
evaluation and epoch-end checkpoint as usual; attach this handler before the learning-rate scheduler,
so that the saved schedule has not moved past the step. A request that comes after the last step (in
the last evaluation, or while the last files are written) is answered by `final_request` once the run
has finished: it still ends with the signal's exit code, and nothing is left to resume.

With several processes they agree, without holding up a step: before each step every process adds
its own flag to an all-reduce over a CPU (gloo) group and reads the result of the previous step's,
long since complete, so all of them stop before the same step, at most two steps after the signal,
whatever the log interval (the first check, after start-up, is a plain all-reduce). They leave
together, after the saving handlers of every process (rank 0's checkpoint, on disk) have run, so that
a launcher that stops the others when one exits cannot cut the checkpoint short. A launcher may
deliver one request twice (the terminal signals the whole process group, and torchrun or our spawn
launcher forwards what it gets), so a second signal within a second of the first counts as the same
request. A later one is the user insisting: the process dies of it at once; the checkpoint saved
before is intact, as every checkpoint is written to a temporary file first.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Any, Optional, Sequence

import ignite.distributed as idist
import torch
import torch.distributed as dist
from ignite.engine import Engine, EventEnum, Events

from handlers.stop_signals import STOP_SIGNALS, answered_stop_signals

SAME_REQUEST_SECONDS = 1.0


class StopEvents(EventEnum):
    STOP_REQUESTED = "stop_requested"


class TrainingInterrupted(Exception):
    """`finished`: the request came after the last step; the run had done all its work."""

    def __init__(self, signum: int, iteration: int, epoch: int, finished: bool = False) -> None:
        self.signum, self.iteration, self.epoch, self.finished = signum, iteration, epoch, finished
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} as the run ended" if finished else
                         f"interrupted by {name} after iteration {iteration} (epoch {epoch})")


class GracefulStop:
    def __init__(self, signals: Optional[Sequence[int]] = None) -> None:
        """Takes over the signals at once (by default the stop signals that the process was not started
        with ignored: `answered_stop_signals`), and unblocks them (handlers/stop_signals.py): create it as
        the process starts its work, so that a request while the run is still being built is kept (the
        run then stops before its first step, with a checkpoint of the state it starts from); they stay
        taken until `restore`."""
        self.signals = answered_stop_signals() if signals is None else tuple(signals)
        self.signum: Optional[int] = None
        self._first_at = 0.0
        self._world = 1
        self._group: Any = None
        self._pending: Optional[tuple[Any, torch.Tensor]] = None  # the all-reduce in flight, and its flag
        self._previous = {s: signal.signal(s, self._on_signal) for s in self.signals}
        # The ignored ones too: one held since start-up is then dropped, as it would have been unheld.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {*self.signals, *STOP_SIGNALS})

    def attach(self, engine: Engine) -> "GracefulStop":
        """In every process of the run, in the same order (with several, it creates a process group)."""
        engine.register_events(*StopEvents)
        self._world = idist.get_world_size()
        if self._world > 1:
            # A group of its own, on the host whatever the training backend (NCCL's would put each flag
            # on the GPU and read it back): the same group on the CPU as beside NCCL.
            self._group = dist.new_group(backend="gloo")
        engine.add_event_handler(Events.ITERATION_STARTED, self._check)
        return self

    def restore(self) -> None:
        """The signal handlers from before."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def final_request(self) -> Optional[int]:
        """After the run's last step: the signal any process got since its last check, or None. With
        several processes a collective: every process calls it, and all get the same answer."""
        if self._world == 1:
            return self.signum
        self._take_pending()
        return self._reduce(async_op=False)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
        elif now - self._first_at > SAME_REQUEST_SECONDS:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _check(self, engine: Engine) -> None:
        if self._world == 1:
            requested = self.signum
        elif self._pending is None:  # the first check of this process: everyone's flags now
            requested = self._reduce(async_op=False)
            self._reduce(async_op=True)
        else:
            requested = self._take_pending()
            self._reduce(async_op=True)
        if requested:
            # Ignite counts an iteration as it starts: the step about to run is not done, and what is
            # saved (the trainer's state included) must be the last completed step.
            engine.state.iteration -= 1
            engine.fire_event(StopEvents.STOP_REQUESTED)
            if self._world > 1:
                idist.barrier()  # all leave once rank 0's checkpoint is written, none while it is
            iteration = engine.state.iteration
            raise TrainingInterrupted(requested, iteration, -(-iteration // engine.state.epoch_length))

    def _reduce(self, async_op: bool) -> Optional[int]:
        flag = torch.tensor([float(self.signum or 0)])
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=async_op)
        if async_op:
            self._pending = (work, flag)
            return None
        return int(flag.item()) or None

    def _take_pending(self) -> Optional[int]:
        if self._pending is None:
            return None
        (work, flag), self._pending = self._pending, None
        work.wait()
        return int(flag.item()) or None
