"""The training step's regularisers: label smoothing, and (app/mixing.py) Mixup and CutMix.

Each is checked through the application's own step (build_train_step on the config's keys, ResNet18, the
optimizer, the augmentation generator), on batches of eight images on the CPU, against a reference
computed here: the soft-target cross-entropy written out by hand.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from app.augment import BatchAugment, build_augment
from app.config import Config, override
from app.engines import Precision, TrainStep, build_train_step
from app.model import cifar_resnet18
from app.optim import build_optimizer

CPU = torch.device("cpu")
CLASSES = 10
N = 8


@dataclass
class Step:
    model: nn.Module
    augment: BatchAugment
    step: TrainStep


def _step(settings: dict, seed: int = 1) -> Step:
    """The application's step for CIFAR-10 with `settings` over the recipe, as a run builds it on the CPU."""
    cfg = override(Config(), {"data.dataset": "cifar10", "train.device": "cpu", "train.amp": "off", **settings})
    torch.manual_seed(0)
    model = cifar_resnet18(CLASSES).to(memory_format=torch.channels_last)
    augment = build_augment(cfg.augment, torch.Generator().manual_seed(seed))
    step = build_train_step(cfg, model, model, build_optimizer(cfg, model), augment, CPU,
                            Precision.resolve("off", CPU), None, world=1)
    return Step(model, augment, step)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return (torch.randint(0, 256, (N, 3, 32, 32), dtype=torch.uint8, generator=g),
            torch.randint(0, CLASSES, (N,), generator=g))


def _soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * logits.log_softmax(1)).sum(1).mean()


def test_label_smoothing_trains_on_the_smoothed_target(batch) -> None:
    """loss.label_smoothing eps: the step's loss is the cross-entropy against (1 - eps) * one-hot + eps / classes,
    of the logits the step trained on (the model before the step, in training mode, on the same augmentation)."""
    images, labels = batch
    app = _step({"loss.label_smoothing": 0.2})
    before, state = copy.deepcopy(app.model).train(), app.augment.generator.get_state()
    loss, _ = app.step(images, labels)
    app.augment.generator.set_state(state)
    with torch.no_grad():
        logits = before(app.augment(images).contiguous(memory_format=torch.channels_last))
    smoothed = 0.8 * F.one_hot(labels, CLASSES) + 0.2 / CLASSES
    assert float(loss) == pytest.approx(float(_soft_cross_entropy(logits, smoothed)), rel=1e-5)
    assert float(loss) != pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-3)
