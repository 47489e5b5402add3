"""A sweep run's state, decided in one place from what its folder holds, and the command that takes it
on from there.

finished: results.json says so; running: a live process holds the run folder's lock; failed: the
sweep saw it fail (SWEEP/failures.json, cleared when it finishes); stopped: its folder exists
(interrupted or killed; it resumes); not started. The runner, the table, `--print-commands` and the
SLURM script all ask here, so they agree on which runs are left.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from app.runs import run_in_use
from app.sweep.plan import PlannedRun, SweepPlan
from handlers.results import write_json_atomic

FAILURES_FILE = "failures.json"
STATUSES = ("finished", "running", "failed", "stopped", "not started")


def read_results(run_dir: Path) -> Optional[dict[str, Any]]:
    """The run's results.json, or None if it has none (yet) or it cannot be read."""
    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    return results if isinstance(results, dict) else None


def run_status(run_dir: Path, failure: Optional[dict[str, Any]] = None) -> str:
    """One of STATUSES; `failure` is the run's entry in failures.json, if any."""
    results = read_results(run_dir)
    if results is not None and results.get("status") == "finished":
        return "finished"
    if run_in_use(run_dir):
        return "running"
    if failure is not None:
        return "failed"
    return "stopped" if (run_dir / "config.json").is_file() else "not started"


def read_failures(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    try:
        return json.loads((sweep_dir / FAILURES_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def record_outcome(sweep_dir: Path, name: str, failure: Optional[dict[str, Any]]) -> None:
    """Note a run's failure (exit code, its last line), or clear it when the run finished."""
    failures = read_failures(sweep_dir)
    if failure is None:
        failures.pop(name, None)
    else:
        failures[name] = failure
    write_json_atomic(sweep_dir / FAILURES_FILE, failures)


def next_command(plan: SweepPlan, run: PlannedRun, python: str = "python") -> list[str]:
    """What takes an unfinished `run` on from where it is, from the sweep's workdir: a resume if its
    folder exists, else a new run. (Whether it is to run at all is its `run_status`.)"""
    run_dir = run.run_dir(plan.sweep_dir)

    def path(p: Path) -> str:
        return os.path.relpath(p.resolve(), plan.workdir)

    command = [python, "-m", "app", "--config", path(run.config_file(plan.sweep_dir))]
    if (run_dir / "config.json").is_file():
        command += ["--resume", path(run_dir)]
    return command
