"""Checkpoints, in one place: what a training checkpoint holds, how it is saved and how many are kept,
how it is loaded (once), checked and decoded.

A training checkpoint holds the trainer's position, the model, the optimizer, the schedule, every
process's augmentation generator (`GeneratorStates`), the best-model tracker, results and the smoothed
training loss (rank 0's), the loss scaler under fp16 (app/loss_scale.py), the weights' EMA with `ema.decay`
(app/ema.py), and `meta`: the run's config, class names and a fingerprint of its data, as JSON text, so
that loading needs nothing but `weights_only=True`. A best-model checkpoint holds one set of weights as
"model" (the raw model's or the EMA's, as `ema.select_best` chose; `model_state` is the one place that
picks the weights to load) and `meta` with, besides, where in the run
it was found (its epoch and iteration) and the validation metrics that made it the best
(`BestModelMeta`). The file names and the crash-safe saving are handlers/checkpoints.py's.

A checkpoint is loaded on the CPU and each object then moves its own state to where it lives: the
model and optimizer to the training device; a generator takes only a CPU byte tensor, whatever device
the checkpoint was written on, and only the state of its own kind of generator. So a checkpoint
written on a GPU resumes, evaluates and predicts on a CPU, and the reverse.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import warnings
import zipfile
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.engine.events import EventsList
from ignite.handlers import Checkpoint

from app.config import Config, config_from_dict, to_dict
from app.data import CifarData
from app.errors import ConfigError, UserError
from app.model import build_model
from handlers.checkpoints import SaveThenRemove, attach_training_checkpoint
from handlers.checkpoints import best_model_checkpoint as _best_model_checkpoint
from handlers.checkpoints import training_checkpoint_iteration, training_checkpoints

MAX_CHECKPOINT_BYTES = 2**30  # what a checkpoint may expand to in memory; the recipe's take about 90 MB
TRAINING_KEYS = ("trainer", "model", "optimizer", "lr_scheduler", "augment", "meta")  # what a resume needs


class RunMeta:
    """What every checkpoint carries besides weights: the config it was trained with, the class names
    and the data's fingerprint. Never loaded back into the run: a resume checks the running config
    against the config stored here (app/runs.py `trained_config`), and then the running config decides."""

    def __init__(self, cfg: Config, classes: tuple[str, ...], data_fingerprint: str) -> None:
        self.config, self.classes, self.data_fingerprint = to_dict(cfg), list(classes), data_fingerprint

    def state_dict(self) -> dict[str, Any]:
        return {"config": json.dumps(self.config), "classes": json.dumps(self.classes),
                "data": self.data_fingerprint}


class BestModelMeta:
    """The run's meta and where the best model stands in the run, read as it is saved: a script (and
    `evaluate`) can tell which epoch the best model is and what it scored, without the run's logs."""

    def __init__(self, meta: RunMeta, trainer: Engine, evaluator: Engine) -> None:
        self.meta, self.trainer, self.evaluator = meta, trainer, evaluator

    def state_dict(self) -> dict[str, Any]:
        metrics = {k: float(v) for k, v in self.evaluator.state.metrics.items() if isinstance(v, (int, float))}
        return {**self.meta.state_dict(), "epoch": self.trainer.state.epoch, "iteration": self.trainer.state.iteration,
                "metrics": json.dumps(metrics)}


class GeneratorStates:
    """Every process's augmentation generator, for the training checkpoint that rank 0 writes.

    Each process draws its own augmentations; an exact resume needs each of them back in its own
    process. `gather` runs in every process just before the checkpoint handler (a collective when
    there are several), and rank 0's checkpoint stores one row per rank.
    """

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self._gathered: torch.Tensor | None = None
        self.reseeded = False  # set by a load of another kind of generator's state

    def gather(self, _: Engine | None = None) -> None:
        if idist.get_world_size() > 1:
            state = self.generator.get_state()[None].to(idist.device())
            self._gathered = idist.all_gather(state).cpu()

    def state_dict(self) -> dict[str, Any]:
        if idist.get_world_size() == 1 or self._gathered is None:
            return {"generators": self.generator.get_state()[None]}
        return {"generators": self._gathered}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # With another number of processes than the run had, resume is no longer exact (the data
        # shards change anyway); each process takes a row so that their streams stay distinct.
        row = state["generators"][idist.get_rank() % len(state["generators"])].to("cpu", copy=True)
        own = self.generator.get_state()
        if row.numel() == own.numel():
            self.generator.set_state(row)
            return
        # A checkpoint from another device: a CUDA generator's state (Philox: seed and offset, 16 bytes)
        # does not fit a CPU generator (Mersenne Twister, 5056 bytes), nor the reverse. The stream cannot
        # continue, so it restarts from a seed derived from the saved state: deterministic (the same
        # checkpoint resumes the same way every time) and distinct per process.
        digest = hashlib.sha256(row.numpy().tobytes() + idist.get_rank().to_bytes(4, "little")).digest()
        self.generator.manual_seed(int.from_bytes(digest[:8], "little"))
        self.reseeded = True


def data_fingerprint(data: CifarData) -> str:
    """A hash of every image and label, so that a resume on other data is refused. Each tensor's bytes
    are hashed where they lie (a flat view; `tobytes` would copy the 184 MB of CIFAR-100 first, which
    took longer than the hashing itself), the same bytes in the same order as ever: the fingerprints of
    existing checkpoints still match."""
    h = hashlib.sha256()
    for split in (data.train, data.test):
        for tensor in (split.images, split.labels):
            h.update(memoryview(tensor.contiguous().numpy()).cast("B"))  # hashlib takes one dimension
    return h.hexdigest()[:16]


def data_fingerprint_in_background(data: CifarData) -> Future[str]:
    """`data_fingerprint`, computed in a thread of its own from now on, for the start of a run to
    overlap with the device's set-up and the model's building: hashlib releases the GIL while it hashes
    a buffer of 2 KiB or more (CPython's Modules/_hashopenssl.c, EVP_update), and the images are two
    such buffers. The thread only reads `data`."""
    future: Future[str] = Future()

    def run() -> None:
        try:
            future.set_result(data_fingerprint(data))
        except BaseException as e:  # noqa: BLE001 - raised where the fingerprint is asked for
            future.set_exception(e)

    threading.Thread(target=run, name="data fingerprint", daemon=True).start()
    return future


# ---------------------------------------------------------------------------------------------- saving

def best_model_checkpoint(saver: SaveThenRemove, model: torch.nn.Module, meta: RunMeta, trainer: Engine,
                          evaluator: Engine) -> Checkpoint:
    """The best model by validation top-1, for the evaluator's COMPLETED event (one file kept), written
    by the training checkpoints' saver (handlers/checkpoints.py says why)."""
    return _best_model_checkpoint(saver, {"model": model, "meta": BestModelMeta(meta, trainer, evaluator)}, trainer)


def attach_checkpoints(trainer: Engine, saver: SaveThenRemove, to_save: Mapping[str, Any], *, keep_last: int,
                       event: Events | EventsList, background: bool = False) -> Checkpoint:
    """The training checkpoints in the saver's folder, saved at `event` (written in the background if
    `background`), keeping the newest `keep_last` counted from the files on disk: after a resume the
    handler knows the files earlier processes wrote, and any beyond `keep_last` (left by an older
    version, say) go once this process has written a newer one."""
    handler = attach_training_checkpoint(trainer, saver, to_save, keep_last=keep_last, event=event,
                                         background=background)
    on_disk = training_checkpoints(saver.dirname)  # newest first
    kept, stale = on_disk[:keep_last], on_disk[keep_last:]
    handler.load_state_dict({"_saved": [(training_checkpoint_iteration(p.name), p.name) for p in reversed(kept)]})
    for p in stale:
        saver.remove(p.name)  # deleted after the next checkpoint is complete on disk
    return handler


# --------------------------------------------------------------------------------- loading and checking

def load_checkpoint(path: Path) -> dict[str, Any]:
    """torch.load on the CPU with weights_only=True: a checkpoint file can hold tensors and plain data,
    never code; and refused unread if it would expand beyond MAX_CHECKPOINT_BYTES in memory."""
    size = _expanded_size(path)
    if size > MAX_CHECKPOINT_BYTES:
        raise UserError(f"{path}: refused, it would take {size / 2**30:.1f} GiB in memory (a checkpoint of this "
                        f"application takes about 0.1 GiB; the limit is {MAX_CHECKPOINT_BYTES / 2**30:.0f} GiB)")
    try:
        with warnings.catch_warnings():  # torch's warnings about a file's pickle protocol: the line below says it
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint not found") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle, refused global: all "not loadable"
        raise UserError(f"{path}: not a loadable checkpoint ({_load_failure(e)})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path}: not a training checkpoint (found {type(ckpt).__name__})")
    return ckpt


def _load_failure(error: Exception) -> str:
    """Why torch.load refused a file, in a few words. Not torch's advice to load with weights_only=False,
    which would let the file run code: the refused object is named instead."""
    text = str(error).strip()
    if "Weights only load failed" in text:
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines() if "WeightsUnpickler error:" \
            in text else []
        what = detail[0].strip().split(". ")[0] if detail else "an object that is not a tensor or plain data"
        return f"it holds {what}; this application loads only tensors and plain data, never code"
    return text.splitlines()[0] if text else type(error).__name__


def _expanded_size(path: Path) -> int:
    """What loading would read into memory: a zip's (torch.save's format) entries uncompressed, as its
    directory declares them (a small file can declare gigabytes); otherwise the file's own size."""
    try:
        if not zipfile.is_zipfile(path):
            size = path.stat().st_size  # for a missing file: FileNotFoundError, named below
            raise UserError(f"{path}: not a checkpoint (not the zip archive torch.save writes; {size:,} bytes)")
        with zipfile.ZipFile(path) as z:
            return sum(info.file_size for info in z.infolist())
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint not found") from None
    except (OSError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a loadable checkpoint ({e})") from None


@dataclass(frozen=True)
class CheckpointMeta:
    """A checkpoint's `meta`, decoded and checked: the config it was trained with, its class names and
    the fingerprint of its data; for a best model, its epoch, iteration and validation metrics (None for a
    training checkpoint, whose trainer state says where it is, and for an older version's best model)."""

    config: Config
    classes: list[str]
    data: str
    epoch: Optional[int] = None
    iteration: Optional[int] = None
    metrics: Optional[dict[str, float]] = None


def _raw_meta(path: Path, ckpt: Mapping[str, Any]) -> dict[str, str]:
    meta = ckpt.get("meta")
    if not (isinstance(meta, dict) and all(isinstance(meta.get(k), str) for k in ("config", "classes", "data"))):
        raise UserError(f"{path}: damaged meta (config, classes and data expected)")
    return meta


def read_meta(path: Path, ckpt: Mapping[str, Any]) -> CheckpointMeta:
    """The checkpoint's meta, or a UserError naming the file (exit 1: a bad file, not a bad config)."""
    meta = _raw_meta(path, ckpt)
    try:
        cfg = config_from_dict(json.loads(meta["config"]), f"{path} (meta.config)")
        classes = json.loads(meta["classes"])
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: damaged meta ({e})") from None
    except ConfigError as e:
        raise UserError(str(e)) from None
    if not (isinstance(classes, list) and len(classes) == cfg.model.num_classes
            and all(isinstance(c, str) for c in classes)):
        raise UserError(f"{path}: damaged meta (classes: {cfg.model.num_classes} names expected)")
    if "metrics" not in meta:
        return CheckpointMeta(cfg, classes, meta["data"])
    try:
        metrics = json.loads(meta["metrics"]) if isinstance(meta["metrics"], str) else None
    except json.JSONDecodeError:
        metrics = None
    epoch, iteration = meta.get("epoch"), meta.get("iteration")
    if not (isinstance(metrics, dict) and all(isinstance(v, (int, float)) for v in metrics.values())
            and isinstance(epoch, int) and isinstance(iteration, int)):
        raise UserError(f"{path}: damaged meta (epoch, iteration and metrics of the best model expected)")
    return CheckpointMeta(cfg, classes, meta["data"], epoch, iteration, metrics)


Weights = Literal["model", "ema"]  # the raw model's weights or their EMA's, as ema.select_best names them


def weights_held(ckpt: Mapping[str, Any], meta: CheckpointMeta) -> Weights:
    """Whose weights a checkpoint's "model" is, for a report to say what it evaluated: a training
    checkpoint's are the raw model's (its EMA's lie beside them, under "ema"); a best model holds one set,
    that of the evaluation its run chose the best by (`ema.select_best` in its meta's config; an older
    version's config has no EMA, and the default is "model")."""
    return "model" if "trainer" in ckpt else meta.config.ema.select_best


def model_state(path: Path, ckpt: Mapping[str, Any], meta: CheckpointMeta, ema: bool = False
                ) -> tuple[Mapping[str, Any], Weights]:
    """The one place that says which state dict is the model: the checkpoint's "model" or, with `ema`,
    the weights' EMA that a training checkpoint of a run with `ema.decay` holds (app/ema.py's state_dict),
    and whose weights they are. A checkpoint without an EMA is refused with `--ema`, the flag that asked
    for it, named (exit 2): what the file holds is fine, what was asked of it is not."""
    if not ema:
        return ckpt["model"], weights_held(ckpt, meta)
    state = ckpt.get("ema")
    if state is None:
        raise ConfigError(f"{path}: --ema: {_without_ema(ckpt, meta)}")
    if not (isinstance(state, dict) and isinstance(state.get("model"), dict)):
        raise UserError(f"{path}: damaged EMA weights (a state dict expected under ema.model)")
    return state["model"], "ema"


def _without_ema(ckpt: Mapping[str, Any], meta: CheckpointMeta) -> str:
    """Why a checkpoint has no EMA weights, and what it holds instead, as its meta's config tells."""
    ema = meta.config.ema
    if "trainer" in ckpt:
        return "this training checkpoint holds no EMA weights" + ("" if ema.decay else
                                                                  " (its run had no EMA: ema.decay off)")
    if not ema.decay:
        return "a best model holds no EMA weights, and this one's run had no EMA (ema.decay off)"
    held = weights_held(ckpt, meta)
    if held == "ema":
        return f"a best model holds one set of weights, here the EMA's (ema.select_best \"{held}\"): evaluate it " \
               f"without --ema"
    return f"a best model holds one set of weights, here the raw model's (ema.select_best \"{held}\"): for the " \
           f"EMA's, evaluate a training checkpoint of its run with --ema"


def model_from_checkpoint(path: Path, ckpt: Mapping[str, Any], device: torch.device, ema: bool = False
                          ) -> tuple[torch.nn.Module, CheckpointMeta, Weights]:
    """The model of a best-model or training checkpoint (with `ema`, the weights' EMA a training
    checkpoint holds), in eval mode on `device`, its meta, and whose weights it has (`model_state`)."""
    if "model" not in ckpt or "meta" not in ckpt:
        raise UserError(f"{path}: not a checkpoint of this application (no model or meta)")
    meta = read_meta(path, ckpt)
    state, weights = model_state(path, ckpt, meta, ema)
    model = build_model(meta.config.model.name, meta.config.model.num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        what = "EMA weights" if ema else "model weights"
        raise UserError(f"{path}: {what} do not fit ResNet18 ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), meta, weights


def position(ckpt: Mapping[str, Any], meta: CheckpointMeta) -> tuple[Optional[int], Optional[int]]:
    """(epochs completed, iteration) where a checkpoint stands in its run: a training checkpoint's
    trainer state, or a best model's meta; None where neither says (an older version's best model)."""
    if meta.epoch is not None:
        return meta.epoch, meta.iteration
    trainer = ckpt.get("trainer")
    if not (isinstance(trainer, dict) and isinstance(trainer.get("iteration"), int)
            and isinstance(trainer.get("epoch_length"), int) and trainer["epoch_length"] > 0):
        return None, None
    return trainer["iteration"] // trainer["epoch_length"], trainer["iteration"]


def expected_model_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model `cfg.model` describes, with its shape (built without memory)."""
    with torch.device("meta"):
        model = build_model(cfg.model.name, cfg.model.num_classes)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


@dataclass(frozen=True)
class TrainingCheckpoint:
    """A training checkpoint checked to fit a run: its file, the trainer's position in it, the
    fingerprint of the data it was trained on, and its contents as the check loaded them, until `take`
    hands them over: a process that both checks and trains loads the file once, and does not keep a
    second copy while it trains. Spawned processes get it `without_contents` and load it themselves.
    (Its config is kept as the meta holds it: on a resume the running config is checked against it,
    and then decides.)"""

    path: Path
    iteration: int
    epoch_length: int
    data_fingerprint: str
    config: Optional[dict[str, Any]]  # the config it was trained with, as its meta holds it (None: unreadable)
    loaded: list[dict[str, Any]] = dataclasses.field(default_factory=list, repr=False, compare=False)

    def take(self) -> dict[str, Any]:
        """The contents: those the check loaded (handed over, not kept here), else loaded now."""
        return self.loaded.pop() if self.loaded else load_checkpoint(self.path)

    def without_contents(self) -> TrainingCheckpoint:
        return dataclasses.replace(self, loaded=[])


def check_training_checkpoint(path: Path, shapes: Mapping[str, tuple[int, ...]]) -> TrainingCheckpoint:
    """A loadable training checkpoint of this run: every part a resume needs, the model's tensors in
    `shapes` (`expected_model_shapes`), the trainer's position and the run's meta as written."""
    ckpt = load_checkpoint(path)
    missing = [k for k in TRAINING_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"{path}: not a training checkpoint (missing {', '.join(missing)})")
    model = ckpt["model"]
    found = {k: tuple(v.shape) for k, v in model.items() if isinstance(v, torch.Tensor)} \
        if isinstance(model, dict) else {}
    if found != dict(shapes):
        wrong = sorted(set(found) ^ set(shapes)) or sorted(k for k in shapes if found[k] != shapes[k])
        raise UserError(f"{path}: not a checkpoint of this run's model ({len(wrong)} tensors differ, e.g. "
                        f"{wrong[0]})")
    trainer = ckpt["trainer"]
    if not (isinstance(trainer, dict) and all(isinstance(trainer.get(k), int) and trainer[k] >= 0
                                              for k in ("iteration", "epoch_length"))):
        raise UserError(f"{path}: damaged trainer state (iteration and epoch_length expected)")
    meta = _raw_meta(path, ckpt)
    try:
        config = json.loads(meta["config"])
    except json.JSONDecodeError:
        config = None
    return TrainingCheckpoint(path, trainer["iteration"], trainer["epoch_length"], meta["data"],
                              config if isinstance(config, dict) else None, [ckpt])
