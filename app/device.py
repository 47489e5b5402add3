"""Where a process computes, decided once: what "auto" means, how the GPU is set up, the memory layout.

Training, `evaluate`, `predict`, the launcher's checks and the benchmarks all ask here, so "auto" is
the same GPU-if-there-is-one everywhere, and a process given `cuda` without a GPU is refused in one
place rather than failing later in a CUDA call.
"""
from __future__ import annotations

import torch


def cuda_wanted(name: str) -> bool:
    """Whether `train.device` / `--device` NAME ("auto", "cpu", "cuda") means a GPU here."""
    return name == "cuda" or (name == "auto" and torch.cuda.is_available())


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device of the process with this local rank; a GPU becomes the process's current one."""
    if not cuda_wanted(name):
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    tune_backends()
    return torch.device("cuda", local_rank)


def tune_backends() -> None:
    """cuDNN autotuning and TF32 matmuls: what training and evaluation run with on a GPU (evaluate must
    use the same, or its figures drift from what training logged by a few images)."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def memory_format(channels_last: bool) -> torch.memory_format:
    """`train.channels_last`: the layout of the model's weights and of every batch it sees."""
    return torch.channels_last if channels_last else torch.contiguous_format
