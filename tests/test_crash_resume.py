"""Exact resume: killed with SIGKILL at seeded random moments and resumed, a run ends with the weights
and metrics of an uninterrupted one (CPU, same seed). More kill points: tests/crash_harness.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from crash_harness import crash_resume


@pytest.mark.parametrize("every_iters", [0, 4], ids=["epoch-end checkpoints", "every 4 iterations"])
def test_killed_and_resumed_run_ends_bit_identical(tmp_path: Path, every_iters: int) -> None:
    report = crash_resume(tmp_path, kills=3, seed=every_iters, every_iters=every_iters)
    assert report.kills >= 2, report
    assert report.identical_weights and report.same_metrics, report


def test_two_process_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    report = crash_resume(tmp_path, kills=2, seed=7, every_iters=3, nproc=2, epochs=2)
    assert report.kills >= 1, report
    assert report.identical_weights and report.same_metrics, report
