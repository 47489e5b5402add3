"""metrics.csv: the run's history, one row per evaluation, in a file any spreadsheet or script reads.

The rows are part of the training checkpoint (state_dict), and the file is rewritten from them,
atomically, when a process starts and after every evaluation: after a kill and a resume it holds the
rows of the epochs its checkpoint had, then those trained since, none twice and none missing, whatever
the killed process wrote after that checkpoint. Every value but the timing columns (TIMING_COLUMNS) is
the same as an uninterrupted run's. Accuracies are fractions, as in results.json (the machine's files);
the console and TensorBoard show percent.
"""
from __future__ import annotations

import csv
import datetime
import io
import json
from pathlib import Path
from typing import Any, Callable, Mapping

from ignite.engine import Engine, Events

from handlers.atomic import write_atomic

COLUMNS = ("epoch", "iteration", "train_loss", "val_top1", "val_top5", "val_loss", "lr", "epoch_seconds",
           "images_per_second", "wall_time_seconds", "wall_clock")
EMA_COLUMNS = ("ema_top1", "ema_top5", "ema_loss")  # after val_loss, in a run with the weights' EMA only
TIMING_COLUMNS = ("epoch_seconds", "images_per_second", "wall_time_seconds", "wall_clock")


class MetricsCsv:
    def __init__(self, path: str | Path, wall_time: Callable[[], float]) -> None:
        """`wall_time`: the run's seconds so far, every process of it (RunResults.wall_time)."""
        self.path, self.wall_time = Path(path), wall_time
        self.rows: list[dict[str, Any]] = []
        self.columns = COLUMNS

    def attach(self, trainer: Engine, evaluator: Engine, ema_evaluator: Engine | None = None) -> "MetricsCsv":
        """Attach after EpochSummary (the epoch's times) and LossBuffer (the smoothed loss, the lr). With
        `ema_evaluator` (the EMA model's evaluation), its figures too, in EMA_COLUMNS; without, the file is
        what it was before there was an EMA."""
        if ema_evaluator is not None:
            at = COLUMNS.index("val_loss") + 1
            self.columns = COLUMNS[:at] + EMA_COLUMNS + COLUMNS[at:]
        trainer.add_event_handler(Events.STARTED, self.write)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._record, evaluator, ema_evaluator)
        return self

    def _record(self, trainer: Engine, evaluator: Engine, ema_evaluator: Engine | None) -> None:
        s, m = trainer.state, evaluator.state.metrics
        ema = {} if ema_evaluator is None else {f"ema_{k}": float(ema_evaluator.state.metrics[k])
                                                for k in ("top1", "top5", "loss")}
        self.rows.append({**ema,
            "epoch": s.epoch, "iteration": s.iteration, "train_loss": s.running_loss,
            "val_top1": float(m["top1"]), "val_top5": float(m["top5"]), "val_loss": float(m["loss"]), "lr": s.lr,
            "epoch_seconds": round(getattr(s, "epoch_seconds", 0.0), 3),
            "images_per_second": round(getattr(s, "images_per_second", 0.0), 1),
            "wall_time_seconds": round(self.wall_time(), 3),
            "wall_clock": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        })
        self.write()

    def write(self, _: Engine | None = None) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_atomic(self.path, lambda f: f.write(text.getvalue().encode()))

    def state_dict(self) -> dict[str, Any]:
        return {"rows": json.dumps(self.rows)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rows = json.loads(state["rows"])


def read_metrics_csv(path: str | Path) -> list[dict[str, str]]:
    """metrics.csv's rows as text, by column."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
