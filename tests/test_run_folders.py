"""Run folders on a shared machine: one owner, files like any other tool's, bounded disk, every
evaluation recorded once, and TensorBoard on disk before each checkpoint."""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ignite.engine import Engine, Events
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from app.config import Config, override
from app.errors import UserError
from app.runs import LOCK_FILE, RunInUse, RunPlan, check_not_in_use, claim_run_dir
from conftest import ROOT, run_app, run_until, write_config
from handlers.checkpoints import checkpoint_event, training_checkpoints


def _config(tmp: Path, data: Path, epochs: int = 2, **sections) -> Path:
    checkpoint = sections.pop("checkpoint", {})
    return write_config(tmp / "c.json", data={"root": str(data), "download": False},
                        train={"epochs": epochs, "batch_size": 48},
                        logging={"output_dir": str(tmp / "runs"), "log_every_iters": 2},
                        checkpoint={"keep_last": 2, "every_iters": 0, **checkpoint}, **sections)


def _one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def _popen(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.Popen([sys.executable, "-m", "app", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def _wait_for_line(proc: subprocess.Popen, prefix: str) -> None:
    for line in proc.stdout:
        if line.startswith(prefix):
            return
    raise AssertionError(f"never printed {prefix!r}: {proc.stderr.read()}")


def test_a_live_run_owns_its_folder_and_a_killed_one_leaves_no_lock(tmp_path: Path, small_data: Path) -> None:
    cfg = _config(tmp_path, small_data, epochs=6)
    run_dir = tmp_path / "runs" / "r"
    live = _popen("--config", str(cfg), "--run-name", "r")
    try:
        _wait_for_line(live, "run ")
        before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
        for args in (["--run-name", "r"], ["--resume", str(run_dir)], ["--resume"]):
            result = run_app("--config", str(cfg), *args)
            line = _one_line(result)
            assert result.returncode == 2 and f"{run_dir}: in use by pid {live.pid} on " in line, line
        assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != "results.json"} \
            == {k: v for k, v in before.items() if k != "results.json"}
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


def test_files_and_folders_follow_the_umask(tmp_path: Path, small_data: Path) -> None:
    cfg = _config(tmp_path, small_data, epochs=1)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-m", "app", "--config", str(cfg), "--run-name", "r"], cwd=ROOT,
                            env=env, capture_output=True, text=True, preexec_fn=lambda: os.umask(0o027))
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "runs" / "r"
    paths = [run_dir, *run_dir.rglob("*")]
    assert {p.relative_to(run_dir).as_posix() for p in paths} >= {
        ".", "config.json", "results.json", LOCK_FILE, "checkpoints", "checkpoints/training_checkpoint_5.pt", "tb",
        "tb/train", "tb/validation"}
    for p in paths:
        assert stat.S_IMODE(p.stat().st_mode) == (0o750 if p.is_dir() else 0o640), p


def test_keep_last_holds_across_resumes(tmp_path: Path, small_data: Path) -> None:
    cfg = _config(tmp_path, small_data, epochs=2, checkpoint={"every_iters": 2})
    ckpts = tmp_path / "runs" / "r" / "checkpoints"
    run_until(ckpts / "training_checkpoint_4.pt", "--config", str(cfg), "--run-name", "r")
    run_until(ckpts / "training_checkpoint_6.pt", "--config", str(cfg), "--resume")
    # files an older version left beyond keep_last go too, once a newer checkpoint is on disk
    for stale in (1, 3):
        shutil.copy(training_checkpoints(ckpts)[-1], ckpts / f"training_checkpoint_{stale}.pt")
    assert len(training_checkpoints(ckpts)) >= 4
    result = run_app("--config", str(cfg), "--resume")
    assert result.returncode == 0, result.stderr
    assert [p.name for p in training_checkpoints(ckpts)] == ["training_checkpoint_10.pt", "training_checkpoint_8.pt"]


def test_an_epoch_end_on_the_every_iters_grid_is_saved_once_after_its_evaluation() -> None:
    """Epochs of 4 iterations, a checkpoint every 2: iterations 2, 4 (epoch end), 6, 8 (epoch end)."""
    trainer = Engine(lambda e, b: None)
    saved = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: saved.append(("evaluated", e.state.iteration)))
    trainer.add_event_handler(checkpoint_event(2), lambda e: saved.append(("saved", e.state.iteration)))
    trainer.run(range(4), max_epochs=2)
    assert saved == [("saved", 2), ("evaluated", 4), ("saved", 4), ("saved", 6), ("evaluated", 8), ("saved", 8)]


def test_what_was_logged_before_a_checkpoint_is_on_disk_when_it_appears(tmp_path: Path, small_data: Path) -> None:
    """SIGKILL the moment training_checkpoint_7.pt appears (epochs of 5 iterations, a checkpoint every 7
    iterations as well): the event files, read back with TensorBoard's reader, have every iteration up
    to 7 and all of epoch 1's figures."""
    cfg = _config(tmp_path, small_data, epochs=3, checkpoint={"every_iters": 7})
    run_dir = tmp_path / "runs" / "r"
    run_until(run_dir / "checkpoints" / "training_checkpoint_7.pt", "--config", str(cfg), "--run-name", "r")
    train = EventAccumulator(str(run_dir / "tb" / "train"))
    train.Reload()
    for tag in ("metrics/loss", "metrics/top1", "schedule/lr", "schedule/momentum"):
        assert [e.step for e in train.Scalars(tag)][:7] == list(range(1, 8)), tag
    for tag in ("system/epoch_seconds", "system/images_per_second"):
        assert [e.step for e in train.Scalars(tag)][:1] == [5], tag
    val = EventAccumulator(str(run_dir / "tb" / "validation"), size_guidance={"images": 0, "histograms": 0})
    val.Reload()
    for tag in ("metrics/top1", "metrics/loss", "summary/best_top1"):
        assert [e.step for e in val.Scalars(tag)][:1] == [5], tag
    assert [e.step for e in val.Histograms("validation/per_class_accuracy")][:1] == [5]
    assert [e.step for e in val.Images("validation/confusion_matrix")][:1] == [5]
    assert "_hparams_/session_start_info" in val.PluginTagToContent("hparams")  # from the start


def test_a_full_disk_before_the_first_file_is_one_line_and_leaves_nothing(tmp_path: Path, small_data: Path) -> None:
    def tiny_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))

    cfg = _config(tmp_path, small_data)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-m", "app", "--config", str(cfg), "--run-name", "r"], cwd=ROOT,
                            env=env, capture_output=True, text=True, preexec_fn=tiny_files, timeout=300)
    assert result.returncode == 1
    line = _one_line(result)
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
