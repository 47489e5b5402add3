"""The CUDA-graph step computes what the eager step computes, at every step of the recipe's real schedule
(runs only where there is a GPU; `bash bench/gpu.sh` runs it).

Step by step (tests/lockstep.py): before each step the eager side takes the graphed side's state, both step on
the same batch, and what each step did is compared: one whole OneCycleLR cycle of three epochs whose last
batch is smaller (two graphs), momentum cycling 0.95 -> 0.85 -> 0.95, ResNet18 in channels_last, fp32, the
default bf16 autocast and fp16 with its loss scaling in the graph. cuDNN is made deterministic, so both sides
run the same kernels on the same values; the tolerance (each step's loss, weight changes, momentum buffers and
BatchNorm statistics within 1e-3 of their largest value in fp32, 1e-2 in bf16 and fp16; fp16's loss scale
equal) leaves room for rounding only. fp16 starts at a loss scale of 2**24, which overflows the first steps'
fp16 gradients (the logits' gradient alone is about 2**18 there), and grows the scale after every 2 good
steps: the graphs replay skipped steps, the backoff and the growth, not only good steps. A momentum frozen at
its first value differs by 3.8x the bf16 tolerance already at the second step (tests/test_lockstep.py, on the
CPU).
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from app.cuda_graph import CudaGraphStep
from app.engines import Precision
from app.optim import CapturableSGD
from tests.lockstep import ALL_OPTIONS, compare_steps, make_side


EPOCHS = 3
SIZES = (64, 64, 64, 40)


@pytest.fixture
def deterministic_cudnn():
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@pytest.mark.gpu
@pytest.mark.parametrize("precision,rtol", [(Precision(None, False), 1e-3), (Precision(torch.bfloat16, False), 1e-2),
                                            (Precision(torch.float16, True), 1e-2)], ids=["fp32", "bf16", "fp16"])
def test_graphed_steps_equal_eager_steps_over_a_whole_one_cycle(deterministic_cudnn, precision: Precision,
                                                                  rtol: float) -> None:
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    epoch = [(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g).to(device),
              torch.randint(0, 100, (n,), generator=g).to(device)) for n in SIZES]
    loss_scale = {"init_scale": 2.0**24, "growth_interval": 2}
    eager = make_side(device, precision, len(SIZES), EPOCHS, loss_scale=loss_scale)
    graphed = make_side(device, precision, len(SIZES), EPOCHS, wrap=CudaGraphStep, loss_scale=loss_scale)
    start = graphed.generator.get_state()

    log = compare_steps(eager, graphed, epoch, EPOCHS, rtol)

    assert not graphed.step.failed and len(graphed.step._graphs) == 2  # a graph per batch shape
    momenta = [e["momentum"] for e in log]  # what the graphed optimizer read
    assert momenta[0] == pytest.approx(0.95) and min(momenta) < 0.86 and momenta[-1] == pytest.approx(0.95)
    assert not torch.equal(graphed.generator.get_state(), start)  # replays draw new augmentations
    if precision.scaler:  # the scale after each step: halved after the first (skipped), grown later
        scales = [2.0**24] + [e["scale"] for e in log]
        assert scales[1] == 2.0**23 and any(b > a for a, b in zip(scales, scales[1:]))


@pytest.mark.gpu
def test_graphed_steps_with_the_fused_update_equal_eager_steps_over_a_whole_one_cycle(deterministic_cudnn) -> None:
    """train.fused_update inside the graph: compiled in the warm-up before capture, it reads the refilled
    lr and momentum at every replay; the reference is today's eager step with the multi-tensor update
    (fp32: the update's rounding is all that differs, well inside 1e-3)."""
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    epoch = [(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g).to(device),
              torch.randint(0, 100, (n,), generator=g).to(device)) for n in SIZES]
    fp32 = Precision(None, False)
    eager = make_side(device, fp32, len(SIZES), EPOCHS)
    graphed = make_side(device, fp32, len(SIZES), EPOCHS, settings={"train.fused_update": True},
                        wrap=CudaGraphStep)

    log = compare_steps(eager, graphed, epoch, EPOCHS, 1e-3)

    assert not graphed.step.failed and len(graphed.step._graphs) == 2
    momenta = [e["momentum"] for e in log]
    assert momenta[0] == pytest.approx(0.95) and min(momenta) < 0.86 and momenta[-1] == pytest.approx(0.95)


@pytest.mark.gpu
@pytest.mark.parametrize("precision,rtol", [(Precision(None, False), 1e-3), (Precision(torch.bfloat16, False), 1e-2)],
                         ids=["fp32", "bf16"])
def test_graphed_steps_of_the_compiled_model_equal_eager_steps_over_a_whole_one_cycle(
        deterministic_cudnn, fresh_compiles, precision: Precision, rtol: float) -> None:
    """train.compile on one GPU: the graph holds the step of the model as app/compiling.py compiles it
    (static shapes, inductor's CUDA graphs off), compiled in each shape's warm-up; its capture compiles
    nothing (it runs under fail_on_recompile: a compile there would have failed the capture, and the step
    would train eagerly). The reference is today's eager step of the uncompiled model. Two compiles of
    forward and backward, a minute or two on an H200 the first time."""
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    epoch = [(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g).to(device),
              torch.randint(0, 100, (n,), generator=g).to(device)) for n in SIZES]
    eager = make_side(device, precision, len(SIZES), EPOCHS)
    graphed = make_side(device, precision, len(SIZES), EPOCHS, settings={"train.compile": True}, wrap=CudaGraphStep)
    graphs = counters["stats"]["unique_graphs"]

    log = compare_steps(eager, graphed, epoch, EPOCHS, rtol)

    assert not graphed.step.failed and len(graphed.step._graphs) == 2  # a graph per batch shape
    assert counters["stats"]["unique_graphs"] - graphs == 2  # the model compiled once per shape, no more
    assert {e["batch"] for e in log} == set(SIZES)
    momenta = [e["momentum"] for e in log]
    assert momenta[0] == pytest.approx(0.95) and min(momenta) < 0.86 and momenta[-1] == pytest.approx(0.95)


@pytest.mark.gpu
@pytest.mark.parametrize("precision,rtol", [(Precision(None, False), 1e-3), (Precision(torch.bfloat16, False), 1e-2),
                                            (Precision(torch.float16, True), 1e-2)], ids=["fp32", "bf16", "fp16"])
def test_graphed_steps_with_every_option_on_equal_eager_steps_over_a_whole_one_cycle(
        deterministic_cudnn, precision: Precision, rtol: float) -> None:
    """Issue 21's options in the graph the application builds (build_train_step with train.cuda_graphs on,
    tests/lockstep.ALL_OPTIONS): Mixup and CutMix with the switch between them and unmixed batches, Cutout,
    label smoothing and the EMA with its warm-up; under fp16, the loss scale's skipped steps and growth too
    (the EMA updates after a skipped step, as Ignite's does after every iteration). Every decision and draw
    of a replay comes from the generator the graph advances: were one baked in at capture (a lambda, a box,
    mixed or not), the replayed step would differ from the eager one given the same generator state at the
    next step already."""
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    epoch = [(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g).to(device),
              torch.randint(0, 100, (n,), generator=g).to(device)) for n in SIZES]
    loss_scale = {"init_scale": 2.0**24, "growth_interval": 2}
    eager = make_side(device, precision, len(SIZES), EPOCHS, settings=ALL_OPTIONS, loss_scale=loss_scale)
    graphed = make_side(device, precision, len(SIZES), EPOCHS, settings={**ALL_OPTIONS, "train.cuda_graphs": True},
                        loss_scale=loss_scale)
    start = graphed.generator.get_state()

    log = compare_steps(eager, graphed, epoch, EPOCHS, rtol)

    assert isinstance(graphed.step, CudaGraphStep) and not graphed.step.failed and len(graphed.step._graphs) == 2
    assert int(graphed.ema.updates) == len(log) == EPOCHS * len(SIZES)
    assert not torch.equal(graphed.generator.get_state(), start)


@pytest.mark.skipif(torch.cuda.is_available(), reason="capture works here")
def test_where_no_graph_can_be_captured_the_step_trains_eagerly_and_says_so_once(capsys) -> None:
    """Capture can fail (here: no CUDA at all); the run then goes on with the eager step, warned once."""
    seen = []

    def eager(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        seen.append(len(labels))
        return torch.tensor([2.0, 0.5])

    model = torch.nn.Linear(2, 2)
    step = CudaGraphStep(eager, model, CapturableSGD(model.parameters(), lr=0.1, momentum=0.9), torch.Generator())
    batch = torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)
    outputs = [step(*batch), step(*batch)]
    assert step.failed and seen == [4, 4] and all(torch.equal(o, torch.tensor([2.0, 0.5])) for o in outputs)
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning: CUDA graph capture failed (")
    assert warnings[0].endswith("); training eagerly")


@pytest.mark.gpu
def test_the_emas_update_is_captured_and_the_capture_warm_up_leaves_it_untouched(deterministic_cudnn) -> None:
    """The weights' EMA inside the graphed step (app/ema.py), with a warm-up: after two epochs (two graphs,
    each captured after three warm-up steps that really ran the update) its update count is the steps taken
    and its tensors, buffers averaged too, are the eager step's within rounding."""
    from app.ema import WeightEma

    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    epoch = [(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g).to(device),
              torch.randint(0, 100, (n,), generator=g).to(device)) for n in SIZES]
    emas = []

    def with_ema(graphed: bool):
        def wrap(step, model, optimizer, generator, changed):
            emas.append(WeightEma(model, 0.9, warmup_iters=5, warmup_decay=0.5, buffers="update"))
            step = emas[-1].after(step)
            return CudaGraphStep(step, model, optimizer, generator, [*changed, *emas[-1].tensors()]) if graphed \
                else step
        return wrap

    fp32 = Precision(None, False)
    sides = [make_side(device, fp32, len(SIZES), 2, wrap=with_ema(graphed)) for graphed in (False, True)]
    for side in sides:
        for _ in range(2):
            for images, labels in epoch:
                side.step(images, labels)
                side.scheduler.step()
    assert not sides[1].step.failed and len(sides[1].step._graphs) == 2
    eager, graphed = emas
    assert int(eager.updates) == int(graphed.updates) == 2 * len(SIZES)
    for (name, a), b in zip(eager.ema_model.state_dict().items(), graphed.ema_model.state_dict().values()):
        if a.is_floating_point():
            assert (a - b).abs().max() <= 1e-3 * a.abs().max().clamp(min=1e-12), name
        else:
            assert torch.equal(a, b), name


def test_the_capture_snapshot_restores_the_extra_tensors_the_step_changes() -> None:
    """What CudaGraphStep undoes after capture's warm-up steps, on any device: the EMA's tensors too."""
    from app.ema import WeightEma

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = WeightEma(model, 0.9, buffers="update")
    step = CudaGraphStep(lambda i, l: None, model, CapturableSGD(model.parameters(), lr=0.1, momentum=0.9),
                         torch.Generator(), ema.tensors())
    before = [t.clone() for t in ema.tensors()]
    snapshot = step._snapshot()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model(torch.randn(4, 2))
    ema.update()
    assert not all(torch.equal(a, b) for a, b in zip(ema.tensors(), before))
    step._restore(snapshot)
    assert all(torch.equal(a, b) for a, b in zip(ema.tensors(), before))
