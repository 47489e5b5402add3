"""The run's settings: one typed, validated object loaded once from JSON and the command line.

Every setting of the recipe lives in `config.json`; the loader refuses unknown keys, wrong types and
out-of-range values with a message that names the file and the key, so that a typo can never silently
fall back to a default. The schema and each setting's range are here; how JSON values are taken into
typed fields is app/typed_json.py.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from app import typed_json
from app.datasets import DATASETS, DataSetName
from app.errors import ConfigError, SettingError


def _positive(v: Any) -> Optional[str]:
    return None if v > 0 else "must be > 0"


def _non_negative(v: Any) -> Optional[str]:
    return None if v >= 0 else "must be >= 0"


def _unit_open(v: Any) -> Optional[str]:
    return None if 0 < v < 1 else "must be between 0 and 1 (exclusive)"


def _unit_closed(v: Any) -> Optional[str]:
    return None if 0 <= v <= 1 else "must be between 0 and 1"


def _unit_half_open(v: Any) -> Optional[str]:
    return None if 0 <= v < 1 else "must be at least 0 and below 1"


def _decay_or_off(v: Any) -> Optional[str]:
    return None if 0 <= v < 1 else "must be from 0 to below 1 (0 or null: off)"


IMAGE_SIDE = 32  # CIFAR-10's and CIFAR-100's images are 32 x 32


def _cutout_side(v: Any) -> Optional[str]:
    return None if 0 <= v <= IMAGE_SIDE else f"must be from 0 (off) to {IMAGE_SIDE}, the image's side"


def _seed_range(v: Any) -> Optional[str]:
    # torch generators take seeds below 2**64; training derives seed * 1_000_003 + epoch (app/loader.py)
    # and seed * 7919 + rank (app/training.py), which stay far below that for any seed below 2**32.
    return None if 0 <= v < 2**32 else f"must be from 0 to {2**32 - 1} (2**32 - 1)"


# Normalisation works on pixels scaled to [0, 1]: a mean outside [0, 1] or a std above 1 is a value in
# other units (0..255, say), which would train silently on badly scaled inputs; a std of 0 divides by 0.
def _pixel_means(v: Any) -> Optional[str]:
    return None if all(0 <= m <= 1 for m in v) else "entries must be between 0 and 1 (pixels scaled to [0, 1])"


def _pixel_stds(v: Any) -> Optional[str]:
    return None if all(0 < s <= 1 for s in v) else "entries must be above 0 and at most 1 (pixels scaled to [0, 1])"


TOP_K = 5  # the second accuracy every evaluation reports (top-5)


def _enough_classes(v: Any) -> Optional[str]:
    return None if v >= TOP_K else f"must be at least {TOP_K}: every evaluation reports top-{TOP_K} accuracy"


def _folder_name(v: Any) -> Optional[str]:
    # The run's folder under logging.output_dir, never a path that leads elsewhere.
    if v in ("", ".", "..") or "/" in v or "\\" in v or "\0" in v:
        return "must be one folder name (no '/', not '.' or '..'): the run's folder inside logging.output_dir"
    return None


def _check(fn) -> Any:
    return {"check": fn}


CIFAR100_MEAN = DATASETS["cifar100"].mean  # of the training images' pixels in [0, 1], per channel
CIFAR100_STD = DATASETS["cifar100"].std


@dataclass(frozen=True)
class DataConfig:
    dataset: DataSetName = "cifar100"  # which data set, and with it the defaults that follow it (app/datasets.py)
    root: str = "data"
    download: bool = True


@dataclass(frozen=True)
class ModelConfig:
    name: Literal["resnet18"] = "resnet18"
    # None (null in a file): the data set's, set by Config (`_follow_the_data_set`); any other value must be it.
    num_classes: Optional[int] = field(default=None, metadata=_check(_enough_classes))


@dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["sgd"] = "sgd"
    lr: float = field(default=0.1, metadata=_check(_positive))
    # Constant momentum, only with schedule.cycle_momentum false (while it cycles, the schedule's
    # base/max momentum are used, and a value here would do nothing: refused).
    momentum: Optional[float] = field(default=None, metadata=_check(_unit_closed))
    weight_decay: float = field(default=5e-4, metadata=_check(_non_negative))
    nesterov: bool = False


@dataclass(frozen=True)
class ScheduleConfig:
    name: Literal["onecycle"] = "onecycle"
    pct_start: float = field(default=0.3, metadata=_check(_unit_open))
    anneal_strategy: Literal["cos", "linear"] = "cos"
    div_factor: float = field(default=25.0, metadata=_check(_positive))
    final_div_factor: float = field(default=1e4, metadata=_check(_positive))
    # As torch's OneCycleLR: momentum moves from max_momentum down to base_momentum while the learning
    # rate rises to its peak, and back up as it anneals.
    cycle_momentum: bool = True
    base_momentum: float = field(default=0.85, metadata=_check(_unit_closed))
    max_momentum: float = field(default=0.95, metadata=_check(_unit_closed))


@dataclass(frozen=True)
class AugmentConfig:
    crop_padding: int = field(default=4, metadata=_check(_non_negative))
    hflip: bool = True
    rotation: float = field(default=15.0, metadata=_check(_non_negative))
    brightness: float = field(default=0.2, metadata=_check(_unit_closed))
    contrast: float = field(default=0.2, metadata=_check(_unit_closed))
    saturation: float = field(default=0.2, metadata=_check(_unit_closed))
    # None (null in a file): the data set's training mean and std, set by Config (`_follow_the_data_set`).
    mean: Optional[tuple[float, float, float]] = field(default=None, metadata=_check(_pixel_means))
    std: Optional[tuple[float, float, float]] = field(default=None, metadata=_check(_pixel_stds))
    # The side in pixels of one square per image set to 0 after normalisation (the mean colour), its centre
    # uniform over the image and the square clipped at the border (DeVries & Taylor 2017); 0: off.
    cutout: int = field(default=0, metadata=_check(_cutout_side))
    # Mixup and CutMix on whole batches in the training step (app/mixing.py), with timm's names and defaults:
    # lambda ~ Beta(alpha, alpha), an alpha of 0 turns one off (both 0: no mixing, no draws); mix_prob is the
    # chance a batch is mixed, mix_switch_prob the chance of CutMix rather than Mixup when both are on.
    mixup_alpha: float = field(default=0.0, metadata=_check(_non_negative))
    cutmix_alpha: float = field(default=0.0, metadata=_check(_non_negative))
    mix_prob: float = field(default=1.0, metadata=_check(_unit_closed))
    mix_switch_prob: float = field(default=0.5, metadata=_check(_unit_closed))


@dataclass(frozen=True)
class LossConfig:
    # The training loss only: F.cross_entropy's own label_smoothing (the target (1 - eps) * one-hot + eps / classes);
    # 1 would be a uniform target, nothing learnt. The evaluation loss stays plain cross-entropy, so that
    # validation losses compare across runs whatever their smoothing.
    label_smoothing: float = field(default=0.0, metadata=_check(_unit_half_open))


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = field(default=100, metadata=_check(_positive))
    batch_size: int = field(default=128, metadata=_check(_positive))
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    channels_last: bool = True
    # torch.compile of the model (app/compiling.py); on one GPU its step is replayed from the project's CUDA graphs.
    compile: bool = False
    cuda_graphs: bool = True
    # The optimizer's update compiled into fused kernels by torch.compile (app/optim.py), same math within rounding.
    fused_update: bool = False


@dataclass(frozen=True)
class EmaConfig:
    # An exponential moving average of the weights (app/ema.py), Ignite's EMAHandler's arithmetic with
    # momentum = 1 - decay; 0 or None (null): off, and the run is exactly what it is without this section.
    decay: Optional[float] = field(default=None, metadata=_check(_decay_or_off))
    # Ignite's warm-up: the decay moves linearly from warmup_decay (the first update) to decay over this many
    # updates; 0: none.
    warmup_iters: int = field(default=0, metadata=_check(_non_negative))
    warmup_decay: float = field(default=0.0, metadata=_check(_unit_half_open))
    # BatchNorm's running statistics as Ignite's handle_buffers: copied from the model, or averaged too.
    buffers: Literal["copy", "update"] = "copy"
    # Which evaluation picks the best-model checkpoint (and results.json's best and final).
    select_best: Literal["model", "ema"] = "model"


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = field(default=500, metadata=_check(_positive))


@dataclass(frozen=True)
class CheckpointConfig:
    keep_last: int = field(default=2, metadata=_check(_positive))
    every_iters: int = field(default=0, metadata=_check(_non_negative))
    background_write: bool = True


@dataclass(frozen=True)
class LoggingConfig:
    output_dir: str = "runs"
    run_name: Optional[str] = field(default=None, metadata=_check(_folder_name))
    log_every_iters: int = field(default=20, metadata=_check(_positive))
    # Each interval's losses read at the next interval's end (at a save or an epoch's end, at once), so that
    # reading them never waits for the device to drain its queue of steps, and TensorBoard's loss scalars
    # written by a thread of their own: the same values logged, the bar's and the lines' loss an interval
    # behind (handlers/loss_buffer.py, handlers/tensorboard.py). Off until measured on a GPU.
    read_losses_late: bool = False
    progress_bar: Literal["auto", "on", "off"] = "auto"
    # Without the bar (no terminal, or progress_bar off): a line every this many iterations; None: about one
    # a minute, so a CPU epoch is never long silent and a GPU epoch is one line (handlers/progress.py).
    progress_every_iters: Optional[int] = field(default=None, metadata=_check(_positive))
    # TensorBoard's confusion matrix image, most-confused table and per-class histogram every this many
    # epochs and at the last (rendering them takes time out of every epoch; the numbers are every epoch's).
    figures_every_epochs: int = field(default=1, metadata=_check(_positive))
    # Config keys shown in TensorBoard's HParams tab besides the usual ones (a sweep sets its grid keys).
    hparams: tuple[str, ...] = ()


@dataclass(frozen=True)
class DistributedConfig:
    backend: Optional[Literal["nccl", "gloo"]] = None
    nproc_per_node: int = field(default=1, metadata=_check(_positive))


@dataclass(frozen=True)
class Config:
    seed: int = field(default=0, metadata=_check(_seed_range))
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    augment: AugmentConfig = AugmentConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    ema: EmaConfig = EmaConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    distributed: DistributedConfig = DistributedConfig()

    def __post_init__(self) -> None:
        """The settings left to the data set take its values here, however the config is made (a file, the
        defaults, `override`): every Config holds them resolved, as --dry-run shows them and as a run saves
        them, and a CIFAR-100 run's saved config is what it was before the data set could be chosen."""
        for key, value in _follow_the_data_set(self.data.dataset).items():
            section, leaf = key.split(".")
            if getattr(getattr(self, section), leaf) is None:
                object.__setattr__(self, section, dataclasses.replace(getattr(self, section), **{leaf: value}))


def _follow_the_data_set(dataset: str) -> dict[str, Any]:
    """The settings whose default is the data set's, by dotted key, with the data set's values."""
    d = DATASETS[dataset]
    return {"model.num_classes": d.classes, "augment.mean": d.mean, "augment.std": d.std}


def _setting(value: Any, tp: Any, f: dataclasses.Field, key: str) -> Any:
    """`value` as the setting `key` of type `tp` takes it, within the range its field allows."""
    value = typed_json.coerce(value, tp, key)
    check = f.metadata.get("check")
    problem = check(value) if check and value is not None else None
    if problem:
        raise SettingError(key, f"{problem}, got {typed_json.show(value)}")
    return value


def check_setting(key: str, value: Any) -> None:
    """`value` has the type and range the setting `key` ("optimizer.lr") takes, or SettingError naming
    both; how it fits with the other settings is for `config_from_dict` to check."""
    _setting(value, *typed_json.field_of(Config, key), key)


def config_from_dict(raw: Any, source: str = "config") -> Config:
    """Validate a plain dict (as read from JSON) into a Config; `source` names it in errors."""
    cfg = typed_json.build(Config, raw, source, _setting)
    problem = _inconsistency(cfg)
    if problem:
        raise ConfigError(f"{source}: {problem}")
    return cfg


def _inconsistency(cfg: Config) -> Optional[str]:
    """Settings that are each valid but together would be ignored or refused by torch."""
    optimizer, schedule = cfg.optimizer, cfg.schedule
    classes = DATASETS[cfg.data.dataset].classes
    if cfg.model.num_classes != classes:
        return (f"model.num_classes {cfg.model.num_classes} does not fit data.dataset \"{cfg.data.dataset}\", which "
                f"has {classes} classes; set it to {classes}, or to null for the data set's")
    if schedule.cycle_momentum and optimizer.momentum is not None:
        return (f"optimizer.momentum {json.dumps(optimizer.momentum)} would have no effect: "
                f"schedule.cycle_momentum is true, so momentum cycles from schedule.max_momentum "
                f"{schedule.max_momentum} to schedule.base_momentum {schedule.base_momentum} and back; "
                f"set optimizer.momentum to null, or "
                f"schedule.cycle_momentum to false")
    if not schedule.cycle_momentum and optimizer.momentum is None:
        return "optimizer.momentum must be a number when schedule.cycle_momentum is false"
    if schedule.cycle_momentum and schedule.base_momentum > schedule.max_momentum:
        return (f"schedule.base_momentum {schedule.base_momentum} must not exceed schedule.max_momentum "
                f"{schedule.max_momentum}")
    if optimizer.nesterov and min(momentum_range(cfg)) <= 0:
        return "optimizer.nesterov needs a momentum above 0"
    ema = cfg.ema
    if not ema.decay and (ema.warmup_iters or ema.select_best == "ema"):
        what = "ema.warmup_iters" if ema.warmup_iters else 'ema.select_best "ema"'
        return f"{what} needs the EMA: set ema.decay (0.9999, say; 0 or null is off)"
    if ema.warmup_decay and not ema.warmup_iters:
        return f"ema.warmup_decay {ema.warmup_decay} would have no effect: ema.warmup_iters is 0"
    keys = setting_keys() if cfg.logging.hparams else []
    unknown = [k for k in cfg.logging.hparams if k not in keys]
    if unknown:
        return f"logging.hparams: unknown config key '{unknown[0]}'"
    return None


def flat_settings(cfg: Config) -> dict[str, Any]:
    """Every setting by its dotted key ("optimizer.lr"), tuples as lists (as in the JSON file)."""
    def flatten(d: dict[str, Any], prefix: str) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, dict):
                flat.update(flatten(v, f"{prefix}{k}."))
            else:
                flat[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
        return flat
    return flatten(to_dict(cfg), "")


def setting_keys() -> list[str]:
    """The dotted key of every setting."""
    return list(flat_settings(Config()))


def check_key(key: str, flag: str) -> None:
    """A ConfigError naming `flag KEY` unless KEY is a setting's dotted key (a section's name: one of its
    keys is suggested)."""
    keys = setting_keys()
    if key not in keys:
        inside = [k for k in keys if k.startswith(key + ".")]
        raise ConfigError(f"{flag} {key}: unknown config key" + (f" (a section; e.g. {inside[0]})" if inside else ""))


def momentum_range(cfg: Config) -> tuple[float, float]:
    """(lowest, highest) momentum the optimizer will use: the cycle's, or the constant twice."""
    if cfg.schedule.cycle_momentum:
        return cfg.schedule.base_momentum, cfg.schedule.max_momentum
    assert cfg.optimizer.momentum is not None  # checked by config_from_dict
    return cfg.optimizer.momentum, cfg.optimizer.momentum


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                          f"save the file as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    try:
        raw = typed_json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid JSON: nested too deeply to read") from None
    except ValueError:  # what json.loads raises for an integer longer than Python converts (4300 digits)
        raise ConfigError(f"{path}: invalid JSON: a number with too many digits") from None
    return config_from_dict(raw, str(path))


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def override(cfg: Config, updates: dict[str, Any], source: str = "command line") -> Config:
    """Return a copy of `cfg` with dotted keys replaced (e.g. {"train.epochs": 3}), re-validated. A setting
    that holds its data set's value (model.num_classes, augment.mean, augment.std) follows the data set: a
    new data.dataset (`--set`, a sweep's grid) brings its own, where a value of the user's own stays."""
    raw = to_dict(cfg)
    for key, value in _follow_the_data_set(cfg.data.dataset).items():
        section, leaf = key.split(".")
        if raw[section][leaf] == value:
            raw[section][leaf] = None
    for dotted, value in updates.items():
        section = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            section = section[p]
        section[leaf] = value
    return config_from_dict(raw, source)
