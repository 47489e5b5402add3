"""The story of one training run, from the config to results.json.

`training` runs in every process (one, spawned, or started by torchrun). Everything every process must
do is in `training`; everything only rank 0 does (files, TensorBoard, progress, the summary line) is in
`attach_rank0_outputs`, the one place that decides it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, LRScheduler
from ignite.metrics import ConfusionMatrix
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from app.augment import BatchAugment, Normalize
from app.config import AugmentConfig, Config, to_dict
from app.data import Cifar100, load_cifar100
from app.errors import UserError
from app.cuda_graph import CudaGraphStep
from app.engines import Precision, TrainStep, create_evaluator, create_trainer, make_train_step
from app.loader import ShardedBatches
from app.model import build_model, count_parameters
from app.runs import RunPlan, load_checkpoint
from handlers.atomic import remove_partial_files
from handlers.checkpoints import attach_training_checkpoint, best_model_checkpoint, checkpoint_event
from handlers.epoch_summary import EpochSummary
from handlers.loss_buffer import LossBuffer
from handlers.progress import attach_progress_bar
from handlers.results import RunResults, write_json_atomic
from handlers.tensorboard import TensorBoardLogging


class RunMeta:
    """What a checkpoint must carry besides weights: the config it was trained with and the class names.
    Stored as JSON text, so that loading needs nothing but weights_only=True."""

    def __init__(self, cfg: Config, classes: tuple[str, ...], data_fingerprint: str) -> None:
        self.config, self.classes, self.data_fingerprint = to_dict(cfg), list(classes), data_fingerprint

    def state_dict(self) -> dict[str, Any]:
        return {"config": json.dumps(self.config), "classes": json.dumps(self.classes),
                "data": self.data_fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass  # informational: the running config is authoritative, and checked against the run's


class GeneratorStates:
    """Every process's augmentation generator, for the training checkpoint that rank 0 writes.

    Each process draws its own augmentations; an exact resume needs each of them back in its own
    process. `gather` runs in every process just before the checkpoint handler (a collective when
    there are several), and rank 0's checkpoint stores one row per rank.
    """

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self._gathered: torch.Tensor | None = None

    def gather(self, _: Engine | None = None) -> None:
        if idist.get_world_size() > 1:
            state = self.generator.get_state()[None].to(idist.device())
            self._gathered = idist.all_gather(state).cpu()

    def state_dict(self) -> dict[str, Any]:
        if idist.get_world_size() == 1 or self._gathered is None:
            return {"generators": self.generator.get_state()[None]}
        return {"generators": self._gathered}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # With another number of processes than the run had, resume is no longer exact (the data
        # shards change anyway); each process takes a row so that their streams stay distinct.
        rows = state["generators"]
        self.generator.set_state(rows[idist.get_rank() % len(rows)].clone())


def data_fingerprint(data: Cifar100) -> str:
    """A hash of every image and label, so that a resume on other data is refused."""
    h = hashlib.sha256()
    for split in (data.train, data.test):
        h.update(split.images.numpy().tobytes())
        h.update(split.labels.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Run:
    """The objects of one process's run, as the handlers need them."""

    cfg: Config
    plan: RunPlan
    device: torch.device
    trainer: Engine
    evaluator: Engine
    model: nn.Module
    train_batches: ShardedBatches
    to_save: dict[str, Any]


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _tune_backends(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def build_optimizer(cfg: Config, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optimizer
    fused = device.type == "cuda"
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                           nesterov=o.nesterov, fused=fused or None, foreach=None if fused else True)


def sync_buffers(model: nn.Module) -> None:
    """Give every process rank 0's BatchNorm statistics. Each process updated its own in the last
    training step; without this the processes would evaluate slightly different models, none of them
    exactly the one rank 0 checkpoints."""
    for buffer in model.buffers():
        torch.distributed.broadcast(buffer, src=0)


def use_cuda_graphs(cfg: Config, device: torch.device, world: int, precision: Precision) -> bool:
    """Graphs replace launch overhead on one GPU; DDP's all-reduce, torch.compile (which has its own
    graphs) and fp16's loss scaling (a host decision per step) keep the eager step."""
    return (cfg.train.cuda_graphs and device.type == "cuda" and world == 1 and not cfg.train.compile
            and not precision.scaler)


def build_train_step(cfg: Config, model: nn.Module, train_model: nn.Module, optimizer: torch.optim.Optimizer,
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


def build_run(cfg: Config, plan: RunPlan, local_rank: int) -> Run:
    rank, world = idist.get_rank(), idist.get_world_size()
    device = resolve_device(cfg.train.device, local_rank)
    _tune_backends(device)
    torch.manual_seed(cfg.seed)  # the same initial weights in every process

    data = load_cifar100(cfg.data.root, cfg.model.num_classes)
    train_batches = ShardedBatches(data.train.images.to(device), data.train.labels.to(device),
                                   batch_size=cfg.train.batch_size, shuffle=True, seed=cfg.seed,
                                   rank=rank, world_size=world)
    test_batches = evaluation_batches(data.test.images, data.test.labels, cfg.eval.batch_size, device)

    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = build_model(cfg.model.name, cfg.model.num_classes).to(device, memory_format=memory_format)
    optimizer = build_optimizer(cfg, model, device)
    train_model: nn.Module = model
    if world > 1:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        train_model = torch.compile(train_model)

    precision = Precision.resolve(cfg.train.amp, device)
    scaler = torch.amp.GradScaler(device.type) if precision.scaler else None
    a = cfg.augment
    augment = build_augment(a, torch.Generator(device).manual_seed(cfg.seed * 7919 + rank))

    step = build_train_step(cfg, model, train_model, optimizer, augment, device, precision, scaler, world)
    trainer = create_trainer(step, device)
    # Evaluation uses the plain module: no DDP collectives, so uneven shards cannot deadlock.
    evaluator = build_evaluator(cfg, model, device)

    s = cfg.schedule
    lr_scheduler = LRScheduler(torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.optimizer.lr, total_steps=cfg.train.epochs * len(train_batches),
        pct_start=s.pct_start, anneal_strategy=s.anneal_strategy, div_factor=s.div_factor,
        final_div_factor=s.final_div_factor))
    trainer.add_event_handler(Events.ITERATION_STARTED, lr_scheduler)

    @trainer.on(Events.EPOCH_STARTED)
    def _choose_epoch(engine: Engine) -> None:
        # After a resume from mid-epoch, skip the batches that epoch already trained on.
        train_batches.set_epoch(engine.state.epoch, engine.state.iteration % len(train_batches))

    losses = LossBuffer(cfg.logging.log_every_iters, lambda: optimizer.param_groups[0]["lr"]).attach(trainer)

    @trainer.on(Events.EPOCH_COMPLETED)
    def _evaluate(_: Engine) -> None:
        if world > 1:
            sync_buffers(model)
        evaluator.run(test_batches)

    # Before rank 0's checkpoint handler (attached later) on the same events, in every process: a
    # diverged loss stops the run before it can be saved, and every generator's state is collected.
    generators = GeneratorStates(augment.generator)
    trainer.add_event_handler(checkpoint_event(cfg.checkpoint.every_iters), losses.flush)
    trainer.add_event_handler(checkpoint_event(cfg.checkpoint.every_iters), generators.gather)

    to_save: dict[str, Any] = {"trainer": trainer, "model": model, "optimizer": optimizer,
                               "lr_scheduler": lr_scheduler, "augment": generators,
                               "meta": RunMeta(cfg, data.classes, data_fingerprint(data))}
    if scaler is not None:
        to_save["scaler"] = scaler
    return Run(cfg, plan, device, trainer, evaluator, model, train_batches, to_save)


def build_augment(a: AugmentConfig, generator: torch.Generator) -> BatchAugment:
    return BatchAugment(padding=a.crop_padding, hflip=a.hflip, rotation=a.rotation, brightness=a.brightness,
                        contrast=a.contrast, saturation=a.saturation, mean=a.mean, std=a.std, generator=generator)


def augmented_samples(run: Run, n: int = 64) -> torch.Tensor:
    """The first n training images as the training step sees them, un-normalised for display. A
    generator of their own: the training generator's draws (and so exact resume) stay untouched."""
    a = run.cfg.augment
    augment = build_augment(a, torch.Generator(run.device).manual_seed(run.cfg.seed))
    x = augment(run.train_batches.images[:n])
    mean = torch.tensor(a.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(a.std, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def attach_rank0_outputs(run: Run, write: Callable[[str], None], resumed_iteration: Optional[int]
                         ) -> TensorBoardLogging:
    """Files, TensorBoard, progress and the per-epoch line: rank 0 only. Adds the objects whose state
    must survive a resume (best-model tracker, results) to `run.to_save`."""
    cfg, plan, trainer, evaluator = run.cfg, run.plan, run.trainer, run.evaluator
    best = best_model_checkpoint(plan.checkpoints_dir, {"model": run.model, "meta": run.to_save["meta"]}, trainer)
    evaluator.add_event_handler(Events.COMPLETED, best)
    results = RunResults(plan.run_dir / "results.json").attach(trainer, evaluator)
    run.to_save.update(best_checkpoint=best, results=results)

    show_bar = cfg.logging.progress_bar == "on" or (cfg.logging.progress_bar == "auto" and sys.stderr.isatty())
    if show_bar:
        attach_progress_bar(trainer, cfg.logging.log_every_iters)
    EpochSummary(evaluator, write, idist.get_world_size()).attach(trainer)

    # A resumed run hides what the killed process logged after its checkpoint (TensorBoard's purge).
    purge = None if resumed_iteration is None else (resumed_iteration + 1,
                                                     resumed_iteration // len(run.train_batches) + 1)
    tb = TensorBoardLogging(plan.run_dir / "tb", purge_from=purge).attach(
        trainer, evaluator, sample_images=None if resumed_iteration else lambda: augmented_samples(run))

    @trainer.on(Events.COMPLETED)
    def _final_hparams(_: Engine) -> None:
        hp = {"lr": cfg.optimizer.lr, "batch_size": cfg.train.batch_size, "epochs": cfg.train.epochs,
              "momentum": cfg.optimizer.momentum, "weight_decay": cfg.optimizer.weight_decay,
              "amp": cfg.train.amp, "seed": cfg.seed, "world_size": idist.get_world_size()}
        metrics = {"hparam/best_top1": results.best.get("top1", 0.0),
                   "hparam/final_top1": results.final.get("top1", 0.0),
                   "hparam/final_top5": results.final.get("top5", 0.0)}
        tb.log_hparams(hp, metrics)

    attach_training_checkpoint(trainer, plan.checkpoints_dir, run.to_save,
                               keep_last=cfg.checkpoint.keep_last, every_iters=cfg.checkpoint.every_iters)
    if plan.checkpoint is None:
        tb.log_config(to_dict(cfg))
    remove_partial_files(plan.checkpoints_dir)
    remove_partial_files(plan.run_dir)
    return tb


def describe_run(cfg: Config, world: int) -> str:
    """What --dry-run prints: the resolved config, the data and the model, after checking all three."""
    data = load_cifar100(cfg.data.root, cfg.model.num_classes)
    model = build_model(cfg.model.name, cfg.model.num_classes)
    per_process = cfg.train.batch_size // world
    steps = -(-(len(data.train) // world) // per_process)
    return "\n".join([
        json.dumps(to_dict(cfg), indent=2),
        f"model: {cfg.model.name}, {count_parameters(model):,} parameters",
        f"data: {len(data.train):,} training and {len(data.test):,} test images in {cfg.data.root}",
        f"schedule: {cfg.train.epochs} epochs x {steps} iterations (batch {cfg.train.batch_size} = "
        f"{world} x {per_process})",
        "dry run: nothing was written",
    ])


def prepare_run_dir(cfg: Config, plan: RunPlan) -> None:
    """Create the run folder with its resolved config (rank 0). A new folder is assembled under a
    hidden name and renamed into place, so that a run folder never exists without its config.json
    (a run killed right at its start can always be resumed or started again)."""
    if plan.run_dir.exists():  # resumed before its first checkpoint: start again in place
        plan.checkpoints_dir.mkdir(exist_ok=True)
        write_json_atomic(plan.run_dir / "config.json", to_dict(cfg))
        return
    plan.run_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=plan.run_dir.parent, prefix=f".partial-{plan.run_dir.name}-"))
    write_json_atomic(staging / "config.json", to_dict(cfg))
    (staging / "checkpoints").mkdir()
    os.rename(staging, plan.run_dir)


def training(local_rank: int, cfg: Config, plan: RunPlan) -> None:
    rank = idist.get_rank()
    # Under torchrun each process named the new run folder itself; rank 0's name is the one.
    plan = dataclasses.replace(plan, run_dir=Path(idist.broadcast(str(plan.run_dir), src=0, safe_mode=True)))
    run = build_run(cfg, plan, local_rank)
    checkpoint = load_checkpoint(plan.checkpoint, map_location=run.device) if plan.checkpoint else None
    if checkpoint is not None and checkpoint["meta"].get("data") != run.to_save["meta"].data_fingerprint:
        raise UserError(f"{cfg.data.root}: not the data this run was trained on (fingerprint "
                        f"{run.to_save['meta'].data_fingerprint} != {checkpoint['meta'].get('data')})")
    write = print if rank == 0 else (lambda _: None)
    tb = None
    if rank == 0:
        if checkpoint is None:
            prepare_run_dir(cfg, plan)
        resumed = int(checkpoint["trainer"]["iteration"]) if checkpoint else (0 if plan.resume else None)
        tb = attach_rank0_outputs(run, write, resumed)
    if checkpoint is not None:
        Checkpoint.load_objects(to_load=run.to_save, checkpoint=checkpoint)
        write(f"resuming {plan.run_dir} from {plan.checkpoint.name} "
              f"(epoch {run.trainer.state.epoch}, iteration {run.trainer.state.iteration})")
    else:
        write(f"run {plan.run_dir}: ResNet18 with {count_parameters(run.model):,} parameters on "
              f"{idist.get_world_size()} x {run.device.type}, batch {cfg.train.batch_size}, "
              f"{len(run.train_batches)} iterations per epoch")
    try:
        run.trainer.run(run.train_batches, max_epochs=cfg.train.epochs)
    finally:
        if tb is not None:
            tb.close()
