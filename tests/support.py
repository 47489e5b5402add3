"""What the tests share: config files over the project's config.json, the application run as a user
runs it (a fresh process) or in this process through `main()`, and the checks every such run needs.
(Data sets in the real on-disk format: bench/synthetic.py, `write_cifar100` and `write_cifar10`.) And the check
that code asks the host for nothing (`HostReads`, `forbid_python_reads`)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils._python_dispatch import TorchDispatchMode

from app.cli import main
from handlers.metrics_csv import TIMING_COLUMNS, read_metrics_csv
from bench.synthetic import write_cifar10, write_cifar100  # noqa: F401 - the tests' data, from here with the rest

ROOT = Path(__file__).resolve().parents[1]

# The finished run: 80 images in batches of 16 (5 iterations per epoch), 2 epochs, 20 test images.
TRAIN_IMAGES, TEST_IMAGES, BATCH, EPOCHS = 80, 20, 16, 2
# The EMA run's (tests/conftest.py `ema_run`): the non-default choices, a warm-up, the best model by the EMA.
EMA_SETTINGS = {"decay": 0.9, "warmup_iters": 4, "warmup_decay": 0.5, "buffers": "update", "select_best": "ema"}


def write_config(path: Path, **sections: Any) -> Path:
    """A config file that is the project's config.json with some sections overridden."""
    cfg = json.loads((ROOT / "config.json").read_text())
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg[section].update(values)
        else:
            cfg[section] = values
    path.write_text(json.dumps(cfg, indent=2))
    return path


def run_config(path: Path, data: Path, output_dir: Path, **sections) -> Path:
    """The finished run's config (sections override it), for a run of its own."""
    train = {"epochs": EPOCHS, "batch_size": BATCH, **sections.pop("train", {})}
    logging = {"output_dir": str(output_dir), "log_every_iters": 2, **sections.pop("logging", {})}
    return write_config(path, data={"root": str(data), "download": False}, train=train, logging=logging,
                        **sections)


@dataclass
class Ran:
    """What a command did: its exit code and what it printed."""

    returncode: int
    stdout: str
    stderr: str


def run_main(*args: str) -> Ran:
    """`python -m app ARGS` in this process, through main(), its output captured: the quick way to test
    what a command says and does, where no process boundary is under test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # --help, and a process's own exit code (app/launch.py)
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return Ran(code, out.getvalue(), err.getvalue())


def threads_per_worker() -> int:
    """The machine's cores shared out among the pytest workers that run side by side (`pytest -n`,
    pytest-xdist): every test process and every application process a test starts gets this many threads.
    Two workers of two threads each on two cores made a 5.6 s test take 57 s (OpenMP threads that wait
    for one another while the other worker holds the core)."""
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


def app_env(**extra: str) -> dict[str, str]:
    """The environment of an application process: the worker's threads (threads_per_worker), unbuffered."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads_per_worker()), "PYTHONUNBUFFERED": "1", **extra}


def answer_stop_signals() -> None:
    """Undo the ignores this process was started with (a background job's SIGINT, nohup's SIGHUP): the
    runs the tests start inherit them, and a run keeps an ignored stop signal ignored
    (handlers/stop_signals.py), so the tests' signals would not reach it. Started from a terminal, or
    from CI, nothing changes."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(s) == signal.SIG_IGN:
            signal.signal(s, signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL)


def run_app(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None,
            **kwargs: Any) -> subprocess.CompletedProcess:
    """`python -m app ARGS` in a fresh process, the way a user runs it."""
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=cwd or ROOT, env=env or app_env(),
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def start_app(*args: str, env: dict | None = None, **kwargs: Any) -> subprocess.Popen:
    """`python -m app ARGS` started in a fresh process; stdout and stderr are pipes unless given."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([sys.executable, "-m", "app", *args], cwd=kwargs.pop("cwd", ROOT), env=env or app_env(),
                            text=True, **kwargs)


def run_until(path: Path, *args: str, timeout: float = 300) -> None:
    """Start `python -m app ARGS` and SIGKILL it as soon as `path` exists (a checkpoint, say)."""
    proc = start_app(*args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert path.exists(), f"{path} never appeared"


TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  ")  # what every line of a run starts with


def untimed(line: str) -> str:
    """A run's line without the time it starts with."""
    m = TIMESTAMP.match(line)
    return line[m.end():] if m else line


def run_lines(stdout: str) -> list[str]:
    """The lines a run printed, without their times."""
    return [untimed(line) for line in stdout.splitlines()]


def wait_for_line(proc: subprocess.Popen, prefix: str) -> list[str]:
    """Read the process's stdout up to a line that starts with `prefix` (after its time); the lines read."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if untimed(line).startswith(prefix):
            return lines
    raise AssertionError(f"never printed {prefix!r}: {''.join(lines)} {proc.stderr.read() if proc.stderr else ''}")


def one_error_line(stderr: str) -> str:
    """The one line a failed command printed: exactly one, and no traceback."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def epochs_printed(stdout: str) -> list[str]:
    """The epochs whose line a run printed, as "2/3"."""
    return [line.split()[1] for line in run_lines(stdout) if line.startswith("epoch ")]


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv without its timing columns: what must be the same as an uninterrupted run's."""
    try:
        rows = read_metrics_csv(run_dir / "metrics.csv")
    except FileNotFoundError:
        return []
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in rows]


def scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a TensorBoard scalar, read with TensorBoard's own reader."""
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


class HostReads(TorchDispatchMode):
    """Every operator run under it that makes the host wait for the device: those that return a value
    to the host (`.item()`, `bool()`, `int()` come here as `_local_scalar_dense`) and those whose output
    size depends on the data (`nonzero`, `bincount`, boolean-mask indexing, `unique`), which must read
    the data to allocate. PyTorch tags both kinds on every operator, so this does not rely on a list."""

    SYNCING = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(tag in func.tags for tag in self.SYNCING):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def forbid_python_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Host reads that never reach the operator dispatcher (`tolist`, `numpy`) or that do nothing on a
    CPU tensor but copy and wait on a GPU (`cpu`) raise, as do the conversions, to be sure."""
    def refusing(name: str) -> Any:
        def refuse(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"a host read: Tensor.{name}")
        return refuse

    for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refusing(name))


def image_batches(sizes: list[int], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random uint8 CIFAR-shaped images and labels, one batch per size, the same for a seed."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
             torch.randint(0, 100, (n,), generator=g)) for n in sizes]


def small_net() -> torch.nn.Module:
    """Conv, BatchNorm, pooling, linear: the layers whose parameters ResNet18 has, in a net whose training
    is not chaotic at a batch of 8. (ResNet18 at batch 8 is: a 1-ulp difference after the first step,
    the last rounding of p - lr * d, grows to 1e-3 in the loss within four steps, between any two
    correct SGD implementations that round differently. What its users compare is one step's code, the
    optimizer's or the compiled model's.)"""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(256, 100))
