"""A sweep beyond one machine: the runs as ordinary commands for a scheduler that already exists.

`sweep --print-commands` prints, for each unfinished run, the command the sweep itself would run next
(app/sweep/status.py `next_command`: new, or resumed from its folder), and writes SWEEP/slurm.sh, a
SLURM job array with one task per run that does the same. Every machine must see the sweep folder
at the same path (a shared file system); each run's lock keeps two machines from training one run,
and `sweep --summary` aggregates whatever has finished.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path

from app.sweep.plan import SweepPlan
from app.sweep.status import next_command, run_status
from handlers.atomic import umask, write_atomic


def commands(plan: SweepPlan) -> list[str]:
    """One shell line per run that is neither finished nor being trained, runnable from any folder."""
    lines = []
    for run in plan.runs:
        if run_status(run.run_dir(plan.sweep_dir)) not in ("finished", "running"):  # "running": elsewhere
            lines.append(f"cd {shlex.quote(str(plan.workdir))} && {shlex.join(next_command(plan, run))}")
    return lines


def slurm_script(plan: SweepPlan) -> str:
    rel = os.path.relpath(plan.sweep_dir.resolve(), plan.workdir)
    names = " ".join(shlex.quote(r.name) for r in plan.runs)
    return f"""#!/bin/bash
# Sweep {plan.sweep_dir.name} as a SLURM job array: one task per run, one GPU each.
#   sbatch {shlex.quote(str(plan.sweep_dir.resolve() / "slurm.sh"))}
# with a Python environment that has the project installed active (or PYTHON=/path/to/its/python).
# A task of a finished run ends at once; a task of a started run resumes it from its checkpoint, so
# the whole array can be submitted again after a preemption or a failure. SIGTERM 120 s before the
# time limit stops a run gracefully, with a checkpoint. Add your site's partition, account and time.
#SBATCH --job-name={plan.sweep_dir.name}
#SBATCH --array=0-{len(plan.runs) - 1}
#SBATCH --gres=gpu:1
#SBATCH --output={str(plan.sweep_dir.resolve()).replace("%", "%%")}/logs/slurm-%A_%a.log
#SBATCH --signal=B:TERM@120
#SBATCH --requeue
set -euo pipefail
cd {shlex.quote(str(plan.workdir))}
runs=({names})
name=${{runs[$SLURM_ARRAY_TASK_ID]}}
config={shlex.quote(rel)}/configs/$name.json
run_dir={shlex.quote(rel)}/$name
if [ -f "$run_dir/config.json" ]; then
  exec "${{PYTHON:-python}}" -m app --config "$config" --resume "$run_dir"
fi
exec "${{PYTHON:-python}}" -m app --config "$config"
"""


def write_slurm_script(plan: SweepPlan) -> Path:
    path = plan.sweep_dir / "slurm.sh"
    text = slurm_script(plan)
    write_atomic(path, lambda f: f.write(text.encode()))
    path.chmod(0o777 & ~umask())  # executable, as the umask allows
    return path
