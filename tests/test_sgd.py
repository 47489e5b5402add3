"""The optimizer that a CUDA graph captures: the same update runs here on the CPU, eagerly.

What the graph relies on: `update` reads lr and momentum only from the optimizer's device tensors (so a
replay uses the values refilled before it), and `step` = refill from param_groups + `update` follows
torch.optim.SGD under the recipe's real OneCycleLR, momentum cycle included. The same holds for the
update compiled into fused kernels (train.fused_update), which equals today's within float rounding.
"""
from __future__ import annotations

import io

import pytest
import torch
from ignite.engine import Events
from ignite.handlers import LRScheduler
from torch import nn
from torch._dynamo.utils import counters

from app.augment import build_augment
from app.config import Config, override
from app.engines import Precision, create_trainer, make_train_step
from app.optim import CapturableSGD, build_optimizer, build_scheduler, scheduled_values
from tests.support import image_batches, small_net

EPS = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("settings", [
    {},  # the recipe: momentum cycled 0.95 -> 0.85 -> 0.95
    {"schedule.cycle_momentum": False, "optimizer.momentum": 0.9, "optimizer.nesterov": True},
    pytest.param({"train.fused_update": True}, marks=pytest.mark.slow),  # torch.compile: 5-15 s on a CPU
], ids=["recipe", "constant-nesterov", "recipe-fused"])
def test_the_projects_step_under_a_real_one_cycle_equals_torch_sgd(fresh_compiles, settings: dict) -> None:
    """Three epochs of four batches (the last one smaller), one whole OneCycleLR cycle, through the real
    Ignite trainer, the application's optimizer, schedule and training step (augmentation included); the
    reference is torch.optim.SGD stepped by torch's own OneCycleLR in a plain loop."""
    epoch = image_batches([8, 8, 8, 5])
    epochs = 3
    cfg = override(Config(), {"train.epochs": epochs, "train.device": "cpu", **settings})
    device = torch.device("cpu")

    model = small_net()
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

    ref_model = small_net()
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


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_update_reads_lr_and_momentum_from_its_tensors_not_from_param_groups(fresh_compiles, fused: bool) -> None:
    """What a replayed graph does: param_groups may hold anything; the tensors, refilled before the
    replay, decide. The arithmetic is SGD's with weight decay and Nesterov momentum. Compiled, the
    tensors are the kernel's inputs, not constants of the moment it was compiled: one graph serves all."""
    graphs = counters["stats"]["unique_graphs"]
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = CapturableSGD([p], lr=0.5, momentum=0.5, weight_decay=0.1, nesterov=True, fused=fused)
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
    assert counters["stats"]["unique_graphs"] - graphs == int(fused)


GROUPS = {  # two param groups each, so that every mix of weight decay and Nesterov runs in one step
    "decay,nesterov-plain": ({"weight_decay": 5e-4, "nesterov": False}, {"weight_decay": 0.0, "nesterov": True}),
    "decay-nesterov,plain": ({"weight_decay": 5e-4, "nesterov": True}, {"weight_decay": 0.0, "nesterov": False}),
}


def _param_groups(settings: tuple[dict, dict]) -> list[dict]:
    """Parameters shaped as ResNet18's are (channels_last convolutions, BatchNorm vectors, a linear
    layer) and lengths that are no multiple of a vector's (7, 1), the same values for every call."""
    g = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    shapes = ([(16, 3, 3, 3), (16,), (100, 37)], [(32, 16, 3, 3), (7,), (1,)])
    return [{"params": [nn.Parameter(torch.randn(s, generator=g).contiguous(memory_format=cl) if len(s) == 4
                                     else torch.randn(s, generator=g)) for s in group_shapes], **extra}
            for group_shapes, extra in zip(shapes, settings)]


@pytest.mark.parametrize("groups", GROUPS.values(), ids=GROUPS.keys())
def test_the_fused_update_equals_todays_at_every_step_of_a_whole_one_cycle(fresh_compiles,
                                                                           groups: tuple[dict, dict]) -> None:
    """Step by step (before each, today's update takes the fused one's weights and buffers; both get the
    same gradients), under the recipe's OneCycleLR, momentum cycled: bit for bit where there is no
    weight decay. With weight decay the fused kernel rounds g + wd * p twice where the eager CPU kernel
    rounds one multiply-add once: half an ulp of g, which reaches the buffer and, times lr, the weights;
    the bound is 2 eps of each tensor's largest value. Every step runs the one compiled graph."""
    cfg = override(Config(), {"train.epochs": 3})
    sides = []
    for fused in (False, True):
        opt = CapturableSGD(_param_groups(groups), lr=cfg.optimizer.lr, momentum=0.95, fused=fused)
        sides.append((opt, build_scheduler(cfg, opt, 10)))
    today, fused = (opt for opt, _ in sides)
    pairs = [(p, q) for g, h in zip(today.param_groups, fused.param_groups) for p, q in zip(g["params"], h["params"])]
    graphs, momenta, gen = counters["stats"]["unique_graphs"], [], torch.Generator().manual_seed(1)
    for _ in range(30):
        with torch.no_grad():
            for p, q in pairs:
                p.copy_(q)
                if q in fused.state:
                    today.state[p]["momentum_buffer"] = fused.state[q]["momentum_buffer"].clone()
                p.grad = torch.empty_like(p).normal_(generator=gen)
                q.grad = p.grad.clone()
        momenta.append(fused.param_groups[0]["momentum"])
        for opt, schedule in sides:
            opt.step()
            schedule.step()
        for g, h in zip(today.param_groups, fused.param_groups):
            for p, q in zip(g["params"], h["params"]):
                for a, b in ((q, p), (fused.state[q]["momentum_buffer"], today.state[p]["momentum_buffer"])):
                    if g["weight_decay"]:
                        assert (a - b).abs().max() <= 2 * EPS * b.abs().max()
                    else:
                        assert torch.equal(a, b)
    assert counters["stats"]["unique_graphs"] - graphs == 1
    assert momenta[0] == pytest.approx(0.95) and min(momenta) < 0.86 and len(set(momenta)) > 20


@pytest.mark.parametrize("saved,resumed", [(False, False), (False, True), (True, False)],
                         ids=["foreach", "foreach-to-fused", "fused-to-foreach"])
def test_checkpointed_state_has_torch_sgds_layout_and_resumes_the_same_steps(fresh_compiles, saved: bool,
                                                                             resumed: bool) -> None:
    """Also across train.fused_update, which is not in the state: the same steps within float rounding
    (weight decay rounds differently; see the step-by-step test), bit for bit with the same update."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    clone = torch.nn.Linear(4, 3)
    clone.load_state_dict(model.state_dict())
    x = torch.randn(16, 4)
    cfg = override(Config(), {"train.epochs": 1})
    saved_cfg, resumed_cfg = (override(cfg, {"train.fused_update": f}) for f in (saved, resumed))

    def train(m, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()

    a = build_optimizer(saved_cfg, model)
    train(model, a, 3)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)  # as a checkpoint holds it
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert set(state["state"][0]) == {"momentum_buffer"}
    assert set(state["param_groups"][0]) == {"lr", "momentum", "weight_decay", "nesterov", "params"}
    b = build_optimizer(resumed_cfg, clone)
    b.load_state_dict(state)
    clone.load_state_dict(model.state_dict())
    train(model, a, 2)
    train(clone, b, 2)
    for p, q in zip(model.parameters(), clone.parameters()):
        if saved == resumed:
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=4 * EPS, atol=0)
            torch.testing.assert_close(a.state[p]["momentum_buffer"], b.state[q]["momentum_buffer"],
                                       rtol=4 * EPS, atol=0)


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
