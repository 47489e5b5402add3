"""The whole training step, augmentation included, captured once as a CUDA graph and replayed.

At the recipe's batch of 128 an eager ResNet18 step on an H200 is bound by Python and kernel launches,
not by the GPU: 11.4 ms eager against 3.0 ms replayed from a graph (measured at commit 63fd933,
docs/BENCHMARKS.md; `python -m bench.levers` measures it again). A replay runs the kernels the eager
step launches, on the values each needs now; tests/test_cuda_graph.py checks graphed against eager
steps under the real OneCycleLR schedule.

What a replay needs, and how it gets it:
- fixed addresses: the batch is copied into static input tensors; one graph per batch shape (the
  epoch's last, smaller batch gets its own);
- every value the schedule changes per step, learning rate and momentum: the optimizer
  (app/optim.py) reads them inside the graph from device tensors, which `load_scheduled_values` refills
  from `param_groups` before each replay; during capture the optimizer leaves them alone, so no
  capture-time value is baked into the graph;
- the augmentation's random numbers: its generator is registered with each graph, so every replay
  draws new ones and the generator's state (saved in checkpoints) advances as in eager mode;
- under fp16, the loss scale and its decisions: the scaler (app/loss_scale.py) keeps its scale and
  count of good steps in device tensors that the graph reads and updates, and the skip of a non-finite
  step is a selection inside the optimizer's kernels, so nothing is decided on the host;
- no side effects from capturing: the warm-up steps that capture needs really train, so the model,
  the optimizer's state, the generator and any `extra` tensors the step changes (fp16's loss scale,
  app/loss_scale.py; the weights' EMA, app/ema.py) are snapshotted before and restored after.
- nothing compiled during capture: torch.compile (the model with train.compile, the update with
  train.fused_update) compiles at a function's first call for a shape, and a compile inside a capture
  fails or, worse, records its own bookkeeping into the graph (pytorch/pytorch#185074). The warm-up
  makes every compile of the shape happen before capture, and the capture runs under dynamo's
  "fail_on_recompile" stance: code compiled for these inputs runs, anything that would compile raises,
  and the step trains on eagerly (and says so) instead of replaying a graph of a compile.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

import torch
from torch import nn

from app.optim import CapturableSGD

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # engines.TrainStep: (images, labels) -> output


class CudaGraphStep:
    def __init__(self, eager_step: Step, model: nn.Module, optimizer: CapturableSGD,
                 generator: torch.Generator, extra: Sequence[torch.Tensor] = ()) -> None:
        self.eager_step, self.model, self.optimizer, self.generator = eager_step, model, optimizer, generator
        self.extra = list(extra)
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.failed = False

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.failed:
            return self.eager_step(images, labels)
        key = tuple(images.shape)
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(images, labels)
            except Exception as e:  # noqa: BLE001 - any capture failure: train on, eagerly
                self.failed = True
                print(f"warning: CUDA graph capture failed ({str(e).splitlines()[0]}); training eagerly",
                      file=sys.stderr)
                return self.eager_step(images, labels)
        graph, static_images, static_labels, static_output = self._graphs[key]
        static_images.copy_(images, non_blocking=True)
        static_labels.copy_(labels, non_blocking=True)
        self.optimizer.load_scheduled_values()
        graph.replay()
        return static_output.clone()

    def _snapshot(self) -> dict[str, Any]:
        return {
            "model": [t.detach().clone() for t in self.model.state_dict().values()],
            "optimizer": {(p, k): v.clone() for p, s in self.optimizer.state.items() for k, v in s.items()
                          if isinstance(v, torch.Tensor)},
            "generator": self.generator.get_state(),
            "extra": [t.detach().clone() for t in self.extra],
        }

    def _restore(self, snapshot: dict[str, Any]) -> None:
        with torch.no_grad():
            for t, saved in zip(self.model.state_dict().values(), snapshot["model"]):
                t.copy_(saved)
            for p, s in self.optimizer.state.items():
                for k, v in s.items():
                    if isinstance(v, torch.Tensor):
                        # State born in the warm-up goes back to how the optimizer creates it: zero
                        # (momentum * 0 + grad is the first step's buffer, exactly).
                        v.copy_(snapshot["optimizer"][p, k]) if (p, k) in snapshot["optimizer"] else v.zero_()
            for t, saved in zip(self.extra, snapshot["extra"]):
                t.copy_(saved)
        self.generator.set_state(snapshot["generator"])

    def _capture(self, images: torch.Tensor, labels: torch.Tensor):
        snapshot = self._snapshot()
        static_images, static_labels = images.clone(), labels.clone()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # cudnn autotuning, optimizer state, autograd, compiles: all before capture
                    self.eager_step(static_images, static_labels)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            graph.register_generator_state(self.generator)
            # The graph's own memory pool: graphs replay in any order. Nothing compiles in it (see above).
            with torch.compiler.set_stance("fail_on_recompile"), torch.cuda.graph(graph):
                static_output = self.eager_step(static_images, static_labels)
        finally:
            try:
                torch.cuda.synchronize()
            finally:  # whatever failed, the warm-up's training steps are undone
                self._restore(snapshot)
        return graph, static_images, static_labels, static_output
