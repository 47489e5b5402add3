"""Run folders on a shared machine: one owner, files like any other tool's, bounded disk, and every
evaluation recorded once."""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import time
from pathlib import Path

import pytest
from ignite.engine import Engine, Events

from app.config import Config, override
from app.errors import UserError
from app.runs import LOCK_FILE, RunInUse, RunPlan, check_not_in_use, claim_run_dir, lock_run_dir
from handlers.atomic import TEMP_PREFIX
from handlers.checkpoints import checkpoint_event, point_link, training_checkpoints
from tests.support import metrics_rows, one_error_line, run_app, run_config, run_main, start_app, wait_for_line


@pytest.mark.slow
def test_a_live_run_owns_its_folder_and_a_killed_one_leaves_no_lock(tmp_path: Path, small_data: Path) -> None:
    cfg = run_config(tmp_path / "c.json", small_data, tmp_path / "runs", train={"epochs": 20})
    run_dir = tmp_path / "runs" / "r"
    live = start_app("--config", str(cfg), "--run-name", "r")
    try:
        wait_for_line(live, "run ")
        # What the refused commands must leave alone: every file but those the live run writes as it trains
        # (results.json, metrics.csv, and their temporary files on the way).
        def untouched() -> dict[str, bytes]:
            return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()
                    and p.name not in ("results.json", "metrics.csv") and not p.name.startswith(TEMP_PREFIX)}

        before = untouched()
        for args in (["--run-name", "r"], ["--resume", str(run_dir)], ["--resume"]):
            ran = run_main("--config", str(cfg), *args)
            line = one_error_line(ran.stderr)
            assert ran.returncode == 2 and f"{run_dir}: in use by pid {live.pid} on " in line, line
        assert untouched() == before
    finally:
        live.kill()
        live.wait()
    check_not_in_use(run_dir)  # SIGKILL released it: nothing stale to clear by hand


def test_a_new_run_never_takes_an_existing_folder(tmp_path: Path) -> None:
    """Two runs that chose the same name before either created it (the launcher checks seconds before
    rank 0 creates): a named one is refused, an unnamed one takes the next free name."""
    named = override(Config(), {"logging.output_dir": str(tmp_path), "logging.run_name": "same"})
    first, lock = claim_run_dir(named, RunPlan(tmp_path / "same"))
    with pytest.raises(RunInUse, match=f"in use by pid {os.getpid()} "):
        claim_run_dir(named, RunPlan(tmp_path / "same"))
    lock.release()
    with pytest.raises(UserError, match="run folder already exists; continue it with --resume"):
        claim_run_dir(named, RunPlan(tmp_path / "same"))
    unnamed = override(Config(), {"logging.output_dir": str(tmp_path)})
    a, lock_a = claim_run_dir(unnamed, RunPlan(tmp_path / "20261128-120000"))
    b, lock_b = claim_run_dir(unnamed, RunPlan(tmp_path / "20261128-120000"))
    assert (a.run_dir.name, b.run_dir.name) == ("20261128-120000", "20261128-120000-2")
    assert json.loads((b.run_dir / "config.json").read_text())["logging"]["run_name"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["20261128-120000", "20261128-120000-2", "same"]


def test_files_and_folders_follow_the_umask(finished_run) -> None:
    """The finished run was trained under umask 027 (tests/conftest.py)."""
    run_dir = finished_run.run_dir
    paths = [run_dir, *run_dir.rglob("*")]
    assert {p.relative_to(run_dir).as_posix() for p in paths} >= {
        ".", "config.json", "results.json", LOCK_FILE, "checkpoints", "checkpoints/training_checkpoint_5.pt", "tb",
        "tb/train", "tb/validation"}
    for p in paths:
        assert stat.S_IMODE(p.stat().st_mode) == (0o750 if p.is_dir() else 0o640), p


def test_keep_last_last_pt_and_metrics_csv_hold_across_resumes(run_copy, finished_run) -> None:
    """keep_last 2, counted from the files on disk: a resume from the epoch-1 checkpoint, with files an
    older version left beyond keep_last, ends with the newest two; the stale ones go once a newer
    checkpoint is on disk. The resume is from `last.pt` (the run as a kill in epoch 2 left it, its
    metrics.csv with a row the checkpoint does not have): it names the file it resumes from, last.pt then
    names the new newest, and metrics.csv has each epoch once, as the uninterrupted run's."""
    ckpts = run_copy.run_dir / "checkpoints"
    (ckpts / "training_checkpoint_10.pt").unlink()  # the run as if killed during epoch 2
    point_link(ckpts, "last.pt", "training_checkpoint_5.pt")
    for stale in (1, 3):
        shutil.copy(ckpts / "training_checkpoint_5.pt", ckpts / f"training_checkpoint_{stale}.pt")
    ran = run_main("--config", str(run_copy.config), "--resume", str(ckpts / "last.pt"))
    assert ran.returncode == 0, ran.stderr
    assert "from training_checkpoint_5.pt" in ran.stdout
    assert [p.name for p in training_checkpoints(ckpts)] == ["training_checkpoint_10.pt", "training_checkpoint_5.pt"]
    assert os.readlink(ckpts / "last.pt") == "training_checkpoint_10.pt"
    rows = metrics_rows(run_copy.run_dir)
    assert rows == metrics_rows(finished_run.run_dir) and len(rows) == 2


def test_an_epoch_end_on_the_every_iters_grid_is_saved_once_after_its_evaluation() -> None:
    """Epochs of 4 iterations, a checkpoint every 2: iterations 2, 4 (epoch end), 6, 8 (epoch end)."""
    trainer = Engine(lambda e, b: None)
    saved = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: saved.append(("evaluated", e.state.iteration)))
    trainer.add_event_handler(checkpoint_event(2), lambda e: saved.append(("saved", e.state.iteration)))
    trainer.run(range(4), max_epochs=2)
    assert saved == [("saved", 2), ("evaluated", 4), ("saved", 4), ("saved", 6), ("evaluated", 8), ("saved", 8)]


def _tiny_files() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    import resource
    resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))


@pytest.mark.slow
def test_a_full_disk_before_the_first_file_is_one_line_and_leaves_nothing(tmp_path: Path, small_data: Path) -> None:
    cfg = run_config(tmp_path / "c.json", small_data, tmp_path / "runs")
    result = run_app("--config", str(cfg), "--run-name", "r", preexec_fn=_tiny_files, timeout=300)
    assert result.returncode == 1
    line = one_error_line(result.stderr)
    assert "config.json: cannot write" in line and str(tmp_path / "runs") in line, line
    assert list((tmp_path / "runs").iterdir()) == []


def test_claimed_folder_keeps_the_lock_through_its_rename(tmp_path: Path) -> None:
    cfg = override(Config(), {"logging.output_dir": str(tmp_path), "logging.run_name": "r"})
    plan, lock = claim_run_dir(cfg, RunPlan(tmp_path / "r"))
    holder = json.loads((plan.run_dir / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and time.strptime(holder["started"], "%Y-%m-%d %H:%M:%S")
    with pytest.raises(RunInUse):
        check_not_in_use(plan.run_dir)
    lock.release()
    check_not_in_use(plan.run_dir)



def test_deleting_the_lock_file_does_not_let_a_second_trainer_into_a_live_run(tmp_path: Path) -> None:
    """The folder itself is locked: with .lock removed under a live run, a second claim is still refused."""
    cfg = override(Config(), {"logging.output_dir": str(tmp_path), "logging.run_name": "r"})
    plan, lock = claim_run_dir(cfg, RunPlan(tmp_path / "r"))
    (plan.run_dir / LOCK_FILE).unlink()
    with pytest.raises(RunInUse):
        check_not_in_use(plan.run_dir)
    with pytest.raises(RunInUse):
        lock_run_dir(plan.run_dir)
    lock.release()
    lock_run_dir(plan.run_dir).release()
