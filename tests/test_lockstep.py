"""The step-by-step comparison that tests/test_cuda_graph.py runs on a GPU, checked here on the CPU: it
passes two equal steps, with every option of issue 21 on (the GPU test's graphed-vs-eager comparison of
them runs this same code eagerly here), and it catches a step whose momentum stays at its first value, as
the CUDA graph's did when fused SGD baked it in at capture."""
from __future__ import annotations

import pytest
import torch

from app.engines import Precision
from tests.lockstep import ALL_OPTIONS, compare_steps, make_side

CPU, FP32 = torch.device("cpu"), Precision(None, False)


def _epoch() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
             torch.randint(0, 100, (n,), generator=g)) for n in (8, 8, 8, 5)]


def test_equal_steps_agree_at_every_step_of_a_whole_cycle_with_every_option_on() -> None:
    """Bit for bit: Mixup/CutMix and Cutout draw only from the generator the sides share, and the EMA is
    compared too (a draw from torch's global generator, or an EMA the comparison skipped, would fail here)."""
    epoch = _epoch()
    sides = [make_side(CPU, FP32, 4, 3, settings=ALL_OPTIONS) for _ in range(2)]
    log = compare_steps(*sides, epoch, 3, rtol=1e-3)
    assert int(sides[1].ema.updates) == 12
    assert [e["step"] for e in log] == list(range(1, 13)) and [e["batch"] for e in log][-4:] == [8, 8, 8, 5]
    assert all(e["worst"] == 0 for e in log)  # the same code on the same device: bit for bit
    momenta = [e["momentum"] for e in log]
    assert momenta[0] == pytest.approx(0.95) and min(momenta) < 0.86 and momenta[-1] == pytest.approx(0.95)


def test_a_momentum_frozen_at_its_first_value_is_caught_at_once() -> None:
    def frozen(step, model, optimizer, generator, changed):
        def run(images, labels):
            optimizer.param_groups[0]["momentum"] = 0.95  # what the graph replayed, whatever the schedule said
            return step(images, labels)
        return run

    epoch = _epoch()
    with pytest.raises(AssertionError, match=r"^step 2 "):  # step 1 has no momentum yet
        compare_steps(make_side(CPU, FP32, 4, 3), make_side(CPU, FP32, 4, 3, wrap=frozen), epoch, 3, rtol=1e-2)
