"""The story of one training run, from the config to results.json, as every process tells it (one
process, spawned ones, or torchrun's):

1. `build_parts`: every part of the run from the config, in the order the data flows: data (its
   fingerprint hashed meanwhile), device, batches, model, optimizer and schedule, precision,
   augmentation, training step;
2. the checkpoint to resume from (loaded once: by the launcher's check when that ran in this process),
   and rank 0 claims the run folder (app/runs.py), now that everything that can be refused has been;
3. `wire_run`: the trainer and the evaluator with every handler, attached from one ordered list;
4. resume (each object takes its state to its device), run, and `finish`.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, LRScheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from app.augment import BatchAugment, build_augment
from app.checkpoint import (TRAINING_KEYS, GeneratorStates, RunMeta, attach_checkpoints, best_model_checkpoint,
                            data_fingerprint_in_background)
from app.compiling import compile_cache_dir, compile_model
from app.config import Config, to_dict
from app.data import CifarData, load_dataset
from app.device import memory_format, resolve_device
from app.ema import WeightEma, build_ema
from app.engines import Precision, TrainStep, build_train_step, create_evaluator, create_trainer, evaluation_batches
from app.errors import UserError
from app.hparams import hparams
from app.launch import failure
from app.loader import ShardedBatches
from app.loss_scale import LossScaler
from app.model import build_model, count_parameters
from app.optim import CapturableSGD, build_optimizer, build_scheduler, scheduled_values
from app.runs import RunLock, RunPlan, claim_run_dir
from handlers.atomic import remove_partial_files
from handlers.checkpoints import SaveThenRemove, checkpoint_event
from handlers.epoch_summary import EpochSummary
from handlers.loss_buffer import LossBuffer
from handlers.preemption import GracefulStop, StopEvents, TrainingInterrupted
from handlers.progress import ProgressLines, attach_progress_bar, line_iterations, timestamped
from handlers.metrics_csv import MetricsCsv
from handlers.results import RunResults, run_summary
from handlers.tensorboard import TensorBoardLogging


@dataclass
class RunParts:
    """Every part of one process's run, built from the config; nothing is attached to anything yet."""

    device: torch.device
    data: CifarData
    data_fingerprint: Future[str]  # app/checkpoint.py, hashed while the rest is built
    train_batches: ShardedBatches
    test_batches: ShardedBatches
    model: nn.Module  # the plain module: evaluated, checkpointed
    optimizer: CapturableSGD
    scheduler: torch.optim.lr_scheduler.OneCycleLR
    augment: BatchAugment
    step: TrainStep  # trains `model` (through DDP / torch.compile where configured)
    scaler: Optional[LossScaler]  # fp16's, in the training checkpoint as "scaler"
    ema: Optional[WeightEma] = None  # the weights' EMA (`ema.decay`), updated inside `step`


def build_parts(cfg: Config, local_rank: int) -> RunParts:
    rank, world = idist.get_rank(), idist.get_world_size()
    data = load_dataset(cfg.data.root, cfg.data.dataset)
    fingerprint = data_fingerprint_in_background(data)  # first: the device's set-up runs meanwhile
    device = resolve_device(cfg.train.device, local_rank)
    torch.manual_seed(cfg.seed)  # the same initial weights in every process

    train_batches = ShardedBatches(data.train.images.to(device), data.train.labels.to(device),
                                   batch_size=cfg.train.batch_size, shuffle=True, seed=cfg.seed,
                                   rank=rank, world_size=world)
    test_batches = evaluation_batches(data.test.images, data.test.labels, cfg.eval.batch_size, device)

    model = build_model(cfg.model.name, cfg.model.num_classes)
    model = model.to(device, memory_format=memory_format(cfg.train.channels_last))
    ema = build_ema(cfg.ema, model)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, len(train_batches))
    train_model: nn.Module = model
    if world > 1:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        train_model.register_comm_hook(None, allreduce_each_gradient)
    if cfg.train.compile:
        train_model = compile_model(train_model)

    precision = Precision.resolve(cfg.train.amp, device)
    scaler = LossScaler(device) if precision.scaler else None
    augment = build_augment(cfg.augment, torch.Generator(device).manual_seed(cfg.seed * 7919 + rank))
    step = build_train_step(cfg, model, train_model, optimizer, augment, device, precision, scaler, world, ema)
    return RunParts(device, data, fingerprint, train_batches, test_batches, model, optimizer, scheduler, augment, step,
                    scaler, ema)


@dataclass
class WiredRun:
    """The engines of one process's run with their handlers attached."""

    trainer: Engine
    evaluator: Engine
    to_save: dict[str, Any]  # what a training checkpoint holds (app/checkpoint.py)
    writers: list[SaveThenRemove] = dataclasses.field(default_factory=list)  # rank 0's, to wait for at the end
    tensorboard: Optional[TensorBoardLogging] = None  # rank 0's
    results: Optional[RunResults] = None  # rank 0's
    ema_evaluator: Optional[Engine] = None  # the EMA model's evaluation, beside the model's


def wire_run(cfg: Config, plan: RunPlan, parts: RunParts, meta: RunMeta, stop: GracefulStop, rank0: bool,
             write: Callable[[str], None]) -> WiredRun:
    """The trainer and the evaluator, and every handler in the one order that works.

    Ignite runs the handlers of an event in the order they were attached, and the order matters on two
    events. ITERATION_STARTED: the graceful stop before the lr scheduler, so that a stop saves the
    schedule as the last step left it. The save events (`saves`: every epoch end, every
    `checkpoint.every_iters` iterations but an epoch's last, and a graceful stop on SIGTERM, SIGINT or
    SIGHUP): the numbered lines below. Rank 0 only, and this is the one place that decides it: files,
    TensorBoard, the progress bar, the epoch's line.
    """
    world = idist.get_world_size()
    trainer = create_trainer(parts.step, parts.device)
    # Evaluation uses the plain module: no DDP collectives, so uneven shards cannot deadlock.
    evaluator = create_evaluator(cfg, parts.model, parts.device)
    ema = parts.ema
    ema_evaluator = create_evaluator(cfg, ema.ema_model, parts.device) if ema is not None else None
    saves = checkpoint_event(cfg.checkpoint.every_iters) | StopEvents.STOP_REQUESTED
    lr_scheduler = LRScheduler(parts.scheduler)  # sets lr and, with cycle_momentum, momentum
    losses = LossBuffer(cfg.logging.log_every_iters, scheduled_values(parts.optimizer),
                        late=cfg.logging.read_losses_late)
    generators = GeneratorStates(parts.augment.generator)
    to_save: dict[str, Any] = {"trainer": trainer, "model": parts.model, "optimizer": parts.optimizer,
                               "lr_scheduler": lr_scheduler, "augment": generators, "meta": meta,
                               "losses": losses}
    if parts.scaler is not None:
        to_save["scaler"] = parts.scaler
    if ema is not None:
        to_save["ema"] = ema

    def choose_epoch(engine: Engine) -> None:
        # After a resume from mid-epoch, skip the batches that epoch already trained on.
        parts.train_batches.set_epoch(engine.state.epoch, engine.state.iteration % len(parts.train_batches))

    def evaluate(_: Engine) -> None:
        # The EMA's first: the model's evaluation, whose COMPLETED handlers log the best so far, then
        # finds it up to date whichever of the two picks the best model (`ema.select_best`).
        if ema_evaluator is not None:
            if world > 1:
                sync_buffers(ema.ema_model)
            ema_evaluator.run(parts.test_batches)
        if world > 1:
            sync_buffers(parts.model)
        evaluator.run(parts.test_batches)

    # Every process, in this order.
    stop.attach(trainer)  # ITERATION_STARTED, before the scheduler
    trainer.add_event_handler(Events.ITERATION_STARTED, lr_scheduler)
    trainer.add_event_handler(Events.EPOCH_STARTED, choose_epoch)
    # 1. The losses, read every log interval (with logging.read_losses_late, the interval before), and
    #    all of them at each epoch's end and before any other save: a diverged loss raises before anything
    #    is saved, and a checkpoint holds no value unread.
    losses.attach(trainer)
    trainer.add_event_handler(saves, losses.flush)
    if cfg.logging.progress_every_iters:  # in every process: rank 0's progress line reads the losses there
        trainer.add_event_handler(line_iterations(cfg.logging.progress_every_iters), losses.flush)
    # 2. The epoch's evaluation (rank 0's results, best model and TensorBoard validation handlers run on
    #    the evaluator's COMPLETED).
    trainer.add_event_handler(Events.EPOCH_COMPLETED, evaluate)
    # 3. Every process's augmentation generator, for rank 0's checkpoint (a collective).
    trainer.add_event_handler(saves, generators.gather)
    if not rank0:
        return WiredRun(trainer, evaluator, to_save, ema_evaluator=ema_evaluator)

    background = cfg.checkpoint.background_write
    saver = SaveThenRemove(plan.checkpoints_dir, background)  # one writer: files land in the order asked
    # The best model and results.json's best and final: the evaluation `ema.select_best` names.
    chosen, chosen_model = (ema_evaluator, ema.ema_model) if ema is not None and cfg.ema.select_best == "ema" \
        else (evaluator, parts.model)
    best = best_model_checkpoint(saver, chosen_model, meta, trainer, chosen)
    chosen.add_event_handler(Events.COMPLETED, best)
    results = RunResults(plan.run_dir / "results.json")
    metrics = MetricsCsv(plan.run_dir / "metrics.csv", results.wall_time)
    to_save.update(best_checkpoint=best, results=results, metrics=metrics)
    if cfg.logging.progress_bar == "on" or (cfg.logging.progress_bar == "auto" and sys.stderr.isatty()):
        attach_progress_bar(trainer, cfg.logging.log_every_iters)
    else:
        ProgressLines(write, evaluator, cfg.logging.progress_every_iters, world).attach(trainer)
    # 4. The epoch's line, after its evaluation; then, with the line's times, results.json, metrics.csv
    #    and TensorBoard's epoch figures; at the end, the run's summary after results.json says finished.
    EpochSummary(evaluator, write, world, ema_evaluator).attach(trainer)
    results.attach(trainer, chosen)
    metrics.attach(trainer, evaluator, ema_evaluator)
    trainer.add_event_handler(Events.COMPLETED, lambda e: write(run_summary(results.as_dict(e, "finished"),
                                                                            plan.run_dir)))
    # A resumed run hides what earlier processes logged after its checkpoint (one resumed without a
    # checkpoint starts afresh, app/runs.py); what a run logs at its start, only its first process logs.
    purge = plan.checkpoint.iteration + 1 if plan.checkpoint else None
    tb = TensorBoardLogging(plan.run_dir / "tb", purge_from=purge, figures_every=cfg.logging.figures_every_epochs,
                            background=cfg.logging.read_losses_late).attach(
        trainer, evaluator, best=lambda: results.best, class_names=meta.classes, ema_evaluator=ema_evaluator,
        sample_images=None if plan.checkpoint else lambda: augmented_samples(cfg, parts))
    # 5. TensorBoard on disk (its writer thread drained first), then the training checkpoint: what it holds
    #    and what TensorBoard shows agree.
    trainer.add_event_handler(saves, tb.flush)
    attach_checkpoints(trainer, saver, to_save, keep_last=cfg.checkpoint.keep_last, event=saves,
                       background=background)
    # 6. A stop: its checkpoint (and any best model before it) on disk, then results.json says
    #    interrupted; only then does GracefulStop let any process go.
    trainer.add_event_handler(StopEvents.STOP_REQUESTED, saver.wait)
    trainer.add_event_handler(StopEvents.STOP_REQUESTED, results.write, "interrupted")
    if plan.checkpoint is None:
        tb.log_config(to_dict(cfg))
        tb.log_hparams(hparams(cfg, world, parts.device))
    remove_partial_files(plan.checkpoints_dir)
    remove_partial_files(plan.run_dir)
    return WiredRun(trainer, evaluator, to_save, [saver], tb, results, ema_evaluator)


def allreduce_each_gradient(group, bucket):  # noqa: ANN001 - DDP refuses a hook whose annotations are strings
    """(group, dist.GradBucket) -> Future[Tensor]: DDP's gradient average, one all-reduce per parameter instead
    of one per bucket of parameters. Why: an all-reduce of more than two processes sums each element in an order
    that depends on where it lies in the buffer reduced, and DDP lays its buckets out anew after a process's
    first step; so the first step after a resume would sum in another order than the uninterrupted run did, and
    the runs would part by a rounding (seen with 4 processes). Each parameter's own all-reduce is the same in
    every step of every process. The cost: a few dozen small collectives a step instead of a few."""
    world = torch.distributed.get_world_size(group)
    works = [torch.distributed.all_reduce(g, group=group, async_op=True) for g in bucket.gradients()]
    return torch.futures.collect_all([w.get_future() for w in works]).then(lambda _: bucket.buffer().div_(world))


def sync_buffers(model: nn.Module) -> None:
    """Give every process rank 0's BatchNorm statistics. Each process updated its own in the last
    training step; without this the processes would evaluate slightly different models, none of them
    exactly the one rank 0 checkpoints."""
    for buffer in model.buffers():
        torch.distributed.broadcast(buffer, src=0)


def augmented_samples(cfg: Config, parts: RunParts, n: int = 64) -> torch.Tensor:
    """The first n training images as the training step sees them, un-normalised for display. A
    generator of their own: the training generator's draws (and so exact resume) stay untouched."""
    augment = build_augment(cfg.augment, torch.Generator(parts.device).manual_seed(cfg.seed))
    x = augment(parts.train_batches.images[:n])
    mean = torch.tensor(cfg.augment.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.augment.std, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


def training(local_rank: int, cfg: Config, plan: RunPlan) -> None:
    rank0 = idist.get_rank() == 0
    stop = GracefulStop()  # SIGTERM, SIGINT, SIGHUP from now on: a graceful stop
    try:
        _train(cfg, plan, local_rank, rank0, stop)
    finally:
        stop.restore()


def _train(cfg: Config, plan: RunPlan, local_rank: int, rank0: bool, stop: GracefulStop) -> None:
    parts = build_parts(cfg, local_rank)
    fingerprint = parts.data_fingerprint.result()
    # Loaded on the CPU; each object then moves its state to its device (the model and optimizer to
    # the training device, generator states stay CPU byte tensors), so a checkpoint resumes anywhere.
    checkpoint = None
    if plan.checkpoint is not None:
        checkpoint = plan.checkpoint.take()
        if plan.checkpoint.data_fingerprint != fingerprint:
            raise UserError(f"{cfg.data.root}: not the data this run was trained on (fingerprint "
                            f"{fingerprint} != {plan.checkpoint.data_fingerprint})")
    lock = None
    if rank0:
        plan, lock = claim_run_dir(cfg, plan)  # held until this process ends
    # Rank 0's folder is the one (under torchrun each process named a new one itself).
    plan = dataclasses.replace(plan, run_dir=Path(idist.broadcast(str(plan.run_dir), src=0, safe_mode=True)))
    write = timestamped(functools.partial(print, flush=True)) if rank0 else (lambda _: None)  # a log file: now
    run = wire_run(cfg, plan, parts, RunMeta(cfg, parts.data.classes, fingerprint), stop, rank0, write)
    if checkpoint is not None:
        # What an older version did not save yet (the smoothed loss) starts afresh.
        to_load = {k: v for k, v in run.to_save.items() if k != "meta" and (k in checkpoint or k in TRAINING_KEYS)}
        Checkpoint.load_objects(to_load=to_load, checkpoint=checkpoint)
        del checkpoint  # the model and optimizer hold their own copies now
        write(f"resuming {plan.run_dir} from {plan.checkpoint.path.name} "
              f"(epoch {run.trainer.state.epoch}, iteration {run.trainer.state.iteration})")
        if run.to_save["augment"].reseeded:
            write("note: the checkpoint was written on another kind of device; its augmentation generator "
                  "cannot continue here, so augmentation restarts from a seed derived from it (the run "
                  "goes on, but not as it would have without the move)")
    else:
        write(f"run {plan.run_dir}: ResNet18 with {count_parameters(parts.model):,} parameters on "
              f"{idist.get_world_size()} x {parts.device.type}, batch {cfg.train.batch_size}, "
              f"{len(parts.train_batches)} iterations per epoch")
    compile_cache = compile_cache_dir(cfg, plan.run_dir.parent)  # the launcher pointed torch at it
    if compile_cache is not None:
        write(f"torch.compile: compiled code kept in {compile_cache}, where a later run finds it instead of "
              f"compiling again")
    error: Optional[BaseException] = None
    try:
        run.trainer.run(parts.train_batches, max_epochs=cfg.train.epochs)
        late = stop.final_request()  # in every process: a signal after the last step is answered too
        if late:
            state = run.trainer.state
            raise TrainingInterrupted(late, state.iteration, state.epoch, finished=True)
    except TrainingInterrupted as e:
        e.run_dir = plan.run_dir  # for the line that says how to resume
        raise
    except BaseException as e:
        error = e
        raise
    finally:
        finish(run, lock, error)


def finish(run: WiredRun, lock: Optional[RunLock], error: Optional[BaseException]) -> None:
    """Every checkpoint written in the background lands (each writer waited for, whatever another
    raised); a run that ends in an error (`error`, or a write that failed) has results.json say
    `failed` with the line that says why; TensorBoard is closed and the run folder released. Then the
    first write error is raised if the run had ended well (the stop's or the last checkpoint did not
    land: that is what to report), else the error that ended the run is the one reported."""
    first_error: Optional[Exception] = None
    for writer in run.writers:
        try:
            writer.wait()
        except Exception as e:  # noqa: BLE001 - kept until every writer and the cleanup are done
            first_error = first_error or e
    failed = error or first_error
    if run.results is not None and failed is not None:
        try:
            run.results.write(run.trainer, "failed", error=failure_reason(failed))
        except Exception:  # noqa: BLE001 - a full disk, say: the error that ended the run is the one to report
            pass
    if run.tensorboard is not None:
        run.tensorboard.close()
    if lock is not None:
        lock.release()
    if first_error is not None and error is None:
        raise first_error


def failure_reason(error: BaseException) -> str:
    """The one line results.json gives for a run that ended in `error`: what the command prints."""
    known = failure(error)
    if known is not None and known[0]:
        return known[0].removeprefix("error: ")
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
