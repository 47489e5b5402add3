"""A sweep beyond one machine: the runs as ordinary commands for a scheduler that already exists.

`sweep --print-commands` prints, for each unfinished run, the command the sweep itself would run next
(app/sweep/status.py `next_command`: new, or resumed from its folder), and writes SWEEP/slurm.sh, a
SLURM job array with one task per run that does the same. Every machine must see the sweep folder
at the same path (a shared file system); each run's lock keeps two machines from training one run,
and `sweep --summary` aggregates whatever has finished. The script names the sweep folder where it is
when the script is written (SLURM runs a copy of it, so it cannot find its folder from its own path);
`sweep --resume` rewrites it, so after a move it is right again.

SLURM refuses an array index of MaxArraySize or more, and MaxArraySize is 1001 unless a site raised it
(indices 0-1000). So a sweep of more than ARRAY_TASKS runs is several arrays of at most ARRAY_TASKS
tasks, each the same script submitted with OFFSET, the index of its first run; `sbatch_commands` lists
them, and the script's header says so.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path

from app.sweep.plan import PLAN_FILE, SweepPlan
from app.sweep.status import next_command, run_status
from handlers.atomic import umask, write_atomic

ARRAY_TASKS = 1000  # tasks per job array: indices 0-999, under SLURM's default MaxArraySize of 1001


def commands(plan: SweepPlan) -> list[str]:
    """One shell line per run that is neither finished nor being trained, runnable from any folder."""
    lines = []
    for run in plan.runs:
        if run_status(run.run_dir(plan.sweep_dir)) not in ("finished", "running"):  # "running": elsewhere
            lines.append(f"cd {shlex.quote(str(plan.workdir))} && {shlex.join(next_command(plan, run))}")
    return lines


def script_path(plan: SweepPlan) -> Path:
    return plan.sweep_dir.resolve() / "slurm.sh"


def sbatch_commands(plan: SweepPlan) -> list[str]:
    """The sbatch lines that submit every run: one array, or one per ARRAY_TASKS runs with its OFFSET."""
    script = shlex.quote(str(script_path(plan)))
    n = len(plan.runs)
    if n <= ARRAY_TASKS:
        return [f"sbatch {script}"]
    lines = []
    for offset in range(0, n, ARRAY_TASKS):
        size = min(ARRAY_TASKS, n - offset)
        array = "" if size == ARRAY_TASKS else f"--array=0-{size - 1} "  # the script's own: 0-{ARRAY_TASKS - 1}
        lines.append(f"sbatch {array}--export=ALL,OFFSET={offset} {script}")
    return lines


def _how_to_submit(plan: SweepPlan) -> str:
    lines = sbatch_commands(plan)
    n = len(plan.runs)
    if len(lines) == 1:
        return f"# Submit it with\n#   {lines[0]}\n"
    return (f"# SLURM refuses array indices of MaxArraySize or more (1001 unless your site raised it), so the {n}\n"
            f"# runs are {len(lines)} job arrays of at most {ARRAY_TASKS} tasks: this script, each time with OFFSET\n"
            f"# (the index of its first run; task i runs run OFFSET + i). Submit all {len(lines)}:\n"
            + "".join(f"#   {line}\n" for line in lines))


def slurm_script(plan: SweepPlan) -> str:
    rel = shlex.quote(os.path.relpath(plan.sweep_dir.resolve(), plan.workdir))
    names = " ".join(shlex.quote(r.name) for r in plan.runs)
    n = len(plan.runs)
    return f"""#!/bin/bash
# Sweep {plan.sweep_dir.name} as a SLURM job array: one task per run, one GPU each.
{_how_to_submit(plan)}# with a Python environment that has the project installed active (or PYTHON=/path/to/its/python).
# A task of a finished run ends at once; a task of a started run resumes it from its checkpoint, so
# the whole array can be submitted again after a preemption or a failure. SIGTERM 120 s before the
# time limit stops a run gracefully, with a checkpoint. Add your site's partition, account and time.
# Written for the sweep at {plan.sweep_dir.resolve()}; if it moves, `python -m app sweep --resume NEW
# --print-commands` writes it again for its new place.
#SBATCH --job-name={plan.sweep_dir.name}
#SBATCH --array=0-{min(n, ARRAY_TASKS) - 1}
#SBATCH --gres=gpu:1
#SBATCH --output={str(plan.sweep_dir.resolve()).replace("%", "%%")}/logs/slurm-%A_%a.log
#SBATCH --signal=B:TERM@120
#SBATCH --requeue
set -euo pipefail
cd {shlex.quote(str(plan.workdir))}
sweep_dir={rel}
if [ ! -f "$sweep_dir/{PLAN_FILE}" ]; then
  echo "error: $PWD/$sweep_dir: no sweep there (moved? python -m app sweep --resume NEW --print-commands" \\
       "writes this script again for its new place)" >&2
  exit 2
fi
runs=({names})
index=$(( ${{OFFSET:-0}} + SLURM_ARRAY_TASK_ID ))
if [ "$index" -ge {n} ]; then
  echo "error: OFFSET ${{OFFSET:-0}} + SLURM_ARRAY_TASK_ID $SLURM_ARRAY_TASK_ID = $index: the sweep has" \\
       "runs 0-{n - 1}" >&2
  exit 2
fi
name=${{runs[$index]}}
config=$sweep_dir/configs/$name.json
run_dir=$sweep_dir/$name
if [ -f "$run_dir/config.json" ]; then
  exec "${{PYTHON:-python}}" -m app --config "$config" --output-dir "$sweep_dir" --resume "$run_dir"
fi
exec "${{PYTHON:-python}}" -m app --config "$config" --output-dir "$sweep_dir"
"""


def write_slurm_script(plan: SweepPlan) -> Path:
    path = plan.sweep_dir / "slurm.sh"
    text = slurm_script(plan)
    write_atomic(path, lambda f: f.write(text.encode()))
    path.chmod(0o777 & ~umask())  # executable, as the umask allows
    return path
