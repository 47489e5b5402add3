"""How many runs to pack onto one GPU: total training images/s with K = 1, 2, 4 runs at once.

    python -m bench.packing OUT [--devices 0] [--ks 1,2,4] [--epochs 3] [--mps]

For each K, a real sweep (`python -m app sweep --devices D --per-device K --seeds 0-(K-1)`) of the recipe
on synthetic data of CIFAR's size, each run its own process. Reported per K:
- steady images/s: the sum over the K runs of each run's median training images/s over its epochs
  after the first (TensorBoard's system/images_per_second; the first epoch holds start-up and the CUDA
  graph capture); the K runs start together, so these epochs overlap;
- sweep images/s: the images the finished runs trained on (each run's epochs) / the sweep's wall time,
  start-up included;
- the recommended K: the smallest whose steady images/s is within 5% of the best.
With --mps every K is measured again under CUDA MPS (its daemon started for the measurement and
stopped after), which lets kernels of several processes run at once instead of taking turns.
Writes OUT/packing.json (or --report) after every K, so that a run cut short keeps what it measured,
and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]


def steady_images_per_second(run_dir: Path) -> Optional[float]:
    """A run's median training images/s over its epochs after the first, as TensorBoard has them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb" / "train"))
    acc.Reload()
    if "system/images_per_second" not in acc.Tags()["scalars"]:  # ended before its first epoch did
        return None
    values = [e.value for e in sorted(acc.Scalars("system/images_per_second"), key=lambda e: e.step)]
    return statistics.median(values[1:] or values) if values else None


def sweep_throughput(sweep_dir: Path, wall_seconds: float, train_images: int) -> dict[str, Any]:
    """The figures of one finished sweep (every run's results.json and TensorBoard files)."""
    plan = json.loads((sweep_dir / "sweep.json").read_text())
    names = [r["name"] for r in plan["runs"]]
    steady = [steady_images_per_second(sweep_dir / n) for n in names]
    from app.sweep.status import read_results

    finished = [n for n in names if (read_results(sweep_dir / n) or {}).get("status") == "finished"]
    trained = sum(train_images * _epochs(sweep_dir / n) for n in finished)
    return {"runs": len(names), "finished": len(finished), "wall_seconds": round(wall_seconds, 1),
            "steady_images_per_second": round(sum(s for s in steady if s is not None), 1),
            "per_run_steady_images_per_second": [None if s is None else round(s, 1) for s in steady],
            "sweep_images_per_second": round(trained / wall_seconds, 1)}


def _epochs(run_dir: Path) -> int:
    return int(json.loads((run_dir / "config.json").read_text())["train"]["epochs"])


def recommend(figures: dict[int, dict[str, Any]], within: float = 0.05) -> int:
    """The smallest K whose steady images/s is within `within` of the best K's."""
    best = max(f["steady_images_per_second"] for f in figures.values())
    return min(k for k, f in figures.items() if f["steady_images_per_second"] >= (1 - within) * best)


def run_sweep(out: Path, data: Path, k: int, epochs: int, devices: str, name: str, env: dict[str, str],
              extra: list[str]) -> float:
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "app", "sweep", "--config", str(ROOT / "config.json"),
                             "--seeds", f"0-{k - 1}", "--devices", devices, "--per-device", str(k),
                             "--epochs", str(epochs), "--data-root", str(data), "--output-dir", str(out),
                             "--name", name, *extra], cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"sweep {name} failed ({result.returncode}): {result.stdout[-2000:]}")
    return time.monotonic() - start


class Mps:
    """CUDA MPS for the processes this one starts: the daemon and the environment that finds it."""

    def __init__(self, folder: Path) -> None:
        self.env = {"CUDA_MPS_PIPE_DIRECTORY": str(folder / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(folder / "log")}
        for d in self.env.values():
            Path(d).mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> "Mps":
        if shutil.which("nvidia-cuda-mps-control") is None:
            raise RuntimeError("nvidia-cuda-mps-control is not installed")
        subprocess.run(["nvidia-cuda-mps-control", "-d"], env={**os.environ, **self.env}, check=True)
        time.sleep(1)
        return self

    def __exit__(self, *_: Any) -> None:
        subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, env={**os.environ, **self.env})


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.packing", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--devices", default="0", help="the one GPU to pack (or cpu)")
    p.add_argument("--ks", default="1,2,4", help="runs at once to measure")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--n-train", type=int, default=50_000)
    p.add_argument("--n-test", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, help="instead of the recipe's 128 (for a quick try on a CPU)")
    p.add_argument("--mps", action="store_true", help="measure under CUDA MPS too")
    p.add_argument("--report", type=Path, help="where packing.json goes (default: OUT/packing.json)")
    args = p.parse_args()
    report_path = args.report or args.out / "packing.json"
    from bench.synthetic import write_cifar100

    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "data"
    if not (data / "cifar-100-python" / "meta").exists():
        write_cifar100(data, args.n_train, args.n_test)
    env = dict(os.environ)
    report: dict[str, Any] = {"devices": args.devices, "epochs": args.epochs, "n_train": args.n_train}
    extra = ["--batch-size", str(args.batch_size)] if args.batch_size else []
    modes = ["processes"] + (["processes+mps"] if args.mps else [])
    for mode in modes:
        figures: dict[int, dict[str, Any]] = {}
        for k in [int(x) for x in args.ks.split(",")]:
            name = f"{mode.replace('+', '-')}-k{k}"
            shutil.rmtree(args.out / name, ignore_errors=True)
            try:
                if mode == "processes+mps":
                    with Mps(args.out / "mps") as mps:
                        wall = run_sweep(args.out, data, k, args.epochs, args.devices, name, {**env, **mps.env},
                                         extra)
                else:
                    wall = run_sweep(args.out, data, k, args.epochs, args.devices, name, env, extra)
            except (RuntimeError, subprocess.CalledProcessError) as e:
                report[mode] = {"error": str(e), "figures": figures}
                break
            figures[k] = sweep_throughput(args.out / name, wall, args.n_train)
            report[mode] = {"figures": figures, "partial": True}
            report_path.write_text(json.dumps(report, indent=2) + "\n")
            print(f"{mode:14s} K={k}: steady {figures[k]['steady_images_per_second']:9.0f} img/s, "
                  f"sweep {figures[k]['sweep_images_per_second']:9.0f} img/s, wall {wall:6.1f} s", flush=True)
        if figures and "error" not in report.get(mode, {}):
            report[mode] = {"figures": figures, "recommended_k": recommend(figures)}
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({m: report.get(m, {}).get("recommended_k") for m in modes}))


if __name__ == "__main__":
    main()
