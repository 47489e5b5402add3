"""Where a training step's time goes on CUDA: eager vs CUDA-graph replay of the same step.

`python -m bench.gpu_profile`: times, at the recipe's batch of 128, (1) the augmentation alone, (2) the
eager forward+backward+SGD step, (3) the same step replayed from a captured CUDA graph (no Python or
launch overhead: the GPU's own time), (4) torch.compile in "reduce-overhead" mode (CUDA graphs). If (2) is close to (3) the step is GPU-bound; if far above, CPU-bound.
"""
from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F

from app.augment import BatchAugment
from app.device import resolve_device
from app.model import cifar_resnet18
from app.optim import CapturableSGD


def timed(fn, device, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    return (time.perf_counter() - start) / iters


def main() -> None:
    device = resolve_device("auto")
    iters = 50 if device.type == "cuda" else 2
    batch = 128
    out: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 100, (batch,), device=device)
    aug = BatchAugment(generator=torch.Generator(device).manual_seed(0))
    out["augment_ms"] = 1e3 * timed(lambda: aug(images), device, iters)
    x_static = aug(images).contiguous(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if device.type == "cuda" else None

    def make(compile_mode=None):
        model = cifar_resnet18().to(device, memory_format=torch.channels_last)
        opt = CapturableSGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)  # the app's
        fwd = torch.compile(model, mode=compile_mode) if compile_mode else model

        def step():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(fwd(x_static), labels)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            opt.step()
            return loss
        return model, opt, step

    _, _, eager = make()
    out["eager_step_ms"] = 1e3 * timed(eager, device, iters)
    out["eager_full_step_ms"] = 1e3 * timed(lambda: (aug(images), eager()), device, iters)
    if device.type == "cuda":
        _, _, step = make()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        out["graph_step_ms"] = 1e3 * timed(graph.replay, device, iters)
        for mode in ("reduce-overhead",):
            try:
                t0 = time.perf_counter()
                _, _, cstep = make(mode)
                for _ in range(3):
                    cstep()
                out[f"compile_{mode}_warmup_s"] = time.perf_counter() - t0
                out[f"compile_{mode}_step_ms"] = 1e3 * timed(cstep, device, iters)
            except Exception as e:  # noqa: BLE001 - report and go on
                out[f"compile_{mode}_error"] = str(e).splitlines()[0][:200]
            print(json.dumps(out), flush=True)
    for k in list(out):
        if k.endswith("_ms"):
            out[k.replace("_ms", "_img_s")] = batch / out[k] * 1e3
    print(json.dumps(out, indent=1))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
