"""Stops at chosen moments, resumed: the run ends with the weights, results.json, TensorBoard tags and
epoch lines of an uninterrupted one (CPU, same seed), and every graceful stop lands (its checkpoint on
disk, one line, 128+N). A seeded sample of tests/crash_harness.py's cases; the whole grid and the
stress mode run by hand (README, "Crash safety")."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.crash_harness import Case, run_cases

pytestmark = pytest.mark.slow

SAMPLE = [
    Case(nproc=1, background=True, log_every=1, moment="step", signal="TERM"),
    Case(nproc=2, background=True, log_every=50, moment="evaluation", signal="TERM"),  # the lost checkpoint of before
    Case(nproc=1, background=True, log_every=50, moment="checkpoint", signal="INT", move=True),
    Case(nproc=2, background=False, log_every=1, moment="startup", signal="HUP"),
    Case(nproc=1, background=False, log_every=1, moment="teardown", signal="TERM"),
    Case(nproc=2, background=True, log_every=1, moment="step", signal="KILL", move=True, options=True),
]


def test_a_seeded_sample_of_stops_resumes_to_the_uninterrupted_run(tmp_path: Path) -> None:
    outcomes = run_cases(tmp_path, SAMPLE, seed=3)
    failed = {o.case.name: o.problems for o in outcomes if not o.ok}
    assert not failed, failed
    assert sum(o.signalled for o in outcomes) == len(SAMPLE)
