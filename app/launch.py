"""Running a command's work in 1..N processes, and how each of them ends.

One process, processes spawned here through ignite.distributed (`--nproc-per-node N`), or processes
that torchrun started: the same function runs in each (`run_processes`). Every process ends the same
way: a failure the user can act on (bad input, a diverged loss, a full disk, a graceful stop) is one
line from rank 0 and an exit code, never a traceback (`failure`); output into a pipe whose reader has
gone (`| head -1`) ends quietly with 141, as SIGPIPE would. When a process of several dies, the
others end within seconds (app/peers.py) and one line names the rank that died.
"""
from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import signal
import sys
import threading
from dataclasses import dataclass
from multiprocessing import resource_tracker
from typing import Any, Callable, NoReturn, Optional

import ignite.distributed as idist
import torch

from app.device import cuda_wanted
from app.errors import ConfigError, UserError, error_line
from app.peers import EXIT_PEER_DIED, PeerWatch
from handlers.atomic import OutputWriteError
from handlers.loss_buffer import LossNotFinite
from handlers.preemption import TrainingInterrupted
from handlers.stop_signals import STOP_SIGNALS, answered_stop_signals, hold_stop_signals, release_stop_signals

EXIT_DIVERGED = 3
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


@dataclass(frozen=True)
class LaunchSettings:
    """How a command's processes start: the torch.distributed backend (None for one process), how many
    to spawn here (None: this process is the only one, or torchrun started them), and their number."""

    backend: Optional[str]
    spawn: Optional[int]
    world: int


def torchrun_world_size() -> Optional[int]:
    return int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ and "RANK" in os.environ else None


def is_first_process() -> bool:
    """Rank 0 of torchrun's processes, or the one process that launches the others here."""
    return int(os.environ.get("RANK", "0")) == 0


def is_first_on_node() -> bool:
    """Local rank 0 under torchrun (the processes of a node share its data folder), or this process."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def launch_settings(device: str, nproc: int, backend: Optional[str]) -> LaunchSettings:
    """The settings for `--device`, `--nproc-per-node` and `--backend`, checked against this machine."""
    torchrun = torchrun_world_size()
    if torchrun is not None and nproc > 1:
        raise ConfigError("--nproc-per-node: not with torchrun, which starts the processes itself "
                          "(use torchrun's --nproc_per_node)")
    world = torchrun if torchrun is not None else nproc
    wants_cuda = cuda_wanted(device)
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is available here (use --device cpu)")
    backend = backend or ("nccl" if wants_cuda else "gloo")
    if backend == "nccl" and not wants_cuda:
        raise ConfigError("--backend nccl: needs CUDA GPUs; use --backend gloo on CPUs")
    if wants_cuda and torchrun is None and nproc > torch.cuda.device_count():
        raise ConfigError(f"--nproc-per-node {nproc}: only {torch.cuda.device_count()} GPUs here")
    if world == 1 and torchrun is None:
        return LaunchSettings(None, None, 1)
    return LaunchSettings(backend, nproc if torchrun is None else None, world)


class ProcessDied(Exception):
    """A process the launcher spawned ended with a non-zero exit, and with it the launch: the line to
    print (None where the process printed its own, as rank 0 does) and the exit code."""

    def __init__(self, line: Optional[str], exit_code: int) -> None:
        super().__init__(line or f"exit code {exit_code}")
        self.line, self.exit_code = line, exit_code


def run_processes(settings: LaunchSettings, fn: Callable[..., None], *args: Any, graceful: bool = False) -> None:
    """fn(local_rank, *args) in every process of the launch, each ending as `failure` says. `graceful`:
    fn answers the stop signals itself (training: handlers/preemption.py); else they end it."""
    quiet_libraries()
    spawned = bool(settings.spawn and settings.spawn > 1)
    forwarder = StopForwarder() if spawned else None
    try:
        with idist.Parallel(backend=settings.backend, nproc_per_node=settings.spawn) as parallel:
            parallel.run(_in_process, not spawned, graceful, fn, *args)  # the launcher names a dead process itself
    except torch.multiprocessing.ProcessExitedException as e:
        if e.signal_name is None:  # an exit code of its own: what it had to say, it said
            raise ProcessDied(None, e.exit_code) from None
        signum = -e.exit_code
        raise ProcessDied(f"error: the process of rank {e.error_index} died ({e.signal_name}); the run's other "
                          f"processes were stopped", 128 + signum) from None
    finally:
        if forwarder is not None:
            forwarder.close()
    if graceful and forwarder is not None and forwarder.signum is not None:  # it came as they were ending
        raise TrainingInterrupted(forwarder.signum, 0, 0, finished=True)


class StopForwarder:
    """In the launcher of spawned processes: SIGTERM, SIGINT and SIGHUP passed on to them, so that they
    stop gracefully (handlers/preemption.py) and the launcher waits for them. The launcher holds the
    signals (handlers/stop_signals.py), and so do the processes it starts until they can answer; a
    thread of its own takes them. Each signal goes to every process of the moment; a process that
    starts after the first one gets that one too, once. A scheduler may signal only the launcher; if the
    processes got the signal too (Ctrl-C reaches the whole process group), they take the forwarded copy
    for the same request."""

    def __init__(self) -> None:
        self.signals = answered_stop_signals()  # not one the launcher was started with ignored (nohup's HUP)
        self.signum: Optional[int] = None
        self._told: set[int] = set()
        self._closed = threading.Event()
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # inherited from here on
        # multiprocessing's resource tracker, started with the first process, unblocks SIGINT and SIGTERM
        # after it starts: start it now, with a handler that keeps a signal of that moment, and block again.
        early: list[int] = []
        previous = {s: signal.signal(s, lambda signum, _: early.append(signum)) for s in self.signals}
        resource_tracker.ensure_running()
        hold_stop_signals()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if early:
            self.signum = early[0]
        self._previous: dict[int, Any] = {}
        self._thread = threading.Thread(target=self._forward, name="forward stop signals", daemon=True)
        if hasattr(signal, "sigtimedwait"):
            self._thread.start()
        else:
            # macOS has no sigtimedwait: handlers in this thread instead; a process still starting when
            # the signal comes is then not held, and may die of it.
            self._previous = {s: signal.signal(s, self._on_signal) for s in self.signals}
            release_stop_signals()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signum = self.signum or signum
        self._tell([c.pid for c in multiprocessing.active_children() if c.pid is not None], signum)

    def _forward(self) -> None:
        while not self._closed.is_set():
            info = signal.sigtimedwait(self.signals, 0.1)
            children = [c.pid for c in multiprocessing.active_children() if c.pid is not None]
            if info is not None:
                self.signum = self.signum or info.si_signo
                targets, signum = children, info.si_signo
            elif self.signum is not None:
                targets, signum = [pid for pid in children if pid not in self._told], self.signum
            else:
                continue
            self._tell(targets, signum)

    def _tell(self, pids: list[int], signum: int) -> None:
        """Send `signum` to each of `pids`; a process that has just exited needs no telling."""
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
            self._told.add(pid)

    def close(self) -> None:
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join()
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)


def failure(error: BaseException) -> Optional[tuple[Optional[str], int]]:
    """The line to print (None: nothing more to say) and the exit code for an error that ends a command
    the expected way; None for anything else (a bug: its traceback is what to report). Exit 2 for
    config and flags, 1 for other input and for the disk, 3 for a diverged loss, 128 + N after signal
    N (a graceful stop, or a spawned process killed by N)."""
    if isinstance(error, ProcessDied):
        return error.line, error.exit_code
    if isinstance(error, UserError):
        return error_line(error)
    if isinstance(error, LossNotFinite):
        return f"error: {error}; training stopped, checkpoints saved before it are untouched", EXIT_DIVERGED
    if isinstance(error, TrainingInterrupted):
        run_dir = getattr(error, "run_dir", None)
        if error.finished:
            where = f" {run_dir}" if run_dir else ""
            return (f"{error}: the run{where} had finished and every file of it is written; nothing is left "
                    f"to resume", error.exit_code)
        # torchrun's agent sets TORCHELASTIC_RUN_ID for its workers; our spawn sets RANK and WORLD_SIZE too.
        launcher = "torchrun ... -m app" if "TORCHELASTIC_RUN_ID" in os.environ else "python -m app"
        return (f"{error}: its checkpoint is saved; continue with {launcher} --resume {run_dir or 'RUN_DIR'}",
                error.exit_code)
    if isinstance(error, OutputWriteError):  # a full disk: the message names the file
        return f"error: {error}", 1
    if isinstance(error, OSError):  # a folder that went away
        return f"error: {error.filename}: {error.strerror}" if error.filename and error.strerror \
            else f"error: {error}", 1
    return None


def _in_process(local_rank: int, report_deaths: bool, graceful: bool, fn: Callable[..., None], *args: Any) -> None:
    """Entry point of each process: a user error, divergence or disk failure becomes one line (from
    rank 0) and an exit code, in spawned processes and under torchrun alike; with several processes,
    a peer that dies ends this one too (`report_deaths`: whether it says so, see app/peers.py)."""
    quiet_libraries()  # again: a spawned process starts with fresh logging
    held = set(STOP_SIGNALS) <= signal.pthread_sigmask(signal.SIG_BLOCK, [])  # by app/__main__.py or a launcher
    if held and not graceful:
        release_stop_signals()  # nothing here answers them: they end the process, as they would any tool
        held = False
    watch = PeerWatch.start(report_deaths) if idist.get_world_size() > 1 else None
    try:
        fn(local_rank, *args)
        if held:  # what fn answered is answered: a signal from now on waits for the exit, pending
            hold_stop_signals()
        if held and idist.get_world_size() == 1:  # (with several, the launcher or torchrun answers it)
            late = sorted(set(signal.sigpending()) & set(answered_stop_signals()))
            if late:
                raise TrainingInterrupted(late[0], 0, 0, finished=True)
        if watch is not None:
            idist.barrier()  # all leave together: a peer that ends before the others are done has died
            watch.stop()
        gc.collect()  # the run's objects (DDP's hold on the process group) go before the group does
        sys.stdout.flush()  # a closed pipe shows here, not at this process's exit
    except BrokenPipeError:  # before OSError: a reader that went away is not a failure to report
        discard_output()
        sys.exit(EXIT_BROKEN_PIPE)
    except Exception as e:  # noqa: BLE001 - what `failure` does not know goes on, with its traceback
        known = failure(e)
        dead = watch.dead_peer() if watch is not None and known is None else None
        if known is None and dead is None:
            raise
        if dead is not None:  # the collective that raised had lost its peer
            watch.report(dead)
            known = (None, EXIT_PEER_DIED)
        if watch is not None:
            watch.stop()
        _exit(*known, together=isinstance(e, TrainingInterrupted))


def _exit(line: Optional[str], code: int, together: bool = False) -> NoReturn:
    """`together`: every process ends this way at once (a graceful stop): none exits before rank 0 has
    said how to resume, since the spawn launcher stops the others as soon as one exits."""
    if line is not None and idist.get_rank() == 0:
        print(line, file=sys.stderr, flush=True)
    if idist.get_world_size() > 1:
        if together:
            idist.barrier()
        # One of a group of processes leaves the group and then exits without the interpreter's
        # teardown: seen here (1 exit in 10), that teardown can abort in C++ ("terminate called
        # without an active exception"), turning the exit code into SIGABRT's. Everything the run
        # writes is on disk by now (atomic, fsync'd); finalize is local, not a collective.
        idist.finalize()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def quiet_libraries() -> None:
    """We report failures ourselves, in one line: the engine's and the launchers' own log lines about
    them (and the launcher's INFO lines about itself) would only repeat it around ours."""
    logging.getLogger("ignite.engine").setLevel(logging.CRITICAL)
    logging.getLogger("ignite.distributed.launcher.Parallel").setLevel(logging.WARNING)  # kept by ignite
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)


def discard_output() -> None:
    """The reader of stdout has gone (`python -m app evaluate ... | head -1`). Point stdout at /dev/null,
    so that Python's last flush at exit cannot fail again and print "Exception ignored"."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
