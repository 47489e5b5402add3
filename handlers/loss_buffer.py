"""Training loss and batch top-1 without a host synchronisation every iteration.

The step's output, a device tensor [loss, top-1] (a plain loss tensor works too), stays on the
device; every `every` iterations (and at the end of each epoch) the buffered values are copied to the
host in one transfer. Then the engine fires LossEvents.LOSS_FLUSHED with `engine.state.flushed_losses`
= [(iteration, {"loss": ..., "top1": ...}, {"lr": ..., ...}), ...] (each step's measured values, and
its scheduled values as `scheduled` returned them after the step) and `engine.state.running_loss` and
`engine.state.lr` updated, for loggers to use. A NaN or infinite loss raises LossNotFinite there,
before any later handler of the same event (a checkpoint, say) can save the diverged weights. Under
several processes they agree first (one all-reduce per flush), so that all of them stop together
instead of some waiting forever.

Reading the values waits for the device to finish everything queued before them: the pipeline of queued
steps drains at every read (on an H200 a step is ~3 ms, replayed from a CUDA graph). With `late`
(logging.read_losses_late) an interval's read waits for nothing: at its end its values start copying to
the host (on CUDA into pinned memory, a CUDA event recorded after the copy) and the *previous*
interval's values, copied long ago, are delivered; so the LOSS_FLUSHED at iteration k * every carries
the iterations of interval k-1, and `running_loss` and `lr` are an interval behind. `flush` (every save
event, each epoch's end, a progress line's) still delivers everything, the interval in flight first,
reading the rest at once: a checkpoint holds no value unread, a diverged loss still raises before any
save, and each LOSS_FLUSHED carries exactly the rows it carries without `late`, in the same order,
later. Late deliveries happen at the same iterations in every process (never "when the copy is done",
which differs between them), so the all-reduce of each comes at the same point everywhere. On the CPU
the copy is done at once and the same code runs, one interval late, as on CUDA.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import ignite.distributed as idist
import torch
from ignite.engine import Engine, EventEnum, Events


class LossEvents(EventEnum):
    LOSS_FLUSHED = "loss_flushed"


class LossNotFinite(RuntimeError):
    def __init__(self, iteration: int, value: float) -> None:
        super().__init__(f"training loss became {value} at iteration {iteration}")
        self.iteration, self.value = iteration, value


Steps = list[tuple[int, dict[str, float]]]  # (iteration, scheduled values) of each buffered step


@dataclass
class IntervalCopy:
    """One interval's values on their way to the host, and the steps they belong to."""

    steps: Steps
    values: torch.Tensor  # (steps, 2) or (steps, 1): on the host once `ready` has passed
    ready: Optional[torch.cuda.Event] = None  # None: `rows` reads `values` as they are (synchronising)

    @staticmethod
    def start(stacked: torch.Tensor, steps: Steps, wait_later: bool) -> "IntervalCopy":
        """Without `wait_later`, or off CUDA, nothing starts: `rows` reads the tensor itself, as .tolist()
        always did (on the CPU that costs nothing, so the late logic runs there unchanged)."""
        if not (wait_later and stacked.is_cuda):
            return IntervalCopy(steps, stacked)
        host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)  # from torch's pinned cache
        host.copy_(stacked, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()  # on the current stream, which also runs the steps: after their values are copied
        return IntervalCopy(steps, host, ready)

    def rows(self) -> list[list[float]]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.values.tolist()


class LossBuffer:
    def __init__(self, every: int, scheduled: Callable[[], Mapping[str, float]], smoothing: float = 0.98,
                 late: bool = False) -> None:
        """`scheduled`: the values the schedule set for the step just run, e.g. {"lr": 0.1}. `late`: each
        interval delivered at the next interval's end, or at the next `flush` (the module's docstring)."""
        self.every, self.scheduled, self.smoothing, self.late = every, scheduled, smoothing, late
        self._losses: list[torch.Tensor] = []
        self._steps: Steps = []
        self._in_flight: Optional[IntervalCopy] = None  # `late`: the interval whose copy was started last
        self.running_loss: float | None = None

    def attach(self, engine: Engine) -> "LossBuffer":
        engine.register_events(*LossEvents)
        engine.state.flushed_losses = []
        engine.state.running_loss = None
        engine.state.lr = None
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self._interval_end)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.flush)
        return self

    def state_dict(self) -> dict[str, Any]:
        """The smoothed loss (what the progress bar and the epoch's line show), for a resume to go on from:
        saved right after a `flush`, so nothing is buffered or in flight."""
        return {"running_loss": self.running_loss}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.running_loss = state["running_loss"]

    def _collect(self, engine: Engine) -> None:
        # Read before the scheduler steps for the next iteration: the values this step used.
        self._losses.append(engine.state.output.detach().float().reshape(-1))
        self._steps.append((engine.state.iteration, dict(self.scheduled())))

    def _interval_end(self, engine: Engine) -> None:
        if not self.late:
            self.flush(engine)
            return
        previous, self._in_flight = self._in_flight, self._start_copy()
        if previous is not None:
            self._deliver(engine, previous)

    def flush(self, engine: Engine) -> None:
        """Every value so far delivered now, the interval in flight (`late`) first, each as it would have
        been without `late`: before a checkpoint, at an epoch's end, for a progress line."""
        previous, self._in_flight = self._in_flight, None
        if previous is not None:
            self._deliver(engine, previous)
        current = self._start_copy()
        if current is not None:
            self._deliver(engine, current)

    def _start_copy(self) -> Optional[IntervalCopy]:
        if not self._losses:
            return None
        stacked = torch.stack(self._losses)
        steps, self._losses, self._steps = self._steps, [], []
        return IntervalCopy.start(stacked, steps, wait_later=self.late)

    def _deliver(self, engine: Engine, copy: IntervalCopy) -> None:
        rows = copy.rows()  # the one host synchronisation (with `late`, long finished)
        steps = copy.steps
        measured = [dict(zip(("loss", "top1"), row)) for row in rows]
        values = [m["loss"] for m in measured]
        bad = next(((it, v) for (it, _), v in zip(steps, values) if not math.isfinite(v)), None)
        if idist.get_world_size() > 1:
            anywhere = idist.all_reduce(float(bad is not None), op="MAX")
            if anywhere and bad is None:
                bad = (steps[-1][0], float("nan"))  # another process's loss diverged
        if bad is not None:
            raise LossNotFinite(*bad)
        for value in values:
            a = self.smoothing
            self.running_loss = value if self.running_loss is None else a * self.running_loss + (1 - a) * value
        engine.state.flushed_losses = [(it, m, scheduled) for (it, scheduled), m in zip(steps, measured)]
        engine.state.running_loss = self.running_loss
        engine.state.lr = steps[-1][1].get("lr")
        engine.fire_event(LossEvents.LOSS_FLUSHED)
