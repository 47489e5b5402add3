"""`python -m bench [--quick] [--device auto|cpu|cuda] [--compile]`: measures, in one run,

(a) augmentation images/s of the seed's per-image torchvision pipeline against ours (same device, same
    images; on the CPU with one thread, i.e. per core);
(b) training images/s of a plain PyTorch loop against the Ignite trainer (same model, batch, step);
(c) time per epoch on a synthetic full-size training set (50,000 images): measured on CUDA, estimated
    from (b) on the CPU (a real CPU epoch takes about a quarter of an hour); on CUDA also the share of
    the measured bf16 matrix-multiply peak that the training step reaches.
Prints a table, then one JSON line with every figure.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from app.config import Config, override
from app.device import resolve_device
from bench import measure


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: within 60 s on a 2-core CPU")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for (b) and (c)")
    p.add_argument("--epochs", type=int, default=2, help="epochs timed for (c) on CUDA (the last is reported)")
    return p.parse_args()


def main() -> None:
    args = _args()
    started = time.perf_counter()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    batch = 32 if (args.quick and not cuda) else 128
    cfg = override(Config(), {"train.batch_size": batch, "train.compile": args.compile,
                              "train.device": device.type}, "bench")
    threads = torch.get_num_threads()
    result: dict = {"device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
                    "torch": torch.__version__, "cpu_threads": threads, "quick": args.quick,
                    "batch_size": batch, "amp": "bf16" if cuda else "fp32", "compile": args.compile,
                    "date": time.strftime("%Y-%m-%d")}

    if not cuda:
        torch.set_num_threads(1)  # (a) per core
    n_seed = 256 if args.quick else 2048
    result["augment"] = measure.augmentation(cfg, device, n_seed=n_seed, n_ours=n_seed * (4 if cuda else 2))
    torch.set_num_threads(threads)

    iters, rounds = (100, 3) if cuda else ((5, 4) if args.quick else (10, 4))
    result["trainer"] = measure.trainer_overhead(cfg, device, iters=iters, rounds=rounds)

    if cuda:
        result["epoch"] = measure.full_epoch(cfg, device, 50_000, epochs=args.epochs)
        peak = measure.bf16_matmul_tflops(device)
        per_image = measure.train_flops_per_image(cfg, device)
        achieved = per_image * result["epoch"]["img_s"] / 1e12
        result["peak"] = {"bf16_matmul_tflops": peak, "train_gflop_per_image": per_image / 1e9,
                          "train_tflops": achieved, "share": achieved / peak}
    else:
        ips = result["trainer"]["ignite_img_s"]
        result["epoch"] = {"seconds": 50_000 / ips, "images": 50_000, "img_s": ips, "estimated": True}
    result["bench_seconds"] = time.perf_counter() - started
    _print_table(result)
    print(json.dumps(result, sort_keys=True))


def _print_table(r: dict) -> None:
    a, t, e = r["augment"], r["trainer"], r["epoch"]
    rows = [
        ("device", f"{r['device']} (torch {r['torch']}, {r['cpu_threads']} CPU threads)"),
        ("(a) seed per-image pipeline", f"{a['seed_img_s']:,.0f} img/s ({a['threads']} thread(s))"),
        ("(a) batched augmentation", f"{a['ours_img_s']:,.0f} img/s ({a['speedup']:.1f}x)"),
        ("(b) plain PyTorch loop", f"{t['plain_img_s']:,.1f} img/s (batch {r['batch_size']}, best of "
                                   f"{t['rounds']} x {t['iters']} iterations)"),
        ("(b) Ignite trainer", f"{t['ignite_img_s']:,.1f} img/s (overhead {t['overhead_pct']:+.1f}%)"),
        ("(c) epoch of 50,000 images", f"{e['seconds']:,.1f} s{' (estimated from (b))' if e['estimated'] else ''}"
                                       f", {e['img_s']:,.0f} img/s"),
    ]
    if "peak" in r:
        p = r["peak"]
        rows.append(("(c) share of bf16 peak", f"{100 * p['share']:.1f}% ({p['train_tflops']:.0f} of "
                                               f"{p['bf16_matmul_tflops']:.0f} TFLOP/s measured, "
                                               f"{p['train_gflop_per_image']:.2f} GFLOP per image)"))
        rows.append(("(c) 100 epochs, training only", f"{100 * e['seconds'] / 60:.1f} min"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
