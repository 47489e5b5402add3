"""`python -m app runs [FOLDER]`: one table of every run under a folder of runs, sweeps included.

Read only from what the runs wrote, so it is right however they were started (one by one, by a
sweep, by a scheduler elsewhere): a run folder is one with config.json and checkpoints/ (app/runs.py),
found in FOLDER and one level down (a sweep's runs, or any folder given as --output-dir below it).
Each run's state is the one decision of app/sweep/status.py `run_state` (results.json, then the
folder's lock), so this table and a sweep's agree. Rows sort by name: the default names are
timestamps, so that is the order in which the runs were started. The text view is for people
(top-1 in %, stopped runs' resume commands below the table); `--json` is for scripts (fractions,
results.json's own field names).
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any, Iterator, Optional

from app.errors import UserError
from app.sweep.plan import PLAN_FILE
from app.sweep.status import STATUSES, read_results, run_state
from handlers.clock import clock


def is_run_folder(path: Path) -> bool:
    """What app/runs.py creates before anything else (a sweep's folder has sweep.json and configs/ instead)."""
    return (path / "config.json").is_file() and (path / "checkpoints").is_dir()


def _visible_folders(folder: Path) -> list[Path]:
    """Sub-folders, without the hidden ones (a run or sweep being assembled is .partial-*: app/runs.py)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir())


def find_runs(folder: Path) -> Iterator[tuple[str, Path]]:
    """(name relative to FOLDER, run folder) of each run in FOLDER and one level down, by name; FOLDER
    itself, named by its own name, if it is a run folder. FOLDER that cannot be listed is an error that
    names it; a sub-folder that cannot be listed holds no run this table could read, and is left out."""
    if is_run_folder(folder):
        yield folder.resolve().name, folder
        return
    found = []
    for child in _visible_folders(folder):
        if is_run_folder(child):
            found.append((child.name, child))
            continue
        try:
            found += [(f"{child.name}/{g.name}", g) for g in _visible_folders(child) if is_run_folder(g)]
        except OSError:
            pass
    yield from sorted(found)


def _planned_epochs(run_dir: Path) -> Optional[int]:
    """train.epochs of the run's config.json (None where it cannot be read: the table still lists it)."""
    try:
        return int(json.loads((run_dir / "config.json").read_text())["train"]["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _resume_command(run_dir: Path) -> str:
    """What takes a stopped run on: a sweep's own resume for a sweep's run (its configs and workdir
    are the sweep's), else the run's resume from its own config.json."""
    sweep = run_dir.parent
    if (sweep / PLAN_FILE).is_file():
        return f"python -m app sweep --resume {shlex.quote(str(sweep))}"
    return f"python -m app --resume {shlex.quote(str(run_dir))}"


def run_row(name: str, run_dir: Path) -> dict[str, Any]:
    """One run, with results.json's field names (`best` and `final` as it has them: fractions, and the
    epoch each is of); `resume`: the command that continues a stopped run, else None."""
    results = read_results(run_dir) or {}
    state = run_state(run_dir)
    final = results.get("final") or {}
    return {"name": name, "path": str(run_dir), "status": state.status, "detail": state.detail,
            "epochs": results.get("epochs", final.get("epoch", 0)), "max_epochs": _planned_epochs(run_dir),
            "best": results.get("best") or {}, "final": final,
            "wall_time_seconds": results.get("wall_time_seconds"),
            "sweep": str(run_dir.parent) if (run_dir.parent / PLAN_FILE).is_file() else None,
            "resume": _resume_command(run_dir) if state.status == "stopped" else None}


def run_table(folder: Path) -> dict[str, Any]:
    """Every run under `folder`, and how many are in each state; UserError (one line) if it is not a folder."""
    if not folder.exists():
        raise UserError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder (give the folder that holds the run folders)")
    rows = [run_row(name, run_dir) for name, run_dir in find_runs(folder)]
    return {"folder": str(folder), "runs": rows,
            "counts": {s: sum(r["status"] == s for r in rows) for s in STATUSES}}


def _pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _clock(seconds: Optional[float]) -> str:
    return "–" if seconds is None else clock(seconds)


def _status(row: dict[str, Any]) -> str:
    """The status, with the why of a stopped run; a failure's reason is long, and goes below the table."""
    return f"{row['status']} ({row['detail']})" if row["status"] == "stopped" and row["detail"] else row["status"]


def to_text(table: dict[str, Any]) -> str:
    """Aligned columns, top-1 in % with 2 decimals; then how to resume each stopped run, why each failed
    one failed, and the counts."""
    rows = table["runs"]
    cells = [("run", "status", "epochs", "best top-1 % (epoch)", "final top-1 %", "wall time")]
    for r in rows:
        best = r["best"]
        cells.append((r["name"], _status(r), f"{r['epochs']}/{r['max_epochs'] or '?'}",
                      "–" if best.get("top1") is None else f"{_pct(best['top1'])} ({best.get('epoch', '?')})",
                      _pct(r["final"].get("top1")), _clock(r["wall_time_seconds"])))
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cell, widths))).rstrip()
             for cell in cells]
    resumes = list(dict.fromkeys(r["resume"] for r in rows if r["resume"]))  # a sweep's once
    if resumes:
        lines += ["", "stopped runs continue from their last checkpoint (if any) with:", *(f"  {c}" for c in resumes)]
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "failed:", *(f"  {r['name']}: {r['detail']}" for r in failed)]
    sweeps = list(dict.fromkeys(r["sweep"] for r in rows if r["sweep"]))
    if sweeps:
        lines += ["", "per grid point, with the runs not started yet:",
                  *(f"  python -m app sweep --summary {shlex.quote(s)}" for s in sweeps)]
    counts = ", ".join(f"{n} {s}" for s, n in table["counts"].items() if n)
    lines += ["", f"{len(rows)} run{'s' if len(rows) != 1 else ''} under {table['folder']}: {counts}"]
    return "\n".join(lines) + "\n"


def show_runs(folder: Path, as_json: bool) -> int:
    """Print the table (or, `as_json`, one JSON object: {"folder", "runs", "counts"}). A folder with no runs
    is a user error, as a mistyped folder usually is: one line, exit 1, nothing on stdout."""
    table = run_table(folder)
    if not table["runs"]:
        raise UserError(f"{folder}: no runs in it or one level down (a run folder holds config.json and "
                        f"checkpoints/)")
    print(json.dumps(table, indent=2) if as_json else to_text(table), end="\n" if as_json else "")
    return 0
