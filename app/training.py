"""The story of one training run, from the config to results.json.

`training` runs in every process (one, spawned, or started by torchrun), in four steps:

1. `initialize`: the parts, built from the config (app/builders.py): data on the device, model,
   optimizer, schedule, augmentation, training step; the checkpoint to resume from, checked;
2. rank 0 claims the run folder (app/runs.py: created, or locked for a resume) only now, when
   everything that can be refused has been;
3. `create_run`: the trainer and the evaluator, with what every process attaches;
4. `attach_rank0_outputs`, rank 0 only, the one place that decides it: files, TensorBoard, progress
   bar, the per-epoch line, the checkpoints;
5. resume (a checkpoint loaded on the CPU, each object taking its state to its device), then run.

Ignite runs the handlers of one event in the order they were attached, and the order matters:
- ITERATION_STARTED: GracefulStop before the lr scheduler (a stop saves the schedule as the last
  step left it);
- the save events (`Run.saves`: every epoch end, every `checkpoint.every_iters` iterations except an
  epoch's last, and a graceful stop on SIGTERM/SIGINT):
    every process  1. LossBuffer.flush: a diverged loss raises here, before anything is saved
                   2. evaluation (epoch end only); rank 0's results, best model and TensorBoard
                      validation handlers run on the evaluator's COMPLETED
                   3. GeneratorStates.gather: every process's augmentation generator (a collective)
    rank 0         4. EpochSummary and TensorBoard's epoch figures (epoch end only); results.json
                      marked interrupted (a graceful stop only)
                   5. TensorBoard flushed to disk, then the training checkpoint: what it holds and
                      what TensorBoard shows agree
`create_run` attaches 1-3 and `attach_rank0_outputs`, called after it, attaches 4-5.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.engine.events import EventsList
from ignite.handlers import Checkpoint, LRScheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from app.augment import BatchAugment
from app.builders import (build_augment, build_evaluator, build_optimizer, build_scheduler, build_train_step,
                          evaluation_batches, resolve_device, scheduled_values, tune_backends)
from app.checkpoint_state import GeneratorStates, RunMeta, data_fingerprint
from app.config import Config, flat_settings, momentum_range, to_dict
from app.data import Cifar100, load_cifar100
from app.engines import Precision, TrainStep, create_trainer
from app.errors import UserError
from app.loader import ShardedBatches
from app.model import build_model, count_parameters
from app.runs import RunLock, RunPlan, attach_checkpoints, claim_run_dir, load_checkpoint
from app.sgd import CapturableSGD
from handlers.atomic import remove_partial_files
from handlers.checkpoints import SaveThenRemove, best_model_checkpoint, checkpoint_event
from handlers.preemption import GracefulStop, StopEvents, TrainingInterrupted
from handlers.epoch_summary import EpochSummary
from handlers.loss_buffer import LossBuffer
from handlers.progress import attach_progress_bar
from handlers.results import RunResults
from handlers.tensorboard import TensorBoardLogging


@dataclass
class Parts:
    """What `initialize` builds for one process; nothing is attached to anything yet."""

    device: torch.device
    data: Cifar100
    train_batches: ShardedBatches
    test_batches: ShardedBatches
    model: nn.Module  # the plain module: evaluated, checkpointed
    optimizer: CapturableSGD
    scheduler: torch.optim.lr_scheduler.OneCycleLR
    augment: BatchAugment
    step: TrainStep  # trains `model` (through DDP / torch.compile where configured)
    scaler: Optional[torch.amp.GradScaler]


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
    saves: EventsList  # every event on which a training checkpoint is saved
    writers: list[SaveThenRemove] = dataclasses.field(default_factory=list)  # to wait for at the end


def initialize(cfg: Config, local_rank: int) -> Parts:
    rank, world = idist.get_rank(), idist.get_world_size()
    device = resolve_device(cfg.train.device, local_rank)
    tune_backends(device)
    torch.manual_seed(cfg.seed)  # the same initial weights in every process

    data = load_cifar100(cfg.data.root, cfg.model.num_classes)
    train_batches = ShardedBatches(data.train.images.to(device), data.train.labels.to(device),
                                   batch_size=cfg.train.batch_size, shuffle=True, seed=cfg.seed,
                                   rank=rank, world_size=world)
    test_batches = evaluation_batches(data.test.images, data.test.labels, cfg.eval.batch_size, device)

    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = build_model(cfg.model.name, cfg.model.num_classes).to(device, memory_format=memory_format)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, len(train_batches))
    train_model: nn.Module = model
    if world > 1:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        train_model = torch.compile(train_model)

    precision = Precision.resolve(cfg.train.amp, device)
    scaler = torch.amp.GradScaler(device.type) if precision.scaler else None
    augment = build_augment(cfg.augment, torch.Generator(device).manual_seed(cfg.seed * 7919 + rank))
    step = build_train_step(cfg, model, train_model, optimizer, augment, device, precision, scaler, world)
    return Parts(device, data, train_batches, test_batches, model, optimizer, scheduler, augment, step, scaler)


def sync_buffers(model: nn.Module) -> None:
    """Give every process rank 0's BatchNorm statistics. Each process updated its own in the last
    training step; without this the processes would evaluate slightly different models, none of them
    exactly the one rank 0 checkpoints."""
    for buffer in model.buffers():
        torch.distributed.broadcast(buffer, src=0)


def create_run(cfg: Config, plan: RunPlan, parts: Parts, fingerprint: str, stop: GracefulStop) -> Run:
    """The trainer and the evaluator, with the handlers every process needs (1-3 of the order above)."""
    world = idist.get_world_size()
    trainer = create_trainer(parts.step, parts.device)
    # Evaluation uses the plain module: no DDP collectives, so uneven shards cannot deadlock.
    evaluator = build_evaluator(cfg, parts.model, parts.device)

    stop.attach(trainer)  # before the scheduler
    lr_scheduler = LRScheduler(parts.scheduler)  # sets lr and, with cycle_momentum, momentum
    trainer.add_event_handler(Events.ITERATION_STARTED, lr_scheduler)

    train_batches = parts.train_batches

    @trainer.on(Events.EPOCH_STARTED)
    def _choose_epoch(engine: Engine) -> None:
        # After a resume from mid-epoch, skip the batches that epoch already trained on.
        train_batches.set_epoch(engine.state.epoch, engine.state.iteration % len(train_batches))

    # 1. flushes at every log interval and epoch end (attached here, so first on EPOCH_COMPLETED) ...
    losses = LossBuffer(cfg.logging.log_every_iters, scheduled_values(parts.optimizer)).attach(trainer)

    @trainer.on(Events.EPOCH_COMPLETED)
    def _evaluate(_: Engine) -> None:  # 2.
        if world > 1:
            sync_buffers(parts.model)
        evaluator.run(parts.test_batches)

    generators = GeneratorStates(parts.augment.generator)
    saves = checkpoint_event(cfg.checkpoint.every_iters) | StopEvents.STOP_REQUESTED
    trainer.add_event_handler(saves, losses.flush)  # 1. ... and before a save between epochs
    trainer.add_event_handler(saves, generators.gather)  # 3.

    to_save: dict[str, Any] = {"trainer": trainer, "model": parts.model, "optimizer": parts.optimizer,
                               "lr_scheduler": lr_scheduler, "augment": generators,
                               "meta": RunMeta(cfg, parts.data.classes, fingerprint)}
    if parts.scaler is not None:
        to_save["scaler"] = parts.scaler
    return Run(cfg, plan, parts.device, trainer, evaluator, parts.model, train_batches, to_save, saves)


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
    background = cfg.checkpoint.background_write
    best = best_model_checkpoint(plan.checkpoints_dir, {"model": run.model, "meta": run.to_save["meta"]}, trainer,
                                 background=background)
    evaluator.add_event_handler(Events.COMPLETED, best)
    results = RunResults(plan.run_dir / "results.json").attach(trainer, evaluator)
    run.to_save.update(best_checkpoint=best, results=results)

    show_bar = cfg.logging.progress_bar == "on" or (cfg.logging.progress_bar == "auto" and sys.stderr.isatty())
    if show_bar:
        attach_progress_bar(trainer, cfg.logging.log_every_iters)
    EpochSummary(evaluator, write, idist.get_world_size()).attach(trainer)

    # A resumed run hides what the killed process logged after its checkpoint (TensorBoard's purge).
    purge = None if resumed_iteration is None else resumed_iteration + 1
    tb = TensorBoardLogging(plan.run_dir / "tb", purge_from=purge).attach(
        trainer, evaluator, best=lambda: results.best, class_names=run.to_save["meta"].classes,
        sample_images=None if resumed_iteration else lambda: augmented_samples(run))

    trainer.add_event_handler(StopEvents.STOP_REQUESTED, results.write, "interrupted")  # 4.
    trainer.add_event_handler(run.saves, tb.flush)  # 5.
    _, saver = attach_checkpoints(trainer, plan.run_dir, run.to_save, keep_last=cfg.checkpoint.keep_last,
                                  event=run.saves, background=background)
    run.writers.extend([saver, best.save_handler])
    if plan.checkpoint is None:
        tb.log_config(to_dict(cfg))
        tb.log_hparams(hparams(cfg))
    remove_partial_files(plan.checkpoints_dir)
    remove_partial_files(plan.run_dir)
    return tb


# The HParams tab's names for the settings it always shows.
HPARAM_NAMES = {"optimizer.lr": "lr", "train.batch_size": "batch_size", "train.epochs": "epochs",
                "optimizer.weight_decay": "weight_decay", "schedule.cycle_momentum": "cycle_momentum",
                "schedule.pct_start": "pct_start", "optimizer.nesterov": "nesterov", "train.amp": "amp",
                "seed": "seed"}


def hparams(cfg: Config) -> dict[str, Any]:
    """What the HParams tab shows of a run, each in its own type: the usual settings, then those
    `logging.hparams` names (a sweep's grid keys) by their dotted keys."""
    low, high = momentum_range(cfg)  # what the optimizer used: the cycle's range, or the constant
    shown = {"lr": float(cfg.optimizer.lr), "batch_size": cfg.train.batch_size, "epochs": cfg.train.epochs,
             "weight_decay": float(cfg.optimizer.weight_decay), "cycle_momentum": cfg.schedule.cycle_momentum,
             "momentum_min": float(low), "momentum_max": float(high), "pct_start": float(cfg.schedule.pct_start),
             "nesterov": cfg.optimizer.nesterov, "amp": cfg.train.amp, "seed": cfg.seed,
             "world_size": idist.get_world_size()}
    settings = flat_settings(cfg)
    for key in cfg.logging.hparams:
        if key not in HPARAM_NAMES:
            value = settings[key]
            shown[key] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return shown


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
        *describe_schedule(cfg, steps),
        "dry run: nothing was written",
    ])


def describe_schedule(cfg: Config, iterations_per_epoch: int) -> list[str]:
    """The learning rate and momentum the optimizer will use, read off the real schedule stepped
    through the whole run: at the first iteration, at the learning rate's peak, at the last."""
    optimizer = build_optimizer(cfg, nn.Linear(1, 1))
    scheduler = build_scheduler(cfg, optimizer, iterations_per_epoch)
    group, total = optimizer.param_groups[0], scheduler.total_steps
    values = []
    for _ in range(total):
        values.append((group["lr"], group["momentum"]))
        optimizer.step()  # no gradients: nothing changes but the schedule's bookkeeping
        scheduler.step()
    peak = max(range(total), key=lambda i: values[i][0])
    first, top, last = values[0], values[peak], values[-1]
    how = ("cycled by the schedule (schedule.cycle_momentum)" if cfg.schedule.cycle_momentum
           else "constant (optimizer.momentum; schedule.cycle_momentum is false)")
    return [f"learning rate: {first[0]:.4g} at iteration 1, {top[0]:.4g} at iteration {peak + 1}, "
            f"{last[0]:.4g} at iteration {total}",
            f"momentum: {first[1]:.4g} at iteration 1, {top[1]:.4g} at iteration {peak + 1}, "
            f"{last[1]:.4g} at iteration {total}, {how}"]


def training(local_rank: int, cfg: Config, plan: RunPlan) -> None:
    rank = idist.get_rank()
    stop = GracefulStop(every=cfg.logging.log_every_iters)  # SIGTERM/SIGINT from now on: a graceful stop
    parts = initialize(cfg, local_rank)
    fingerprint = data_fingerprint(parts.data)
    # Loaded on the CPU; each object then moves its state to its device (the model and optimizer to
    # the training device, generator states stay CPU byte tensors), so a checkpoint resumes anywhere.
    checkpoint = load_checkpoint(plan.checkpoint) if plan.checkpoint else None
    if checkpoint is not None and checkpoint["meta"].get("data") != fingerprint:
        raise UserError(f"{cfg.data.root}: not the data this run was trained on (fingerprint "
                        f"{fingerprint} != {checkpoint['meta'].get('data')})")
    lock = None
    if rank == 0:
        plan, lock = claim_run_dir(cfg, plan)  # held until this process ends
    # Rank 0's folder is the one (under torchrun each process named a new one itself).
    plan = dataclasses.replace(plan, run_dir=Path(idist.broadcast(str(plan.run_dir), src=0, safe_mode=True)))
    run = create_run(cfg, plan, parts, fingerprint, stop)
    write = print if rank == 0 else (lambda _: None)
    tb = None
    if rank == 0:
        resumed = int(checkpoint["trainer"]["iteration"]) if checkpoint else (0 if plan.resume else None)
        tb = attach_rank0_outputs(run, write, resumed)
    if checkpoint is not None:
        Checkpoint.load_objects(to_load=run.to_save, checkpoint=checkpoint)
        write(f"resuming {plan.run_dir} from {plan.checkpoint.name} "
              f"(epoch {run.trainer.state.epoch}, iteration {run.trainer.state.iteration})")
        if run.to_save["augment"].reseeded:
            write("note: the checkpoint was written on another kind of device; its augmentation generator "
                  "cannot continue here, so augmentation restarts from a seed derived from it (the run "
                  "goes on, but not as it would have without the move)")
    else:
        write(f"run {plan.run_dir}: ResNet18 with {count_parameters(run.model):,} parameters on "
              f"{idist.get_world_size()} x {run.device.type}, batch {cfg.train.batch_size}, "
              f"{len(run.train_batches)} iterations per epoch")
    completed = interrupted = False
    try:
        run.trainer.run(run.train_batches, max_epochs=cfg.train.epochs)
        completed = True
    except TrainingInterrupted as e:
        e.run_dir = plan.run_dir  # for the line that says how to resume
        interrupted = True
        raise
    finally:
        finish(run.writers, tb, lock, report_write_errors=completed or interrupted)


def finish(writers: list[SaveThenRemove], tb: Optional[TensorBoardLogging], lock: Optional[RunLock],
           report_write_errors: bool) -> None:
    """Every checkpoint written in the background lands (each writer waited for, whatever another
    raised), TensorBoard is closed and the run folder released; then the first write error is raised
    if the run had ended well (the stop's or the last checkpoint did not land: that is what to report),
    else the error that ended the run is the one reported."""
    first_error: Optional[Exception] = None
    for writer in writers:
        try:
            writer.wait()
        except Exception as e:  # noqa: BLE001 - kept until every writer and the cleanup are done
            first_error = first_error or e
    if tb is not None:
        tb.close()
    if lock is not None:
        lock.release()
    if first_error is not None and report_write_errors:
        raise first_error
