"""The optimizer that a CUDA graph captures: the same update runs here on the CPU, eagerly.

What the graph relies on: `update` reads lr and momentum only from the optimizer's device tensors (so a
replay uses the values refilled before it), and `step` = refill from param_groups + `update` follows
torch.optim.SGD under the recipe's real OneCycleLR, momentum cycle included.
"""
from __future__ import annotations

import io

import pytest
import torch
from ignite.engine import Events
from ignite.handlers import LRScheduler

from app.augment import build_augment
from app.config import Config, override
from app.engines import Precision, create_trainer, make_train_step
from app.optim import CapturableSGD, build_optimizer, build_scheduler, scheduled_values


def _batches(sizes: list[int], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
             torch.randint(0, 100, (n,), generator=g)) for n in sizes]


def _small_net() -> torch.nn.Module:
    """Conv, BatchNorm, pooling, linear: the layers whose parameters ResNet18 has, in a net whose training
    is not chaotic at a batch of 8. (ResNet18 at batch 8 is: a 1-ulp difference after the first step,
    the last rounding of p - lr * d, grows to 1e-3 in the loss within four steps, between any two
    correct SGD implementations that round differently. What is compared here is the optimizer.)"""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(256, 100))


@pytest.mark.parametrize("settings", [
    {},  # the recipe: momentum cycled 0.95 -> 0.85 -> 0.95
    {"schedule.cycle_momentum": False, "optimizer.momentum": 0.9, "optimizer.nesterov": True},
], ids=["recipe", "constant-nesterov"])
def test_the_projects_step_under_a_real_one_cycle_equals_torch_sgd(settings: dict) -> None:
    """Three epochs of four batches (the last one smaller), one whole OneCycleLR cycle, through the real
    Ignite trainer, the application's optimizer, schedule and training step (augmentation included); the
    reference is torch.optim.SGD stepped by torch's own OneCycleLR in a plain loop."""
    epoch = _batches([8, 8, 8, 5])
    epochs = 3
    cfg = override(Config(), {"train.epochs": epochs, "train.device": "cpu", **settings})
    device = torch.device("cpu")

    model = _small_net()
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, len(epoch))
    step = make_train_step(model, optimizer, build_augment(cfg.augment, torch.Generator().manual_seed(1)),
                           device, Precision(None, False))
    trainer = create_trainer(step, device)
    trainer.add_event_handler(Events.ITERATION_STARTED, LRScheduler(scheduler))
    used, losses = [], []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _record(engine) -> None:  # what the update read: the optimizer's own tensors
        t = optimizer.scheduled_tensors()
        used.append((t["lr"].item(), t["momentum"].item()))
        losses.append(engine.state.output[0].item())

    trainer.run(epoch, max_epochs=epochs)

    ref_model = _small_net()
    cycle = cfg.schedule.cycle_momentum
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4,
                              nesterov=cfg.optimizer.nesterov, foreach=False)
    ref_sched = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=0.1, total_steps=epochs * len(epoch),
                                                    cycle_momentum=cycle)
    ref_step = make_train_step(ref_model, ref_opt, build_augment(cfg.augment, torch.Generator().manual_seed(1)),
                               device, Precision(None, False))
    ref_used, ref_losses = [], []
    for _ in range(epochs):
        for images, labels in epoch:
            ref_used.append((ref_opt.param_groups[0]["lr"], ref_opt.param_groups[0]["momentum"]))
            ref_losses.append(ref_step(images, labels)[0].item())
            ref_sched.step()

    assert len(used) == len(ref_used) == 12
    for (lr, m), (ref_lr, ref_m) in zip(used, ref_used):  # fp32 tensors against Python floats
        assert lr == pytest.approx(ref_lr, rel=1e-6) and m == pytest.approx(ref_m, rel=1e-6)
    momenta = [m for _, m in used]
    if cycle:
        assert momenta[0] == pytest.approx(0.95) and min(momenta) == pytest.approx(0.85, abs=2e-3)
        assert momenta[-1] == pytest.approx(0.95) and len(set(momenta)) >= 10  # it moves every step
    else:
        assert momenta == pytest.approx([0.9] * 12)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for (name, p), ref in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, ref, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(optimizer.state[p]["momentum_buffer"], ref_opt.state[ref]["momentum_buffer"],
                                   rtol=1e-5, atol=1e-6, msg=name)


def test_update_reads_lr_and_momentum_from_its_tensors_not_from_param_groups() -> None:
    """What a replayed graph does: param_groups may hold anything; the tensors, refilled before the
    replay, decide. The arithmetic is SGD's with weight decay and Nesterov momentum."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = CapturableSGD([p], lr=0.5, momentum=0.5, weight_decay=0.1, nesterov=True)
    p.grad = torch.tensor([0.25, 1.0])
    opt.step()  # refill from param_groups, then update: buf = g + wd*p
    g1 = torch.tensor([0.25 + 0.1, 1.0 - 0.2])
    expected = torch.tensor([1.0, -2.0]) - 0.5 * (g1 + 0.5 * g1)
    torch.testing.assert_close(p.detach(), expected)

    opt.param_groups[0]["lr"] = opt.param_groups[0]["momentum"] = float("nan")
    tensors = opt.scheduled_tensors()
    tensors["lr"].fill_(0.25)
    tensors["momentum"].fill_(0.75)
    before = p.detach().clone()
    opt.update()
    g2 = p.grad + 0.1 * before
    buf = 0.75 * g1 + g2
    torch.testing.assert_close(p.detach(), before - 0.25 * (g2 + 0.75 * buf))
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], buf)

    opt.step()  # step refills from param_groups: the NaN arrives
    assert torch.isnan(p).all() and torch.isnan(tensors["lr"]) and torch.isnan(tensors["momentum"])


def test_checkpointed_state_has_torch_sgds_layout_and_resumes_the_same_steps() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    clone = torch.nn.Linear(4, 3)
    clone.load_state_dict(model.state_dict())
    x = torch.randn(16, 4)
    cfg = override(Config(), {"train.epochs": 1})

    def train(m, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()

    a = build_optimizer(cfg, model)
    train(model, a, 3)
    saved = io.BytesIO()
    torch.save(a.state_dict(), saved)  # as a checkpoint holds it
    state = torch.load(io.BytesIO(saved.getvalue()), weights_only=True)
    assert set(state["state"][0]) == {"momentum_buffer"}
    assert {"lr", "momentum", "weight_decay", "nesterov"} <= set(state["param_groups"][0])
    b = build_optimizer(cfg, clone)
    b.load_state_dict(state)
    clone.load_state_dict(model.state_dict())
    train(model, a, 2)
    train(clone, b, 2)
    for p, q in zip(model.parameters(), clone.parameters()):
        assert torch.equal(p, q)


def test_the_logged_schedule_after_a_resume_is_the_one_the_optimizer_follows() -> None:
    """What TensorBoard and the progress bar show (scheduled_values, built before the checkpoint is
    loaded, as training builds it) follows the schedule after load_state_dict, which replaces the
    optimizer's param groups: not the fresh optimizer's first values (lr / 25, momentum 0.95)."""
    cfg = override(Config(), {"train.epochs": 1})
    first = build_optimizer(cfg, torch.nn.Linear(2, 2))
    first_schedule = build_scheduler(cfg, first, 10)
    for _ in range(4):
        first.step()
        first_schedule.step()
    resumed = build_optimizer(cfg, torch.nn.Linear(2, 2))
    resumed_schedule = build_scheduler(cfg, resumed, 10)
    logged = scheduled_values(resumed)
    resumed.load_state_dict(first.state_dict())
    resumed_schedule.load_state_dict(first_schedule.state_dict())
    for _ in range(3):
        assert logged() == {"lr": first.param_groups[0]["lr"], "momentum": first.param_groups[0]["momentum"]}
        for opt, schedule in ((first, first_schedule), (resumed, resumed_schedule)):
            opt.step()
            schedule.step()
    assert logged()["lr"] != cfg.optimizer.lr / cfg.schedule.div_factor
