"""The seed's data path: torchvision transforms applied image by image, as a CIFAR100 Dataset does.

On the CPU it runs on PIL images, exactly as `torchvision.datasets.CIFAR100(transform=...)` feeds
them; on CUDA the same transforms run per image on uint8 tensors already on the GPU (ToTensor becomes
ConvertImageDtype), so that both pipelines are measured on the same device and the same images.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from PIL import Image
from torchvision import transforms as T


def seed_transform(mean: Sequence[float], std: Sequence[float], on_tensors: bool = False) -> Callable:
    to_float = T.ConvertImageDtype(torch.float32) if on_tensors else T.ToTensor()
    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.RandomRotation(15),
                      T.ColorJitter(0.2, 0.2, 0.2), to_float, T.Normalize(mean, std)])


def as_pil(images: torch.Tensor) -> list[Image.Image]:
    """uint8 (n, 3, 32, 32) -> PIL images, what CIFAR100.__getitem__ hands to its transform."""
    return [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images.cpu()]


def run_per_image(transform: Callable, images: Sequence) -> torch.Tensor:
    """Transform each image on its own and stack the batch, as a DataLoader's collate would."""
    return torch.stack([transform(img) for img in images])
