"""train.compile: the compiled step is the eager step within rounding, compiles once per batch shape and,
once warmed up, runs where nothing may compile (the CUDA-graph capture's stance); and compiled code lands
in the output folder, where a second process finds it instead of compiling again."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from app import commands
from app.augment import build_augment
from app.compiling import CACHE_FOLDER, compile_model, use_compile_cache
from app.config import Config, override
from app.engines import Precision, make_train_step, use_cuda_graphs
from app.optim import build_optimizer, build_scheduler
from tests.support import ROOT, app_env, image_batches, run_config, run_main, small_net

# One process's compile of a tiny module, forward and backward, with the run's cache folder set where the
# application sets it (app/commands.py): before dynamo is imported. Prints what inductor's and AOT
# autograd's caches did.
CHILD = """
import json, sys
from pathlib import Path
from app.compiling import compile_model, use_compile_cache
from app.config import Config, override
folder = use_compile_cache(override(Config(), {"train.compile": True}), Path(sys.argv[1]))
import torch
from torch._dynamo.utils import counters
torch.manual_seed(0)
model = compile_model(torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)))
model(torch.randn(3, 8)).square().sum().backward()
print(json.dumps({"folder": str(folder), **{k: dict(counters[k]) for k in ("inductor", "aot_autograd")}}))
"""


def _compile_in_a_process(output_dir: Path, elsewhere: Path) -> dict:
    env = app_env(TORCHINDUCTOR_CACHE_DIR=str(elsewhere / "inductor"), TRITON_CACHE_DIR=str(elsewhere / "triton"))
    ran = subprocess.run([sys.executable, "-c", CHILD, str(output_dir)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    return json.loads(ran.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two processes that import torch and compile: 36 s and 19 s on 2 shared CPU cores
def test_a_second_process_finds_the_first_ones_compiled_code_in_the_output_folder(tmp_path: Path) -> None:
    """The first compiles (misses, and saves forward and backward); the second finds both and compiles
    nothing. Everything is under OUTPUT_DIR/.compile_cache, whatever cache folders the environment named."""
    output_dir, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    first = _compile_in_a_process(output_dir, elsewhere)
    second = _compile_in_a_process(output_dir, elsewhere)

    cache = output_dir / CACHE_FOLDER
    assert first["folder"] == second["folder"] == str(cache.absolute())
    assert first["aot_autograd"].get("autograd_cache_miss", 0) >= 1
    assert "autograd_cache_hit" not in first["aot_autograd"]
    assert first["inductor"].get("fxgraph_cache_miss", 0) >= 2  # forward and backward
    assert second["aot_autograd"].get("autograd_cache_hit", 0) >= 1
    assert "autograd_cache_miss" not in second["aot_autograd"] and "fxgraph_cache_miss" not in second["inductor"]
    for kind in ("aotautograd", "fxgraph"):
        assert any(p.is_file() for p in (cache / kind).rglob("*")), kind
    assert not elsewhere.exists()


def test_the_cache_folder_is_set_only_where_the_run_compiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing compiles: the environment stays as it was. The optimizer's update compiles too (train.fused_update)."""
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name))  # and restored after the test
    assert use_compile_cache(Config(), tmp_path / "runs") is None
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "TORCHINDUCTOR_CACHE_DIR")
    folder = use_compile_cache(override(Config(), {"train.fused_update": True}), tmp_path / "runs")
    assert folder == tmp_path / "runs" / CACHE_FOLDER
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)
    assert os.environ["TRITON_CACHE_DIR"] == str(folder / "triton")


def test_the_launcher_points_the_runs_processes_at_the_output_folders_cache(tmp_path: Path, small_data: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """app/commands.py: by the time the run's processes start (here: would start), the environment they
    inherit names OUTPUT_DIR/.compile_cache. (The whole run, train.fused_update compiling ResNet18's
    update on this CPU, takes 155 s: the mechanism itself is the two-process test above.)"""
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name))  # this process's own, restored after the test
    started = []
    monkeypatch.setattr(commands, "run_processes", lambda *args, **kwargs: started.append(
        {k: os.environ[k] for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}))
    for compiled, runs in ((False, "eager"), (True, "compiled")):
        cfg = run_config(tmp_path / "c.json", small_data, tmp_path / runs, train={"fused_update": compiled})
        ran = run_main("--config", str(cfg), "--run-name", "r")
        assert ran.returncode == 0, ran.stderr
    cache = tmp_path / "compiled" / CACHE_FOLDER
    assert started == [{"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "TORCHINDUCTOR_CACHE_DIR"),
                        "TRITON_CACHE_DIR": str(tmp_path / "TRITON_CACHE_DIR")},
                       {"TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton")}]


def test_graphs_hold_the_step_on_one_gpu_whatever_its_precision_or_compilation() -> None:
    """The rule (app/engines.py): on one GPU the step is graphed, fp16 (its loss scaling is device
    operations) and torch.compile included; DDP, the CPU and train.cuda_graphs false keep the eager step."""
    cuda = torch.device("cuda")
    for settings in ({}, {"train.compile": True}, {"train.amp": "fp16"}, {"train.amp": "fp16", "train.compile": True}):
        cfg = override(Config(), settings)
        assert use_cuda_graphs(cfg, cuda, 1), settings
        assert not use_cuda_graphs(cfg, cuda, 2) and not use_cuda_graphs(cfg, torch.device("cpu"), 1), settings
        assert not use_cuda_graphs(override(cfg, {"train.cuda_graphs": False}), cuda, 1), settings


@pytest.mark.slow  # compiles forward and backward for two batch shapes on the CPU: 20-45 s on 2 shared cores
def test_the_compiled_step_equals_the_eager_one_and_once_warmed_up_compiles_nothing_more(fresh_compiles) -> None:
    """Two epochs of three batches (the last smaller) through the application's step and schedule, the
    model compiled as train.compile compiles it, against the same step on the model itself: the same
    losses, weights, momentum buffers and BatchNorm statistics within float rounding. One static graph
    per batch shape. Then what the CUDA-graph step relies on when it captures (app/cuda_graph.py): under
    dynamo's fail_on_recompile stance both warmed-up shapes run, and a shape never seen raises instead
    of compiling."""
    cfg = override(Config(), {"train.epochs": 2, "train.device": "cpu"})
    epoch, device = image_batches([8, 8, 5]), torch.device("cpu")
    sides = []
    for compiled in (False, True):
        model = small_net()
        optimizer = build_optimizer(cfg, model)
        scheduler = build_scheduler(cfg, optimizer, len(epoch))
        step = make_train_step(compile_model(model) if compiled else model, optimizer,
                               build_augment(cfg.augment, torch.Generator().manual_seed(1)), device,
                               Precision(None, False))
        sides.append((model, optimizer, scheduler, step))
    graphs = counters["stats"]["unique_graphs"]
    losses: list[list[float]] = [[], []]
    for _ in range(cfg.train.epochs):
        for images, labels in epoch:
            for side, (_, _, scheduler, step) in enumerate(sides):
                losses[side].append(step(images, labels)[0].item())
                scheduler.step()

    assert counters["stats"]["unique_graphs"] - graphs == 2  # one per batch shape, static
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    (eager, eager_opt, _, _), (model, optimizer, _, step) = sides
    # The convolution's bias, BatchNorm right after it, has a gradient of zero plus rounding noise (1e-7 to
    # 1e-6), different noise in each backward: its buffer is noise, compared at the scale of the largest.
    buffer_scale = max(b["momentum_buffer"].abs().max().item() for b in eager_opt.state.values())
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(optimizer.state[p]["momentum_buffer"], eager_opt.state[q]["momentum_buffer"],
                                   rtol=1e-5, atol=1e-5 * buffer_scale, msg=name)
    for a, b in zip(model.buffers(), eager.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    with torch.compiler.set_stance("fail_on_recompile"):
        for images, labels in epoch:
            step(images, labels)
        with pytest.raises(RuntimeError, match="fail_on_recompile"):
            step(*image_batches([3])[0])
    assert counters["stats"]["unique_graphs"] - graphs == 2
