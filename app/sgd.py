"""SGD whose update reads the scheduled values, learning rate and momentum, from tensors on the device.

Why not torch.optim.SGD: its fused CUDA kernel takes momentum as a Python float, so a CUDA graph that
captures it replays the momentum of the moment of capture for the rest of the run, while the recipe's
OneCycleLR moves momentum from 0.95 to 0.85 and back. Here each parameter group has two 0-dim tensors
on its parameters' device, its learning rate and momentum:

- `update` is the whole parameter update, and reads those two only from the tensors, never from
  `param_groups`. It is what a CUDA graph captures (app/cuda_graph.py) and what every eager step runs,
  on the CPU as on a GPU, so the CPU suite tests the code that a GPU replays.
- `load_scheduled_values` fills the tensors from `param_groups`, where schedulers write plain floats as
  they do for any torch optimizer. `step` does it before `update`, except while a CUDA graph is being
  captured: a fill recorded into the graph would replay the value of the moment of capture. The graph
  step calls it itself before every replay.

The arithmetic is torch.optim.SGD's with dampening 0: g = grad + weight_decay * p;
buf = momentum * buf + g; d = g + momentum * buf with Nesterov, else buf; p = p - lr * d. The buffer
starts at zero, so the first step gives buf = g exactly, as torch's does. Weight decay and Nesterov
are constants of a run (no scheduler here changes them) and are read from `param_groups`.
The state (`momentum_buffer` per parameter) and the param groups have torch.optim.SGD's layout.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

SCHEDULED = ("lr", "momentum")


class CapturableSGD(torch.optim.Optimizer):
    def __init__(self, params: Iterable[Any], *, lr: float, momentum: float, weight_decay: float = 0.0,
                 nesterov: bool = False) -> None:
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self._scheduled: list[dict[str, torch.Tensor]] = []  # per group: name -> 0-dim device tensor
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        device = self.param_groups[-1]["params"][0].device
        self._scheduled.append({name: torch.zeros((), device=device) for name in SCHEDULED})

    def scheduled_tensors(self, group: int = 0) -> dict[str, torch.Tensor]:
        """The tensors `update` reads for a group: {"lr": ..., "momentum": ...}."""
        return self._scheduled[group]

    def load_scheduled_values(self) -> None:
        """Copy each group's current lr and momentum into its tensors (a fill, no host synchronisation)."""
        for group, tensors in zip(self.param_groups, self._scheduled):
            for name, tensor in tensors.items():
                tensor.fill_(group[name])

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("CapturableSGD.step takes no closure")
        if not _capturing(self._scheduled[0]["lr"].device):
            self.load_scheduled_values()
        self.update()

    @torch.no_grad()
    def update(self) -> None:
        """One SGD step with every group's lr and momentum taken from its tensors."""
        for group, tensors in zip(self.param_groups, self._scheduled):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = [self._momentum_buffer(p) for p in params]
            sgd_update(params, grads, bufs, tensors["lr"], tensors["momentum"], group["weight_decay"],
                       group["nesterov"])

    def _momentum_buffer(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            # Born eagerly (the graph step's warm-up runs before capture), never inside a graph.
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["momentum_buffer"]


def sgd_update(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor],
               lr: torch.Tensor, momentum: torch.Tensor, weight_decay: float, nesterov: bool) -> None:
    """The update in multi-tensor operations; `lr` and `momentum` are 0-dim tensors on the params'
    device, read by the kernels themselves (no host round trip, so a graph replays their current value)."""
    if weight_decay:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, grads)
    if nesterov:
        directions = torch._foreach_mul(bufs, momentum)
        torch._foreach_add_(directions, grads)
        torch._foreach_mul_(directions, lr)
    else:
        directions = torch._foreach_mul(bufs, lr)
    torch._foreach_sub_(params, directions)


def _capturing(device: torch.device) -> bool:
    # Asked only of CUDA devices: on a machine without a driver the question itself raises.
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
