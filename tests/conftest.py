"""Fixtures: small data sets in the real on-disk format, and one finished run that many tests read
(and copy, where they change it), and one with the weights' EMA; the `--acceptance-*` options of the GPU
acceptance check and the rule that skips `gpu` tests without CUDA."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import torch

from tests.support import (EMA_SETTINGS, TEST_IMAGES, TRAIN_IMAGES, answer_stop_signals, run_config, run_main,
                           threads_per_worker, write_cifar10, write_cifar100)

pytest_plugins = ["tests.gpu_report"]  # the table of `gpu` tests, and their JSON report


def pytest_configure(config: pytest.Config) -> None:
    answer_stop_signals()  # the suite's signals reach its runs however the suite was started
    torch.set_num_threads(threads_per_worker())  # in-process training shares the cores with the other worker


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("acceptance", "the GPU acceptance check (tests/acceptance)")
    group.addoption("--acceptance-device", choices=["cuda", "cpu"], default="cuda",
                    help="where the checks train (cpu: the check itself tested, the GPU-only checks skipped)")
    group.addoption("--acceptance-out", help="folder for gpu_check.json, every gpu test's result and figures")
    group.addoption("--acceptance-n-train", type=int, default=50_000)
    group.addoption("--acceptance-n-test", type=int, default=10_000)
    group.addoption("--acceptance-epochs", type=int, default=4)
    group.addoption("--acceptance-classes", type=int, default=100, help="classes the data uses")
    group.addoption("--acceptance-batch-size", type=int, default=128)
    group.addoption("--acceptance-workers", type=int, default=8,
                    help="runs side by side (each is mostly start-up; on the CPU they share its cores)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests are skipped without CUDA; the acceptance checks run on the CPU when asked to."""
    import torch

    if torch.cuda.is_available():
        return
    on_cpu = config.getoption("acceptance_device") == "cpu"
    for item in items:
        if item.get_closest_marker("gpu") and not (on_cpu and "acceptance" in item.nodeid.split("/")):
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture
def fresh_compiles() -> Iterator[None]:
    """torch.compile's caches emptied around a test: past dynamo's recompile limit (8 per function) the
    update would silently run eagerly, and a test of the fused update would compare today's with itself."""
    import torch

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 training and 20 test images: an end-to-end run of two epochs in seconds."""
    return write_cifar100(tmp_path_factory.mktemp("cifar"), TRAIN_IMAGES, TEST_IMAGES)


@pytest.fixture(scope="session")
def small_cifar10(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CIFAR-10 of as many images, pickled as the original archive is (Python 2, protocol 2)."""
    return write_cifar10(tmp_path_factory.mktemp("cifar10"), TRAIN_IMAGES, TEST_IMAGES, python2=True)


@dataclass(frozen=True)
class FinishedRun:
    run_dir: Path
    config: Path  # the config it was trained with
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory, small_data: Path) -> FinishedRun:
    """One run trained to the end, here in this process (`python -m app --config C --run-name r`), under
    umask 027, so that its files show what a umask makes of them. Do not change it: copy it
    (`run_copy`)."""
    tmp = tmp_path_factory.mktemp("finished")
    cfg = run_config(tmp / "c.json", small_data, tmp / "runs", logging={"progress_every_iters": 2})
    previous = os.umask(0o027)
    try:
        ran = run_main("--config", str(cfg), "--run-name", "r")
    finally:
        os.umask(previous)
    assert ran.returncode == 0, ran.stderr
    return FinishedRun(tmp / "runs" / "r", cfg, ran.stdout, ran.stderr)


@pytest.fixture(scope="session")
def ema_run(tmp_path_factory: pytest.TempPathFactory, small_data: Path) -> FinishedRun:
    """The finished run's config with the weights' EMA (EMA_SETTINGS), the best model chosen by it: trained
    once for the EMA's tests and evaluate's. Do not change it either."""
    tmp = tmp_path_factory.mktemp("ema")
    cfg = run_config(tmp / "c.json", small_data, tmp / "runs", logging={"progress_every_iters": 2}, ema=EMA_SETTINGS)
    ran = run_main("--config", str(cfg), "--run-name", "r")
    assert ran.returncode == 0, ran.stderr
    return FinishedRun(tmp / "runs" / "r", cfg, ran.stdout, ran.stderr)


@dataclass(frozen=True)
class RunCopy:
    run_dir: Path
    config: Path  # the run's config, its output folder where the copy is


@pytest.fixture
def run_copy(finished_run: FinishedRun, tmp_path: Path) -> RunCopy:
    """A copy of the finished run in this test's folder, with its config, to change and resume."""
    shutil.copytree(finished_run.run_dir, tmp_path / "runs" / "r")
    config = json.loads(finished_run.config.read_text())
    config["logging"]["output_dir"] = str(tmp_path / "runs")
    (tmp_path / "c.json").write_text(json.dumps(config))
    return RunCopy(tmp_path / "runs" / "r", tmp_path / "c.json")
