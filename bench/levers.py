"""What each lever of issue 20 is worth, alone and together, each with its same-math check:

    python -m bench.levers OUT [--device auto|cpu|cuda] [--quick] [--work DIR] [--budget SECONDS]

Every training step is the application's own: `app.training.build_parts` builds it from the config
(data, model, optimizer, schedule, augmentation, the CUDA-graph step), so a lever is a config key set
and nothing here copies the step. For each step setting: the first call (capture, compilation), the
same-math check (the first steps from the same seed, against the baseline's) and the ms per step of
the replays, the schedule stepped as the trainer steps it. One JSON line per lever is appended to
OUT/levers.jsonl as soon as it is measured (a run cut short keeps what it measured); a lever whose key
this version does not have is recorded "not available", one that fails is recorded with its error,
and the script goes on. OUT/profile.json: one replayed step of each step setting under torch.profiler,
its kernel time by kind (convolution, BatchNorm, element-wise, optimizer, augmentation, copies) and the
gaps (the measured step time less the kernels' time).

The levers: a. evaluation counts on the device against Ignite's four metrics; b. the time of one
epoch's TensorBoard figures (`logging.figures_every_epochs` draws them every N epochs); c. the
checkpoint's host copy into reused pinned buffers against a plain copy; d. `logging.read_losses_late`,
the training thread's time per loss flush; e. start-up (the imports); f. `train.fused_update`;
g. `train.compile`; h. `train.amp` fp16; `all`: f and g together, `all_fp16` with h too.

Same math. Two runs of the same step on a GPU are not bit-identical (cuDNN's atomics), so a step
lever is compared by how far its first steps move the weights from the baseline's: |dW - dW_base| /
|dW_base| over all parameters (dW: the weights after the steps less the starting weights, which must
be equal) and the largest relative difference of the steps' losses. Within rounding means: no further
than the baseline moves from itself when built again (the floor, times 4) or from its own fp32 run
(what bf16's rounding does to these steps, measured on CUDA; on the CPU, whose baseline is fp32, a
fixed 1e-3). fp16 is not the same math: it is reported against fp32 and judged by accuracy later.

CPU mode (no CUDA, or --device cpu): tiny sizes (batch 4, a few steps), the settings that compile or
autocast (minutes on a CPU) recorded as skipped, so that the suite runs every code path but those.
"""
from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import gc
import io
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]

FLOOR_FACTOR = 4  # a lever may differ from the baseline this many times as far as the baseline from itself
FP32_TOLERANCE = 1e-3  # on the CPU: fp32 rounding over a few steps stays far below this


@dataclass(frozen=True)
class Sizes:
    batch: int
    train_images: int  # the first `step_batches` batches feed the steps; the trainer (d) runs whole epochs
    test_images: int
    eval_batch: int
    step_batches: int
    same_math_steps: int
    warmup_steps: int
    timed_steps: int
    rounds: int
    profiled_steps: int
    queued_steps: int  # steps queued before each checkpoint copy (c): a save follows a step
    trainer_epochs: int
    log_every: int
    skipped: tuple[str, ...] = ()  # settings not run here, and why (`SKIP_REASON`)


GPU = Sizes(batch=128, train_images=128 * 64, test_images=10_000, eval_batch=500, step_batches=16,
            same_math_steps=10, warmup_steps=5, timed_steps=100, rounds=3, profiled_steps=3, queued_steps=5,
            trainer_epochs=3, log_every=20)
GPU_QUICK = Sizes(**{**GPU.__dict__, "timed_steps": 30, "rounds": 2})
# On the 2-core CPU a step at batch 4 takes about a second in fp32 and several under bf16 or fp16 autocast;
# compiling the model or the update takes minutes.
CPU = Sizes(batch=4, train_images=16, test_images=8, eval_batch=4, step_batches=4, same_math_steps=2,
            warmup_steps=0, timed_steps=1, rounds=2, profiled_steps=1, queued_steps=0, trainer_epochs=1,
            log_every=2, skipped=("reference_fp32", "f", "g", "h", "all", "all_fp16"))
SKIP_REASON = "CPU mode: compiling or autocasting a step takes minutes on a CPU"


@dataclass(frozen=True)
class Setting:
    """One step setting: config keys over the baseline's."""

    lever: str
    name: str
    overrides: dict[str, Any]
    estimate_s: float  # on a GPU, from a cold start: skipped when less time is left
    same_math: bool = True  # False: judged against fp32, never picked automatically


BASE = Setting("base", "baseline (the recipe: bf16 on CUDA, CUDA graphs)", {}, 15)
REPEAT = Setting("repeat", "baseline built again (the floor of the same-math check)", {}, 5)
REFERENCE = Setting("reference_fp32", "fp32 (train.amp off): what bf16's rounding does", {"train.amp": "off"}, 8)
# On the CPU, where there are no graphs, the same step as the baseline's: there it tests the check itself.
EAGER = Setting("eager", "eager step (train.cuda_graphs false)", {"train.cuda_graphs": False}, 8)
FUSED = Setting("f", "train.fused_update", {"train.fused_update": True}, 30)
COMPILED = Setting("g", "train.compile", {"train.compile": True}, 60)
ALL = Setting("all", "train.fused_update + train.compile", {"train.fused_update": True, "train.compile": True}, 30)
FP16 = Setting("h", "train.amp fp16", {"train.amp": "fp16"}, 10, same_math=False)
ALL_FP16 = Setting("all_fp16", "train.fused_update + train.compile + train.amp fp16",
                   {"train.fused_update": True, "train.compile": True, "train.amp": "fp16"}, 60, same_math=False)
SETTINGS = {s.lever: s for s in (BASE, REPEAT, REFERENCE, EAGER, FUSED, COMPILED, ALL, FP16, ALL_FP16)}
LATE_LOSSES = "logging.read_losses_late"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Record:
    """OUT/levers.jsonl, a line per lever written and flushed as it is measured, and OUT/profile.json."""

    def __init__(self, out: Path, fresh: bool = True) -> None:
        """`fresh`: both files start empty; else (a profiling child) profile.json's settings are kept."""
        out.mkdir(parents=True, exist_ok=True)
        self.levers, self.profile_path = out / "levers.jsonl", out / "profile.json"
        self.profiles: dict[str, Any] = {}
        if fresh:
            self.levers.write_text("")
            self.profile_path.unlink(missing_ok=True)
        elif self.profile_path.exists():
            self.profiles = json.loads(self.profile_path.read_text()).get("settings", {})

    def line(self, entry: dict[str, Any]) -> None:
        with self.levers.open("a") as f:
            f.write(json.dumps(entry, default=_plain) + "\n")
            f.flush()
        print(summary_line(entry), flush=True)

    def profile(self, name: str, profile: dict[str, Any], context: dict[str, Any]) -> None:
        self.profiles[name] = profile
        tmp = self.profile_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**context, "settings": self.profiles}, indent=1, default=_plain))
        tmp.replace(self.profile_path)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else str(value)


def summary_line(e: dict[str, Any]) -> str:
    """The lever's line as the log shows it."""
    head = f"lever {e['lever']:<14} {e.get('status', ''):<13}"
    if "ms_per_step" in e:
        head += f" {e['ms_per_step']:8.3f} ms/step"
        if e.get("speedup"):
            head += f" ({e['speedup']:.3f}x the baseline)"
    for k in ("app_ms", "ignite_ms", "render_ms", "pinned_thread_ms", "plain_thread_ms", "flush_ms", "total_s"):
        if isinstance(e.get(k), (int, float)):
            head += f" {k} {e[k]:.3g}"
    check = e.get("same_math")
    if isinstance(check, dict) and "judged" in check:
        close = check.get("loss_close_to_fp32")
        head += "  not the same math" + ("" if close is None else f"; loss close to fp32's: {'yes' if close else 'NO'}")
    elif isinstance(check, dict) and "passed" in check:
        head += f"  same math: {'yes' if check['passed'] else 'NO'}"
    if e.get("reason") or e.get("error"):
        head += f"  {e.get('reason') or e.get('error')}"
    return head


@dataclass
class Trial:
    """A step setting's first steps and replays."""

    setting: Setting
    build_s: float
    first_call_s: float
    graphed: bool
    losses: list[float]
    start: torch.Tensor  # the weights before the first step, flattened
    delta: torch.Tensor  # the weights after the same-math steps less `start`
    step_ms: list[float] = field(default_factory=list)  # per round

    @property
    def ms_per_step(self) -> Optional[float]:
        return statistics.median(self.step_ms) if self.step_ms else None


def flat_weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


class Bench:
    def __init__(self, cfg: Any, device: torch.device, sizes: Sizes, work: Path, record: Record,
                 deadline: float) -> None:
        self.cfg, self.device, self.sizes, self.work, self.record = cfg, device, sizes, work, record
        self.deadline = deadline
        self.cupti_first = False  # a profiling child's: whether a profiler session came before the capture
        self.trials: dict[str, Trial] = {}
        self.context = {"device": device_name(device), "torch": torch.__version__, "sizes": sizes.__dict__}

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()

    def config(self, overrides: dict[str, Any]) -> Any:
        from app.config import override

        return override(self.cfg, overrides, "bench.levers")

    # -- step settings ---------------------------------------------------------------------------

    def trial(self, setting: Setting, timed: bool = True,
              with_parts: Optional[Callable[[Any, list], None]] = None, profile: bool = False) -> Trial:
        """Build the setting's run parts, take the same-math steps from the seed's weights, then (`timed`)
        time replays and (`profile`) profile them; `with_parts(parts, batches)` runs while the parts are alive."""
        from app.cuda_graph import CudaGraphStep
        from app.training import build_parts

        s, device = self.sizes, self.device
        started = time.perf_counter()
        parts = build_parts(self.config(setting.overrides), 0)
        batches = [b for _, b in zip(range(s.step_batches), parts.train_batches)]
        build_s = time.perf_counter() - started
        start = flat_weights(parts.model)

        def step(i: int) -> torch.Tensor:
            out = parts.step(*batches[i % len(batches)])
            parts.scheduler.step()  # as the trainer's LRScheduler does, once per iteration
            return out

        synchronize(device)
        t = time.perf_counter()
        losses = [step(0)[0]]
        synchronize(device)
        first_call_s = time.perf_counter() - t
        losses += [step(i)[0] for i in range(1, s.same_math_steps)]
        synchronize(device)
        trial = Trial(setting, build_s, first_call_s, isinstance(parts.step, CudaGraphStep) and not parts.step.failed,
                      torch.stack(losses).float().tolist(), start, flat_weights(parts.model) - start)
        if timed:
            for i in range(s.warmup_steps):
                step(i)
            for _ in range(s.rounds):
                synchronize(device)
                t = time.perf_counter()
                for i in range(s.timed_steps):
                    step(i)
                synchronize(device)
                trial.step_ms.append(1e3 * (time.perf_counter() - t) / s.timed_steps)
        if timed and profile:
            found = profile_step(parts, batches, device, s.profiled_steps, trial.ms_per_step, self.work,
                                 self.cfg.augment)
            self.record.profile(setting.lever, {**found, "cupti_first": self.cupti_first}, self.context)
        if with_parts is not None:
            with_parts(parts, batches)
        self.trials[setting.lever] = trial
        return trial  # the parts go with this frame: `release`

    def entry(self, trial: Trial) -> dict[str, Any]:
        base = self.trials.get("base")
        e: dict[str, Any] = {"lever": trial.setting.lever, "name": trial.setting.name, "status": "measured",
                             "settings": trial.setting.overrides, "graphed": trial.graphed,
                             "build_seconds": round(trial.build_s, 3),
                             "first_call_seconds": round(trial.first_call_s, 3), "losses": trial.losses}
        if trial.ms_per_step is not None:
            e["ms_per_step"] = round(trial.ms_per_step, 4)
            e["ms_per_step_rounds"] = [round(m, 4) for m in trial.step_ms]
            e["images_per_second"] = round(1e3 * self.sizes.batch / trial.ms_per_step, 1)
            if base is not None and base.ms_per_step and trial is not base:
                e["baseline_ms_per_step"] = round(base.ms_per_step, 4)
                e["speedup"] = round(base.ms_per_step / trial.ms_per_step, 4)
        if base is not None and trial is not base:
            e["same_math"] = self.same_math(trial)
        return e

    def distance(self, a: Trial, b: Trial) -> dict[str, Any]:
        """How far `a`'s first steps are from `b`'s (see the module's docstring)."""
        update = float((a.delta - b.delta).norm() / b.delta.norm().clamp(min=1e-30))
        loss = max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a.losses, b.losses))
        return {"update_rel_diff": update, "loss_rel_diff": loss, "same_start": bool(torch.equal(a.start, b.start))}

    def same_math(self, trial: Trial) -> dict[str, Any]:
        base = self.trials["base"]
        found = self.distance(trial, base)
        repeat, reference = self.trials.get("repeat"), self.trials.get("reference_fp32")
        floor = self.distance(repeat, base) if repeat is not None and trial is not repeat else None
        scale = self.distance(base, reference) if reference is not None and trial is not reference else None
        if not trial.setting.same_math:
            if reference is None or scale is None:
                return {**found, "passed": False, "judged": "not the same math, and no fp32 run to compare with"}
            to_fp32 = self.distance(trial, reference)
            close = to_fp32["loss_rel_diff"] <= max(2 * scale["loss_rel_diff"], 1e-2)
            return {**found, "passed": False, "judged": "not the same math: judged by accuracy in a real run",
                    "to_fp32": to_fp32, "baseline_to_fp32": scale, "loss_close_to_fp32": close}
        out: dict[str, Any] = {**found, "floor": floor, "rounding_scale": scale}
        if trial is repeat or trial is reference:
            return out
        passed = found["same_start"]
        for key in ("update_rel_diff", "loss_rel_diff"):
            tolerance = max(FLOOR_FACTOR * (floor[key] if floor else 0.0),
                            scale[key] if scale else FP32_TOLERANCE)
            out[f"{key}_tolerance"] = tolerance
            passed = passed and math.isfinite(found[key]) and found[key] <= tolerance
        out["passed"] = passed
        out["rule"] = (f"same starting weights, and each difference at most {FLOOR_FACTOR} x the baseline's "
                       f"from itself or the baseline's from fp32 (on the CPU {FP32_TOLERANCE}), whichever is larger")
        return out

    # -- levers measured around the baseline's parts ------------------------------------------------

    def around_baseline(self, parts: Any, batches: list) -> None:
        """a, b and c, on the baseline's model and data after its replays."""
        figures: dict[str, Any] = {}
        self.guarded("a", "evaluation counts on the device vs Ignite's metrics",
                     lambda: self.evaluation(parts, figures))
        self.guarded("b", "one epoch's TensorBoard figures (logging.figures_every_epochs)",
                     lambda: self.figures(parts, figures))
        self.guarded("c", "checkpoint host copy: reused pinned buffers vs a plain copy",
                     lambda: self.checkpoint_copy(parts, batches))

    def evaluation(self, parts: Any, figures: dict[str, Any]) -> dict[str, Any]:
        import torch.nn.functional as F
        from ignite.engine import Engine
        from ignite.metrics import Accuracy, ConfusionMatrix, Loss, TopKCategoricalAccuracy

        from app.config import TOP_K
        from app.engines import create_evaluator

        device, cfg = self.device, self.cfg
        ours = create_evaluator(cfg, parts.model, device)
        theirs = Engine(ours._process_function)  # the application's own evaluation step
        Accuracy(device=device).attach(theirs, "top1")
        TopKCategoricalAccuracy(k=TOP_K, device=device).attach(theirs, f"top{TOP_K}")
        Loss(F.cross_entropy, device=device).attach(theirs, "loss")
        ConfusionMatrix(cfg.model.num_classes, device=device).attach(theirs, "confusion")

        def run(engine: Engine) -> float:
            synchronize(device)
            t = time.perf_counter()
            engine.run(parts.test_batches)
            synchronize(device)
            return 1e3 * (time.perf_counter() - t)

        run(ours), run(theirs)  # warm-up: cuDNN's autotuning for the evaluation's shapes
        times: dict[str, list[float]] = {"ours": [], "theirs": []}
        for _ in range(max(1, self.sizes.rounds)):
            times["ours"].append(run(ours))
            times["theirs"].append(run(theirs))
        a, b = ours.state.metrics, theirs.state.metrics
        figures["confusion"] = a["confusion"]
        equal = {k: a[k] == b[k] for k in ("top1", f"top{TOP_K}")}
        equal["confusion"] = bool(torch.equal(a["confusion"].long().cpu(), b["confusion"].long().cpu()))
        loss = abs(a["loss"] - b["loss"]) / max(abs(b["loss"]), 1e-30)
        return {"app_ms": min(times["ours"]), "ignite_ms": min(times["theirs"]), "rounds_ms": times,
                "images": len(parts.test_batches.labels), "eval_batch": cfg.eval.batch_size,
                "speedup": min(times["theirs"]) / min(times["ours"]),
                "same_math": {"passed": all(equal.values()) and loss <= 1e-5, "equal": equal, "loss_rel_diff": loss,
                              "rule": "top-1, top-5 and the confusion matrix equal, the loss within 1e-5"}}

    def figures(self, parts: Any, figures: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from handlers.confusion import confusion_image, most_confused, most_confused_table, per_class_accuracy
        from handlers.tensorboard import EventLog

        confusion = figures.get("confusion")
        if confusion is None:
            raise RuntimeError("no confusion matrix: lever a did not run")
        names = list(parts.data.classes)
        log = EventLog(self.work / "tb-figures")

        def render(step: int) -> float:
            t = time.perf_counter()
            pairs = most_confused(confusion)
            log.image("validation/confusion_matrix", confusion_image(confusion, names, pairs), step)
            log.text("validation/most_confused", most_confused_table(pairs, names), step)
            log.histogram("validation/per_class_accuracy", 100 * per_class_accuracy(confusion), step,
                          bins=np.linspace(0.0, 100.0, 21))
            log.push()
            return 1e3 * (time.perf_counter() - t)

        times = [render(i) for i in range(max(2, self.sizes.rounds + 1))][1:]  # the first loads the font
        log.close()
        ms = min(times)

        def drawn(every: int, epochs: int = 100) -> int:  # every N epochs, and at the last
            return len(range(every, epochs + 1, every)) + (epochs % every != 0)

        return {"render_ms": ms, "rounds_ms": times,
                "saved_per_100_epochs_s": {str(n): round(ms * (100 - drawn(n)) / 1e3, 3) for n in (5, 10, 25)},
                "same_math": {"passed": True, "rule": "not a computation: the numbers are logged every epoch whatever "
                                                      "N; only the figures' epochs change"}}

    def checkpoint_copy(self, parts: Any, batches: list) -> dict[str, Any]:
        from handlers.checkpoints import HostBuffers

        device, s = self.device, self.sizes
        checkpoint = {"model": parts.model.state_dict(), "optimizer": parts.optimizer.state_dict()}
        size = sum(t.numel() * t.element_size() for t in tensors_in(checkpoint))
        buffers = HostBuffers()
        buffers.copy(checkpoint).wait()  # the buffers are allocated (and pinned) once, at the first save

        def queue() -> None:
            for i in range(s.queued_steps):
                parts.step(*batches[i % len(batches)])
                parts.scheduler.step()

        pinned, plain, pinned_done = [], [], []
        for _ in range(max(2, s.rounds)):
            queue()
            t = time.perf_counter()
            copied = buffers.copy(checkpoint)
            pinned.append(1e3 * (time.perf_counter() - t))
            copied.wait()
            pinned_done.append(1e3 * (time.perf_counter() - t))
            synchronize(device)
            queue()
            t = time.perf_counter()
            plain_copy(checkpoint)
            plain.append(1e3 * (time.perf_counter() - t))
            synchronize(device)
        synchronize(device)
        ours = buffers.copy(checkpoint)
        ours.wait()
        same = serialized(ours.value) == serialized(plain_copy(checkpoint))
        return {"pinned_thread_ms": min(pinned), "pinned_until_copied_ms": min(pinned_done),
                "plain_thread_ms": min(plain), "rounds_ms": {"pinned": pinned, "plain": plain},
                "megabytes": round(size / 1e6, 1), "queued_steps": s.queued_steps,
                "same_math": {"passed": same, "rule": "torch.save of both copies gives the same bytes"}}

    # -- levers of their own -----------------------------------------------------------------------

    def trainer_flushes(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """The application's trainer as every process wires it (`wire_run`, without rank 0's files), for
        whole epochs: the training thread's time per iteration with and without a loss flush in it."""
        from ignite.engine import Events

        from app.checkpoint import RunMeta
        from app.runs import RunPlan
        from app.training import build_parts, wire_run
        from handlers.loss_buffer import LossEvents
        from handlers.preemption import GracefulStop

        cfg = self.config({"logging.log_every_iters": self.sizes.log_every, **overrides})
        parts = build_parts(cfg, 0)
        stop = GracefulStop()
        try:
            meta = RunMeta(cfg, parts.data.classes, parts.data_fingerprint.result())  # build_parts hashed it
            run = wire_run(cfg, RunPlan(self.work / "runs" / "flushes"), parts, meta, stop, False, lambda _: None)
            marks: list[tuple[int, float]] = []
            logged: dict[int, float] = {}
            run.trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: marks.append((0, time.perf_counter())))
            run.trainer.add_event_handler(Events.ITERATION_COMPLETED,
                                          lambda e: marks.append((e.state.iteration, time.perf_counter())))
            run.trainer.add_event_handler(LossEvents.LOSS_FLUSHED, lambda e: logged.update(
                {it: m["loss"] for it, m, _ in e.state.flushed_losses}))
            started = time.perf_counter()
            run.trainer.run(parts.train_batches, max_epochs=self.sizes.trainer_epochs)
            synchronize(self.device)
            wall = time.perf_counter() - started
        finally:
            stop.restore()
        per_epoch, every = len(parts.train_batches), cfg.logging.log_every_iters
        flush, other = [], []
        for (_, before), (it, after) in zip(marks, marks[1:]):
            if it == 0 or it % per_epoch == 0:  # an epoch's start, or its end (evaluation)
                continue
            (flush if it % every == 0 else other).append(1e3 * (after - before))
        return {"flush_iteration_ms": statistics.median(flush) if flush else None,
                "other_iteration_ms": statistics.median(other) if other else None,
                "flush_ms": statistics.median(flush) - statistics.median(other) if flush and other else None,
                "flushes": len(flush), "iterations": len(marks) - self.sizes.trainer_epochs,
                "iterations_per_epoch": per_epoch, "log_every_iters": every, "seconds": wall, "logged": logged}

    def late_losses(self) -> dict[str, Any]:
        from app.config import setting_keys

        base = self.trainer_flushes({})
        out: dict[str, Any] = {"baseline": {k: v for k, v in base.items() if k != "logged"}}
        if LATE_LOSSES not in setting_keys():
            return {**out, "status": "not available", "reason": f"{LATE_LOSSES} is not a setting of this version"}
        self.release()
        late = self.trainer_flushes({LATE_LOSSES: True})
        same_iterations = sorted(late["logged"]) == sorted(base["logged"])
        worst = max((abs(late["logged"][i] - v) / max(abs(v), 1e-30) for i, v in base["logged"].items()
                     if i in late["logged"]), default=float("inf"))
        return {**out, "late": {k: v for k, v in late.items() if k != "logged"}, "flush_ms": late["flush_ms"],
                "baseline_flush_ms": base["flush_ms"],
                "same_math": {"passed": same_iterations and worst <= 1e-3, "same_iterations_logged": same_iterations,
                              "loss_rel_diff": worst,
                              "rule": "every iteration's loss logged either way, within 1e-3 (two runs of a GPU)"}}

    def profile_in_child(self, lever: str, out: Path) -> None:
        """The setting's replayed step profiled in a process of its own (`--profile-setting`): the profiler
        and CUDA graphs are known to trouble each other (pytorch/pytorch#75504, an illegal memory access
        when a graph captured before the profiler's first use is replayed under it; the workaround of
        pytorch/pytorch#100441, a profiler session before any capture, was seen to leave CUPTI recording
        no kernels at all on CUDA 13), and a CUDA error would end every lever after it. So: attached after
        the capture first; if that fails or records no kernel on a GPU, again with the session first."""
        tries = []
        for cupti_first in (False, True):
            if self.device.type == "cuda" and self.seconds_left() < 20:
                tries.append({"cupti_first": cupti_first, "skipped": "time budget"})
                break
            started = time.perf_counter()
            try:
                result = subprocess.run([sys.executable, "-m", "bench.levers", str(out), "--device", self.device.type,
                                         "--work", str(self.work), "--profile-setting", lever,
                                         *(["--cupti-first"] if cupti_first else [])], cwd=ROOT, capture_output=True,
                                        text=True, timeout=max(30.0, min(180.0, self.seconds_left())))
                code, said = result.returncode, (result.stderr or result.stdout)[-600:]
            except subprocess.TimeoutExpired:
                code, said = None, "timed out"
            found = Record(out, fresh=False).profiles.get(lever)
            fresh = found is not None and found.get("cupti_first") == cupti_first
            tried = {"cupti_first": cupti_first, "exit": code, "seconds": round(time.perf_counter() - started, 1),
                     "kernels_per_step": found.get("kernels_per_step") if fresh else None}
            if code != 0:
                tried["said"] = said
            tries.append(tried)
            if code == 0 and fresh and (found.get("kernels_per_step") or self.device.type != "cuda"):
                self.record.line({"lever": "profile", "setting": lever, "status": "measured", "tries": tries,
                                  "kinds_us": found["kinds_us"], "gaps_us": found["gaps_us"]})
                return
        self.record.line({"lever": "profile", "setting": lever, "status": "error", "tries": tries,
                          "error": "no profile with kernels in it"})

    def guarded(self, lever: str, name: str, measure: Callable[[], dict[str, Any]]) -> None:
        """Measure and record one lever; its error, if it fails, is its record."""
        started = time.perf_counter()
        try:
            entry = {"lever": lever, "name": name, "status": "measured", **measure()}
        except Exception as e:  # noqa: BLE001 - recorded; the other levers go on
            entry = {"lever": lever, "name": name, "status": "error", "error": f"{type(e).__name__}: {e}"[:500],
                     "traceback": traceback.format_exc()[-2000:]}
        entry["seconds"] = round(time.perf_counter() - started, 2)
        self.record.line(entry)

    def step_setting(self, setting: Setting, timed: bool = True,
                     with_parts: Optional[Callable[[Any, list], None]] = None) -> None:
        from app.config import setting_keys

        entry: dict[str, Any] = {"lever": setting.lever, "name": setting.name, "settings": setting.overrides}
        missing = [k for k in setting.overrides if k not in setting_keys()]
        if setting.lever in self.sizes.skipped:
            self.record.line({**entry, "status": "skipped", "reason": SKIP_REASON})
        elif missing:
            self.record.line({**entry, "status": "not available", "reason": f"{missing[0]} is not a setting here"})
        elif self.device.type == "cuda" and self.seconds_left() < setting.estimate_s:
            self.record.line({**entry, "status": "skipped", "reason": f"time budget: {self.seconds_left():.0f} s "
                                                                      f"left, about {setting.estimate_s:.0f} s needed"})
        else:
            self.guarded(setting.lever, setting.name, lambda: self.entry(self.trial(setting, timed, with_parts)))
            self.release()

    def release(self) -> None:
        """The memory of the parts just measured (their CUDA graphs' pools too), before the next are built."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def plain_copy(obj: Any) -> Any:
    """What a save without HostBuffers does: every tensor copied to fresh host memory, synchronously."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        out = type(obj)((k, plain_copy(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a state_dict's: torch.save keeps it
            out._metadata = copy.deepcopy(obj._metadata)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain_copy(v) for v in obj)
    return copy.deepcopy(obj)


def serialized(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def tensors_in(obj: Any) -> Iterable[torch.Tensor]:
    """Every tensor of a checkpoint-like object: nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v)


# -- the profile of a replayed step ------------------------------------------------------------------

KINDS = (  # the first kind whose words a kernel's (or, on the CPU, an operator's) name holds
    ("batchnorm", ("batch_norm", "batchnorm", "bn_fw", "bn_bw", "welford")),
    ("optimizer", ("multi_tensor_apply", "foreach", "triton_for_")),
    ("convolution", ("conv", "cudnn", "xmma", "gemm", "cutlass", "wgrad", "dgrad", "implicit", "winograd",
                     "nchwtonhwc", "nhwctonchw", "aten::mm", "aten::addmm")),
    ("copies", ("memcpy", "memset", "copy")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "triton_", "reduce", "softmax", "nll", "aten::")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, words in KINDS if any(w in low for w in words)), "other")


def profile_step(parts: Any, batches: list, device: torch.device, steps: int, step_ms: Optional[float],
                 work: Path, augment_config: Any) -> dict[str, Any]:
    """`steps` replayed steps under torch.profiler, per step: kernel time by kind. The augmentation's and
    the optimizer's kernels are told apart from the model's by count: each is profiled alone first (its
    kernels per call, by name), and that many of each name in a step are theirs. On the CPU the same is
    done with the operators' own (self) times. Gaps: the measured step time less the kernels'."""
    from app.augment import build_augment

    augment = build_augment(augment_config, torch.Generator(device).manual_seed(1))  # the step's, drawing apart
    images = batches[0][0]
    aug_counts = _counts(_profiled(lambda: augment(images), device, work / "trace-augment.json"))
    opt_counts = _counts(_profiled(parts.optimizer.update, device, work / "trace-optimizer.json"))

    def run() -> None:
        for i in range(steps):
            parts.step(*batches[i % len(batches)])
            parts.scheduler.step()

    synchronize(device)
    t = time.perf_counter()
    kernels = _profiled(run, device, work / "trace-step.json")
    profiled_ms = 1e3 * (time.perf_counter() - t) / steps
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for name, _, dur in kernels:
        by_name[name].append(dur)
    kinds: dict[str, float] = collections.defaultdict(float)
    top = []
    for name, durations in by_name.items():
        mean, count = statistics.fmean(durations), len(durations)
        aug = min(aug_counts.get(name, 0) * steps, count)
        opt = min(opt_counts.get(name, 0) * steps, count - aug)
        kinds["augmentation"] += aug * mean / steps
        kinds["optimizer"] += opt * mean / steps
        kinds[kind_of(name)] += (count - aug - opt) * mean / steps
        top.append({"name": name[:160], "kind": "augmentation" if aug == count else "optimizer" if opt == count
                    else kind_of(name), "us_per_step": round(sum(durations) / steps, 2), "per_step": count / steps})
    kernel_us = sum(kinds.values())
    span_us = (max(s + d for _, s, d in kernels) - min(s for _, s, _ in kernels)) / steps if kernels else 0.0
    wall_ms = step_ms if step_ms is not None else profiled_ms
    return {"unit": "microseconds per step", "device_kernels": device.type == "cuda",
            "steps_profiled": steps, "step_ms_measured": wall_ms, "step_ms_under_profiler": profiled_ms,
            "kinds_us": {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "kernels_us": round(kernel_us, 2), "span_us": round(span_us, 2),
            "gaps_us": round(1e3 * wall_ms - kernel_us, 2),
            "kernels_per_step": len(kernels) / steps,
            "top": sorted(top, key=lambda k: -k["us_per_step"])[:15]}


def _counts(kernels: list[tuple[str, float, float]]) -> dict[str, int]:
    return dict(collections.Counter(name for name, _, _ in kernels))


def _profiled(fn: Callable[[], Any], device: torch.device, trace: Path) -> list[tuple[str, float, float]]:
    """(name, start, duration) in microseconds of every kernel (on the CPU: every operator's self time)."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # once outside: a first call's allocations and autotuning are not the step's
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    prof.export_chrome_trace(str(trace))
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    if device.type == "cuda":
        return [(e["name"], float(e["ts"]), float(e["dur"])) for e in events
                if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    return _self_times([e for e in events if e.get("cat") == "cpu_op"])


def _self_times(ops: list[dict[str, Any]]) -> list[tuple[str, float, float]]:
    """Each operator's time less that of the operators it called (nested in it on its thread)."""
    out = []
    by_thread: dict[Any, list[dict[str, Any]]] = collections.defaultdict(list)
    for op in ops:
        by_thread[(op.get("pid"), op.get("tid"))].append(op)
    for thread in by_thread.values():
        thread.sort(key=lambda o: (float(o["ts"]), -float(o["dur"])))
        stack: list[list[Any]] = []  # [end, name, start, duration, children's time]
        for op in thread:
            start, dur = float(op["ts"]), float(op["dur"])
            while stack and stack[-1][0] <= start:
                done = stack.pop()
                out.append((done[1], done[2], max(0.0, done[3] - done[4])))
            if stack:
                stack[-1][4] += dur
            stack.append([start + dur, op["name"], start, dur, 0.0])
        out += [(d[1], d[2], max(0.0, d[3] - d[4])) for d in stack]
    return out


# -- start-up --------------------------------------------------------------------------------------

IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def startup() -> dict[str, Any]:
    """`python -X importtime -c "import app.training"`: the imports' total and the largest top-level ones."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", "import app.training"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-500:])
    rows = [m.groups() for m in map(IMPORT_LINE.match, result.stderr.splitlines()) if m]
    packages: dict[str, int] = {}  # a package's first import (the one that pays for it) by its cumulative time
    for _, cum, _, name in rows:
        if "." not in name and not name.startswith("_"):
            packages[name] = max(packages.get(name, 0), int(cum))
    top = sorted(packages.items(), key=lambda r: -r[1])
    return {"total_s": sum(int(own) for own, _, _, _ in rows) / 1e6, "process_s": wall,
            "packages_s": {name: cum / 1e6 for name, cum in top[:10]},
            "note": "the time to the first step: end_to_end.json, from the end-to-end run"}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.levers", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--quick", action="store_true", help="fewer timed steps on a GPU")
    p.add_argument("--work", type=Path, help="for the data and the traces (default: a temporary folder)")
    p.add_argument("--budget", type=float, default=150.0,
                   help="seconds: a GPU setting that would not finish within them is recorded as skipped")
    p.add_argument("--profile-setting", metavar="LEVER", help="(a child process) profile this setting's step only")
    p.add_argument("--cupti-first", action="store_true", help="with --profile-setting: a profiler session before "
                                                             "the capture")
    args = p.parse_args(argv)
    started = time.monotonic()
    from app.config import Config, override
    from app.device import resolve_device
    from bench.synthetic import write_cifar100

    device = resolve_device(args.device)
    sizes = CPU if device.type == "cpu" else GPU_QUICK if args.quick else GPU
    work = args.work or Path(tempfile.mkdtemp(prefix="levers-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not (data / "cifar-100-python" / "meta").exists():
        write_cifar100(data, sizes.train_images, sizes.test_images)
    cfg = override(Config(), {"data.root": str(data), "data.download": False, "train.device": device.type,
                              "train.batch_size": sizes.batch, "eval.batch_size": sizes.eval_batch,
                              "logging.output_dir": str(work / "runs")}, "bench.levers")
    if args.profile_setting:
        if args.cupti_first:
            with torch.profiler.profile():
                pass
        if device.type == "cpu":  # the profile needs no same-math steps, and one round of timing
            sizes = dataclasses.replace(sizes, same_math_steps=1, rounds=1)
        bench = Bench(cfg, device, sizes, work, Record(args.out, fresh=False), started + args.budget)
        bench.cupti_first = args.cupti_first
        bench.trial(SETTINGS[args.profile_setting], profile=True)
        return
    record = Record(args.out)
    bench = Bench(cfg, device, sizes, work, record, started + args.budget)
    record.line({"lever": "environment", "status": "measured", **bench.context, "cpu_threads": torch.get_num_threads(),
                 "python": sys.version.split()[0], "compile_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR")})
    bench.step_setting(BASE, with_parts=bench.around_baseline)
    if "base" not in bench.trials:
        sys.exit("the baseline step failed: nothing to compare the levers with")
    bench.profile_in_child("base", args.out)
    for setting in (REPEAT, REFERENCE):  # what the same-math checks compare with
        bench.step_setting(setting, timed=False)
    # The levers the end-to-end run may pick first (compilation is slow: the time budget may end before the
    # rest), then what is only reported, the cheap before the slow.
    for setting in (FUSED, COMPILED, ALL, EAGER, FP16):
        bench.step_setting(setting)
    bench.guarded("d", LATE_LOSSES, bench.late_losses)
    bench.guarded("e", "start-up: python -X importtime -c 'import app.training'", startup)
    bench.step_setting(ALL_FP16)
    fastest = min((t for t in bench.trials.values() if t.ms_per_step and t.setting.lever != "base"),
                  key=lambda t: t.ms_per_step, default=None)
    if device.type == "cuda" and fastest is not None and fastest.ms_per_step < bench.trials["base"].ms_per_step:
        bench.profile_in_child(fastest.setting.lever, args.out)
    print(f"levers: {time.monotonic() - started:.1f} s, {record.levers} and {record.profile_path}", flush=True)


if __name__ == "__main__":
    main()
