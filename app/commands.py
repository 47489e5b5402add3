"""What `train`, `evaluate` and `predict` do before their processes start: every check that can refuse
the command runs here, in the launching process, before anything is written; then the work starts in
1..N processes (app/launch.py).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

from app.compiling import use_compile_cache
from app.config import Config
from app.data import ensure_dataset
from app.device import cuda_wanted
from app.errors import ConfigError
from app.launch import is_first_on_node, is_first_process, launch_settings, run_processes
from app.runs import check_writable, plan_run


def train(cfg: Config, resume: Optional[str], dry_run: bool) -> int:
    """Check the launch, the run to create or resume (with its checkpoint), the output folder and the
    data; then describe the run (`dry_run`) or train it."""
    settings = launch_settings(cfg.train.device, cfg.distributed.nproc_per_node, cfg.distributed.backend)
    if cfg.train.amp == "fp16" and not cuda_wanted(cfg.train.device):
        raise ConfigError("train.amp: fp16 is for CUDA GPUs; on the CPU its matrix products have no fast kernels "
                          "and a run takes many times longer than with bf16 (use bf16, or off)")
    if cfg.train.batch_size % settings.world:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} does not divide evenly over {settings.world} "
                          f"processes")
    plan = plan_run(cfg, resume, is_first_process())
    check_writable(plan.run_dir)
    if plan.finished(cfg.train.epochs):
        print(f"{plan.run_dir} is finished ({cfg.train.epochs} epochs); nothing to do")
        return 0
    if is_first_on_node():
        # Under torchrun the other processes of this node wait in the process-group rendezvous,
        # which local rank 0 joins only after this: the download happens once per node.
        ensure_dataset(cfg.data.root, cfg.data.dataset, cfg.data.download)
    if dry_run:
        from app.dry_run import describe_run

        print(describe_run(cfg, settings.world))
        return 0
    use_compile_cache(cfg, plan.run_dir.parent)  # before the training code imports torch's compiler
    from app.training import training  # imported here: keeps --help and flag errors fast

    if settings.spawn and plan.checkpoint is not None:  # spawned processes load the checkpoint themselves
        plan = dataclasses.replace(plan, checkpoint=plan.checkpoint.without_contents())
    run_processes(settings, training, cfg, plan, graceful=True)
    return 0


def evaluate(checkpoint: str, data_root: Optional[str], device: str, nproc: int, backend: Optional[str],
             as_json: bool, ema: bool = False) -> int:
    """Check the checkpoint (with `ema`, that it holds the weights' EMA) and the data, then evaluate in
    1..N processes; rank 0 prints."""
    from app.evaluate import check_evaluation_inputs, run_evaluate

    settings = launch_settings(device, nproc, backend)
    contents = check_evaluation_inputs(Path(checkpoint), data_root, ema)
    run_processes(settings, run_evaluate, Path(checkpoint), None if settings.spawn else contents, data_root,
                  device, as_json, ema)
    return 0


def predict(checkpoint: str, images: Sequence[str], device: str, as_json: bool, topk: int = 5,
            csv_path: Optional[str] = None) -> int:
    """In this process: a forward over a few hundred 32x32 images at a time needs no other."""
    from app.predict import run_predict

    launch_settings(device, 1, None)  # checks that --device cuda has a GPU
    run_predict(Path(checkpoint), images, device, topk, as_json, csv_path)
    return 0
