"""The weights' EMA (app/ema.py): the same numbers as Ignite's EMAHandler, bit for bit, over many steps."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine
from ignite.handlers import EMAHandler
from torch import nn

from app.ema import WeightEma


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, i: int) -> torch.Tensor:
    """A training step on batch number `i` (the same batch for the same `i`)."""
    g = torch.Generator().manual_seed(i)
    x, y = torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)
    model.train()
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


@pytest.mark.parametrize("buffers,warmup", [("copy", None), ("update", None), ("copy", (50, 0.5)),
                                            ("update", (30, 0.999))])
def test_the_ema_is_ignites_bit_for_bit_over_many_steps(buffers: str, warmup) -> None:
    """200 SGD steps of a model with BatchNorm, twice from the same start: Ignite's EMAHandler on the trainer's
    ITERATION_COMPLETED, and WeightEma's update inside the step; weights, buffers and EMA all equal exactly,
    with and without a warm-up (rising, and falling), BatchNorm buffers copied and averaged."""
    decay, steps = 0.99, 200
    ours, theirs = tiny_model(), tiny_model()
    warmup_iters, warmup_decay = warmup or (0, 0.0)
    ema = WeightEma(ours, decay, warmup_iters, warmup_decay, buffers)
    handler = EMAHandler(theirs, momentum=1 - decay, handle_buffers=buffers,
                         **({"momentum_warmup": 1 - warmup_decay, "warmup_iters": warmup_iters} if warmup else {}))
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9)
    step = ema.after(lambda i, _: sgd_step(ours, opt_ours, int(i)))
    Engine(lambda e, i: step(torch.tensor(i), None)).run(range(steps))
    trainer = Engine(lambda e, i: sgd_step(theirs, opt_theirs, i))
    handler.attach(trainer, name="ema_momentum")
    trainer.run(range(steps))
    assert int(ema.updates) == steps
    assert float(ema.momentum()) == trainer.state.ema_momentum  # the last update's, after any warm-up
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name  # the raw models trained the same
    for (name, a), b in zip(ema.ema_model.state_dict().items(), handler.ema_model.state_dict().values()):
        assert torch.equal(a, b), name
    raw, averaged = ours.state_dict(), ema.ema_model.state_dict()
    assert not torch.equal(raw["4.weight"], averaged["4.weight"])  # it is an average, not a copy
    assert torch.equal(raw["1.running_mean"], averaged["1.running_mean"]) == (buffers == "copy")


def test_the_warm_up_moves_the_decay_from_warmup_decay_to_decay_on_the_device() -> None:
    """Ignite's EMAWarmUp: update 1 at warmup_decay, linear to `decay` at update warmup_iters, then constant;
    computed from the step counter tensor (what a CUDA graph replays), not from a host value."""
    ema = WeightEma(tiny_model(), 0.9, warmup_iters=5, warmup_decay=0.5)
    decays = []
    for _ in range(7):
        ema.update()
        decays.append(1 - float(ema.momentum()))
    assert decays == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9, 0.9, 0.9])
    ema.load_state_dict(ema.state_dict() | {"updates": torch.tensor(2)})
    assert 1 - float(ema.momentum()) == pytest.approx(0.6)
