"""When one process of a multi-process run dies, the others end too, within seconds, and say which.

A process whose peer died may be blocked in a collective (DDP's all-reduce, a barrier) that waits for
gloo's or NCCL's timeout, 30 minutes by default; a SIGTERM does not wake it, because Python runs
signal handlers in the main thread only between bytecodes, and it is inside C++. Under torchrun or
SLURM that is a process holding a GPU for half an hour after its run died. So each process watches the
others on its machine from a thread of its own (collectives release the GIL): their pids, gathered
once as the processes start, checked twice a second. A peer that is gone for GRACE_SECONDS while this
process still runs ends it; the grace leaves a process that fails the same way as its peer (a bad
input every process sees) the time to report that itself. One line names the rank that died: from the
spawn launcher, which knows how it died (app/launch.py), or, under torchrun, from the lowest-ranked
survivor. The processes of a run that ends well leave together (a barrier), so that none takes a peer
that finished first for one that died.

Peers on other machines cannot be watched this way; there the collective's own error, or torchrun's
agent, stops the process.
"""
from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import ignite.distributed as idist
import torch

GRACE_SECONDS = 3.0
POLL_SECONDS = 0.5
EXIT_PEER_DIED = 1


def _machine() -> int:
    """This machine, as a number: its name and boot, so that two containers named alike differ."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return int.from_bytes(hashlib.sha256(f"{socket.gethostname()}|{boot}".encode()).digest()[:7], "little")


def process_start_time(pid: int) -> Optional[int]:
    """When the process started (clock ticks since boot), None if it is gone or a zombie: with the pid,
    it tells the process from a later one that took the same pid."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


class PeerWatch:
    """The processes of this run that share this machine, watched from a daemon thread."""

    def __init__(self, rank: int, peers: dict[int, tuple[int, int]], report: bool = True) -> None:
        """`peers`: rank -> (pid, start time) of the other processes on this machine."""
        self.rank, self.peers, self.reports = rank, peers, report
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peer watch", daemon=True)

    @classmethod
    def start(cls, report: bool) -> PeerWatch:
        """Gather every process's machine and pid (a collective: every process calls it), then watch.
        `report`: whether this process says which peer died (not when its launcher says it)."""
        started = process_start_time(os.getpid())  # None without /proc: nothing can be watched
        own = torch.tensor([[_machine(), os.getpid(), started or 0]], dtype=torch.int64)
        table = idist.all_gather(own.to(idist.device())).cpu().tolist()
        rank = idist.get_rank()
        here = table[rank][0]
        peers = {r: (pid, start) for r, (machine, pid, start) in enumerate(table) if r != rank and machine == here}
        return cls(rank, peers if started is not None else {}, report).watch()

    def watch(self) -> PeerWatch:
        """Start the watching thread: from now on a dead peer ends this process."""
        self._thread.start()
        return self

    def dead_peer(self) -> Optional[tuple[int, int]]:
        """(rank, pid) of a watched process that is gone, the lowest rank first; None if all live."""
        for rank, (pid, started) in sorted(self.peers.items()):
            if process_start_time(pid) != started:
                return rank, pid
        return None

    def report(self, dead: tuple[int, int]) -> None:
        """The one line, from the lowest-ranked process still alive on this machine."""
        alive = [r for r, (pid, started) in self.peers.items() if process_start_time(pid) == started]
        if self.reports and self.rank < min(alive, default=self.rank + 1):
            rank, pid = dead
            print(f"error: the process of rank {rank} (pid {pid}) died; this run's other processes stop too",
                  file=sys.stderr, flush=True)

    def stop(self) -> None:
        """The run's processes are leaving together: a peer that ends from now on has not died."""
        self._stopped.set()

    def _run(self) -> None:
        gone_since: Optional[float] = None
        while not self._stopped.wait(POLL_SECONDS):
            dead = self.dead_peer()
            if dead is None:
                gone_since = None
                continue
            gone_since = gone_since or time.monotonic()
            if time.monotonic() - gone_since >= GRACE_SECONDS and not self._stopped.is_set():
                self.report(dead)
                sys.stderr.flush()
                os._exit(EXIT_PEER_DIED)
