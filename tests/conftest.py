"""Shared fixtures only: tiny datasets in the real layout, built in a temporary folder, and an isolated cache.
The helpers tests import (``FAST``, ``quiet``, ``write_dataset``, ...) are in :mod:`deeplense.testing`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deeplense.testing import write_dataset  # the helpers tests import live in deeplense.testing


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
