"""The life of a run folder: naming a new one, creating it, owning it, and finding the one to resume
with the intact checkpoint in it (what a checkpoint holds and how it is checked: app/checkpoint.py).

A run folder holds config.json (the resolved config), results.json, checkpoints/, tb/ and .lock. The
launcher only plans and checks (`new_run`, `resume_run`, `check_not_in_use`, `check_writable`): nothing
is written until every check has passed. Then rank 0 claims the folder (`claim_run_dir`) and keeps it
for the life of its process:

- Ownership is an exclusive flock on the folder itself and one on RUN_DIR/.lock, which names the holder
  (pid, host, start time); the folder's own lock keeps a second trainer out even if .lock is deleted
  (where a file system cannot lock folders, .lock's is the lock). The kernel drops both when the
  process ends, however it ends, so a killed run leaves no stale lock; a second process that would
  train in the folder is refused with the holder's name.
- A new folder is assembled under a hidden name (config.json, checkpoints/, .lock already held) and
  renamed into place. A rename does not replace a folder with files in it, so a new run never adopts
  another run's folder, and an unnamed run that finds its timestamp taken takes the next free name.
- Files and folders get the modes the umask gives any other tool's (handlers/atomic.py).

Checkpoints (and with them torch) are imported only where one is read, so that what only looks at run
folders (`python -m app runs`, --help, a config error) answers in a fraction of a second, not the
seconds torch takes to import.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, NoReturn, Optional

from app.config import Config, config_from_dict, flat_settings, to_dict
from app.errors import ConfigError, UserError
from handlers.atomic import umask, write_json_atomic

if TYPE_CHECKING:
    from app.checkpoint import TrainingCheckpoint

LATEST = "latest"  # the value of --resume given without a path
LOCK_FILE = ".lock"

# Settings that may change when a run is resumed: they do not change what is computed.
SAFE_TO_CHANGE = ("data.root", "data.download", "train.device", "train.compile", "train.channels_last",
                  "train.fused_update", "eval.batch_size", "checkpoint.", "logging.", "distributed.")


@dataclass(frozen=True)
class RunPlan:
    """Where a run trains, decided before any process starts: its folder and, for a resume, the
    checked training checkpoint it continues from."""

    run_dir: Path
    checkpoint: Optional[TrainingCheckpoint] = None  # the training checkpoint to resume from
    resume: bool = False  # True: an existing run folder (without a checkpoint yet, it starts over there)

    @property
    def checkpoints_dir(self) -> Path:
        return checkpoints_dir(self.run_dir)

    def finished(self, epochs: int) -> bool:
        """Whether the checkpoint to resume from is the end of a run of `epochs` epochs."""
        c = self.checkpoint
        return c is not None and c.iteration >= c.epoch_length * epochs


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


class RunInUse(UserError):
    """Another live process owns the run folder. Exit code 2: the command, as given, cannot run now."""

    exit_code = 2


class RunLock:
    """The exclusive flocks on a run folder itself and on its .lock file, held while they are open."""

    def __init__(self, fd: int, folder_fd: Optional[int] = None) -> None:
        self.fd, self.folder_fd = fd, folder_fd

    def release(self) -> None:
        os.close(self.fd)
        if self.folder_fd is not None:
            os.close(self.folder_fd)


def _holder(lock_file: Path) -> str:
    try:
        h = json.loads(lock_file.read_text())
        return f"pid {h['pid']} on {h['host']} (started {h['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _in_use(run_dir: Path) -> RunInUse:
    return RunInUse(f"{run_dir}: in use by {_holder(run_dir / LOCK_FILE)}; wait for it to end or stop it, "
                    f"or choose another --run-name")


def _lock_folder(run_dir: Path, how: int) -> Optional[int]:
    """An flock on the folder itself (its open directory), which no file deleted inside it can undo; None
    where the file system has no such locks for folders (then the .lock file's flock is the lock).
    Raises BlockingIOError if another process holds it."""
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:  # EBADF, ENOLCK, EINVAL: locks on folders not supported here
        os.close(fd)
        return None
    return fd


def lock_run_dir(run_dir: Path) -> RunLock:
    """Take RUN_DIR itself and RUN_DIR/.lock or raise RunInUse naming the holder; then record this process
    as the holder. The folder's own lock is what keeps a second trainer out when .lock has been deleted."""
    try:
        folder_fd = _lock_folder(run_dir, fcntl.LOCK_EX)
    except BlockingIOError:
        raise _in_use(run_dir) from None
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except BaseException:
        if folder_fd is not None:
            os.close(folder_fd)
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        if folder_fd is not None:
            os.close(folder_fd)
        raise _in_use(run_dir) from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    return RunLock(fd, folder_fd)


def run_in_use(run_dir: Path) -> bool:
    """Whether a live process holds the folder's lock (tried shared and dropped at once)."""
    try:
        folder_fd = _lock_folder(run_dir, fcntl.LOCK_SH)
    except BlockingIOError:
        return True
    except (FileNotFoundError, NotADirectoryError):  # no folder: never claimed
        return False
    if folder_fd is not None:
        os.close(folder_fd)
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):  # no lock file: never claimed
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def check_not_in_use(run_dir: Path) -> None:
    """The launcher's early check (the training process takes the lock for good)."""
    if run_in_use(run_dir):
        raise _in_use(run_dir)


def _output_dir(cfg: Config) -> Path:
    out = Path(cfg.logging.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output folder is a file")
    return out


def _refuse_existing(run_dir: Path) -> NoReturn:
    check_not_in_use(run_dir)  # a live run: name its holder
    raise UserError(f"{run_dir}: run folder already exists; continue it with --resume {run_dir} "
                    f"or choose another --run-name")


def new_run(cfg: Config, check_exists: bool = True) -> RunPlan:
    """The folder a new run would get (not created here). `check_exists` is False for the non-zero
    ranks under torchrun: rank 0 may already have made it."""
    out = _output_dir(cfg)
    if cfg.logging.run_name:
        run_dir = out / cfg.logging.run_name
        if check_exists and run_dir.exists():
            _refuse_existing(run_dir)
        return RunPlan(run_dir)
    return RunPlan(next(_free_names(out / time.strftime("%Y%m%d-%H%M%S"))))


def _free_names(first: Path) -> Iterator[Path]:
    """FIRST, FIRST-2, FIRST-3, ... that do not exist yet."""
    n = 1
    while True:
        candidate = first if n == 1 else first.with_name(f"{first.name}-{n}")
        if not candidate.exists():
            yield candidate
        n += 1


def claim_run_dir(cfg: Config, plan: RunPlan) -> tuple[RunPlan, RunLock]:
    """Rank 0: own the run folder for the life of the process. A resumed run locks its folder (and,
    killed before its first checkpoint, has its config.json rewritten); a new run's folder is created
    with the lock already held. Returns the plan with the folder's final name."""
    if plan.resume:
        lock = lock_run_dir(plan.run_dir)
        if plan.checkpoint is None:  # resumed before its first checkpoint: start again in place
            _clear_outputs(plan.run_dir)
            plan.checkpoints_dir.mkdir(exist_ok=True)
            write_json_atomic(plan.run_dir / "config.json", to_dict(cfg))
        return plan, lock
    parent = plan.run_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".partial-{plan.run_dir.name}-"))
    lock = None
    try:
        os.chmod(staging, 0o777 & ~umask())  # mkdtemp makes it private whatever the umask
        lock = lock_run_dir(staging)  # the flock stays with the file through the rename
        write_json_atomic(staging / "config.json", to_dict(cfg))
        checkpoints_dir(staging).mkdir()
        if cfg.logging.run_name:
            if not _rename_unless_taken(staging, plan.run_dir):  # taken since the launcher checked
                _refuse_existing(plan.run_dir)
            return RunPlan(plan.run_dir), lock
        run_dir = next(d for d in _free_names(plan.run_dir) if _rename_unless_taken(staging, d))
        return RunPlan(run_dir), lock
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone after the rename; cleared after a failure


def _clear_outputs(run_dir: Path) -> None:
    """What a process killed before the first training checkpoint left (TensorBoard events, a best
    model, results.json): the run starts again from nothing, and its outputs with it, instead of
    showing the killed process's start twice."""
    shutil.rmtree(run_dir / "tb", ignore_errors=True)
    (run_dir / "results.json").unlink(missing_ok=True)
    for best in checkpoints_dir(run_dir).glob("best*.pt"):  # BEST_FILE, or an older version's best_*.pt
        best.unlink()


def _rename_unless_taken(staging: Path, run_dir: Path) -> bool:
    if run_dir.exists():
        return False
    try:
        os.rename(staging, run_dir)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):  # taken between the check and the rename
            return False
        raise
    return True


def check_writable(folder: Path) -> None:
    """Fail before training, not at the first checkpoint, if the run folder cannot be written."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{folder}: cannot create the output folder ({existing} is a file)")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{folder}: output folder is not writable ({e.strerror or e})") from None


def _newest_intact(run_dir: Path, cfg: Config, warn: Callable[[str], None]) -> RunPlan:
    """The run resumed from its newest intact training checkpoint (loadable, of this run's model); from
    the start if it has none yet (killed in its first epoch: it starts again in the same folder)."""
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir}: not a run folder (no config.json)")
    from app.checkpoint import check_training_checkpoint, expected_model_shapes
    from handlers.checkpoints import training_checkpoints

    problems = []
    shapes = expected_model_shapes(cfg)
    for path in training_checkpoints(checkpoints_dir(run_dir)):
        try:
            checkpoint = check_training_checkpoint(path, shapes)
        except UserError as e:
            problems.append(str(e))
            continue
        for p in problems:
            warn(f"skipping unusable checkpoint: {p}")
        if problems:
            warn(f"resuming from {path} instead")
        return RunPlan(run_dir, checkpoint, resume=True)
    if problems:
        raise UserError(f"{run_dir}: no intact training checkpoint ({'; '.join(problems)})")
    return RunPlan(run_dir, resume=True)


def latest_run(output_dir: Path) -> Path:
    """The run folder written to last: by its newest training checkpoint, or its config.json."""
    from handlers.checkpoints import training_checkpoints

    runs = [(max(p.stat().st_mtime for p in [d / "config.json", *training_checkpoints(checkpoints_dir(d))]), d)
            for d in (output_dir.iterdir() if output_dir.is_dir() else [])
            if not d.name.startswith(".") and (d / "config.json").is_file()]
    if not runs:
        raise UserError(f"{output_dir}: no run to resume")
    return max(runs)[1]


def run_dir_of(resume: str, output_dir: Path) -> Path:
    """The run folder that --resume names: the latest under `output_dir` (--resume alone), a run folder, or
    the folder of a training checkpoint file."""
    if resume == LATEST:
        return latest_run(output_dir)
    path = Path(resume)
    if path.is_dir():
        return path
    if not path.exists():
        raise UserError(f"{path}: no such run folder or checkpoint")
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def resume_run(cfg: Config, resume: str, warn: Callable[[str], None] = print) -> RunPlan:
    """--resume (latest run under the output folder), --resume RUN_DIR or --resume CHECKPOINT_FILE."""
    run_dir = run_dir_of(resume, Path(cfg.logging.output_dir))
    if resume == LATEST or Path(resume).is_dir():
        return _newest_intact(run_dir, cfg, warn)
    path = Path(resume)
    if path.is_symlink():  # last.pt: the numbered file it names now, which the run's messages then name
        path = path.parent / os.readlink(path)
    from app.checkpoint import check_training_checkpoint, expected_model_shapes

    return RunPlan(run_dir, check_training_checkpoint(path, expected_model_shapes(cfg)), resume=True)


def why_fixed(key: str) -> str:
    """Why a setting cannot change when a run is resumed (one that is not SAFE_TO_CHANGE)."""
    if key == "train.epochs" or key.startswith("schedule."):
        return "the one-cycle schedule is fixed by the run's epochs and schedule settings"
    if key == "train.batch_size":
        return "the batches and the schedule's length are fixed by the run's batch size"
    if key.startswith("model."):
        return "the run's checkpoints hold that model"
    return "it changes what the run computes; start a new run for it"


def unsafe_changes(saved: Config, new: Config) -> list[str]:
    """Settings that differ between the run's saved config and this invocation and would change
    what is computed, as 'key: old -> new'."""
    a, b = flat_settings(saved), flat_settings(new)
    return [f"{k}: {json.dumps(a[k])} -> {json.dumps(b[k])}" for k in sorted(a)
            if a[k] != b[k] and not k.startswith(SAFE_TO_CHANGE)]


def saved_config(run_dir: Path) -> Config:
    path = run_dir / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: the run's saved config is missing") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: the run's saved config is not valid JSON ({e.msg})") from None
    try:
        return config_from_dict(raw, str(path))
    except ConfigError as e:
        raise UserError(str(e)) from None


def plan_run(cfg: Config, resume: Optional[str], first_process: bool) -> RunPlan:
    """The run folder and checkpoint to use: a new folder's name, or the run `--resume` names with its
    newest intact checkpoint, refused if a live process owns it or the settings would change what it
    computes. `first_process`: whether this process is the one that creates or locks the folder (not
    so for the others under torchrun, which each plan for themselves)."""
    if resume is None:
        return new_run(cfg, check_exists=first_process)
    plan = resume_run(cfg, resume, warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    if first_process:
        check_not_in_use(plan.run_dir)
    source, trained = trained_config(plan)
    changes = unsafe_changes(trained, cfg)
    if changes:
        raise ConfigError(f"{source}: cannot resume with settings that change the run: " + "; ".join(changes))
    return plan


def trained_config(plan: RunPlan) -> tuple[str, Config]:
    """What the run was trained with, and where that is written: the checkpoint's own config (the truth:
    RUN/config.json is a copy for people, and can be edited); the run's config.json for a run without a
    checkpoint yet, or one whose checkpoint an older version wrote with settings this one does not know."""
    checkpoint = plan.checkpoint
    if checkpoint is not None and checkpoint.config is not None:
        source = f"{checkpoint.path} (the config it was trained with)"
        try:
            return source, config_from_dict(checkpoint.config, source)
        except ConfigError:
            pass
    return str(plan.run_dir / "config.json"), saved_config(plan.run_dir)
