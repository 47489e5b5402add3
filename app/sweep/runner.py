"""Running a sweep on this machine: each run an ordinary `python -m app` process, K at a time per device.

The command for a run is the one `--print-commands` prints (status.py `next_command`): a new run starts from its
config file, a started one resumes from its folder, a finished one is skipped; so a sweep that was
killed and is started again with `sweep --resume` trains no finished run again, and continues each
stopped one from its last checkpoint. A run that fails is reported
(its exit code and the one line the app printed) and the others go on. SIGTERM and SIGINT are passed on
to the runs, which stop gracefully with a checkpoint; a run whose sweep dies without passing anything on
(SIGKILL) gets SIGTERM from the kernel (PR_SET_PDEATHSIG, on Linux), so it does not train on unwatched.

Each run's output goes to SWEEP/logs/NAME.log; the terminal shows one line per run.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

from app.errors import ConfigError
from app.runs import RunInUse, RunLock, lock_run_dir
from app.sweep.plan import PlannedRun, SweepPlan
from app.sweep.status import next_command, read_results, record_outcome, run_status
from app.sweep.summary import points_table, write_summary

PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Slot:
    """A place to run one run: a device (`--device` for the app) and the environment that picks it."""

    label: str  # "cuda:0", "cpu"
    device: str  # "cuda" or "cpu"
    env: dict[str, str]


def device_slots(devices: Optional[str], per_device: int, gpu_count: int, cpu_count: int,
                 visible: Optional[str] = None) -> list[Slot]:
    """K slots per device of --devices ("0,1", "cpu"; default every GPU, else the CPU). GPU numbers are
    those this process sees: with CUDA_VISIBLE_DEVICES=2,3 (`visible`), GPU 0 is the machine's GPU 2,
    and that is what a run is given. On the CPU the K runs share its cores (OMP_NUM_THREADS, unless set
    already)."""
    if per_device < 1:
        raise ConfigError(f"--per-device {per_device}: must be >= 1")
    if devices is None:
        devices = ",".join(map(str, range(gpu_count))) if gpu_count else "cpu"
    if devices.strip() == "cpu":
        threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, cpu_count // per_device))
        return [Slot("cpu", "cpu", {"OMP_NUM_THREADS": threads}) for _ in range(per_device)]
    indices = []
    for part in devices.split(","):
        if not part.strip().isdigit():
            raise ConfigError(f"--devices {devices}: expected GPU numbers like 0,1 or cpu")
        index = int(part)
        if index >= gpu_count:
            where = f"only {gpu_count} GPUs here" if gpu_count else "no CUDA GPU here (use --devices cpu)"
            raise ConfigError(f"--devices {devices}: no GPU {index}, {where}")
        if index in indices:
            raise ConfigError(f"--devices {devices}: GPU {index} is given twice")
        indices.append(index)
    seen = [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(gpu_count)]
    # Interleaved: with fewer runs than slots, every GPU gets one before any gets two.
    return [Slot(f"cuda:{i}", "cuda", {"CUDA_VISIBLE_DEVICES": seen[i]}) for _ in range(per_device) for i in indices]


def _die_with_parent(parent: int) -> Callable[[], None]:
    def preexec() -> None:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (AttributeError, OSError):  # not Linux: the run outlives a killed sweep
            return
        if os.getppid() != parent:  # the sweep died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
    return preexec


def last_line(log: Path, since: int) -> str:
    """The last non-empty line the run wrote (the app's one-line error), from byte `since` on."""
    try:
        with open(log, "rb") as f:
            f.seek(since)
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


@dataclass
class Active:
    run: PlannedRun
    slot: Slot
    proc: subprocess.Popen
    log: Path
    log_start: int
    started: float = field(default_factory=time.monotonic)


class Board:
    """One line per run: on a terminal redrawn in place, elsewhere printed when it changes."""

    def __init__(self, names: list[str], stream: TextIO) -> None:
        self.names, self.stream = names, stream
        # Redrawn only if it fits: the cursor cannot move above the top of the terminal.
        self.tty = stream.isatty() and len(names) < shutil.get_terminal_size().lines
        self.lines = {n: f"{n}: waiting" for n in names}
        self.drawn = 0

    def set(self, name: str, text: str) -> None:
        line = f"{name}: {text}"
        if line == self.lines[name]:
            return
        self.lines[name] = line
        if not self.tty:
            print(line, file=self.stream, flush=True)
        else:
            self.redraw()

    def redraw(self) -> None:
        up = f"\x1b[{self.drawn}F" if self.drawn else ""
        self.stream.write(up + "".join(f"\x1b[2K{self.lines[n]}\n" for n in self.names))
        self.stream.flush()
        self.drawn = len(self.names)

    def note(self, text: str) -> None:
        """A line outside the board (above it, on a terminal)."""
        if self.tty and self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0
        print(text, file=self.stream, flush=True)
        if self.tty:
            self.redraw()


def _progress(run_dir: Path) -> str:
    """', epoch 3/100, best top-1 41.20%': the epochs evaluated so far."""
    results = read_results(run_dir)
    if not results or not results.get("best") or not results.get("final"):
        return ""
    return (f", epoch {results['final'].get('epoch')}/{results.get('max_epochs')}, "
            f"best top-1 {100 * results['best']['top1']:.2f}%")


class SweepRunner:
    def __init__(self, plan: SweepPlan, slots: list[Slot], stream: Optional[TextIO] = None,
                 poll: float = 0.5) -> None:
        self.plan, self.slots, self.poll = plan, slots, poll
        self.board = Board([r.name for r in plan.runs], stream or sys.stdout)
        self.stop_signal: Optional[int] = None
        self.active: list[Active] = []
        self.failed: list[str] = []

    def run(self) -> int:
        """Run every unfinished run; 0 if none failed, 1 if any did, 128+N if stopped by signal N. (A run
        that another process is training is skipped, and said so.)"""
        lock = lock_sweep(self.plan)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            write_summary(self.plan)
            pending = [r for r in self.plan.runs if self._wants_to_run(r)]
            while pending or self.active:
                while pending and self.stop_signal is None and len(self.active) < len(self.slots):
                    self._start(pending.pop(0))
                for a in list(self.active):
                    if a.proc.poll() is not None:
                        self._ended(a)
                    else:
                        progress = _progress(a.run.run_dir(self.plan.sweep_dir))
                        self.board.set(a.run.name, f"running on {a.slot.label}{progress}")
                if self.stop_signal is not None and not self.active:
                    break
                time.sleep(self.poll)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            for a in self.active:  # an error in the sweep itself: its runs stop with a checkpoint
                a.proc.send_signal(signal.SIGTERM)
                a.proc.wait()
            lock.release()
        summary = write_summary(self.plan)
        c = summary["counts"]
        self.board.note("\n".join(["", *points_table(summary), ""]))
        self.board.note(f"{self.plan.sweep_dir}: {c['finished']} of {len(self.plan.runs)} runs finished"
                        + (f", {len(self.failed)} failed ({', '.join(self.failed)})" if self.failed else "")
                        + f"; table in {self.plan.sweep_dir / 'summary.md'}")
        if self.stop_signal is not None:
            self.board.note(f"stopped by {signal.Signals(self.stop_signal).name}: continue with "
                            f"python -m app sweep --resume {self.plan.sweep_dir}")
            return 128 + self.stop_signal
        return 1 if self.failed else 0

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_signal = signum
        for a in self.active:
            if a.proc.poll() is None:
                a.proc.send_signal(signum)

    def _wants_to_run(self, run: PlannedRun) -> bool:
        run_dir = run.run_dir(self.plan.sweep_dir)
        status = run_status(run_dir)
        if status == "finished":
            self.board.set(run.name, f"finished earlier{_progress(run_dir)}")
            return False
        if status == "running":
            self.board.set(run.name, "skipped: running in another process")
            return False
        return True

    def _start(self, run: PlannedRun) -> None:
        slot = next(s for s in self.slots if all(a.slot is not s for a in self.active))
        if not self._wants_to_run(run):  # finished, or taken by another process, since the sweep began
            return
        command = next_command(self.plan, run, sys.executable)
        log = self.plan.sweep_dir / "logs" / f"{run.name}.log"
        env = {**os.environ, **slot.env, "PYTHONUNBUFFERED": "1"}
        argv = [*command, "--device", slot.device]
        with open(log, "ab") as f:
            f.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} on {slot.label}: {' '.join(argv)}\n".encode())
            start = f.tell()
            proc = subprocess.Popen(argv, cwd=self.plan.workdir, env=env, stdin=subprocess.DEVNULL, stdout=f,
                                    stderr=subprocess.STDOUT, preexec_fn=_die_with_parent(os.getpid()))
        self.active.append(Active(run, slot, proc, log, start))
        if self.stop_signal is not None:  # it came while this run was being started
            proc.send_signal(self.stop_signal)
        self.board.set(run.name, f"running on {slot.label}")

    def _ended(self, a: Active) -> None:
        self.active.remove(a)
        code = a.proc.returncode
        run_dir = a.run.run_dir(self.plan.sweep_dir)
        seconds = time.monotonic() - a.started
        results = read_results(run_dir)
        if code == 0 and results is not None and results.get("status") == "finished":
            record_outcome(self.plan.sweep_dir, a.run.name, None)
            self.board.set(a.run.name, f"done{_progress(run_dir)}, {seconds:.0f} s")
        elif self.stop_signal is not None and code in (128 + self.stop_signal, -self.stop_signal):
            saved = results is not None and results.get("status") == "interrupted"
            self.board.set(a.run.name, f"stopped with a checkpoint{_progress(run_dir)}" if saved else
                           "stopped before its first checkpoint")
        elif code == RunInUse.exit_code and "in use by" in last_line(a.log, a.log_start):
            self.board.set(a.run.name, "skipped: running in another process")  # it took the run first
        else:
            error = last_line(a.log, a.log_start) or "(no output)"
            code = 128 - code if code < 0 else code  # killed by a signal: as a shell reports it
            record_outcome(self.plan.sweep_dir, a.run.name, {"exit_code": code, "error": error,
                                                              "at": time.strftime("%Y-%m-%d %H:%M:%S")})
            self.failed.append(a.run.name)
            self.board.set(a.run.name, f"failed (exit {code}): {error} [log: {a.log}]")
        write_summary(self.plan)


def lock_sweep(plan: SweepPlan) -> RunLock:
    """The sweep folder's lock, as a run folder's (app/runs.py), or RunInUse (exit 2) naming its holder."""
    try:
        return lock_run_dir(plan.sweep_dir)
    except RunInUse as e:
        raise RunInUse(str(e).split(";")[0] + "; another sweep is running these runs") from None


def check_not_running(plan: SweepPlan) -> None:
    """--resume: refuse early, before the data is checked, a sweep another sweep process is running."""
    lock_sweep(plan).release()
