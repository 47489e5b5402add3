"""The parts of a run, each built from the config the one way training, `evaluate` and `bench` all use:
device, optimizer, schedule, augmentation, training step (graphed or eager), evaluator, test batches.

Nothing here attaches a handler or writes a file; app/training.py wires these parts into a run.
"""
from __future__ import annotations

from typing import Callable, Optional

import ignite.distributed as idist
import torch
from ignite.engine import Engine
from ignite.metrics import ConfusionMatrix
from torch import nn

from app.augment import BatchAugment, Normalize
from app.config import AugmentConfig, Config, momentum_range
from app.cuda_graph import CudaGraphStep
from app.errors import ConfigError
from app.engines import Precision, TrainStep, create_evaluator, make_train_step
from app.loader import ShardedBatches
from app.sgd import CapturableSGD


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def tune_backends(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def build_optimizer(cfg: Config, model: nn.Module) -> CapturableSGD:
    """SGD with the step's lr and momentum in device tensors (app/sgd.py), so that a captured CUDA
    graph follows the schedule. Its starting momentum is the schedule's first value."""
    o = cfg.optimizer
    return CapturableSGD(model.parameters(), lr=o.lr, momentum=momentum_range(cfg)[1],
                         weight_decay=o.weight_decay, nesterov=o.nesterov)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, iterations_per_epoch: int,
                    total_steps: Optional[int] = None) -> torch.optim.lr_scheduler.OneCycleLR:
    """The recipe's one-cycle schedule of lr (and momentum, with schedule.cycle_momentum), one step per
    iteration over the whole run."""
    s = cfg.schedule
    total_steps = total_steps or cfg.train.epochs * iterations_per_epoch
    if s.pct_start * total_steps <= 1:  # OneCycleLR would divide by a warm-up of length zero, or less
        raise ConfigError(f"schedule.pct_start {s.pct_start} gives a warm-up of {s.pct_start * total_steps:g} of the "
                          f"run's {total_steps} iterations; it needs more than 1 (train longer or raise pct_start)")
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.optimizer.lr, total_steps=total_steps,
        pct_start=s.pct_start, anneal_strategy=s.anneal_strategy, div_factor=s.div_factor,
        final_div_factor=s.final_div_factor, cycle_momentum=s.cycle_momentum, base_momentum=s.base_momentum,
        max_momentum=s.max_momentum)


def scheduled_values(optimizer: torch.optim.Optimizer) -> Callable[[], dict[str, float]]:
    """What the step about to be logged used: the first group's learning rate and momentum."""
    group = optimizer.param_groups[0]  # the schedule writes into this dict, never replaces it
    return lambda: {"lr": group["lr"], "momentum": group["momentum"]}


def build_augment(a: AugmentConfig, generator: torch.Generator) -> BatchAugment:
    return BatchAugment(padding=a.crop_padding, hflip=a.hflip, rotation=a.rotation, brightness=a.brightness,
                        contrast=a.contrast, saturation=a.saturation, mean=a.mean, std=a.std, generator=generator)


def use_cuda_graphs(cfg: Config, device: torch.device, world: int, precision: Precision) -> bool:
    """Graphs replace launch overhead on one GPU; DDP's all-reduce, torch.compile (which has its own
    graphs) and fp16's loss scaling (a host decision per step) keep the eager step."""
    return (cfg.train.cuda_graphs and device.type == "cuda" and world == 1 and not cfg.train.compile
            and not precision.scaler)


def build_train_step(cfg: Config, model: nn.Module, train_model: nn.Module, optimizer: CapturableSGD,
                     augment: BatchAugment, device: torch.device, precision: Precision,
                     scaler: Optional[torch.amp.GradScaler], world: int) -> TrainStep:
    """The eager step, replayed from CUDA graphs where `use_cuda_graphs` allows."""
    step = make_train_step(train_model, optimizer, augment, device, precision, scaler, cfg.train.channels_last)
    if use_cuda_graphs(cfg, device, world, precision):
        step = CudaGraphStep(step, model, optimizer, augment.generator)
    return step


def build_evaluator(cfg: Config, model: nn.Module, device: torch.device) -> Engine:
    """The evaluator of training and of `python -m app evaluate`: top1, top5, loss, confusion matrix."""
    a = cfg.augment
    evaluator = create_evaluator(model, Normalize(a.mean, a.std, device), device,
                                 Precision.resolve(cfg.train.amp, device), cfg.train.channels_last)
    ConfusionMatrix(cfg.model.num_classes, device=device).attach(evaluator, "confusion")
    return evaluator


def evaluation_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                       device: torch.device) -> ShardedBatches:
    """This process's unpadded shard of a test set, `batch_size` images per process and batch."""
    world = idist.get_world_size()
    return ShardedBatches(images.to(device), labels.to(device), batch_size=batch_size * world, shuffle=False,
                          rank=idist.get_rank(), world_size=world, drop_uneven=False)
