"""Which images train a model, which choose its checkpoint and which test it: the two protocols, the seeded
held-out parts, and the checks that the test images were really held out (``val/`` not ``train/``, the held-out
pixels as recorded)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .data import CLASSES, SPLITS, SplitInfo, _display
from .util import DeepLenseError


def pixel_digest(images: np.ndarray, idx: np.ndarray) -> str:
    """A short hash of the pixels of ``images[idx]`` in that order: recorded for the held-out images at training,
    recomputed at evaluation, so renamed or rewritten files are caught even when the names match."""
    h = hashlib.sha256()
    for i in np.asarray(idx, dtype=np.int64):
        h.update(np.ascontiguousarray(images[i], dtype=np.float32).tobytes())
    return h.hexdigest()[:32]


def check_disjoint(train: SplitInfo, val: SplitInfo, train_images: np.ndarray, val_images: np.ndarray) -> None:
    """Refuse a dataset whose ``val/`` is ``train/`` or shares images with it: the same folder (a symbolic link),
    the same files (hard or symbolic links: one inode, from the ``stat`` :func:`load_splits` already made) or the
    same pixels (copies). Any of these would put training images into the held-out test. The copies are found by
    one pixel row per image, confirmed on the whole image."""
    root = train.root
    a, b = (root / s for s in SPLITS)
    if a.resolve() == b.resolve():
        raise DeepLenseError(f"{b}: is the same folder as {a} (a link?): nothing would be held out of training")
    inodes = dict(zip(train.inodes, train.files, strict=True))
    for p, ino in zip(val.files, val.inodes, strict=True):
        twin = inodes.get(ino)
        if twin is not None:
            raise DeepLenseError(f"{_display(p, root)}: is the same file as {_display(twin, root)} (a hard or symbolic "
                                 f"link): val/ must not share images with train/")
    if train_images.shape[-2:] != val_images.shape[-2:] or not len(train_images) or not len(val_images):
        return
    row = train_images.shape[-2] // 2
    keys: dict[bytes, list[int]] = {}
    for i in range(len(train_images)):
        keys.setdefault(np.asarray(train_images[i, 0, row]).tobytes(), []).append(i)
    for j in range(len(val_images)):
        for i in keys.get(np.asarray(val_images[j, 0, row]).tobytes(), ()):
            if np.array_equal(train_images[i], val_images[j]):
                raise DeepLenseError(f"{_display(val.files[j], root)}: has the same pixels as "
                                     f"{_display(train.files[i], root)} (a copy): val/ must not share images "
                                     f"with train/")


def limit_per_class(labels: np.ndarray, idx: np.ndarray, n: int | None) -> np.ndarray:
    """The first ``n`` of ``idx`` per class (all of them when ``n`` is None): ``--limit-per-class``."""
    if n is None:
        return idx
    return np.sort(np.concatenate([idx[labels[idx] == c][:n] for c in range(len(CLASSES))]))


def split_holdout(labels: np.ndarray, fraction: float = 0.1, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cut the official ``val`` split into a model-selection part and a held-out test part.

    Each class gives ``round(fraction * n_class)`` images (half rounds up) to the test part. The draw
    depends only on the labels and the seed.

    Returns
    -------
    selection_idx, test_idx : sorted int64 arrays indexing ``labels``, disjoint, together covering all.
    """
    labels = np.asarray(labels)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5E1EC7]))
    test = []
    for c in range(len(CLASSES)):
        idx = np.flatnonzero(labels == c)
        k = int(np.floor(fraction * len(idx) + 0.5))
        test.append(idx[rng.permutation(len(idx))[:k]])
    test_idx = np.sort(np.concatenate(test)).astype(np.int64)
    return complement_of(test_idx, len(labels))


@dataclass(frozen=True)
class ProtocolSplit:
    """Which images train the model, which choose its checkpoint, which test it (indices, sorted int64).

    ``reference`` protocol: all of ``train`` trains; ``val`` minus a held-out part selects; the held-out part
    tests. ``clean`` protocol: ``train`` minus a held-out part trains; that part selects; all of ``val`` tests.
    """

    protocol: str
    train_idx: np.ndarray  # into train
    selection_split: str  # "val" (reference) or "train" (clean)
    selection_idx: np.ndarray  # into selection_split
    test_idx: np.ndarray | None  # into val; None: all of val (clean)

    def record(self) -> dict:
        """What checkpoints store, so that evaluation and resumption use exactly these images."""
        return {"protocol": self.protocol, "selection_split": self.selection_split,
                "selection_indices": self.selection_idx.tolist(),
                "heldout_test_indices": None if self.test_idx is None else self.test_idx.tolist()}

    @classmethod
    def from_record(cls, rec: dict, n_train: int, n_val: int | None) -> ProtocolSplit:
        """The split a checkpoint recorded, for a dataset of ``n_train`` / ``n_val`` images (checked)."""
        if rec.get("protocol", "reference") == "reference":
            sel, test = complement_of(rec["heldout_test_indices"], n_val)
            return cls("reference", np.arange(n_train, dtype=np.int64), "val", sel, test)
        train, sel = complement_of(rec["selection_indices"], n_train)
        return cls("clean", train, "train", sel, None)

    def describe(self, n_val: int) -> str:
        n_test = n_val if self.test_idx is None else len(self.test_idx)
        return (f"{self.protocol} protocol: {len(self.train_idx)} train images train the model, "
                f"{len(self.selection_idx)} images of {self.selection_split} choose the checkpoint, "
                f"{n_test} images of val test it")


def protocol_split(protocol: str, train_labels: np.ndarray, val_labels: np.ndarray | None, fraction: float = 0.1,
                   *, seed: int = 0) -> ProtocolSplit:
    """The split of a run: ``reference`` holds out ``fraction`` of ``val`` per class for the test; ``clean``
    holds out ``fraction`` of ``train`` per class for selection (``val_labels`` unused). Seeded, stratified
    (:func:`split_holdout`)."""
    if protocol == "reference":
        sel, test = split_holdout(val_labels, fraction, seed=seed)
        return ProtocolSplit("reference", np.arange(len(train_labels), dtype=np.int64), "val", sel, test)
    if protocol == "clean":
        train, sel = split_holdout(train_labels, fraction, seed=seed)
        return ProtocolSplit("clean", train, "train", sel, None)
    raise DeepLenseError(f"unknown protocol {protocol!r} (choose reference or clean)")


def complement_of(held_idx, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rest, held)`` of ``n`` images whose held-out part is ``held_idx`` (sorted, unique, in range: checked)."""
    held = np.asarray(held_idx, dtype=np.int64)
    if held.ndim != 1 or (held.size and (held.min() < 0 or held.max() >= n)) or np.any(np.diff(held) <= 0):
        raise DeepLenseError(f"held-out indices must be sorted, unique and within the {n} images of the split")
    mask = np.ones(n, dtype=bool)
    mask[held] = False
    return np.flatnonzero(mask).astype(np.int64), held
