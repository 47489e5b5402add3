"""A sweep run's state, decided in one place from what its folder holds, and the command that takes it
on from there.

The run's own results.json is the truth, because the run wrote it knowing how it ended, whoever ran
it (this sweep, another one, a SLURM task): finished means finished, whatever exit code its process
had after writing it (a kill in its teardown); failed is failed, with the one line it gives as its
error. A run whose lock a live process holds is running, whatever its results.json says (a run
SIGKILLed in the middle leaves `running` there, and no live holder). Only where results.json does not
explain how a process ended does the sweep's own record of it count (SWEEP/failures.json, written by
the runner): the exit code and last line of a run that failed before it wrote any results (a config
error, a missing data set), or the signal that killed a run (stopped, resumable: "killed by SIGKILL").
A record counts only for the results.json it was made against, so a run that someone has since
resumed and that wrote results again is judged by them. Anything else with a folder is stopped
(interrupted, or killed: results.json says `interrupted`, `running`, or nothing yet; it resumes), the rest
not started. Without a sweep's record this is the state of any run folder: `python -m app runs` asks here
too (app/run_table.py), as do the sweep's runner, its table, `--print-commands` and the SLURM script, so
they all agree on which runs are left.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from app.runs import run_in_use
from app.sweep.plan import PlannedRun, SweepPlan
from handlers.atomic import write_json_atomic

FAILURES_FILE = "failures.json"
STATUSES = ("finished", "running", "failed", "stopped", "not started")


@dataclass(frozen=True)
class RunState:
    status: str  # one of STATUSES
    detail: Optional[str] = None  # failed: the one-line reason; stopped: "killed by SIGKILL", if known
    exit_code: Optional[int] = None  # failed: its process's exit code, where the sweep saw it


def read_results(run_dir: Path) -> Optional[dict[str, Any]]:
    """The run's results.json, or None if it has none (yet) or it cannot be read."""
    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return results if isinstance(results, dict) else None


def _results_version(run_dir: Path) -> Optional[str]:
    """Which results.json the folder holds now (a digest of its bytes; None: none), to tell whether the
    run has written results since the sweep made a record of it."""
    try:
        return hashlib.sha256((run_dir / "results.json").read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def _applies(record: Optional[dict[str, Any]], run_dir: Path) -> bool:
    """Whether the sweep's record of how a process ended is about the results.json there now (a record
    written before records were tied to one counts, as it did then)."""
    if record is None:
        return False
    version = _results_version(run_dir)
    return record.get("results_version", version) == version


def run_state(run_dir: Path, record: Optional[dict[str, Any]] = None) -> RunState:
    """The run's state; `record` is its entry in failures.json, if any."""
    results = read_results(run_dir) or {}
    if results.get("status") == "finished":
        return RunState("finished")
    if run_in_use(run_dir):
        return RunState("running")
    record = record if _applies(record, run_dir) else None
    if results.get("status") == "failed":
        return RunState("failed", str(results.get("error") or "no reason given in results.json"),
                        None if record is None else record.get("exit_code"))
    if record is not None and record.get("signal"):  # killed: it resumes from its last checkpoint
        return RunState("stopped", f"killed by {record['signal']}")
    if record is not None:
        return RunState("failed", record.get("error") or "(no output)", record.get("exit_code"))
    if results.get("status") == "interrupted":  # a graceful stop, with its checkpoint
        return RunState("stopped", "interrupted")
    if results.get("status") == "running":  # and no live holder: SIGKILL, a crash, a lost node
        return RunState("stopped", "killed")
    if results:
        return RunState("stopped")
    if (run_dir / "config.json").is_file():  # killed before its first evaluation, or failed in its set-up
        return RunState("stopped", "no results yet")
    return RunState("not started")


def run_status(run_dir: Path, record: Optional[dict[str, Any]] = None) -> str:
    """One of STATUSES (run_state's)."""
    return run_state(run_dir, record).status


def signal_of(exit_code: int) -> Optional[tuple[str, bool]]:
    """(the signal's name, whether it killed the process) for a process that a signal ended: Popen's -N
    (killed by N), or 128 + N (the app's own exit after a graceful stop on N); None otherwise."""
    number, killed = (-exit_code, True) if exit_code < 0 else (exit_code - 128, False)
    try:
        return (signal.Signals(number).name, killed) if number > 0 else None
    except ValueError:
        return None


def end_record(run_dir: Path, exit_code: int, last_line: str) -> Optional[dict[str, Any]]:
    """What the sweep notes of a run's process that ended with `exit_code` (Popen's), where results.json
    leaves something to say: the exit code of a failure (the table shows it beside results.json's
    reason), with its last line where the run wrote no reason, or the signal that killed it. None where
    there is nothing to add: a finished run, or a graceful stop (results.json says interrupted)."""
    results = read_results(run_dir) or {}
    ended_by = signal_of(exit_code)
    if results.get("status") == "finished" or (ended_by is not None and not ended_by[1]
                                                and results.get("status") != "failed"):
        return None
    record: dict[str, Any] = {"exit_code": 128 - exit_code if exit_code < 0 else exit_code,  # as a shell says
                              "at": time.strftime("%Y-%m-%d %H:%M:%S"), "results_version": _results_version(run_dir)}
    if results.get("status") == "failed":
        return record
    if ended_by is not None:
        return {**record, "signal": ended_by[0]}
    return {**record, "error": last_line or "(no output)"}


def read_failures(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    try:
        failures = json.loads((sweep_dir / FAILURES_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return failures if isinstance(failures, dict) else {}


def record_outcome(sweep_dir: Path, name: str, record: Optional[dict[str, Any]]) -> None:
    """Note how a run's process ended (`end_record`), or clear the note (None)."""
    failures = read_failures(sweep_dir)
    if record is None and name not in failures:
        return
    if record is None:
        failures.pop(name, None)
    else:
        failures[name] = record
    write_json_atomic(sweep_dir / FAILURES_FILE, failures)


def next_command(plan: SweepPlan, run: PlannedRun, python: str = "python") -> list[str]:
    """What takes an unfinished `run` on from where it is, from the sweep's workdir: a resume if its
    folder exists, else a new run. Its folder is given from where the sweep folder is now (`--output-dir`
    over the config's, which names where the sweep was created), so a moved or copied sweep trains in
    its new place. (Whether it is to run at all is its `run_state`.)"""
    run_dir = run.run_dir(plan.sweep_dir)

    def path(p: Path) -> str:
        return os.path.relpath(p.resolve(), plan.workdir)

    command = [python, "-m", "app", "--config", path(run.config_file(plan.sweep_dir)),
               "--output-dir", path(plan.sweep_dir)]
    if (run_dir / "config.json").is_file():
        command += ["--resume", path(run_dir)]
    return command
