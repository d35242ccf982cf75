"""Data-layer benchmarks, measured side by side in one run.

- ``dataset_open``: first load of a dataset (reads every ``.npy``, builds the cache) against the second
  load (reopens the memory-mapped cache). Goal: reopen under 2 s and at least 50x faster.
- ``data_pipeline``: images/s of turning cached arrays into model-ready training batches (224 px,
  [-1, 1], D4 augmentation) against the reference solution's per-sample pipeline (``np.load`` per file,
  uint8, PIL, Resize(256), CenterCrop(224), flip, ToTensor, Normalize; DataLoader with 2 workers, started
  before the timing). Best of 2 alternating timed passes each, after a warm-up pass. Goal: at least 10x on CPU.

Usage: ``python benchmarks/bench_data.py`` (quick: 3,750 files) or ``--full`` (37,500 files, about 7 GB
of float64 files written to a temporary folder, deleted afterwards).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from deeplense.data import load_split
from deeplense.testing import write_dataset  # the same realistic files the tests use
from deeplense.transforms import augment, preprocess

from common import emit, reference_sample, reference_transform


def make_dataset(root: Path, n_total: int) -> Path:
    """Write ``n_total`` float64 (1,150,150) files, 80/20 train/val, by copying a small set of templates."""
    templates = write_dataset(root / "_tmpl", 4, 0)
    per_class_train = int(n_total * 0.8) // 3
    per_class_val = n_total // 3 - per_class_train
    for split, n in (("train", per_class_train), ("val", per_class_val)):
        for cls in ("no", "sphere", "vort"):
            d = root / "dataset" / split / cls
            d.mkdir(parents=True, exist_ok=True)
            srcs = sorted((templates / "train" / cls).glob("*.npy"))
            for i in range(1, n + 1):
                shutil.copyfile(srcs[i % len(srcs)], d / f"{i}.npy")
    shutil.rmtree(templates)
    return root / "dataset"


def bench_dataset_open(data: Path) -> tuple[float, float]:
    t0 = time.perf_counter()
    load_split(data, "train")
    load_split(data, "val")
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    a, _ = load_split(data, "train", progress=False)
    b, _ = load_split(data, "val", progress=False)
    second = time.perf_counter() - t0
    assert a.shape[0] + b.shape[0] > 0
    return first, second


class ReferenceDataset(torch.utils.data.Dataset):
    """The reference solution's per-sample pipeline (``np.load`` per file, then :func:`common.reference_sample`)."""

    def __init__(self, files):
        self.files = files
        self.tf = reference_transform()

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return reference_sample(np.load(self.files[i]), self.tf), 0


def bench_pipeline(data: Path, n_images: int, batch: int = 32, rounds: int = 2) -> tuple[float, float]:
    """Images/s of one pass over ``n_images``, best of ``rounds`` timed passes each, after one untimed pass.

    The reference's DataLoader keeps its workers between passes (``persistent_workers``) and the untimed pass
    starts them: a training run starts them once, so their start-up is not part of the per-epoch cost. The
    timed passes alternate between the two pipelines, so a busy moment of the shared machine hits both.
    """
    files = sorted((data / "train").rglob("*.npy"))[:n_images]
    loader = torch.utils.data.DataLoader(ReferenceDataset(files), batch_size=batch, num_workers=2, shuffle=True,
                                         persistent_workers=True)
    images, _ = load_split(data, "train", progress=False)
    images = np.ascontiguousarray(images[:n_images])
    gen = torch.Generator().manual_seed(0)

    def reference_pass() -> int:
        return sum(x.shape[0] for x, _ in loader)

    def our_pass() -> int:
        seen = 0
        perm = torch.randperm(len(images), generator=gen).numpy()
        for s in range(0, len(perm), batch):
            idx = np.sort(perm[s : s + batch])
            seen += preprocess(augment(torch.from_numpy(images[idx]), "d4", generator=gen), 224).shape[0]
        return seen

    best = {"ref": 0.0, "ours": 0.0}
    for r in range(rounds + 1):
        for name, fn in (("ref", reference_pass), ("ours", our_pass)):
            t0 = time.perf_counter()
            seen = fn()
            if r:  # round 0 warms up: workers started, files in the page cache
                best[name] = max(best[name], seen / (time.perf_counter() - t0))
    return best["ref"], best["ours"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="37,500 files (the official set's size)")
    p.add_argument("--n", type=int, default=None, help="number of files (default 3,750; 37,500 with --full)")
    args = p.parse_args(argv)
    n = args.n or (37_500 if args.full else 3_750)
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="deeplense-bench-") as tmp:
        tmp = Path(tmp)
        os.environ["DEEPLENSE_CACHE"] = str(tmp / "cache")
        t0 = time.perf_counter()
        data = make_dataset(tmp, n)
        print(f"# wrote {n} float64 files in {time.perf_counter() - t0:.1f} s", flush=True)
        first, second = bench_dataset_open(data)
        import resource

        rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
        emit("dataset_open", f"{second:.2f} s reopen for {n} images, ratio {first / second:.1f} vs first load "
             f"{first:.1f} s", value=second, unit="s", ratio=first / second, goal=">= 50")
        emit("dataset_reopen", f"{second:.2f} s to reopen the cache of {n} images", value=second, unit="s",
             goal="<= 2", on="value")
        emit("memory_cache_build", f"{rss_gb:.2f} GB peak RSS of the process through building and reopening the "
             f"cache of {n} images", value=rss_gb, unit="GB", goal="<= 8", on="value")
        ref, ours = bench_pipeline(data, min(1024, n))
        emit("data_pipeline", f"{ours:.0f} img/s at 224 px with D4, ratio {ours / ref:.1f} vs reference PIL "
             f"pipeline {ref:.0f} img/s with its 2 workers already started", value=ours, unit="img/s",
             ratio=ours / ref, goal=">= 10")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
