"""results.json: the run's outcome in one small file, rewritten atomically after every epoch; and the
summary printed when a run finishes, made of the same numbers.

Wall time, training time, the images trained and the best scores survive a resume: they are part of the
training checkpoint through state_dict/load_state_dict, so a resumed run that finishes reports the whole
run, not its last process. Throughput is training's (images / training seconds, as the epoch lines
measure it: evaluation excluded); the wall time counts everything, start-up and evaluation included.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from ignite.engine import Engine, Events

from handlers.atomic import write_json_atomic

BEST_CHECKPOINT = "checkpoints/best.pt"  # relative to the run folder: it holds when the folder moves


class RunResults:
    def __init__(self, path: str | Path, metric: str = "top1") -> None:
        self.path, self.metric = Path(path), metric
        self.best: dict[str, float] = {}
        self.final: dict[str, float] = {}
        self.elapsed = 0.0  # seconds spent in earlier processes of this run
        self.train_seconds = 0.0  # in completed epochs, every process of the run
        self.images = 0  # trained in those epochs, over all processes
        self._started = time.time()

    def attach(self, trainer: Engine, evaluator: Engine) -> "RunResults":
        """Attach after EpochSummary: the epoch's results are written with its training time."""
        evaluator.add_event_handler(Events.COMPLETED, self._record, trainer)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        trainer.add_event_handler(Events.COMPLETED, self.write, "finished")
        return self

    def wall_time(self) -> float:
        return self.elapsed + time.time() - self._started

    def images_per_second(self) -> Optional[float]:
        return self.images / self.train_seconds if self.train_seconds > 0 else None

    def _record(self, evaluator: Engine, trainer: Engine) -> None:
        m = {k: float(v) for k, v in evaluator.state.metrics.items() if isinstance(v, (int, float))}
        self.final = {**m, "epoch": trainer.state.epoch}
        if not self.best or m[self.metric] > self.best[self.metric]:
            self.best = dict(self.final)

    def _epoch_completed(self, trainer: Engine) -> None:
        self.train_seconds += getattr(trainer.state, "epoch_seconds", 0.0)
        self.images += getattr(trainer.state, "epoch_images", 0)
        self.write(trainer, "running")

    def as_dict(self, trainer: Engine, status: str, error: Optional[str] = None) -> dict[str, Any]:
        """results.json's contents: see `write`."""
        state = trainer.state
        rate = self.images_per_second()
        results = {
            "status": status,
            "best": self.best,
            "final": self.final,
            "epochs": state.iteration // state.epoch_length if state.epoch_length else 0,
            "max_epochs": state.max_epochs,
            "iterations": state.iteration,
            "wall_time_seconds": round(self.wall_time(), 3),
            "train_seconds": round(self.train_seconds, 3),
            "images_per_second": None if rate is None else round(rate, 1),
            "best_checkpoint": BEST_CHECKPOINT if self.best else None,
        }
        if error is not None:
            results["error"] = error
        return results

    def write(self, trainer: Engine, status: str, error: Optional[str] = None) -> None:
        """results.json with `status`: running; finished, interrupted (a graceful stop), each written
        only once the files it reports are on disk (attach it after what writes them); or failed, with
        `error`, the one line that says why. `epochs` counts the epochs completed, not the one in progress."""
        write_json_atomic(self.path, self.as_dict(trainer, status, error))

    def state_dict(self) -> dict[str, Any]:
        return {"best": json.dumps(self.best), "final": json.dumps(self.final), "elapsed": self.wall_time(),
                "train_seconds": self.train_seconds, "images": self.images}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.final = json.loads(state["best"]), json.loads(state["final"])
        self.elapsed, self._started = float(state["elapsed"]), time.time()
        # An older version's checkpoint has no training time: the throughput is then this process's.
        self.train_seconds, self.images = float(state.get("train_seconds", 0.0)), int(state.get("images", 0))


def run_summary(results: dict[str, Any], run_dir: Path) -> str:
    """The lines a finished run ends with, from results.json's numbers (`RunResults.as_dict`)."""
    best, final = results["best"], results["final"]
    rate = results["images_per_second"]
    lines = [f"finished {results['epochs']} epochs in {duration(results['wall_time_seconds'])}"
             + ("" if rate is None else f", training at {rate:.0f} img/s")]
    if best:
        lines.append(f"best top-1 {100 * best['top1']:.2f}% at epoch {best['epoch']} (top-5 {100 * best['top5']:.2f}%, "
                     f"loss {best['loss']:.4f}); final top-1 {100 * final['top1']:.2f}%")
        lines.append(f"best model: {run_dir / results['best_checkpoint']}")
    lines.append(f"run folder: {run_dir}")
    return "\n".join(lines)


def duration(seconds: float) -> str:
    """1 h 02 min 05 s, 3 min 20 s, 41.2 s: what a person reads at a glance."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {s:02d} s" if hours else f"{minutes} min {s:02d} s"
