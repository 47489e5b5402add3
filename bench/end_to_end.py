"""The recipe end to end, from process start to exit, compile included, with the fastest same-math settings:

    python -m bench.end_to_end OUT [--levers OUT/levers.jsonl] [--device cuda] [--epochs 100] [--limit S]

Picks the settings from bench.levers' figures (`pick`), writes synthetic data of CIFAR's size (random
images: only time means something), runs `python -m app --config config.json ... --set KEY=VALUE` as a
user does and times it from before the process starts to after it exits. Past `--limit` seconds the
run gets SIGTERM (a graceful stop: checkpoint, results.json "interrupted"), so a run cut short still
says how far it got. Writes OUT/end_to_end.json: the settings and why, the wall time, results.json's
figures, the epochs' times (metrics.csv) and the start-up (the process's wall time less the run's own,
and the seconds from the process's start to the run's first line, to the second).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]

STEP_SETTINGS = ("base", "f", "g", "all")  # the same-math step settings of bench.levers; fp16 is never picked
FASTER = 0.02  # a setting must beat the baseline by more than this share: less is within run-to-run noise
FIGURES_EVERY = 10  # logging.figures_every_epochs when drawing the figures measurably costs time
FIGURES_MS = 5.0  # ... that is, more than this per epoch


def read_levers(path: Optional[Path]) -> dict[str, dict[str, Any]]:
    """bench.levers' lines by lever (none if the file is missing: the recipe as it is)."""
    if path is None or not path.exists():
        return {}
    lines = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {e["lever"]: e for e in lines if "lever" in e}


def _passed(entry: dict[str, Any]) -> bool:
    return entry.get("status") == "measured" and bool((entry.get("same_math") or {}).get("passed"))


def pick(levers: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """The settings to run and a line per decision. Of the step settings, the fastest measured one whose
    same-math check passed, if more than FASTER ahead of the baseline (fp16 never: it is not the same math);
    the figures every FIGURES_EVERY epochs if drawing them costs more than FIGURES_MS; the late loss read
    if it was measured faster and its check passed."""
    settings: dict[str, Any] = {}
    why: list[str] = []
    base = levers.get("base", {}).get("ms_per_step")
    candidates = [e for k, e in levers.items() if k in STEP_SETTINGS[1:] and _passed(e) and e.get("ms_per_step")]
    for k in STEP_SETTINGS[1:]:
        e = levers.get(k)
        if e is not None and e not in candidates:
            why.append(f"{k} ({e.get('name')}): not used ({e.get('status')}"
                       f"{', same-math check failed' if e.get('status') == 'measured' else ''})")
    if base and candidates:
        best = min(candidates, key=lambda e: e["ms_per_step"])
        if best["ms_per_step"] < (1 - FASTER) * base:
            settings.update(best["settings"])
            why.append(f"{best['lever']} ({best['name']}): {best['ms_per_step']:.3f} ms per step against the "
                       f"baseline's {base:.3f}, same math")
        else:
            why.append(f"no step setting beats the baseline's {base:.3f} ms per step by {100 * FASTER:.0f}% "
                       f"(best: {best['lever']}, {best['ms_per_step']:.3f} ms)")
    figures = levers.get("b", {})
    if figures.get("status") == "measured" and figures.get("render_ms", 0) > FIGURES_MS:
        settings["logging.figures_every_epochs"] = FIGURES_EVERY
        why.append(f"b: figures every {FIGURES_EVERY} epochs ({figures['render_ms']:.0f} ms each)")
    late = levers.get("d", {})
    if _passed(late) and late.get("flush_ms") is not None and late.get("baseline_flush_ms") is not None \
            and late["flush_ms"] < late["baseline_flush_ms"]:
        settings["logging.read_losses_late"] = True
        why.append(f"d: losses read late ({late['flush_ms']:.2f} ms per flush against "
                   f"{late['baseline_flush_ms']:.2f})")
    if not settings:
        why.append("the recipe as it is")
    return settings, why


def cache_files(folder: Optional[str]) -> Optional[int]:
    """How many files the compile cache holds (a warm cache makes compilation cheaper), None without one."""
    if not folder or not Path(folder).is_dir():
        return None
    return sum(len(files) for _, _, files in os.walk(folder))


def run_app(args: list[str], log: Path, limit: float) -> tuple[int, float, float, bool]:
    """`python -m app ARGS`, its lines printed and kept in `log`; SIGTERM past `limit` seconds, SIGKILL 60 s
    later. Returns its exit code, its wall seconds, the wall clock at its start and whether it was stopped."""
    started_clock = time.time()
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "app", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    stopped = threading.Event()

    def stop() -> None:
        if proc.poll() is None:
            stopped.set()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()

    timer = threading.Timer(limit, stop)
    timer.start()
    with log.open("w") as f:
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            print(line, end="", flush=True)
    code = proc.wait()
    wall = time.monotonic() - started
    timer.cancel()
    return code, wall, started_clock, stopped.is_set()


def seconds_to_first_line(log: Path, started_clock: float) -> Optional[float]:
    """From the process's start to its first timestamped line (`run ...`, printed as training starts),
    to the second: the lines carry local time to the second."""
    for line in log.read_text().splitlines():
        try:
            at = datetime.datetime.strptime(line[:19], "%Y-%m-%d %H:%M:%S").timestamp()
        except ValueError:
            continue
        return round(at - started_clock, 1)
    return None


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.end_to_end", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--work", type=Path, required=True, help="for the data (unless --data) and the run")
    p.add_argument("--levers", type=Path, help="bench.levers' levers.jsonl (default: the recipe as it is)")
    p.add_argument("--data", type=Path, help="a folder with cifar-100-python/ (default: written in --work)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, help="instead of the recipe's (a tiny CPU run)")
    p.add_argument("--n-train", type=int, default=50_000)
    p.add_argument("--n-test", type=int, default=10_000)
    p.add_argument("--limit", type=float, default=240.0, help="seconds before the run is stopped (SIGTERM)")
    args = p.parse_args(argv)
    from bench.synthetic import write_cifar100
    from handlers.metrics_csv import read_metrics_csv

    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.data or args.work / "data"
    if not (data / "cifar-100-python" / "meta").exists():
        write_cifar100(data, args.n_train, args.n_test)
    settings, why = pick(read_levers(args.levers))
    for line in why:
        print(f"end to end: {line}", flush=True)
    app_args = ["--config", str(ROOT / "config.json"), "--data-root", str(data), "--output-dir",
                str(args.work / "runs"), "--run-name", "recipe", "--device", args.device, "--epochs", str(args.epochs),
                *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
                *[a for k, v in settings.items() for a in ("--set", f"{k}={json.dumps(v)}")]]
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    report: dict[str, Any] = {"command": ["python", "-m", "app", *app_args], "settings": settings, "why": why,
                              "epochs_asked": args.epochs, "limit_seconds": args.limit,
                              "compile_cache": cache, "compile_cache_files_before": cache_files(cache)}
    (args.out / "end_to_end.json").write_text(json.dumps({**report, "status": "running"}, indent=2) + "\n")
    log = args.work / "recipe.log"
    code, wall, started_clock, stopped = run_app(app_args, log, args.limit)
    run_dir = args.work / "runs" / "recipe"
    results = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").exists() else {}
    rows = read_metrics_csv(run_dir / "metrics.csv") if (run_dir / "metrics.csv").exists() else []
    epoch_seconds = [float(r["epoch_seconds"]) for r in rows if r.get("epoch_seconds")]
    run_seconds = results.get("wall_time_seconds")
    report.update({
        "status": results.get("status", "no results.json"), "exit_code": code, "stopped_at_limit": stopped,
        "seconds": round(wall, 1), "epochs": results.get("epochs"), "results": results,
        "outside_the_run_seconds": round(wall - run_seconds, 1) if run_seconds is not None else None,
        "seconds_to_first_line": seconds_to_first_line(log, started_clock),
        "first_epoch_seconds": epoch_seconds[0] if epoch_seconds else None,
        "later_epochs_median_seconds": sorted(epoch_seconds[1:])[len(epoch_seconds[1:]) // 2]
        if len(epoch_seconds) > 1 else None,
        "epoch_seconds": epoch_seconds})
    (args.out / "end_to_end.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"end to end: {report['epochs']} of {args.epochs} epochs in {wall:.1f} s from process start to exit "
          f"(status {report['status']}, exit {code}; start-up and exit outside the run "
          f"{report['outside_the_run_seconds']} s; first line after {report['seconds_to_first_line']} s)",
          flush=True)


if __name__ == "__main__":
    main()
