"""TensorBoard event files through tensorboardX.

Two writers, `train/` (step = iteration) and `validation/` (step = epoch), so that a resumed run can
purge each from its own resume step: TensorBoard then hides what a killed process logged after its last
checkpoint, and the curves continue without doubled points.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from ignite.engine import Engine, Events
from tensorboardX import SummaryWriter
from tensorboardX.summary import hparams

from handlers.loss_buffer import LossEvents


class TensorBoardLogging:
    def __init__(self, log_dir: str | Path, *, purge_from: tuple[int, int] | None = None) -> None:
        """`purge_from`: (iteration, epoch) from which earlier event files of this run are hidden."""
        log_dir = Path(log_dir)
        purge_train, purge_val = purge_from if purge_from else (None, None)
        self.train = SummaryWriter(str(log_dir / "train"), purge_step=purge_train)
        self.validation = SummaryWriter(str(log_dir / "validation"), purge_step=purge_val)

    def attach(self, trainer: Engine, evaluator: Engine) -> "TensorBoardLogging":
        """`trainer` must have a LossBuffer attached; `evaluator` must compute top1, top5 and loss."""
        trainer.add_event_handler(LossEvents.LOSS_FLUSHED, self._log_losses)
        evaluator.add_event_handler(Events.COMPLETED, self._log_validation, trainer)
        trainer.add_event_handler(Events.COMPLETED, self.flush)
        return self

    def _log_losses(self, trainer: Engine) -> None:
        for iteration, loss, lr in trainer.state.flushed_losses:
            self.train.add_scalar("train/loss", loss, iteration)
            self.train.add_scalar("train/lr", lr, iteration)

    def _log_validation(self, evaluator: Engine, trainer: Engine) -> None:
        epoch = trainer.state.epoch
        for name, value in evaluator.state.metrics.items():
            if isinstance(value, (int, float)):
                self.validation.add_scalar(f"validation/{name}", value, epoch)
        self.flush()  # before the epoch's checkpoint: what a resume keeps is on disk

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.train.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log_hparams(self, hparams_: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """Hyperparameters with the run's final metrics, in the same event file, for the HPARAMS tab."""
        for summary in hparams(dict(hparams_), dict(metrics)):
            self.validation.file_writer.add_summary(summary)
        for name, value in metrics.items():
            self.validation.add_scalar(name, value)
        self.validation.flush()

    def flush(self, _: Engine | None = None) -> None:
        self.train.flush()
        self.validation.flush()

    def close(self) -> None:
        self.train.close()
        self.validation.close()
