"""Exact resume: killed with SIGKILL at seeded random moments and resumed, a run ends with the weights
and metrics of an uninterrupted one (CPU, same seed). More kill points: tests/crash_harness.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.crash_harness import crash_resume

pytestmark = pytest.mark.slow


def test_killed_and_resumed_run_ends_bit_identical(tmp_path: Path) -> None:
    """Epochs of 4 iterations with a checkpoint every 3 as well: resumes from checkpoints in the middle
    of an epoch (3, 6, 9) and at its end (4, 8, 12)."""
    report = crash_resume(tmp_path, kills=4, seed=4, every_iters=3)
    assert report.kills >= 3, report
    assert report.identical_weights and report.same_metrics, report


def test_two_process_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    report = crash_resume(tmp_path, kills=2, seed=7, every_iters=3, nproc=2, epochs=2)
    assert report.kills >= 1, report
    assert report.identical_weights and report.same_metrics, report
