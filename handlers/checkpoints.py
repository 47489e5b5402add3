"""Checkpoints: the best model by validation top-1, and the training state that resume needs.

Both use Ignite's Checkpoint with SaveThenRemove, a DiskSaver whose files appear under their final name
only once complete and flushed to disk. Ignite's Checkpoint asks its saver to delete the file it
replaces *before* writing the new one; SaveThenRemove reverses that, so a kill or a full disk mid-write
never costs the last good file. A failed write raises CheckpointWriteError naming the file.
Training checkpoints are numbered by iteration, so epoch-end and every-N-iteration saves sort together.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Mapping

from ignite.engine import Engine, Events
from ignite.engine.events import EventsList
from ignite.handlers import Checkpoint, DiskSaver, global_step_from_engine

from handlers.atomic import OutputWriteError, write_atomic

TRAINING_PREFIX = "training"
_TRAINING_FILE = re.compile(rf"^{TRAINING_PREFIX}_checkpoint_(\d+)\.pt$")


class CheckpointWriteError(OutputWriteError):
    """Writing a checkpoint failed (a full disk, say); the files written before it are intact."""


class SaveThenRemove(DiskSaver):
    """A DiskSaver that writes through a flushed temporary file and deletes replaced files only
    after the new file is complete on disk."""

    def __init__(self, dirname: str | Path) -> None:
        super().__init__(str(dirname), atomic=True, require_empty=False)
        self._pending: list[str] = []

    def remove(self, filename: str) -> None:
        self._pending.append(filename)

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        try:
            super().__call__(checkpoint, filename, metadata)
        except Exception as e:  # torch.save wraps the OSError of a full disk in a RuntimeError
            self._pending = []
            raise CheckpointWriteError(f"{Path(self.dirname) / filename}: cannot write checkpoint "
                                       f"({_root_cause(e)}); earlier checkpoints are intact") from None
        pending, self._pending = self._pending, []
        for old in pending:
            if old != filename:
                # missing_ok: a run resumed from an older checkpoint remembers files that a later
                # save of the first process already replaced.
                (Path(self.dirname) / old).unlink(missing_ok=True)

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        write_atomic(path, lambda f: func(checkpoint, f, **self.kwargs))


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


def best_model_checkpoint(folder: str | Path, to_save: Mapping[str, Any], trainer: Engine,
                          metric: str = "top1") -> Checkpoint:
    """A Checkpoint for the evaluator's COMPLETED event; keeps the single best file."""
    return Checkpoint(
        dict(to_save), SaveThenRemove(folder),
        filename_prefix="best", score_function=Checkpoint.get_default_score_fn(metric), score_name=metric,
        n_saved=1, global_step_transform=global_step_from_engine(trainer),
    )


def attach_training_checkpoint(trainer: Engine, folder: str | Path, to_save: Mapping[str, Any], *,
                               keep_last: int, event: Events | EventsList) -> tuple[Checkpoint, SaveThenRemove]:
    """Save at `event` (`checkpoint_event(every_iters)`, say); returns the handler and its saver."""
    saver = SaveThenRemove(folder)
    handler = Checkpoint(
        dict(to_save), saver, filename_prefix=TRAINING_PREFIX, score_function=_iteration, n_saved=keep_last,
    )
    trainer.add_event_handler(event, handler)
    return handler, saver


def training_checkpoints(folder: str | Path) -> list[Path]:
    """The training checkpoints in `folder`, newest (highest iteration) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _TRAINING_FILE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]
