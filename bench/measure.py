"""The measurements behind `python -m bench`, each a function returning plain numbers."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.handlers import LRScheduler
from torch.utils.flop_counter import FlopCounterMode

from app.augment import build_augment
from app.compiling import compile_model
from app.config import Config
from app.device import memory_format
from app.engines import Precision, build_train_step, create_trainer
from app.loader import ShardedBatches, iterations_per_epoch
from app.loss_scale import LossScaler
from app.model import build_model
from app.optim import build_optimizer, build_scheduler, scheduled_values
from bench.seed_pipeline import as_pil, run_per_image, seed_transform
from handlers.loss_buffer import LossBuffer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def random_images(n: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 100, (n,), generator=g)
    return images.to(device), labels.to(device)


def augmentation(cfg: Config, device: torch.device, n_seed: int, n_ours: int, batch: int = 128) -> dict:
    """Images per second of the seed's per-image pipeline and of BatchAugment, on the same images."""
    images, _ = random_images(max(n_seed, batch), device)
    on_tensors = device.type == "cuda"
    seed = seed_transform(cfg.augment.mean, cfg.augment.std, on_tensors=on_tensors)
    seed_inputs = list(images[:n_seed]) if on_tensors else as_pil(images[:n_seed])
    run_per_image(seed, seed_inputs[:8])  # warm-up
    seed_s = timed(lambda: run_per_image(seed, seed_inputs), device)

    ours = build_augment(cfg.augment, torch.Generator(device).manual_seed(0))
    x = images[:batch]
    for _ in range(3):
        ours(x)
    reps = max(1, n_ours // batch)

    def run_ours() -> None:
        for _ in range(reps):
            ours(x)

    ours_s = min(timed(run_ours, device) for _ in range(3))
    seed_ips, ours_ips = n_seed / seed_s, reps * batch / ours_s
    return {"seed_img_s": seed_ips, "ours_img_s": ours_ips, "speedup": ours_ips / seed_ips,
            "threads": torch.get_num_threads()}


class _Setup:
    """Model, optimizer, augmentation and batches as a real run builds them (one process)."""

    def __init__(self, cfg: Config, device: torch.device, n_images: int, iters_total: int) -> None:
        torch.manual_seed(cfg.seed)
        fmt = memory_format(cfg.train.channels_last)
        self.model = build_model(cfg.model.name, cfg.model.num_classes).to(device, memory_format=fmt)
        self.train_model = compile_model(self.model) if cfg.train.compile else self.model  # as a run's
        self.optimizer = build_optimizer(cfg, self.model)
        self.augment = build_augment(cfg.augment, torch.Generator(device).manual_seed(0))
        images, labels = random_images(n_images, device)
        self.batches = ShardedBatches(images, labels, batch_size=cfg.train.batch_size, shuffle=True)
        self.scheduler = build_scheduler(cfg, self.optimizer, 0, total_steps=iters_total + 10)
        self.precision = Precision.resolve(cfg.train.amp, device)
        self.fmt = fmt
        self.scaler = LossScaler(device) if self.precision.scaler else None  # fp16's, as a run has it
        self.step = build_train_step(cfg, self.model, self.train_model, self.optimizer, self.augment, device,
                                     self.precision, self.scaler, world=1)


def plain_loop(s: _Setup, device: torch.device, iters: int) -> float:
    """The same step called from a bare PyTorch loop; returns seconds for `iters` steps."""
    def run() -> None:
        done = 0
        while done < iters:
            for images, labels in s.batches:
                s.step(images, labels)
                s.scheduler.step()
                done += 1
                if done == iters:
                    return
    return timed(run, device)


def ignite_trainer(s: _Setup, device: torch.device, log_every: int) -> Engine:
    """The application's Ignite trainer with the handlers every process of a real run attaches."""
    trainer = create_trainer(s.step, device)
    trainer.add_event_handler(Events.ITERATION_STARTED, LRScheduler(s.scheduler))
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: s.batches.set_epoch(e.state.epoch))
    LossBuffer(log_every, scheduled_values(s.optimizer)).attach(trainer)
    return trainer


def ignite_loop(s: _Setup, device: torch.device, iters: int, log_every: int) -> float:
    trainer = ignite_trainer(s, device, log_every)
    return timed(lambda: trainer.run(s.batches, epoch_length=iters, max_epochs=1), device)


def trainer_overhead(cfg: Config, device: torch.device, iters: int, rounds: int) -> dict:
    """Images/s of a plain loop and of the Ignite trainer, alternating, best round of each."""
    s = _Setup(cfg, device, n_images=cfg.train.batch_size * (iters + 1), iters_total=2 * (rounds + 1) * iters)
    plain_loop(s, device, 2)  # warm-up (cudnn autotuning, compilation)
    ignite_loop(s, device, 2, cfg.logging.log_every_iters)
    plain, ignite = [], []
    for _ in range(rounds):
        plain.append(plain_loop(s, device, iters))
        ignite.append(ignite_loop(s, device, iters, cfg.logging.log_every_iters))
    images = iters * cfg.train.batch_size
    p, i = images / min(plain), images / min(ignite)
    return {"plain_img_s": p, "ignite_img_s": i, "overhead_pct": 100 * (p / i - 1), "iters": iters,
            "rounds": rounds, "plain_median_img_s": images / statistics.median(plain),
            "ignite_median_img_s": images / statistics.median(ignite)}


def full_epoch(cfg: Config, device: torch.device, n_images: int, epochs: int) -> dict:
    """Seconds per epoch of the Ignite trainer over `n_images` synthetic images (last of `epochs`)."""
    iters = iterations_per_epoch(n_images, cfg.train.batch_size)
    s = _Setup(cfg, device, n_images=n_images, iters_total=epochs * iters)
    trainer = ignite_trainer(s, device, cfg.logging.log_every_iters)
    times: list[float] = []

    @trainer.on(Events.EPOCH_STARTED)
    def _start(_) -> None:
        synchronize(device)
        times.append(time.perf_counter())

    @trainer.on(Events.EPOCH_COMPLETED)
    def _stop(_) -> None:
        synchronize(device)
        times.append(time.perf_counter() - times.pop())

    trainer.run(s.batches, max_epochs=epochs)
    return {"seconds": times[-1], "epoch_seconds": times, "images": n_images, "img_s": n_images / times[-1],
            "estimated": False}


def bf16_matmul_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    seconds = timed(lambda: [a @ b for _ in range(reps)], device)
    return 2 * n ** 3 * reps / seconds / 1e12


def train_flops_per_image(cfg: Config, device: torch.device, batch: int = 32) -> float:
    """FLOPs of one forward and backward pass per image, as PyTorch's FLOP counter counts them."""
    model = build_model(cfg.model.name, cfg.model.num_classes).to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, cfg.model.num_classes, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / batch
