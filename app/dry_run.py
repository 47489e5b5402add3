"""`--dry-run`: the run described, after the config, the data and the model have been checked."""
from __future__ import annotations

import json

from app.config import Config, to_dict
from app.data import load_dataset
from app.datasets import DATASETS
from app.loader import iterations_per_epoch
from app.model import build_model, count_parameters
from app.optim import describe_schedule


def describe_ema(cfg: Config) -> list[str]:
    """The weights' EMA in one line, or none where it is off."""
    ema = cfg.ema
    if not ema.decay:
        return []
    warmup = f", from {ema.warmup_decay} over its first {ema.warmup_iters} updates" if ema.warmup_iters else ""
    buffers = "copied from the model" if ema.buffers == "copy" else "averaged"
    best = "the EMA's" if ema.select_best == "ema" else "the model's"
    return [f"ema: decay {ema.decay}{warmup}, every step; BatchNorm statistics {buffers}; evaluated every epoch "
            f"beside the model; the best model by {best} top-1"]


def describe_run(cfg: Config, world: int) -> str:
    """The resolved config, the data and the model, and the schedule the optimizer will follow."""
    data = load_dataset(cfg.data.root, cfg.data.dataset)
    model = build_model(cfg.model.name, cfg.model.num_classes)
    iterations = iterations_per_epoch(len(data.train), cfg.train.batch_size, world)
    return "\n".join([
        json.dumps(to_dict(cfg), indent=2),
        f"model: {cfg.model.name}, {count_parameters(model):,} parameters",
        f"data: {DATASETS[cfg.data.dataset].title}, {len(data.train):,} training and {len(data.test):,} test images "
        f"of {len(data.classes)} classes in {cfg.data.root}",
        f"schedule: {cfg.train.epochs} epochs x {iterations} iterations (batch {cfg.train.batch_size} = "
        f"{world} x {cfg.train.batch_size // world})",
        *describe_schedule(cfg, iterations),
        *describe_ema(cfg),
        "dry run: nothing was written",
    ])
