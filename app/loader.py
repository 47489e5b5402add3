"""Batches straight from tensors that already sit on the training device.

Replaces a DataLoader: no worker processes, no PIL, no per-image Python. Each epoch draws one
permutation from (seed, epoch), the same on every process, and each process takes a disjoint shard of
it, so the data order depends only on the seed and the epoch and can be replayed exactly on resume.
`batch_size` is the global batch of one optimizer step; each of `world_size` processes takes
`batch_size // world_size` of it, the same split that `idist.auto_dataloader` makes.
"""
from __future__ import annotations

from typing import Iterator

import torch


def iterations_per_epoch(n_images: int, batch_size: int, world_size: int = 1) -> int:
    """Training iterations in an epoch of `n_images`: each process's equal shard, in batches of
    `batch_size // world_size` (the last one smaller), as ShardedBatches draws them."""
    return _batches(n_images // world_size, batch_size // world_size)


def _batches(items: int, per_batch: int) -> int:
    return -(-items // per_batch)  # ceiling division, exact at any size


class ShardedBatches:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, shuffle: bool,
                 seed: int = 0, rank: int = 0, world_size: int = 1, drop_uneven: bool = True) -> None:
        """`drop_uneven`: for training, every process gets the same number of images (the last
        `len % world_size` of each permutation are skipped) so that gradient all-reduces line up. For
        evaluation pass False: the images split unevenly and each is seen exactly once."""
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} does not divide over {world_size} processes")
        self.images, self.labels = images, labels
        self.per_process = batch_size // world_size
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.world_size, self.drop_uneven = rank, world_size, drop_uneven
        self.epoch = 1
        self.skip_batches = 0

    def shard_size(self) -> int:
        n = len(self.labels)
        if self.drop_uneven:
            return n // self.world_size
        return len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        return _batches(self.shard_size(), self.per_process)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Choose the epoch whose permutation the next iteration uses, and how many of its batches
        were already trained on (a resume from the middle of an epoch)."""
        self.epoch, self.skip_batches = epoch, skip_batches

    def _indices(self) -> torch.Tensor:
        n = len(self.labels)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        shard = order[self.rank::self.world_size]
        return shard[: self.shard_size()].to(self.labels.device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # A generator: the indices are drawn at the first next(), i.e. inside the epoch set above.
        indices = self._indices()
        start, self.skip_batches = self.skip_batches * self.per_process, 0
        for i in range(start, len(indices), self.per_process):
            idx = indices[i: i + self.per_process]
            yield self.images[idx], self.labels[idx]
