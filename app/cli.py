"""The command line: `train` (the default), `evaluate`, `predict` and `sweep`; flags over config.json; checks
that fail fast; the launch of 1..N processes.

What a user can get wrong is checked before any file is written: flags, config, devices, the run to
resume and its checkpoint, the output folder, the data's presence here; the data's structure in each
process, before rank 0 creates the run folder. Each failure is one line naming the file, key, flag or
path (exit 2 for config and flags, 1 otherwise, 3 for a diverged loss), without a traceback. Output into
a pipe whose reader has gone (`| head -1`) ends quietly with exit code 141, as SIGPIPE would.
"""
from __future__ import annotations

import argparse
import gc
import logging
import multiprocessing
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Sequence

import ignite.distributed as idist
import torch

from app.config import Config, load_config, override
from app.data import ensure_dataset
from app.errors import ConfigError, UserError
from app.runs import (LATEST, RunPlan, check_not_in_use, check_writable, new_run, resume_run, saved_config,
                      unsafe_changes)
from handlers.atomic import OutputWriteError
from handlers.loss_buffer import LossNotFinite
from handlers.preemption import TrainingInterrupted

EXIT_DIVERGED = 3
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m app", description="Train a CIFAR ResNet18 on CIFAR-100 (PyTorch-Ignite). "
                "Other commands: `python -m app evaluate --help`, `python -m app predict --help`, "
                "`python -m app sweep --help`.")
    p.add_argument("--config", default="config.json", help="JSON config with every setting (default: config.json)")
    p.add_argument("--lr", type=float, help="peak learning rate of the one-cycle schedule (optimizer.lr)")
    p.add_argument("--batch-size", type=int, help="global batch of one optimizer step, split over processes "
                                                   "(train.batch_size)")
    p.add_argument("--epochs", type=int, help="number of epochs (train.epochs)")
    p.add_argument("--resume", nargs="?", const=LATEST, metavar="PATH",
                   help="continue a run: alone, the latest run under the output folder; or a run folder or a "
                        "training checkpoint file")
    p.add_argument("--data-root", help="folder that holds cifar-100-python/ (data.root)")
    p.add_argument("--output-dir", help="folder that holds run folders (logging.output_dir, default runs/)")
    p.add_argument("--run-name", help="name of the new run folder (default: a timestamp)")
    p.add_argument("--nproc-per-node", type=int, help="spawn this many processes on this machine "
                                                       "(distributed.nproc_per_node)")
    p.add_argument("--backend", choices=["nccl", "gloo"], help="torch.distributed backend (distributed.backend; "
                                                              "default nccl on GPUs, gloo on CPUs)")
    p.add_argument("--seed", type=int, help="random seed (seed)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (train.device)")
    p.add_argument("--dry-run", action="store_true", help="check the config, the data and the model, print the "
                                                          "resolved config and the model size, and exit")
    return p


_FLAG_KEYS = {"lr": "optimizer.lr", "batch_size": "train.batch_size", "epochs": "train.epochs",
              "data_root": "data.root", "output_dir": "logging.output_dir", "run_name": "logging.run_name",
              "nproc_per_node": "distributed.nproc_per_node", "backend": "distributed.backend",
              "seed": "seed", "device": "train.device"}


def resolve_config(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config)
    updates = {key: getattr(args, flag) for flag, key in _FLAG_KEYS.items() if getattr(args, flag, None) is not None}
    if not updates:
        return cfg
    try:
        return override(cfg, updates, "command line")
    except ConfigError as e:
        flags = {v: "--" + k.replace("_", "-") for k, v in _FLAG_KEYS.items()}
        message = str(e)
        for key, flag in flags.items():
            message = message.replace(f"command line: {key} ", f"{flag}: ")
        raise ConfigError(message) from None


def _torchrun_world_size() -> Optional[int]:
    return int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ and "RANK" in os.environ else None


def launch(device: str, nproc: int, backend: Optional[str]) -> tuple[Optional[str], Optional[int], int]:
    """(backend, processes to spawn, world size) for one process, spawned processes or torchrun,
    checked against the machine."""
    torchrun = _torchrun_world_size()
    if torchrun is not None and nproc > 1:
        raise ConfigError("--nproc-per-node: not with torchrun, which starts the processes itself "
                          "(use torchrun's --nproc_per_node)")
    world = torchrun if torchrun is not None else nproc
    wants_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is available here (use --device cpu)")
    backend = backend or ("nccl" if wants_cuda else "gloo")
    if backend == "nccl" and not wants_cuda:
        raise ConfigError("--backend nccl: needs CUDA GPUs; use --backend gloo on CPUs")
    if wants_cuda and torchrun is None and nproc > torch.cuda.device_count():
        raise ConfigError(f"--nproc-per-node {nproc}: only {torch.cuda.device_count()} GPUs here")
    if world == 1 and torchrun is None:
        return None, None, 1
    return backend, (nproc if torchrun is None else None), world


def launch_settings(cfg: Config) -> tuple[Optional[str], Optional[int], int]:
    backend, spawn, world = launch(cfg.train.device, cfg.distributed.nproc_per_node, cfg.distributed.backend)
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} does not divide evenly over {world} processes")
    return backend, spawn, world


def _torchrun_rank(name: str) -> int:
    return int(os.environ.get(name, "0"))


def plan_run(cfg: Config, resume: Optional[str]) -> tuple[RunPlan, bool]:
    """The run folder and checkpoint to use, and whether the run is already finished."""
    if resume is None:
        return new_run(cfg, check_exists=_torchrun_rank("RANK") == 0), False
    plan = resume_run(cfg, resume, warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    if _torchrun_rank("RANK") == 0:
        check_not_in_use(plan.run_dir)
    changes = unsafe_changes(saved_config(plan.run_dir), cfg)
    if changes:
        raise ConfigError(f"{plan.run_dir}/config.json: cannot resume with settings that change the run: "
                          + "; ".join(changes))
    if plan.trainer_state is None:
        return plan, False
    state = plan.trainer_state
    return plan, int(state["iteration"]) >= int(state["epoch_length"]) * cfg.train.epochs


def _in_process(local_rank: int, fn: Callable[..., None], *args: Any) -> None:
    """Entry point of each process: a user error, divergence or disk failure becomes one line (from
    rank 0) and an exit code, in spawned processes and under torchrun alike."""
    _quiet_libraries()  # again: a spawned process starts with fresh logging
    try:
        fn(local_rank, *args)
        gc.collect()  # the run's objects (DDP's hold on the process group) go before the group does
        sys.stdout.flush()  # a closed pipe shows here, not at this process's exit
    except BrokenPipeError:  # before OSError: a reader that went away is not a failure to report
        _discard_output()
        sys.exit(EXIT_BROKEN_PIPE)
    except UserError as e:
        _fail(str(e), e.exit_code)
    except LossNotFinite as e:
        _fail(f"{e}; training stopped, checkpoints saved before it are untouched", EXIT_DIVERGED)
    except TrainingInterrupted as e:
        run_dir = getattr(e, "run_dir", "RUN_DIR")
        _fail(f"{e}: its checkpoint is saved; continue with --resume {run_dir} (and the same --config and "
              f"flags)", e.exit_code, prefix="")
    except OutputWriteError as e:  # a full disk: the message names the file
        _fail(str(e), 1)
    except OSError as e:  # a folder that went away
        _fail(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e), 1)


def _fail(message: str, code: int, prefix: str = "error: ") -> NoReturn:
    if idist.get_rank() == 0:
        print(f"{prefix}{message}", file=sys.stderr, flush=True)
    if idist.get_world_size() > 1:
        # One of a group of processes leaves the group and then exits without the interpreter's
        # teardown: seen here (1 exit in 10), that teardown can abort in C++ ("terminate called
        # without an active exception"), turning the exit code into SIGABRT's. Everything the run
        # writes is on disk by now (atomic, fsync'd); finalize is local, not a collective.
        idist.finalize()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _forward_stop_signals() -> None:
    """In the launcher of spawned processes: pass SIGTERM and SIGINT on to them, so that they stop
    gracefully (handlers/preemption.py) and the launcher waits for them. A scheduler may signal only
    the launcher; if the children got the signal too (Ctrl-C reaches the whole process group), they
    take the forwarded copy for the same request."""
    def forward(signum: int, _frame: Any) -> None:
        for child in multiprocessing.active_children():
            os.kill(child.pid, signum)

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, forward)


def _quiet_libraries() -> None:
    """We report failures ourselves, in one line: the engine's and the launchers' own log lines about
    them (and the launcher's INFO lines about itself) would only repeat it around ours."""
    logging.getLogger("ignite.engine").setLevel(logging.CRITICAL)
    logging.getLogger("ignite.distributed.launcher.Parallel").setLevel(logging.WARNING)  # kept by ignite
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)


def _discard_output() -> None:
    """The reader of stdout has gone (`python -m app evaluate ... | head -1`). Point stdout at /dev/null,
    so that Python's last flush at exit cannot fail again and print "Exception ignored"."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _launch(backend: Optional[str], spawn: Optional[int], fn: Callable[..., None], *args: Any) -> None:
    _quiet_libraries()
    if spawn and spawn > 1:
        _forward_stop_signals()
    with idist.Parallel(backend=backend, nproc_per_node=spawn) as parallel:
        parallel.run(_in_process, fn, *args)


def train(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    backend, spawn, world = launch_settings(cfg)
    plan, finished = plan_run(cfg, args.resume)
    check_writable(plan.run_dir)
    if finished:
        print(f"{plan.run_dir} is finished ({cfg.train.epochs} epochs); nothing to do")
        return 0
    if _torchrun_rank("LOCAL_RANK") == 0:
        # Under torchrun the other processes of this node wait in the process-group rendezvous,
        # which local rank 0 joins only after this: the download happens once per node.
        ensure_dataset(cfg.data.root, cfg.data.download)
    from app.training import describe_run, training  # imported here: keeps --help and flag errors fast

    if args.dry_run:
        print(describe_run(cfg, world))
        return 0
    _launch(backend, spawn, training, cfg, plan)
    return 0


def build_evaluate_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m app evaluate", description="Evaluate a checkpoint on the CIFAR-100 test set: "
                "top-1, top-5, loss, per-class accuracy, the worst classes and the most confused pairs.")
    p.add_argument("--checkpoint", required=True, help="a best-model or training checkpoint")
    p.add_argument("--data-root", help="folder that holds cifar-100-python/ (default: the run's data.root)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a report")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--nproc-per-node", type=int, default=1, help="split the test set over this many processes")
    p.add_argument("--backend", choices=["nccl", "gloo"])
    return p


def evaluate(argv: Sequence[str]) -> int:
    from app.evaluate import check_evaluation_inputs, run_evaluate

    args = build_evaluate_parser().parse_args(argv)
    if args.nproc_per_node < 1:
        raise ConfigError("--nproc-per-node: must be >= 1")
    backend, spawn, _ = launch(args.device, args.nproc_per_node, args.backend)
    check_evaluation_inputs(args.checkpoint, args.data_root)
    _launch(backend, spawn, run_evaluate, args.checkpoint, args.data_root, args.device, args.json)
    return 0


def build_predict_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m app predict", description="The five most likely CIFAR-100 classes for images "
                "(PNG, JPEG; any size: the shorter side is resized to 32 and the centre cropped).")
    p.add_argument("--checkpoint", required=True, help="a best-model or training checkpoint")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--json", action="store_true", help="print JSON instead of a list")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return p


def predict(argv: Sequence[str]) -> int:
    from app.predict import format_predictions, predict as predict_images

    args = build_predict_parser().parse_args(argv)
    launch(args.device, 1, None)  # checks that --device cuda has a GPU
    results = predict_images(Path(args.checkpoint), [Path(p) for p in args.images], device=args.device)
    print(format_predictions(results, args.json))
    return 0


SWEEP_RUN_FLAGS = ("lr", "batch_size", "epochs", "data_root", "output_dir")


def build_sweep_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m app sweep", description="Many runs at once: every seed of --seeds at every point "
                "of the --grid, each an ordinary run folder under OUTPUT_DIR/NAME, run K at a time per device; "
                "a table of each grid point's mean and spread over seeds in NAME/summary.md.")
    p.add_argument("--config", help="the base config of every run (default: config.json)")
    p.add_argument("--seeds", help="seeds, as 0,1,2 or 0-4 (default: the config's seed)")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                   help="a config key and its values, e.g. optimizer.lr=0.05,0.1 (repeat for more keys)")
    p.add_argument("--name", help="the sweep's folder under the output folder (default: sweep-TIMESTAMP)")
    p.add_argument("--devices", help="GPUs to use, as 0,1, or cpu (default: every GPU, else the CPU)")
    p.add_argument("--per-device", type=int, help="runs at once on each device (default 1)")
    train_flags = {a.dest: a for a in build_parser()._actions}
    for flag in SWEEP_RUN_FLAGS:
        action = train_flags[flag]
        p.add_argument(*action.option_strings, type=action.type, help=f"for every run: {action.help}")
    p.add_argument("--resume", metavar="SWEEP", help="continue a sweep: unfinished runs resume, finished ones "
                                                     "are skipped (with --devices, --per-device, --print-commands)")
    p.add_argument("--summary", metavar="SWEEP", help="rewrite and print the sweep's table, from what has finished")
    p.add_argument("--print-commands", action="store_true", help="create the sweep (or read it, with --resume) "
                   "and print one `python -m app` command per unfinished run instead of running them; also "
                   "writes SWEEP/slurm.sh, a SLURM job array")
    return p


def _given(args: argparse.Namespace, names: Sequence[str]) -> Optional[str]:
    """The first of these options that was given, as its flag."""
    for name in names:
        if getattr(args, name) not in (None, False):
            return "--" + name.replace("_", "-")
    return None


def sweep(argv: Sequence[str]) -> int:
    args = build_sweep_parser().parse_args(argv)
    try:
        return _sweep(args)
    except OSError as e:  # a folder that cannot be created or read: the path named, one line
        raise UserError(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)) from None


def _sweep(args: argparse.Namespace) -> int:
    from app.sweep import create_sweep, load_plan, make_plan, parse_grid, parse_seeds, run_config
    from app.sweep_commands import commands, write_slurm_script
    from app.sweep_runner import SweepRunner, check_not_running, device_slots
    from app.sweep_summary import to_markdown, write_summary

    plan_flags = ("config", "seeds", "grid", "name", *SWEEP_RUN_FLAGS)
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
        base = resolve_config(args)
        seeds = parse_seeds(args.seeds) if args.seeds is not None else [base.seed]
        plan = make_plan(base, seeds, parse_grid(args.grid or [], base), args.name)
    # The data, once here rather than by many runs at once; paths as the runs see them, from the workdir.
    for root, download in sorted({(c.data.root, c.data.download) for c in (run_config(base, plan, r)
                                                                          for r in plan.runs)}):
        if download or not args.print_commands:  # where the data is only on the nodes, it is theirs to check
            ensure_dataset(plan.workdir / root, download)
    if args.print_commands:
        if args.resume is None:
            create_sweep(base, plan)
        script = write_slurm_script(plan)  # the runs as they stand now
        lines = commands(plan)
        print("\n".join(lines) if lines else f"# no run of {plan.sweep_dir} is left to run")
        print(f"{len(lines)} of {len(plan.runs)} runs to run; as a SLURM job array: sbatch {script}; the table: "
              f"python -m app sweep --summary {plan.sweep_dir}", file=sys.stderr)
        return 0
    if args.resume is None:
        create_sweep(base, plan)
        write_slurm_script(plan)  # should the runs move to a cluster later
        print(f"sweep {plan.sweep_dir}: {len(plan.runs)} runs on {len(slots)} slots "
              f"({', '.join(sorted({s.label for s in slots}))}, {per_device} per device)")
    return SweepRunner(plan, slots).run()


COMMANDS = {"evaluate": evaluate, "predict": predict, "sweep": sweep}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a command; its exit code. A closed stdout gives 141, as a shell reports a process that
    SIGPIPE ended (`yes | head -1`): with `set -o pipefail` a pipeline fails as with any Unix tool."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = COMMANDS.get(argv[0]) if argv else None
    try:
        try:
            return command(argv[1:]) if command else train(argv)
        finally:
            sys.stdout.flush()  # here, where a closed pipe can still be handled (also after --help's exit)
    except BrokenPipeError:
        _discard_output()
        return EXIT_BROKEN_PIPE
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OutputWriteError as e:  # a sweep's own files (plan, summary) on a full disk: the file named
        print(f"error: {e}", file=sys.stderr)
        return 1
    except torch.multiprocessing.ProcessExitedException as e:
        return e.exit_code or 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
