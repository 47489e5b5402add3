"""Shared fixtures: small CIFAR-100 data sets written in the real on-disk format, and a way to run the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.synthetic import write_cifar100  # noqa: F401  (re-exported for the tests)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """240 training and 50 test images: enough for an end-to-end run in seconds."""
    return write_cifar100(tmp_path_factory.mktemp("cifar"), 240, 50)


def write_config(path: Path, **sections) -> Path:
    """A config file that is the project's config.json with some sections overridden."""
    cfg = json.loads((ROOT / "config.json").read_text())
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg[section].update(values)
        else:
            cfg[section] = values
    path.write_text(json.dumps(cfg, indent=2))
    return path


def run_app(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """`python -m app ARGS` in a fresh process, the way a user runs it."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def run_until(path: Path, *args: str, timeout: float = 300) -> None:
    """Start `python -m app ARGS` and SIGKILL it as soon as `path` exists (a checkpoint, say)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "app", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert path.exists(), f"{path} never appeared"
