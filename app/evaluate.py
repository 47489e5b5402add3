"""Evaluation of a saved checkpoint on the test set, outside of training."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from app.augment import Normalize
from app.config import Config, config_from_dict
from app.data import load_cifar100
from app.engines import Precision, create_evaluator
from app.errors import UserError
from app.loader import ShardedBatches
from app.model import build_model
from app.runs import load_checkpoint


def model_from_checkpoint(path: Path, device: torch.device) -> tuple[nn.Module, Config, list[str]]:
    """The model, the config it was trained with, and the class names, from a best-model or training
    checkpoint (both carry the model's weights and the run's meta)."""
    ckpt = load_checkpoint(path, map_location=device)
    if "model" not in ckpt or "meta" not in ckpt:
        raise UserError(f"{path}: not a checkpoint of this application (no model or meta)")
    try:
        cfg = config_from_dict(json.loads(ckpt["meta"]["config"]), f"{path} (meta.config)")
        classes = json.loads(ckpt["meta"]["classes"])
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: damaged meta ({e})") from None
    model = build_model(cfg.model.name, cfg.model.num_classes)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"{path}: model weights do not fit ResNet18 ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), cfg, classes


def evaluate_checkpoint(path: Path, data_root: Optional[str] = None, device: str = "cpu",
                        batch_size: int = 500) -> dict[str, Any]:
    """top1, top5 and loss over the whole test set, in one process."""
    dev = torch.device(device)
    model, cfg, _ = model_from_checkpoint(Path(path), dev)
    data = load_cifar100(data_root or cfg.data.root, cfg.model.num_classes)
    batches = ShardedBatches(data.test.images.to(dev), data.test.labels.to(dev), batch_size=batch_size,
                             shuffle=False, drop_uneven=False)
    a = cfg.augment
    evaluator = create_evaluator(model, Normalize(a.mean, a.std, dev), dev,
                                 Precision.resolve(cfg.train.amp, dev), cfg.train.channels_last)
    evaluator.run(batches)
    return dict(evaluator.state.metrics)
