"""Running a sweep on this machine: each run an ordinary `python -m app` process, K at a time per device.

The command for a run is the one `--print-commands` prints (status.py `next_command`): a new run starts from its
config file, a started one resumes from its folder, a finished one is skipped; so a sweep that was
killed and is started again with `sweep --resume` trains no finished run again, and continues each
stopped one from its last checkpoint. How a run ended is its results.json's to say (status.py): a run
that fails is reported (its reason, and exit code) and the others go on; one killed by a signal is
stopped, not failed, and resumes. SIGTERM and SIGINT are passed on to the runs, which stop gracefully
with a checkpoint; SIGHUP (the terminal closed) is taken as SIGTERM, and SIGTERM is what the runs get.
The sweep then rewrites its table, says how to continue, and exits 128 + N. A run whose sweep dies
without passing anything on (SIGKILL) gets SIGTERM from the kernel (PR_SET_PDEATHSIG, on Linux), so it
does not train on unwatched.

Each run's output goes to SWEEP/logs/NAME.log; the terminal shows one line per run (and once the
terminal has gone, nothing: the sweep goes on, or stops, as it would).
"""
from __future__ import annotations

import ctypes
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TextIO

from app.errors import ConfigError, UserError
from app.runs import RunInUse, RunLock, lock_run_dir
from app.sweep.plan import PlannedRun, SweepPlan
from app.sweep.status import end_record, next_command, read_results, record_outcome, run_state, run_status, signal_of
from app.sweep.summary import points_table, write_summary
from handlers.stop_signals import answered_stop_signals

PR_SET_PDEATHSIG = 1
# The signals that stop a sweep, and what its runs are sent for each: a closed terminal's SIGHUP asks
# for the same graceful stop as SIGTERM (the app takes SIGHUP so too, but SIGTERM is its long-standing one).
STOP_SIGNALS = {signal.SIGTERM: signal.SIGTERM, signal.SIGINT: signal.SIGINT, signal.SIGHUP: signal.SIGTERM}


class SweepStopped(UserError):
    """A stop signal while the sweep folder was being created: nothing half-made is left. Exit 128 + N."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequests:
    """The sweep's stop signals, from creation to the end of its runs: each is noted (and passed to
    `on_stop`), and acted on where the sweep can stop cleanly, not wherever the signal lands. They are
    unblocked while taken (the app's entry point may hold them blocked, app/__main__.py), and the
    handlers and mask from before are put back at the end. One the sweep was started with ignored (nohup's
    SIGHUP) stays ignored, for the sweep and its runs (handlers/stop_signals.py)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.on_stop: Callable[[int], None] = lambda _signum: None

    def __enter__(self) -> "StopRequests":
        self._previous = {s: signal.signal(s, self._on_signal) for s in answered_stop_signals()}
        self._mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, list(STOP_SIGNALS))
        return self

    def __exit__(self, *_exc: Any) -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        self.on_stop(signum)

    def check_creation(self, sweep_dir: Path) -> None:
        """Raise SweepStopped if a stop was asked for (plan.py `create_sweep` asks between files)."""
        if self.signum is not None:
            raise SweepStopped(f"{sweep_dir}: not created, stopped by {signal.Signals(self.signum).name} while "
                               f"its files were being written", self.signum)


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
        self.gone = False  # the terminal has gone (closed, hung up): nothing more is written
        # Redrawn only if it fits: the cursor cannot move above the top of the terminal.
        self.tty = stream.isatty() and len(names) < shutil.get_terminal_size().lines
        self.lines = {n: f"{n}: waiting" for n in names}
        self.drawn = 0

    def set(self, name: str, text: str) -> None:
        line = f"{name}: {text}"
        if line == self.lines[name]:
            return
        self.lines[name] = line
        self._write(line + "\n" if not self.tty else self._drawing())

    def _drawing(self) -> str:
        up = f"\x1b[{self.drawn}F" if self.drawn else ""
        self.drawn = len(self.names)
        return up + "".join(f"\x1b[2K{self.lines[n]}\n" for n in self.names)

    def note(self, text: str) -> None:
        """A line outside the board (above it, on a terminal)."""
        clear = ""
        if self.tty and self.drawn:
            clear, self.drawn = f"\x1b[{self.drawn}F\x1b[J", 0
        self._write(clear + text + "\n" + (self._drawing() if self.tty else ""))

    def _write(self, text: str) -> None:
        """Write and flush; a terminal that has gone (EIO after a hang-up, a closed pipe) ends the board's
        output, not the sweep, which has its runs to stop and its table to write."""
        if self.gone:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except OSError:  # BrokenPipeError too
            self.gone = True
            try:  # what is still buffered goes nowhere, rather than failing again when the process exits
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self.stream.fileno())
                os.close(devnull)
            except (OSError, ValueError, io.UnsupportedOperation):
                pass


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
        self.stops = StopRequests()
        self.active: list[Active] = []
        self.failed: list[str] = []
        self.stopped: list[str] = []  # "NAME (killed by SIGKILL)": stopped by a signal the sweep did not send

    @property
    def stop_signal(self) -> Optional[int]:
        return self.stops.signum

    def run(self, stops: Optional[StopRequests] = None, lock: Optional[RunLock] = None) -> int:
        """Run every unfinished run; 0 if none failed or was stopped, 1 if any did, 128+N if stopped by
        signal N. (A run that another process is training is skipped, and said so.) `stops`: the stop
        requests taken already (while the folder was created; else taken here), `lock`: the sweep
        folder's, held already (else taken here)."""
        lock = lock or lock_sweep(self.plan)
        own = stops is None
        self.stops = stops or StopRequests().__enter__()
        self.stops.on_stop = self._pass_on
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
            self.stops.on_stop = lambda _signum: None
            for a in self.active:  # an error in the sweep itself: its runs stop with a checkpoint
                a.proc.send_signal(signal.SIGTERM)
                a.proc.wait()
            if own:
                self.stops.__exit__()
            lock.release()
        summary = write_summary(self.plan)
        c = summary["counts"]
        self.board.note("\n".join(["", *points_table(summary), ""]))
        self.board.note(f"{self.plan.sweep_dir}: {c['finished']} of {len(self.plan.runs)} runs finished"
                        + (f", {len(self.failed)} failed ({', '.join(self.failed)})" if self.failed else "")
                        + (f", {len(self.stopped)} stopped ({', '.join(self.stopped)}; they resume)"
                           if self.stopped else "")
                        + f"; table in {self.plan.sweep_dir / 'summary.md'}")
        if self.stop_signal is not None:
            self.board.note(f"stopped by {signal.Signals(self.stop_signal).name}: continue with "
                            f"python -m app sweep --resume {self.plan.sweep_dir}")
            return 128 + self.stop_signal
        return 1 if self.failed or self.stopped else 0

    def _pass_on(self, signum: int) -> None:
        """A stop signal: passed on to every run (SIGHUP as SIGTERM); no new run starts."""
        for a in self.active:
            if a.proc.poll() is None:
                a.proc.send_signal(STOP_SIGNALS[signum])

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
            proc.send_signal(STOP_SIGNALS[self.stop_signal])
        self.board.set(run.name, f"running on {slot.label}")

    def _ended(self, a: Active) -> None:
        """The run's process has ended: what its results.json says, then (where that leaves something to
        say) its exit code, its last line or the signal that ended it (status.py)."""
        self.active.remove(a)
        code = a.proc.returncode
        run_dir = a.run.run_dir(self.plan.sweep_dir)
        seconds = time.monotonic() - a.started
        line = last_line(a.log, a.log_start)
        if code == RunInUse.exit_code and "in use by" in line and run_status(run_dir) != "finished":
            self.board.set(a.run.name, "skipped: running in another process")  # it took the run first
            return
        record = end_record(run_dir, code, line)
        record_outcome(self.plan.sweep_dir, a.run.name, record)
        state = run_state(run_dir, record)
        ended_by = signal_of(code)
        how = (f"killed by {ended_by[0]}" if ended_by[1] else f"stopped by {ended_by[0]}") if ended_by else \
            f"exit {code}"
        if state.status == "finished":
            after = "" if code == 0 else f" ({how} after it finished)"  # in its teardown: finished all the same
            self.board.set(a.run.name, f"done{_progress(run_dir)}, {seconds:.0f} s{after}")
        elif state.status == "failed":
            self.failed.append(a.run.name)
            self.board.set(a.run.name, f"failed ({how}): {state.detail} [log: {a.log}]")
        else:  # stopped: it resumes
            if self.stop_signal is None:
                self.stopped.append(f"{a.run.name} ({how})")
            saved = (read_results(run_dir) or {}).get("status") == "interrupted"
            if ended_by is not None and ended_by[1]:
                self.board.set(a.run.name, f"{how}{_progress(run_dir)}; it resumes from its last checkpoint")
            else:
                self.board.set(a.run.name, f"{how}, with a checkpoint{_progress(run_dir)}" if saved else
                               f"{how} before its first checkpoint")
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
