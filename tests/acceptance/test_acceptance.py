"""Does everything a user does work on this GPU? The GPU acceptance check, run by `bash bench/gpu.sh`.

Each check drives the real application (`python -m app ...` in fresh processes, as users run it) on
synthetic data in the real CIFAR-100 format, full size by default (50,000 + 10,000 images of
`bench.synthetic --hard`, 4 epochs). Runs on a GPU are not bit-identical (cuDNN's autotuning, kernels
that add with atomics), so checks that compare two runs do so within tolerances, each justified in
its test. Figures go to the report through `record_property` (tests/gpu_report.py).

`--acceptance-device cpu` runs the same checks on a machine without a GPU, with those that need one
skipped (graphed-vs-eager then compares two eager runs): how tests/test_gpu_acceptance_on_cpu.py
tests the check itself.
"""
from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path
from typing import Callable

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.acceptance.support import Acceptance, needs_gpu, tail
from tests.support import run_lines

pytestmark = pytest.mark.gpu

Record = Callable[[str, object], None]

# Per-epoch agreement of two GPU runs that should compute the same thing (see test_graphed_vs_eager).
TOP1_POINTS = 2.5  # percentage points of top-1
LOSS_RELATIVE = 0.075


def epoch_metrics(run_dir: Path, per_epoch: int) -> dict[int, dict[str, float]]:
    """Per-epoch validation metrics as TensorBoard shows them (its own reader), logged at the trainer's
    iteration at each epoch's end; accuracies, which it shows in per cent, as fractions, as results.json has them."""
    acc = EventAccumulator(str(run_dir / "tb" / "validation"))
    acc.Reload()
    out: dict[int, dict[str, float]] = {}
    for tag in ("top1", "top5", "loss"):
        for e in acc.Scalars(f"metrics/{tag}"):
            assert e.step % per_epoch == 0, f"validation {tag} at iteration {e.step}, not at an epoch's end"
            out.setdefault(e.step // per_epoch, {})[tag] = e.value if tag == "loss" else e.value / 100
    return out


def within_tolerance(record: Record, label: str, a: dict, b: dict) -> None:
    """The largest per-epoch difference of top-1 (percentage points) and of loss (relative), from epoch 2
    on where there are several (see test_graphed_vs_eager for why not epoch 1)."""
    assert sorted(a) == sorted(b), f"epochs differ: {sorted(a)} vs {sorted(b)}"
    epochs = [e for e in a if e >= 2] or list(a)
    top1 = max(100 * abs(a[e]["top1"] - b[e]["top1"]) for e in epochs)
    loss = max(abs(a[e]["loss"] - b[e]["loss"]) / a[e]["loss"] for e in epochs)
    record(f"{label}_max_top1_points", round(top1, 3))
    record(f"{label}_max_loss_relative", round(loss, 5))
    record(f"{label}_per_epoch", {e: {"top1": [round(a[e]["top1"], 4), round(b[e]["top1"], 4)],
                                      "loss": [round(a[e]["loss"], 4), round(b[e]["loss"], 4)]} for e in sorted(a)})
    assert top1 <= TOP1_POINTS and loss <= LOSS_RELATIVE, (
        f"{label}: per-epoch top-1 differs by up to {top1:.2f} points (tolerance {TOP1_POINTS}), loss by "
        f"{100 * loss:.2f}% (tolerance {100 * LOSS_RELATIVE}%)")


def _train_scalars(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tb" / "train"))
    acc.Reload()
    return acc


def _epochs_printed(stdout: str) -> list[str]:
    return [line.split()[1] for line in run_lines(stdout) if line.startswith("epoch ")]


def _best(run_dir: Path) -> Path:
    return next((run_dir / "checkpoints").glob("best.pt"))


def _evaluate(acceptance: Acceptance, checkpoint: Path, device: str, data: Path | None = None) -> dict:
    result = acceptance.app("evaluate", "--checkpoint", str(checkpoint), "--json", "--device", device,
                            *(["--data-root", str(data)] if data else []))
    return json.loads(result.stdout)


@pytest.fixture(scope="session")
def evaluated(acceptance: Acceptance, graphed: Path) -> dict:
    """`evaluate` of the graphed run's best checkpoint on the acceptance device."""
    return _evaluate(acceptance, _best(graphed), acceptance.device)


def test_learns(acceptance: Acceptance, graphed: Path, record_property: Record) -> None:
    """The recipe on learnable data, CUDA graphs on (the default): validation loss at the last epoch
    below the first epoch's, training loss falling, top-1 far above chance: at least 10x chance, or
    halfway from chance to 100% where that is less (with few classes). On the CPU's 8 iterations a
    100-class head cannot learn that much: there the figures are recorded, not judged."""
    metrics = epoch_metrics(graphed, acceptance.iterations_per_epoch)
    losses = [e.value for e in _train_scalars(graphed).Scalars("metrics/loss")]
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    final = metrics[max(metrics)]
    chance = 1 / acceptance.classes
    wanted = min(10 * chance, (1 + chance) / 2)
    record_property("seconds", acceptance.seconds["graphed"])
    record_property("top1_per_epoch", [round(metrics[e]["top1"], 4) for e in sorted(metrics)])
    record_property("val_loss_per_epoch", [round(metrics[e]["loss"], 4) for e in sorted(metrics)])
    record_property("train_loss_first_tenth", round(first, 4))
    record_property("train_loss_last_tenth", round(last, 4))
    learned = last < first and final["loss"] < metrics[min(metrics)]["loss"] and final["top1"] >= wanted
    if acceptance.device != "cuda" and not learned:
        pytest.skip(f"not judged on the CPU's short run (top-1 {final['top1']:.3f})")
    assert learned, f"did not learn: train loss {first:.3f} -> {last:.3f}, top-1 {final['top1']:.3f} " \
                    f"(wanted {wanted:.2f})"


def test_graphed_vs_eager(acceptance: Acceptance, data: Path, graphed: Path, record_property: Record) -> None:
    """Graphed and eager runs are not bit-identical on a GPU, nor are two eager runs: cuDNN's autotuning
    and kernels that add with atomics differ in the last bits from the first step on, training amplifies
    that, and after a few epochs two such runs are about as far apart as two seeds. So the comparison
    is per epoch, within 2.5 points of top-1 and 7.5% of validation loss: five standard deviations of
    top-1's sampling noise alone on 10,000 test images (about 0.5 points). Epoch 1 is reported, not
    judged: it ends on the steep part of the learning curve, where two graphed runs, differing only by
    nondeterminism, were measured 1.74 points apart (H200, 2026-11-28). test_kill_resume reports the
    same figures for two graphed runs, the spread that nothing but nondeterminism makes. On the CPU
    both runs are eager and equal to the last bit."""
    started = time.perf_counter()
    acceptance.app("--config", str(acceptance.config("eager", data, **{"train.cuda_graphs": False})),
                   "--run-name", "eager")
    record_property("seconds", round(time.perf_counter() - started, 1))
    per_epoch = acceptance.iterations_per_epoch
    within_tolerance(record_property, "graphed_vs_eager", epoch_metrics(graphed, per_epoch),
                     epoch_metrics(acceptance.work / "runs" / "eager", per_epoch))


def test_kill_resume(acceptance: Acceptance, data: Path, graphed: Path, record_property: Record) -> None:
    """SIGKILL in the middle of epoch 2, then --resume. On a GPU a resumed run is not bit-identical to an
    uninterrupted one (see test_graphed_vs_eager); what is: it resumes at the checkpoint's iteration,
    repeats no finished epoch, writes into the same run folder, TensorBoard holds each step exactly
    once, and its metrics agree like those of any two runs."""
    per_epoch, epochs = acceptance.iterations_per_epoch, acceptance.epochs
    every = per_epoch // 2 + 1
    target = next(k * every for k in range(1, 10) if per_epoch + 1 < k * every < 2 * per_epoch)
    cfg = acceptance.config("resumed", data, **{"checkpoint.every_iters": every})
    run_dir = acceptance.work / "runs" / "resumed"
    first_log = acceptance.work / "resumed-first.log"
    proc = acceptance.popen("--config", str(cfg), "--run-name", "resumed", log=first_log)
    wanted = run_dir / "checkpoints" / f"training_checkpoint_{target}.pt"
    deadline = time.monotonic() + 600
    while not wanted.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)  # a few more iterations: the kill lands between checkpoints
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = first_log.read_text()
    assert wanted.exists(), f"{wanted.name} never appeared: {tail(first)}"
    assert f"epoch 2/{epochs}" not in first, "the kill came after epoch 2 ended, not in its middle"
    result = acceptance.app("--config", str(cfg), "--resume", str(run_dir))
    resumed_line = next((line for line in run_lines(result.stdout) if line.startswith("resuming")), "")
    printed = _epochs_printed(result.stdout)
    record_property("killed_after_checkpoint", target)
    record_property("resumed", resumed_line)
    record_property("epochs_after_resume", printed)
    assert f"iteration {target})" in resumed_line and printed == [f"{e}/{epochs}" for e in range(2, epochs + 1)], \
        f"resumed at the wrong place: {resumed_line!r}, epochs {printed}"
    assert sorted(p.name for p in (acceptance.work / "runs").iterdir() if p.name.startswith("resumed")) == \
        ["resumed"], "a second run folder appeared"
    # Every step once: what the killed process logged up to its checkpoint was on disk before the
    # checkpoint was written, what it logged after is purged, and the resumed process logs the rest.
    steps = [e.step for e in _train_scalars(run_dir).Scalars("metrics/loss")]
    assert steps == list(range(1, per_epoch * epochs + 1)), (
        f"training loss steps are not each iteration once ({len(steps)} points, {len(set(steps))} distinct, "
        f"of {per_epoch * epochs})")
    assert sorted(epoch_metrics(run_dir, per_epoch)) == list(range(1, epochs + 1)), "not each epoch evaluated once"
    assert json.loads((run_dir / "results.json").read_text())["status"] == "finished"
    within_tolerance(record_property, "resumed_vs_uninterrupted", epoch_metrics(graphed, per_epoch),
                     epoch_metrics(run_dir, per_epoch))


def test_sigterm_resume(acceptance: Acceptance, data: Path, graphed: Path, record_property: Record) -> None:
    """What a scheduler's preemption does: SIGTERM in epoch 2 stops the run within seconds with exit 143,
    a checkpoint of its last step and results.json "interrupted"; --resume then finishes the run."""
    cfg = acceptance.config("preempted", data)
    run_dir = acceptance.work / "runs" / "preempted"
    log = acceptance.work / "preempted-first.log"
    proc = acceptance.popen("--config", str(cfg), "--run-name", "preempted", log=log)
    deadline = time.monotonic() + 600
    while f"epoch 1/{acceptance.epochs}" not in (log.read_text() if log.exists() else "") and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # into epoch 2
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    code = proc.wait(timeout=120)
    record_property("exit_code", code)
    record_property("seconds_to_stop", round(time.monotonic() - signalled, 2))
    lines = log.read_text().strip().splitlines()
    assert code == 143 and lines[-1].startswith("interrupted by SIGTERM after iteration "), \
        f"exit {code}: {tail(log.read_text())}"
    iteration = int(lines[-1].split("after iteration ")[1].split()[0])
    record_property("stopped_after_iteration", iteration)
    status = json.loads((run_dir / "results.json").read_text())["status"]
    assert (run_dir / "checkpoints" / f"training_checkpoint_{iteration}.pt").exists() and status == "interrupted", \
        f"no checkpoint of iteration {iteration}, or results.json says {status}"
    acceptance.app("--config", str(cfg), "--resume", str(run_dir))
    assert json.loads((run_dir / "results.json").read_text())["status"] == "finished", "the resumed run did not finish"


def test_evaluate_gpu(acceptance: Acceptance, graphed: Path, evaluated: dict, record_property: Record) -> None:
    """Same weights, same evaluator, same bf16 autocast as during training; only cuDNN's autotuned
    choice of algorithm may differ between the two processes, which moves bf16 results by rounding: a
    few images of 10,000 at most may flip. Tolerance: 0.1 points of top-1/top-5, 0.1% of loss."""
    logged = json.loads((graphed / "results.json").read_text())["best"]
    diffs = {k: abs(evaluated[k] - logged[k]) for k in ("top1", "top5")}
    loss = abs(evaluated["loss"] - logged["loss"]) / logged["loss"]
    record_property("logged", {k: logged[k] for k in ("top1", "top5", "loss")})
    record_property("evaluated", {k: evaluated[k] for k in ("top1", "top5", "loss")})
    assert max(diffs.values()) <= 0.001 and loss <= 0.001, \
        f"evaluate differs from training's log: {diffs}, loss {100 * loss:.3f}%"


def test_evaluate_cpu(acceptance: Acceptance, graphed: Path, evaluated: dict, record_property: Record) -> None:
    """The GPU evaluates under bf16 autocast (train.amp auto), the CPU in fp32: bf16 keeps 8 bits of
    mantissa, so logits move by about 0.5% and images near a decision boundary flip. Tolerance: 1 point
    of top-1/top-5 and 3% of loss against the GPU evaluation."""
    needs_gpu(acceptance)
    report = _evaluate(acceptance, _best(graphed), "cpu")
    record_property("cpu", {k: report[k] for k in ("top1", "top5", "loss")})
    diffs = {k: abs(report[k] - evaluated[k]) for k in ("top1", "top5")}
    loss = abs(report["loss"] - evaluated["loss"]) / evaluated["loss"]
    assert max(diffs.values()) <= 0.01 and loss <= 0.03, f"CPU and GPU evaluations differ: {diffs}, loss " \
                                                         f"{100 * loss:.2f}%"


def test_predict_gpu(acceptance: Acceptance, data: Path, graphed: Path, record_property: Record) -> None:
    from PIL import Image

    from app.data import load_dataset

    test = load_dataset(str(data), "cifar100")
    paths = []
    for i in range(4):
        path = acceptance.work / f"test_{i}.png"
        Image.fromarray(test.test.images[i].permute(1, 2, 0).numpy()).save(path)
        paths.append(str(path))
    result = acceptance.app("predict", "--checkpoint", str(_best(graphed)), *paths, "--json", "--device",
                            acceptance.device)
    predictions = json.loads(result.stdout)
    record_property("top1_classes", [p["top"][0]["class"] for p in predictions])
    record_property("true_classes", [test.classes[int(test.test.labels[i])] for i in range(4)])
    for p in predictions:
        probs = [t["probability"] for t in p["top"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5, p


def test_cross_device(acceptance: Acceptance, record_property: Record) -> None:
    """Small data (2,560 + 500 images, 2 epochs of 20 iterations): a run trained on the GPU resumes
    from its epoch-1 checkpoint on the CPU, and a run trained on the CPU resumes on the GPU; both finish
    their second epoch in the same run folder, and the CPU checkpoint evaluates on the GPU."""
    needs_gpu(acceptance)
    from bench.synthetic import write_cifar100

    data = write_cifar100(acceptance.work / "small", 2560, 500, hard=True, seed=1)
    for trained, resumed in (("cuda", "cpu"), ("cpu", "cuda")):
        name = f"{trained}-then-{resumed}"
        cfg = acceptance.config(name, data, **{"train.epochs": 2, "train.device": trained, "train.batch_size": 128})
        acceptance.app("--config", str(cfg), "--run-name", name)
        run_dir = acceptance.work / "runs" / name
        (run_dir / "checkpoints" / "training_checkpoint_40.pt").unlink()
        epoch1 = run_dir / "checkpoints" / "training_checkpoint_20.pt"
        result = acceptance.app("--config", str(cfg), "--resume", str(epoch1), "--device", resumed)
        printed = _epochs_printed(result.stdout)
        results = json.loads((run_dir / "results.json").read_text())
        record_property(name, {"epochs_after_resume": printed, "final_top1": results["final"]["top1"]})
        assert printed == ["2/2"] and results["status"] == "finished", f"{name}: epochs {printed}, " \
                                                                       f"status {results['status']}"
        if trained == "cpu":
            logged = results["best"]
            report = _evaluate(acceptance, _best(run_dir), "cuda", data)
            record_property("cpu_checkpoint_on_gpu", {k: report[k] for k in ("top1", "top5", "loss")})
            assert abs(report["top1"] - logged["top1"]) <= 0.02 and \
                abs(report["loss"] - logged["loss"]) <= 0.03 * logged["loss"], \
                f"CPU checkpoint on the GPU: {report['top1']} vs logged {logged['top1']}"


def test_tensorboard(acceptance: Acceptance, graphed: Path, record_property: Record) -> None:
    """Every iteration's loss, top-1, lr and momentum (the momentum cycling 0.95 -> 0.85 -> 0.95), each
    epoch's validation metrics, equal to results.json."""
    acc = _train_scalars(graphed)
    n = acceptance.iterations_per_epoch * acceptance.epochs
    for tag in ("metrics/loss", "metrics/top1", "schedule/lr", "schedule/momentum"):
        steps = [e.step for e in acc.Scalars(tag)]
        assert steps == list(range(1, n + 1)), f"{tag}: {len(steps)} points, not one per iteration ({n})"
    momentum = [e.value for e in acc.Scalars("schedule/momentum")]
    figures = [round(momentum[0], 4), round(min(momentum), 4), round(momentum[-1], 4)]
    record_property("momentum_first_min_last", figures)
    assert math.isclose(momentum[0], 0.95, rel_tol=1e-3) and math.isclose(min(momentum), 0.85, rel_tol=1e-2), \
        f"momentum did not cycle: {figures}"
    metrics = epoch_metrics(graphed, acceptance.iterations_per_epoch)
    final = json.loads((graphed / "results.json").read_text())["final"]
    assert sorted(metrics) == list(range(1, acceptance.epochs + 1)) and \
        math.isclose(metrics[acceptance.epochs]["top1"], final["top1"], rel_tol=1e-6), \
        f"validation scalars {metrics} do not match results.json {final}"
