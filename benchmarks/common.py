"""What every benchmark shares: one way to report a result and judge its goal, a timer that waits for the device,
and the reference solution's per-sample input pipeline (the baseline two benchmarks measure against).

A benchmark reports each result once, with :func:`emit`: it prints the line people read (``name: text``, plus
whether the goal was met) and, when ``$DEEPLENSE_BENCH_RESULTS`` names a file, appends the same result as one
JSON line there, which ``run_all.py`` reads instead of parsing the printed text.
"""

from __future__ import annotations

import json
import operator
import os
import time
from pathlib import Path

import numpy as np

RESULTS_ENV = "DEEPLENSE_BENCH_RESULTS"
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def judge(measured: float | None, goal: str | None) -> bool | None:
    """Whether ``measured`` meets ``goal`` (``">= 50"``, ``"<= 1.15"``, ...); None when there is no goal or no
    number to judge."""
    if goal is None or measured is None or not np.isfinite(measured):
        return None
    op, _, threshold = goal.strip().partition(" ")
    if op not in _OPS:
        raise ValueError(f"goal {goal!r}: expected '<op> <number>' with op one of {', '.join(_OPS)}")
    return bool(_OPS[op](float(measured), float(threshold)))


def emit(name: str, text: str, *, value: float | None = None, unit: str = "", ratio: float | None = None,
         goal: str | None = None, on: str = "ratio") -> bool | None:
    """Report one result: ``name: text`` on stdout, then ``[goal <goal> on <on>: met|MISSED]`` when there is a goal,
    and a JSON line in ``$DEEPLENSE_BENCH_RESULTS`` if set. ``goal`` applies to ``ratio`` (``on="ratio"``) or to
    ``value`` (``on="value"``). Returns whether the goal was met (None: no goal)."""
    met = judge(ratio if on == "ratio" else value, goal)
    verdict = "" if goal is None else f" [goal: {on} {goal}: {'met' if met else 'MISSED' if met is False else 'n/a'}]"
    print(f"{name}: {text}{verdict}", flush=True)
    path = os.environ.get(RESULTS_ENV)
    if path:
        record = {"name": name, "text": text, "value": value, "unit": unit, "ratio": ratio, "goal": goal, "on": on,
                  "met": met}
        with open(path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
    return met


def read_results(path: str | os.PathLike) -> list[dict]:
    """The results :func:`emit` appended to ``path`` (none if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def synchronizer(device=None):
    """A function that waits until ``device`` has finished its queued work (CUDA, MPS; nothing on the CPU), so a
    timer around it measures the work and not its launch."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    if dev.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def timed(fn, warmup: int, steps: int, sync=None) -> float:
    """Seconds per call of ``fn`` after ``warmup`` untimed calls, the device synchronised around the timing."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t0) / steps


def reference_transform():
    """The reference solution's per-sample transform of a PIL image: Resize(256), CenterCrop(224), a random
    horizontal flip, ToTensor, Normalize(0.5, 0.5) per channel."""
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])


def reference_sample(image: np.ndarray, transform):
    """One image ``(150, 150)`` in [0, 1] as the reference solution feeds it: 8-bit, PIL 'L' then 'RGB', then
    ``transform`` (:func:`reference_transform`)."""
    from PIL import Image

    img = Image.fromarray((np.asarray(image).reshape(image.shape[-2:]) * 255).astype(np.uint8), mode="L")
    return transform(img.convert("RGB"))
