"""The signals that ask a run to stop gracefully, and holding them until something can answer them.

SIGTERM (schedulers, Kubernetes, systemd, torchrun), SIGINT (Ctrl-C) and SIGHUP (the terminal closed).
A process that would train blocks them as its first act (app/__main__.py): a request that arrives while
it imports, checks its input or starts its worker processes (which inherit the blocked mask) then waits,
pending, until a GracefulStop takes the signals over and unblocks them, instead of killing the process
with nothing saved and nothing said. Imports nothing but `signal`, so that it can run first.
"""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def hold_stop_signals() -> None:
    """Block the stop signals in this thread, and in the threads and processes it starts from now on."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def release_stop_signals() -> None:
    """Unblock them: one that arrived while they were held is delivered now, to whatever handles it."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
