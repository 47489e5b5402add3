"""The evaluation counted on the device (handlers/eval_counts.py) gives the figures of the evaluator of
before, Ignite's Accuracy, TopKCategoricalAccuracy, Loss and ConfusionMatrix: the same top-1, top-5 and
confusion matrix, the same loss within float rounding, under the same keys, in one process and in two
with uneven shards; and a batch's update asks the host for nothing."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import ignite.distributed as idist
import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine
from ignite.metrics import Accuracy, ConfusionMatrix, Loss, TopKCategoricalAccuracy
from torch import nn

from app.config import Config, override
from app.engines import create_evaluator
from handlers.eval_counts import EvalCounts
from tests.support import HostReads, forbid_python_reads

CLASSES = 100
SIZES = (37, 200, 1, 64, 113, 5)  # uneven batches, one of a single image
SHARDS = ((37, 200, 1, 64), (113, 5))  # two processes: 302 images in 4 batches, 118 in 2
KEYS = {"top1", "top5", "loss", "confusion"}


def _batches(sizes: Sequence[int], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random logits and labels; one batch of coarse logits, so that ties in argmax and top-k occur."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i, n in enumerate(sizes):
        logits = torch.randn(n, CLASSES, generator=g) * 3
        if i == 0:
            logits = logits.round().clamp(-1, 1)
        batches.append((logits, torch.randint(0, CLASSES, (n,), generator=g)))
    return batches


def _attach_ignite(engine: Engine, prefix: str = "") -> None:
    """The four metrics the evaluator attached before EvalCounts."""
    Accuracy().attach(engine, prefix + "top1")
    TopKCategoricalAccuracy(k=5).attach(engine, prefix + "top5")
    Loss(F.cross_entropy).attach(engine, prefix + "loss")
    ConfusionMatrix(CLASSES).attach(engine, prefix + "confusion")


def _figures(batches: list[tuple[torch.Tensor, torch.Tensor]], metric: str) -> dict[str, Any]:
    engine = Engine(lambda _, batch: batch)
    if metric == "ignite":
        _attach_ignite(engine)
    else:
        EvalCounts(CLASSES, k=5).attach(engine, "eval_counts")
    return dict(engine.run(batches).metrics)


def _assert_same_figures(counted: dict[str, Any], ignite: dict[str, Any]) -> None:
    assert set(counted) == set(ignite) == KEYS
    assert counted["top1"] == ignite["top1"] and counted["top5"] == ignite["top5"]
    assert all(type(counted[k]) is float for k in ("top1", "top5", "loss"))
    assert counted["loss"] == pytest.approx(ignite["loss"], rel=1e-6, abs=0)
    assert counted["confusion"].dtype == ignite["confusion"].dtype == torch.int64
    assert counted["confusion"].device == ignite["confusion"].device
    assert torch.equal(counted["confusion"], ignite["confusion"])


def test_counts_give_the_figures_of_ignites_four_metrics_on_uneven_batches() -> None:
    batches = _batches(SIZES)
    counted, ignite = _figures(batches, "counts"), _figures(batches, "ignite")
    _assert_same_figures(counted, ignite)
    assert int(counted["confusion"].sum()) == sum(SIZES)
    assert 0 < counted["top1"] < counted["top5"] < 1  # a real check: neither all right nor all wrong


def test_a_second_evaluation_starts_from_zero_and_compute_can_be_repeated() -> None:
    metric = EvalCounts(CLASSES, k=5)
    engine = Engine(lambda _, batch: batch)
    metric.attach(engine, "eval_counts")
    engine.run(_batches(SIZES, seed=1))
    second = dict(engine.run(_batches(SIZES[:2], seed=2)).metrics)
    _assert_same_figures(second, _figures(_batches(SIZES[:2], seed=2), "ignite"))
    assert metric.compute()["confusion"].equal(metric.compute()["confusion"])


def test_the_apps_evaluator_reports_the_same_figures_under_the_same_keys() -> None:
    cfg = override(Config(), {"model.num_classes": CLASSES})
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, CLASSES))
    evaluator = create_evaluator(cfg, model, torch.device("cpu"))
    _attach_ignite(evaluator, prefix="before/")  # on the same engine, so on the same logits
    g = torch.Generator().manual_seed(3)
    data = [(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
             torch.randint(0, CLASSES, (n,), generator=g)) for n in (50, 17)]
    metrics = evaluator.run(data).metrics
    counted = {k: v for k, v in metrics.items() if not k.startswith("before/")}
    _assert_same_figures(counted, {k.removeprefix("before/"): v for k, v in metrics.items() if k.startswith("before/")})


def _update_all(metric: Any, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for batch in batches:
        metric.update(batch)


def test_an_update_makes_no_host_read(monkeypatch: pytest.MonkeyPatch) -> None:
    batches = _batches(SIZES)
    metric = EvalCounts(CLASSES, k=5)
    with monkeypatch.context() as patched, HostReads() as reads:
        forbid_python_reads(patched)
        _update_all(metric, batches)
    assert reads.ops == []
    _assert_same_figures(metric.compute(), _figures(batches, "ignite"))


def test_the_host_read_check_catches_ignites_confusion_matrix() -> None:
    """The check above is not vacuous: Ignite's per-batch mask and bincount are what it finds."""
    with HostReads() as reads:
        _update_all(ConfusionMatrix(CLASSES), _batches(SIZES[:1]))
    assert any("bincount" in op for op in reads.ops) and any("index" in op for op in reads.ops)


@pytest.mark.gpu
def test_on_a_gpu_updates_do_not_synchronise() -> None:
    """CUDA's sync debug mode raises on any synchronising call inside the updates; the one read is
    compute's, after them."""
    device = torch.device("cuda")
    batches = _batches(SIZES)
    metric = EvalCounts(CLASSES, k=5, device=device)
    on_device = [(logits.to(device), labels.to(device)) for logits, labels in batches]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _update_all(metric, on_device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _assert_same_figures(metric.compute(), _figures(batches, "ignite"))


def _evaluate_shard(local_rank: int, out_dir: str) -> None:
    """In each of two processes: its own uneven shard through EvalCounts and through Ignite's four."""
    rank = idist.get_rank()
    offset = sum(len(s) for s in SHARDS[:rank])
    shard = _batches(SIZES)[offset:offset + len(SHARDS[rank])]
    assert [len(labels) for _, labels in shard] == list(SHARDS[rank])
    torch.save({"counts": _figures(shard, "counts"), "ignite": _figures(shard, "ignite")},
               Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_processes_with_uneven_shards_give_the_whole_set_figures(tmp_path: Path) -> None:
    assert sum(SHARDS, ()) == SIZES
    with idist.Parallel(backend="gloo", nproc_per_node=2, master_port=29511) as parallel:
        parallel.run(_evaluate_shard, str(tmp_path))
    whole = _figures(_batches(SIZES), "ignite")
    for rank in (0, 1):
        figures = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        _assert_same_figures(figures["counts"], whole)
        _assert_same_figures(figures["counts"], figures["ignite"])
