"""TensorBoard for one run, laid out for the first screen and for comparing runs (README, TensorBoard).

RUN_DIR/tb holds two TensorBoard runs, `train` and `validation`, with the same tags where they measure
the same thing and the trainer's iteration as every step: TensorBoard overlays a tag across runs,
never two tags of one run, and two curves share an axis only if they count the same thing (Ignite's
`setup_tb_logging` logs validation at the epoch, which cannot share an axis with per-iteration
curves). Time Series opens the first two groups by name: `metrics`, then `schedule`.

Accuracies are in per cent wherever a person reads them, as on the console: every top-1 and top-5
scalar (training, validation, best so far, and so the HParams tab's metrics), the per-class accuracy
histogram and the confusion matrix's texts. Files for programs (results.json, metrics.csv, evaluate
--json) keep fractions.

The hyperparameters are a session of the validation run, written when the run starts, so that a
running or crashed run is in the HParams tab with the metrics it reached. The tab shows five
hyperparameter columns until more are ticked, those marked as differing first, in the order of their
names. A run writes its session only, not the plugin's experiment summary too, as tensorboardX's
`hparams` does: the plugin would take the first such summary it finds for the whole logdir (one run's
hyperparameters, none marked as differing: seed came after the first five), whereas without one it
builds the experiment from every session, marking those whose values differ (seed, a sweep's grid
keys) and listing a key that only some runs have (backend_context.py, `_compute_experiment_from_runs`).
Its metric columns are then the validation run's scalar tags. The session's group name, the tab's
"Trial ID" (a column 10em wide: some 12 characters, then cut off), starts with what tells runs apart:
the run folder's name, then its parent's ("lr0.1-seed0 in lr-seeds"); the plugin's default is the
run's path from the logdir (`lr-seeds/lr0.1-seed0/tb/validation`), which starts with what they share.

Events are written through to the file (EventLog), not queued: tensorboardX's SummaryWriter hands them
to a writer thread whose flush() does not drain its queue, so events logged just before a checkpoint
could still be in memory at a kill (and a full disk surfaced as tracebacks from that thread). `push`
hands them to the OS after every batch of losses and every evaluation (a live run's curves are
current); `flush` fsyncs them before every checkpoint, so that a checkpoint and TensorBoard agree even
after a kill. A resumed run's files lose what was logged after its checkpoint (the earlier files are
rewritten without it, and marked as purged from there): what a killed process logged after it is
gone, and every tag goes on without doubled points.

With `background` (logging.read_losses_late) the losses of each LOSS_FLUSHED are written and pushed by
one thread of our own (WriterThread), in the order flushed, so that the training thread only queues
them. Every other write (the epoch's numbers and figures, validation, the config, the hparams session)
and every `flush` and `close` first waits for that thread to finish what it holds, then runs on the
training thread as without `background`: the events land in each file in the same order either way,
and `flush` before a checkpoint still has everything on disk. The figures are not handed to the thread:
they come at an epoch's end, where training waits for the evaluation anyway. A write that fails in the
thread (a full disk) is raised, as the OutputWriteError naming the folder, at the training thread's
next call.
"""
from __future__ import annotations

import json
import queue
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.api_pb2 import Status
from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData, SessionEndInfo, SessionStartInfo
from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboardX.summary import histogram, image, scalar, text

from handlers.atomic import OutputWriteError, write_atomic
from handlers.confusion import confusion_image, most_confused, most_confused_table, per_class_accuracy
from handlers.loss_buffer import LossEvents


class EventLog:
    """One event file in `folder`; from `purge_step` on, what earlier files of the folder logged is removed
    from them (`drop_events_from`) and, for readers of copies made before, marked as purged."""

    def __init__(self, folder: Path, purge_step: Optional[int] = None) -> None:
        self.folder = folder
        with self._naming_errors():
            folder.mkdir(parents=True, exist_ok=True)
            if purge_step is not None:
                for earlier in sorted(folder.glob("events.out.tfevents.*")):
                    drop_events_from(earlier, purge_step)
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

    def push(self) -> None:
        """Everything written so far, handed to the OS: TensorBoard sees it now (a file object keeps
        up to 8 KB until flushed, which would hide a live run's curves until its next checkpoint).
        Durable only after `flush`; cheap enough for every batch of losses (no fsync)."""
        with self._naming_errors():
            self._writer._py_recordio_writer._writer.flush()  # tensorboardX < 3: the RecordWriter's file

    def flush(self) -> None:
        """Everything written so far, on disk (fsync)."""
        with self._naming_errors():
            self._writer.flush()

    def close(self) -> None:
        with self._naming_errors():
            self._writer.close()

    def _naming_errors(self):
        return OutputWriteError.naming(self.folder, "cannot write TensorBoard events")


class WriterThread:
    """One thread that runs the jobs given to it in order, so that the caller never waits for a file. A
    job that fails is raised in the caller's thread at its next call (`submit`, `drain`, `close`), once;
    no job after it runs, so a file keeps what came before the failure and nothing out of order."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.Queue[Optional[Callable[[], None]]] = queue.Queue()
        self._error: Optional[BaseException] = None
        self._raised = False
        # A daemon: a process that ends without `close` (a crash elsewhere) is not kept alive by it.
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        self._raise()
        self._jobs.put(job)

    def drain(self) -> None:
        """Return once every job given so far has run; raise the error of one that failed."""
        self._jobs.join()
        self._raise()

    def close(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        self._raise()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    job()
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread by _raise
                self._error = e
            finally:
                self._jobs.task_done()

    def _raise(self) -> None:
        if self._error is not None and not self._raised:
            self._raised = True
            raise self._error


def drop_events_from(path: Path, step: int) -> None:
    """Rewrite an event file without its events of `step` and later (atomically: a new file renamed over
    it). TensorBoard's reader purges the scalars, images and histograms that a restart's START event
    follows, but not texts and other tensors, which a resumed run would show twice; and a record cut
    short by a kill is dropped with what follows it. Records kept are copied byte for byte (TFRecord:
    length, its CRC, the serialized Event, its CRC)."""
    data, kept, offset, dropped = path.read_bytes(), [], 0, False
    while offset + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        end = offset + 12 + length + 4
        if end > len(data):
            dropped = True
            break
        event = Event.FromString(data[offset + 12: offset + 12 + length])
        if event.step < step or event.HasField("file_version"):
            kept.append(data[offset:end])
        else:
            dropped = True
        offset = end
    if dropped or offset != len(data):
        write_atomic(path, lambda f: f.write(b"".join(kept)))


PERCENT = ("top1", "top5")  # the metrics shown in per cent


def shown(name: str, value: float) -> float:
    """A metric as TensorBoard shows it: an accuracy in per cent, as the console prints it."""
    return 100.0 * value if name in PERCENT else value


class TensorBoardLogging:
    def __init__(self, log_dir: str | Path, *, purge_from: Optional[int] = None, figures_every: int = 1,
                 background: bool = False) -> None:
        """`purge_from`: the iteration from which earlier event files of this run are hidden. `figures_every`:
        the confusion matrix's image, table and per-class histogram only every that many epochs and at the
        last (each takes a rendering, on the training thread, out of every epoch it is drawn in).
        `background`: the losses written by a thread of their own (the module's docstring)."""
        self.figures_every = figures_every
        log_dir = Path(log_dir)
        self.run_dir = log_dir.parent
        self.train = EventLog(log_dir / "train", purge_from)
        self.validation = EventLog(log_dir / "validation", purge_from)
        self._writes = WriterThread("tensorboard losses") if background else None

    def attach(self, trainer: Engine, evaluator: Engine, *, best: Callable[[], Mapping[str, float]],
               class_names: Optional[Sequence[str]] = None,
               sample_images: Optional[Callable[[], torch.Tensor]] = None,
               ema_evaluator: Optional[Engine] = None) -> "TensorBoardLogging":
        """`trainer` must have a LossBuffer attached; `evaluator` must compute top1, top5 and loss, and
        may compute "confusion" (int64 counts, rows the true class, columns the predicted). `best()`
        gives the metrics of the best evaluation so far (attach this after whatever updates it).
        `sample_images` gives (N, 3, H, W) images in
        [0, 1] to show once at the start (augmented training images, say). Attach after EpochSummary
        to log its epoch time and images per second."""
        self._best, self._class_names = best, class_names
        trainer.add_event_handler(LossEvents.LOSS_FLUSHED, self._log_losses)
        evaluator.add_event_handler(Events.COMPLETED, self._log_validation, trainer)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._log_epoch)
        if ema_evaluator is not None:  # the weights' EMA: its figures as ema/top1, ema/top5, ema/loss
            ema_evaluator.add_event_handler(Events.COMPLETED, self._log_ema, trainer)
        trainer.add_event_handler(Events.COMPLETED, self._log_success)
        trainer.add_event_handler(Events.COMPLETED, self.flush)
        if sample_images is not None:
            trainer.add_event_handler(Events.STARTED, self._log_samples, sample_images)
        return self

    def _log_samples(self, trainer: Engine, sample_images: Callable[[], torch.Tensor]) -> None:
        self._in_order()
        self.train.image("train/augmented_images", image_grid(sample_images()), trainer.state.iteration)

    def _log_losses(self, trainer: Engine) -> None:
        rows = trainer.state.flushed_losses  # a new list at every flush, never changed after
        if self._writes is None:
            self._write_losses(rows)
        else:
            self._writes.submit(lambda: self._write_losses(rows))

    def _write_losses(self, rows: Sequence[tuple[int, Mapping[str, float], Mapping[str, float]]]) -> None:
        for iteration, measured, scheduled in rows:
            for name, value in measured.items():  # metrics/loss, metrics/top1
                self.train.scalar(f"metrics/{name}", shown(name, value), iteration)
            for name, value in scheduled.items():  # schedule/lr, schedule/momentum
                self.train.scalar(f"schedule/{name}", value, iteration)
        self.train.push()

    def _in_order(self) -> None:
        """Before a write on the training thread: the losses the writer thread holds written first (each
        file's events in the order of the calls, as without it), and a write of its that failed raised."""
        if self._writes is not None:
            self._writes.drain()

    def _log_validation(self, evaluator: Engine, trainer: Engine) -> None:
        self._in_order()
        step = trainer.state.iteration
        for name, value in evaluator.state.metrics.items():
            if isinstance(value, (int, float)):
                self.validation.scalar(f"metrics/{name}", shown(name, value), step)
        for name, value in self._best().items():
            if name in ("top1", "top5", "loss"):
                self.validation.scalar(f"summary/best_{name}", shown(name, value), step)
        confusion = evaluator.state.metrics.get("confusion")
        epoch, last = trainer.state.epoch, trainer.state.max_epochs
        if isinstance(confusion, torch.Tensor) and (epoch % self.figures_every == 0 or epoch == last):
            confusion = confusion.detach().cpu()
            names = self._class_names or [str(i) for i in range(len(confusion))]
            pairs = most_confused(confusion)
            self.validation.image("validation/confusion_matrix", confusion_image(confusion, names, pairs), step)
            self.validation.text("validation/most_confused", most_confused_table(pairs, names), step)
            self.validation.histogram("validation/per_class_accuracy", 100 * per_class_accuracy(confusion), step,
                                      bins=np.linspace(0.0, 100.0, 21))
        self.validation.push()

    def _log_ema(self, evaluator: Engine, trainer: Engine) -> None:
        for name in ("top1", "top5", "loss"):
            self.validation.scalar(f"ema/{name}", shown(name, float(evaluator.state.metrics[name])),
                                   trainer.state.iteration)

    def _log_epoch(self, trainer: Engine) -> None:
        self._in_order()
        step = trainer.state.iteration
        for tag, attr in (("system/epoch_seconds", "epoch_seconds"),
                          ("system/images_per_second", "images_per_second")):
            value = getattr(trainer.state, attr, None)
            if value is not None:
                self.train.scalar(tag, value, step)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.train.scalar("system/peak_gpu_memory_gib", torch.cuda.max_memory_allocated() / 2**30, step)
        self.train.push()

    def log_config(self, config: Mapping[str, Any]) -> None:
        self._in_order()
        self.train.text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log_hparams(self, hparams_: Mapping[str, Any]) -> None:
        """At the start of a run: the HParams tab lists it from now on, with the metrics it reaches. Its
        trial is named once, here: a copy of the run folder keeps the name (and, beside the original in
        one logdir, shares its row, whose metrics are then their mean)."""
        self._in_order()
        run = self.run_dir.resolve()
        self.validation.summary(session_start_summary(hparams_, f"{run.name} in {run.parent.name}"), 0)
        self.validation.flush()

    def _log_success(self, _: Engine) -> None:
        self._in_order()
        self.validation.summary(session_end_summary(), 0)

    def flush(self, _: Engine | None = None) -> None:
        """Attach right before the training checkpoint handler, on its events."""
        self._in_order()
        self.train.flush()
        self.validation.flush()

    def close(self) -> None:
        """The files closed, with everything written; then a write of the writer thread that failed and
        was not raised yet is raised."""
        try:
            if self._writes is not None:
                self._writes.close()
        finally:
            self.train.close()
            self.validation.close()


def session_start_summary(values: Mapping[str, Any], group_name: str) -> Summary:
    """The HParams plugin's session-start summary, as tensorboardX's `hparams` writes it but with each
    value in its own type: a bool as a bool, a float as a number, an int as text, which the HParams tab
    shows as "128" (it prints every number with 5 digits, "128.00"); and the session's group (the tab's
    trial) named: sessions of one group name are one row, so the name must be the run's own."""
    start = SessionStartInfo(group_name=group_name)
    for name, value in values.items():
        if isinstance(value, bool):
            start.hparams[name].bool_value = value
        elif isinstance(value, float):
            start.hparams[name].number_value = value
        else:
            start.hparams[name].string_value = str(value)
    return _hparams_summary("_hparams_/session_start_info", HParamsPluginData(session_start_info=start, version=0))


def session_end_summary() -> Summary:
    end = SessionEndInfo(status=Status.Value("STATUS_SUCCESS"))
    return _hparams_summary("_hparams_/session_end_info", HParamsPluginData(session_end_info=end, version=0))


def _hparams_summary(tag: str, content: HParamsPluginData) -> Summary:
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="hparams",
                                                                      content=content.SerializeToString()))
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata)])


def image_grid(images: torch.Tensor, columns: int = 8) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> one (3, rows*(H+2), columns*(W+2)) image with 2-pixel gaps."""
    n, c, h, w = images.shape
    rows = -(-n // columns)
    grid = torch.ones(c, rows * (h + 2), columns * (w + 2))
    for i, img in enumerate(images.detach().float().cpu().clamp(0, 1)):
        r, k = divmod(i, columns)
        grid[:, r * (h + 2) + 1: r * (h + 2) + 1 + h, k * (w + 2) + 1: k * (w + 2) + 1 + w] = img
    return grid


