"""fp16's loss scaling as device operations (app/loss_scale.py), checked on the CPU in fp32 against
torch.amp.GradScaler driving the same optimizer: the same steps bit for bit, skipped steps included, the
same scale; its state resumes exactly, a GradScaler's too; and a step asks the host for nothing, which
is what lets a CUDA graph capture it (tests/test_cuda_graph.py replays it on a GPU)."""
from __future__ import annotations

import io
from typing import Iterator, Union

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from app.engines import Precision, TrainStep, make_train_step
from app.loss_scale import LossScaler
from app.optim import CapturableSGD
from tests.support import HostReads, forbid_python_reads

CPU = torch.device("cpu")
SCALED_FP32 = Precision(None, True)  # the fp16 path's loss scaling without autocast: exact on the CPU
POISON = {0: float("inf"), 5: float("nan"), 11: float("-inf")}  # step -> what one gradient element becomes
STEPS = 16
GROWTH = 3  # growth_interval: the scale doubles after 3 good steps in a row


@pytest.fixture
def fresh_compiles() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _batches(n: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


class Run:
    """A tiny net with BatchNorm, SGD with weight decay and Nesterov momentum, and a scaler; at the steps
    of POISON one element of the linear layer's gradient is made non-finite as backward computes it."""

    def __init__(self, scaler: Union[LossScaler, torch.amp.GradScaler], fused: bool = False) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10))
        self.optimizer = CapturableSGD(self.model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4,
                                       nesterov=True, fused=fused)
        self.scaler = scaler
        self.step: TrainStep = make_train_step(self.model, self.optimizer, lambda x: x, CPU, SCALED_FP32, scaler)
        self.done = 0
        self.model[5].weight.register_hook(self._poison)

    def _poison(self, grad: torch.Tensor) -> torch.Tensor:
        if self.done not in POISON:
            return grad
        grad = grad.clone()
        grad[0, 0] = POISON[self.done]
        return grad

    def train(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        out = self.step(*batch)
        self.done += 1
        return out

    def buffers(self) -> list[torch.Tensor]:
        """The momentum buffers; zero where GradScaler's optimizer has none yet (a first step skipped)."""
        return [self.optimizer.state[p].get("momentum_buffer", torch.zeros_like(p)) for p in self.model.parameters()]

    def scale(self) -> tuple[float, int]:
        if isinstance(self.scaler, LossScaler):
            return self.scaler.scale_tensor.item(), int(self.scaler.growth_tracker.item())
        return self.scaler.get_scale(), self.scaler._get_growth_tracker()


def _ours(**kwargs) -> LossScaler:
    return LossScaler(CPU, growth_interval=GROWTH, **kwargs)


def _torchs() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", growth_interval=GROWTH)


def _assert_same(a: Run, b: Run, at: int) -> None:
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):  # BatchNorm's too
        assert torch.equal(x, y), f"step {at}: {name}"
    for x, y in zip(a.buffers(), b.buffers()):
        assert torch.equal(x, y), f"step {at}: a momentum buffer"
    assert a.scale() == b.scale(), f"step {at}"


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=pytest.mark.slow)],  # two compiles: ~15 s
                         ids=["foreach", "fused"])
def test_the_steps_are_gradscalers_bit_for_bit_skipped_steps_and_growth_included(fresh_compiles,
                                                                                  fused: bool) -> None:
    """A step with an inf, a nan or a -inf gradient (the first one before any momentum exists, the others
    with weight decay and momentum buffers in play) leaves weights and buffers exactly as they were and
    halves the scale; GROWTH good steps in a row double it."""
    graphs = counters["stats"]["unique_graphs"]
    ours, torchs = Run(_ours(), fused), Run(_torchs(), fused)
    scales = []
    for i, batch in enumerate(_batches()):
        before = [t.clone() for t in [*ours.model.parameters(), *ours.buffers()]]
        out = ours.train(batch)
        assert torch.equal(out, torchs.train(batch))  # the loss and top-1
        _assert_same(ours, torchs, i)
        after = [*ours.model.parameters(), *ours.buffers()]
        assert all(torch.equal(x, y) for x, y in zip(before, after)) == (i in POISON), f"step {i}"
        scales.append(ours.scale()[0])
    start = 2.0**16
    assert scales[:6] == [start / 2, start / 2, start / 2, start, start, start / 2]  # skip, 3 good: growth, skip
    assert scales[-5:] == [start / 2, start / 2, start / 2, start, start]
    assert counters["stats"]["unique_graphs"] - graphs == 2 * int(fused)  # per side: with found_inf, without


def test_the_state_resumes_the_same_steps_and_a_gradscalers_state_loads() -> None:
    """Saved as a training checkpoint holds it (torch.save, loaded with weights_only=True): a run resumed
    from our state or from GradScaler's at the same point goes on bit for bit as the run that never stopped."""
    batches = _batches()
    whole = Run(_ours())
    for batch in batches:
        whole.train(batch)
    for first in (_ours(), _torchs()):
        part = Run(first)
        for batch in batches[:7]:  # mid-count: one good step since the skip at 5, growth after step 8
            part.train(batch)
        buffer = io.BytesIO()
        torch.save({"model": part.model.state_dict(), "optimizer": part.optimizer.state_dict(),
                    "scaler": part.scaler.state_dict()}, buffer)
        state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
        assert set(state["scaler"]) == {"scale", "growth_factor", "backoff_factor", "growth_interval",
                                        "_growth_tracker"}
        resumed = Run(_ours(init_scale=1.0, growth_factor=4.0))  # replaced by the state's
        resumed.done = 7
        resumed.model.load_state_dict(state["model"])
        resumed.optimizer.load_state_dict(state["optimizer"])
        resumed.scaler.load_state_dict(state["scaler"])
        for batch in batches[7:]:
            resumed.train(batch)
        _assert_same(resumed, whole, STEPS)


def test_a_step_asks_the_host_for_nothing_where_gradscalers_does(monkeypatch: pytest.MonkeyPatch) -> None:
    batches = _batches(6)  # steps 0 and 5 skipped
    run = Run(_ours())
    with monkeypatch.context() as patched, HostReads() as reads:
        forbid_python_reads(patched)
        for batch in batches:
            run.train(batch)
    assert reads.ops == []
    reference = Run(_torchs())
    with HostReads() as reads:  # the check is not vacuous: GradScaler reads found_inf to decide
        reference.train(batches[0])
    assert reads.ops == ["aten._local_scalar_dense.default"]


def test_batchnorm_is_on_no_autocast_list_so_it_keeps_fp32_weights_under_fp16() -> None:
    """What app/loss_scale.py's docstring relies on: autocast registers kernels for the convolution, not
    for batch norm (so fp16 activations meet fp32 weights and statistics), here and on CUDA."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for key in ("AutocastCUDA", "AutocastCPU"):
        assert has("aten::conv2d", key)
        assert not any(has(op, key) for op in ("aten::batch_norm", "aten::_batch_norm_impl_index",
                                                "aten::native_batch_norm", "aten::cudnn_batch_norm"))
    bn = nn.BatchNorm2d(4)
    with torch.autocast("cpu", dtype=torch.float16):
        y = bn(nn.Conv2d(3, 4, 3)(torch.randn(2, 3, 8, 8)))
    assert y.dtype == torch.float16
    assert {t.dtype for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)} == {torch.float32}
