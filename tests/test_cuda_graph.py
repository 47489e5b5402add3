"""The CUDA-graph step computes what the eager step computes (runs only where there is a GPU)."""
from __future__ import annotations

import pytest
import torch

from app.augment import BatchAugment
from app.cuda_graph import CudaGraphStep
from app.engines import Precision, make_train_step
from app.model import cifar_resnet18

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    device = torch.device("cuda")
    model = cifar_resnet18().to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, fused=True)
    aug = BatchAugment(generator=torch.Generator(device).manual_seed(1))
    step = make_train_step(model, opt, aug, device, Precision(None, False), None, channels_last=True)
    return model, opt, aug, step


def test_graph_replay_matches_eager_steps_and_draws_new_augmentations() -> None:
    torch.backends.cudnn.deterministic = True
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g).cuda(),
                torch.randint(0, 100, (n,), generator=g).cuda()) for n in (64, 64, 64, 40, 64)]
    lrs = [0.05, 0.04, 0.03, 0.02, 0.01]

    model_e, opt_e, aug_e, eager = _setup()
    model_g, opt_g, aug_g, step = _setup()
    graphed = CudaGraphStep(step, model_g, opt_g, aug_g.generator)
    losses_e, losses_g = [], []
    for (x, y), lr in zip(batches, lrs):
        for o in (opt_e, opt_g):
            o.param_groups[0]["lr"] = lr
        losses_e.append(eager(x, y).item())
        losses_g.append(graphed(x, y).item())
    assert not graphed.failed
    assert losses_g == pytest.approx(losses_e, rel=1e-4)
    assert len(set(losses_g[:3])) == 3  # same images, new augmentation each replay
    for pe, pg in zip(model_e.state_dict().values(), model_g.state_dict().values()):
        torch.testing.assert_close(pg, pe, rtol=1e-3, atol=1e-4)
    assert torch.equal(aug_e.generator.get_state(), aug_g.generator.get_state())
