"""`python -m app sweep`: what the command does with its flags (parsed in app/cli.py).

A new sweep is planned and checked whole before its folder is created; `--resume` reads the plan
back; `--summary` only rewrites the table; `--print-commands` hands the runs to another scheduler
instead of running them here. The data is checked (or downloaded) once, before any run starts. From
the creation of the folder to the end of its runs, a stop signal is the sweep's to answer
(runner.py StopRequests): a folder half-created is removed, runs stop with a checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from app.cli import FLAG_KEYS, parse_set
from app.config import Config
from app.data import ensure_dataset
from app.errors import ConfigError
from app.sweep.cluster import ARRAY_TASKS, commands, sbatch_commands, write_slurm_script
from app.sweep.plan import (NOT_A_GRID_KEY, SweepPlan, create_sweep, load_plan, make_plan, parse_grid, parse_seeds,
                            remove_abandoned_sweeps, run_configs)
from app.sweep.runner import StopRequests, SweepRunner, check_not_running, device_slots
from app.sweep.summary import to_markdown, write_summary

RUN_FLAGS = ("lr", "batch_size", "epochs", "data_root", "output_dir")  # the training flags it takes


def _given(args: argparse.Namespace, names: Sequence[str]) -> Optional[str]:
    """The first of these options that was given, as its flag."""
    for name in names:
        if getattr(args, name) not in (None, False):
            return "--" + name.replace("_", "-")
    return None


def _refuse_flags_the_grid_sets(args: argparse.Namespace, grid: dict) -> None:
    """A training flag sets its key for every run, and the grid sets it per run, over it: a flag for a
    key of the grid would be dropped without a word, so it is refused."""
    for name in RUN_FLAGS:
        key = FLAG_KEYS[name]
        if getattr(args, name) is not None and key in grid:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} {getattr(args, name)}: not with --grid {key}, which sets {key} for each run; "
                              f"give its values in the grid only")
    for text in getattr(args, "settings", None) or []:
        key, _ = parse_set(text)
        if key in grid:
            raise ConfigError(f"--set {key}: not with --grid {key}, which sets {key} for each run; give its values "
                              f"in the grid only")
        if key in NOT_A_GRID_KEY and key != "logging.output_dir":  # that one is --output-dir's
            raise ConfigError(f"--set {key}: not for a sweep's runs ({NOT_A_GRID_KEY[key]})")


def sweep(args: argparse.Namespace, config_from_flags: Callable[[argparse.Namespace], Config]) -> int:
    """`config_from_flags`: the base config from --config and the training flags, as `train` reads them.
    A folder that cannot be created or read ends, as every command's OSError does, in one line naming it
    (app/launch.py `failure`)."""
    plan_flags = ("config", "seeds", "grid", "name", *RUN_FLAGS, "settings")
    if args.summary is not None:
        extra = _given(args, (*plan_flags, "devices", "per_device", "resume", "print_commands"))
        if extra:
            raise ConfigError(f"{extra}: not with --summary")
        plan, _ = load_plan(Path(args.summary))
        print(to_markdown(write_summary(plan)), end="")
        return 0
    if args.print_commands:
        extra = _given(args, ("devices", "per_device"))
        if extra:
            raise ConfigError(f"{extra}: not with --print-commands (the scheduler that runs them places them)")
    per_device = 1 if args.per_device is None else args.per_device
    slots = [] if args.print_commands else device_slots(args.devices, per_device, torch.cuda.device_count(),
                                                        os.cpu_count() or 1, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if args.resume is not None:
        extra = _given(args, plan_flags)
        if extra:
            raise ConfigError(f"{extra}: not with --resume (the sweep's plan is in {args.resume}/sweep.json)")
        plan, base = load_plan(Path(args.resume))
        if not args.print_commands:
            check_not_running(plan)
    else:
        if args.config is None:
            args.config = "config.json"
        base = config_from_flags(args)
        seeds = parse_seeds(args.seeds) if args.seeds is not None else [base.seed]
        grid = parse_grid(args.grid or [], base)
        _refuse_flags_the_grid_sets(args, grid)
        plan = make_plan(base, seeds, grid, args.name)
    # The data, once here rather than by many runs at once; paths as the runs see them, from the workdir.
    data = {(c["data"]["root"], c["data"]["dataset"], c["data"]["download"]) for _, c in run_configs(base, plan)}
    for root, dataset, download in sorted(data):
        if download or not args.print_commands:  # where the data is only on the nodes, it is theirs to check
            ensure_dataset(plan.workdir / root, dataset, download)
    with StopRequests() as stops:
        lock = None
        if args.resume is None:
            for path in remove_abandoned_sweeps(plan.sweep_dir.parent):
                print(f"removed {path}: a sweep folder left half-created by a process that was killed", file=sys.stderr)
            lock = create_sweep(base, plan, lambda: stops.check_creation(plan.sweep_dir))
        if not args.print_commands:
            write_slurm_script(plan)  # should the runs move to a cluster later; written for where the sweep is now
            if args.resume is None:
                print(f"sweep {plan.sweep_dir}: {len(plan.runs)} runs on {len(slots)} slots "
                      f"({', '.join(sorted({s.label for s in slots}))}, {per_device} per device)")
            return SweepRunner(plan, slots).run(stops, lock)
    if lock is not None:
        lock.release()
    return _print_commands(plan)


def _print_commands(plan: SweepPlan) -> int:
    """The unfinished runs' commands, and the SLURM script written for the runs and the folder as they are now."""
    write_slurm_script(plan)
    lines = commands(plan)
    print("\n".join(lines) if lines else f"# no run of {plan.sweep_dir} is left to run")
    submit = sbatch_commands(plan)
    arrays = (f"as a SLURM job array: {submit[0]}" if len(submit) == 1 else
              f"as {len(submit)} SLURM job arrays (at most {ARRAY_TASKS} tasks each: SLURM's default MaxArraySize "
              f"is 1001): {'; '.join(submit)}")
    print(f"{len(lines)} of {len(plan.runs)} runs to run; {arrays}; the table: python -m app sweep --summary "
          f"{plan.sweep_dir}", file=sys.stderr)
    return 0
