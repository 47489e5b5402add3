"""Checkpoints: the best model by validation top-1, and the training state that resume needs.

Names a script can use: the best model is always `best.pt` (replaced, never two), and `last.pt` is a
link to the newest training checkpoint, repointed once a new one is complete and before an older one
goes, so it never names a missing or partial file. Training checkpoints keep their numbers
(`training_checkpoint_<iteration>.pt`): `checkpoint.keep_last` of them, sorted by iteration, which is
what a resume looks through for the newest intact one.

Both use Ignite's Checkpoint with SaveThenRemove, a DiskSaver whose files appear under their final name
only once complete and flushed to disk. Ignite's Checkpoint asks its saver to delete the file it
replaces *before* writing the new one; SaveThenRemove reverses that, so a kill or a full disk mid-write
never costs the last good file. A failed write raises CheckpointWriteError naming the file.
Training checkpoints are numbered by iteration, so epoch-end and every-N-iteration saves sort together.

With `background`, a save copies the checkpoint to host memory (training goes on changing the live
tensors) and a thread writes, fsyncs and renames it while training continues: the write is off the
critical path, and crash safety is the same, since the file still appears complete or not at all and
replaced files go only after it. One write at a time: a save first waits for the one in flight, and a
failed background write raises its CheckpointWriteError there, or in `wait`, in the training thread.
The host copy goes into buffers the saver keeps (HostBuffers), pinned for a GPU's tensors: the training
thread only queues the device-to-host copies, and the writer waits for them before it serialises.
"""
from __future__ import annotations

import copy
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ignite.engine import Engine, Events
from ignite.engine.events import EventsList
import torch
from ignite.handlers import Checkpoint, DiskSaver, global_step_from_engine

from handlers.atomic import TEMP_PREFIX, OutputWriteError, fsync_folder, write_atomic

TRAINING_PREFIX = "training"
BEST_FILE = "best.pt"
LAST_LINK = "last.pt"
_TRAINING_FILE = re.compile(rf"^{TRAINING_PREFIX}_checkpoint_(\d+)\.pt$")


class CheckpointWriteError(OutputWriteError):
    """Writing a checkpoint failed (a full disk, say); the files written before it are intact."""


class SaveThenRemove(DiskSaver):
    """A DiskSaver that writes through a flushed temporary file and deletes replaced files only
    after the new file is complete on disk; in a background thread if `background`."""

    def __init__(self, dirname: str | Path, background: bool = False) -> None:
        super().__init__(str(dirname), atomic=True, require_empty=False)
        self.background = background
        self._pending: list[str] = []
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._host = HostBuffers()  # refilled only after the write that read them is done (`wait` first)

    def remove(self, filename: str) -> None:
        self._pending.append(filename)

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        self.wait()  # the write in flight first: one at a time, in order
        pending, self._pending = self._pending, []
        if not self.background:
            self._write(checkpoint, filename, metadata, pending)
            return
        snapshot = self._host.copy(checkpoint)
        self._thread = threading.Thread(target=self._write_in_background, name=f"write {filename}",
                                        args=(snapshot, filename, metadata, pending))
        self._thread.start()

    def wait(self, _: Engine | None = None) -> None:
        """Return once the write in flight is on disk; raise its error, if it failed, here."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _write_in_background(self, snapshot: HostCopy, filename: str, metadata: Mapping | None,
                             pending: list[str]) -> None:
        try:
            snapshot.wait()
            self._write(snapshot.value, filename, metadata, pending)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = e

    def _write(self, checkpoint: Mapping, filename: str, metadata: Mapping | None, pending: list[str]) -> None:
        try:
            super().__call__(checkpoint, filename, metadata)
        except Exception as e:  # torch.save wraps the OSError of a full disk in a RuntimeError
            raise CheckpointWriteError(f"{Path(self.dirname) / filename}: cannot write checkpoint "
                                       f"({_root_cause(e)}); earlier checkpoints are intact") from None
        if training_checkpoint_iteration(filename) is not None:
            with OutputWriteError.naming(Path(self.dirname) / LAST_LINK, "cannot point at the newest checkpoint"):
                point_link(Path(self.dirname), LAST_LINK, filename)
        for old in pending:
            if old != filename:
                # missing_ok: a run resumed from an older checkpoint remembers files that a later
                # save of the first process already replaced.
                (Path(self.dirname) / old).unlink(missing_ok=True)

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        write_atomic(path, lambda f: func(checkpoint, f, **self.kwargs))


def point_link(folder: Path, link: str, target: str) -> None:
    """FOLDER/LINK names FOLDER/TARGET from now on, switched in one rename (a reader sees the old file
    or the new, never none). A relative symbolic link, so `ls -l` shows which file it is and it holds
    when the folder moves; a hard link where the file system has no symbolic links."""
    tmp = folder / f"{TEMP_PREFIX}{link}"
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(target, tmp)
    except OSError:
        os.link(folder / target, tmp)
    os.replace(tmp, folder / link)
    fsync_folder(folder)


@dataclass
class HostCopy:
    """A checkpoint in host memory, complete once `wait` returns: its GPU tensors' copies may still be
    in flight when HostBuffers.copy returns."""

    value: Any
    events: list[torch.cuda.Event] = field(default_factory=list)  # one per GPU the copies came from

    def wait(self) -> None:
        for event in self.events:
            event.synchronize()


class HostBuffers:
    """Host memory for a checkpoint's tensors, kept from one save to the next.

    Why: a fresh host copy of the recipe's training checkpoint is about 90 MB of new pageable memory per
    save, and on a GPU a synchronous device-to-host copy that stalls the training thread. Here each tensor
    has one buffer, keyed by its path of keys in the checkpoint (`("model", "fc.weight")`) and reallocated
    only when the tensor's shape, dtype, strides or device kind change; a GPU tensor's buffer is pinned
    and filled with a non-blocking copy, and one CUDA event per GPU, recorded on its current stream after
    the copies, tells the reader when they are done (training's later kernels on that stream run after
    the copies, so they cannot change what is copied). A CPU tensor is copied at once, into its buffer.

    A buffer is refilled by the next `copy`: call it only once whatever read the previous copy is done
    (SaveThenRemove waits for the write in flight first), or a write would mix two checkpoints. Buffers
    stay for every path seen: a saver writes a fixed set of checkpoints (training, best model), which
    share the model's.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, tuple[tuple, torch.Tensor]] = {}

    def copy(self, obj: Any) -> HostCopy:
        """A copy in host memory of everything a checkpoint holds: tensors into their buffers,
        containers rebuilt with their type and attributes (a state_dict's `_metadata`), anything else
        deep-copied."""
        devices: set[torch.device] = set()
        value = self._copy(obj, (), devices)
        return HostCopy(value, [_event_after_queued_work(d) for d in devices])

    def _copy(self, obj: Any, path: tuple, devices: set[torch.device]) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._fill(obj.detach(), path, devices)
        if isinstance(obj, dict):
            out = type(obj)((k, self._copy(v, (*path, k), devices)) for k, v in obj.items())
            if hasattr(obj, "_metadata"):
                out._metadata = copy.deepcopy(obj._metadata)
            return out
        if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
            return type(obj)(self._copy(v, (*path, i), devices) for i, v in enumerate(obj))
        return copy.deepcopy(obj)

    def _fill(self, tensor: torch.Tensor, path: tuple, devices: set[torch.device]) -> torch.Tensor:
        if tensor.layout != torch.strided:  # a sparse tensor, say: no buffer to reuse, a fresh copy
            return tensor.to("cpu", copy=True)
        on_gpu = tensor.is_cuda
        signature = (tensor.shape, tensor.dtype, tensor.stride(), on_gpu)
        held = self._buffers.get(path)
        if held is None or held[0] != signature:
            # empty_like keeps the strides of a dense tensor (channels_last weights), as `.to("cpu")` does
            held = signature, torch.empty_like(tensor, device="cpu", pin_memory=on_gpu)
            self._buffers[path] = held
        buffer = held[1]
        buffer.copy_(tensor, non_blocking=on_gpu)
        if on_gpu:
            devices.add(tensor.device)
        return buffer


def _event_after_queued_work(device: torch.device) -> torch.cuda.Event:
    with torch.cuda.device(device):
        event = torch.cuda.Event()
        event.record()  # on the device's current stream, after the copies queued there
    return event


def _root_cause(error: BaseException) -> str:
    while error.__context__ is not None and not isinstance(error, OSError):
        error = error.__context__
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]


def checkpoint_event(every_iters: int = 0) -> Events | EventsList:
    """Every epoch end and, if `every_iters` > 0, every that many iterations too, except an epoch's last
    iteration: there the epoch-end save comes after the evaluation, and one save is enough."""
    event = Events.EPOCH_COMPLETED
    if not every_iters:
        return event

    def between_epoch_ends(engine: Engine, iteration: int) -> bool:
        return iteration % every_iters == 0 and iteration % engine.state.epoch_length != 0

    return event | Events.ITERATION_COMPLETED(event_filter=between_epoch_ends)


def _iteration(engine: Engine) -> int:
    return engine.state.iteration


def best_model_checkpoint(saver: SaveThenRemove, to_save: Mapping[str, Any], trainer: Engine,
                          metric: str = "top1") -> Checkpoint:
    """A Checkpoint for the evaluator's COMPLETED event; keeps the single best file, BEST_FILE. Give it the saver
    of the run's training checkpoints: one writer, so that a training checkpoint is on disk only after
    every best model asked for before it (a run that a training checkpoint says is finished has its
    best model on disk), and waiting for that saver waits for both."""
    return Checkpoint(
        dict(to_save), saver,
        filename_pattern=BEST_FILE, score_function=Checkpoint.get_default_score_fn(metric), score_name=metric,
        n_saved=1, global_step_transform=global_step_from_engine(trainer),
    )


def attach_training_checkpoint(trainer: Engine, saver: SaveThenRemove, to_save: Mapping[str, Any], *,
                               keep_last: int, event: Events | EventsList, background: bool = False) -> Checkpoint:
    """Save through `saver` at `event` (`checkpoint_event(every_iters)`, say); returns the handler.
    With `background`, every save but the run's last is written while training goes on; the last is
    written before the trainer completes, so a finished run's results never run ahead of its
    checkpoint. (Sets `saver.background` on every save: ignite's Checkpoint gives the saver no
    per-call argument.)"""
    handler = Checkpoint(
        dict(to_save), saver, filename_prefix=TRAINING_PREFIX, score_function=_iteration, n_saved=keep_last,
    )

    def save(engine: Engine) -> None:
        last = engine.state.iteration >= engine.state.epoch_length * engine.state.max_epochs
        saver.background = background and not last
        handler(engine)
        if last:
            saver.wait()

    trainer.add_event_handler(event, save)
    return handler


def training_checkpoint_iteration(name: str) -> int | None:
    """The iteration in a training checkpoint's file name (`training_checkpoint_1955.pt`: 1955), or None
    for any other name."""
    m = _TRAINING_FILE.match(name)
    return int(m.group(1)) if m else None


def training_checkpoints(folder: str | Path) -> list[Path]:
    """The training checkpoints in `folder`, newest (highest iteration) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(it, p) for p in folder.iterdir() if (it := training_checkpoint_iteration(p.name)) is not None]
    return [p for _, p in sorted(found, reverse=True)]
