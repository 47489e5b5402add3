"""The signals that ask a run to stop gracefully, and holding them until something can answer them.

SIGTERM (schedulers, Kubernetes, systemd, torchrun), SIGINT (Ctrl-C) and SIGHUP (the terminal closed).
A process that would train blocks them as its first act (app/__main__.py): a request that arrives while
it imports, checks its input or starts its worker processes (which inherit the blocked mask) then waits,
pending, until a GracefulStop takes the signals over and unblocks them, instead of killing the process
with nothing saved and nothing said. Imports nothing but `signal`, so that it can run first.

A stop signal that the process was started with ignored stays ignored (`answered_stop_signals`): `nohup`
starts a command with SIGHUP ignored so that it outlives its terminal, and a shell starts a background
job (`cmd &` in a script) with SIGINT ignored so that Ctrl-C in the terminal leaves it running. A run
keeps those choices, as any Unix tool does and as Python itself does for SIGINT. (Before, a run took
such a signal over once it could answer it, while one that came in its first milliseconds was lost:
the same signal stopped a run or did not, by when it came.)
"""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def answered_stop_signals() -> tuple[int, ...]:
    """The stop signals this process answers: those it was not started with ignored. Ask before anything
    of ours installs a handler for them (every handler we install gives back the one it found)."""
    return tuple(s for s in STOP_SIGNALS if signal.getsignal(s) != signal.SIG_IGN)


def hold_stop_signals() -> None:
    """Block the stop signals in this thread, and in the threads and processes it starts from now on."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def release_stop_signals() -> None:
    """Unblock them: one that arrived while they were held is delivered now, to whatever handles it."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
