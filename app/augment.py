"""Batched, on-device training augmentation for CIFAR images.

The per-image torchvision PIL pipeline

    RandomCrop(32, padding=4), RandomHorizontalFlip(), RandomRotation(15),
    ColorJitter(0.2, 0.2, 0.2), ToTensor(), Normalize(mean, std)

costs a Python round trip and a PIL conversion per image, which starves the model long before the
GPU (or even one CPU core) is busy. This module applies the same augmentations, drawn from the same
distributions, to a whole uint8 batch at once with tensor ops on whatever device the batch is on.

Sampling and applying are split (`sample` / `apply`) so that tests can feed chosen parameters, and
all randomness comes from one explicit `torch.Generator` so that a run is reproducible and resumable
(the generator's state is part of every training checkpoint, app/checkpoint.py) without touching the
global RNG. Outputs match torchvision in
distribution, not bit for bit: PIL rounds to uint8 after every jitter op, we stay in float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from app.config import CIFAR100_MEAN, CIFAR100_STD, AugmentConfig

# ITU-R 601-2 luma, as PIL's convert("L") uses (torchvision's tensor path rounds 0.299 to 0.2989).
_LUMA = (0.299, 0.587, 0.114)

# Indices of the jitter ops in `AugmentParams.factors` and `AugmentParams.order`.
BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2


@dataclass(frozen=True)
class AugmentParams:
    """Per-image random parameters for a batch of n images (all on the generator's device)."""

    offsets: torch.Tensor  # (n, 2) int64 crop top/left into the padded image, each in 0..2*padding
    flip: torch.Tensor  # (n,) bool, flip horizontally after cropping
    angle: torch.Tensor  # (n,) float32 degrees, counter-clockwise, in [-rotation, rotation]
    factors: torch.Tensor  # (n, 3) float32 brightness, contrast, saturation factors
    order: torch.Tensor  # (n, 3) int64 permutation of (0, 1, 2): which jitter op runs in each slot
    cutout: Optional[torch.Tensor] = None  # (n, 2) int64 row/column of each Cutout square's centre; None: off


class Normalize:
    """uint8 (n, C, H, W) images -> float32 in [0, 1], then (x - mean) / std per channel, with the
    constants made once on `device`: building them per batch from Python lists would copy host to
    device, and synchronise, on every call."""

    def __init__(self, mean: Sequence[float] = CIFAR100_MEAN, std: Sequence[float] = CIFAR100_STD,
                 device: torch.device | str = "cpu") -> None:
        self.scale, self.shift = _normalize_constants(mean, std, torch.device(device))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        return _normalize_float(images.float().div_(255.0), self.scale, self.shift)


class BatchAugment:
    """Random crop, flip, rotation and colour jitter for a uint8 batch, then normalisation, then Cutout.

    A step whose option is 0 (or `hflip=False`) is skipped, and Cutout off draws nothing: the draws are
    those from before it existed. All draws come from `generator`, which must live on the same device as
    the images passed to `__call__`.
    """

    def __init__(
        self,
        *,
        padding: int = 4,
        hflip: bool = True,
        rotation: float = 15.0,
        brightness: float = 0.2,
        contrast: float = 0.2,
        saturation: float = 0.2,
        mean: Sequence[float] = CIFAR100_MEAN,
        std: Sequence[float] = CIFAR100_STD,
        cutout: int = 0,
        generator: torch.Generator,
    ) -> None:
        for name, value in (("padding", padding), ("rotation", rotation), ("brightness", brightness),
                            ("contrast", contrast), ("saturation", saturation), ("cutout", cutout)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.padding = int(padding)
        self.hflip = bool(hflip)
        self.rotation = float(rotation)
        self.jitter = (float(brightness), float(contrast), float(saturation))
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.cutout = int(cutout)
        self.generator = generator
        # Constants live on the generator's device from the start: no host-to-device copy per batch.
        dev = generator.device
        self._scale, self._shift = _normalize_constants(self.mean, self.std, dev)
        self._lo = torch.tensor([max(0.0, 1.0 - s) for s in self.jitter], device=dev)
        self._hi = torch.tensor([1.0 + s for s in self.jitter], device=dev)
        self._luma = torch.tensor([_LUMA], dtype=torch.float32, device=dev)

    def sample(self, n: int, size: tuple[int, int] = (32, 32)) -> AugmentParams:
        """Draw parameters for n images of `size` (height, width) from `self.generator`, on its device."""
        g = self.generator
        dev = g.device
        offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=g, device=dev)
        flip = torch.rand(n, generator=g, device=dev) < 0.5
        if not self.hflip:
            flip = torch.zeros_like(flip)
        angle = (torch.rand(n, generator=g, device=dev) * 2.0 - 1.0) * self.rotation
        factors = self._lo + (self._hi - self._lo) * torch.rand(n, 3, generator=g, device=dev)
        # argsort of iid uniforms is a uniformly random permutation per row.
        order = torch.rand(n, 3, generator=g, device=dev).argsort(dim=1)
        cutout = None
        if self.cutout:  # drawn last, and only when on: with it off the draws are the same as without it
            cutout = torch.stack([torch.randint(0, size[0], (n,), generator=g, device=dev),
                                  torch.randint(0, size[1], (n,), generator=g, device=dev)], 1)
        return AugmentParams(offsets=offsets, flip=flip, angle=angle, factors=factors, order=order, cutout=cutout)

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Crop, flip, rotate, jitter, normalise and cut out: uint8 (n, 3, H, W) images -> float32."""
        _check_images(images)
        if images.shape[1] != 3:
            raise ValueError(f"expected 3 colour channels, got shape {tuple(images.shape)}")
        if self.padding or self.hflip or self.rotation:
            x = _crop_flip_rotate(images, params, self.padding)
        else:
            x = images.to(torch.float32).mul_(1.0 / 255.0)
        if any(s > 0 for s in self.jitter):
            x = _jitter(x, params.factors, params.order, self._luma)
        x = _normalize_float(x, self._scale, self._shift)
        if self.cutout:
            if params.cutout is None:
                raise ValueError("cutout is on but the parameters have no cutout centres")
            x = _cutout(x, params.cutout, self.cutout)
        return x

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.apply(images, self.sample(images.shape[0], (images.shape[2], images.shape[3])))


def build_augment(augment: AugmentConfig, generator: torch.Generator) -> BatchAugment:
    """The config's `augment` section as a BatchAugment drawing from `generator`."""
    return BatchAugment(padding=augment.crop_padding, hflip=augment.hflip, rotation=augment.rotation,
                        brightness=augment.brightness, contrast=augment.contrast, saturation=augment.saturation,
                        mean=augment.mean, std=augment.std, cutout=augment.cutout, generator=generator)


def _check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 (n, C, H, W) images, got {images.dtype} {tuple(images.shape)}")


def _normalize_constants(mean: Sequence[float], std: Sequence[float],
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    scale = torch.tensor([1.0 / s for s in std], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32, device=device)
    return scale, shift.view(1, -1, 1, 1)


def _normalize_float(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std as one fused x * (1 / std) + (-mean / std), contiguous output."""
    return torch.addcmul(shift, x, scale).contiguous()


def _crop_flip_rotate(images: torch.Tensor, params: AugmentParams, padding: int) -> torch.Tensor:
    """Zero-pad, crop, mirror and rotate uint8 images in one nearest-neighbour resampling.

    The three steps compose into one affine map per image from output pixels to the padded image,
    so a single `grid_sample` does them all. Rotation must see only the cropped window (anything
    it brings in from outside is fill 0, as in torchvision), so the padded image is zeroed outside
    each image's window first, in the same multiply that turns uint8 into float32 in [0, 1].
    """
    n, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    hp, wp = h + 2 * padding, w + 2 * padding
    dev = images.device
    top, left = params.offsets[:, 0:1], params.offsets[:, 1:2]
    r = torch.arange(hp, device=dev)
    c = torch.arange(wp, device=dev)
    rows_in = ((r >= top) & (r < top + h)).to(torch.float32)  # (n, hp)
    cols_in = ((c >= left) & (c < left + w)).to(torch.float32) * (1.0 / 255.0)  # (n, wp)
    x = padded * (rows_in[:, :, None] * cols_in[:, None, :])[:, None]  # (n, C, hp, wp) float32
    theta = _crop_flip_rotate_theta(params, h, w, hp, wp)
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _crop_flip_rotate_theta(params: AugmentParams, h: int, w: int, hp: int, wp: int) -> torch.Tensor:
    """(n, 2, 3) affine maps: output normalised coords -> padded-image normalised coords.

    Rotation (counter-clockwise by `angle` about the centre, rigid in pixels, hence the h/w terms)
    maps output coords to the cropped window; a flip negates x there; the window sits at `offsets`
    in the padded image, which rescales by w/wp and shifts.
    """
    rad = params.angle.to(torch.float32) * (math.pi / 180.0)
    cos, sin = rad.cos(), rad.sin()
    sign = 1.0 - 2.0 * params.flip.to(torch.float32)
    offsets = params.offsets.to(torch.float32)
    sx, sy = w / wp, h / hp
    tx = (w + 2.0 * offsets[:, 1]) / wp - 1.0
    ty = (h + 2.0 * offsets[:, 0]) / hp - 1.0
    row_x = torch.stack([sign * sx * cos, -sign * sx * sin * (h / w), tx], 1)
    row_y = torch.stack([sy * sin * (w / h), sy * cos, ty], 1)
    return torch.stack([row_x, row_y], 1)


def _jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, luma: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation in a per-image order, each clamped to [0, 1].

    Every op is a blend f * x + (1 - f) * d with its own "degenerate" image d: black for
    brightness, the mean grey level for contrast, the grey image for saturation. So each of the
    three slots is one blend whose f and d are picked per image with gather / torch.where.
    """
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w)
    zero = torch.zeros((), dtype=flat.dtype, device=flat.device)
    for slot in range(3):
        op = order[:, slot].view(n, 1, 1)
        f = factors.gather(1, order[:, slot : slot + 1]).view(n, 1, 1)
        grey = torch.matmul(luma, flat)  # (n, 1, h*w)
        degenerate = torch.where(
            op == SATURATION, grey, torch.where(op == CONTRAST, grey.mean(dim=2, keepdim=True), zero)
        )
        flat = torch.lerp(degenerate.expand_as(flat), flat, f).clamp_(0.0, 1.0)
    return flat.view(n, c, h, w)


def _cutout(x: torch.Tensor, centres: torch.Tensor, side: int) -> torch.Tensor:
    """Cutout (DeVries & Taylor 2017, arXiv:1708.04552): per image, a side x side square centred at `centres`
    set to 0 after normalisation (the data set's mean colour), clipped where it runs over the border.

    As the authors' util/cutout.py: the centre is uniform over every pixel of the image, so squares near
    the border are partly outside it (the paper: this mattered). Their box is [c - side // 2, c + side // 2),
    one pixel short of `side` when it is odd; here it is [c - side // 2, c - side // 2 + side), the same box
    for the even sides the paper uses (16 on CIFAR-10, 8 on CIFAR-100). Built as a mask from comparisons,
    not slices, so no size depends on the draw: one kernel sequence for the whole batch, capturable.
    """
    n, _, h, w = x.shape
    start = centres - side // 2  # (n, 2) top, left; may be negative
    r = torch.arange(h, device=x.device)
    c = torch.arange(w, device=x.device)
    rows = (r >= start[:, 0:1]) & (r < start[:, 0:1] + side)  # (n, h)
    cols = (c >= start[:, 1:2]) & (c < start[:, 1:2] + side)  # (n, w)
    return x.masked_fill((rows[:, :, None] & cols[:, None, :])[:, None], 0.0)
