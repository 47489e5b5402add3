"""A sweep's table: each run's results, and per grid point the mean and spread over its seeds.

Read from what the runs wrote (each run folder's results.json), so it is right however the runs were
run: by the sweep on this machine, or by a scheduler on several (`sweep --summary` aggregates whatever
has finished). Statistics are over finished runs only; the standard deviation is the sample one
(n - 1), as a results table reports the spread of a few seeds, and is absent for a single seed.
Each run's state is status.py's: from its results.json first (a failure's reason is the one it gives),
then from what the sweep saw of its process (SWEEP/failures.json: an exit code, a last line, a signal).
"""
from __future__ import annotations

import json
import statistics
from typing import Any, Optional

from app.sweep.plan import SweepPlan, point_label
from app.sweep.status import STATUSES, read_failures, read_results, run_state
from handlers.atomic import write_atomic, write_json_atomic

STATISTICS = ("final_top1", "best_top1", "final_top5", "best_top5", "wall_time_seconds")


def _planned_epochs(plan: SweepPlan, name: str) -> Optional[int]:
    try:
        return int(json.loads((plan.sweep_dir / "configs" / f"{name}.json").read_text())["train"]["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_row(plan: SweepPlan, name: str, seed: int, point: dict[str, Any],
            failures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    run_dir = plan.sweep_dir / name
    results = read_results(run_dir) or {}
    state = run_state(run_dir, failures.get(name))
    best, final = results.get("best") or {}, results.get("final") or {}
    row = {"name": name, "seed": seed, "point": point, "status": state.status, "detail": state.detail,
           "epochs": final.get("epoch", 0), "max_epochs": _planned_epochs(plan, name),
           "best_top1": best.get("top1"), "best_top5": best.get("top5"), "best_epoch": best.get("epoch"),
           "final_top1": final.get("top1"), "final_top5": final.get("top5"),
           "wall_time_seconds": results.get("wall_time_seconds")}
    if state.status == "failed":
        row["failure"] = {"exit_code": state.exit_code, "error": state.detail}
    return row


def spread(values: list[float]) -> dict[str, Optional[float]]:
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values) if values else None, "max": max(values) if values else None}


def summarize(plan: SweepPlan) -> dict[str, Any]:
    """The sweep's summary, from the run folders as they are now."""
    failures = read_failures(plan.sweep_dir)
    rows = [run_row(plan, r.name, r.seed, r.point, failures) for r in plan.runs]
    points = []
    for point in plan.points():
        mine = [row for row in rows if row["point"] == point]
        done = [row for row in mine if row["status"] == "finished"]
        points.append({"point": point, "label": point_label(point), "seeds": len(mine), "finished": len(done),
                       **{stat: spread([row[stat] for row in done]) for stat in STATISTICS}})
    counts = {s: sum(row["status"] == s for row in rows) for s in STATUSES}
    return {"sweep": plan.sweep_dir.name, "runs": rows, "points": points, "counts": counts}


def _pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _mean_std(s: dict[str, Optional[float]]) -> str:
    if s["mean"] is None:
        return "–"
    return _pct(s["mean"]) + ("" if s["std"] is None else f" ± {_pct(s['std'])}")


def points_table(summary: dict[str, Any]) -> list[str]:
    """Per grid point: finished seeds, and mean ± std with [min, max] of the top-1 and top-5 (in %)."""
    lines = ["| grid point | finished | final top-1 | [min, max] | best top-1 | [min, max] | final top-5 | "
             "wall time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for p in summary["points"]:
        f1, b1 = p["final_top1"], p["best_top1"]
        wall = p["wall_time_seconds"]["mean"]
        lines.append(f"| {p['label'].replace('|', '/')} | {p['finished']}/{p['seeds']} | {_mean_std(f1)} | "
                     f"[{_pct(f1['min'])}, {_pct(f1['max'])}] | {_mean_std(b1)} | "
                     f"[{_pct(b1['min'])}, {_pct(b1['max'])}] | {_mean_std(p['final_top5'])} | "
                     f"{'–' if wall is None else f'{wall:.0f}'} |")
    return lines


def to_markdown(summary: dict[str, Any]) -> str:
    c = summary["counts"]
    lines = [f"# Sweep {summary['sweep']}", "",
             f"{len(summary['runs'])} runs: " + ", ".join(f"{n} {s}" for s, n in c.items() if n), "",
             "## Per grid point (finished runs; top-1 and top-5 in %, mean ± sample std (n-1), [min, max])", "",
             *points_table(summary), "", "## Runs", "",
              "| run | status | epochs | best top-1 (epoch) | best top-5 | final top-1 | final top-5 | wall time (s) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in summary["runs"]:
        status = r["status"]
        if status == "failed":
            code = r["failure"]["exit_code"]
            status += f" ({'' if code is None else f'exit {code}: '}{r['failure']['error']})"
        elif r["detail"]:
            status += f" ({r['detail']})"
        best = "–" if r["best_top1"] is None else f"{_pct(r['best_top1'])} ({r['best_epoch']})"
        wall = "–" if r["wall_time_seconds"] is None else f"{r['wall_time_seconds']:.0f}"
        lines.append(f"| {r['name']} | {status.replace('|', '/')} | {r['epochs']}/{r['max_epochs'] or '?'} | {best} | "
                     f"{_pct(r['best_top5'])} | {_pct(r['final_top1'])} | {_pct(r['final_top5'])} | {wall} |")
    return "\n".join(lines) + "\n"


def write_summary(plan: SweepPlan) -> dict[str, Any]:
    """SWEEP/summary.json and summary.md, rewritten whole (atomically); returns the summary."""
    summary = summarize(plan)
    write_json_atomic(plan.sweep_dir / "summary.json", summary)
    text = to_markdown(summary)
    write_atomic(plan.sweep_dir / "summary.md", lambda f: f.write(text.encode()))
    return summary
