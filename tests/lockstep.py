"""Two training steps compared step by step over a whole OneCycleLR cycle, each step from the same state.

Comparing two whole trajectories of ResNet18 does not work: its training is chaotic at small batches,
and two correct SGD steps that round differently in the last bit (torch.optim.SGD and app/optim.py, say)
are 1% apart in loss after 12 steps at batch 64 (measured on the CPU). So before every step the
reference takes the candidate's whole state (weights, BatchNorm statistics, momentum buffers,
augmentation generator, fp16's loss scale, the weights' EMA), both run one step on the same batch with lr
and momentum from their own real schedule, and what each step did (the loss, the change of every weight,
the momentum buffers, the EMA) is compared. The generator's state is all two sides share of the draws, so
Mixup/CutMix and Cutout compare too, and a draw from anywhere else (torch's global generator, the host)
shows as a difference. Differences cannot compound, so the tolerance can be tight; a value that a step
gets wrong (a momentum frozen at the moment of capture, say) shows at once.

Used by tests/test_cuda_graph.py (candidate: the CUDA-graph step, on a GPU) and tests/test_lockstep.py
(on the CPU: that the comparison passes for equal steps and catches a frozen momentum).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from app.augment import build_augment
from app.compiling import compile_model
from app.config import Config, override
from app.ema import WeightEma, build_ema
from app.engines import Precision, TrainStep, build_train_step, step_state
from app.loss_scale import LossScaler
from app.model import cifar_resnet18
from app.optim import CapturableSGD, build_optimizer, build_scheduler

# Every option of issue 21 on at once, each where it draws or branches the most: both mixes with the switch
# and batches left unmixed, Cutout, label smoothing, the EMA with its warm-up and its averaged BatchNorm
# statistics. Shared by the CPU check of the comparison and the GPU graphed-vs-eager test.
ALL_OPTIONS = {"loss.label_smoothing": 0.1, "augment.mixup_alpha": 0.8, "augment.cutmix_alpha": 1.0,
               "augment.mix_prob": 0.75, "augment.mix_switch_prob": 0.5, "augment.cutout": 8,
               "ema.decay": 0.9, "ema.warmup_iters": 5, "ema.warmup_decay": 0.5, "ema.buffers": "update"}


@dataclass
class Side:
    model: nn.Module
    optimizer: CapturableSGD
    scheduler: torch.optim.lr_scheduler.OneCycleLR
    generator: torch.Generator
    step: TrainStep
    scaler: Optional[LossScaler] = None
    ema: Optional[WeightEma] = None


def make_side(device: torch.device, precision: Precision, steps_per_epoch: int, epochs: int,
              wrap: Optional[Callable[[TrainStep, nn.Module, CapturableSGD, torch.Generator, list[torch.Tensor]],
                                      TrainStep]] = None,
              settings: Optional[dict] = None, loss_scale: Optional[dict] = None) -> Side:
    """The application's parts, as a run builds them for the recipe: ResNet18 (channels_last), the weights' EMA
    where `ema.decay` is set, the optimizer, OneCycleLR over `epochs` x `steps_per_epoch`, the augmentation and
    the training step of app/engines.py's build_train_step (with the loss scaler where `precision` scales, made
    with the arguments `loss_scale`): label smoothing, Mixup/CutMix and Cutout as the config says, and CUDA
    graphs only where `settings` turns train.cuda_graphs on (off by default, so that a side is eager unless
    asked). `wrap` also gets the tensors the step changes besides the model's and the optimizer's (the
    scaler's and the EMA's), as CudaGraphStep does. `settings`: config keys of the recipe changed for this side
    (train.fused_update, say); with train.compile the step trains the compiled model, as a run's does
    (app/training.py)."""
    cfg = override(Config(), {"train.epochs": epochs, "train.device": device.type, "train.cuda_graphs": False,
                              **(settings or {})})
    torch.manual_seed(0)
    model = cifar_resnet18().to(device, memory_format=torch.channels_last)
    ema = build_ema(cfg.ema, model)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    generator = torch.Generator(device).manual_seed(1)
    scaler = LossScaler(device, **(loss_scale or {})) if precision.scaler else None
    train_model = compile_model(model) if cfg.train.compile else model
    step = build_train_step(cfg, model, train_model, optimizer, build_augment(cfg.augment, generator), device,
                            precision, scaler, world=1, ema=ema)
    if wrap is not None:
        step = wrap(step, model, optimizer, generator, step_state(scaler, ema))
    return Side(model, optimizer, scheduler, generator, step, scaler, ema)


def _take_state(dst: Side, src: Side) -> None:
    with torch.no_grad():
        for d, s in zip(dst.model.state_dict().values(), src.model.state_dict().values()):
            d.copy_(s)
    dst.optimizer.state.clear()
    for pd, ps in zip(dst.model.parameters(), src.model.parameters()):
        if "momentum_buffer" in src.optimizer.state[ps]:
            dst.optimizer.state[pd]["momentum_buffer"] = src.optimizer.state[ps]["momentum_buffer"].clone()
    dst.generator.set_state(src.generator.get_state())
    for d, s in zip(step_state(dst.scaler, dst.ema), step_state(src.scaler, src.ema)):
        d.copy_(s)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> float:
    """max |a - b| in units of rtol x max |b| (<= 1 passes)."""
    scale = b.abs().max().item()
    return 0.0 if scale == 0 else (a - b).abs().max().item() / (rtol * scale)


def compare_steps(reference: Side, candidate: Side, epoch: list[tuple[torch.Tensor, torch.Tensor]], epochs: int,
                  rtol: float) -> list[dict]:
    """Run both over `epochs` x `epoch`; per step, the figures compared. Raises AssertionError at the
    first step where loss, a weight's change or a momentum buffer differs by more than rtol (relative
    to the reference's largest value in that tensor)."""
    log = []
    for i in range(epochs * len(epoch)):
        images, labels = epoch[i % len(epoch)]
        _take_state(reference, candidate)
        before = [p.detach().clone() for p in candidate.model.parameters()]
        loss_c = candidate.step(images, labels)[0].item()
        loss_r = reference.step(images, labels)[0].item()
        for side in (reference, candidate):
            side.scheduler.step()
        worst = abs(loss_c - loss_r) / (rtol * abs(loss_r))
        for w0, pc, pr in zip(before, candidate.model.parameters(), reference.model.parameters()):
            worst = max(worst, _close(pc.detach() - w0, pr.detach() - w0, rtol),
                        _close(candidate.optimizer.state[pc]["momentum_buffer"],
                               reference.optimizer.state[pr]["momentum_buffer"], rtol))
        for bc, br in zip(candidate.model.buffers(), reference.model.buffers()):  # BatchNorm statistics
            if bc.dtype.is_floating_point:
                worst = max(worst, _close(bc, br, rtol))
        if candidate.ema is not None:  # the EMA's weights and statistics; its update count exactly
            for ec, er in zip(candidate.ema.tensors(), reference.ema.tensors()):
                worst = max(worst, _close(ec, er, rtol) if ec.dtype.is_floating_point
                            else (0.0 if torch.equal(ec, er) else float("inf")))
        momentum = candidate.optimizer.scheduled_tensors()["momentum"].item()
        scale = None
        if candidate.scaler is not None:  # both skipped the step or neither: the same scale, exactly
            scale = candidate.scaler.scale_tensor.item()
            if scale != reference.scaler.scale_tensor.item():
                worst = float("inf")
        log.append({"step": i + 1, "batch": len(labels), "loss": loss_c, "momentum": momentum, "scale": scale,
                    "worst": worst})
        if worst > 1:
            raise AssertionError(f"step {i + 1} (batch {len(labels)}, momentum {momentum:.4f}): differs by "
                                 f"{worst:.1f}x the tolerance {rtol}")
    return log
