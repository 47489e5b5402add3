"""Does everything a user does work on this GPU? The GPU acceptance check, run by `bash bench/gpu.sh`.

Each check drives the real application (`python -m app ...` in fresh processes, as users run it) on
synthetic data in the real CIFAR-100 format, full size by default (50,000 + 10,000 images of
`bench.synthetic --hard`, 4 epochs). Runs on a GPU are not bit-identical (cuDNN's autotuning, kernels
that add with atomics), so checks that compare two runs do so within tolerances, each justified in
its test. Figures go to the report through `record_property` (tests/gpu_report.py).

Every run the checks need is started at once, side by side (`runs`, Acceptance.background): an
application process is mostly start-up, so the check takes about as long as its longest chain of runs
(cross-device's four), not the sum of its sixteen processes (fourteen of them took 292 s on an H200 one
after another).
Each check then waits for its runs and judges them; the seconds it records are its own runs'.

`--acceptance-device cpu` runs the same checks on a machine without a GPU, with those that need one
skipped (graphed-vs-eager then compares two eager runs): how tests/test_gpu_acceptance_on_cpu.py
tests the check itself.
"""
from __future__ import annotations

import json
import math
import shutil
import signal
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.acceptance.support import Acceptance, needs_gpu, tail
from tests.support import run_lines

pytestmark = pytest.mark.gpu

Record = Callable[[str, object], None]

# Per-epoch agreement of two GPU runs that should compute the same thing (see test_graphed_vs_eager).
TOP1_POINTS = 2.5  # percentage points of top-1
LOSS_RELATIVE = 0.075


# Issue 21's options, all on, as a practitioner would set them (timm's usual values): the run that
# test_options_graphed_vs_eager trains twice.
OPTIONS = {"loss.label_smoothing": 0.1, "augment.mixup_alpha": 0.8, "augment.cutmix_alpha": 1.0,
           "augment.cutout": 8, "ema.decay": 0.999, "ema.warmup_iters": 100, "ema.select_best": "ema"}


def epoch_metrics(run_dir: Path, per_epoch: int, model: str = "metrics") -> dict[int, dict[str, float]]:
    """Per-epoch validation metrics as TensorBoard shows them (its own reader), logged at the trainer's
    iteration at each epoch's end; accuracies, which it shows in per cent, as fractions, as results.json has them.
    `model`: "metrics" for the model's evaluation, "ema" for its weights' EMA's."""
    acc = EventAccumulator(str(run_dir / "tb" / "validation"))
    acc.Reload()
    out: dict[int, dict[str, float]] = {}
    for tag in ("top1", "top5", "loss"):
        for e in acc.Scalars(f"{model}/{tag}"):
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


# The runs: each a function of the check's settings that starts processes, waits for them and returns
# what the checks judge. What decides the next process of a chain (a checkpoint that must exist before a
# resume) is asserted here; everything else in the tests.

def _train(acceptance: Acceptance, data: Path, name: str, **settings: Any) -> Path:
    acceptance.app("--config", str(acceptance.config(name, data, **settings)), "--run-name", name)
    return acceptance.work / "runs" / name


@dataclass
class Killed:
    target: int  # the checkpoint's iteration after which the first process was killed
    resumed_stdout: str
    run_dir: Path


def _kill_and_resume(acceptance: Acceptance, data: Path) -> Killed:
    """SIGKILL in the middle of epoch 2, right after a checkpoint of `checkpoint.every_iters`, then --resume."""
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
    acceptance.wait(proc)
    first = first_log.read_text()
    assert wanted.exists(), f"{wanted.name} never appeared: {tail(first)}"
    assert f"epoch 2/{epochs}" not in first, "the kill came after epoch 2 ended, not in its middle"
    return Killed(target, acceptance.app("--config", str(cfg), "--resume", str(run_dir)).stdout, run_dir)


@dataclass
class Preempted:
    exit_code: int
    seconds_to_stop: float
    stopped_after_iteration: int
    checkpoint_written: bool  # of that iteration, before the resume
    status_when_stopped: str  # results.json's, before the resume
    status_after_resume: str


def _preempt_and_resume(acceptance: Acceptance, data: Path) -> Preempted:
    """SIGTERM in epoch 2, as a scheduler's preemption; what it left; then --resume."""
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
    code = acceptance.wait(proc, timeout=120)
    stopped = round(time.monotonic() - signalled, 2)
    lines = log.read_text().strip().splitlines()
    assert code == 143 and lines[-1].startswith("interrupted by SIGTERM after iteration "), \
        f"exit {code}: {tail(log.read_text())}"
    iteration = int(lines[-1].split("after iteration ")[1].split()[0])
    written = (run_dir / "checkpoints" / f"training_checkpoint_{iteration}.pt").exists()
    status = json.loads((run_dir / "results.json").read_text())["status"]
    acceptance.app("--config", str(cfg), "--resume", str(run_dir))
    resumed = json.loads((run_dir / "results.json").read_text())["status"]
    return Preempted(code, stopped, iteration, written, status, resumed)


def _cross_device(acceptance: Acceptance) -> dict[str, Any]:
    """One run of small data (1,280 + 500 images, 2 epochs of 20 iterations at batch 64, a checkpoint every
    10), its device changed twice: trained on the CPU; its epoch-1 checkpoint resumed on the GPU, which
    finishes epoch 2 with GPU checkpoints of iterations 30 and 40; that of 30 resumed on the CPU, which
    finishes epoch 2 again; and the CPU-trained best model evaluated on the GPU. A later checkpoint is
    removed before each resume, so that each resume is the newest state of its run folder."""
    from bench.synthetic import write_cifar100

    data = write_cifar100(acceptance.work / "small", 1280, 500, hard=True, seed=1)
    cfg = acceptance.config("cross", data, **{"train.epochs": 2, "train.device": "cpu", "train.batch_size": 64,
                                              "checkpoint.every_iters": 10, "checkpoint.keep_last": 4})
    run_dir = acceptance.work / "runs" / "cross"
    checkpoints = run_dir / "checkpoints"
    acceptance.app("--config", str(cfg), "--run-name", "cross")
    cpu_best = acceptance.work / "cpu_best.pt"
    shutil.copy(_best(run_dir), cpu_best)  # before the GPU's resume can replace it
    logged = json.loads((run_dir / "results.json").read_text())["best"]
    found: dict[str, Any] = {}
    for name, resume_from, removed, device in (("cpu-then-cuda", 20, (30, 40), "cuda"),
                                               ("cuda-then-cpu", 30, (40,), "cpu")):
        for iteration in removed:
            (checkpoints / f"training_checkpoint_{iteration}.pt").unlink()
        result = acceptance.app("--config", str(cfg), "--resume", str(checkpoints / f"training_checkpoint_"
                                                                        f"{resume_from}.pt"), "--device", device)
        results = json.loads((run_dir / "results.json").read_text())
        found[name] = {"epochs_after_resume": _epochs_printed(result.stdout), "status": results["status"],
                       "final_top1": results["final"]["top1"]}
    found["cpu_checkpoint_on_gpu"] = _evaluate(acceptance, cpu_best, "cuda", data)
    found["cpu_logged"] = logged
    return found


@dataclass
class Runs:
    """The futures of every run the checks read, each (its result, its seconds)."""

    graphed: Future[tuple[Path, float]]
    eager: Future[tuple[Path, float]]
    killed: Future[tuple[Killed, float]]
    preempted: Future[tuple[Preempted, float]]
    cross_device: Optional[Future[tuple[dict, float]]]
    options_graphed: Future[tuple[Path, float]]  # every option of issue 21 on (OPTIONS)
    options_eager: Future[tuple[Path, float]]
    evaluated: Future[tuple[dict, float]]  # the graphed run's best model, on the check's device
    evaluated_cpu: Optional[Future[tuple[dict, float]]]
    predicted: Future[tuple[Any, float]]


@pytest.fixture(scope="session")
def runs(acceptance: Acceptance, data: Path) -> Runs:
    """Every run, started at once in the order the checks need them; those that read the graphed run's
    best model wait for it. On the CPU the runs that need a GPU are not started."""
    a, gpu = acceptance, acceptance.device == "cuda"
    graphed = a.background(a.timed(lambda: _train(a, data, "graphed")))

    def best() -> Path:
        return _best(graphed.result()[0])

    started = Runs(
        graphed=graphed,
        killed=a.background(a.timed(lambda: _kill_and_resume(a, data))),
        preempted=a.background(a.timed(lambda: _preempt_and_resume(a, data))),
        eager=a.background(a.timed(lambda: _train(a, data, "eager", **{"train.cuda_graphs": False}))),
        cross_device=a.background(a.timed(lambda: _cross_device(a))) if gpu else None,
        options_graphed=a.background(a.timed(lambda: _train(a, data, "options-graphed", **OPTIONS))),
        options_eager=a.background(a.timed(lambda: _train(a, data, "options-eager", **OPTIONS,
                                                           **{"train.cuda_graphs": False}))),
        evaluated=a.background(a.timed(lambda: _evaluate(a, best(), a.device))),
        evaluated_cpu=a.background(a.timed(lambda: _evaluate(a, best(), "cpu"))) if gpu else None,
        predicted=a.background(a.timed(lambda: _predict(a, data, best()))))
    return started


def _predict(acceptance: Acceptance, data: Path, checkpoint: Path) -> tuple[list, list[str]]:
    from PIL import Image

    from app.data import load_dataset

    test = load_dataset(str(data), "cifar100")
    paths = []
    for i in range(4):
        path = acceptance.work / f"test_{i}.png"
        Image.fromarray(test.test.images[i].permute(1, 2, 0).numpy()).save(path)
        paths.append(str(path))
    result = acceptance.app("predict", "--checkpoint", str(checkpoint), *paths, "--json", "--device",
                            acceptance.device)
    return json.loads(result.stdout), [test.classes[int(test.test.labels[i])] for i in range(4)]


def test_learns(acceptance: Acceptance, runs: Runs, record_property: Record) -> None:
    """The recipe on learnable data, CUDA graphs on (the default): validation loss at the last epoch
    below the first epoch's, training loss falling, top-1 far above chance: at least 10x chance, or
    halfway from chance to 100% where that is less (with few classes). On the CPU's 8 iterations a
    100-class head cannot learn that much: there the figures are recorded, not judged."""
    graphed, seconds = runs.graphed.result()
    metrics = epoch_metrics(graphed, acceptance.iterations_per_epoch)
    losses = [e.value for e in _train_scalars(graphed).Scalars("metrics/loss")]
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    final = metrics[max(metrics)]
    chance = 1 / acceptance.classes
    wanted = min(10 * chance, (1 + chance) / 2)
    record_property("seconds", seconds)
    record_property("top1_per_epoch", [round(metrics[e]["top1"], 4) for e in sorted(metrics)])
    record_property("val_loss_per_epoch", [round(metrics[e]["loss"], 4) for e in sorted(metrics)])
    record_property("train_loss_first_tenth", round(first, 4))
    record_property("train_loss_last_tenth", round(last, 4))
    learned = last < first and final["loss"] < metrics[min(metrics)]["loss"] and final["top1"] >= wanted
    if acceptance.device != "cuda" and not learned:
        pytest.skip(f"not judged on the CPU's short run (top-1 {final['top1']:.3f})")
    assert learned, f"did not learn: train loss {first:.3f} -> {last:.3f}, top-1 {final['top1']:.3f} " \
                    f"(wanted {wanted:.2f})"


def test_graphed_vs_eager(acceptance: Acceptance, runs: Runs, record_property: Record) -> None:
    """Graphed and eager runs are not bit-identical on a GPU, nor are two eager runs: cuDNN's autotuning
    and kernels that add with atomics differ in the last bits from the first step on, training amplifies
    that, and after a few epochs two such runs are about as far apart as two seeds. So the comparison
    is per epoch, within 2.5 points of top-1 and 7.5% of validation loss: five standard deviations of
    top-1's sampling noise alone on 10,000 test images (about 0.5 points). Epoch 1 is reported, not
    judged: it ends on the steep part of the learning curve, where two graphed runs, differing only by
    nondeterminism, were measured 1.74 points apart (H200, 2026-11-28). test_kill_resume reports the
    same figures for two graphed runs, the spread that nothing but nondeterminism makes. On the CPU
    both runs are eager and equal to the last bit."""
    graphed, _ = runs.graphed.result()
    eager, seconds = runs.eager.result()
    record_property("seconds", seconds)
    per_epoch = acceptance.iterations_per_epoch
    within_tolerance(record_property, "graphed_vs_eager", epoch_metrics(graphed, per_epoch),
                     epoch_metrics(eager, per_epoch))


def test_options_graphed_vs_eager(acceptance: Acceptance, runs: Runs, record_property: Record) -> None:
    """Label smoothing, Mixup and CutMix, Cutout and the weights' EMA all on (OPTIONS), the one-GPU default
    (graphed) against the eager step: per epoch, the model's and the EMA's validation metrics within
    test_graphed_vs_eager's tolerances, whose reasons hold here as they do there (every draw of the mixes
    comes from the generator both runs seed alike; what differs is cuDNN's and the atomics' rounding). The
    EMA picks the best model here (`ema.select_best`), so results.json's best is the EMA's. On the CPU both
    runs are eager and equal to the last bit."""
    graphed, _ = runs.options_graphed.result()
    eager, seconds = runs.options_eager.result()
    record_property("seconds", seconds)
    per_epoch = acceptance.iterations_per_epoch
    for model in ("metrics", "ema"):
        within_tolerance(record_property, f"options_{model}", epoch_metrics(graphed, per_epoch, model),
                         epoch_metrics(eager, per_epoch, model))
    best = json.loads((graphed / "results.json").read_text())["best"]
    ema = epoch_metrics(graphed, per_epoch, "ema")
    assert math.isclose(best["top1"], max(m["top1"] for m in ema.values()), rel_tol=1e-6), \
        f"the best model is not the EMA's best: {best} vs {ema}"


def test_kill_resume(acceptance: Acceptance, runs: Runs, record_property: Record) -> None:
    """SIGKILL in the middle of epoch 2, then --resume. On a GPU a resumed run is not bit-identical to an
    uninterrupted one (see test_graphed_vs_eager); what is: it resumes at the checkpoint's iteration,
    repeats no finished epoch, writes into the same run folder, TensorBoard holds each step exactly
    once, and its metrics agree like those of any two runs."""
    per_epoch, epochs = acceptance.iterations_per_epoch, acceptance.epochs
    killed, seconds = runs.killed.result()
    run_dir, target = killed.run_dir, killed.target
    resumed_line = next((line for line in run_lines(killed.resumed_stdout) if line.startswith("resuming")), "")
    printed = _epochs_printed(killed.resumed_stdout)
    record_property("seconds", seconds)
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
    within_tolerance(record_property, "resumed_vs_uninterrupted", epoch_metrics(runs.graphed.result()[0], per_epoch),
                     epoch_metrics(run_dir, per_epoch))


def test_sigterm_resume(runs: Runs, record_property: Record) -> None:
    """What a scheduler's preemption does: SIGTERM in epoch 2 stops the run within seconds with exit 143,
    a checkpoint of its last step and results.json "interrupted"; --resume then finishes the run."""
    preempted, seconds = runs.preempted.result()
    record_property("seconds", seconds)
    record_property("exit_code", preempted.exit_code)
    record_property("seconds_to_stop", preempted.seconds_to_stop)
    record_property("stopped_after_iteration", preempted.stopped_after_iteration)
    assert preempted.checkpoint_written and preempted.status_when_stopped == "interrupted", \
        f"no checkpoint of iteration {preempted.stopped_after_iteration}, or results.json says " \
        f"{preempted.status_when_stopped}"
    assert preempted.status_after_resume == "finished", "the resumed run did not finish"


def test_evaluate_gpu(runs: Runs, record_property: Record) -> None:
    """Same weights, same evaluator, same bf16 autocast as during training; only cuDNN's autotuned
    choice of algorithm may differ between the two processes, which moves bf16 results by rounding: a
    few images of 10,000 at most may flip. Tolerance: 0.1 points of top-1/top-5, 0.1% of loss."""
    graphed, _ = runs.graphed.result()
    evaluated, seconds = runs.evaluated.result()
    logged = json.loads((graphed / "results.json").read_text())["best"]
    diffs = {k: abs(evaluated[k] - logged[k]) for k in ("top1", "top5")}
    loss = abs(evaluated["loss"] - logged["loss"]) / logged["loss"]
    record_property("seconds", seconds)
    record_property("logged", {k: logged[k] for k in ("top1", "top5", "loss")})
    record_property("evaluated", {k: evaluated[k] for k in ("top1", "top5", "loss")})
    assert max(diffs.values()) <= 0.001 and loss <= 0.001, \
        f"evaluate differs from training's log: {diffs}, loss {100 * loss:.3f}%"


def test_evaluate_cpu(acceptance: Acceptance, runs: Runs, record_property: Record) -> None:
    """The GPU evaluates under bf16 autocast (train.amp auto), the CPU in fp32: bf16 keeps 8 bits of
    mantissa, so logits move by about 0.5% and images near a decision boundary flip. Tolerance: 1 point
    of top-1/top-5 and 3% of loss against the GPU evaluation."""
    needs_gpu(acceptance)
    assert runs.evaluated_cpu is not None
    evaluated, _ = runs.evaluated.result()
    report, seconds = runs.evaluated_cpu.result()
    record_property("seconds", seconds)
    record_property("cpu", {k: report[k] for k in ("top1", "top5", "loss")})
    diffs = {k: abs(report[k] - evaluated[k]) for k in ("top1", "top5")}
    loss = abs(report["loss"] - evaluated["loss"]) / evaluated["loss"]
    assert max(diffs.values()) <= 0.01 and loss <= 0.03, f"CPU and GPU evaluations differ: {diffs}, loss " \
                                                         f"{100 * loss:.2f}%"


def test_predict_gpu(runs: Runs, record_property: Record) -> None:
    (predictions, true_classes), seconds = runs.predicted.result()
    record_property("seconds", seconds)
    record_property("top1_classes", [p["top"][0]["class"] for p in predictions])
    record_property("true_classes", true_classes)
    for p in predictions:
        probs = [t["probability"] for t in p["top"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5, p


def test_cross_device(acceptance: Acceptance, runs: Runs, record_property: Record) -> None:
    """A CPU checkpoint resumes on the GPU and a GPU checkpoint on the CPU, each finishing epoch 2 in the
    same run folder (`_cross_device`), and the CPU-trained best model evaluates on the GPU as the CPU
    logged it: within 2 points of top-1 and 3% of loss (fp32 on the CPU, bf16 on the GPU, 500 images)."""
    needs_gpu(acceptance)
    assert runs.cross_device is not None
    found, seconds = runs.cross_device.result()
    record_property("seconds", seconds)
    for name in ("cpu-then-cuda", "cuda-then-cpu"):
        record_property(name, found[name])
        assert found[name]["epochs_after_resume"] == ["2/2"] and found[name]["status"] == "finished", \
            f"{name}: epochs {found[name]['epochs_after_resume']}, status {found[name]['status']}"
    report, logged = found["cpu_checkpoint_on_gpu"], found["cpu_logged"]
    record_property("cpu_checkpoint_on_gpu", {k: report[k] for k in ("top1", "top5", "loss")})
    assert abs(report["top1"] - logged["top1"]) <= 0.02 and abs(report["loss"] - logged["loss"]) <= 0.03 * \
        logged["loss"], f"CPU checkpoint on the GPU: {report['top1']} vs logged {logged['top1']}"


def test_tensorboard(acceptance: Acceptance, runs: Runs, record_property: Record) -> None:
    """Every iteration's loss, top-1, lr and momentum (the momentum cycling 0.95 -> 0.85 -> 0.95), each
    epoch's validation metrics, equal to results.json."""
    graphed, _ = runs.graphed.result()
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
