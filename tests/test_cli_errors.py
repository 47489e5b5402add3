"""Bad input ends in one clear line, a non-zero exit, no traceback, and nothing under the output folder.

Through main(), in this process: what is under test is what the command checks and says. Output into a
closed pipe is a property of the process, so those run as processes."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.cli import build_parser, config_from_flags
from tests.support import ROOT, Ran, app_env, one_error_line, run_main, write_cifar100, write_config


@pytest.fixture()
def out(tmp_path: Path) -> Path:
    return tmp_path / "runs"


def assert_clean_failure(ran: Ran, code: int, *words: str, out: Path) -> None:
    assert ran.returncode == code, ran.stderr
    line = one_error_line(ran.stderr)
    for w in words:
        assert w in line, line
    assert not out.exists() or not any(out.iterdir())


def test_invalid_json(tmp_path: Path, out: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"train": {"epochs": 3,}}')
    assert_clean_failure(run_main("--config", str(bad), "--output-dir", str(out)), 2, str(bad), "invalid JSON",
                         out=out)


def test_unknown_key(tmp_path: Path, out: Path) -> None:
    cfg = write_config(tmp_path / "c.json", train={"epochz": 3})
    assert_clean_failure(run_main("--config", str(cfg), "--output-dir", str(out)), 2, str(cfg),
                         "unknown key 'train.epochz'", out=out)


def test_wrong_type(tmp_path: Path, out: Path) -> None:
    cfg = write_config(tmp_path / "c.json", train={"batch_size": "128"})
    assert_clean_failure(run_main("--config", str(cfg), "--output-dir", str(out)), 2, str(cfg),
                         "train.batch_size must be an integer", out=out)


@pytest.mark.parametrize("flags,words", [
    (["--lr", "-0.1"], "--lr: must be > 0"),
    (["--batch-size", "0"], "--batch-size: must be > 0"),
    (["--epochs", "many"], "--epochs: invalid int value"),
    (["--backend", "mpi"], "--backend: invalid choice"),
    (["--batch-size", "127", "--nproc-per-node", "2"], "does not divide evenly over 2 processes"),
    (["--run-name", "../x"], "--run-name: must be one folder name"),
    (["--run-name", "/tmp/elsewhere"], "--run-name: must be one folder name"),
])
def test_bad_flag(tmp_path: Path, out: Path, small_data: Path, flags, words) -> None:
    cfg = write_config(tmp_path / "c.json", data={"root": str(small_data), "download": False})
    assert_clean_failure(run_main("--config", str(cfg), "--output-dir", str(out), *flags), 2, words, out=out)


def test_missing_config_file(tmp_path: Path, out: Path) -> None:
    missing = tmp_path / "nope.json"
    assert_clean_failure(run_main("--config", str(missing), "--output-dir", str(out)), 2, str(missing), "not found",
                         out=out)


def test_missing_data_with_download_off_fails_fast_and_says_how(tmp_path: Path, out: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = write_config(tmp_path / "c.json", data={"root": str(empty), "download": False})
    started = time.monotonic()
    ran = run_main("--config", str(cfg), "--output-dir", str(out))
    assert time.monotonic() - started < 30
    assert_clean_failure(ran, 1, str(empty / "cifar-100-python"), "cifar-100-python.tar.gz", out=out)


def test_bad_resume_path(tmp_path: Path, out: Path, small_data: Path) -> None:
    cfg = write_config(tmp_path / "c.json", data={"root": str(small_data), "download": False})
    nothing = tmp_path / "no_such_run"
    assert_clean_failure(run_main("--config", str(cfg), "--output-dir", str(out), "--resume", str(nothing)), 1,
                         str(nothing), out=out)
    assert_clean_failure(run_main("--config", str(cfg), "--output-dir", str(out), "--resume"), 1,
                         "no run to resume", out=out)


def test_help_documents_every_flag() -> None:
    ran = run_main("--help")
    assert ran.returncode == 0
    for flag in ("--config", "--lr", "--batch-size", "--epochs", "--resume", "--data-root", "--output-dir",
                 "--run-name", "--nproc-per-node", "--backend", "--seed", "--device", "--set"):
        assert flag in ran.stdout


@pytest.mark.parametrize("flags,words", [
    (["--lr", "nan"], "--lr: must be a finite number, got NaN"),
    (["--lr", "inf"], "--lr: must be a finite number, got Infinity"),
    (["--seed", str(2**32)], "--seed: must be from 0 to 4294967295"),
    # 80 images at batch 128: 1 iteration; OneCycleLR would divide by a warm-up of 0.3 of one
    (["--epochs", "1"], "schedule.pct_start 0.3 gives a warm-up of 0.3 of the run's 1 iterations (train.epochs 1 "
                        "of 1 iterations at train.batch_size 128)"),
])
def test_dry_run_refuses_flags_no_run_could_use(tmp_path: Path, out: Path, small_data: Path, flags, words) -> None:
    cfg = write_config(tmp_path / "c.json", data={"root": str(small_data), "download": False})
    assert_clean_failure(run_main("--config", str(cfg), "--output-dir", str(out), "--dry-run", *flags), 2, words,
                         out=out)


@pytest.mark.parametrize("edit,words", [
    (lambda text: text.replace('"lr": 0.1', '"lr": NaN'), "optimizer.lr must be a finite number, got NaN"),
    (lambda text: text.replace('"epochs": 100', '"epochs": 100, "epochs": 3'), "duplicate key 'train.epochs'"),
    (lambda text: text.replace('"run_name": null', '"run_name": "caf\u00e9"').encode("latin-1"), "not UTF-8 text"),
    (lambda text: "[" * 100_000, "nested too deeply"),
    (lambda text: text.replace('"num_classes": null', '"num_classes": 3'), "model.num_classes must be at least 5"),
], ids=["nan", "duplicate", "latin-1", "deep", "classes-below-top-5"])
def test_dry_run_refuses_config_files_no_run_could_use(tmp_path: Path, out: Path, small_data: Path, edit,
                                                       words) -> None:
    path = write_config(tmp_path / "c.json", data={"root": str(small_data), "download": False})
    content = edit(path.read_text())
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert_clean_failure(run_main("--config", str(path), "--output-dir", str(out), "--dry-run"), 2, str(path), words,
                         out=out)


def test_fp16_on_the_cpu_is_refused_before_anything_is_written(tmp_path: Path, out: Path, small_data: Path) -> None:
    cfg = write_config(tmp_path / "c.json", data={"root": str(small_data), "download": False}, train={"amp": "fp16"})
    assert_clean_failure(run_main("--config", str(cfg), "--output-dir", str(out), "--device", "cpu"), 2,
                         "train.amp: fp16 is for CUDA GPUs", out=out)


@pytest.mark.parametrize("split,labels,words", [
    ("train", lambda n: [], "holds no images"),
    ("test", lambda n: [0.5] * n, "found 0.5 at index 0"),
], ids=["no-images", "float-labels"])
def test_dry_run_refuses_data_no_run_could_use(tmp_path: Path, out: Path, split, labels, words) -> None:
    root = write_cifar100(tmp_path / "data", 8, 4)
    path = root / "cifar-100-python" / split
    d = pickle.loads(path.read_bytes())
    d["fine_labels"] = labels(len(d["fine_labels"]))
    d["data"] = d["data"][:len(d["fine_labels"])]
    path.write_bytes(pickle.dumps(d))
    cfg = write_config(tmp_path / "c.json", data={"root": str(root), "download": False})
    assert_clean_failure(run_main("--config", str(cfg), "--output-dir", str(out), "--dry-run"), 1, str(path), words,
                         out=out)


def run_into_closed_pipe(*args: str, buffered: bool = True) -> subprocess.CompletedProcess:
    """`python -m app ARGS | head -1` where head has already exited: stdout is a pipe nobody reads."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "app", *args], cwd=ROOT,
                              env=app_env(PYTHONUNBUFFERED="" if buffered else "1"), stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=600)
    finally:
        os.close(write_end)


@pytest.mark.slow
@pytest.mark.parametrize("args,buffered", [(["--help"], True), (["--dry-run"], True), (["--dry-run"], False)],
                         ids=["help", "dry-run", "dry-run-unbuffered"])
def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path, out: Path, small_data: Path, args, buffered) -> None:
    cfg = write_config(tmp_path / "c.json", data={"root": str(small_data), "download": False})
    result = run_into_closed_pipe("--config", str(cfg), "--output-dir", str(out), *args, buffered=buffered)
    assert result.returncode == 141 and result.stderr == ""


@pytest.mark.parametrize("settings,words", [
    (["--set", "train.amp=fp32"], "--set train.amp: must be one of"),
    (["--set", "augment.rotation=-1"], "--set augment.rotation: must be >= 0"),
    (["--set", "loss.label_smoothing=-0.1"], "--set loss.label_smoothing: must be at least 0 and below 1"),
    (["--set", "train.ampp=bf16"], "--set train.ampp: unknown config key"),
    (["--set", "train=1"], "--set train: unknown config key (a section; e.g. train.epochs)"),
    (["--set", "train.amp"], "--set train.amp: expected KEY=VALUE"),
    (["--set", "data.dataset=mnist"], '--set data.dataset: must be one of "cifar100", "cifar10", got "mnist"'),
    (["--lr", "0.2", "--set", "optimizer.lr=0.3"], "--set optimizer.lr: optimizer.lr is set twice on the command "
                                                   "line (also by --lr)"),
])
def test_a_bad_set_is_one_line_naming_it(tmp_path: Path, out: Path, small_data: Path, settings, words) -> None:
    cfg = write_config(tmp_path / "c.json", data={"root": str(small_data), "download": False})
    assert_clean_failure(run_main("--config", str(cfg), "--output-dir", str(out), "--dry-run", *settings), 2, words,
                         out=out)


def test_set_takes_any_setting_as_json_or_text_and_the_run_saves_it(tmp_path: Path) -> None:
    """--set train.amp=off (text), augment.rotation=0 (a number), augment.mean=[...] (a list), run_name null."""
    args = build_parser().parse_args(["--config", str(write_config(tmp_path / "c.json")), "--set", "train.amp=off",
                                      "--set", "augment.rotation=0", "--set", "augment.mean=[0.5, 0.5, 0.5]",
                                      "--set", "logging.run_name=null", "--epochs", "3"])
    cfg = config_from_flags(args)
    assert (cfg.train.amp, cfg.augment.rotation, cfg.augment.mean, cfg.logging.run_name, cfg.train.epochs) == \
        ("off", 0.0, (0.5, 0.5, 0.5), None, 3)


def test_a_dry_run_shows_what_set_resolved_to(tmp_path: Path, out: Path, small_data: Path) -> None:
    """The resolved config a run saves in its config.json, as the dry run prints it."""
    cfg = write_config(tmp_path / "c.json", data={"root": str(small_data), "download": False})
    ran = run_main("--config", str(cfg), "--output-dir", str(out), "--dry-run", "--set", "checkpoint.every_iters=7")
    assert ran.returncode == 0, ran.stderr
    assert '"every_iters": 7' in ran.stdout
