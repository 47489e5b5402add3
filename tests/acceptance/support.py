"""The GPU acceptance check's settings and its way of running the application (used by its fixtures,
conftest.py, and its tests, test_acceptance.py)."""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import pytest

from app.config import Config, override, to_dict
from app.loader import iterations_per_epoch
from tests.support import start_app

T = TypeVar("T")


@dataclass
class Acceptance:
    """The check's settings and work folder; writes configs and runs the application there.

    The runs the checks read are independent processes, each mostly start-up (about 11 s on an H200,
    against 1.3 s an epoch), so they run side by side, `workers` at a time (`background`): the check's
    wall time is its longest chain of runs, not their sum. `close` ends every process still running,
    so that a check cut short leaves nothing training on the device after it."""

    device: str
    n_train: int
    n_test: int
    epochs: int
    classes: int
    batch_size: int
    work: Path
    workers: int = 1
    _pool: Optional[ThreadPoolExecutor] = field(default=None, repr=False)
    _live: set[subprocess.Popen] = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _closed: bool = field(default=False, repr=False)

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
        proc = self.popen(*args)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        finally:
            self._end(proc)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        assert result.returncode == 0, f"exit {result.returncode}: {tail(result.stderr or result.stdout)}"
        return result

    def popen(self, *args: str, log: Optional[Path] = None) -> subprocess.Popen:
        """`python -m app ARGS` started; its output to `log`, else to pipes. Ended by `close` if still running."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the acceptance check is closing: no new process")
            if log is None:
                proc = start_app(*args, env=self._env())
            else:
                with log.open("w") as out:  # the process has its own copy of the file
                    proc = start_app(*args, env=self._env(), stdout=out, stderr=subprocess.STDOUT)
            self._live.add(proc)
        return proc

    def wait(self, proc: subprocess.Popen, timeout: Optional[float] = None) -> int:
        """The exit code of a process started by `popen`, once it has ended."""
        try:
            return proc.wait(timeout=timeout)
        finally:
            self._end(proc)

    def background(self, fn: Callable[[], T]) -> Future[T]:
        """`fn()` in one of `workers` threads, started in the order asked: a job may wait for the result of
        one asked before it (that one is running or done), never for one asked after."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="acceptance")
        return self._pool.submit(fn)

    def timed(self, fn: Callable[[], T]) -> Callable[[], tuple[T, float]]:
        """`fn` returning what it returns and its seconds."""
        def run() -> tuple[T, float]:
            started = time.perf_counter()
            value = fn()
            return value, round(time.perf_counter() - started, 1)
        return run

    def close(self) -> None:
        with self._lock:
            self._closed = True
            live = list(self._live)
        for proc in live:
            proc.kill()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _end(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with self._lock:
            self._live.discard(proc)

    def _env(self) -> dict[str, str]:
        """Unbuffered. On a GPU machine, the machine's own thread count (its CPU work should use its cores);
        on the CPU, where the runs are the computation, the cores shared among the runs at once instead of
        each run taking all of them (oversubscribed threads slow every run down)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.device == "cpu":
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.workers))
        return env


def tail(text: str, n: int = 600) -> str:
    return text[-n:].replace("\n", " | ")


def needs_gpu(acceptance: Acceptance) -> None:
    if acceptance.device != "cuda":
        pytest.skip("needs a GPU")
