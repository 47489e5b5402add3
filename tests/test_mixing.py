"""The training step's regularisers: label smoothing, and (app/mixing.py) Mixup and CutMix.

Each is checked through the application's own step (build_train_step on the config's keys, the optimizer,
the augmentation generator; a small model), on batches of eight images on the CPU, against a reference
computed here: the soft-target cross-entropy written out by hand; and Mixup's and CutMix's draws in law
against torchvision's v2 MixUp and CutMix.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as v2
from torch import nn

from app.augment import BatchAugment, build_augment
from app.config import Config, override
from app.engines import Precision, TrainStep, build_train_step
from app.mixing import BatchMix, build_mix
from app.model import cifar_resnet18
from app.optim import build_optimizer

CPU = torch.device("cpu")
CLASSES = 10
N = 8


@dataclass
class Step:
    cfg: Config
    model: nn.Module
    optimizer: torch.optim.Optimizer
    augment: BatchAugment
    step: TrainStep


def _tiny_model() -> nn.Module:
    """A conv, BatchNorm and a linear layer: the step's every part, a hundredth of ResNet18's time."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, CLASSES))


def _step(settings: dict, seed: int = 1, model: Callable[[], nn.Module] = lambda: cifar_resnet18(CLASSES)) -> Step:
    """The application's step for CIFAR-10 with `settings` over the recipe, as a run builds it on the CPU."""
    cfg = override(Config(), {"data.dataset": "cifar10", "train.device": "cpu", "train.amp": "off", **settings})
    torch.manual_seed(0)
    net = model().to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, net)
    augment = build_augment(cfg.augment, torch.Generator().manual_seed(seed))
    step = build_train_step(cfg, net, net, optimizer, augment, CPU, Precision.resolve("off", CPU), None, world=1)
    return Step(cfg, net, optimizer, augment, step)


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
    app = _step({"loss.label_smoothing": 0.2}, model=_tiny_model)
    before, state = copy.deepcopy(app.model).train(), app.augment.generator.get_state()
    loss, _ = app.step(images, labels)
    app.augment.generator.set_state(state)
    with torch.no_grad():
        logits = before(app.augment(images).contiguous(memory_format=torch.channels_last))
    smoothed = 0.8 * F.one_hot(labels, CLASSES) + 0.2 / CLASSES
    assert float(loss) == pytest.approx(float(_soft_cross_entropy(logits, smoothed)), rel=1e-5)
    assert float(loss) != pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-3)


# ---------------------------------------------------------------- Mixup and CutMix, in law against torchvision

DRAWS = 1000  # batches mixed in full (a python loop); lambdas alone: twice as many
PAIR = torch.stack([torch.zeros(3, 32, 32), torch.ones(3, 32, 32)])  # image 0 black, image 1 white
PAIR_LABELS = torch.tensor([0, 1])


def _ks(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov distance, and its critical value at p = 0.001."""
    a, b = a.double().sort().values, b.double().sort().values
    points = torch.cat([a, b])
    gap = (torch.searchsorted(a, points, right=True) / len(a) - torch.searchsorted(b, points, right=True) / len(b))
    return float(gap.abs().max()), 1.95 * (1 / len(a) + 1 / len(b)) ** 0.5


def _ours(seed: int, draws: int = DRAWS, **options: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(mixed pair, soft targets) of `draws` batches of PAIR through BatchMix: with two images, the batch
    flipped (timm) and rolled by one (torchvision) pair them alike."""
    mix = BatchMix(generator=torch.Generator().manual_seed(seed), **options)
    out = []
    for _ in range(draws):
        x, targets = mix(PAIR, PAIR_LABELS)
        out.append((x, targets.soft(2)))
    return out


def _lambdas(seed: int, alpha: float) -> torch.Tensor:
    mix = BatchMix(mixup_alpha=alpha, generator=torch.Generator().manual_seed(seed))
    return torch.stack([mix.sample().lam for _ in range(2 * DRAWS)]).float()


def _torchvision(transform, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(seed)
    return [transform(PAIR, PAIR_LABELS) for _ in range(DRAWS)]


def _box_stats(draws: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Image 0's pasted box (where it turned white) and its lambda, each draw; checks that the two images
    swapped one rectangle and that the targets say 1 - its area. Box edges of the draws with a box."""
    x = torch.stack([d[0] for d in draws])
    lam = torch.stack([d[1][0, 0] for d in draws])
    pasted = x[:, 0, 0] == 1  # (draws, 32, 32)
    assert torch.equal(x[:, 0], pasted[:, None].float().expand(-1, 3, -1, -1)) and torch.equal(x[:, 1], 1 - x[:, 0])
    area = pasted.sum((1, 2))
    assert torch.allclose(lam.float(), 1 - area.float() / 1024, atol=1e-6)  # lambda corrected to the box
    rows, cols = pasted.any(2), pasted.any(1)
    assert torch.equal(area, rows.sum(1) * cols.sum(1)), "a rectangle"
    some = area > 0
    rows, cols = rows[some].long(), cols[some].long()
    return {"area": area, "top": rows.argmax(1), "bottom": 32 - rows.flip(1).argmax(1),
            "left": cols.argmax(1), "right": 32 - cols.flip(1).argmax(1)}


@pytest.mark.parametrize("alpha", [0.4, 1.0])
def test_mixup_lambda_images_and_targets_are_torchvisions_in_law(alpha: float) -> None:
    ours = _ours(7, 200, mixup_alpha=alpha)
    x, soft = torch.stack([d[0] for d in ours]), torch.stack([d[1] for d in ours])
    lam = soft[:, 0, 0]
    # image 0 is lam of itself (black) and 1 - lam of image 1 (white), image 1 the other way; targets alike
    assert torch.allclose(x[:, 0], (1 - lam).view(-1, 1, 1, 1).expand(-1, 3, 32, 32), atol=1e-6)
    assert torch.allclose(x[:, 1], 1 - x[:, 0], atol=1e-6)
    assert torch.allclose(soft, torch.stack([lam, 1 - lam], 1)[:, [[0, 1], [1, 0]]], atol=1e-6)
    lam_ours = _lambdas(7, alpha)
    lam_theirs = torch.stack([d[1][0, 0] for d in _torchvision(v2.MixUp(alpha=alpha, num_classes=2), 8)])
    variance = 1 / (4 * (2 * alpha + 1))  # of Beta(alpha, alpha), whose mean is 1/2
    for lam in (lam_ours, lam_theirs):
        assert abs(float(lam.mean()) - 0.5) < 4 * (variance / len(lam)) ** 0.5
        assert abs(float(lam.var()) / variance - 1) < 0.1
    distance, critical = _ks(lam_ours, lam_theirs)
    assert distance < critical
    other = 1.0 if alpha == 0.4 else 0.4  # the comparison notices the other alpha
    assert _ks(_lambdas(7, other), lam_theirs)[0] > critical


def test_cutmix_boxes_and_corrected_lambda_are_torchvisions_in_law() -> None:
    ours, theirs = _box_stats(_ours(9, cutmix_alpha=1.0)), _box_stats(_torchvision(v2.CutMix(num_classes=2), 10))
    for key in ("area", "top", "bottom", "left", "right"):
        distance, critical = _ks(ours[key], theirs[key])
        assert distance < critical, key
    assert int(ours["top"].min()) == 0 and int(ours["bottom"].max()) == 32  # clipped at the border
    other = _box_stats(_ours(9, 500, cutmix_alpha=0.3))  # another alpha must not pass
    assert _ks(other["area"], theirs["area"])[0] > _ks(other["area"], theirs["area"])[1]


def test_mix_prob_and_switch_prob_decide_per_batch() -> None:
    mix = BatchMix(mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.7, switch_prob=0.2,
                   generator=torch.Generator().manual_seed(11))
    draws = [mix.sample() for _ in range(2 * DRAWS)]
    applied = torch.stack([d.apply for d in draws]).double()
    cutmix = torch.stack([d.cutmix for d in draws]).double()
    assert abs(float(applied.mean()) - 0.7) < 4 * (0.21 / len(draws)) ** 0.5
    assert abs(float(cutmix.mean()) - 0.2) < 4 * (0.16 / len(draws)) ** 0.5
    x, targets = mix.apply(PAIR, PAIR_LABELS, dataclasses.replace(draws[0], apply=torch.tensor(False)))
    assert torch.equal(x, PAIR) and float(targets.lam) == 1.0  # not mixed: the batch as it was


# ---------------------------------------------------------------- in the training step


def test_a_mixed_step_trains_on_the_mixed_smoothed_target_and_scores_the_weighted_top1(batch) -> None:
    """Everything on: the step's loss is the soft-target cross-entropy against lam of each image's smoothed
    label and 1 - lam of its partner's; its top-1 is lam * hit(own) + (1 - lam) * hit(partner)."""
    images, labels = batch
    app = _step({"loss.label_smoothing": 0.1, "augment.cutout": 8, "augment.mixup_alpha": 1.0,
                 "augment.cutmix_alpha": 1.0}, model=_tiny_model)
    before, state = copy.deepcopy(app.model).train(), app.augment.generator.get_state()
    loss, top1 = app.step(images, labels)
    app.augment.generator.set_state(state)
    x, targets = build_mix(app.cfg.augment, app.augment.generator)(app.augment(images), labels)
    with torch.no_grad():
        logits = before(x.contiguous(memory_format=torch.channels_last))
    lam = float(targets.lam)
    assert 0 < lam < 1 and torch.equal(targets.partners, labels.flip(0))
    assert float(loss) == pytest.approx(float(_soft_cross_entropy(logits, targets.soft(CLASSES, 0.1))), rel=1e-5)
    hits = logits.argmax(1)
    weighted = lam * float((hits == labels).float().mean()) + (1 - lam) * float((hits == labels.flip(0)).float().mean())
    assert float(top1) == pytest.approx(weighted, abs=1e-6)


def _step_before_issue_21(model: nn.Module, optimizer: torch.optim.Optimizer, augment: BatchAugment) -> TrainStep:
    """app/engines.py's make_train_step as it was before these options (fp32, no scaler), copied."""
    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        model.train()
        x = augment(images).contiguous(memory_format=torch.channels_last)
        logits = model(x)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        top1 = (logits.detach().argmax(1) == labels).float().mean()
        return torch.stack([loss.detach().float(), top1])
    return step


def _draws_before_issue_21(generator: torch.Generator, n: int) -> None:
    """What BatchAugment.sample drew before Cutout: crop offsets, flips, angles, jitter factors and order."""
    torch.randint(0, 9, (n, 2), generator=generator)
    for shape in ((n,), (n,), (n, 3), (n, 3)):
        torch.rand(shape, generator=generator)


def test_with_every_new_option_off_the_step_is_the_one_from_before(batch) -> None:
    """The new keys explicitly off: three steps give bit for bit the losses, top-1s and weights of the step
    as it was, from the same draws of the augmentation generator."""
    images, labels = batch
    off = {"loss.label_smoothing": 0.0, "augment.cutout": 0, "augment.mixup_alpha": 0.0, "augment.cutmix_alpha": 0.0}
    app, old = _step(off, model=_tiny_model), _step({}, model=_tiny_model)
    old_step = _step_before_issue_21(old.model, old.optimizer, old.augment)
    replay = torch.Generator().manual_seed(1)
    for _ in range(3):
        assert torch.equal(app.step(images, labels), old_step(images, labels))
        _draws_before_issue_21(replay, N)
    assert all(torch.equal(a, b) for a, b in zip(app.model.state_dict().values(), old.model.state_dict().values()))
    assert torch.equal(app.augment.generator.get_state(), replay.get_state())


OPTIONS = {"label_smoothing": {"loss.label_smoothing": 0.1}, "cutout": {"augment.cutout": 8},
           "mixup": {"augment.mixup_alpha": 0.4}, "cutmix": {"augment.cutmix_alpha": 1.0}}


def test_the_options_combine_pairwise(batch) -> None:
    """Each pair of options on (Mixup with CutMix: one or the other per batch), two steps of a small model:
    finite losses, top-1 in [0, 1], and a first loss other than the plain step's on the same batch."""
    images, labels = batch
    plain = float(_step({}, model=_tiny_model).step(images, labels)[0])
    for a, b in itertools.combinations(OPTIONS, 2):
        app = _step({**OPTIONS[a], **OPTIONS[b]}, model=_tiny_model)
        for i in range(2):
            loss, top1 = (float(v) for v in app.step(images, labels))
            assert loss == loss and abs(loss) < 1e3 and 0 <= top1 <= 1, (a, b)
            if i == 0:
                assert loss != plain, (a, b)
