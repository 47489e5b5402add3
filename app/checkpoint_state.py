"""What a training checkpoint carries besides the model, optimizer, schedule and trainer: the run's
config and class names, every process's augmentation generator, and a fingerprint of the data.

A checkpoint is loaded on the CPU (`app.runs.load_checkpoint`) and each object moves its own state to
where it lives: the model and optimizer copy theirs to the training device; a generator takes only a
CPU byte tensor, whatever device the checkpoint was written on, and only the state of its own kind of
generator (see GeneratorStates.load_state_dict).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine

from app.config import Config, to_dict
from app.data import Cifar100


class RunMeta:
    """What a checkpoint must carry besides weights: the config it was trained with and the class names.
    Stored as JSON text, so that loading needs nothing but weights_only=True."""

    def __init__(self, cfg: Config, classes: tuple[str, ...], data_fingerprint: str) -> None:
        self.config, self.classes, self.data_fingerprint = to_dict(cfg), list(classes), data_fingerprint

    def state_dict(self) -> dict[str, Any]:
        return {"config": json.dumps(self.config), "classes": json.dumps(self.classes),
                "data": self.data_fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass  # informational: the running config is authoritative, and checked against the run's


class GeneratorStates:
    """Every process's augmentation generator, for the training checkpoint that rank 0 writes.

    Each process draws its own augmentations; an exact resume needs each of them back in its own
    process. `gather` runs in every process just before the checkpoint handler (a collective when
    there are several), and rank 0's checkpoint stores one row per rank.
    """

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self._gathered: torch.Tensor | None = None
        self.reseeded = False  # set by a load of another kind of generator's state

    def gather(self, _: Engine | None = None) -> None:
        if idist.get_world_size() > 1:
            state = self.generator.get_state()[None].to(idist.device())
            self._gathered = idist.all_gather(state).cpu()

    def state_dict(self) -> dict[str, Any]:
        if idist.get_world_size() == 1 or self._gathered is None:
            return {"generators": self.generator.get_state()[None]}
        return {"generators": self._gathered}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # With another number of processes than the run had, resume is no longer exact (the data
        # shards change anyway); each process takes a row so that their streams stay distinct.
        row = state["generators"][idist.get_rank() % len(state["generators"])].to("cpu", copy=True)
        own = self.generator.get_state()
        if row.numel() == own.numel():
            self.generator.set_state(row)
            return
        # A checkpoint from another device: a CUDA generator's state (Philox: seed and offset, 16 bytes)
        # does not fit a CPU generator (Mersenne Twister, 5056 bytes), nor the reverse. The stream cannot
        # continue, so it restarts from a seed derived from the saved state: deterministic (the same
        # checkpoint resumes the same way every time) and distinct per process.
        digest = hashlib.sha256(row.numpy().tobytes() + idist.get_rank().to_bytes(4, "little")).digest()
        self.generator.manual_seed(int.from_bytes(digest[:8], "little"))
        self.reseeded = True


def data_fingerprint(data: Cifar100) -> str:
    """A hash of every image and label, so that a resume on other data is refused."""
    h = hashlib.sha256()
    for split in (data.train, data.test):
        h.update(split.images.numpy().tobytes())
        h.update(split.labels.numpy().tobytes())
    return h.hexdigest()[:16]
