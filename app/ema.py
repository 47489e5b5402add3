"""An exponential moving average (EMA) of the model's weights, updated inside the training step.

The arithmetic is Ignite's EMAHandler's (ignite/handlers/ema_handler.py), so that the figures mean what
they mean there: with momentum = 1 - decay, after every optimizer step

    ema = ema * (1 - momentum) + model * momentum

and, with a warm-up (`ema.warmup_iters` > 0), Ignite's EMAWarmUp: the momentum moves linearly from
1 - `ema.warmup_decay` at the first update to 1 - `ema.decay` at update `warmup_iters`, and stays there.
BatchNorm buffers as Ignite's `handle_buffers`: "copy" (its default) gives the EMA model the raw model's
running statistics after every update; "update" averages the floating-point ones like the weights (and
copies num_batches_tracked, as Ignite does for integer buffers). One difference: Ignite's "copy" makes
the EMA model's buffers the raw model's own tensors; here they are copied, value for value, because the
EMA's tensors must keep their own addresses for the CUDA graph and for checkpoints.

Why it is not Ignite's handler: the step is captured as a CUDA graph (app/cuda_graph.py), and a handler
on ITERATION_COMPLETED would run eagerly, a few hundred small kernels per step outside the graph, with
the momentum a host float. Here the update is part of the step function, so it is captured with it:
multi-tensor (torch._foreach_*) ops, and the momentum computed on the device from a step counter that
the graph advances, so no value is baked in at capture. The same code runs eagerly on the CPU.

Bit for bit: Ignite's `ema.add_(model, alpha=m)` is a fused multiply-add on both the CPU (vectorised)
and CUDA; `_foreach_addcmul_(ema, model, m)` with a device tensor `m` is the same fused multiply-add,
where `_foreach_mul` followed by `_foreach_add_` would round twice (tests/test_ema.py compares them over
many steps). The momentum is computed in float64 as Python computes Ignite's, then cast to the weights'
dtype as a Python scalar is.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Literal, Mapping, Optional

import torch
from torch import nn

from app.config import EmaConfig

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # engines.TrainStep


class WeightEma:
    def __init__(self, model: nn.Module, decay: float, warmup_iters: int = 0, warmup_decay: float = 0.0,
                 buffers: Literal["copy", "update"] = "copy") -> None:
        """`model`: the plain module the optimizer updates (not its DDP or torch.compile wrapper)."""
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.model, self.decay = model, decay
        self.warmup_iters, self.warmup_decay, self.buffers = warmup_iters, warmup_decay, buffers
        # Ignite's deepcopy: the EMA starts at the model's initial weights, in eval mode, without gradients.
        self.ema_model = copy.deepcopy(model).eval().requires_grad_(False)
        device = next(model.parameters()).device
        self.updates = torch.zeros((), dtype=torch.int64, device=device)  # updates done; the graph advances it
        averaged = list(zip(self.ema_model.parameters(), model.parameters()))
        copied = []
        for ema_b, b in zip(self.ema_model.buffers(), model.buffers()):
            (averaged if buffers == "update" and b.is_floating_point() else copied).append((ema_b, b))
        self._averaged: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for ema_t, t in averaged:
            ema_ts, ts = self._averaged.setdefault(t.dtype, ([], []))
            ema_ts.append(ema_t)
            ts.append(t)
        self._copied = ([e for e, _ in copied], [b for _, b in copied])

    def momentum(self) -> torch.Tensor:
        """The momentum of the update numbered `self.updates` (from 1), a float64 device tensor: Ignite's
        EMAWarmUp(momentum_warmup, warmup_iters, momentum) at that event index, in the same operations."""
        m = 1.0 - self.decay
        if not self.warmup_iters:
            return torch.full((), m, dtype=torch.float64, device=self.updates.device)
        mw = 1.0 - self.warmup_decay
        current = (self.updates - 1).to(torch.float64) * (m - mw) / max(1, self.warmup_iters - 1) + mw
        return current.clamp(max=m) if m >= mw else current.clamp(min=m)

    @torch.no_grad()
    def update(self) -> None:
        """One EMA update from the model's current weights: device ops only, nothing read on the host."""
        self.updates.add_(1)
        m = self.momentum()
        for dtype, (ema_ts, ts) in self._averaged.items():
            torch._foreach_mul_(ema_ts, (1.0 - m).to(dtype))
            m_t = m.to(dtype)
            torch._foreach_addcmul_(ema_ts, ts, [m_t] * len(ts))
        if self._copied[0]:
            torch._foreach_copy_(*self._copied)

    def after(self, step: Step) -> Step:
        """`step` followed by an EMA update: the step function to capture (or run eagerly)."""
        def step_then_ema(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            output = step(images, labels)
            self.update()
            return output

        return step_then_ema

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor an update changes, for CudaGraphStep to snapshot and restore around capture."""
        return [*self.ema_model.state_dict().values(), self.updates]

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.ema_model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ema_model.load_state_dict(state["model"])
        self.updates.copy_(state["updates"])


def build_ema(ema: EmaConfig, model: nn.Module) -> Optional[WeightEma]:
    """The config's EMA of `model`'s weights (the plain module, before any DDP or compile wrapper); None when
    `ema.decay` is off. Built right after the model, so that it starts at the initial weights."""
    if not ema.decay:
        return None
    return WeightEma(model, ema.decay, ema.warmup_iters, ema.warmup_decay, ema.buffers)
