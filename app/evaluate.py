"""`python -m app evaluate`: a checkpoint's top-1, top-5 and loss on the test set, per-class accuracy,
the worst classes and the most confused pairs.

It uses the evaluator that training uses, so the figures are the ones training logged for that
checkpoint. Under several processes each takes a disjoint, unpadded shard of the test set and the
metrics (the confusion matrix included) are summed over processes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import ignite.distributed as idist
import torch
from torch import nn

from app.config import Config, config_from_dict
from app.data import ensure_dataset, load_cifar100
from app.errors import ConfigError, UserError
from app.model import build_model
from app.runs import load_checkpoint
from app.builders import build_evaluator, evaluation_batches, tune_backends  # training's evaluator


def model_from_checkpoint(path: Path, device: torch.device) -> tuple[nn.Module, Config, list[str], dict]:
    """The model on `device`, the config it was trained with, the class names and the raw checkpoint
    (on the CPU), from a best-model or training checkpoint written on any device."""
    ckpt = load_checkpoint(path)
    if "model" not in ckpt or "meta" not in ckpt:
        raise UserError(f"{path}: not a checkpoint of this application (no model or meta)")
    try:
        cfg = config_from_dict(json.loads(ckpt["meta"]["config"]), f"{path} (meta.config)")
        classes = json.loads(ckpt["meta"]["classes"])
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: damaged meta ({e})") from None
    except ConfigError as e:  # a bad checkpoint, not a bad config of the user's: exit 1
        raise UserError(str(e)) from None
    if not (isinstance(classes, list) and len(classes) == cfg.model.num_classes
            and all(isinstance(c, str) for c in classes)):
        raise UserError(f"{path}: damaged meta (classes: {cfg.model.num_classes} names expected)")
    model = build_model(cfg.model.name, cfg.model.num_classes)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"{path}: model weights do not fit ResNet18 ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), cfg, classes, ckpt


def resolve_eval_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", idist.get_local_rank())
    return torch.device("cpu")


def evaluate_checkpoint(path: Path, data_root: Optional[str] = None, device: str = "cpu",
                        batch_size: int = 500) -> dict[str, Any]:
    """top1, top5, loss and the confusion matrix over the whole test set (this process's shard of it
    when there are several; the metrics sum over all of them)."""
    dev = resolve_eval_device(device)
    tune_backends(dev)  # the backend settings training evaluated with
    model, cfg, classes, ckpt = model_from_checkpoint(Path(path), dev)
    data = load_cifar100(data_root or cfg.data.root, cfg.model.num_classes)
    evaluator = build_evaluator(cfg, model, dev)
    evaluator.run(evaluation_batches(data.test.images, data.test.labels, batch_size, dev))
    m = evaluator.state.metrics
    trainer_state = ckpt.get("trainer") or {}
    epoch = (trainer_state["iteration"] // trainer_state["epoch_length"]) if trainer_state else None
    return {"checkpoint": str(path), "epoch": epoch, "images": len(data.test), "top1": float(m["top1"]),
            "top5": float(m["top5"]), "loss": float(m["loss"]), "classes": classes,
            "confusion": m["confusion"].cpu().long()}


def summarize(result: dict[str, Any], worst: int = 10, pairs: int = 10) -> dict[str, Any]:
    """Per-class accuracy, the worst classes and the most confused (true, predicted) pairs."""
    cm, classes = result["confusion"], result["classes"]
    per_class = (cm.diag().float() / cm.sum(1).clamp(min=1).float()).tolist()
    present = [i for i in range(len(classes)) if cm[i].sum() > 0]
    worst_ids = sorted(present, key=lambda i: (per_class[i], i))[:worst]
    off = cm.clone()
    off.fill_diagonal_(0)
    counts, flat = off.flatten().sort(descending=True, stable=True)
    confused = [(int(f) // len(classes), int(f) % len(classes), int(c)) for c, f in zip(counts[:pairs], flat[:pairs])
                if c > 0]
    return {
        "checkpoint": result["checkpoint"], "epoch": result["epoch"], "images": result["images"],
        "top1": result["top1"], "top5": result["top5"], "loss": result["loss"],
        "per_class_accuracy": {classes[i]: per_class[i] for i in present},
        "worst_classes": [{"class": classes[i], "accuracy": per_class[i], "images": int(cm[i].sum())}
                          for i in worst_ids],
        "most_confused": [{"true": classes[t], "predicted": classes[p], "count": c} for t, p, c in confused],
    }


def format_report(s: dict[str, Any]) -> str:
    epoch = f" (epoch {s['epoch']})" if s["epoch"] is not None else ""
    lines = [f"{s['checkpoint']}{epoch}, {s['images']} test images",
             f"top-1 {100 * s['top1']:.2f}%  top-5 {100 * s['top5']:.2f}%  loss {s['loss']:.4f}", "",
             "ten worst classes:"]
    lines += [f"  {w['class']:<20} {100 * w['accuracy']:6.2f}%  ({w['images']} images)" for w in s["worst_classes"]]
    lines += ["", "most confused (true -> predicted):"]
    lines += [f"  {c['true']:<20} -> {c['predicted']:<20} {c['count']}" for c in s["most_confused"]]
    lines += ["", "per-class accuracy:"]
    items = [f"{name:<20}{100 * acc:6.2f}%" for name, acc in s["per_class_accuracy"].items()]
    lines += ["  " + "   ".join(items[i:i + 4]) for i in range(0, len(items), 4)]
    return "\n".join(lines)


def run_evaluate(local_rank: int, checkpoint: str, data_root: Optional[str], device: str, as_json: bool,
                 write: Callable[[str], None] = print) -> None:
    """Entry point of each evaluation process; rank 0 prints."""
    summary = summarize(evaluate_checkpoint(Path(checkpoint), data_root, device))
    if idist.get_rank() == 0:
        write(json.dumps(summary) if as_json else format_report(summary))


def check_evaluation_inputs(checkpoint: str, data_root: Optional[str]) -> None:
    """Before any process starts: the checkpoint loads and the data is there."""
    _, cfg, _, _ = model_from_checkpoint(Path(checkpoint), torch.device("cpu"))
    ensure_dataset(data_root or cfg.data.root, download=False)
