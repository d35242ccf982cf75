"""deeplense.splits: the seeded, stratified held-out parts and what they depend on (and do not)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from deeplense.data import CLASSES, list_files, load_split
from deeplense.splits import split_holdout
from deeplense.testing import write_dataset


def test_split_holdout_properties():
    labels = np.repeat(np.arange(3), [2500, 2500, 2500])
    sel, test = split_holdout(labels, 0.1, seed=7)
    assert sel.dtype == np.int64 and test.dtype == np.int64
    assert np.all(np.diff(sel) > 0) and np.all(np.diff(test) > 0)
    assert len(np.intersect1d(sel, test)) == 0 and len(sel) + len(test) == len(labels)
    assert np.bincount(labels[test]).tolist() == [250, 250, 250]
    sel2, test2 = split_holdout(labels, 0.1, seed=7)
    np.testing.assert_array_equal(test, test2)
    _, test3 = split_holdout(labels, 0.1, seed=8)
    assert not np.array_equal(test, test3)
    # unbalanced: each class gives round(fraction * n_class)
    labels = np.repeat(np.arange(3), [15, 25, 35])
    _, test = split_holdout(labels, 0.1, seed=0)
    assert np.bincount(labels[test], minlength=3).tolist() == [2, 3, 4]  # round(1.5)=2, 2.5->3, 3.5->4


def test_heldout_files_do_not_depend_on_directory_order(tmp_path, monkeypatch):
    """The held-out test names the same files whatever order the filesystem lists them in (ext4, NFS and
    macOS each list a folder in their own order)."""
    data = write_dataset(tmp_path / "d", 1, 12)

    def held_out_files() -> tuple[set[str], dict[str, int]]:
        labels = load_split(data, "val", progress=False)[1]
        files = [p for p, _ in list_files(data, "val")]
        _, test = split_holdout(labels, 0.25, seed=3)
        return {files[i] for i in test}, {files[i]: int(labels[i]) for i in test}

    first, labelled = held_out_files()
    assert len(first) == 9 and all(Path(name).parent.name == CLASSES[lab] for name, lab in labelled.items())
    real_scandir = os.scandir

    class Shuffled:
        def __init__(self, path):
            self._it = real_scandir(path)

        def __enter__(self):
            entries = list(self._it)
            np.random.default_rng(len(entries)).shuffle(entries)
            return iter(entries)

        def __exit__(self, *exc):
            self._it.close()

    monkeypatch.setattr(os, "scandir", Shuffled)
    for p in data.rglob("*.npy"):  # and the cache must not hide a re-listing
        os.utime(p, ns=(2 * 10**9, 2 * 10**9))
    assert held_out_files()[0] == first
