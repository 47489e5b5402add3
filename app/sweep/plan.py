"""A sweep's plan: which runs (seeds x grid points), their configs, and where they live.

A sweep is a folder of ordinary run folders: SWEEP/NAME is what `python -m app --config
SWEEP/configs/NAME.json` creates, so every run can be trained, resumed and evaluated on its own, by
the sweep's scheduler on this machine (runner.py) or by any other (cluster.py, `--print-commands`).
SWEEP/sweep.json holds the plan: the base config, the seeds, the grid, each run's name and settings,
and the folder the commands run from (paths in the configs are relative to it, as the user gave them).

Everything is checked before the folder exists: each grid key and value against the config, each
run's whole config; then the folder is assembled under a hidden name and renamed into place. A stop
signal during the assembly (thousands of files) removes the hidden folder before the process ends; one
that a killed process left (SIGKILL, a power cut) is removed by the next sweep created beside it, as
its lock shows that no live process is assembling it.

A sweep folder can be moved or copied: nothing in it depends on where it is. The runs' commands give
their folder from where the sweep is now (app/sweep/status.py `next_command`), the SLURM script is
rewritten whenever the sweep is resumed, and `workdir` (where the user's relative paths, such as
data.root, start) is the one absolute path, and stays right wherever the sweep folder goes.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from app import typed_json
from app.config import Config, check_key, check_setting, config_from_dict, override, to_dict
from app.errors import ConfigError, UserError
from app.runs import RunLock, check_writable, lock_run_dir, run_in_use
from handlers.atomic import umask, write_json_atomic

PLAN_FILE = "sweep.json"
STAGING_PREFIX = ".partial-"  # a sweep folder being assembled: .partial-NAME-XXXXXXXX, beside where it goes
MAX_RUNS = 10_000  # a bound that no results table reaches, and that keeps a typo from planning billions
NAME_PATTERN = r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,99}"  # safe in paths, shells and SLURM's #SBATCH lines
# Keys the sweep sets itself, or that belong to how a run is launched rather than what it computes.
NOT_A_GRID_KEY = {"seed": "use --seeds", "logging.output_dir": "runs go in the sweep's folder",
                  "logging.run_name": "the sweep names its runs", "logging.hparams": "the sweep sets it",
                  "train.device": "use --devices", "distributed.backend": "each run is one process",
                  "distributed.nproc_per_node": "each run is one process"}


@dataclass(frozen=True)
class PlannedRun:
    name: str
    seed: int
    point: dict[str, Any]  # the grid values of this run, by dotted key

    def config_file(self, sweep_dir: Path) -> Path:
        return sweep_dir / "configs" / f"{self.name}.json"

    def run_dir(self, sweep_dir: Path) -> Path:
        return sweep_dir / self.name


@dataclass(frozen=True)
class SweepPlan:
    sweep_dir: Path
    workdir: Path  # the folder the runs' commands run from
    seeds: list[int]
    grid: dict[str, list[Any]]
    runs: list[PlannedRun]

    def points(self) -> list[dict[str, Any]]:
        """The grid points, in the plan's order."""
        return grid_points(self.grid)


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the last key varying fastest; [{}] for no grid."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def parse_seeds(text: str) -> list[int]:
    """'0,1,2', '0-4' (both ends included) or a mix ('0-2,7')."""
    if not text.strip():
        raise ConfigError("--seeds: no seeds given")
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ConfigError(f"--seeds {text}: expected numbers and ranges like 0,1,2 or 0-4")
        first, last = int(m.group(1)), int(m.group(2) or m.group(1))
        if last < first:
            raise ConfigError(f"--seeds {text}: the range {part} is empty")
        if len(seeds) + last - first + 1 > MAX_RUNS:
            raise ConfigError(f"--seeds {text}: more than {MAX_RUNS} seeds")
        seeds.extend(range(first, last + 1))
    if len(set(seeds)) < len(seeds):
        seen: set[int] = set()
        duplicate = next(s for s in seeds if s in seen or seen.add(s))
        raise ConfigError(f"--seeds {text}: seed {duplicate} is given twice")
    return seeds


def _grid_values(text: str) -> list[Any]:
    """'0.05,0.1' -> [0.05, 0.1]; 'bf16,off' -> ['bf16', 'off']; '[0.5,0.5,0.5],[0.4,0.4,0.4]' -> two
    lists: the values as one JSON list if they read as one, else each as JSON or else as text."""
    try:
        values = json.loads(f"[{text}]")
    except ValueError:
        values = []
        for item in text.split(","):
            try:
                values.append(json.loads(item))
            except ValueError:
                values.append(item.strip())
    return values


def parse_grid(items: Sequence[str], base: Config) -> dict[str, list[Any]]:
    """--grid KEY=V1,V2 (repeated), each key a setting of the config and each value valid for it."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise ConfigError(f"--grid {item}: expected KEY=V1,V2,... (e.g. optimizer.lr=0.05,0.1)")
        check_key(key, "--grid")
        if key in NOT_A_GRID_KEY:
            raise ConfigError(f"--grid {key}: not a grid key ({NOT_A_GRID_KEY[key]})")
        if key in grid:
            raise ConfigError(f"--grid {key}: given twice; list all its values in one --grid")
        values = _grid_values(text)
        seen: dict[str, Any] = {}
        for value in values:
            try:  # its type and range; with the other settings, each run's whole config (make_plan)
                check_setting(key, value)
            except ConfigError as e:
                raise ConfigError(f"--grid {key}={text}: {e}") from None
            # The same value as the setting takes it, compared as JSON text: by type and value, not as
            # Python compares (True == 1, 1 == 1.0), and 1 and 1.0 of a float key are one value.
            as_set = json.dumps(typed_json.coerce(value, typed_json.field_of(Config, key)[0], key))
            if as_set in seen:
                first, again = json.dumps(seen[as_set]), json.dumps(value)
                twice = f"the value {again} is given twice" if first == again else f"{first} and {again} are one value"
                raise ConfigError(f"--grid {key}: {twice}")
            seen[as_set] = value
        grid[key] = values
    return grid


def _label(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return re.sub(r"[^A-Za-z0-9.+_-]+", "_", text).strip("_") or "_"


def run_names(grid: dict[str, list[Any]], seeds: list[int]) -> list[tuple[str, int, dict[str, Any]]]:
    """(name, seed, point) for each run, grid point by grid point: 'lr0.05-seed0'. A key is shortened
    to its last part unless two grid keys share it."""
    leaves = [k.rsplit(".", 1)[-1] for k in grid]
    short = {k: (leaf if leaves.count(leaf) == 1 else k) for k, leaf in zip(grid, leaves)}
    runs, taken = [], set()
    for point in grid_points(grid):
        for seed in seeds:
            name = "-".join([*(f"{short[k]}{_label(v)}" for k, v in point.items()), f"seed{seed}"])
            n = 2
            unique = name
            while unique in taken:  # values that read alike once made safe for a folder name
                unique, n = f"{name}-{n}", n + 1
            taken.add(unique)
            runs.append((unique, seed, point))
    return runs


def run_config(base: Config, plan: SweepPlan, run: PlannedRun) -> Config:
    """The run's whole config: the base, its grid point and seed, its folder in the sweep; one process
    (the sweep places runs on devices; `--devices` picks the device, the backend follows it)."""
    return override(base, {**run.point, "seed": run.seed, "logging.output_dir": str(plan.sweep_dir),
                           "logging.run_name": run.name, "logging.hparams": list(plan.grid),
                           "distributed.nproc_per_node": 1, "distributed.backend": None},
                    f"run {run.name}")


def run_configs(base: Config, plan: SweepPlan) -> Iterator[tuple[PlannedRun, dict[str, Any]]]:
    """Each run with its whole config (`run_config`'s, as a dict), the configs of a grid point checked
    once: its seeds differ only in `seed` (each checked by make_plan) and the run's name (a safe folder
    name), which take no part in how settings fit together. Thousands of runs in a second, not a minute."""
    checked: dict[str, dict[str, Any]] = {}
    for run in plan.runs:
        point = json.dumps(run.point, sort_keys=True)
        if point not in checked:
            checked[point] = to_dict(run_config(base, plan, run))
        cfg = checked[point]
        yield run, {**cfg, "seed": run.seed, "logging": {**cfg["logging"], "run_name": run.name}}


def make_plan(base: Config, seeds: list[int], grid: dict[str, list[Any]], name: Optional[str]) -> SweepPlan:
    """The plan of a new sweep, checked (each run's config validated); nothing is written."""
    if not seeds:
        raise ConfigError("--seeds: no seeds given")
    if name is not None and not re.fullmatch(NAME_PATTERN, name):
        raise ConfigError(f"--name {name!r}: use up to 100 letters, digits and . _ + - (not first: .)")
    runs_count = len(seeds) * math.prod(len(v) for v in grid.values())
    if runs_count > MAX_RUNS:
        raise ConfigError(f"--seeds and --grid: {runs_count} runs; at most {MAX_RUNS}")
    for seed in seeds:
        try:
            check_setting("seed", seed)
        except ConfigError as e:
            raise ConfigError(f"--seeds: {e}") from None
    out = Path(base.logging.output_dir)
    sweep_dir = out / (name or time.strftime("sweep-%Y%m%d-%H%M%S"))
    if sweep_dir.exists():
        raise UserError(f"{sweep_dir}: already exists; continue it with `python -m app sweep --resume "
                        f"{sweep_dir}` or choose another --name")
    runs = [PlannedRun(n, s, p) for n, s, p in run_names(grid, seeds)]
    plan = SweepPlan(sweep_dir, Path.cwd(), seeds, grid, runs)
    for _ in run_configs(base, plan):  # refuses settings valid one by one but not together
        pass
    check_writable(sweep_dir)
    return plan


def create_sweep(base: Config, plan: SweepPlan, check_stop: Callable[[], None] = lambda: None) -> RunLock:
    """The sweep folder with its plan and every run's config file, renamed into place whole; returns
    its lock, held (taken on the hidden folder before anything is in it, so that a stale one can be
    told from one being assembled). `check_stop` raises if a stop was asked for (runner.py
    StopRequests): it is asked between files, and whatever it raises leaves nothing behind."""
    parent = plan.sweep_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f"{STAGING_PREFIX}{plan.sweep_dir.name}-"))
    lock = None
    try:
        os.chmod(staging, 0o777 & ~umask())
        lock = lock_run_dir(staging)  # its flocks stay with the folder through the rename: the sweep's lock
        (staging / "configs").mkdir()
        (staging / "logs").mkdir()
        for run, cfg in run_configs(base, plan):
            check_stop()
            write_json_atomic(staging / "configs" / f"{run.name}.json", cfg)
        write_json_atomic(staging / PLAN_FILE, {
            "name": plan.sweep_dir.name, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "workdir": str(plan.workdir), "seeds": plan.seeds, "grid": plan.grid,
            "runs": [{"name": r.name, "seed": r.seed, "point": r.point} for r in plan.runs],
            "base_config": to_dict(base)})
        check_stop()
        try:
            os.rename(staging, plan.sweep_dir)
        except OSError:
            raise UserError(f"{plan.sweep_dir}: already exists (created meanwhile by another process)") from None
        return lock
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone after the rename; cleared after a failure or a stop


def remove_abandoned_sweeps(parent: Path) -> list[Path]:
    """Hidden sweep folders that a killed process left half-assembled in `parent` (SIGKILL, a power cut):
    those with a configs/ folder (a run's hidden folder, app/runs.py, has none) whose lock no live
    process holds. Removed; returned, to be named."""
    removed = []
    for path in sorted(parent.glob(f"{STAGING_PREFIX}*")) if parent.is_dir() else []:
        if path.is_dir() and not path.is_symlink() and (path / "configs").is_dir() and not run_in_use(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def load_plan(sweep_dir: Path) -> tuple[SweepPlan, Config]:
    """A sweep's plan and base config, from SWEEP/sweep.json."""
    path = sweep_dir / PLAN_FILE
    try:
        raw = json.loads(path.read_text())
        base = config_from_dict(raw["base_config"], f"{path}: base_config")
        runs = [PlannedRun(r["name"], int(r["seed"]), dict(r["point"])) for r in raw["runs"]]
        plan = SweepPlan(sweep_dir, Path(raw["workdir"]), list(raw["seeds"]), dict(raw["grid"]), runs)
    except (FileNotFoundError, NotADirectoryError):
        hint = f"; to list the ordinary runs in it: python -m app runs {shlex.quote(str(sweep_dir))}" \
            if sweep_dir.is_dir() else ""
        raise UserError(f"{sweep_dir}: not a sweep folder (no {PLAN_FILE}){hint}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a readable sweep plan ({type(e).__name__}: {e})") from None
    except ConfigError as e:
        raise UserError(str(e)) from None
    if not plan.workdir.is_dir():
        raise UserError(f"{path}: workdir {plan.workdir} does not exist (the runs' paths are relative to it)")
    return plan, base


def point_label(point: dict[str, Any]) -> str:
    """'optimizer.lr=0.05, train.amp="off"'; '(no grid)' for a sweep of seeds alone."""
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in point.items()) or "(no grid)"
