"""An evaluation's top-1, top-k, mean cross-entropy and confusion matrix, counted on the device and
read back once, at the end.

Ignite's ConfusionMatrix keeps the valid targets with a boolean mask and counts with `bincount`: both
must learn an output size on the host, so on a GPU every batch waits for the forward pass to finish,
twice, and each of the four metrics then reduces and reads its own figures. Here every count is a
device tensor of a fixed size (the confusion cells added with `index_add_`), so a batch's update only
queues kernels; `compute` sums everything over processes in one all-reduce and copies it to the host
once. The figures are those of Ignite's Accuracy, TopKCategoricalAccuracy, Loss(cross_entropy) and
ConfusionMatrix, written under the names the app reads.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import ignite.distributed as idist
import torch
import torch.nn.functional as F
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric

# Where each figure sits in the one tensor that is all-reduced and read: exact for counts below 2**53
# in float64 (2**24 in MPS's float32), so the counts come back as the integers they were.
_EXAMPLES, _LOSS_SUM, _TOP1, _TOPK, _CELLS = 0, 1, 2, 3, 4


class EvalCounts(Metric):
    """`compute` gives {"top1", f"top{k}", "loss", "confusion"}: shares of images whose argmax (top-1)
    or top k logits hold the label, the mean cross-entropy, and the int64 counts with rows the true
    class and columns the argmax, as Ignite's four metrics give them. Attached, those four keys (and no
    other) land in `engine.state.metrics`.

    Each image's loss is computed in the logits' dtype and the losses are summed in float64 (float32
    on MPS, which has no float64), so their mean is Ignite's mean of per-batch means up to Ignite's
    own float32 rounding. Labels must lie in [0, num_classes), as cross-entropy requires anyway.
    `device` is where the counts live: the batches' device, or each update would copy its counts
    there and wait."""

    required_output_keys = ("y_pred", "y")

    def __init__(self, num_classes: int, k: int = 5, device: str | torch.device = torch.device("cpu"),
                 output_transform: Callable[[Any], Any] = lambda x: x) -> None:
        if num_classes < 2 or not 1 <= k <= num_classes:
            raise ValueError(f"need num_classes >= 2 and 1 <= k <= num_classes, got {num_classes} and {k}")
        self.num_classes, self.k = num_classes, k
        super().__init__(output_transform=output_transform, device=device, skip_unrolling=True,
                         metrics_result_mode="flatten")

    def reset(self) -> None:
        self._examples = 0  # known on the host from the batches' shapes: counting it costs no read
        self._loss_sum = torch.zeros((), dtype=self._double_dtype, device=self._device)
        self._correct = torch.zeros(2, dtype=torch.int64, device=self._device)  # top-1, top-k
        self._confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=self._device)

    @torch.no_grad()
    def update(self, output: Sequence[torch.Tensor]) -> None:
        logits, labels = output[0].detach(), output[1].detach()
        self._check_shapes(logits, labels)
        predicted = logits.argmax(1)
        in_top_k = logits.topk(self.k, dim=1).indices == labels.unsqueeze(1)
        self._correct += torch.stack([(predicted == labels).sum(), in_top_k.sum()]).to(self._device)
        self._loss_sum += F.cross_entropy(logits, labels, reduction="none").sum(dtype=self._double_dtype).to(
            self._device)
        cells = (labels * self.num_classes + predicted).to(self._device)
        self._confusion.view(-1).index_add_(0, cells, torch.ones_like(cells))
        self._examples += labels.shape[0]

    def compute(self) -> dict[str, float | torch.Tensor]:
        totals = self._reduced_totals()
        examples = int(totals[_EXAMPLES])
        if examples == 0:
            raise NotComputableError("EvalCounts must have at least one example before it can be computed.")
        return {"top1": int(totals[_TOP1]) / examples, f"top{self.k}": int(totals[_TOPK]) / examples,
                "loss": float(totals[_LOSS_SUM]) / examples,
                "confusion": totals[_CELLS:].long().view(self.num_classes, self.num_classes)}

    def _reduced_totals(self) -> torch.Tensor:
        """Every count in one tensor, summed over processes in one all-reduce and copied to the host in
        one read: the evaluation's only synchronisation. The state itself is left as it was, so a second
        `compute` gives the same figures."""
        dtype = self._double_dtype
        totals = torch.cat([torch.tensor([self._examples], dtype=dtype, device=self._device),
                            self._loss_sum.view(1), self._correct.to(dtype), self._confusion.view(-1).to(dtype)])
        if idist.get_world_size() > 1:
            totals = idist.all_reduce(totals)
        return totals.cpu()

    def _check_shapes(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Shapes only, which the host knows without reading the device."""
        if logits.ndim != 2 or logits.shape[1] != self.num_classes or labels.shape != logits.shape[:1]:
            raise ValueError(f"expected logits (N, {self.num_classes}) and labels (N,), "
                             f"got {tuple(logits.shape)} and {tuple(labels.shape)}")
