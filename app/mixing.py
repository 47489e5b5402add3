"""Mixup and CutMix for a whole batch on the device, in the training step after the augmentation.

As timm's `Mixup` in batch mode (timm/data/mixup.py), whose names and defaults the config takes:
`mix_prob` (timm's mixup_prob, 1.0) is the chance that a batch is mixed at all, `mix_switch_prob` (timm's
switch_prob, 0.5) the chance that a mixed batch gets CutMix rather than Mixup when both are on. One lambda
per batch from Beta(alpha, alpha), and image i paired with image n - 1 - i (the batch flipped; the loader
shuffles, so the partner is a random image). Mixup (Zhang et al. 2018, arXiv:1710.09412) blends the two
images, lam * x + (1 - lam) * partner; CutMix (Yun et al. 2019, arXiv:1905.04899) pastes the partner's
pixels into a box of side sqrt(1 - lam) times the image's, its centre uniform over the pixels, clipped
at the border, and lambda becomes 1 - the box's real area (timm's correct_lam; torchvision's
lam_adjusted). Mixing happens after normalisation, as timm does it (and torchvision's v2 transforms on
normalised tensors): the blend of two normalised images is the normalised blend, and a pasted box keeps
its own normalisation.

Under a CUDA graph every step must run the same kernels on values it does not read back: so the per-batch
decisions (mix or not, CutMix or Mixup) are device tensors chosen between with torch.where, the box is a
mask made from comparisons, and every random number comes from the augmentation generator, whose state a
checkpoint saves and a replay advances. Every draw is made every step, whatever it decides.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from app.config import AugmentConfig


@dataclass(frozen=True)
class MixParams:
    """One batch's draws, all 0-dim (or (2,)) tensors on the generator's device."""

    apply: torch.Tensor  # bool: the batch is mixed (probability mix_prob)
    cutmix: torch.Tensor  # bool: CutMix rather than Mixup
    lam: torch.Tensor  # float64: the Beta(alpha, alpha) draw of the chosen one
    centre: Optional[torch.Tensor]  # (2,) int64 row and column of CutMix's box centre; None when CutMix is off


@dataclass(frozen=True)
class MixedTargets:
    """What a mixed batch is trained towards: lam of each image's own label, 1 - lam of its partner's."""

    labels: torch.Tensor  # (n,) y_a, the batch's labels
    partners: torch.Tensor  # (n,) y_b, the labels of the images mixed in (the batch flipped)
    lam: torch.Tensor  # () float32: 1 when the batch was not mixed; CutMix's corrected to its box's area

    def cross_entropy(self, logits: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """lam * CE(y_a) + (1 - lam) * CE(y_b), each term smoothed by F.cross_entropy's own argument: the
        cross-entropy is linear in the target, so this is the soft-target cross-entropy against `soft`,
        timm's SoftTargetCrossEntropy of mixup_target, without a (n, classes) target in memory."""
        own = F.cross_entropy(logits, self.labels, label_smoothing=label_smoothing)
        other = F.cross_entropy(logits, self.partners, label_smoothing=label_smoothing)
        return self.lam * own + (1.0 - self.lam) * other

    def top1(self, logits: torch.Tensor) -> torch.Tensor:
        """lam * hit(y_a) + (1 - lam) * hit(y_b) averaged over the batch: the share of the target's mass
        the argmax takes, so plain top-1 when the batch is not mixed, and no jump at lam = 0.5."""
        predicted = logits.argmax(1)
        return (self.lam * (predicted == self.labels).float().mean()
                + (1.0 - self.lam) * (predicted == self.partners).float().mean())

    def soft(self, classes: int, label_smoothing: float = 0.0) -> torch.Tensor:
        """(n, classes) the mixed soft targets, as timm's mixup_target and torchvision's v2 MixUp/CutMix give."""
        def smooth(y: torch.Tensor) -> torch.Tensor:
            return F.one_hot(y, classes).float() * (1.0 - label_smoothing) + label_smoothing / classes
        return self.lam * smooth(self.labels) + (1.0 - self.lam) * smooth(self.partners)


class BatchMix:
    """Mixup and/or CutMix for a normalised float batch and its labels; an alpha of 0 turns one off."""

    def __init__(self, *, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5, generator: torch.Generator) -> None:
        for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name, value in (("prob", prob), ("switch_prob", switch_prob)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        if mixup_alpha == 0 and cutmix_alpha == 0:
            raise ValueError("BatchMix needs mixup_alpha or cutmix_alpha above 0")
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.prob, self.switch_prob = float(prob), float(switch_prob)
        self.generator = generator
        dev = generator.device
        # Constants on the device from the start: no host-to-device copy per step. float64 gammas: at small
        # alphas float32 ones underflow to 0 often enough to matter (both 0 would make lam 0 / 0).
        self._mixup_alphas = torch.full((2,), self.mixup_alpha, dtype=torch.float64, device=dev)
        self._cutmix_alphas = torch.full((2,), self.cutmix_alpha, dtype=torch.float64, device=dev)
        self._one = torch.ones((), device=dev)

    def sample(self, size: tuple[int, int] = (32, 32)) -> MixParams:
        """One batch's draws for images of `size` (height, width), from `self.generator` only."""
        g, dev = self.generator, self.generator.device
        u = torch.rand(2, generator=g, device=dev)
        apply = u[0] < self.prob
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cutmix = u[1] < self.switch_prob
        else:
            cutmix = torch.full((), self.cutmix_alpha > 0, device=dev)
        alphas = torch.where(cutmix, self._cutmix_alphas, self._mixup_alphas)
        # Beta(a, a) as X / (X + Y) of two Gamma(a) draws (torch.distributions.Beta's own way, which takes no
        # generator); clamped as torch.distributions.Gamma clamps them.
        gammas = torch._standard_gamma(alphas, generator=g).clamp_(min=torch.finfo(torch.float64).tiny)
        lam = gammas[0] / gammas.sum()
        centre = None
        if self.cutmix_alpha > 0:
            centre = torch.cat([torch.randint(0, size[0], (1,), generator=g, device=dev),
                                torch.randint(0, size[1], (1,), generator=g, device=dev)])
        return MixParams(apply=apply, cutmix=cutmix, lam=lam, centre=centre)

    def apply(self, x: torch.Tensor, labels: torch.Tensor, params: MixParams) -> tuple[torch.Tensor, MixedTargets]:
        """The mixed (n, C, H, W) batch and its targets; an unmixed batch comes back as it was, lam 1."""
        partner = x.flip(0)
        lam = params.lam.float()
        if self.mixup_alpha > 0:
            mixup = x * lam + partner * (1.0 - lam)  # timm: x.mul_(lam).add_(x.flip(0).mul_(1 - lam))
        if self.cutmix_alpha > 0:
            assert params.centre is not None
            box, box_lam = cutmix_box(params.lam, params.centre, x.shape[2], x.shape[3])
            cut = torch.where(box, partner, x)
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            mixed, mixed_lam = torch.where(params.cutmix, cut, mixup), torch.where(params.cutmix, box_lam, lam)
        elif self.cutmix_alpha > 0:
            mixed, mixed_lam = cut, box_lam
        else:
            mixed, mixed_lam = mixup, lam
        out = torch.where(params.apply, mixed, x)
        return out, MixedTargets(labels, labels.flip(0), torch.where(params.apply, mixed_lam, self._one))

    def __call__(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, MixedTargets]:
        return self.apply(x, labels, self.sample((x.shape[2], x.shape[3])))


def cutmix_box(lam: torch.Tensor, centre: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, w) bool mask of CutMix's box and lambda corrected to its area, as timm's rand_bbox and
    cutmix_bbox_and_lam: cut sides int(h * sqrt(1 - lam)) and int(w * ...), rows [cy - cut_h // 2,
    cy + cut_h // 2) clipped to the image (so an odd cut is one pixel short, as there), columns alike.
    torchvision's v2 CutMix draws the same box: int(0.5 * sqrt(1 - lam) * H) is int(H * sqrt(1 - lam)) // 2."""
    ratio = (1.0 - lam).clamp(min=0.0).sqrt()
    bounds = []
    for axis, side in enumerate((h, w)):  # Python ints as clamp bounds: nothing copied to the device
        half = torch.floor(side * ratio).long() // 2
        low, high = (centre[axis] - half).clamp(0, side), (centre[axis] + half).clamp(0, side)
        inside = torch.arange(side, device=centre.device)
        bounds.append(((inside >= low) & (inside < high), high - low))
    (rows, height), (cols, width) = bounds
    box = rows[:, None] & cols[None, :]
    area = (height * width).float()
    return box, 1.0 - area / float(h * w)


def build_mix(augment: AugmentConfig, generator: torch.Generator) -> Optional[BatchMix]:
    """The config's Mixup/CutMix as a BatchMix drawing from `generator`; None when both alphas are 0,
    and then the step is the one from before mixing existed (no draws, the plain loss)."""
    if augment.mixup_alpha == 0 and augment.cutmix_alpha == 0:
        return None
    return BatchMix(mixup_alpha=augment.mixup_alpha, cutmix_alpha=augment.cutmix_alpha, prob=augment.mix_prob,
                    switch_prob=augment.mix_switch_prob, generator=generator)
