"""results.json: the run's outcome in one small file, rewritten atomically after every evaluation.

Wall time and the best scores survive a resume: they are part of the training checkpoint through
state_dict/load_state_dict.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from ignite.engine import Engine, Events

from handlers.atomic import write_atomic


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_atomic(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


class RunResults:
    def __init__(self, path: str | Path, metric: str = "top1") -> None:
        self.path, self.metric = Path(path), metric
        self.best: dict[str, float] = {}
        self.final: dict[str, float] = {}
        self.elapsed = 0.0  # seconds spent in earlier processes of this run
        self._started = time.time()

    def attach(self, trainer: Engine, evaluator: Engine) -> "RunResults":
        evaluator.add_event_handler(Events.COMPLETED, self._record, trainer)
        trainer.add_event_handler(Events.COMPLETED, self.write, "finished")
        return self

    def wall_time(self) -> float:
        return self.elapsed + time.time() - self._started

    def _record(self, evaluator: Engine, trainer: Engine) -> None:
        m = {k: float(v) for k, v in evaluator.state.metrics.items() if isinstance(v, (int, float))}
        self.final = {**m, "epoch": trainer.state.epoch}
        if not self.best or m[self.metric] > self.best[self.metric]:
            self.best = dict(self.final)
        self.write(trainer, "running")

    def write(self, trainer: Engine, status: str, error: Optional[str] = None) -> None:
        """results.json with `status`: running; finished, interrupted (a graceful stop), each written
        only once the files it reports are on disk (attach it after what writes them); or failed, with
        `error`, the one line that says why. `epochs` counts the epochs completed, not the one in progress."""
        state = trainer.state
        results = {
            "status": status,
            "best": self.best,
            "final": self.final,
            "epochs": state.iteration // state.epoch_length if state.epoch_length else 0,
            "max_epochs": state.max_epochs,
            "iterations": state.iteration,
            "wall_time_seconds": round(self.wall_time(), 3),
        }
        if error is not None:
            results["error"] = error
        write_json_atomic(self.path, results)

    def state_dict(self) -> dict[str, Any]:
        return {"best": json.dumps(self.best), "final": json.dumps(self.final), "elapsed": self.wall_time()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.final = json.loads(state["best"]), json.loads(state["final"])
        self.elapsed, self._started = float(state["elapsed"]), time.time()
