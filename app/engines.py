"""The trainer and the evaluator: what one iteration does, and nothing about logging or files.

The training step is one function of (images, labels) on the device; on one GPU it is replayed from
CUDA graphs (app/cuda_graph.py), everywhere else it runs eagerly, and both are the same code. The
evaluator is the one training and `python -m app evaluate` use, so their figures are the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import ignite.distributed as idist
import torch
import torch.nn.functional as F
from ignite.engine import Engine
from torch import nn

from app.augment import BatchAugment, Normalize
from app.config import TOP_K, Config
from app.cuda_graph import CudaGraphStep
from app.ema import WeightEma
from app.device import memory_format
from app.loader import ShardedBatches
from app.loss_scale import LossScaler
from app.mixing import BatchMix, build_mix
from app.optim import CapturableSGD
from handlers.eval_counts import EvalCounts


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: autocast dtype (None = fp32) and whether the loss is scaled (fp16's
    gradients would underflow; app/loss_scale.py)."""

    dtype: Optional[torch.dtype]
    scaler: bool

    @staticmethod
    def resolve(amp: str, device: torch.device) -> "Precision":
        """`train.amp`: auto is bf16 on CUDA and fp32 elsewhere."""
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
                    scaler: Optional[LossScaler] = None, channels_last: bool = False,
                    label_smoothing: float = 0.0, mix: Optional[BatchMix] = None) -> TrainStep:
    """One optimizer step on a uint8 batch already on the device: augment there, forward, backward,
    step. Returns the batch's loss and top-1 (of the logits this step trained on, augmented images,
    model in training mode) as one device tensor: reading it would synchronise, so LossBuffer reads
    it in batches; captured in a CUDA graph, it is the graph's one output. With `scaler` (fp16) the
    loss is scaled, the gradients unscaled and checked and a non-finite step skipped, all on the device.
    The loss is the training loss, `label_smoothing` (loss.label_smoothing) included; the evaluator's stays
    plain cross-entropy. With `mix` (Mixup/CutMix, app/mixing.py) the loss and top-1 are against the mixed
    targets (MixedTargets)."""
    layout = memory_format(channels_last)

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        model.train()
        x = augment(images)
        targets = None
        if mix is not None:
            x, targets = mix(x, labels)
        x = x.contiguous(memory_format=layout)
        with _autocast(device, precision):
            logits = model(x)
            loss = (F.cross_entropy(logits, labels, label_smoothing=label_smoothing) if targets is None
                    else targets.cross_entropy(logits, label_smoothing))
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        top1 = ((logits.detach().argmax(1) == labels).float().mean() if targets is None
                else targets.top1(logits.detach()))
        return torch.stack([loss.detach().float(), top1])

    return step


def use_cuda_graphs(cfg: Config, device: torch.device, world: int) -> bool:
    """Graphs replace launch overhead on one GPU; DDP's all-reduce keeps the eager step. fp16's loss
    scaling is device operations only (app/loss_scale.py), so it is captured with the rest. With
    train.compile the graph holds the compiled model's step (inductor's own CUDA graphs off,
    app/compiling.py): compiled in the warm-up before each capture, one graph per batch shape; under DDP
    the compiled model keeps the eager step."""
    return cfg.train.cuda_graphs and device.type == "cuda" and world == 1


def build_train_step(cfg: Config, model: nn.Module, train_model: nn.Module, optimizer: CapturableSGD,
                     augment: BatchAugment, device: torch.device, precision: Precision,
                     scaler: Optional[LossScaler], world: int, ema: Optional[WeightEma] = None) -> TrainStep:
    """The eager step of `train_model` (the model itself, or its DDP and/or torch.compile wrapper), followed by
    the weights' EMA update where there is one (so that a graph captures it too), replayed from CUDA graphs
    where `use_cuda_graphs` allows (each replay advancing the augmentation's generator)."""
    step = make_train_step(train_model, optimizer, augment, device, precision, scaler, cfg.train.channels_last,
                           label_smoothing=cfg.loss.label_smoothing, mix=build_mix(cfg.augment, augment.generator))
    if ema is not None:
        step = ema.after(step)
    if use_cuda_graphs(cfg, device, world):
        step = CudaGraphStep(step, model, optimizer, augment.generator, step_state(scaler, ema))
    return step


def step_state(scaler: Optional[LossScaler], ema: Optional[WeightEma]) -> list[torch.Tensor]:
    """What a step changes besides the model's and the optimizer's tensors: fp16's loss scale and the weights'
    EMA, which CudaGraphStep snapshots and restores around a capture's warm-up steps."""
    return (scaler.tensors() if scaler is not None else []) + (ema.tensors() if ema is not None else [])


def create_trainer(step: TrainStep, device: torch.device) -> Engine:
    def train_step(engine: Engine, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, labels = (t.to(device, non_blocking=True) for t in batch)
        return step(images, labels)

    return Engine(train_step)


def create_evaluator(cfg: Config, model: nn.Module, device: torch.device) -> Engine:
    """Top-1, top-5, mean loss and the confusion matrix over everything the evaluator is run on, with
    the model in eval mode, the run's normalisation, precision and memory layout. Under several
    processes the counts are summed over all of them, so uneven shards give exact whole-set figures.
    The counts stay on the device until the evaluation ends (handlers/eval_counts.py): no batch waits
    for the one before it."""
    normalize = Normalize(cfg.augment.mean, cfg.augment.std, device)
    precision = Precision.resolve(cfg.train.amp, device)
    layout = memory_format(cfg.train.channels_last)

    @torch.no_grad()
    def eval_step(engine: Engine, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        model.eval()
        images, labels = (t.to(device, non_blocking=True) for t in batch)
        x = normalize(images).contiguous(memory_format=layout)
        with _autocast(device, precision):
            logits = model(x)
        return logits.float(), labels

    evaluator = Engine(eval_step)
    EvalCounts(cfg.model.num_classes, k=TOP_K, device=device).attach(evaluator, "eval_counts")
    return evaluator


def evaluation_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                       device: torch.device) -> ShardedBatches:
    """This process's unpadded shard of a test set, `batch_size` images per process and batch."""
    world = idist.get_world_size()
    return ShardedBatches(images.to(device), labels.to(device), batch_size=batch_size * world, shuffle=False,
                          rank=idist.get_rank(), world_size=world, drop_uneven=False)
