"""The command line: `train` (the default), `evaluate`, `predict`, `sweep` and `runs`, as parsers and dispatch.

Flags override config.json; each flag's value is checked as the setting it sets, so an error names the
flag. What each command then does is app/commands.py (and app/sweep/command.py, app/run_table.py); how its failures
end, in one line and an exit code, is app/launch.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Sequence

from app.config import Config, LoggingConfig, check_key, check_setting, flat_settings, load_config, override
from app.errors import ConfigError, SettingError, UserError, error_line
from app.runs import LATEST, SAFE_TO_CHANGE, run_dir_of, saved_config, why_fixed
from handlers.stop_signals import release_stop_signals


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m app", description="Train a CIFAR ResNet18 on CIFAR-100 or CIFAR-10 (data.dataset; "
                "PyTorch-Ignite). Other commands: `python -m app evaluate --help`, `python -m app predict --help`, "
                "`python -m app sweep --help`, `python -m app runs --help`.")
    p.add_argument("--config", help="JSON config with every setting (default: config.json; with --resume, the "
                                    "run's own config.json, over which only what a resume may change can be set)")
    p.add_argument("--lr", type=float, help="peak learning rate of the one-cycle schedule (optimizer.lr)")
    p.add_argument("--batch-size", type=int, help="global batch of one optimizer step, split over processes "
                                                   "(train.batch_size)")
    p.add_argument("--epochs", type=int, help="number of epochs (train.epochs)")
    p.add_argument("--resume", nargs="?", const=LATEST, metavar="PATH",
                   help="continue a run: alone, the latest run under the output folder; or a run folder or a "
                        "training checkpoint file")
    p.add_argument("--data-root", help="folder that holds cifar-100-python/ or cifar-10-batches-py/ (data.root)")
    p.add_argument("--output-dir", help="folder that holds run folders (logging.output_dir, default runs/)")
    p.add_argument("--run-name", help="name of the new run folder (default: a timestamp)")
    p.add_argument("--nproc-per-node", type=int, help="spawn this many processes on this machine "
                                                       "(distributed.nproc_per_node)")
    p.add_argument("--backend", choices=["nccl", "gloo"], help="torch.distributed backend (distributed.backend; "
                                                              "default nccl on GPUs, gloo on CPUs)")
    p.add_argument("--seed", type=int, help="random seed (seed)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (train.device)")
    p.add_argument("--set", action="append", dest="settings", metavar="KEY=VALUE",
                   help="any setting by its dotted key, e.g. --set train.amp=bf16 --set augment.rotation=0 "
                        "(repeatable; VALUE is read as JSON, else taken as text)")
    p.add_argument("--dry-run", action="store_true", help="check the config, the data and the model, print the "
                                                          "resolved config and the model size, and exit")
    return p


FLAG_KEYS = {"lr": "optimizer.lr", "batch_size": "train.batch_size", "epochs": "train.epochs",
             "data_root": "data.root", "output_dir": "logging.output_dir", "run_name": "logging.run_name",
             "nproc_per_node": "distributed.nproc_per_node", "backend": "distributed.backend",
             "seed": "seed", "device": "train.device"}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def config_from_flags(args: argparse.Namespace) -> Config:
    """The config file with the flags and `--set`s given over it: each checked as the setting it sets (an
    error names the flag, or `--set KEY`), then the whole config as the file's would be."""
    cfg = load_config(args.config or "config.json")
    updates, _ = command_line_settings(args)
    return override(cfg, updates, "command line") if updates else cfg


def resumed_run_config(args: argparse.Namespace) -> tuple[Config, str]:
    """`--resume` without `--config`: the run's own config.json, with the flags and `--set`s given over it,
    each only for a setting that a resume may change (app/runs.py SAFE_TO_CHANGE; anything else is refused,
    naming the flag and why). Returns the config and what to resume (the latest run, named)."""
    output_dir = Path(args.output_dir or LoggingConfig().output_dir)
    run_dir = run_dir_of(args.resume, output_dir)
    base = saved_config(run_dir)
    updates, flags = command_line_settings(args)
    saved = flat_settings(base)
    for key, value in updates.items():
        if key.startswith(SAFE_TO_CHANGE):
            continue
        taken = flat_settings(override(base, {key: value}, "command line"))[key]
        if taken != saved[key]:
            raise ConfigError(f"{flags[key]}: {key} cannot change when a run is resumed ({why_fixed(key)}); "
                              f"{run_dir} has {json.dumps(saved[key])}")
    cfg = override(base, updates, "command line") if updates else base
    return cfg, str(run_dir) if args.resume == LATEST else args.resume


def command_line_settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings the flags and `--set`s give, each checked as its setting takes it, and the flag that
    gave each (for errors)."""
    updates: dict[str, Any] = {}
    flags: dict[str, str] = {}
    for dest, key in FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        try:
            check_setting(key, value)
        except SettingError as e:
            raise ConfigError(f"{_flag(dest)}: {e.problem}") from None
        updates[key], flags[key] = value, _flag(dest)
    for text in getattr(args, "settings", None) or []:
        key, value = parse_set(text)
        if key in updates:
            raise ConfigError(f"--set {key}: {key} is set twice on the command line (also by {flags[key]})")
        updates[key], flags[key] = value, f"--set {key}"
    return updates, flags


def parse_set(text: str) -> tuple[str, Any]:
    """`--set KEY=VALUE`: a setting's dotted key and its value, read as JSON (`0.05`, `true`, `[0.5, 0.5,
    0.5]`, `null`) or else taken as text (`bf16`), checked as the setting takes it."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text}: expected KEY=VALUE (e.g. train.amp=bf16)")
    check_key(key, "--set")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    try:
        check_setting(key, value)
    except SettingError as e:
        raise ConfigError(f"--set {key}: {e.problem}") from None
    return key, value


def build_evaluate_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m app evaluate", description="Evaluate a checkpoint on the test set of its data set: "
                "top-1, top-5, loss, per-class accuracy, the worst classes and the most confused pairs.")
    p.add_argument("--checkpoint", required=True, help="a best-model or training checkpoint")
    p.add_argument("--ema", action="store_true", help="evaluate the weights' EMA that a training checkpoint of a run "
                   "with ema.decay holds, instead of its model (a best model holds one set: see ema.select_best)")
    p.add_argument("--data-root", help="folder that holds the run's data set (default: the run's data.root)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a report")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--nproc-per-node", type=int, default=1, help="split the test set over this many processes")
    p.add_argument("--backend", choices=["nccl", "gloo"])
    return p


def build_predict_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m app predict", description="The most likely of a checkpoint's classes for images (PNG, "
                "JPEG or any other PIL reads; any size: the shorter side is resized to 32 and the centre cropped).",
                epilog="A file named as IMAGE that cannot be read ends the command, naming it. A file found in a "
                "folder or by a pattern that cannot be read is skipped, with a warning on stderr, and the count of "
                "files skipped. Nothing is printed or written until every image is read.")
    p.add_argument("--checkpoint", required=True, help="a best-model or training checkpoint")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="an image file (whatever its extension); a folder: the files directly in it whose "
                        "extension is an image type PIL reads, sorted by name, hidden files left out; or a quoted "
                        "pattern such as 'photos/**/*.jpg' (** for any depth): the image files it matches")
    p.add_argument("--topk", type=int, default=5, metavar="K",
                   help="classes per image, most likely first (default 5; at most the checkpoint's classes)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a list")
    p.add_argument("--csv", metavar="PATH", help="write a CSV table to PATH (-: print it instead), one row per "
                                                 "image: image, class_1, probability_1, ..., class_K, probability_K")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return p


def build_sweep_parser() -> argparse.ArgumentParser:
    from app.sweep.command import RUN_FLAGS

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
    for flag in RUN_FLAGS:
        action = train_flags[flag]
        p.add_argument(*action.option_strings, type=action.type, help=f"for every run: {action.help}")
    p.add_argument("--set", action="append", dest="settings", metavar="KEY=VALUE",
                   help="for every run: any setting by its dotted key (repeatable; not one the grid or the sweep sets)")
    p.add_argument("--resume", metavar="SWEEP", help="continue a sweep: unfinished runs resume, finished ones "
                                                     "are skipped (with --devices, --per-device, --print-commands)")
    p.add_argument("--summary", metavar="SWEEP", help="rewrite and print the sweep's table, from what has finished")
    p.add_argument("--print-commands", action="store_true", help="create the sweep (or read it, with --resume) "
                   "and print one `python -m app` command per unfinished run instead of running them; also "
                   "writes SWEEP/slurm.sh, a SLURM job array")
    return p


def _train(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.resume is not None and args.config is None:
        cfg, resume = resumed_run_config(args)
    else:
        cfg, resume = config_from_flags(args), args.resume
    from app.commands import train  # after --help and the config's checks: their answer needs no torch

    return train(cfg, resume, args.dry_run)


def _evaluate(argv: Sequence[str]) -> int:
    args = build_evaluate_parser().parse_args(argv)  # --help and flag errors before torch is imported
    from app.commands import evaluate

    if args.nproc_per_node < 1:
        raise ConfigError("--nproc-per-node: must be >= 1")
    return evaluate(args.checkpoint, args.data_root, args.device, args.nproc_per_node, args.backend, args.json,
                    args.ema)


def _predict(argv: Sequence[str]) -> int:
    args = build_predict_parser().parse_args(argv)  # --help and flag errors before torch is imported
    from app.commands import predict

    if args.topk < 1:
        raise ConfigError(f"--topk {args.topk}: must be at least 1")
    return predict(args.checkpoint, args.images, args.device, args.json, args.topk, args.csv)


def _sweep(argv: Sequence[str]) -> int:
    from app.sweep.command import sweep

    return sweep(build_sweep_parser().parse_args(argv), config_from_flags)


def build_runs_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m app runs", description="A table of every run under a folder (sweeps' runs too, one "
                "level down): status, epochs done of planned, best top-1 (and its epoch), final top-1, wall time; "
                "how to resume each stopped run.")
    p.add_argument("folder", nargs="?", default=LoggingConfig().output_dir, metavar="FOLDER",
                   help="the folder that holds run folders (default: logging.output_dir's default, %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object (fractions, results.json's field "
                                                       "names) instead of the table")
    return p


def _runs(argv: Sequence[str]) -> int:
    from app.run_table import show_runs

    args = build_runs_parser().parse_args(argv)
    return show_runs(Path(args.folder), args.json)


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {"evaluate": _evaluate, "predict": _predict, "sweep": _sweep,
                                                       "runs": _runs}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a command; its exit code. A closed stdout gives 141, as a shell reports a process that
    SIGPIPE ended (`yes | head -1`): with `set -o pipefail` a pipeline fails as with any Unix tool."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = COMMANDS.get(argv[0]) if argv else None
    if command is not None or "--dry-run" in argv:
        release_stop_signals()  # held for training only (app/__main__.py): elsewhere a signal ends the command
    try:
        try:
            return command(argv[1:]) if command else _train(argv)
        finally:
            sys.stdout.flush()  # here, where a closed pipe can still be handled (also after --help's exit)
    except BrokenPipeError:
        from app.launch import EXIT_BROKEN_PIPE, discard_output

        discard_output()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as e:  # a refused command: said without importing the launcher (and torch with it)
        line, code = error_line(e)
        print(line, file=sys.stderr)
        return code
    except Exception as e:  # noqa: BLE001 - what `failure` does not know goes on, with its traceback
        from app.launch import failure  # here, not at the top: torch, which --help or `runs` does not need

        known = failure(e)
        if known is None:
            raise
        line, code = known
        if line is not None:
            print(line, file=sys.stderr)
        return code


