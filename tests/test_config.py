"""config.json is the recipe, and the loader rejects anything it does not understand."""
import json
from pathlib import Path

import pytest
import torch

from app.config import Config, config_from_dict, load_config, momentum_range, override, setting_keys, to_dict
from app.errors import ConfigError
from app.loader import ShardedBatches
from tests.support import ROOT


def test_config_json_is_the_recipe() -> None:
    cfg = load_config(ROOT / "config.json")
    assert cfg == Config()
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (0.1, 5e-4)
    # torch's OneCycleLR defaults, as the recipe uses them: momentum cycles 0.95 -> 0.85 -> 0.95, so no
    # constant momentum is set (it would do nothing)
    schedule = cfg.schedule
    assert (schedule.cycle_momentum, schedule.base_momentum, schedule.max_momentum, cfg.optimizer.momentum) == \
        (True, 0.85, 0.95, None)
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.schedule.name) == (128, 100, "onecycle")
    augment = cfg.augment
    assert (augment.crop_padding, augment.hflip, augment.rotation) == (4, True, 15)
    assert (augment.brightness, augment.contrast, augment.saturation) == (.2, .2, .2)
    assert augment.mean == (0.5071, 0.4865, 0.4409) and augment.std == (0.2673, 0.2564, 0.2762)
    assert (cfg.data.dataset, cfg.model.num_classes) == ("cifar100", 100)  # null in the file: the data set's


CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def test_the_class_count_and_the_normalisation_follow_the_data_set() -> None:
    """Resolved in the config itself: what --dry-run prints and a run saves are the values it trains with."""
    cifar10 = config_from_dict({"data": {"dataset": "cifar10"}})
    assert (cifar10.model.num_classes, cifar10.augment.mean, cifar10.augment.std) == (10, CIFAR10_MEAN, CIFAR10_STD)
    saved = to_dict(cifar10)
    assert (saved["model"]["num_classes"], saved["augment"]["mean"]) == (10, CIFAR10_MEAN)
    # --set data.dataset=cifar10 over the recipe (or a sweep's grid): the values that were CIFAR-100's become
    # CIFAR-10's; a normalisation of the user's own stays
    recipe = load_config(ROOT / "config.json")
    assert override(recipe, {"data.dataset": "cifar10"}) == cifar10
    assert override(cifar10, {"data.dataset": "cifar100"}) == recipe == Config()
    own = override(recipe, {"augment.mean": [0.5, 0.5, 0.5], "data.dataset": "cifar10"})
    assert (own.augment.mean, own.augment.std, own.model.num_classes) == ((0.5, 0.5, 0.5), CIFAR10_STD, 10)


def test_an_older_versions_saved_config_is_this_versions_cifar100_config() -> None:
    """Written before the data set could be chosen: no data.dataset, the class count and normalisation given."""
    old = to_dict(Config())
    del old["data"]["dataset"]
    old["model"]["num_classes"], old["augment"]["mean"] = 100, [0.5071, 0.4865, 0.4409]
    assert config_from_dict(old) == Config()


def test_config_json_lists_every_setting() -> None:
    """The recipe is the one place a person reads every setting: a key the schema gained is listed there too."""
    def keys(d: dict, prefix: str = "") -> list[str]:
        return [k for name, v in d.items()
                for k in (keys(v, f"{prefix}{name}.") if isinstance(v, dict) else [f"{prefix}{name}"])]

    assert keys(json.loads((ROOT / "config.json").read_text())) == setting_keys()


@pytest.mark.parametrize("raw,message", [
    ({"train": {"epochs": "ten"}}, "train.epochs must be an integer"),
    ({"train": {"epochs": 2.5}}, "train.epochs must be an integer"),
    ({"train": {"batch_size": 0}}, "train.batch_size must be > 0"),
    ({"optimizer": {"lr": -0.1}}, "optimizer.lr must be > 0"),
    ({"optimizer": {"momentum": 1.5}}, "optimizer.momentum must be between 0 and 1"),
    ({"data": {"download": "yes"}}, "data.download must be true or false"),
    ({"train": {"amp": "fp8"}}, 'train.amp must be one of "auto"'),
    ({"augment": {"mean": [0.5, 0.5]}}, "augment.mean must be a list of 3 numbers"),
    ({"loss": {"label_smoothing": 1}}, "loss.label_smoothing must be at least 0 and below 1, got 1"),
    ({"augment": {"cutout": 33}}, "augment.cutout must be from 0 (off) to 32, the image's side, got 33"),
    ({"augment": {"mixup_alpha": -1}}, "augment.mixup_alpha must be >= 0"),
    ({"augment": {"mix_prob": 1.5}}, "augment.mix_prob must be between 0 and 1"),
    ({"optimiser": {}}, "unknown key 'optimiser'"),
    ({"train": {"epoch": 3}}, "unknown key 'train.epoch'"),
    ({"train": 3}, "train must be an object"),
    ({"data": {"dataset": "mnist"}}, 'data.dataset must be one of "cifar100", "cifar10", got "mnist"'),
    ({"data": {"dataset": "cifar10"}, "model": {"num_classes": 100}},
     'model.num_classes 100 does not fit data.dataset "cifar10", which has 10 classes; set it to 10, or to null'),
    ({"model": {"num_classes": 10}}, 'model.num_classes 10 does not fit data.dataset "cifar100", which has 100'),
    ({"ema": {"decay": 1.0}}, "ema.decay must be from 0 to below 1 (0 or null: off), got 1.0"),
    ({"ema": {"decay": -0.5}}, "ema.decay must be from 0 to below 1"),
    ({"ema": {"buffers": "mean"}}, 'ema.buffers must be one of "copy", "update"'),
    ({"ema": {"decay": 0, "select_best": "ema"}}, 'ema.select_best "ema" needs the EMA: set ema.decay'),
    ({"ema": {"warmup_iters": 10}}, "ema.warmup_iters needs the EMA"),
    ({"ema": {"decay": 0.9, "warmup_decay": 0.5}}, "ema.warmup_decay 0.5 would have no effect"),
    ({"logging": {"read_losses_late": "yes"}}, "logging.read_losses_late must be true or false"),
])
def test_rejects_with_file_and_key(raw, message) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw, "my.json")
    assert str(e.value).startswith("my.json: ") and message in str(e.value)


@pytest.mark.parametrize("raw,message", [
    ({"optimizer": {"momentum": 0.9}},
     "optimizer.momentum 0.9 would have no effect: schedule.cycle_momentum is true"),
    ({"schedule": {"cycle_momentum": False}},
     "optimizer.momentum must be a number when schedule.cycle_momentum is false"),
    ({"schedule": {"base_momentum": 0.96}}, "schedule.base_momentum 0.96 must not exceed schedule.max_momentum"),
    ({"optimizer": {"nesterov": True, "momentum": 0.0}, "schedule": {"cycle_momentum": False}},
     "optimizer.nesterov needs a momentum above 0"),
])
def test_refuses_momentum_settings_that_would_do_nothing_or_cannot_work(raw, message) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw, "my.json")
    assert str(e.value).startswith("my.json: ") and message in str(e.value)


def test_constant_momentum_when_the_schedule_does_not_cycle_it() -> None:
    cfg = config_from_dict({"optimizer": {"momentum": 0.9}, "schedule": {"cycle_momentum": False}})
    assert momentum_range(cfg) == (0.9, 0.9)
    assert momentum_range(Config()) == (0.85, 0.95)


def test_partial_file_takes_defaults_and_overrides_revalidate(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"train": {"epochs": 3}}))
    cfg = load_config(path)
    assert cfg.train.epochs == 3 and cfg.train.batch_size == 128
    assert override(cfg, {"optimizer.lr": 0.05}).optimizer.lr == 0.05
    with pytest.raises(ConfigError, match="optimizer.lr must be > 0"):
        override(cfg, {"optimizer.lr": 0.0})
    assert config_from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("raw,message", [
    ({"augment": {"std": [0.2673, 0.0, 0.2762]}}, "augment.std entries must be above 0 and at most 1"),
    ({"augment": {"std": [0.2673, -0.2564, 0.2762]}}, "augment.std entries must be above 0 and at most 1"),
    ({"augment": {"std": [68.2, 65.4, 70.4]}}, "augment.std entries must be above 0 and at most 1"),
    ({"augment": {"mean": [129.3, 124.1, 112.4]}}, "augment.mean entries must be between 0 and 1"),
])
def test_refuses_normalisation_that_divides_by_zero_or_is_in_other_units(raw, message) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw, "my.json")
    assert str(e.value).startswith("my.json: ") and message in str(e.value)


@pytest.mark.parametrize("text,message", [
    ('{"optimizer": {"lr": NaN}}', "optimizer.lr must be a finite number, got NaN"),
    ('{"schedule": {"div_factor": Infinity}}', "schedule.div_factor must be a finite number, got Infinity"),
    ('{"augment": {"rotation": -Infinity}}', "augment.rotation must be a finite number, got -Infinity"),
    ('{"optimizer": {"weight_decay": 1e400}}', "optimizer.weight_decay must be a finite number, got Infinity"),
    ('{"augment": {"std": [0.2, NaN, 0.2]}}', "augment.std[1] must be a finite number, got NaN"),
    ('{"schedule": {"final_div_factor": 1' + "0" * 400 + "}}", "schedule.final_div_factor must be a finite number"),
], ids=["nan", "infinity", "minus-infinity", "overflow", "nan-in-list", "huge-integer"])
def test_refuses_numbers_that_are_not_finite(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)
    assert len(str(e.value)) < 200  # one readable line, however long the number in the file


def test_seed_stays_where_every_generator_seed_derived_from_it_is_valid() -> None:
    largest = 2**32 - 1
    cfg = config_from_dict({"seed": largest})
    images, labels = torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.arange(4)
    batches = ShardedBatches(images, labels, batch_size=2, shuffle=True, seed=cfg.seed)
    batches.set_epoch(10_000)
    assert len(list(batches)) == 2  # seeds its permutation with seed * 1_000_003 + epoch
    for seed in (2**32, 2**64):
        with pytest.raises(ConfigError, match=r"^my.json: seed must be from 0 to 4294967295 \(2\*\*32 - 1\)"):
            config_from_dict({"seed": seed}, "my.json")


@pytest.mark.parametrize("content,message", [
    (b'{"train": {"epochs": 3, "batch_size": 64, "epochs": 5}}', "duplicate key 'train.epochs'; keep only one"),
    (b'{"seed": 1, "train": {}, "seed": 2}', "duplicate key 'seed'"),
    ('{"logging": {"run_name": "caf\u00e9"}}'.encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 29)"),
    (b"[" * 100_000, "invalid JSON: nested too deeply"),
    (b'{"seed": ' + b"1" * 5000 + b"}", "invalid JSON: a number with too many digits"),
], ids=["duplicate", "duplicate-top-level", "latin-1", "deep", "long-number"])
def test_refuses_files_that_json_would_misread_or_fail_on(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "c.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)
