"""Run folders: naming a new one, finding the one to resume, and picking an intact checkpoint in it.

A run folder holds config.json (the resolved config), results.json, checkpoints/ and tb/. Nothing is
created here: the plan is made and checked first, and only rank 0 creates the folder, after every check
has passed, so a bad flag or a bad checkpoint leaves the output folder untouched.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from app.config import Config, config_from_dict, to_dict
from app.errors import ConfigError, UserError
from handlers.checkpoints import training_checkpoints

LATEST = "latest"  # the value of --resume given without a path
CHECKPOINT_KEYS = ("trainer", "model", "optimizer", "lr_scheduler", "augment", "meta")

# Settings that may change when a run is resumed: they do not change what is computed.
SAFE_TO_CHANGE = ("data.root", "data.download", "train.device", "train.compile", "train.channels_last",
                  "eval.batch_size", "checkpoint.", "logging.", "distributed.")


@dataclass(frozen=True)
class RunPlan:
    run_dir: Path
    checkpoint: Optional[Path] = None  # the training checkpoint to resume from
    resume: bool = False  # True: an existing run folder (without a checkpoint yet, it starts over there)
    trainer_state: Optional[dict] = None  # the checkpoint's trainer state (iteration, epoch_length, ...)

    @property
    def checkpoints_dir(self) -> Path:
        return checkpoints_dir(self.run_dir)


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def new_run(cfg: Config, check_exists: bool = True) -> RunPlan:
    """`check_exists` is False for the non-zero ranks under torchrun: rank 0 may already have made it."""
    out = Path(cfg.logging.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output folder is a file")
    if cfg.logging.run_name:
        run_dir = out / cfg.logging.run_name
        if check_exists and run_dir.exists():
            raise UserError(f"{run_dir}: run folder already exists; continue it with --resume {run_dir} "
                            f"or choose another --run-name")
        return RunPlan(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir, n = out / stamp, 1
    while run_dir.exists():
        n += 1
        run_dir = out / f"{stamp}-{n}"
    return RunPlan(run_dir)


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """torch.load with weights_only=True: a checkpoint file can hold tensors and plain data, never code."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint not found") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle, refused global: all "not loadable"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a loadable checkpoint ({first})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path}: not a training checkpoint (found {type(ckpt).__name__})")
    return ckpt


def check_training_checkpoint(path: Path) -> dict[str, Any]:
    ckpt = load_checkpoint(path)
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"{path}: not a training checkpoint (missing {', '.join(missing)})")
    return ckpt


def _newest_intact(run_dir: Path, warn) -> RunPlan:
    """The run resumed from its newest loadable training checkpoint; from the start if it has none
    yet (killed in its first epoch: it starts again in the same folder)."""
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir}: not a run folder (no config.json)")
    problems = []
    for path in training_checkpoints(checkpoints_dir(run_dir)):
        try:
            trainer_state = check_training_checkpoint(path)["trainer"]
        except UserError as e:
            problems.append(str(e))
            continue
        for p in problems:
            warn(f"skipping damaged checkpoint: {p}")
        if problems:
            warn(f"resuming from {path} instead")
        return RunPlan(run_dir, path, resume=True, trainer_state=trainer_state)
    if problems:
        raise UserError(f"{run_dir}: no intact training checkpoint ({'; '.join(problems)})")
    return RunPlan(run_dir, resume=True)


def latest_run(output_dir: Path) -> Path:
    """The run folder written to last: by its newest training checkpoint, or its config.json."""
    runs = [(max(p.stat().st_mtime for p in [d / "config.json", *training_checkpoints(checkpoints_dir(d))]), d)
            for d in (output_dir.iterdir() if output_dir.is_dir() else [])
            if not d.name.startswith(".") and (d / "config.json").is_file()]
    if not runs:
        raise UserError(f"{output_dir}: no run to resume")
    return max(runs)[1]


def resume_run(cfg: Config, resume: str, warn=print) -> RunPlan:
    """--resume (latest run under the output folder), --resume RUN_DIR or --resume CHECKPOINT_FILE."""
    if resume == LATEST:
        return _newest_intact(latest_run(Path(cfg.logging.output_dir)), warn)
    path = Path(resume)
    if path.is_dir():
        return _newest_intact(path, warn)
    if not path.exists():
        raise UserError(f"{path}: no such run folder or checkpoint")
    trainer_state = check_training_checkpoint(path)["trainer"]
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return RunPlan(run_dir, path, resume=True, trainer_state=trainer_state)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return flat


def unsafe_changes(saved: Config, new: Config) -> list[str]:
    """Settings that differ between the run's saved config and this invocation and would change
    what is computed, as 'key: old -> new'."""
    a, b = _flatten(to_dict(saved)), _flatten(to_dict(new))
    return [f"{k}: {json.dumps(a[k])} -> {json.dumps(b[k])}" for k in sorted(a)
            if a[k] != b[k] and not k.startswith(SAFE_TO_CHANGE)]


def saved_config(run_dir: Path) -> Config:
    path = run_dir / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: the run's saved config is missing") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: the run's saved config is not valid JSON ({e.msg})") from None
    try:
        return config_from_dict(raw, str(path))
    except ConfigError as e:
        raise UserError(str(e)) from None
