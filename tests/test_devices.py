"""A checkpoint written on one device is used on another: it is loaded on the CPU, and each object takes
its state where it lives (the model and optimizer to the training device; a generator's state stays the
CPU byte tensor it must be).

A checkpoint written on a GPU differs from a CPU one only in the location recorded with each storage
("cuda:0"); `torch.save` takes it from `torch.serialization.location_tag`. Here the files are re-saved
with that location, so that this machine, which has no GPU, holds real GPU-tagged checkpoints: loading
one without a map location fails here exactly as it would for a file from a GPU machine. What else a GPU
checkpoint holds is its augmentation generator's state, a CUDA generator's (16 bytes: Philox seed and
offset), which a CPU generator cannot take; those files are written here with such a state. The other
direction (a CPU checkpoint resumed on a GPU), and both directions with files from a real GPU, are in the
GPU acceptance check (tests/acceptance, test_cross_device).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from app.checkpoint import load_checkpoint
from bench.levers import tensors_in
from tests.support import run_main


def write_as_if_from_a_gpu(src: Path, dst: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(checkpoint, dst)


def test_a_gpu_checkpoint_loads_here_only_through_the_cpu(finished_run, tmp_path: Path, monkeypatch) -> None:
    run_dir = finished_run.run_dir
    gpu = tmp_path / "gpu.pt"
    write_as_if_from_a_gpu(run_dir / "checkpoints" / "training_checkpoint_10.pt", gpu, monkeypatch)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(gpu, weights_only=True)  # where it was written: there is no GPU here
    checkpoint = load_checkpoint(gpu)
    tensors = list(tensors_in(checkpoint))
    assert len(tensors) > 100 and {t.device.type for t in tensors} == {"cpu"}
    generators = checkpoint["augment"]["generators"]
    assert generators.dtype == torch.uint8 and generators.device.type == "cpu"


def test_a_gpu_checkpoint_resumes_on_the_cpu_exactly(run_copy, monkeypatch) -> None:
    """Resumed from the epoch-1 checkpoint, relabelled as a GPU file (its generator state still a CPU
    generator's), the run ends with the weights of the uninterrupted run: every state (weights, momentum
    buffers, schedule, generator) arrived intact."""
    run_dir = run_copy.run_dir
    reference = torch.load(run_dir / "checkpoints" / "training_checkpoint_10.pt", weights_only=True)
    epoch1 = run_dir / "checkpoints" / "training_checkpoint_5.pt"
    write_as_if_from_a_gpu(epoch1, epoch1, monkeypatch)
    (run_dir / "checkpoints" / "training_checkpoint_10.pt").unlink()

    result = run_main("--config", str(run_copy.config), "--resume", str(epoch1), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    resumed = torch.load(run_dir / "checkpoints" / "training_checkpoint_10.pt", weights_only=True)
    for name, value in reference["model"].items():
        assert torch.equal(resumed["model"][name], value), name
    for key, state in reference["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][key]["momentum_buffer"], state["momentum_buffer"])
    assert torch.equal(resumed["augment"]["generators"], reference["augment"]["generators"])


def test_evaluate_and_predict_take_a_gpu_checkpoint(finished_run, tmp_path: Path, monkeypatch) -> None:
    run_dir = finished_run.run_dir
    best = next((run_dir / "checkpoints").glob("best.pt"))
    gpu = tmp_path / best.name
    write_as_if_from_a_gpu(best, gpu, monkeypatch)
    result = run_main("evaluate", "--checkpoint", str(gpu), "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    logged = json.loads((run_dir / "results.json").read_text())["best"]
    report = json.loads(result.stdout)
    assert (report["top1"], report["top5"]) == (logged["top1"], logged["top5"])

    image = tmp_path / "red.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    predicted = run_main("predict", "--checkpoint", str(gpu), str(image), "--json")
    assert predicted.returncode == 0, predicted.stderr
    assert len(json.loads(predicted.stdout)[0]["top"]) == 5


def cuda_generator_state(seed: int, offset: int) -> torch.Tensor:
    """What `torch.Generator("cuda").get_state()` returns: the Philox seed and offset, 8 bytes each."""
    return torch.tensor(list(seed.to_bytes(8, "little") + offset.to_bytes(8, "little")), dtype=torch.uint8)


def test_a_gpu_checkpoint_with_a_cuda_generator_resumes_on_the_cpu(finished_run, tmp_path: Path,
                                                                   monkeypatch) -> None:
    """A CPU generator cannot take a CUDA generator's state: the run resumes with augmentation re-seeded
    from it, says so, finishes, and does the same every time it is resumed from that checkpoint."""
    src, cfg = finished_run.run_dir, finished_run.config
    ends = []
    for attempt in ("a", "b"):
        run_dir = tmp_path / attempt / "runs" / "r"
        shutil.copytree(src, run_dir)
        epoch1 = run_dir / "checkpoints" / "training_checkpoint_5.pt"
        checkpoint = torch.load(epoch1, weights_only=True)
        checkpoint["augment"]["generators"] = cuda_generator_state(2024 * 7919, 40)[None]
        torch.save(checkpoint, epoch1)
        write_as_if_from_a_gpu(epoch1, epoch1, monkeypatch)
        (run_dir / "checkpoints" / "training_checkpoint_10.pt").unlink()
        config = json.loads(cfg.read_text())
        config["logging"]["output_dir"] = str(tmp_path / attempt / "runs")
        (tmp_path / attempt / "c.json").write_text(json.dumps(config))

        result = run_main("--config", str(tmp_path / attempt / "c.json"), "--resume", str(epoch1), "--device", "cpu")
        assert result.returncode == 0, result.stderr
        assert "another kind of device" in result.stdout and "epoch 2/2" in result.stdout
        assert json.loads((run_dir / "results.json").read_text())["status"] == "finished"
        ends.append(torch.load(run_dir / "checkpoints" / "training_checkpoint_10.pt", weights_only=True))
    assert ends[0]["augment"]["generators"].numel() == 5056  # a CPU generator's state from here on
    assert torch.equal(ends[0]["augment"]["generators"], ends[1]["augment"]["generators"])
    for name, value in ends[0]["model"].items():
        assert torch.equal(ends[1]["model"][name], value), name
