"""The GPU acceptance script (`python -m bench.gpu_check`, run by `bash bench/gpu.sh`) runs here on the
CPU, so that the first GPU it meets does not find it broken: every check that needs no GPU passes,
the ones that need one are skipped, the table and the JSON report are written, and the exit code says
whether anything failed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_the_acceptance_script_runs_its_checks_on_a_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check", str(tmp_path), "--device", "cpu",
                             "--n-train", "256", "--n-test", "60", "--epochs", "2", "--batch-size", "64"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = report["checks"]
    status = {name: c["status"] for name, c in checks.items()}
    assert {status[n] for n in ("cuda-tests", "evaluate-cpu", "cross-device")} == {"SKIP"}
    for name in ("graphed-vs-eager", "kill-resume", "sigterm-resume", "evaluate-gpu", "predict-gpu", "tensorboard"):
        assert status[name] == "PASS", (name, checks[name])
    # Not judged here: 8 iterations do not teach a 100-class head (the GPU check trains 4 x 391).
    assert status["learns"] in ("PASS", "FAIL")
    assert result.returncode == (1 if "FAIL" in status.values() else 0), result.stdout[-2000:]
    assert checks["kill-resume"]["killed_after_checkpoint"] == 6  # in the middle of epoch 2 (iterations 5-8)
    assert checks["graphed-vs-eager"]["graphed_vs_eager_max_top1_points"] == 0  # two eager runs on a CPU
    table = result.stdout[result.stdout.index("check             result"):]
    assert all(name in table for name in status) and table.strip().splitlines()[-1].startswith("all")
