"""fp16's loss scaling (`train.amp: fp16`) as device operations only, so that a CUDA graph captures it whole.

Why not torch.amp.GradScaler: its `step` asks the host whether the gradients were finite
(`found_inf.item()`) and calls the optimizer or not, a decision a graph cannot replay. Here the scale,
the count of good steps and the step's finite check are 0-dim device tensors, and every decision is a
kernel: the optimizer takes the check and, if any gradient was not finite, keeps every parameter and
momentum buffer as it was, by a selection in its kernels (app/optim.py `sgd_update`); `torch._amp_update_scale_`
halves the scale after such a step and doubles it after `growth_interval` good steps in a row.

The arithmetic is GradScaler's with its defaults, call for call (torch/amp/grad_scaler.py): the loss
times the scale; the gradients, grouped by device and dtype in param-group order, unscaled in place by
the scale's reciprocal taken in float64 and checked by `torch._amp_foreach_non_finite_check_and_unscale_`;
the optimizer step skipped if that found anything; then `torch._amp_update_scale_`. A good step's
update is the plain one bit for bit, so a run here and one with GradScaler and the same optimizer take
the same steps (tests/test_loss_scale.py). Two differences, neither in the weights: a step skipped
before the optimizer's first real step leaves zero momentum buffers in its state where GradScaler
leaves none (CapturableSGD's buffers start at zero either way, so the next step is the same), and the
optimizer's lr and momentum tensors are refilled on a skipped step too.

Under fp16 autocast BatchNorm runs on fp16 activations with its fp32 weights and statistics:
`batch_norm` is on none of autocast's lists (no Autocast kernel is registered for it, CUDA or CPU;
tests/test_loss_scale.py asks the dispatcher), so autocast passes it the convolution's fp16 output as
it is; ATen then picks cuDNN's batch norm for an fp16 input exactly when the weight is fp32
(aten/src/ATen/native/Normalization.cpp, `_select_batch_norm_backend`), which normalises with fp32
scale, shift and running statistics and keeps those in fp32. The model's parameters stay fp32, and so do
their gradients: nothing here unscales fp16.

The state is GradScaler's `state_dict` layout (scale as a float, growth_factor, backoff_factor,
growth_interval, _growth_tracker as an int), under the training checkpoint's key "scaler" as before, so
a checkpoint written by GradScaler resumes here exactly.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from app.optim import CapturableSGD


class LossScaler:
    def __init__(self, device: torch.device, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000) -> None:
        if growth_factor <= 1.0 or backoff_factor >= 1.0:
            raise ValueError("loss scaling needs growth_factor > 1 and backoff_factor < 1")
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        # Made here, not at the first step as GradScaler does: a graph's snapshot and replays need them to exist.
        self.scale_tensor = torch.full((), init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)  # this step's check: 1.0 if not finite

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_tensor

    def step(self, optimizer: CapturableSGD) -> None:
        """Unscale and check the gradients, then the optimizer step, which skips itself if they were not finite."""
        optimizer.step(found_inf=self.unscale_(optimizer))

    def unscale_(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """Divide every gradient by the scale in place; returns the step's check (1.0: some value not finite)."""
        self.found_inf.zero_()
        inv_scale = self.scale_tensor.double().reciprocal().float()
        grads: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grads[p.grad.device, p.grad.dtype].append(p.grad)
        with torch.no_grad():
            for same_kind in grads.values():
                torch._amp_foreach_non_finite_check_and_unscale_(same_kind, self.found_inf, inv_scale)
        return self.found_inf

    def update(self) -> None:
        """Back off after a skipped step, grow after growth_interval good ones (in place, on the device)."""
        torch._amp_update_scale_(self.scale_tensor, self.growth_tracker, self.found_inf, self.growth_factor,
                                 self.backoff_factor, self.growth_interval)

    def tensors(self) -> list[torch.Tensor]:
        """The state a CUDA graph's warm-up changes and must put back (app/cuda_graph.py)."""
        return [self.scale_tensor, self.growth_tracker]

    def state_dict(self) -> dict[str, Any]:
        """GradScaler's layout. Reads the device (twice): at a checkpoint, not per step."""
        return {"scale": self.scale_tensor.item(), "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "_growth_tracker": int(self.growth_tracker.item())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Ours or GradScaler's (the same layout); as GradScaler, the factors and interval come from the state."""
        self.scale_tensor.fill_(state["scale"])
        self.growth_tracker.fill_(state["_growth_tracker"])
        self.growth_factor, self.backoff_factor = float(state["growth_factor"]), float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])
