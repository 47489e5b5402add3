"""`python -m app evaluate`: a checkpoint's top-1, top-5 and loss on the test set, per-class accuracy,
the worst classes and the most confused pairs.

It uses the evaluator that training uses (app/engines.py), so the figures are the ones training logged
for that checkpoint; per-class accuracy and the most confused pairs are computed as TensorBoard's
(handlers/confusion.py). Under several processes each takes a disjoint, unpadded shard of the test set
and the metrics (the confusion matrix included) are summed over processes. A checkpoint says where it
stands in its run (epoch and iteration); a best model also holds the validation metrics training measured
when it saved it (`saved_metrics`), which the report gives beside its own: the same top-1 and top-5 on the
same test set. With `--ema`, a training checkpoint's weights' EMA is evaluated instead of its model, as the
EMA's evaluator did in training (metrics.csv's ema_* figures); the report says whose weights it evaluated
(a best model's are those `ema.select_best` chose).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import ignite.distributed as idist
import torch

from app.checkpoint import load_checkpoint, model_from_checkpoint, position
from app.data import ensure_dataset, load_dataset
from app.device import resolve_device
from app.engines import create_evaluator, evaluation_batches
from handlers.confusion import most_confused, per_class_accuracy


def evaluate_checkpoint(path: Path, data_root: Optional[str] = None, device: str = "cpu", batch_size: int = 500,
                        contents: Optional[dict[str, Any]] = None, ema: bool = False) -> dict[str, Any]:
    """top1, top5, loss and the confusion matrix over the whole test set (this process's shard of it
    when there are several; the metrics sum over all of them), of the model or, with `ema`, of the
    weights' EMA. `contents`: the checkpoint, if already loaded."""
    dev = resolve_device(device, idist.get_local_rank())
    ckpt = contents if contents is not None else load_checkpoint(Path(path))
    model, meta, weights = model_from_checkpoint(Path(path), ckpt, dev, ema)
    data = load_dataset(data_root or meta.config.data.root, meta.config.data.dataset)
    evaluator = create_evaluator(meta.config, model, dev)
    evaluator.run(evaluation_batches(data.test.images, data.test.labels, batch_size, dev))
    m = evaluator.state.metrics
    epoch, iteration = position(ckpt, meta)
    return {"checkpoint": str(path), "weights": weights, "epoch": epoch, "iteration": iteration,
            "saved_metrics": meta.metrics, "images": len(data.test), "top1": float(m["top1"]), "top5": float(m["top5"]),
            "loss": float(m["loss"]), "classes": meta.classes, "confusion": m["confusion"].cpu().long()}


def summarize(result: dict[str, Any], worst: int = 10, pairs: int = 10) -> dict[str, Any]:
    """Per-class accuracy, the worst classes and the most confused (true, predicted) pairs."""
    cm, classes = result["confusion"], result["classes"]
    per_class = per_class_accuracy(cm).tolist()
    present = [i for i in range(len(classes)) if cm[i].sum() > 0]
    worst_ids = sorted(present, key=lambda i: (per_class[i], i))[:worst]
    return {
        "checkpoint": result["checkpoint"], "weights": result["weights"], "epoch": result["epoch"],
        "iteration": result["iteration"], "saved_metrics": result["saved_metrics"], "images": result["images"],
        "top1": result["top1"], "top5": result["top5"], "loss": result["loss"],
        "per_class_accuracy": {classes[i]: per_class[i] for i in present},
        "worst_classes": [{"class": classes[i], "accuracy": per_class[i], "images": int(cm[i].sum())}
                          for i in worst_ids],
        "most_confused": [{"true": classes[t], "predicted": classes[p], "count": n}
                          for t, p, n, _ in most_confused(cm, pairs)],
    }


WEIGHTS = {"model": "model weights", "ema": "EMA weights"}  # the report's words for whose weights it evaluated


def format_report(s: dict[str, Any]) -> str:
    epoch = f" (epoch {s['epoch']}, iteration {s['iteration']})" if s["epoch"] is not None else ""
    lines = [f"{s['checkpoint']}{epoch}, {WEIGHTS[s['weights']]}, {s['images']} test images",
             f"top-1 {100 * s['top1']:.2f}%  top-5 {100 * s['top5']:.2f}%  loss {s['loss']:.4f}", "",
             "ten worst classes:"]
    lines += [f"  {w['class']:<20} {100 * w['accuracy']:6.2f}%  ({w['images']} images)" for w in s["worst_classes"]]
    lines += ["", "most confused (true -> predicted):"]
    lines += [f"  {c['true']:<20} -> {c['predicted']:<20} {c['count']}" for c in s["most_confused"]]
    lines += ["", "per-class accuracy:"]
    items = [f"{name:<20}{100 * acc:6.2f}%" for name, acc in s["per_class_accuracy"].items()]
    lines += ["  " + "   ".join(items[i:i + 4]) for i in range(0, len(items), 4)]
    return "\n".join(lines)


def run_evaluate(local_rank: int, checkpoint: Path, contents: Optional[dict[str, Any]], data_root: Optional[str],
                 device: str, as_json: bool, ema: bool = False, write: Callable[[str], None] = print) -> None:
    """Entry point of each evaluation process; rank 0 prints."""
    summary = summarize(evaluate_checkpoint(checkpoint, data_root, device, contents=contents, ema=ema))
    if idist.get_rank() == 0:
        write(json.dumps(summary) if as_json else format_report(summary))


def check_evaluation_inputs(checkpoint: Path, data_root: Optional[str], ema: bool = False) -> dict[str, Any]:
    """Before any process starts: the checkpoint loads and its weights (with `ema`, its EMA's) fit the
    model, and the data is there. Returns the loaded checkpoint."""
    contents = load_checkpoint(checkpoint)
    _, meta, _ = model_from_checkpoint(checkpoint, contents, torch.device("cpu"), ema)
    ensure_dataset(data_root or meta.config.data.root, meta.config.data.dataset, download=False)
    return contents
