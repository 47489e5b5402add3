"""TensorBoard event files, written through to disk.

Two event files, `train/` (step = iteration) and `validation/` (step = epoch), so that a resumed run can
purge each from its own resume step: TensorBoard then hides what a killed process logged after its last
checkpoint, and the curves continue without doubled points.

Why not tensorboardX's SummaryWriter: it hands events to a queue that a writer thread drains, and its
flush() flushes the file but not the queue, so events logged just before a checkpoint could still be
in memory when a kill came (and a full disk surfaced as tracebacks from that thread). EventLog writes
each event into the file as it is logged, with tensorboardX's own record writer and summary builders,
and `flush` puts everything written so far on disk (fsync): the training checkpoint handler's
`flush` before every save makes what it saved and what TensorBoard shows agree.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
from ignite.engine import Engine, Events
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import Summary
from tensorboardX.summary import histogram, hparams, image, scalar, text

from handlers.atomic import OutputWriteError
from handlers.loss_buffer import LossEvents


class EventLog:
    """One event file in `folder`; from `purge_step` on, what earlier files of the folder logged is hidden."""

    def __init__(self, folder: Path, purge_step: Optional[int] = None) -> None:
        self.folder = folder
        with self._naming_errors():
            folder.mkdir(parents=True, exist_ok=True)
            self._writer = EventsWriter(str(folder / "events"))
        if purge_step is not None:  # what TensorBoard's readers take as "a restart from this step"
            self._write(Event(step=purge_step, file_version="brain.Event:2"))
            self._write(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))

    def scalar(self, tag: str, value: float, step: Optional[int] = None) -> None:
        self.summary(scalar(tag, value), step)

    def image(self, tag: str, chw: torch.Tensor, step: int) -> None:
        self.summary(image(tag, chw.numpy(), dataformats="CHW"), step)

    def histogram(self, tag: str, values: torch.Tensor, step: int, bins: Any = "auto") -> None:
        self.summary(histogram(tag, values.numpy(), bins), step)

    def text(self, tag: str, value: str, step: int) -> None:
        self.summary(text(tag, value), step)

    def summary(self, summary: Summary, step: Optional[int] = None) -> None:
        self._write(Event(wall_time=time.time(), step=step, summary=summary))

    def _write(self, event: Event) -> None:
        with self._naming_errors():
            self._writer.write_event(event)

    def flush(self) -> None:
        """Everything written so far, on disk."""
        with self._naming_errors():
            self._writer.flush()

    def close(self) -> None:
        with self._naming_errors():
            self._writer.close()

    def _naming_errors(self):
        return OutputWriteError.naming(self.folder, "cannot write TensorBoard events")


class TensorBoardLogging:
    def __init__(self, log_dir: str | Path, *, purge_from: tuple[int, int] | None = None) -> None:
        """`purge_from`: (iteration, epoch) from which earlier event files of this run are hidden."""
        log_dir = Path(log_dir)
        purge_train, purge_val = purge_from if purge_from else (None, None)
        self.train = EventLog(log_dir / "train", purge_train)
        self.validation = EventLog(log_dir / "validation", purge_val)

    def attach(self, trainer: Engine, evaluator: Engine,
               sample_images: Optional[Callable[[], torch.Tensor]] = None) -> "TensorBoardLogging":
        """`trainer` must have a LossBuffer attached; `evaluator` must compute top1, top5 and loss, and
        may compute "confusion" (a ConfusionMatrix). `sample_images` gives (N, 3, H, W) images in
        [0, 1] to show once at the start (augmented training images, say). Attach after EpochSummary
        to log its epoch time and images per second."""
        trainer.add_event_handler(LossEvents.LOSS_FLUSHED, self._log_losses)
        evaluator.add_event_handler(Events.COMPLETED, self._log_validation, trainer)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._log_epoch)
        trainer.add_event_handler(Events.COMPLETED, self.flush)
        if sample_images is not None:
            trainer.add_event_handler(Events.STARTED, lambda e: self.train.image(
                "train/augmented_images", image_grid(sample_images()), e.state.iteration))
        return self

    def _log_losses(self, trainer: Engine) -> None:
        for iteration, loss, scheduled in trainer.state.flushed_losses:
            self.train.scalar("train/loss", loss, iteration)
            for name, value in scheduled.items():  # train/lr, train/momentum
                self.train.scalar(f"train/{name}", value, iteration)

    def _log_validation(self, evaluator: Engine, trainer: Engine) -> None:
        epoch = trainer.state.epoch
        for name, value in evaluator.state.metrics.items():
            if isinstance(value, (int, float)):
                self.validation.scalar(f"validation/{name}", value, epoch)
        confusion = evaluator.state.metrics.get("confusion")
        if isinstance(confusion, torch.Tensor):
            self.validation.image("validation/confusion_matrix", confusion_image(confusion), epoch)
            per_class = confusion.diag().float() / confusion.sum(1).clamp(min=1).float()
            self.validation.histogram("validation/per_class_accuracy", per_class.cpu(), epoch,
                                      bins=np.linspace(0.0, 1.0, 21))

    def _log_epoch(self, trainer: Engine) -> None:
        epoch = trainer.state.epoch
        for tag, attr in (("epoch/seconds", "epoch_seconds"), ("epoch/images_per_second", "images_per_second")):
            value = getattr(trainer.state, attr, None)
            if value is not None:
                self.validation.scalar(tag, value, epoch)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.validation.scalar("epoch/peak_gpu_memory_gib", torch.cuda.max_memory_allocated() / 2**30, epoch)

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.train.text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log_hparams(self, hparams_: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """Hyperparameters with the run's final metrics, in the same event file, for the HPARAMS tab."""
        for summary in hparams(dict(hparams_), dict(metrics)):
            self.validation.summary(summary)
        for name, value in metrics.items():
            self.validation.scalar(name, value)
        self.validation.flush()

    def flush(self, _: Engine | None = None) -> None:
        """Attach right before the training checkpoint handler, on its events."""
        self.train.flush()
        self.validation.flush()

    def close(self) -> None:
        self.train.close()
        self.validation.close()


def image_grid(images: torch.Tensor, columns: int = 8) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> one (3, rows*(H+2), columns*(W+2)) image with 2-pixel gaps."""
    n, c, h, w = images.shape
    rows = -(-n // columns)
    grid = torch.ones(c, rows * (h + 2), columns * (w + 2))
    for i, img in enumerate(images.detach().float().cpu().clamp(0, 1)):
        r, k = divmod(i, columns)
        grid[:, r * (h + 2) + 1: r * (h + 2) + 1 + h, k * (w + 2) + 1: k * (w + 2) + 1 + w] = img
    return grid


def confusion_image(confusion: torch.Tensor, scale: int = 3) -> torch.Tensor:
    """Rows (true class) normalised to sum 1, white (0) to dark blue (1), each cell scale x scale pixels."""
    m = confusion.detach().float().cpu()
    m = m / m.sum(1, keepdim=True).clamp(min=1)
    rgb = torch.stack([1 - m, 1 - m, 1 - 0.5 * m])
    return rgb.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
