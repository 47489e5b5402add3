"""The GPU acceptance check's fixtures: its settings (the `--acceptance-*` options, tests/conftest.py)
and its synthetic data. The runs the checks read: test_acceptance.py (`runs`). The table and report:
tests/gpu_report.py.

Every check is a test marked `gpu`. On a machine without CUDA they are skipped, unless the check is
asked to run on the CPU (`--acceptance-device cpu`, which is how the check itself is tested); then
the checks that need a GPU are skipped. `bash bench/gpu.sh` runs them with every other `gpu` test.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.acceptance.support import Acceptance
from bench.synthetic import write_cifar100


@pytest.fixture(scope="session")
def acceptance(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Acceptance]:
    option = request.config.getoption
    checks = Acceptance(option("acceptance_device"), option("acceptance_n_train"), option("acceptance_n_test"),
                        option("acceptance_epochs"), option("acceptance_classes"), option("acceptance_batch_size"),
                        tmp_path_factory.mktemp("acceptance"), workers=option("acceptance_workers"))
    yield checks
    checks.close()


@pytest.fixture(scope="session")
def data(acceptance: Acceptance) -> Path:
    """`bench.synthetic --hard` data: learnable to about 75% top-1 at most (a quarter of the labels are
    noise), so that two runs can be compared by top-1 and by loss, as on the real CIFAR-100."""
    return write_cifar100(acceptance.work / "data", acceptance.n_train, acceptance.n_test, hard=True,
                          used_classes=acceptance.classes)
