"""Stop a short training run at a chosen moment, resume it, and compare everything it left with an
uninterrupted run of the same config: the final weights, results.json, every TensorBoard tag step for
step (values too, but for the wall-clock figures), metrics.csv row for row (but for its timing
columns), and the epoch lines and the summary's best line that the user saw.

The dimensions a user varies are a `Case`: processes (1, 2, 4), background checkpoint writes on or
off, the log interval (1, or longer than the run), the moment of the signal (start-up, a training
step, an evaluation, a checkpoint write, teardown), the signal (TERM to the launcher as a scheduler
sends it, INT to the process group as Ctrl-C does, HUP as a closed terminal, KILL to the group),
whether the run folder is moved before it is resumed, and whether every option of README's "Beyond the
recipe" is on (Mixup/CutMix, Cutout, label smoothing, the weights' EMA, whose weights are compared too).
It is resumed with `python -m app --resume RUN` alone (the run's own config), from another folder. A
graceful stop must end with 128+N and one line that says how to resume, with the checkpoint it names
complete and results.json saying interrupted at it (or, in teardown, that the run had finished);
SIGKILL only has to resume.

Moments are found from what the run shows: start-up and steps by the times an uninterrupted run of
the same process count took to print its first lines, an evaluation by a test set that takes most of
an epoch, a checkpoint write by its temporary file appearing, teardown by the last epoch line.

    python -m tests.crash_harness --all                  # every combination (60 cases)
    python -m tests.crash_harness --stress 100 --seed 1  # 100 random cases
Used by tests/test_crash_resume.py with a seeded sample.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from handlers.atomic import TEMP_PREFIX
from handlers.checkpoints import training_checkpoints
from tests.support import (answer_stop_signals, app_env, metrics_rows, run_lines, start_app, untimed, write_cifar100,
                           write_config)

MOMENTS = ("startup", "step", "evaluation", "checkpoint", "teardown")
SIGNALS = ("TERM", "INT", "HUP", "KILL")
N_TRAIN, N_TEST, BATCH, EPOCHS, EVAL_BATCH, EVERY_ITERS = 48, 160, 16, 2, 10, 2  # 3 iterations per epoch
WALL_CLOCK_TAGS = ("system/",)  # logged values that measure time, not the run
# Label smoothing, Mixup/CutMix, Cutout and the weights' EMA (picking the best model): what a resume must
# also restore exactly (the EMA's tensors, the mixes' draws from the augmentation generator).
OPTIONS = {"loss": {"label_smoothing": 0.1}, "augment": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "cutout": 8},
           "ema": {"decay": 0.9, "warmup_iters": 2, "buffers": "update", "select_best": "ema"}}


@dataclass(frozen=True)
class Case:
    nproc: int = 1
    background: bool = True
    log_every: int = 1
    moment: str = "step"
    signal: str = "TERM"
    move: bool = False
    options: bool = False  # every option of README's "Beyond the recipe" on (OPTIONS)

    @property
    def name(self) -> str:
        return (f"p{self.nproc}-{'bg' if self.background else 'fg'}-log{self.log_every}-{self.moment}-"
                f"{self.signal}{'-moved' if self.move else ''}{'-options' if self.options else ''}")


@dataclass
class Outcome:
    case: Case
    signalled: bool = False  # the signal reached a live run (else it had ended first: nothing tested)
    exit_code: Optional[int] = None
    stop_iteration: Optional[int] = None  # where the stop's checkpoint is (graceful stops)
    finished_at_stop: bool = False  # the stop came after the last step
    seconds_to_exit: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class Reference:
    run_dir: Path
    startup_seconds: float  # from the process's start to its "run" line
    epoch_seconds: float  # from the "run" line to the first epoch line
    stdout: str


def _config(work: Path, case: Case, data: Path) -> Path:
    return write_config(work / f"{case.name}.json", data={"root": str(data), "download": False},
                        train={"epochs": EPOCHS, "batch_size": BATCH}, eval={"batch_size": EVAL_BATCH},
                        checkpoint={"every_iters": EVERY_ITERS, "background_write": case.background},
                        logging={"output_dir": str(work / "runs"), "log_every_iters": case.log_every},
                        **(OPTIONS if case.options else {}))


def _start(args: list[str], nproc: int, cwd: Optional[Path] = None) -> subprocess.Popen:
    extra = ["--nproc-per-node", str(nproc), "--backend", "gloo"] if nproc > 1 else []
    # A session of its own: a signal to the group reaches the launcher and every process it spawned.
    return start_app(*args, *extra, env=app_env(OMP_NUM_THREADS="1"), start_new_session=True,
                     **({"cwd": cwd} if cwd else {}))


class Lines:
    """A process's output read by threads: stdout's lines with the time each came, and stderr."""

    def __init__(self, proc: subprocess.Popen) -> None:
        import threading

        self.proc = proc
        self.lines: list[tuple[float, str]] = []
        self._err: list[str] = []
        self._threads = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=lambda: self._err.extend(proc.stderr), daemon=True)]
        for t in self._threads:
            t.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    def first(self, prefix: str) -> Optional[float]:
        return next((t for t, line in list(self.lines) if untimed(line).startswith(prefix)), None)

    def wait(self, timeout: float) -> tuple[str, str]:
        """Stdout and stderr, once the process has ended."""
        self.proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=30)
        return "".join(line for _, line in self.lines), "".join(self._err)


def reference(work: Path, data: Path, nproc: int, options: bool = False) -> Reference:
    case = Case(nproc=nproc, options=options)
    cfg = _config(work, case, data)
    name = f"reference-{nproc}{'-options' if options else ''}"
    started = time.monotonic()
    proc = _start(["--config", str(cfg), "--run-name", name], nproc)
    lines = Lines(proc)
    stdout, err = lines.wait(timeout=900)
    assert proc.returncode == 0, err
    run_line, epoch_line = lines.first("run "), lines.first("epoch 1/")
    return Reference(work / "runs" / name, run_line - started, epoch_line - run_line, stdout)


def _wait(proc: subprocess.Popen, until, timeout: float = 300) -> bool:
    """Poll `until()` every few milliseconds while the process runs; whether it came true."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if until():
            return True
        time.sleep(0.002)
    return False


def _aim(proc: subprocess.Popen, lines: Lines, case: Case, ref: Reference, run_dir: Path,
         rng: random.Random, started: float) -> None:
    """Return at the case's moment (or when the process has ended)."""
    if case.moment == "startup":
        _wait(proc, lambda: time.monotonic() > started + rng.uniform(0.0, 0.9) * ref.startup_seconds)
        return
    if not _wait(proc, lambda: lines.first("run ") or lines.first("resuming ")):
        return
    begun = lines.first("run ") or lines.first("resuming ")
    if case.moment == "step":  # the first part of an epoch is its training steps
        _wait(proc, lambda: time.monotonic() > begun + rng.uniform(0.0, 0.3) * ref.epoch_seconds)
    elif case.moment == "evaluation":  # most of an epoch is its evaluation of N_TEST images
        _wait(proc, lambda: time.monotonic() > begun + rng.uniform(0.7, 0.95) * ref.epoch_seconds)
    elif case.moment == "checkpoint":
        folder = run_dir / "checkpoints"
        _wait(proc, lambda: any(p.name.startswith(TEMP_PREFIX) for p in _listing(folder)))
    elif case.moment == "teardown":
        _wait(proc, lambda: lines.first(f"epoch {EPOCHS}/{EPOCHS}"))


def _listing(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except FileNotFoundError:
        return []


def _signal(proc: subprocess.Popen, case: Case) -> None:
    signum = getattr(signal, f"SIG{case.signal}")
    if case.signal == "TERM":  # as a scheduler sends it: to the launcher only
        os.kill(proc.pid, signum)
    else:  # Ctrl-C, a closed terminal, a kill of the job: the whole process group
        os.killpg(proc.pid, signum)


def stop_and_resume(work: Path, data: Path, case: Case, ref: Reference, rng: random.Random, name: str) -> Outcome:
    """`name`: the run's folder (a case may come twice in a random sample)."""
    out = Outcome(case)
    cfg = _config(work, case, data)
    run_dir = work / "runs" / name
    started = time.monotonic()
    proc = _start(["--config", str(cfg), "--run-name", name], case.nproc)
    lines = Lines(proc)
    _aim(proc, lines, case, ref, run_dir, rng, started)
    if proc.poll() is None:
        out.signalled = True
        _signal(proc, case)
        signalled = time.monotonic()
    stdout, err = lines.wait(timeout=300)
    out.exit_code = proc.returncode
    if not out.signalled:
        out.problems.append(f"ended (exit {proc.returncode}) before the signal: {err.strip()[-300:]}")
        return out
    out.seconds_to_exit = time.monotonic() - signalled
    if case.signal != "KILL":
        _check_graceful_stop(out, err, run_dir)
    if case.move and run_dir.exists():
        moved = work / "runs" / f"{name}-moved"
        shutil.move(str(run_dir), moved)
        run_dir = moved
    # Resumed as the stop's line says, from the run alone (its own config), and from another folder.
    args = ["--resume", str(run_dir)] if (run_dir / "config.json").exists() else \
        ["--config", str(cfg), "--run-name", name]  # stopped before its folder existed: start afresh
    resumed = _start(args, case.nproc, cwd=work)
    more, err = resumed.communicate(timeout=900)
    if resumed.returncode != 0:
        out.problems.append(f"resume exit {resumed.returncode}: {err.strip()[-300:]}")
        return out
    _compare(out, ref, run_dir, stdout + more, graceful=case.signal != "KILL")
    return out


def _check_graceful_stop(out: Outcome, err: str, run_dir: Path) -> None:
    signum = getattr(signal, f"SIG{out.case.signal}")
    if out.exit_code != 128 + signum:
        out.problems.append(f"exit {out.exit_code}, not {128 + signum}: {err.strip()[-300:]}")
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    if len(lines) != 1 or "Traceback" in err:
        out.problems.append(f"not one line: {err.strip()[-500:]}")
        return
    line = lines[0]
    if "nothing is left to resume" in line:
        out.finished_at_stop = True
        results = _results(run_dir)
        if results.get("status") != "finished":
            out.problems.append(f"stopped as it ended, but results.json says {results.get('status')}")
        return
    m = re.search(r"after iteration (\d+) .*continue with python -m app --resume (\S+)$", line)
    if not m:
        out.problems.append(f"the line does not say how to resume: {line}")
        return
    out.stop_iteration = int(m.group(1))
    if Path(m.group(2)) != run_dir:
        out.problems.append(f"the line names {m.group(2)}, not {run_dir}")
    checkpoint = run_dir / "checkpoints" / f"training_checkpoint_{out.stop_iteration}.pt"
    if not checkpoint.is_file():
        out.problems.append(f"the stop's checkpoint {checkpoint.name} is not on disk")
    leftovers = [p.name for p in _listing(run_dir / "checkpoints") + _listing(run_dir)
                 if p.name.startswith(TEMP_PREFIX)]
    if leftovers:
        out.problems.append(f"half-written files left: {leftovers}")
    results = _results(run_dir)
    epoch_length = N_TRAIN // BATCH
    expected = ("interrupted", out.stop_iteration, out.stop_iteration // epoch_length)
    if (results.get("status"), results.get("iterations"), results.get("epochs")) != expected:
        out.problems.append(f"results.json {results} is not {expected}")


def _results(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "results.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The newest training checkpoint's model and, where the run has one, its weights' EMA (and update count)."""
    ckpt = torch.load(training_checkpoints(run_dir / "checkpoints")[0], map_location="cpu", weights_only=True)
    weights = dict(ckpt["model"])
    if "ema" in ckpt:
        weights.update({f"ema.{k}": v for k, v in ckpt["ema"]["model"].items()})
        weights["ema.updates"] = ckpt["ema"]["updates"]
    return weights


def tensorboard_log(run_dir: Path) -> dict[str, list]:
    """Every tag of both TensorBoard runs: (step, value) of scalars (steps only for wall-clock figures),
    steps of images, histograms and texts; as TensorBoard's reader shows them (a resume's purge applied)."""
    log: dict[str, list] = {}
    for run in ("train", "validation"):
        acc = EventAccumulator(str(run_dir / "tb" / run), size_guidance={"images": 0, "histograms": 0, "tensors": 0})
        acc.Reload()
        tags = acc.Tags()
        for tag in tags["scalars"]:
            wall = tag.startswith(WALL_CLOCK_TAGS)
            log[f"{run}:{tag}"] = [e.step if wall else (e.step, e.value) for e in acc.Scalars(tag)]
        for kind, read in (("images", acc.Images), ("histograms", acc.Histograms), ("tensors", acc.Tensors)):
            for tag in tags[kind]:
                log[f"{run}:{kind}:{tag}"] = [e.step for e in read(tag)]
    return log


def epoch_lines(stdout: str) -> dict[str, list[str]]:
    """The epoch lines printed, without their times: epoch -> every time it was printed."""
    printed: dict[str, list[str]] = {}
    for line in run_lines(stdout):
        if line.startswith("epoch "):
            epoch, rest = line.split()[1], line.split("train loss")[1].split()[0]
            printed.setdefault(epoch, []).append(line.split("  train loss")[0] + f" train loss {rest}")
    return printed


def best_lines(stdout: str) -> list[str]:
    """The summary's line of the best and final top-1, each time a run printed it."""
    return [line for line in run_lines(stdout) if line.startswith("best top-1 ")]


def _compare(out: Outcome, reference_run: Reference, run_dir: Path, stdout: str, graceful: bool) -> None:
    ref_dir = reference_run.run_dir
    ref, got = _final_weights(ref_dir), _final_weights(run_dir)
    if ref.keys() != got.keys() or not all(torch.equal(ref[k], got[k]) for k in ref):
        out.problems.append("final weights differ from the uninterrupted run's")
    a, b = _results(ref_dir), _results(run_dir)
    for key in ("status", "best", "final", "epochs", "iterations"):
        if a.get(key) != b.get(key):
            out.problems.append(f"results.json {key}: {b.get(key)} != {a.get(key)}")
    ref_log, log = tensorboard_log(ref_dir), tensorboard_log(run_dir)
    for tag in sorted(set(ref_log) | set(log)):
        if ref_log.get(tag) != log.get(tag):
            out.problems.append(f"TensorBoard {tag}: {str(log.get(tag))[:200]} != {str(ref_log.get(tag))[:200]}")
    ref_rows, rows = metrics_rows(ref_dir), metrics_rows(run_dir)
    if rows != ref_rows:
        out.problems.append(f"metrics.csv {str(rows)[:300]} != {str(ref_rows)[:300]}")
    ref_best, best = best_lines(reference_run.stdout), best_lines(stdout)
    if best != ref_best:
        out.problems.append(f"the summary's best line {best} != {ref_best}")
    ref_lines, printed = epoch_lines(reference_run.stdout), epoch_lines(stdout)
    if graceful and any(len(v) > 1 for v in printed.values()):
        out.problems.append(f"an epoch printed twice: {printed}")
    if {k: v[-1] for k, v in printed.items()} != {k: v[-1] for k, v in ref_lines.items()}:
        out.problems.append(f"epoch lines {printed} != {ref_lines}")


def all_cases() -> list[Case]:
    """Every combination of processes x background writes x log interval x moment, each with one of the
    graceful signals in turn."""
    grid = itertools.product((1, 2, 4), (True, False), (1, 50), MOMENTS)
    return [Case(n, bg, log, moment, SIGNALS[i % 3]) for i, (n, bg, log, moment) in enumerate(grid)]


def random_cases(n: int, rng: random.Random) -> list[Case]:
    return [Case(rng.choice((1, 2, 4)), rng.random() < 0.5, rng.choice((1, 50)), rng.choice(MOMENTS),
                 rng.choice(SIGNALS), rng.random() < 0.3, rng.random() < 0.3) for _ in range(n)]


def run_cases(work: Path, cases: list[Case], seed: int = 0, report=None) -> list[Outcome]:
    data = write_cifar100(work / "data", N_TRAIN, N_TEST, seed=seed)
    rng = random.Random(seed)
    refs: dict[tuple[int, bool], Reference] = {}
    outcomes = []
    for i, case in enumerate(cases):
        key = case.nproc, case.options
        if key not in refs:
            refs[key] = reference(work, data, *key)
        outcome = stop_and_resume(work, data, case, refs[key], rng, f"{i:03d}-{case.name}")
        outcomes.append(outcome)
        if report is not None:
            report(outcome)
    return outcomes


def summary(outcomes: list[Outcome]) -> dict:
    """Stops tried and survived, per dimension."""
    table: dict = {}
    for dim in ("nproc", "background", "log_every", "moment", "signal", "move", "options"):
        counts: dict = {}
        for o in outcomes:
            if not o.signalled and o.ok:
                continue
            value = str(getattr(o.case, dim))
            tried, survived = counts.get(value, (0, 0))
            counts[value] = (tried + 1, survived + o.ok)
        table[dim] = {k: f"{s}/{t}" for k, (t, s) in sorted(counts.items())}
    stopped_at = Counter(f"{o.case.moment}:{'end' if o.finished_at_stop else o.stop_iteration}"
                         for o in outcomes if o.signalled and o.case.signal != "KILL")
    table["stop iterations by moment"] = dict(sorted(stopped_at.items()))
    table["slowest stop (s)"] = round(max((o.seconds_to_exit for o in outcomes), default=0.0), 1)
    return table


def main() -> None:
    import tempfile

    answer_stop_signals()  # started in the background (SIGINT ignored), its INT cases would test nothing

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--all", action="store_true", help="every combination of the dimensions but the signal")
    p.add_argument("--stress", type=int, default=0, help="this many random cases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="a JSON file for every outcome and the summary")
    args = p.parse_args()
    cases = all_cases() if args.all else random_cases(args.stress or 10, random.Random(args.seed))

    def report(o: Outcome) -> None:
        print(("ok  " if o.ok else "FAIL") + f" {o.case.name}: exit {o.exit_code}, stop at "
              f"{'end' if o.finished_at_stop else o.stop_iteration}, {o.seconds_to_exit:.1f} s"
              + "".join(f"\n      {p}" for p in o.problems), flush=True)

    with tempfile.TemporaryDirectory() as work:
        outcomes = run_cases(Path(work), cases, args.seed, report)
    table = summary(outcomes)
    print(json.dumps(table, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": table, "outcomes": [
            {**asdict(o), "ok": o.ok} for o in outcomes]}, indent=1, default=str))
    sys.exit(0 if all(o.ok for o in outcomes) else 1)


if __name__ == "__main__":
    main()
