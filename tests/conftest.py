"""Shared fixtures: tiny datasets in the real layout, built in a temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deeplense.testing import write_dataset

__all__ = ["FAST", "TouchOnLoad", "quiet", "subprocess_env", "write_dataset"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own $DEEPLENSE_CACHE and $TORCH_HOME, so nothing leaks between tests."""
    monkeypatch.setenv("DEEPLENSE_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    return write_dataset(tmp_path / "dataset")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """40 training and 12 val images per class: enough to learn the patterns."""
    return write_dataset(tmp_path_factory.mktemp("toy") / "dataset", n_train=40, n_val=12)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """6 training and 10 val images per class: runs in seconds."""
    return write_dataset(tmp_path_factory.mktemp("small") / "dataset", n_train=6, n_val=10)


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
