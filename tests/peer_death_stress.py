"""Kill one process of a 2-process run at a random moment, many times: do the others end, and soon?

Each try starts a 2-process run on the CPU (gloo), waits until it trains, then SIGKILLs one of its two
processes, chosen at random, at a random moment of its first few epochs (a step, an evaluation, a
checkpoint write), and measures how long the rest of the run (the other process and the launcher)
takes to end. A try passes when everything ended within --bound seconds, non-zero, and stderr names
the rank that died in one line of ours (the only line, with the spawn launcher; torchrun's agent
writes its own report too). Run by hand (outside CI; tests/test_crash_safety.py keeps one
such kill):

    python -m tests.peer_death_stress --tries 20 [--launcher spawn|torchrun] [--seed 0]

Prints a line per try and a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support import app_env, run_config, start_app, untimed, write_cifar100


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _workers(launcher: int, kind: str) -> dict[int, int]:
    """rank -> pid of the run's two training processes."""
    if kind == "spawn":  # the spawn launcher's children, in the order (and pid order) it started them
        pids = sorted(c for c in _children(launcher) if b"spawn_main" in _cmdline(c))
        return dict(enumerate(pids)) if len(pids) == 2 else {}
    ranks = {}
    for agent_child in _children(launcher):  # torchrun's workers: the agent's children, RANK in their env
        environ = _environ(agent_child)
        if "RANK" in environ:
            ranks[int(environ["RANK"])] = agent_child
    return ranks if len(ranks) == 2 else {}


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def one_try(work: Path, data: Path, kind: str, rng: random.Random, bound: float) -> dict:
    cfg = run_config(work / "c.json", data, work / "runs", train={"epochs": 50, "batch_size": 32},
                     eval={"batch_size": 20}, checkpoint={"every_iters": 4})
    args = ["--config", str(cfg), "--run-name", "r"]
    if kind == "spawn":
        proc = start_app(*args, "--nproc-per-node", "2", "--backend", "gloo", env=app_env(OMP_NUM_THREADS="1"),
                         start_new_session=True)
    else:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master_port", str(29600 + rng.randrange(300)), "-m", "app", *args],
                                env=app_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    for line in proc.stdout:
        if untimed(line).startswith("run "):
            break
    workers: dict[int, int] = {}
    deadline = time.monotonic() + 60
    while not workers and time.monotonic() < deadline:
        workers = _workers(proc.pid, kind)
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 4.0))  # 10 iterations an epoch, an evaluation and checkpoints in between
    rank = rng.randrange(2)
    os.kill(workers[rank], signal.SIGKILL)
    killed = time.monotonic()
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
    while any(_alive(p) for p in workers.values()) and time.monotonic() - killed < 120:
        time.sleep(0.05)
    seconds = time.monotonic() - killed
    lines = stderr.strip().splitlines()
    ours = [line for line in lines if "died" in line and line.startswith("error: ")]
    # The spawn launcher's stderr is ours alone; torchrun's agent adds its own report around our line.
    named = len(ours) == 1 and f"rank {rank} " in ours[0] and (kind == "torchrun" or len(lines) == 1)
    return {"killed_rank": rank, "seconds_to_end": round(seconds, 2), "exit_code": proc.returncode,
            "line": ours[0] if ours else None, "stderr_lines": len(lines),
            "passed": seconds <= bound and proc.returncode != 0 and named}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tries", type=int, default=20)
    p.add_argument("--launcher", choices=["spawn", "torchrun"], default="spawn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bound", type=float, default=15.0, help="seconds within which everything must end")
    args = p.parse_args()
    rng = random.Random(args.seed)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_cifar100(Path(tmp) / "data", 320, 40)
        for i in range(args.tries):
            work = Path(tmp) / f"try{i}"
            work.mkdir()
            result = one_try(work, data, args.launcher, rng, args.bound)
            results.append(result)
            print(json.dumps({"try": i + 1, **result}), flush=True)
    seconds = [r["seconds_to_end"] for r in results]
    print(json.dumps({"launcher": args.launcher, "tries": args.tries, "passed": sum(r["passed"] for r in results),
                      "max_seconds": max(seconds), "median_seconds": sorted(seconds)[len(seconds) // 2]}))


if __name__ == "__main__":
    main()
