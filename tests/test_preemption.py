"""SIGTERM and SIGINT, what schedulers and Ctrl-C send before they kill: the run saves a checkpoint of its
last step, marks results.json interrupted, says how to resume, exits 143 or 130, and resumed it ends as
an uninterrupted run would (CPU, bit for bit)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from ignite.engine import Engine, Events

from handlers.preemption import GracefulStop, StopEvents, TrainingInterrupted
from tests.support import ROOT, app_env, one_error_line, start_app, wait_for_line, write_cifar100, write_config


def test_a_stop_signal_the_process_was_started_with_ignored_stays_ignored() -> None:
    """nohup's SIGHUP (and a background job's SIGINT): GracefulStop takes only the others, and leaves the
    ignored one ignored after it too."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        stop = GracefulStop()
        try:
            assert signal.SIGHUP not in stop.signals and signal.SIGTERM in stop.signals
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.01)
            assert stop.signum is None
        finally:
            stop.restore()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


@pytest.mark.slow
def test_a_run_started_as_nohup_starts_it_outlives_the_hangup(tmp_path: Path) -> None:
    """SIGHUP to the whole group, in start-up and again once the run trains: ignored (the run was
    started with it ignored, as `nohup` starts a command), and the run finishes as if nothing came."""
    data = write_cifar100(tmp_path / "data", 64, 10)
    cfg = write_config(tmp_path / "c.json", data={"root": str(data), "download": False},
                       train={"epochs": 2, "batch_size": 32}, eval={"batch_size": 10},
                       logging={"output_dir": str(tmp_path / "runs")})
    proc = start_app("--config", str(cfg), "--run-name", "r", env=app_env(OMP_NUM_THREADS="1"),
                     start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGHUP)  # start-up
    out = wait_for_line(proc, "run ")
    os.killpg(proc.pid, signal.SIGHUP)  # training
    rest, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert json.loads((tmp_path / "runs" / "r" / "results.json").read_text())["status"] == "finished"
    assert "finished 2 epochs" in "".join(out) + rest


def test_a_stop_saves_the_last_completed_step_before_the_schedule_moves() -> None:
    """A real Engine: SIGTERM arrives during step 3; step 3 completes, step 4 does not start, the stop
    event sees iteration 3, and a handler attached after the stop (the lr scheduler's place) never
    sees step 4."""
    started, at_stop = [], []

    def step(engine, _):
        if engine.state.iteration == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer = Engine(step)
    stop = GracefulStop().attach(trainer)
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: started.append(e.state.iteration))
    trainer.add_event_handler(StopEvents.STOP_REQUESTED, lambda e: at_stop.append(e.state.iteration))
    try:
        with pytest.raises(TrainingInterrupted) as e:
            trainer.run(range(5), max_epochs=2)
    finally:
        stop.restore()
    assert (e.value.iteration, e.value.epoch, e.value.exit_code) == (3, 1, 143)
    assert started == [1, 2, 3] and at_stop == [3]


@pytest.mark.slow
def test_a_second_signal_during_the_save_stops_at_once(tmp_path: Path) -> None:
    """The user insisting: the process dies of the second signal in the middle of the (slow) save."""
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from ignite.engine import Engine
        from handlers.preemption import GracefulStop, StopEvents

        def slow_save(engine):
            open({str(tmp_path / "save-started")!r}, "w").close()
            time.sleep(30)
            open({str(tmp_path / "saved")!r}, "w").close()

        trainer = Engine(lambda e, b: os.kill(os.getpid(), signal.SIGTERM) if e.state.iteration == 2 else None)
        GracefulStop().attach(trainer)
        trainer.add_event_handler(StopEvents.STOP_REQUESTED, slow_save)
        trainer.run(range(10))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not (tmp_path / "save-started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.2)  # past the second within which a repeated signal is the same request
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == -signal.SIGTERM and time.monotonic() - started < 5
    assert not (tmp_path / "saved").exists()


def _run_and_signal(args: list[str], signum: int, after_line: str, *, group: bool) -> subprocess.CompletedProcess:
    proc = start_app(*args, env=app_env(OMP_NUM_THREADS="1"), start_new_session=True)
    out = wait_for_line(proc, after_line)
    (os.killpg if group else os.kill)(proc.pid, signum)
    signalled = time.monotonic()
    rest, err = proc.communicate(timeout=120)
    assert time.monotonic() - signalled < 60
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(out) + rest, err)


@pytest.mark.slow
@pytest.mark.parametrize("signum,code,nproc,group", [(signal.SIGINT, 130, 1, True), (signal.SIGTERM, 143, 2, False)],
                         ids=["SIGINT to the process group", "SIGTERM to the launcher of 2 processes"])
def test_interrupted_run_saves_marks_and_says_how_to_resume(tmp_path: Path, signum, code, nproc, group) -> None:
    data = write_cifar100(tmp_path / "data", 192, 20)
    cfg = write_config(tmp_path / "c.json", data={"root": str(data), "download": False},
                       train={"epochs": 4, "batch_size": 32}, eval={"batch_size": 10},
                       logging={"output_dir": str(tmp_path / "runs"), "log_every_iters": 1})
    extra = ["--nproc-per-node", "2", "--backend", "gloo"] if nproc > 1 else []
    result = _run_and_signal(["--config", str(cfg), "--run-name", "r", *extra], signum, "epoch 1/4", group=group)
    run_dir = tmp_path / "runs" / "r"
    assert result.returncode == code, result.stderr
    line = one_error_line(result.stderr)
    iteration = int(line.split("after iteration ")[1].split()[0])
    assert line.startswith(f"interrupted by {signal.Signals(signum).name} after iteration {iteration}")
    assert line.endswith(f"continue with python -m app --resume {run_dir}")
    assert (run_dir / "checkpoints" / f"training_checkpoint_{iteration}.pt").exists()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "interrupted" and results["iterations"] == iteration
