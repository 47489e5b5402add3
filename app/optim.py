"""The optimizer and its schedule: SGD whose update reads lr and momentum from device tensors, driven
by the recipe's one-cycle schedule, stepped every iteration.

Why not torch.optim.SGD: its fused CUDA kernel takes momentum as a Python float, so a CUDA graph that
captures it replays the momentum of the moment of capture for the rest of the run, while the recipe's
OneCycleLR moves momentum from 0.95 to 0.85 and back. Here each parameter group has two 0-dim tensors
on its parameters' device, its learning rate and momentum:

- `update` is the whole parameter update, and reads those two only from the tensors, never from
  `param_groups`. It is what a CUDA graph captures (app/cuda_graph.py) and what every eager step runs,
  on the CPU as on a GPU, so the CPU suite tests the code that a GPU replays.
- `load_scheduled_values` fills the tensors from `param_groups`, where the schedule writes plain floats
  as it does for any torch optimizer. `step` does it before `update`, except while a CUDA graph is being
  captured: a fill recorded into the graph would replay the value of the moment of capture. The graph
  step calls it itself before every replay.

The arithmetic is torch.optim.SGD's with dampening 0: g = grad + weight_decay * p;
buf = momentum * buf + g; d = g + momentum * buf with Nesterov, else buf; p = p - lr * d. The buffer
starts at zero, so the first step gives buf = g exactly, as torch's does. Weight decay and Nesterov
are constants of a run (no schedule here changes them) and are read from `param_groups`.
The state (`momentum_buffer` per parameter) and the param groups have torch.optim.SGD's layout.

The update is a few multi-tensor (`torch._foreach_*`) operations per group, each a pass over memory
(five in the recipe). With `fused` (train.fused_update) torch.compile turns the same code, all groups at
once, into fused kernels (one on the CPU; on a GPU, Triton kernels over many parameters each) that read
gradients, weights and buffers once and write weights and buffers once, and still read lr and momentum
from the tensors when they run. It compiles at the first update, which must not be inside a CUDA graph
capture (pytorch/pytorch#185074): the graph step warms up eagerly before it captures. It is today's
update within float rounding: it rounds g + weight_decay * p twice where the eager CPU kernel makes it
one multiply-add (without weight decay the two agree bit for bit on the CPU), and on a GPU Triton and
CUDA's kernels may contract multiply-adds differently. The option is not part of the state, so a run
resumes across it.

Under fp16's loss scaling (app/loss_scale.py) `step` and `update` take the scaler's finite check, a
device tensor, and the update skips itself where it is set: no host read, so a graph captures the skip
too (`sgd_update`). Without it the update is the one above, call for call.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple, Optional

import torch
from torch import nn

from app.config import Config, momentum_range
from app.errors import ConfigError

SCHEDULED = ("lr", "momentum")


class CapturableSGD(torch.optim.Optimizer):
    def __init__(self, params: Iterable[Any], *, lr: float, momentum: float, weight_decay: float = 0.0,
                 nesterov: bool = False, fused: bool = False) -> None:
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        self._scheduled: list[dict[str, torch.Tensor]] = []  # per group: name -> 0-dim device tensor
        # An attribute, not a param group key: the state_dict stays torch.optim.SGD's whichever update runs.
        self._update_groups: Callable[..., None] = (  # update_groups(work[, found_inf])
            torch.compile(update_groups, fullgraph=True, dynamic=False) if fused else update_groups)
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
    def step(self, closure: None = None, found_inf: Optional[torch.Tensor] = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("CapturableSGD.step takes no closure")
        if not _capturing(self._scheduled[0]["lr"].device):
            self.load_scheduled_values()
        self.update(found_inf)

    @torch.no_grad()
    def update(self, found_inf: Optional[torch.Tensor] = None) -> None:
        """One SGD step with every group's lr and momentum taken from its tensors. `found_inf` (the loss
        scaler's check, app/loss_scale.py): a 0-dim device tensor, nonzero to leave everything as it was."""
        work = []
        for group, tensors in zip(self.param_groups, self._scheduled):
            params = [p for p in group["params"] if p.grad is not None]
            if params:  # the buffers are born here, outside what torch.compile traces
                work.append(GroupUpdate(params, [p.grad for p in params], [self._momentum_buffer(p) for p in params],
                                        tensors["lr"], tensors["momentum"], group["weight_decay"], group["nesterov"]))
        if work and found_inf is None:
            self._update_groups(work)  # the call of a run without loss scaling, as it has always been
        elif work:
            self._update_groups(work, found_inf)

    def _momentum_buffer(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            # Born eagerly (the graph step's warm-up runs before capture), never inside a graph.
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["momentum_buffer"]


class GroupUpdate(NamedTuple):
    """One param group's part of a step: what `sgd_update` takes."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    bufs: list[torch.Tensor]
    lr: torch.Tensor
    momentum: torch.Tensor
    weight_decay: float
    nesterov: bool


def update_groups(work: list[GroupUpdate], found_inf: Optional[torch.Tensor] = None) -> None:
    """Every group's update in one call, so that torch.compile makes one graph (and fused kernels) of the step
    (one graph without `found_inf`, another with it)."""
    for group in work:
        sgd_update(*group, found_inf=found_inf)


def sgd_update(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor],
               lr: torch.Tensor, momentum: torch.Tensor, weight_decay: float, nesterov: bool,
               found_inf: Optional[torch.Tensor] = None) -> None:
    """The update in multi-tensor operations; `lr` and `momentum` are 0-dim tensors on the params'
    device, read by the kernels themselves (no host round trip, so a graph replays their current value).

    With `found_inf` (fp16's loss scaling) the step is skipped, on the device, when it is nonzero, as
    GradScaler skips `optimizer.step()` on the host: the new buffers and weights are computed out of place,
    by the same operations on the same values (so a good step is the in-place one bit for bit), and
    `torch.where` keeps the old or takes the new, element by element. Exact whatever the gradients hold:
    a masked arithmetic would not be (weight decay adds wd * p to a zeroed gradient, inf * 0 is nan, and
    adding a zero or subtracting lr 0 * buf can flip the sign of a zero). The cost: temporaries the size of
    the weights and buffers, and one more pass over each; the compiled update fuses it all."""
    if weight_decay:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if found_inf is None:
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads)
        new_bufs = bufs
    else:
        new_bufs = torch._foreach_mul(bufs, momentum)
        torch._foreach_add_(new_bufs, grads)
    if nesterov:
        directions = torch._foreach_mul(new_bufs, momentum)
        torch._foreach_add_(directions, grads)
        torch._foreach_mul_(directions, lr)
    else:
        directions = torch._foreach_mul(new_bufs, lr)
    if found_inf is None:
        torch._foreach_sub_(params, directions)
        return
    new_params = torch._foreach_sub(params, directions)
    skip = found_inf != 0
    for old, new in zip(params + bufs, new_params + new_bufs):
        torch.where(skip, old, new, out=old)  # out= the very tensor read: elementwise, so exact


def _capturing(device: torch.device) -> bool:
    # Asked only of CUDA devices: on a machine without a driver the question itself raises.
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def build_optimizer(cfg: Config, model: nn.Module) -> CapturableSGD:
    """The recipe's SGD. Its starting momentum is the schedule's first value (or the constant one)."""
    optimizer = cfg.optimizer
    return CapturableSGD(model.parameters(), lr=optimizer.lr, momentum=momentum_range(cfg)[1],
                         weight_decay=optimizer.weight_decay, nesterov=optimizer.nesterov,
                         fused=cfg.train.fused_update)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, iterations_per_epoch: int,
                    total_steps: Optional[int] = None) -> torch.optim.lr_scheduler.OneCycleLR:
    """The recipe's one-cycle schedule of lr (and momentum, with schedule.cycle_momentum), one step per
    iteration over the whole run."""
    schedule = cfg.schedule
    total_steps = total_steps or cfg.train.epochs * iterations_per_epoch
    if schedule.pct_start * total_steps <= 1:  # OneCycleLR would divide by a warm-up of length zero, or less
        raise ConfigError(f"schedule.pct_start {schedule.pct_start} gives a warm-up of "
                          f"{schedule.pct_start * total_steps:g} of the run's {total_steps} iterations "
                          f"(train.epochs {cfg.train.epochs} of {iterations_per_epoch} iterations at "
                          f"train.batch_size {cfg.train.batch_size}); it needs more than 1 (raise train.epochs or "
                          f"schedule.pct_start)")
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.optimizer.lr, total_steps=total_steps,
        pct_start=schedule.pct_start, anneal_strategy=schedule.anneal_strategy, div_factor=schedule.div_factor,
        final_div_factor=schedule.final_div_factor, cycle_momentum=schedule.cycle_momentum,
        base_momentum=schedule.base_momentum, max_momentum=schedule.max_momentum)


def scheduled_values(optimizer: torch.optim.Optimizer) -> Callable[[], dict[str, float]]:
    """What the step about to be logged used: the first group's learning rate and momentum. Looked up at
    every call: `load_state_dict` (a resume) replaces the optimizer's param group dicts, and a dict held
    from before would show the freshly built optimizer's first values for the rest of the run."""
    return lambda: {name: optimizer.param_groups[0][name] for name in SCHEDULED}


def describe_schedule(cfg: Config, iterations_per_epoch: int) -> list[str]:
    """The learning rate and momentum the optimizer will use, read off the real schedule stepped
    through the whole run: at the first iteration, at the learning rate's peak, at the last."""
    optimizer = build_optimizer(cfg, nn.Linear(1, 1))
    scheduler = build_scheduler(cfg, optimizer, iterations_per_epoch)
    group, total = optimizer.param_groups[0], scheduler.total_steps
    values = []
    for _ in range(total):
        values.append((group["lr"], group["momentum"]))
        optimizer.step()  # no gradients: nothing changes but the schedule's bookkeeping
        scheduler.step()
    peak = max(range(total), key=lambda i: values[i][0])
    first, top, last = values[0], values[peak], values[-1]
    how = ("cycled by the schedule (schedule.cycle_momentum)" if cfg.schedule.cycle_momentum
           else "constant (optimizer.momentum; schedule.cycle_momentum is false)")
    return [f"learning rate: {first[0]:.4g} at iteration 1, {top[0]:.4g} at iteration {peak + 1}, "
            f"{last[0]:.4g} at iteration {total}",
            f"momentum: {first[1]:.4g} at iteration 1, {top[1]:.4g} at iteration {peak + 1}, "
            f"{last[1]:.4g} at iteration {total}, {how}"]
