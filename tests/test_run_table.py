"""`python -m app runs`: every run under a folder in one table, ordinary runs and a sweep's alike, each
with the state its folder shows (finished, running, failed, stopped: interrupted or killed, and how to
resume it), by name; `--json` for scripts; bad folders refused in one line. The runs are the session's
finished run and folders written in the real formats (config.json, results.json, a held lock): nothing
is trained here."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
from ignite.engine import Engine

from app.config import Config, override, to_dict
from app.runs import lock_run_dir
from handlers.results import RunResults, write_json_atomic
from tests.support import EPOCHS, app_env, one_error_line, run_main, write_config

ITERS = 5  # per epoch
KILLED, LIVE, NO_RESULTS, INTERRUPTED, FAILED = (f"20261128-1{h}0000" for h in range(2, 7))


def _run_folder(run_dir: Path, config: Optional[dict[str, Any]] = None) -> Path:
    """A run folder as app/runs.py creates it: its resolved config.json (10 epochs) and checkpoints/."""
    (run_dir / "checkpoints").mkdir(parents=True)
    write_json_atomic(run_dir / "config.json", config or to_dict(override(Config(), {"train.epochs": 10})))
    return run_dir


def _results(run_dir: Path, status: str, done: int, top1: list[float], wall: float,
             error: Optional[str] = None) -> None:
    """results.json as the run writes it (handlers/results.py), after `done` epochs whose top-1 was `top1`."""
    results = RunResults(run_dir / "results.json")
    for epoch, score in enumerate(top1, 1):
        results.final = {"top1": score, "top5": min(1.0, 2 * score), "loss": 4.0, "epoch": epoch}
        if not results.best or score > results.best["top1"]:
            results.best = dict(results.final)
    results.elapsed = wall
    trainer = Engine(lambda engine, batch: None)
    trainer.state.iteration, trainer.state.epoch_length, trainer.state.max_epochs = done * ITERS, ITERS, 10
    results.write(trainer, status, error)


@pytest.fixture
def runs_folder(run_copy) -> Path:
    """runs/: the finished run `r`, and a run in each other state a folder can show."""
    out = run_copy.run_dir.parent
    _results(_run_folder(out / KILLED), "running", 2, [0.1, 0.2], 125.4)  # SIGKILLed in its third epoch
    _results(_run_folder(out / LIVE), "running", 1, [0.05], 60)  # training, while a test holds its lock
    _run_folder(out / NO_RESULTS)  # killed before its first evaluation
    _results(_run_folder(out / INTERRUPTED), "interrupted", 3, [0.3, 0.25, 0.2], 3723)
    _results(_run_folder(out / FAILED), "failed", 1, [0.01], 30, "training loss became nan at iteration 7")
    (out / "notes").mkdir()  # not a run folder
    (out / "notes" / "todo.txt").write_text("try lr 0.2")
    _run_folder(out / ".partial-20261128-170000-x1y2")  # a run folder being created, under its hidden name
    return out


def _table(*args: str) -> dict[str, Any]:
    ran = run_main("runs", *args, "--json")
    assert ran.returncode == 0 and ran.stderr == "", ran.stderr
    return json.loads(ran.stdout)


def test_every_run_is_listed_by_name_with_its_state_epochs_and_results(runs_folder: Path, finished_run) -> None:
    held = lock_run_dir(runs_folder / LIVE)
    try:
        table = _table(str(runs_folder))
    finally:
        held.release()
    rows = {r["name"]: r for r in table["runs"]}
    assert list(rows) == [KILLED, LIVE, NO_RESULTS, INTERRUPTED, FAILED, "r"]  # as started; nothing else
    assert {n: (r["status"], r["detail"]) for n, r in rows.items()} == {
        KILLED: ("stopped", "killed"), LIVE: ("running", None), NO_RESULTS: ("stopped", "no results yet"),
        INTERRUPTED: ("stopped", "interrupted"), FAILED: ("failed", "training loss became nan at iteration 7"),
        "r": ("finished", None)}
    assert table["counts"] == {"finished": 1, "running": 1, "failed": 1, "stopped": 3, "not started": 0}
    real = json.loads((finished_run.run_dir / "results.json").read_text())
    r = rows["r"]  # results.json's own numbers and names; the planned epochs from its config.json
    assert (r["epochs"], r["max_epochs"]) == (EPOCHS, EPOCHS)
    assert (r["best"], r["final"], r["wall_time_seconds"]) == (real["best"], real["final"], real["wall_time_seconds"])
    killed = rows[KILLED]
    assert (killed["epochs"], killed["max_epochs"], killed["best"]["top1"], killed["best"]["epoch"]) == (2, 10, 0.2, 2)
    early = rows[NO_RESULTS]
    assert (early["epochs"], early["best"], early["final"], early["wall_time_seconds"]) == (0, {}, {}, None)
    assert {n: r["resume"] for n, r in rows.items()} == {
        **dict.fromkeys(rows), **{n: f"python -m app --resume {runs_folder / n}" for n in (KILLED, NO_RESULTS,
                                                                                         INTERRUPTED)}}
    assert {r["sweep"] for r in rows.values()} == {None}


def test_the_text_table_shows_percent_the_best_epoch_and_how_to_resume(runs_folder: Path, finished_run) -> None:
    ran = run_main("runs", str(runs_folder))
    assert ran.returncode == 0 and ran.stderr == ""
    lines = ran.stdout.splitlines()
    assert lines[0].split("  ")[0] == "run" and "best top-1 % (epoch)" in lines[0] and "wall time" in lines[0]
    row = {line.split()[0]: line.split() for line in lines[1:7]}
    assert row[KILLED] == [KILLED, "stopped", "(killed)", "2/10", "20.00", "(2)", "20.00", "0:02:05"]
    assert row[INTERRUPTED] == [INTERRUPTED, "stopped", "(interrupted)", "3/10", "30.00", "(1)", "20.00", "1:02:03"]
    assert row[NO_RESULTS] == [NO_RESULTS, "stopped", "(no", "results", "yet)", "0/10", "–", "–", "–"]
    assert row[FAILED][:3] == [FAILED, "failed", "1/10"]
    real = json.loads((finished_run.run_dir / "results.json").read_text())
    assert row["r"][1:5] == ["finished", "2/2", f"{100 * real['best']['top1']:.2f}", f"({real['best']['epoch']})"]
    assert lines[7:] == ["", "stopped runs continue from their last checkpoint (if any) with:",
                         *(f"  python -m app --resume {runs_folder / n}" for n in (KILLED, LIVE, NO_RESULTS,
                                                                                   INTERRUPTED)),
                         "", "failed:", f"  {FAILED}: training loss became nan at iteration 7",
                         "", f"6 runs under {runs_folder}: 1 finished, 1 failed, 4 stopped"]  # LIVE's lock is free


def test_a_sweeps_runs_are_listed_one_level_down_and_resume_with_the_sweep(runs_folder: Path, finished_run,
                                                                           tmp_path: Path) -> None:
    """A sweep planned for another scheduler (nothing trained): seed0 finished, seed1 killed, seed2 not
    started (no folder: the sweep's own table lists it)."""
    cfg = write_config(tmp_path / "tiny.json", data={"root": str(tmp_path / "data"), "download": False},
                       train={"epochs": 3})
    assert run_main("sweep", "--config", str(cfg), "--output-dir", str(runs_folder), "--name", "s", "--seeds", "0-2",
                    "--print-commands").returncode == 0
    sweep = runs_folder / "s"
    shutil.copytree(finished_run.run_dir, sweep / "seed0")
    _results(_run_folder(sweep / "seed1", json.loads((sweep / "configs" / "seed1.json").read_text())),
             "running", 1, [0.02], 40)
    rows = {r["name"]: r for r in _table(str(runs_folder))["runs"]}
    assert list(rows) == [KILLED, LIVE, NO_RESULTS, INTERRUPTED, FAILED, "r", "s/seed0", "s/seed1"]
    assert [(rows[n]["status"], rows[n]["max_epochs"], rows[n]["sweep"]) for n in ("s/seed0", "s/seed1")] == \
        [("finished", EPOCHS, str(sweep)), ("stopped", 3, str(sweep))]
    assert rows["s/seed1"]["resume"] == f"python -m app sweep --resume {sweep}"
    alone = _table(str(sweep))["runs"]  # the sweep folder itself
    assert [(r["name"], r["status"], r["detail"]) for r in alone] == [("seed0", "finished", None),
                                                                      ("seed1", "stopped", "killed")]
    assert run_main("sweep", "--summary", str(sweep)).returncode == 0  # the sweep's own table agrees
    summary = json.loads((sweep / "summary.json").read_text())["runs"]
    states = [(r["name"], r["status"], r["detail"]) for r in alone]
    assert [(r["name"], r["status"], r["detail"]) for r in summary] == [*states, ("seed2", "not started", None)]
    text = run_main("runs", str(sweep)).stdout
    assert text.count(f"python -m app sweep --resume {sweep}\n") == 1
    assert f"per grid point, with the runs not started yet:\n  python -m app sweep --summary {sweep}\n" in text


def test_the_default_folder_is_runs_and_a_run_folder_is_a_table_of_one(run_copy, tmp_path: Path,
                                                                       monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # run_copy is runs/r here
    table = _table()
    assert (table["folder"], [r["name"] for r in table["runs"]]) == ("runs", ["r"])
    assert [(r["name"], r["path"]) for r in _table("runs/r")["runs"]] == [("r", "runs/r")]


def test_runs_help_and_refusals_answer_without_importing_torch(runs_folder: Path, tmp_path: Path) -> None:
    """As a user runs them, each in a process of its own, which never imports torch (README: they answer at
    once): the table, a missing folder (one line, exit 1), --help, a config file that is not there."""
    check = ("import sys\nfrom app.cli import main\ntry:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n"
             "    code = e.code\nprint('torch imported' if 'torch' in sys.modules else 'no torch', file=sys.stderr)\n"
             "sys.exit(code)")
    for args, code in ((["runs", str(runs_folder)], 0), (["runs", str(tmp_path / "absent")], 1), (["--help"], 0),
                       (["--config", str(tmp_path / "absent.json")], 2)):
        ran = subprocess.run([sys.executable, "-c", check, *args], capture_output=True, text=True, timeout=60,
                             env=app_env())
        assert (ran.returncode, ran.stderr.splitlines()[-1]) == (code, "no torch"), (args, ran.stderr)
        if args[:2] == ["runs", str(tmp_path / "absent")]:
            assert ran.stdout == "" and ran.stderr.splitlines()[0] == f"error: {tmp_path / 'absent'}: no such folder"


def test_a_folder_that_is_missing_a_file_or_empty_is_said_in_one_line(tmp_path: Path) -> None:
    ran = run_main("runs", str(tmp_path / "absent"))
    assert ran.returncode == 1 and one_error_line(ran.stderr) == f"error: {tmp_path / 'absent'}: no such folder"
    (tmp_path / "a-file").write_text("")
    ran = run_main("runs", str(tmp_path / "a-file"))
    assert ran.returncode == 1 and one_error_line(ran.stderr) == \
        f"error: {tmp_path / 'a-file'}: not a folder (give the folder that holds the run folders)"
    (tmp_path / "empty" / "notes").mkdir(parents=True)
    for json_flag in ([], ["--json"]):
        ran = run_main("runs", str(tmp_path / "empty"), *json_flag)
        assert (ran.returncode, ran.stdout) == (1, "") and one_error_line(ran.stderr) == (
            f"error: {tmp_path / 'empty'}: no runs in it or one level down (a run folder holds config.json and "
            f"checkpoints/)")
    ran = run_main("runs", "--sort")
    assert ran.returncode == 2 and one_error_line(ran.stderr) == \
        "error: python -m app runs: unrecognized arguments: --sort (see --help)"


def test_the_sweep_summary_of_a_folder_of_runs_points_here(runs_folder: Path) -> None:
    ran = run_main("sweep", "--summary", str(runs_folder))
    assert ran.returncode == 1 and one_error_line(ran.stderr) == \
        f"error: {runs_folder}: not a sweep folder (no sweep.json); to list the ordinary runs in it: " \
        f"python -m app runs {runs_folder}"
