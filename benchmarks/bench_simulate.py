"""Simulator benchmark, measured side by side in one run.

- per class, for the default ``realistic`` preset and the earlier ``common_task``: images/s on one core for a whole
  image (draws, lenstronomy rendering, noise, normalisation) against lenstronomy's own cost for the same noisy
  image: ``ImageModel.image`` with a prebuilt model and ready arguments, plus lenstronomy's own noise functions
  (``realistic``: ``image_util.add_poisson`` on model + sky and ``add_background`` for the read-out noise;
  ``common_task``: ``add_poisson`` twice and ``add_background``). Goal: our cost within 15% of lenstronomy's
  (ratio <= 1.15).
- ``simulate`` with 1 and 2 worker processes over the same set. Goal: speed-up >= 1.7 on an idle machine.
- per preset, how many of the 15 realism statistics (``deeplense.realism``) have their median outside the real
  sample's 10-90% range (the committed ``realism_targets.json``; no real file is read).

Usage: ``python benchmarks/bench_simulate.py`` (quick) or ``--full`` (more images per measurement).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from lenstronomy.Util import image_util

from deeplense.data import CLASSES
from deeplense.simulate import (
    DEFAULT_PRESET,
    PRESETS,
    SimulationConfig,
    draw_parameters,
    image_model,
    lens_kwargs,
    simulate_dataset,
    simulate_image,
    source_kwargs,
)

from common import emit


def per_class(cfg: SimulationConfig, n: int) -> None:
    counts = cfg.noise_model == "counts"
    for cls in CLASSES:
        simulate_image(cfg, 0, "train", cls, 0)  # build the class's model once, as each worker does
        params = [draw_parameters(cfg, 0, "train", cls, i) for i in range(1, n + 1)]
        args = [(lens_kwargs(cfg, p), source_kwargs(cfg, p)) for p in params]
        model = image_model(cfg, cls)
        t0 = time.perf_counter()
        for (kl, ks), p in zip(args, params, strict=True):
            img = model.image(kwargs_lens=kl, kwargs_source=ks)
            if counts:
                sky = img + p.value("sky_rate", cfg)
                img = sky + image_util.add_poisson(sky, p.exposure_s) + image_util.add_background(
                    img, cfg.read_noise_counts / p.exposure_s)
            else:
                img = img + image_util.add_poisson(img, p.exposure_s) + image_util.add_background(img, 0.01)
                img = img + image_util.add_poisson(img, p.exposure_s)
        bare = (time.perf_counter() - t0) / n
        t0 = time.perf_counter()
        for i in range(1, n + 1):
            simulate_image(cfg, 0, "train", cls, i, dtype=np.dtype(cfg.file_dtype))
        ours = (time.perf_counter() - t0) / n
        emit(f"simulate_{cfg.preset}_{cls}", f"{1 / ours:.1f} img/s/core ({ours * 1e3:.1f} ms), ratio "
             f"{ours / bare:.2f} vs lenstronomy rendering + its noise functions {bare * 1e3:.1f} ms",
             value=1 / ours, unit="img/s/core", ratio=ours / bare, goal="<= 1.15")


def workers(cfg: SimulationConfig, per_class_n: int) -> None:
    times = {}
    for w in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            simulate_dataset(Path(tmp), train_per_class=per_class_n, val_per_class=1, seed=0, workers=w,
                             config=cfg, progress=False)
            times[w] = time.perf_counter() - t0
    n = 3 * (per_class_n + 1)
    emit("simulate_workers", f"{n / times[2]:.1f} img/s with 2 workers, ratio {times[1] / times[2]:.2f} vs 1 worker "
         f"{n / times[1]:.1f} img/s (includes process start-up)", value=n / times[2], unit="img/s",
         ratio=times[1] / times[2], goal=">= 1.7")


def statistics(n_per_class: int) -> None:
    from deeplense import realism as R

    targets = R.load_targets()
    for preset in PRESETS:
        cfg = SimulationConfig.from_preset(preset)
        imgs = np.stack([simulate_image(cfg, 1, "val", c, i, dtype=np.float64)[0] for c in CLASSES
                         for i in range(1, n_per_class + 1)])
        outside = R.outside_targets(R.statistics(imgs), targets)
        emit(f"realism_{preset}", f"{len(outside)} of {len(R.STATISTICS)} statistics with the median outside the "
             f"real 10-90% range" + (f" ({', '.join(sorted(outside))})" if outside else ""), value=len(outside),
             unit="statistics", goal="<= 0" if preset == DEFAULT_PRESET else None, on="value")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="larger samples (slower, steadier)")
    args = p.parse_args(argv)
    cfg = SimulationConfig.from_preset("realistic")
    per_class(cfg, 60 if args.full else 20)
    per_class(SimulationConfig.from_preset("common_task"), 60 if args.full else 20)
    workers(cfg, 300 if args.full else 100)  # enough work that spawning the pool does not dominate
    statistics(30 if args.full else 10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
