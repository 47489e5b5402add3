"""The trainer and the evaluator: what one iteration does, and nothing about logging or files."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from ignite.engine import Engine
from ignite.metrics import Accuracy, Loss, TopKCategoricalAccuracy
from torch import nn


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: autocast dtype (None = fp32) and whether a GradScaler is needed."""

    dtype: Optional[torch.dtype]
    scaler: bool

    @staticmethod
    def resolve(amp: str, device: torch.device) -> "Precision":
        if amp == "auto":
            amp = "bf16" if device.type == "cuda" else "off"
        return {"off": Precision(None, False), "bf16": Precision(torch.bfloat16, False),
                "fp16": Precision(torch.float16, True)}[amp]


def _autocast(device: torch.device, precision: Precision):
    # No autocast weight cache: a captured CUDA graph must not depend on it (and it saves nothing here,
    # where each weight is cast once per step anyway).
    return torch.autocast(device.type, dtype=precision.dtype, enabled=precision.dtype is not None,
                          cache_enabled=False)


TrainStep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(images, labels) -> a device tensor of two values: the batch's loss and its top-1 accuracy."""


def make_train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                    augment: Callable[[torch.Tensor], torch.Tensor], device: torch.device, precision: Precision,
                    scaler: Optional[torch.amp.GradScaler] = None, channels_last: bool = False) -> TrainStep:
    """One optimizer step on a uint8 batch already on the device: augment there, forward, backward,
    step. Returns the batch's loss and top-1 (of the logits this step trained on, augmented images,
    model in training mode) as one device tensor: reading it would synchronise, so LossBuffer reads
    it in batches; captured in a CUDA graph, it is the graph's one output.)"""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        model.train()
        x = augment(images).contiguous(memory_format=memory_format)
        with _autocast(device, precision):
            logits = model(x)
            loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        top1 = (logits.detach().argmax(1) == labels).float().mean()
        return torch.stack([loss.detach().float(), top1])

    return step


def create_trainer(step: TrainStep, device: torch.device) -> Engine:
    def train_step(engine: Engine, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, labels = (t.to(device, non_blocking=True) for t in batch)
        return step(images, labels)

    return Engine(train_step)


def create_evaluator(model: nn.Module, normalize: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                     precision: Precision, channels_last: bool = False) -> Engine:
    """Top-1, top-5 and mean loss over everything the evaluator is run on. Under several processes
    each metric sums its counts over all of them, so uneven shards give exact whole-set figures."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    @torch.no_grad()
    def eval_step(engine: Engine, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        model.eval()
        images, labels = (t.to(device, non_blocking=True) for t in batch)
        x = normalize(images).contiguous(memory_format=memory_format)
        with _autocast(device, precision):
            logits = model(x)
        return logits.float(), labels

    evaluator = Engine(eval_step)
    Accuracy(device=device).attach(evaluator, "top1")
    TopKCategoricalAccuracy(k=5, device=device).attach(evaluator, "top5")
    Loss(F.cross_entropy, device=device).attach(evaluator, "loss")
    return evaluator
