"""benchmarks/bench_gpu.py measures the engine itself: checked on the CPU, where its timing core runs too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deeplense.engine as engine

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_the_gpu_benchmark_times_the_engines_own_step(monkeypatch):
    sys.path.insert(0, str(BENCH))
    try:
        import bench_gpu
    finally:
        sys.path.remove(str(BENCH))
    steps, calls = 2, []
    real_step = engine.train_step

    def spy(net, opt, scaler, xb, yb, config, plan, draws=None):
        calls.append((len(xb), config.augmentation, draws is not None))
        return real_step(net, opt, scaler, xb, yb, config, plan, draws)

    monkeypatch.setattr(engine, "train_step", spy)
    x, y = torch.rand(16, 1, 40, 40), torch.randint(0, 3, (16,))
    ours, alone, precision = bench_gpu.engine_step_rate(x, y, torch.device("cpu"), 4, steps, image_size=32,
                                                        arch="resnet18")
    from deeplense.device import plan_for

    assert ours > 0 and alone > 0 and precision == plan_for("cpu").precision  # auto: bf16 where the CPU has it
    timed = 3 + steps  # warm-up and timed calls of each kind
    assert calls == [(4, "d4", True)] * timed + [(4, "none", False)] * timed


@pytest.mark.slow
def test_without_cuda_it_says_skipped_and_needs_no_install():
    """The GPU node has its own torch and no package registry: the script runs from the checkout alone."""
    root = BENCH.parent
    r = subprocess.run([sys.executable, str(BENCH / "bench_gpu.py"), "--quick", "--no-compile"], capture_output=True,
                       text=True, timeout=120, cwd=root, env={"PYTHONPATH": str(root / "Common_Task"),
                                                              "PATH": "/usr/bin:/bin"})
    if torch.cuda.is_available():  # pragma: no cover - a GPU machine runs the real thing in make bench-gpu
        return
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "gpu: skipped (no CUDA device on this machine)"
