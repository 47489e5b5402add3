"""The GPU acceptance check's settings and its way of running the application (used by its fixtures,
conftest.py, and its tests, test_acceptance.py)."""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from app.config import Config, override, to_dict
from app.loader import iterations_per_epoch
from tests.support import run_app, start_app


@dataclass
class Acceptance:
    """The check's settings and work folder; writes configs and runs the application there."""

    device: str
    n_train: int
    n_test: int
    epochs: int
    classes: int
    batch_size: int
    work: Path
    seconds: dict[str, float] = field(default_factory=dict)  # of the runs the fixtures trained

    @property
    def iterations_per_epoch(self) -> int:
        return iterations_per_epoch(self.n_train, self.batch_size)

    def config(self, name: str, data: Path, **settings: Any) -> Path:
        values = {"data.root": str(data), "data.download": False, "train.device": self.device,
                  "train.epochs": self.epochs, "train.batch_size": self.batch_size,
                  "logging.output_dir": str(self.work / "runs"), "logging.progress_bar": "off", **settings}
        path = self.work / f"{name}.json"
        path.write_text(json.dumps(to_dict(override(Config(), values, name)), indent=2))
        return path

    def app(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        """`python -m app ARGS` in a fresh process, as a user runs it; a non-zero exit fails the check."""
        result = run_app(*args, env=_env(), timeout=timeout)
        assert result.returncode == 0, f"exit {result.returncode}: {tail(result.stderr or result.stdout)}"
        return result

    def popen(self, *args: str, log: Path) -> subprocess.Popen:
        return start_app(*args, env=_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)


def _env() -> dict[str, str]:
    """The machine's own thread count (a GPU machine's CPU work should use its cores), unbuffered."""
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def tail(text: str, n: int = 600) -> str:
    return text[-n:].replace("\n", " | ")


def needs_gpu(acceptance: Acceptance) -> None:
    if acceptance.device != "cuda":
        pytest.skip("needs a GPU")
