"""`python -m app sweep`: seeds x grid points as ordinary run folders, run K at a time, a table of
mean and spread that matches the runs' own results, each run's state read from its results.json,
failures reported, a killed, moved or stopped (SIGHUP, taken as SIGTERM) sweep resumed where it is without
training anything twice, a stop during creation leaving nothing, SLURM arrays within MaxArraySize,
and bad input refused before anything is created."""
from __future__ import annotations

import io
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from app.cli import main
from app.config import load_config, override
from app.hparams import hparams
from app.sweep.plan import load_plan, make_plan, parse_grid, run_config
from app.runs import lock_run_dir
from app.sweep.runner import Active, Board, Slot, SweepRunner, device_slots, lock_sweep
from app.sweep.status import RunState, end_record, read_results, run_state, run_status
from bench.packing import sweep_throughput
from tests.support import ROOT, app_env, one_error_line, run_app, start_app, write_cifar100, write_config

EPOCHS = 2  # of 2 iterations each: 64 training images in batches of 32


@pytest.fixture(scope="module")
def sweep_setup(tmp_path_factory) -> tuple[Path, Path]:
    """A config for tiny runs (64 training and 20 test images, 2 epochs) and an output folder."""
    tmp = tmp_path_factory.mktemp("sweep")
    data = write_cifar100(tmp / "data", 64, 20)
    cfg = write_config(tmp / "tiny.json", data={"root": str(data), "download": False},
                       train={"epochs": EPOCHS, "batch_size": 32})
    return cfg, tmp / "runs"


def _sweep(*args: str) -> subprocess.CompletedProcess:
    return run_app("sweep", "--devices", "cpu", *args, env=app_env(OMP_NUM_THREADS=""))


DIVERGES = "lr1e+30"  # lr 1e30: the training loss becomes NaN


@pytest.fixture(scope="module")
def grid_sweep(sweep_setup):
    """2 seeds x 3 learning rates, 2 runs at a time; the runs of the largest learning rate diverge."""
    cfg, out = sweep_setup
    start = time.monotonic()
    result = _sweep("--config", str(cfg), "--output-dir", str(out), "--name", "grid", "--seeds", "0,1",
                    "--grid", "optimizer.lr=0.05,0.1,1e30", "--per-device", "2")
    return out / "grid", result, time.monotonic() - start


@pytest.mark.slow
def test_a_grid_of_seeds_gives_one_ordinary_run_folder_per_combination(grid_sweep) -> None:
    sweep_dir, result, _ = grid_sweep
    names = {f"{lr}-seed{s}" for lr in ("lr0.05", "lr0.1", DIVERGES) for s in (0, 1)}
    assert {p.name for p in sweep_dir.iterdir() if (p / "config.json").is_file()} == names
    for lr in (0.05, 0.1):
        for seed in (0, 1):
            run_dir = sweep_dir / f"lr{lr}-seed{seed}"
            saved = json.loads((run_dir / "config.json").read_text())
            assert (saved["optimizer"]["lr"], saved["seed"]) == (lr, seed)
            assert json.loads((run_dir / "results.json").read_text())["status"] == "finished"
            assert (run_dir / "checkpoints" / "best.pt").is_file()
            start = HParamsPluginData.FromString(_validation(run_dir).PluginTagToContent("hparams")[
                "_hparams_/session_start_info"]).session_start_info.hparams
            assert (start["lr"].number_value, start["seed"].string_value) == (lr, str(seed))
    plan = json.loads((sweep_dir / "sweep.json").read_text())
    assert plan["seeds"] == [0, 1] and plan["grid"] == {"optimizer.lr": [0.05, 0.1, 1e30]}


@pytest.mark.slow
def test_a_failing_run_is_reported_and_the_others_finish(grid_sweep) -> None:
    sweep_dir, result, _ = grid_sweep
    assert result.returncode == 1
    for seed in (0, 1):
        line = next(ln for ln in result.stdout.splitlines() if ln.startswith(f"{DIVERGES}-seed{seed}: failed"))
        assert line.startswith(f"{DIVERGES}-seed{seed}: failed (exit 3): ") and "training loss became " in line
    assert "4 of 6 runs finished, 2 failed" in result.stdout
    rows = {r["name"]: r for r in json.loads((sweep_dir / "summary.json").read_text())["runs"]}
    assert [n for n, r in rows.items() if r["status"] == "finished"] == [f"lr{lr}-seed{s}" for lr in (0.05, 0.1)
                                                                      for s in (0, 1)]
    bad = rows[f"{DIVERGES}-seed0"]
    assert bad["status"] == "failed" and bad["failure"]["exit_code"] == 3
    assert "training loss became " in bad["failure"]["error"]
    md = (sweep_dir / "summary.md").read_text()
    assert f"| {DIVERGES}-seed0 | failed (exit 3: " in md and "training loss became " in md
    assert "| optimizer.lr=1e+30 | 0/2 | – |" in md


def _validation(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tb" / "validation"))
    acc.Reload()
    return acc


@pytest.mark.slow
def test_the_summary_equals_what_the_runs_results_give(grid_sweep, capsys) -> None:
    sweep_dir, _, _ = grid_sweep
    summary = json.loads((sweep_dir / "summary.json").read_text())
    for point in summary["points"][:2]:  # the finished ones
        lr = point["point"]["optimizer.lr"]
        results = [json.loads((sweep_dir / f"lr{lr}-seed{s}" / "results.json").read_text()) for s in (0, 1)]
        assert (point["finished"], point["seeds"]) == (2, 2)
        for stat, values in {"final_top1": [r["final"]["top1"] for r in results],
                             "best_top1": [r["best"]["top1"] for r in results],
                             "final_top5": [r["final"]["top5"] for r in results],
                             "best_top5": [r["best"]["top5"] for r in results],
                             "wall_time_seconds": [r["wall_time_seconds"] for r in results]}.items():
            mean = sum(values) / 2
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (2 - 1))
            got = point[stat]
            assert got["mean"] == pytest.approx(mean, rel=1e-12, abs=1e-15), stat
            assert got["std"] == pytest.approx(std, rel=1e-12, abs=1e-15), stat
            assert (got["min"], got["max"]) == (min(values), max(values)), stat
        row = f"| optimizer.lr={json.dumps(lr)} | 2/2 | "
        assert row in (sweep_dir / "summary.md").read_text()
    assert main(["sweep", "--summary", str(sweep_dir)]) == 0
    assert capsys.readouterr().out == (sweep_dir / "summary.md").read_text()


@pytest.mark.slow
def test_a_full_disk_while_rewriting_the_table_is_one_line_and_keeps_the_old_table(grid_sweep) -> None:
    sweep_dir, _, _ = grid_sweep
    before = (sweep_dir / "summary.json").read_bytes()

    def small_files_only() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))

    result = run_app("sweep", "--summary", str(sweep_dir), preexec_fn=small_files_only, timeout=120)
    assert result.returncode == 1
    assert one_error_line(result.stderr).startswith(f"error: {sweep_dir / 'summary.json'}: cannot write")
    assert (sweep_dir / "summary.json").read_bytes() == before
    assert not [p for p in sweep_dir.iterdir() if p.name.startswith(".partial-")]


@pytest.mark.slow
def test_what_is_left_to_run_is_printed_and_the_throughput_measured(grid_sweep, capsys) -> None:
    sweep_dir, _, wall = grid_sweep
    assert main(["sweep", "--resume", str(sweep_dir), "--print-commands"]) == 0
    printed = capsys.readouterr()
    lines = printed.out.strip().splitlines()
    assert "2 of 6 runs to run" in printed.err
    assert [line.split("--config ")[1] for line in lines] == [
        f"{rel}/configs/{DIVERGES}-seed{s}.json --output-dir {rel} --resume {rel}/{DIVERGES}-seed{s}"
        for s in (0, 1) for rel in [os.path.relpath(sweep_dir, ROOT)]]  # the failed ones, from their folders
    figures = sweep_throughput(sweep_dir, wall, 64)  # bench/packing.py's figures for one K
    steady = figures["per_run_steady_images_per_second"]
    assert figures["finished"] == 4 and len(steady) == 6 and all(v > 0 for v in steady[:4])  # the finished
    assert figures["sweep_images_per_second"] == pytest.approx(4 * 64 * EPOCHS / wall, rel=0.01)  # finished


def _fresh_starts(log: Path) -> int:
    return log.read_text().count(": ResNet18 with")


@pytest.mark.slow
def test_a_killed_sweep_moved_elsewhere_resumes_there_and_trains_nothing_twice(sweep_setup, tmp_path: Path,
                                                                               capsys) -> None:
    """Made in one folder with relative paths (data.root "data", output "runs"), SIGKILLed, moved (mv) to
    another with one run finished, one stopped and one not started, resumed from a third and stopped
    there by SIGHUP (the terminal closed), then resumed again: every run trains in the new place."""
    cfg, out = sweep_setup
    home = cfg.parent  # holds data/
    # Checkpoints written before training goes on, so that "epoch 1's checkpoint is there" is a moment
    # when the run still has epoch 2 to train, and a signal then finds it training.
    relative = write_config(home / "relative.json", data={"root": "data", "download": False},
                            train={"epochs": EPOCHS, "batch_size": 32}, checkpoint={"background_write": False})
    first_place = home / "runs" / "killed"
    env = app_env()
    proc = start_app("sweep", "--config", relative.name, "--output-dir", "runs", "--name", "killed", "--seeds", "0-2",
                     "--devices", "cpu", cwd=home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    epoch_one = first_place / "seed1" / "checkpoints" / "training_checkpoint_2.pt"
    deadline = time.monotonic() + 120
    while not epoch_one.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # nothing passed on: the run learns of it from the kernel
    proc.wait()
    assert epoch_one.exists()
    while run_status(first_place / "seed1") == "running" and time.monotonic() < deadline:
        time.sleep(0.1)  # the run stops gracefully, on the SIGTERM the kernel sent it
    assert read_results(first_place / "seed1")["status"] == "interrupted"
    assert not (first_place / "seed2").exists()

    sweep_dir = tmp_path / "elsewhere" / "moved"
    sweep_dir.parent.mkdir()
    shutil.move(first_place, sweep_dir)
    finished_before = (sweep_dir / "seed0" / "results.json").read_bytes()
    rel = os.path.relpath(sweep_dir, home)  # from the folder the runs' paths start in

    assert main(["sweep", "--resume", str(sweep_dir), "--print-commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"cd {home} && python -m app --config {rel}/configs/seed1.json --output-dir {rel} "
                     f"--resume {rel}/seed1",
                     f"cd {home} && python -m app --config {rel}/configs/seed2.json --output-dir {rel}"]
    script = (sweep_dir / "slurm.sh").read_text()  # written again, for the new place
    assert f"sweep_dir={rel}\n" in script and f"--output={sweep_dir}/logs/" in script
    assert str(first_place) not in script
    # Task 0 of the SLURM job array, run here: its run is finished, so it ends at once.
    task = subprocess.run(["bash", str(sweep_dir / "slurm.sh")], env={**env, "SLURM_ARRAY_TASK_ID": "0",
                                                                        "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=300)
    assert task.returncode == 0 and "seed0 is finished (2 epochs); nothing to do" in task.stdout, task.stderr

    # Resumed, and SIGHUP during seed2 (a new run, so made in the new place): taken as SIGTERM, which the
    # runs are sent; seed2 saves, the table is rewritten, and the sweep says how to continue.
    stopped = start_app("sweep", "--resume", str(sweep_dir), "--devices", "cpu", stderr=None)
    seed2_epoch_one = sweep_dir / "seed2" / "checkpoints" / "training_checkpoint_2.pt"
    while not seed2_epoch_one.exists() and stopped.poll() is None and time.monotonic() < deadline + 120:
        time.sleep(0.05)
    stopped.send_signal(signal.SIGHUP)
    out_text = stopped.communicate(timeout=120)[0]
    assert stopped.returncode == 128 + signal.SIGHUP, out_text
    assert "seed0: finished earlier" in out_text and "seed1: done" in out_text
    assert "seed2: stopped by SIGTERM, with a checkpoint" in out_text
    assert f"stopped by SIGHUP: continue with python -m app sweep --resume {sweep_dir}" in out_text
    assert read_results(sweep_dir / "seed2")["status"] == "interrupted"
    counts = json.loads((sweep_dir / "summary.json").read_text())["counts"]
    assert (counts["finished"], counts["stopped"]) == (2, 1)

    resumed = _sweep("--resume", str(sweep_dir))
    assert resumed.returncode == 0, resumed.stdout
    assert "seed1: finished earlier" in resumed.stdout and "seed2: done" in resumed.stdout
    assert "3 of 3 runs finished" in resumed.stdout
    assert (sweep_dir / "seed0" / "results.json").read_bytes() == finished_before
    for seed in range(3):
        run_dir = sweep_dir / f"seed{seed}"
        assert json.loads((run_dir / "results.json").read_text())["status"] == "finished"
        steps = [e.step for e in _validation(run_dir).Scalars("metrics/top1")]
        assert steps == [2, 4]  # every epoch evaluated once, on one timeline
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["counts"]["finished"] == 3 and summary["points"][0]["finished"] == 3
    assert [r["final_top1"] for r in summary["runs"]] == [read_results(sweep_dir / f"seed{s}")["final"]["top1"]
                                                         for s in range(3)]
    assert not first_place.exists()  # nothing trained in the old place
    assert _fresh_starts(sweep_dir / "logs" / "seed1.log") == 1
    assert "resuming" in (sweep_dir / "logs" / "seed1.log").read_text()
    assert _fresh_starts(sweep_dir / "logs" / "seed2.log") == 1
    assert "resuming" in (sweep_dir / "logs" / "seed2.log").read_text()


@pytest.mark.parametrize("flags,words", [
    (["--grid", "optimizer.lrr=0.1"], "--grid optimizer.lrr: unknown config key"),
    (["--grid", "optimizer=0.1"], "(a section; e.g. optimizer.name)"),
    (["--grid", "optimizer.lr=fast,0.1"], "--grid optimizer.lr=fast,0.1: optimizer.lr must be a finite number"),
    (["--grid", "train.batch_size=64,12.5"], "train.batch_size must be an integer"),
    (["--grid", "seed=1,2"], "--grid seed: not a grid key (use --seeds)"),
    (["--grid", "optimizer.lr=0.1,0.1"], "the value 0.1 is given twice"),
    (["--grid", "optimizer.lr=1,1.0"], "--grid optimizer.lr: 1 and 1.0 are one value"),
    (["--grid", "train.epochs=1,true"], "--grid train.epochs=1,true: train.epochs must be an integer, got true"),
    (["--grid", "augment.hflip=true,1"], "--grid augment.hflip=true,1: augment.hflip must be true or false, got 1"),
    (["--lr", "0.2", "--grid", "optimizer.lr=0.05,0.1"], "--lr 0.2: not with --grid optimizer.lr, which sets"),
    (["--set", "optimizer.lr=0.2", "--grid", "optimizer.lr=0.05,0.1"], "--set optimizer.lr: not with --grid "
                                                                       "optimizer.lr, which sets"),
    (["--set", "seed=3"], "--set seed: not for a sweep's runs (use --seeds)"),
    (["--set", "train.amp=fp64"], "--set train.amp: must be one of"),
    (["--epochs", "3", "--grid", "train.epochs=1,2"], "--epochs 3: not with --grid train.epochs"),
    (["--batch-size", "16", "--grid", "train.batch_size=32,64"], "--batch-size 16: not with --grid train.batch_size"),
    (["--data-root", "d", "--grid", "data.root=a,b"], "--data-root d: not with --grid data.root"),
    (["--grid", "optimizer.lr"], "expected KEY=V1,V2"),
    (["--seeds", ""], "--seeds: no seeds given"),
    (["--seeds", "3-1"], "is empty"),
    (["--seeds", "0,0"], "seed 0 is given twice"),
    (["--devices", "99"], "--devices 99: no GPU 99"),
    (["--per-device", "0"], "--per-device 0: must be >= 1"),
    (["--resume", "x", "--seeds", "1"], "not with --resume"),
    (["--print-commands", "--devices", "cpu"], "--devices: not with --print-commands"),
    (["--seeds", "0-4294967295"], "more than 10000 seeds"),
    (["--name", "my sweep"], "--name 'my sweep': use up to 100 letters"),
    (["--grid", "schedule.cycle_momentum=true,false", "--grid", "optimizer.momentum=0.9"],
     "run cycle_momentumtrue-momentum0.9-seed0: optimizer.momentum 0.9 would have no effect"),
])
def test_bad_input_is_one_line_and_exit_2_before_anything_is_created(sweep_setup, tmp_path: Path, capsys,
                                                                       flags, words) -> None:
    cfg, _ = sweep_setup
    out = tmp_path / "runs"
    code = main(["sweep", "--config", str(cfg), "--output-dir", str(out), "--name", "s", *flags])
    assert code == 2 and words in one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_grid_keys_that_only_fit_together_are_accepted(sweep_setup, tmp_path: Path) -> None:
    base = override(load_config(sweep_setup[0]), {"logging.output_dir": str(tmp_path / "runs")})
    grid = parse_grid(["schedule.cycle_momentum=false", "optimizer.momentum=0.8,0.9"], base)
    plan = make_plan(base, [0], grid, "fits")  # each run's whole config is valid: nothing refused
    configs = [run_config(base, plan, r) for r in plan.runs]
    assert [(c.schedule.cycle_momentum, c.optimizer.momentum) for c in configs] == [(False, 0.8), (False, 0.9)]
    assert {(c.distributed.nproc_per_node, c.distributed.backend) for c in configs} == {(1, None)}
    assert not (tmp_path / "runs").exists()  # planned, not created


def test_a_grid_over_the_data_set_gives_each_run_its_classes_and_normalisation(sweep_setup, tmp_path: Path) -> None:
    base = override(load_config(sweep_setup[0]), {"logging.output_dir": str(tmp_path / "runs")})
    grid = parse_grid(["data.dataset=cifar10,cifar100"], base)
    plan = make_plan(base, [0], grid, "datasets")
    assert [r.name for r in plan.runs] == ["datasetcifar10-seed0", "datasetcifar100-seed0"]
    configs = [run_config(base, plan, r) for r in plan.runs]
    assert [(c.model.num_classes, c.augment.mean) for c in configs] == [(10, (0.4914, 0.4822, 0.4465)),
                                                                       (100, (0.5071, 0.4865, 0.4409))]
    shown = hparams(configs[0], 1, torch.device("cpu"))
    assert shown["dataset"] == "cifar10" and "data.dataset" not in shown  # shown already, by its usual name


def test_a_grid_over_the_ema_decay_shows_it_in_every_runs_hparams(sweep_setup, tmp_path: Path) -> None:
    """ema.decay 0 is off: in a sweep that varies it, that run's HParams say 0, beside the others' decay."""
    base = override(load_config(sweep_setup[0]), {"logging.output_dir": str(tmp_path / "runs")})
    plan = make_plan(base, [0], parse_grid(["ema.decay=0,0.999"], base), "ema")
    configs = [run_config(base, plan, r) for r in plan.runs]
    assert [c.ema.decay for c in configs] == [0, 0.999]
    assert [hparams(c, 1, torch.device("cpu"))["ema_decay"] for c in configs] == [0.0, 0.999]


def test_a_path_that_is_not_a_sweep_folder_is_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "summary.md").write_text("# not a sweep")
    for path in (tmp_path / "summary.md", tmp_path / "absent"):
        assert main(["sweep", "--summary", str(path)]) == 1
        assert capsys.readouterr().err == f"error: {path}: not a sweep folder (no sweep.json)\n"
    assert main(["sweep", "--summary", str(tmp_path)]) == 1  # a folder, perhaps of ordinary runs
    assert capsys.readouterr().err == f"error: {tmp_path}: not a sweep folder (no sweep.json); to list the " \
                                      f"ordinary runs in it: python -m app runs {tmp_path}\n"


@pytest.fixture
def planned_sweep(sweep_setup, tmp_path: Path, capsys) -> Path:
    """A sweep of 2 seeds x 2 learning rates (and no rotation, by --set), created and handed to another
    scheduler: nothing trained."""
    cfg, _ = sweep_setup
    assert main(["sweep", "--config", str(cfg), "--output-dir", str(tmp_path / "runs"), "--name", "planned",
                 "--seeds", "0,1", "--grid", "optimizer.lr=0.05,0.1", "--set", "augment.rotation=0",
                 "--print-commands"]) == 0
    return tmp_path / "runs" / "planned"


def test_a_sweep_handed_to_another_scheduler_lists_every_run_and_its_table(planned_sweep, capsys) -> None:
    """--print-commands: one ordinary command per run, from the folder the sweep was made in, a SLURM
    script with one task per run, and a table where every run is still to start."""
    printed = capsys.readouterr()
    lines = printed.out.strip().splitlines()
    rel = os.path.relpath(planned_sweep, ROOT)
    assert lines == [f"cd {ROOT} && python -m app --config {rel}/configs/lr{lr}-seed{s}.json --output-dir {rel}"
                     for lr in (0.05, 0.1) for s in (0, 1)]
    assert "4 of 4 runs to run; as a SLURM job array: sbatch " in printed.err
    script = (planned_sweep / "slurm.sh").read_text()
    assert "#SBATCH --array=0-3" in script and "runs=(lr0.05-seed0 lr0.05-seed1 lr0.1-seed0 lr0.1-seed1)" in script
    assert os.access(planned_sweep / "slurm.sh", os.X_OK)
    configs = [json.loads(p.read_text()) for p in sorted((planned_sweep / "configs").glob("*.json"))]
    assert len(configs) == 4 and all(c["augment"]["rotation"] == 0 for c in configs)  # --set, for every run
    assert main(["sweep", "--summary", str(planned_sweep)]) == 0
    table = capsys.readouterr().out
    assert "4 runs: 4 not started" in table and "| optimizer.lr=0.05 | 0/2 | – |" in table
    assert read_results(planned_sweep / "lr0.1-seed1") is None and run_status(planned_sweep / "lr0.1-seed1") == \
        "not started"


def test_a_sweep_another_sweep_is_running_is_refused_with_exit_2(planned_sweep, capsys) -> None:
    capsys.readouterr()
    held = lock_sweep(load_plan(planned_sweep)[0])
    try:
        assert main(["sweep", "--resume", str(planned_sweep), "--devices", "cpu"]) == 2
    finally:
        held.release()
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {planned_sweep}: in use by pid {os.getpid()}")
    assert line.endswith("; another sweep is running these runs")


def test_a_sweep_shows_its_grid_keys_as_hyperparameters() -> None:
    cfg = override(load_config(ROOT / "config.json"), {"logging.hparams": ["augment.rotation", "optimizer.lr",
                                                                            "augment.mean"]})
    shown = hparams(cfg, 1, torch.device("cpu"))
    assert shown["augment.rotation"] == 15.0 and shown["augment.mean"] == "[0.5071, 0.4865, 0.4409]"
    assert "optimizer.lr" not in shown and shown["lr"] == 0.1  # shown already, by its usual name


def test_runs_are_spread_over_gpus_before_any_gpu_gets_a_second(monkeypatch) -> None:
    slots = device_slots("0,1", 2, gpu_count=2, cpu_count=16)
    assert [s.label for s in slots] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "1", "0", "1"]
    assert {s.device for s in slots} == {"cuda"}
    assert [s.label for s in device_slots(None, 1, gpu_count=3, cpu_count=16)] == ["cuda:0", "cuda:1", "cuda:2"]
    # Under CUDA_VISIBLE_DEVICES=2,3 (a SLURM allocation, say) the sweep's GPU 0 is the machine's GPU 2.
    picked = device_slots("0,1", 1, gpu_count=2, cpu_count=16, visible="2,3")
    assert [(s.label, s.env["CUDA_VISIBLE_DEVICES"]) for s in picked] == [("cuda:0", "2"), ("cuda:1", "3")]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpu = device_slots(None, 4, gpu_count=0, cpu_count=16)  # no GPU: the CPU, its cores shared
    assert [(s.device, s.env["OMP_NUM_THREADS"]) for s in cpu] == [("cpu", "4")] * 4


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_board_redraws_one_line_per_run_in_place() -> None:
    screen = _Terminal()
    board = Board(["a", "b"], screen)
    board.set("a", "running on cuda:0")
    board.set("b", "running on cuda:1")
    board.note("a note")
    board.set("a", "done")
    out = screen.getvalue()
    assert out.count("\x1b[2F") == 3  # back up over the 2 lines drawn before, each time
    last = out.rsplit("\x1b[2F", 1)[1]
    assert last == "\x1b[2Ka: done\n\x1b[2Kb: running on cuda:1\n"
    assert "a note\n" in out
    plain = io.StringIO()  # elsewhere: a line when a run's state changes, nothing redrawn
    board = Board(["a"], plain)
    board.set("a", "running")
    board.set("a", "running")
    board.set("a", "done")
    assert plain.getvalue() == "a: running\na: done\n"


def _write_results(run_dir: Path, status: str, **more) -> None:
    """A results.json as the app writes it (handlers/results.py), for a run in that state."""
    run_dir.mkdir(exist_ok=True)
    (run_dir / "config.json").write_text("{}")
    metrics = {"top1": 0.25, "top5": 0.5, "loss": 4.0, "epoch": 1}
    (run_dir / "results.json").write_text(json.dumps({"status": status, "best": metrics, "final": metrics,
                                                      "epochs": 1, "max_epochs": 2, "iterations": 2,
                                                      "wall_time_seconds": 1.5, **more}))


def test_a_runs_state_comes_from_its_results_json_then_its_lock_then_the_sweeps_record(planned_sweep) -> None:
    run_dir = planned_sweep / "lr0.05-seed0"
    assert run_state(run_dir) == RunState("not started")
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    assert run_state(run_dir) == RunState("stopped", "no results yet")  # nothing written yet
    no_results = end_record(run_dir, 2, "error: data/cifar-100-python: not found")  # failed before training
    assert run_state(run_dir, no_results) == RunState("failed", "error: data/cifar-100-python: not found", 2)
    _write_results(run_dir, "running")  # SIGKILLed in the middle: "running", and no live holder of its lock
    assert run_state(run_dir, no_results) == RunState("stopped", "killed")  # the record was of before: run since
    held = lock_run_dir(run_dir)
    try:
        assert run_state(run_dir) == RunState("running")
    finally:
        held.release()
    killed = end_record(run_dir, -signal.SIGKILL, "epoch 1/2  val top-1 25.00%  top-5 50.00%")
    assert run_state(run_dir, killed) == RunState("stopped", "killed by SIGKILL")  # not its last line
    _write_results(run_dir, "interrupted")
    assert end_record(run_dir, 128 + signal.SIGTERM, "interrupted by SIGTERM after iteration 2") is None
    assert run_state(run_dir) == RunState("stopped", "interrupted")
    _write_results(run_dir, "failed", error="training loss became nan at iteration 3")
    failed = end_record(run_dir, 3, "a line printed after the error")
    assert run_state(run_dir, failed) == RunState("failed", "training loss became nan at iteration 3", 3)
    assert run_state(run_dir) == RunState("failed", "training loss became nan at iteration 3")  # run elsewhere
    _write_results(run_dir, "finished")
    assert end_record(run_dir, -signal.SIGKILL, "") is None  # killed in its teardown: finished all the same
    assert run_state(run_dir, failed) == RunState("finished")


def _ended(runner: SweepRunner, name: str, results: dict | None, program: str) -> None:
    """The runner's end of a run whose process was `program` (Python code that ends as a run may), with
    the results.json it left (`results`: its status and fields; None: none)."""
    run = next(r for r in runner.plan.runs if r.name == name)
    if results is not None:
        _write_results(run.run_dir(runner.plan.sweep_dir), **results)
    log = runner.plan.sweep_dir / "logs" / f"{name}.log"
    with open(log, "ab") as f:
        proc = subprocess.Popen([sys.executable, "-c", program], stdout=f, stderr=subprocess.STDOUT)
    proc.wait()
    active = Active(run, Slot("cpu", "cpu", {}), proc, log, 0)
    runner.active.append(active)
    runner._ended(active)


def test_how_each_run_ended_is_told_from_its_results_json_then_its_exit(planned_sweep) -> None:
    """Real processes, ended as runs end, beside the results.json such a run leaves."""
    screen = io.StringIO()
    runner = SweepRunner(load_plan(planned_sweep)[0], [], stream=screen)
    epoch_line = "print('epoch 1/2  val top-1 25.00%  top-5 50.00%  loss 4.0000', flush=True)"
    kill = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    _ended(runner, "lr0.05-seed0", {"status": "finished"}, f"{epoch_line}; {kill}")  # in its teardown
    _ended(runner, "lr0.05-seed1", {"status": "running"}, f"{epoch_line}; {kill}")  # in its second epoch
    _ended(runner, "lr0.1-seed0", {"status": "failed", "error": "training loss became nan at iteration 3"},
           "print('error: training loss became nan at iteration 3'); print('teardown noise'); raise SystemExit(3)")
    _ended(runner, "lr0.1-seed1", None, "print('error: data/cifar-100-python: not found'); raise SystemExit(2)")
    board = screen.getvalue().splitlines()
    assert board[0].startswith("lr0.05-seed0: done, epoch 1/2, best top-1 25.00%, ") and \
        board[0].endswith(" (killed by SIGKILL after it finished)")
    assert board[1] == "lr0.05-seed1: killed by SIGKILL, epoch 1/2, best top-1 25.00%; it resumes from its last " \
                       "checkpoint"
    assert board[2].startswith("lr0.1-seed0: failed (exit 3): training loss became nan at iteration 3 [log: ")
    assert board[3].startswith("lr0.1-seed1: failed (exit 2): error: data/cifar-100-python: not found [log: ")
    assert runner.failed == ["lr0.1-seed0", "lr0.1-seed1"] and runner.stopped == ["lr0.05-seed1 (killed by SIGKILL)"]
    summary = json.loads((planned_sweep / "summary.json").read_text())
    assert summary["counts"] == {"finished": 1, "running": 0, "failed": 2, "stopped": 1, "not started": 0}
    md = (planned_sweep / "summary.md").read_text()
    assert "| lr0.05-seed1 | stopped (killed by SIGKILL) | 1/" in md
    assert "| lr0.1-seed0 | failed (exit 3: training loss became nan at iteration 3) |" in md


def test_a_board_whose_terminal_has_gone_stays_quiet() -> None:
    """A closed terminal (EIO on every write after the hang-up) ends the board's output, not the sweep."""
    controller, terminal = os.openpty()
    with open(terminal, "w") as stream:
        board = Board(["a"], stream)
        board.set("a", "running on cpu")
        os.close(controller)  # the terminal window closed
        board.set("a", "stopped by SIGTERM, with a checkpoint")
        board.note("stopped by SIGHUP: continue with python -m app sweep --resume runs/s")
        assert board.gone


@pytest.mark.slow
def test_a_stop_while_a_large_sweep_is_created_leaves_nothing_behind(sweep_setup, tmp_path: Path) -> None:
    """10,000 runs' files take seconds to write. A sweep SIGKILLed meanwhile leaves its hidden folder,
    which the next sweep created there removes (no live process holds it); that one, sent SIGTERM while
    it writes its own, removes its own and ends with one line and exit 143."""
    cfg, _ = sweep_setup
    out = tmp_path / "runs"

    def start_and_signal(name: str, signum: int) -> tuple[int, str]:
        proc = start_app("sweep", "--config", str(cfg), "--output-dir", str(out), "--name", name,
                         "--seeds", "0-9999", "--print-commands")
        deadline = time.monotonic() + 120
        while proc.poll() is None and not any(out.glob(f".partial-{name}-*/configs/seed1.json")):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signum)
        return proc.wait(timeout=120), proc.communicate()[1]

    assert start_and_signal("first", signal.SIGKILL)[0] == -signal.SIGKILL
    [left] = out.iterdir()
    assert left.name.startswith(".partial-first-")
    code, err = start_and_signal("second", signal.SIGTERM)
    assert code == 128 + signal.SIGTERM and "Traceback" not in err
    assert err.splitlines() == [f"removed {left}: a sweep folder left half-created by a process that was killed",
                                f"error: {out / 'second'}: not created, stopped by SIGTERM while its files were "
                                f"being written"]
    assert list(out.iterdir()) == []


def test_a_half_created_sweep_is_removed_only_when_no_live_process_holds_it(sweep_setup, tmp_path: Path,
                                                                           capsys) -> None:
    cfg, _ = sweep_setup
    out = tmp_path / "runs"
    abandoned, assembling, a_run = out / ".partial-old-x1", out / ".partial-live-x2", out / ".partial-r-x3"
    for folder in (abandoned / "configs", assembling / "configs", a_run / "checkpoints"):
        folder.mkdir(parents=True)
    (abandoned / ".lock").write_text("{}")  # its holder is gone
    (a_run / "config.json").write_text("{}")  # a run folder being created (app/runs.py), not a sweep's
    held = lock_run_dir(assembling)
    try:
        assert main(["sweep", "--config", str(cfg), "--output-dir", str(out), "--name", "new", "--print-commands"]) == 0
    finally:
        held.release()
    assert f"removed {abandoned}: a sweep folder left half-created by a process that was killed\n" in \
        capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted([a_run.name, assembling.name, "new"])


@pytest.mark.slow
def test_a_sweep_of_2500_runs_is_three_slurm_arrays_each_within_max_array_size(sweep_setup, tmp_path: Path,
                                                                               capsys) -> None:
    """SLURM's default MaxArraySize is 1001 (indices 0-1000): 1000 tasks per array, with an OFFSET each."""
    cfg, _ = sweep_setup
    assert main(["sweep", "--config", str(cfg), "--output-dir", str(tmp_path), "--name", "big", "--seeds", "0-2499",
                 "--print-commands"]) == 0
    err = capsys.readouterr().err
    sweep_dir = tmp_path / "big"
    script_file = sweep_dir / "slurm.sh"
    submit = [f"sbatch --export=ALL,OFFSET=0 {script_file}", f"sbatch --export=ALL,OFFSET=1000 {script_file}",
              f"sbatch --array=0-499 --export=ALL,OFFSET=2000 {script_file}"]
    assert f"2500 of 2500 runs to run; as 3 SLURM job arrays (at most 1000 tasks each: SLURM's default " \
           f"MaxArraySize is 1001): {'; '.join(submit)}; the table: " in err
    script = script_file.read_text()
    assert "#SBATCH --array=0-999\n" in script and "--array=0-2499" not in script
    assert "MaxArraySize" in script and "".join(f"#   {line}\n" for line in submit) in script

    def task(offset: int, index: int) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(script_file)], env={**app_env(), "OFFSET": str(offset),
                                                                "SLURM_ARRAY_TASK_ID": str(index),
                                                                "PYTHON": sys.executable},
                              capture_output=True, text=True, timeout=300)

    # The last task of the last array, run here by hand: run 2499, which this process holds, so the app
    # refuses it at once, naming it.
    (sweep_dir / "seed2499").mkdir()
    held = lock_run_dir(sweep_dir / "seed2499")
    try:
        last = task(2000, 499)
    finally:
        held.release()
    assert last.returncode == 2 and f"seed2499: in use by pid {os.getpid()}" in one_error_line(last.stderr)
    beyond = task(2000, 500)
    assert beyond.returncode == 2
    assert one_error_line(beyond.stderr).endswith("= 2500: the sweep has runs 0-2499")
