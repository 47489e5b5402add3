"""What TensorBoard's HParams tab shows of a run: the settings one compares runs by, each in its own
type, and the keys `logging.hparams` adds (a sweep's grid keys)."""
from __future__ import annotations

import json
from typing import Any

import torch

from app.config import Config, flat_settings, momentum_range
from app.engines import Precision

# The tab's names for the settings it always shows.
HPARAM_NAMES = {"optimizer.lr": "lr", "train.batch_size": "batch_size", "train.epochs": "epochs",
                "optimizer.weight_decay": "weight_decay", "schedule.cycle_momentum": "cycle_momentum",
                "schedule.pct_start": "pct_start", "optimizer.nesterov": "nesterov", "train.amp": "precision",
                "seed": "seed", "data.dataset": "dataset", "loss.label_smoothing": "label_smoothing",
                "augment.cutout": "cutout", "augment.mixup_alpha": "mixup_alpha",
                "augment.cutmix_alpha": "cutmix_alpha", "augment.mix_prob": "mix_prob",
                "augment.mix_switch_prob": "mix_switch_prob", "ema.decay": "ema_decay"}
PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def hparams(cfg: Config, world_size: int, device: torch.device) -> dict[str, Any]:
    """The usual settings by their short names, then those `logging.hparams` names by their dotted keys.
    `device` is where the run trains: `train.amp` "auto" means bf16 on CUDA and fp32 elsewhere, and runs
    are compared by the precision they ran in, not by what was asked for."""
    low, high = momentum_range(cfg)  # what the optimizer used: the cycle's range, or the constant
    precision = PRECISION_NAMES[Precision.resolve(cfg.train.amp, device).dtype]
    shown = {"lr": float(cfg.optimizer.lr), "batch_size": cfg.train.batch_size, "epochs": cfg.train.epochs,
             "weight_decay": float(cfg.optimizer.weight_decay), "cycle_momentum": cfg.schedule.cycle_momentum,
             "momentum_min": float(low), "momentum_max": float(high), "pct_start": float(cfg.schedule.pct_start),
             "nesterov": cfg.optimizer.nesterov, "precision": precision, "seed": cfg.seed, "dataset": cfg.data.dataset,
             "world_size": world_size, "label_smoothing": float(cfg.loss.label_smoothing),
             "cutout": cfg.augment.cutout, "mixup_alpha": float(cfg.augment.mixup_alpha),
             "cutmix_alpha": float(cfg.augment.cutmix_alpha), "mix_prob": float(cfg.augment.mix_prob),
             "mix_switch_prob": float(cfg.augment.mix_switch_prob)}
    # Where there is an EMA, or a sweep's grid varies it (0: off); elsewhere the session is what it was before.
    if cfg.ema.decay or "ema.decay" in cfg.logging.hparams:
        shown["ema_decay"] = float(cfg.ema.decay or 0.0)
    settings = flat_settings(cfg)
    for key in cfg.logging.hparams:
        if key not in HPARAM_NAMES:
            value = settings[key]
            shown[key] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return shown
