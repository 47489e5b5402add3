"""The weights' EMA (app/ema.py): the same numbers as Ignite's EMAHandler, bit for bit, over many steps."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine
from ignite.handlers import EMAHandler
from torch import nn

from app.checkpoint import load_checkpoint
from app.config import Config, load_config
from app.ema import WeightEma
from app.hparams import hparams
from handlers.metrics_csv import read_metrics_csv
from tests.conftest import FinishedRun
from tests.support import EMA_SETTINGS, metrics_rows, one_error_line, run_config, run_lines, run_main, scalars


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, i: int) -> torch.Tensor:
    """A training step on batch number `i` (the same batch for the same `i`)."""
    g = torch.Generator().manual_seed(i)
    x, y = torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)
    model.train()
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


@pytest.mark.parametrize("buffers,warmup", [("copy", None), ("update", None), ("copy", (50, 0.5)),
                                            ("update", (30, 0.999))])
def test_the_ema_is_ignites_bit_for_bit_over_many_steps(buffers: str, warmup) -> None:
    """200 SGD steps of a model with BatchNorm, twice from the same start: Ignite's EMAHandler on the trainer's
    ITERATION_COMPLETED, and WeightEma's update inside the step; weights, buffers and EMA all equal exactly,
    with and without a warm-up (rising, and falling), BatchNorm buffers copied and averaged."""
    decay, steps = 0.99, 200
    ours, theirs = tiny_model(), tiny_model()
    warmup_iters, warmup_decay = warmup or (0, 0.0)
    ema = WeightEma(ours, decay, warmup_iters, warmup_decay, buffers)
    handler = EMAHandler(theirs, momentum=1 - decay, handle_buffers=buffers,
                         **({"momentum_warmup": 1 - warmup_decay, "warmup_iters": warmup_iters} if warmup else {}))
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9)
    step = ema.after(lambda i, _: sgd_step(ours, opt_ours, int(i)))
    Engine(lambda e, i: step(torch.tensor(i), None)).run(range(steps))
    trainer = Engine(lambda e, i: sgd_step(theirs, opt_theirs, i))
    handler.attach(trainer, name="ema_momentum")
    trainer.run(range(steps))
    assert int(ema.updates) == steps
    assert float(ema.momentum()) == trainer.state.ema_momentum  # the last update's, after any warm-up
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name  # the raw models trained the same
    for (name, a), b in zip(ema.ema_model.state_dict().items(), handler.ema_model.state_dict().values()):
        assert torch.equal(a, b), name
    raw, averaged = ours.state_dict(), ema.ema_model.state_dict()
    assert not torch.equal(raw["4.weight"], averaged["4.weight"])  # it is an average, not a copy
    assert torch.equal(raw["1.running_mean"], averaged["1.running_mean"]) == (buffers == "copy")


def test_the_warm_up_moves_the_decay_from_warmup_decay_to_decay_on_the_device() -> None:
    """Ignite's EMAWarmUp: update 1 at warmup_decay, linear to `decay` at update warmup_iters, then constant;
    computed from the step counter tensor (what a CUDA graph replays), not from a host value."""
    ema = WeightEma(tiny_model(), 0.9, warmup_iters=5, warmup_decay=0.5)
    decays = []
    for _ in range(7):
        ema.update()
        decays.append(1 - float(ema.momentum()))
    assert decays == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9, 0.9, 0.9])
    ema.load_state_dict(ema.state_dict() | {"updates": torch.tensor(2)})
    assert 1 - float(ema.momentum()) == pytest.approx(0.6)


@pytest.mark.slow
def test_an_ema_run_evaluates_both_models_and_keeps_the_emas_best(ema_run: FinishedRun, finished_run) -> None:
    """Every epoch both evaluations: metrics.csv's ema_* columns, TensorBoard's ema/* scalars (per cent) and
    the epoch line agree; the best model is the EMA's (select_best "ema") at its best epoch, as results.json
    says; every training checkpoint holds the EMA; and the raw model trains exactly as without an EMA."""
    run_dir = ema_run.run_dir
    rows = read_metrics_csv(run_dir / "metrics.csv")
    assert list(rows[0])[:9] == ["epoch", "iteration", "train_loss", "val_top1", "val_top5", "val_loss", "ema_top1",
                                 "ema_top5", "ema_loss"]
    assert "ema_top1" not in read_metrics_csv(finished_run.run_dir / "metrics.csv")[0]
    validation = run_dir / "tb" / "validation"
    for name, unit in (("top1", 100), ("top5", 100), ("loss", 1)):
        assert scalars(validation, f"ema/{name}") == [
            (5 * (i + 1), pytest.approx(unit * float(r[f"ema_{name}"]), rel=1e-6)) for i, r in enumerate(rows)]
    lines = [line for line in run_lines(ema_run.stdout) if line.startswith("epoch ")]
    assert [f"ema top-1 {100 * float(r['ema_top1']):.2f}%" in line for line, r in zip(lines, rows)] == [True, True]
    results = json.loads((run_dir / "results.json").read_text())
    best_epoch = results["best"]["epoch"]
    assert results["best"]["top1"] == max(float(r["ema_top1"]) for r in rows)
    assert results["final"]["loss"] == float(rows[-1]["ema_loss"])
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    emas = {i: load_checkpoint(run_dir / "checkpoints" / f"training_checkpoint_{i}.pt")["ema"] for i in (5, 10)}
    assert int(emas[10]["updates"]) == 10
    assert all(torch.equal(best["model"][k], v) for k, v in emas[5 * best_epoch]["model"].items())
    plain = load_checkpoint(finished_run.run_dir / "checkpoints" / "training_checkpoint_10.pt")
    ours = load_checkpoint(run_dir / "checkpoints" / "training_checkpoint_10.pt")
    assert "ema" not in plain and all(torch.equal(ours["model"][k], v) for k, v in plain["model"].items())
    assert not torch.equal(ours["model"]["fc.weight"], emas[10]["model"]["fc.weight"])


@pytest.mark.slow
def test_an_ema_run_resumed_from_its_epoch_1_checkpoint_ends_with_the_uninterrupted_runs_ema(
        ema_run: FinishedRun, tmp_path: Path) -> None:
    """The run as a kill in epoch 2 left it, resumed: its last checkpoint's EMA (weights, buffers, update
    count) and model equal the uninterrupted run's exactly, and so do metrics.csv's rows."""
    shutil.copytree(ema_run.run_dir, tmp_path / "r")
    config = json.loads(ema_run.config.read_text())
    config["logging"]["output_dir"] = str(tmp_path)
    (tmp_path / "c.json").write_text(json.dumps(config))
    ckpts = tmp_path / "r" / "checkpoints"
    (ckpts / "training_checkpoint_10.pt").unlink()
    ran = run_main("--config", str(tmp_path / "c.json"), "--resume", str(ckpts / "training_checkpoint_5.pt"))
    assert ran.returncode == 0, ran.stderr
    resumed = load_checkpoint(ckpts / "training_checkpoint_10.pt")
    uninterrupted = load_checkpoint(ema_run.run_dir / "checkpoints" / "training_checkpoint_10.pt")
    for part in ("ema", "model"):
        flat = resumed[part]["model"] if part == "ema" else resumed[part]
        other = uninterrupted[part]["model"] if part == "ema" else uninterrupted[part]
        assert all(torch.equal(flat[k], v) for k, v in other.items()), part
    assert int(resumed["ema"]["updates"]) == 10
    assert metrics_rows(tmp_path / "r") == metrics_rows(ema_run.run_dir)


def test_dry_run_and_hparams_describe_the_ema(tmp_path: Path, small_data: Path) -> None:
    cfg = run_config(tmp_path / "c.json", small_data, tmp_path / "runs", ema=EMA_SETTINGS)
    ran = run_main("--config", str(cfg), "--dry-run")
    assert ran.returncode == 0, ran.stderr
    assert ("ema: decay 0.9, from 0.5 over its first 4 updates, every step; BatchNorm statistics averaged; "
            "evaluated every epoch beside the model; the best model by the EMA's top-1") in ran.stdout
    assert hparams(load_config(cfg), 1, torch.device("cpu"))["ema_decay"] == 0.9
    assert "ema_decay" not in hparams(Config(), 1, torch.device("cpu"))
    refused = run_main("--config", str(cfg), "--set", "ema.decay=1", "--dry-run")
    assert refused.returncode == 2 and one_error_line(refused.stderr).endswith(
        "--set ema.decay: must be from 0 to below 1 (0 or null: off), got 1.0")
