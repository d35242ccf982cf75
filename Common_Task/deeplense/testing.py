"""Helpers for the tests and the benchmarks: tiny datasets in the official layout with learnable class patterns,
fast training settings, a pickle that shows it was loaded."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .data import CLASSES


def write_dataset(root: Path, n_train: int = 4, n_val: int = 10, *, seed: int = 0, size: int = 150) -> Path:
    """Real ``.npy`` files as users have them: float64 ``(1, size, size)``, per-image min-max, ``1.npy``...

    Each class gets a distinct, learnable pattern (a ring, a ring with blobs, a ring with a bar). Returns ``root``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    r = np.hypot(xx, yy)
    ring = np.exp(-((r - size * 0.19) ** 2) / (2 * (size * 0.04) ** 2))
    for split, n in (("train", n_train), ("val", n_val)):
        for label, cls in enumerate(CLASSES):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(1, n + 1):
                img = ring * (0.8 + 0.4 * rng.random()) + 0.05 * rng.standard_normal((size, size))
                if label == 1:
                    for _ in range(3):
                        cx, cy = rng.integers(size // 4, 3 * size // 4, 2)
                        img += 1.5 * np.exp(-((xx + size / 2 - cx) ** 2 + (yy + size / 2 - cy) ** 2) / 20)
                if label == 2:
                    img += 1.0 * (np.abs(yy) < size * 0.03) * (np.abs(xx) < size * 0.3)
                img = (img - img.min()) / (img.max() - img.min())
                np.save(d / f"{i}.npy", img[None].astype(np.float64))
    return root


FAST = dict(image_size=32, batch_size=8, weights="none", warmup_epochs=0.0)
"""Training settings for tests: tiny input, random initial weights, no warm-up."""


def quiet(**kw) -> dict:
    """Keyword arguments for ``train``/``evaluate`` in tests: on the CPU (bitwise repeatable), no output."""
    return dict(progress=False, log=lambda *a: None, device="cpu", **kw)


class TouchOnLoad:
    """A pickled payload with a visible effect: unpickling it creates the file ``marker`` (and yields a file
    object, not a tensor). Loading code that unpickles leaves the file behind, whatever error it reports."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def subprocess_env() -> dict:
    return {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
