"""One line per epoch that reads well in a terminal and in a log file.

Training time and throughput are measured from EPOCH_STARTED to the end of the epoch's last iteration,
so evaluation time is not counted as training; the line itself is written after the evaluator has run.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

from ignite.engine import Engine, Events


class EpochSummary:
    def __init__(self, evaluator: Engine, write: Callable[[str], None], world_size: int = 1,
                 ema_evaluator: Optional[Engine] = None) -> None:
        """`ema_evaluator`: the weights' EMA's evaluation, its top-1 on the line and its time not training's."""
        self.evaluator, self.write, self.world_size = evaluator, write, world_size
        self.ema_evaluator = ema_evaluator
        self._start = 0.0
        self._images = 0
        self.epoch_seconds = 0.0
        self.images_per_second = 0.0

    def attach(self, trainer: Engine) -> "EpochSummary":
        """Attach after the evaluation handler, so the line has this epoch's validation metrics."""
        trainer.add_event_handler(Events.EPOCH_STARTED, self._started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._count)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._completed)
        return self

    def _started(self, _: Engine) -> None:
        self._start, self._images = time.perf_counter(), 0

    def _count(self, engine: Engine) -> None:
        self._images += len(engine.state.batch[1]) * self.world_size

    def _completed(self, trainer: Engine) -> None:
        # The evaluator ran in between; its time is the evaluator's own, not training's.
        eval_seconds = sum(e.state.times.get("COMPLETED") or 0.0 for e in (self.evaluator, self.ema_evaluator) if e)
        self.epoch_seconds = max(time.perf_counter() - self._start - eval_seconds, 1e-9)
        self.images_per_second = self._images / self.epoch_seconds
        trainer.state.epoch_seconds = self.epoch_seconds
        trainer.state.epoch_images = self._images
        trainer.state.images_per_second = self.images_per_second
        m = self.evaluator.state.metrics
        ema = "" if self.ema_evaluator is None else f"ema top-1 {100 * self.ema_evaluator.state.metrics['top1']:.2f}%  "
        self.write(
            f"epoch {trainer.state.epoch}/{trainer.state.max_epochs}  "
            f"val top-1 {100 * m['top1']:.2f}%  top-5 {100 * m['top5']:.2f}%  loss {m['loss']:.4f}  {ema}"
            f"train loss {trainer.state.running_loss:.4f}  "
            f"{self.epoch_seconds:.1f} s  {self.images_per_second:.0f} img/s"
        )
