"""What a user relies on when things go wrong: damaged, hostile or mismatched checkpoints, divergence,
disk trouble and a dying process."""
from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint

from app.peers import EXIT_PEER_DIED, GRACE_SECONDS, PeerWatch, process_start_time
from handlers.checkpoints import SaveThenRemove, training_checkpoints
from handlers.loss_buffer import LossBuffer, LossNotFinite
from tests.support import (ROOT, app_env, epochs_printed, one_error_line, run_app, run_config, run_main, start_app,
                           write_cifar100)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(run_copy) -> None:
    newest = run_copy.run_dir / "checkpoints" / "training_checkpoint_10.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    ran = run_main("--config", str(run_copy.config), "--resume", str(run_copy.run_dir))
    assert ran.returncode == 0, ran.stderr
    assert "training_checkpoint_10.pt" in ran.stderr and "training_checkpoint_5.pt" in ran.stderr
    assert epochs_printed(ran.stdout) == ["2/2"]
    torch.load(newest, weights_only=True)  # written again, whole


def test_no_intact_checkpoint_is_one_line_and_an_error(run_copy) -> None:
    for path in training_checkpoints(run_copy.run_dir / "checkpoints"):
        path.write_bytes(b"not a checkpoint")
    ran = run_main("--config", str(run_copy.config), "--resume", str(run_copy.run_dir))
    assert ran.returncode == 1
    assert "no intact training checkpoint" in one_error_line(ran.stderr)


def test_checkpoint_that_would_run_code_is_refused_and_the_code_does_not_run(tmp_path: Path, small_data) -> None:
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    hostile = tmp_path / "training_checkpoint_5.pt"
    torch.save({"trainer": Payload(), "model": {}}, hostile)
    cfg = run_config(tmp_path / "c.json", small_data, tmp_path / "runs")
    ran = run_main("--config", str(cfg), "--resume", str(hostile))
    assert ran.returncode == 1
    line = one_error_line(ran.stderr)
    assert str(hostile) in line and "not a loadable checkpoint" in line and "weights_only" not in line, line
    assert not marker.exists()


def test_resume_refuses_changes_that_alter_the_run_and_allows_safe_ones(run_copy, tmp_path: Path) -> None:
    refused = run_main("--config", str(run_copy.config), "--resume", str(run_copy.run_dir), "--epochs", "3",
                       "--lr", "0.2")
    assert refused.returncode == 2
    line = one_error_line(refused.stderr)
    assert "optimizer.lr: 0.1 -> 0.2" in line and "train.epochs: 2 -> 3" in line
    safe = run_main("--config", str(run_copy.config), "--resume", str(run_copy.run_dir), "--output-dir",
                    str(tmp_path / "other"))
    assert safe.returncode == 0 and "finished" in safe.stdout  # logging.* may change


def test_resume_checks_against_the_checkpoints_config_not_the_editable_copy(run_copy) -> None:
    """RUN/config.json edited (the epochs, the lr) and given back as the config: the checkpoint still
    says what the run was trained with, so the resume is refused in one line naming the key, instead
    of a traceback from the schedule (epochs) or silently training with the old lr."""
    (run_copy.run_dir / "checkpoints" / "training_checkpoint_10.pt").unlink()  # unfinished again: from 5
    saved = run_copy.run_dir / "config.json"
    for key, value, change in (("train", {"epochs": 3}, "train.epochs: 2 -> 3"),
                               ("optimizer", {"lr": 0.2}, "optimizer.lr: 0.1 -> 0.2")):
        edited = json.loads(saved.read_text())
        edited[key].update(value)
        saved.write_text(json.dumps(edited))
        ran = run_main("--config", str(saved), "--resume", str(run_copy.run_dir))
        line = one_error_line(ran.stderr)
        assert ran.returncode == 2 and change in line and "training_checkpoint_5.pt" in line, line
        edited[key].update({"epochs": 2} if key == "train" else {"lr": 0.1})
        saved.write_text(json.dumps(edited))


def test_a_run_resumes_from_its_folder_alone_from_another_folder_bit_identical(run_copy, finished_run,
                                                                              tmp_path: Path) -> None:
    """`python -m app --resume RUN`, the command the stop's line gives: no --config (the run's own config),
    run from somewhere else; it ends with the uninterrupted run's weights."""
    (run_copy.run_dir / "checkpoints" / "training_checkpoint_10.pt").unlink()  # unfinished again: from 5
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_app("--resume", str(run_copy.run_dir), cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stdout and epochs_printed(result.stdout) == ["2/2"]
    final = [torch.load(d / "checkpoints" / "training_checkpoint_10.pt", weights_only=True)["model"]
             for d in (finished_run.run_dir, run_copy.run_dir)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


@pytest.mark.parametrize("flags,words", [
    (["--epochs", "3"], "--epochs: train.epochs cannot change when a run is resumed (the one-cycle schedule is "
                        "fixed by the run's epochs"),
    (["--set", "augment.rotation=0"], "--set augment.rotation: augment.rotation cannot change when a run is "
                                      "resumed (it changes what the run computes"),
])
def test_a_resume_from_the_run_alone_refuses_what_would_change_it(run_copy, flags, words) -> None:
    ran = run_main("--resume", str(run_copy.run_dir), *flags)
    assert ran.returncode == 2 and words in one_error_line(ran.stderr), ran.stderr


def test_a_resume_from_the_run_alone_takes_what_a_resume_may_change(run_copy) -> None:
    """The latest run under --output-dir, with a safe --set and an unchanged --epochs: accepted (finished)."""
    ran = run_main("--resume", "--output-dir", str(run_copy.run_dir.parent), "--set", "eval.batch_size=7",
                   "--epochs", "2")
    assert ran.returncode == 0 and "finished" in ran.stdout, ran.stderr


def test_resume_on_other_data_is_refused(run_copy, tmp_path: Path) -> None:
    (run_copy.run_dir / "checkpoints" / "training_checkpoint_10.pt").unlink()  # unfinished again: from 5
    other = write_cifar100(tmp_path / "other", 80, 20, seed=99)
    ran = run_main("--config", str(run_copy.config), "--resume", str(run_copy.run_dir), "--data-root", str(other))
    assert ran.returncode == 1 and "not the data this run was trained on" in one_error_line(ran.stderr)


def test_divergence_stops_before_the_checkpoint_and_keeps_the_last_good_one(tmp_path: Path) -> None:
    """A real Engine, LossBuffer and Checkpoint: epoch 1 is fine, epoch 2's loss becomes NaN."""
    trainer = Engine(lambda e, _: torch.tensor(float("nan") if e.state.epoch == 2 else 1.0))
    LossBuffer(every=3, scheduled=lambda: {"lr": 0.1}).attach(trainer)
    model = torch.nn.Linear(2, 2)
    saver = Checkpoint({"model": model}, SaveThenRemove(tmp_path), n_saved=2,
                       global_step_transform=lambda e, _: e.state.epoch)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, saver)
    with pytest.raises(LossNotFinite, match="iteration 5"):
        trainer.run(range(4), max_epochs=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_1.pt"]


def test_diverging_run_exits_3_with_one_line_and_saves_nothing(tmp_path: Path, small_data: Path) -> None:
    cfg = run_config(tmp_path / "c.json", small_data, tmp_path / "runs")
    ran = run_main("--config", str(cfg), "--run-name", "nan", "--lr", "1e12")
    assert ran.returncode == 3
    assert "training loss became" in one_error_line(ran.stderr)
    assert training_checkpoints(tmp_path / "runs" / "nan" / "checkpoints") == []


def test_unwritable_output_folder_is_reported_before_training(tmp_path: Path, small_data: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = run_config(tmp_path / "c.json", small_data, tmp_path / "runs")
    ran = run_main("--config", str(cfg), "--output-dir", str(blocker / "runs"))
    assert ran.returncode == 1 and str(blocker) in one_error_line(ran.stderr)
    assert ran.stdout == ""  # no training started


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (60 * 2**20, 60 * 2**20))


@pytest.mark.slow
def test_failed_checkpoint_write_ends_the_run_and_keeps_earlier_checkpoints(run_copy) -> None:
    """A file-size limit below a checkpoint's size (a full disk, as the process sees it)."""
    checkpoints = run_copy.run_dir / "checkpoints"
    (checkpoints / "training_checkpoint_10.pt").unlink()  # the run as if killed during epoch 2
    kept = checkpoints / "training_checkpoint_5.pt"
    before = _digest(kept)
    result = run_app("--config", str(run_copy.config), "--resume", str(run_copy.run_dir),
                     preexec_fn=_limit_file_size)
    assert result.returncode == 1
    line = one_error_line(result.stderr)
    assert "cannot write checkpoint" in line and "training_checkpoint_10.pt" in line
    assert _digest(kept) == before
    assert not list(checkpoints.glob(".partial-*"))
    results = json.loads((run_copy.run_dir / "results.json").read_text())  # not "running" for ever
    assert results["status"] == "failed" and "training_checkpoint_10.pt: cannot write checkpoint" in results["error"]


@pytest.mark.slow
def test_when_one_process_dies_the_others_exit_promptly_and_one_line_names_it(tmp_path: Path) -> None:
    """SIGKILL to one of 2 spawned processes: the other and the launcher end within seconds (their
    bound here leaves room for a loaded machine; tests/peer_death_stress.py measures), exit 128 + 9,
    with one line naming the rank."""
    data = write_cifar100(tmp_path / "data", 960, 20)
    cfg = run_config(tmp_path / "c.json", data, tmp_path / "runs", train={"epochs": 5, "batch_size": 32})
    proc = start_app("--config", str(cfg), "--run-name", "d", "--nproc-per-node", "2", "--backend", "gloo",
                     env=app_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (tmp_path / "runs" / "d" / "tb").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    workers = sorted(c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes())  # by rank
    assert len(workers) == 2 and proc.poll() is None
    os.kill(workers[1], signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = proc.communicate(timeout=120)
    assert time.monotonic() - killed < 30
    assert proc.returncode == 128 + signal.SIGKILL
    assert one_error_line(stderr) == "error: the process of rank 1 died (SIGKILL); the run's other processes were " \
                                     "stopped"
    assert not Path(f"/proc/{workers[0]}").exists() or b"zombie" in Path(f"/proc/{workers[0]}/status").read_bytes()


def test_a_peer_that_died_is_told_from_a_live_one_and_from_a_later_process_with_its_pid() -> None:
    """What each process of a run watches its peers on the machine by (app/peers.py): a pid and the
    moment that process started."""
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    live, dying = subprocess.Popen(sleep), subprocess.Popen(sleep)
    try:
        watch = PeerWatch(0, {1: (live.pid, process_start_time(live.pid)),
                              2: (dying.pid, process_start_time(dying.pid))})
        assert watch.dead_peer() is None
        dying.kill()
        deadline = time.monotonic() + 10
        while watch.dead_peer() is None and time.monotonic() < deadline:  # a zombie until reaped: dead already
            time.sleep(0.01)
        assert watch.dead_peer() == (2, dying.pid) and dying.poll() is not None
        assert watch.dead_peer() == (2, dying.pid)  # and once reaped
        later = PeerWatch(0, {1: (live.pid, process_start_time(live.pid) - 1)})  # the same pid, another process
        assert later.dead_peer() == (1, live.pid)
    finally:
        live.kill()
        live.wait()


BLOCKED = textwrap.dedent("""
    import subprocess, sys, threading
    from app.peers import PeerWatch, process_start_time

    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    PeerWatch(0, {1: (peer.pid, process_start_time(peer.pid))}).watch()
    print(peer.pid, flush=True)
    threading.Event().wait()  # blocked, as in a collective whose peer is gone: only the watch can end it
""")


@pytest.mark.slow
def test_a_process_blocked_while_its_peer_dies_ends_within_seconds_naming_it() -> None:
    proc = subprocess.Popen([sys.executable, "-c", BLOCKED], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peer = int(proc.stdout.readline())
    os.kill(peer, signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_PEER_DIED and time.monotonic() - killed < GRACE_SECONDS + 2
    assert one_error_line(stderr) == f"error: the process of rank 1 (pid {peer}) died; this run's other processes " \
                                     f"stop too"


def test_newest_checkpoint_of_another_model_falls_back_to_the_newest_that_fits(run_copy) -> None:
    newest = run_copy.run_dir / "checkpoints" / "training_checkpoint_10.pt"
    ckpt = torch.load(newest, weights_only=True)
    ckpt["model"]["fc.weight"], ckpt["model"]["fc.bias"] = torch.zeros(10, 512), torch.zeros(10)
    torch.save(ckpt, newest)
    ran = run_main("--config", str(run_copy.config), "--resume", str(run_copy.run_dir))
    assert ran.returncode == 0, ran.stderr
    assert f"{newest}: not a checkpoint of this run's model" in ran.stderr
    assert "resuming from" in ran.stderr and "training_checkpoint_5.pt" in ran.stderr
    assert epochs_printed(ran.stdout) == ["2/2"]


def test_checkpoint_meta_that_does_not_fit_the_model_is_one_line(finished_run, tmp_path: Path) -> None:
    bad = tmp_path / "bad_meta.pt"
    ckpt = torch.load(finished_run.run_dir / "checkpoints" / "training_checkpoint_10.pt", weights_only=True)
    ckpt["meta"]["classes"] = json.dumps(["cat", "dog"])  # 2 names for a 100-class model
    torch.save(ckpt, bad)
    ran = run_main("evaluate", "--checkpoint", str(bad), "--device", "cpu")
    assert ran.returncode == 1 and f"{bad}: damaged meta (classes: 100 names expected)" in one_error_line(ran.stderr)


@pytest.mark.slow
def test_a_small_checkpoint_that_would_expand_to_gigabytes_is_refused_unread(tmp_path: Path) -> None:
    """A real torch.save file of 1.1 GiB of zeros, its zip entries deflated to about 1 MB: torch.load
    would take 1.6 GB of memory for it (measured). Refused by its declared size before anything is
    read, in a process that stays far smaller."""
    import shutil
    import zipfile

    raw, bomb = tmp_path / "raw.pt", tmp_path / "bomb.pt"
    torch.save({"model": torch.zeros(2**28 + 2**25)}, raw)
    with zipfile.ZipFile(raw) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            with src.open(info) as fin, dst.open(info.filename, "w", force_zip64=True) as fout:
                shutil.copyfileobj(fin, fout, 2**24)
    raw.unlink()
    assert bomb.stat().st_size < 3 * 2**20  # small on disk
    # VmHWM: this process image's peak resident memory (ru_maxrss would count the forking parent's)
    script = ("import sys; from pathlib import Path; from app.cli import main; code = main(sys.argv[1:]); "
              "print(next(line.split()[1] for line in Path('/proc/self/status').read_text().splitlines() "
              "if line.startswith('VmHWM')), file=sys.stderr); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", script, "evaluate", "--checkpoint", str(bomb), "--device", "cpu"],
                            cwd=ROOT, env=app_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    line, maxrss_kb = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {bomb}: refused, it would take 1.1 GiB in memory"), line
    assert int(maxrss_kb) < 800 * 1024
