"""torch.compile in this project: how the model is compiled, and where compiled code is kept between runs.

The model (train.compile) is compiled for the project's own CUDA-graph step (app/cuda_graph.py), not
for inductor's: inductor's CUDA graphs stay off (`triton.cudagraphs`, whatever TORCHINDUCTOR_CUDAGRAPHS
says), since a graph captured inside another graph's capture is not a thing CUDA does, and the project's
graph already holds the whole step (augmentation, backward, update). Shapes are static (`dynamic=False`):
the epoch's last, smaller batch gets a graph of its own, compiled in its own warm-up before its capture,
as the full batch's is; a dynamic-shape graph would serve both with slower kernels.

Compiling costs a fresh process the same again every run (forward and backward per batch shape: tens of
seconds or more for ResNet18, not measured on a GPU here), unless the compiled code is found on disk.
Inductor keeps it (FX graph cache, AOT autograd cache, Triton's kernel cache) under one folder, by
default in /tmp, which a machine's reboot or a new container loses. Here it is `.compile_cache` in the
folder that holds the run's folder (logging.output_dir; for a resumed run, the folder it is in), hidden
from `python -m app runs` and `--resume` like any dot-folder, so that runs of one output folder share
their compiled code: a second run of the same code, shapes and settings pays dynamo's tracing and the
loading of what was compiled, no compile.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from app.config import Config

CACHE_FOLDER = ".compile_cache"


def compile_model(model: nn.Module) -> nn.Module:
    """`model` compiled as train.compile means: static shapes, inductor's own CUDA graphs off."""
    return torch.compile(model, dynamic=False, options={"triton.cudagraphs": False})


def compiles(cfg: Config) -> bool:
    """Whether a run compiles anything: the model (train.compile) or the optimizer's update (train.fused_update)."""
    return cfg.train.compile or cfg.train.fused_update


def compile_cache_dir(cfg: Config, output_dir: Path) -> Optional[Path]:
    """Where a run whose folder is in `output_dir` keeps compiled code: OUTPUT_DIR/.compile_cache, or None
    where the run compiles nothing."""
    return (output_dir / CACHE_FOLDER).absolute() if compiles(cfg) else None


def use_compile_cache(cfg: Config, output_dir: Path) -> Optional[Path]:
    """Point inductor's and Triton's caches at `compile_cache_dir` (returned) when the run compiles, whatever
    folders the environment named. Called by the launcher (app/commands.py) before the training code is
    imported: the processes it spawns inherit the environment, and torchrun's each launch themselves.

    Why environment variables, and why then. torch 2.14 reads TORCHINDUCTOR_CACHE_DIR at every use
    (torch/_inductor/runtime/cache_dir_utils.py `cache_dir`: the FX graph cache's `fxgraph/`, the AOT
    autograd cache's `aotautograd/`, compiled modules and C++ builds) and hands it and TRITON_CACHE_DIR to
    its compile workers with every task (async_compile.py), so any time before the first compile would
    do; one exception, torch/_dynamo/package.py, fixes its folder when dynamo is imported (DynamoCache,
    used only with TORCH_CACHING_PRECOMPILE=1), hence before that import. Triton reads TRITON_CACHE_DIR
    at every use (triton/knobs.py); inductor sets it only where it is unset, so a process that compiled
    before would keep the old one: set here. The caches themselves (fx_graph_cache, enable_autograd_cache)
    are on by torch's default and left as the environment has them.

    Each process sets its own environment; the folder is shared: several processes (DDP, or runs of
    a sweep at once) may write the same entry at once, which inductor allows: every file is written to a
    name of its own (pid and thread) and renamed into place (codecache.py `write_atomic`), C++ builds
    take a file lock (`locks/`), and Triton writes each file in a temporary folder of its own and
    os.replace's it into place (triton/runtime/cache.py)."""
    folder = compile_cache_dir(cfg, output_dir)
    if folder is None:
        return None
    changed = os.environ.get("TORCHINDUCTOR_CACHE_DIR") != str(folder)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    if changed and "torch._inductor.utils" in sys.modules:  # paths an earlier compile here (a test's) remembered
        sys.modules["torch._inductor.utils"].clear_caches()
    return folder
