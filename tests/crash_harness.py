"""Kill a training run at seeded random moments, resume it each time, and compare its final weights
with an uninterrupted run of the same config.

The kill is SIGKILL by default; with `--signal TERM` or `INT` it is the signal a scheduler or Ctrl-C
sends, which the run answers by saving a checkpoint of its last step and exiting 143 or 130 (checked
at every kill). Used by tests/test_crash_resume.py with a few kill points; run by hand for more:

    python -m tests.crash_harness --kills 20 [--every-iters 4] [--nproc 2] [--signal TERM]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from app.loader import iterations_per_epoch
from tests.support import app_env, start_app, write_cifar100, write_config


@dataclass
class CrashReport:
    kill_points_tried: int
    kills: int  # kill points at which the process was still running
    resumes_completed: int
    identical_weights: bool
    same_metrics: bool
    exit_codes: list[int]  # of the processes that got the signal


def _config(path: Path, data: Path, out: Path, every_iters: int, epochs: int, batch: int) -> Path:
    return write_config(path, data={"root": str(data), "download": False},
                        train={"epochs": epochs, "batch_size": batch}, eval={"batch_size": 20},
                        checkpoint={"every_iters": every_iters}, logging={"output_dir": str(out), "log_every_iters": 2})


def _start(args: list[str], nproc: int) -> subprocess.Popen:
    extra = ["--nproc-per-node", str(nproc), "--backend", "gloo"] if nproc > 1 else []
    # A new session, so that SIGKILL reaches the launcher and every process it spawned.
    return start_app(*args, *extra, env=app_env(OMP_NUM_THREADS=str(max(1, 2 // nproc))), start_new_session=True)


def _wait_for_training(proc: subprocess.Popen) -> tuple[float, int]:
    """Block until the process says it starts training ("run ..." or "resuming ... iteration N");
    returns the time and the iteration it starts from. Measured live, so a slow start under load
    does not eat the kill window."""
    for line in proc.stdout:
        if line.startswith("run "):
            return time.monotonic(), 0
        if line.startswith("resuming "):
            return time.monotonic(), int(line.rsplit("iteration ", 1)[1].rstrip(")\n"))
    return time.monotonic(), -1  # ended before training (it printed nothing more)


def _final(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    newest = max((run_dir / "checkpoints").glob("training_checkpoint_*.pt"),
                 key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    model = torch.load(newest, map_location="cpu", weights_only=True)["model"]
    return model, json.loads((run_dir / "results.json").read_text())["final"]


def crash_resume(work: Path, *, kills: int, seed: int = 0, every_iters: int = 0, nproc: int = 1,
                 n_train: int = 64, epochs: int = 3, batch: int = 16, sig: int = signal.SIGKILL) -> CrashReport:
    data = write_cifar100(work / "data", n_train, 40, seed=seed)
    cfg = _config(work / "config.json", data, work / "runs", every_iters, epochs, batch)

    ref = _start(["--config", str(cfg), "--run-name", "reference"], nproc)
    training_started, _ = _wait_for_training(ref)
    _, err = ref.communicate(timeout=900)
    assert ref.returncode == 0, err
    total_iters = epochs * iterations_per_epoch(n_train, batch, nproc)
    per_iteration = (time.monotonic() - training_started) / total_iters

    rng = random.Random(seed)
    tried = done_kills = resumes = 0
    exit_codes: list[int] = []
    args = ["--config", str(cfg), "--run-name", "crashed"]
    while True:
        proc = _start(args, nproc)
        if tried < kills:
            tried += 1
            # Kill somewhere in the first 80% of what is left to train (an iteration, an evaluation,
            # a checkpoint write): every resume gets somewhere, and the kills hit the training itself.
            started, iteration = _wait_for_training(proc)
            deadline = started + rng.uniform(0.0, 0.8) * per_iteration * (total_iters - max(iteration, 0))
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if proc.poll() is None:
                os.killpg(proc.pid, sig)
                _, err = proc.communicate(timeout=120)
                exit_codes.append(proc.returncode)
                if sig != signal.SIGKILL:  # a graceful stop, unless it had just finished
                    assert proc.returncode in (0, 128 + sig), (proc.returncode, err)
                    if proc.returncode == 0:
                        break
                done_kills += 1
                args = ["--config", str(cfg), "--resume", str(work / "runs" / "crashed")]
                if (work / "runs" / "crashed" / "config.json").exists():
                    resumes += 1
                else:  # killed before the run folder existed: start it afresh
                    args = ["--config", str(cfg), "--run-name", "crashed"]
                continue
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err
        break

    ref_model, ref_metrics = _final(work / "runs" / "reference")
    model, metrics = _final(work / "runs" / "crashed")
    identical = ref_model.keys() == model.keys() and all(torch.equal(ref_model[k], model[k]) for k in ref_model)
    return CrashReport(tried, done_kills, resumes, identical, metrics == ref_metrics, exit_codes)


def main() -> None:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every-iters", type=int, default=0)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--n-train", type=int, default=64, help="training images (batch 16)")
    p.add_argument("--signal", choices=["KILL", "TERM", "INT"], default="KILL")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as work:
        report = crash_resume(Path(work), kills=args.kills, seed=args.seed, every_iters=args.every_iters,
                              nproc=args.nproc, epochs=args.epochs, n_train=args.n_train,
                              sig=getattr(signal, f"SIG{args.signal}"))
    print(json.dumps(report.__dict__))


if __name__ == "__main__":
    main()
