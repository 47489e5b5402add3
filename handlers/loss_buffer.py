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
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import ignite.distributed as idist
import torch
from ignite.engine import Engine, EventEnum, Events


class LossEvents(EventEnum):
    LOSS_FLUSHED = "loss_flushed"


class LossNotFinite(RuntimeError):
    def __init__(self, iteration: int, value: float) -> None:
        super().__init__(f"training loss became {value} at iteration {iteration}")
        self.iteration, self.value = iteration, value


class LossBuffer:
    def __init__(self, every: int, scheduled: Callable[[], Mapping[str, float]], smoothing: float = 0.98) -> None:
        """`scheduled`: the values the schedule set for the step just run, e.g. {"lr": 0.1}."""
        self.every, self.scheduled, self.smoothing = every, scheduled, smoothing
        self._losses: list[torch.Tensor] = []
        self._steps: list[tuple[int, dict[str, float]]] = []
        self.running_loss: float | None = None

    def attach(self, engine: Engine) -> "LossBuffer":
        engine.register_events(*LossEvents)
        engine.state.flushed_losses = []
        engine.state.running_loss = None
        engine.state.lr = None
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self.flush)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.flush)
        return self

    def state_dict(self) -> dict[str, Any]:
        """The smoothed loss (what the progress bar and the epoch's line show), for a resume to go on from:
        saved right after a flush, so nothing is buffered."""
        return {"running_loss": self.running_loss}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.running_loss = state["running_loss"]

    def _collect(self, engine: Engine) -> None:
        # Read before the scheduler steps for the next iteration: the values this step used.
        self._losses.append(engine.state.output.detach().float().reshape(-1))
        self._steps.append((engine.state.iteration, dict(self.scheduled())))

    def flush(self, engine: Engine) -> None:
        if not self._losses:
            return
        rows = torch.stack(self._losses).tolist()  # the one host synchronisation
        steps, self._losses, self._steps = self._steps, [], []
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
