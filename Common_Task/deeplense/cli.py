"""``python -m deeplense``: one entry point, one subcommand per job.

User mistakes (a bad file, a missing folder) end with a one-line ``error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from .util import DeepLenseError


def _cmd_inspect(args) -> int:
    import numpy as np

    from .data import CLASSES, SPLITS, load_splits

    info: dict = {}
    loaded = load_splits(args.data, SPLITS, allow_pickle=args.allow_pickle, info=info)
    root = info[SPLITS[0]].root
    print(f"dataset root: {root}")
    for s in SPLITS:
        images, labels = loaded[s]
        counts = np.bincount(labels, minlength=len(CLASSES))
        per_class = ", ".join(f"{c}={n}" for c, n in zip(CLASSES, counts, strict=True))
        lo, hi = float(images.min()), float(images.max())
        src = "cache" if info[s].from_cache else "files (cache built)"
        print(f"{s}: {len(labels)} images ({per_class}); array {tuple(images.shape)} {images.dtype}; "
              f"values [{lo:.4g}, {hi:.4g}]; loaded from {src}")
    return 0


def _cmd_simulate(args) -> int:
    from .simulate import SimulationConfig, parse_shard, simulate_dataset

    cfg = SimulationConfig.from_preset(args.preset)  # an unknown preset raises a DeepLenseError
    if args.distance_convention:
        cfg = cfg.replace(distance_convention=args.distance_convention)
    shard = parse_shard(args.shard)
    out = simulate_dataset(args.out, train_per_class=args.train_per_class, val_per_class=args.val_per_class,
                           seed=args.seed, workers=args.workers, config=cfg, shard=shard)
    print(f"wrote {out['written']} images ({out['skipped']} already present) to {args.out}; "
          f"manifest {out['manifest']}")
    if args.figure:
        import numpy as np

        from .data import CLASSES, read_image
        from .plots import examples_grid

        n = min(4, args.val_per_class)
        files = [f"{args.out}/val/{c}/{i}.npy" for c in CLASSES for i in range(1, n + 1)]
        if not all(os.path.exists(f) for f in files):
            raise DeepLenseError(f"--figure: the first {n} val images per class are not all in {args.out} "
                                 f"(a sharded run? draw it after all shards finish)")
        images = np.stack([read_image(f)[None] for f in files])
        for path in examples_grid(images, np.repeat(np.arange(len(CLASSES)), n), args.figure, per_class=n,
                                  title=f"Simulated examples ({cfg.preset} preset, seed {args.seed})"):
            print(f"wrote {path}")
    return 0


def _add_common_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="dataset folder (holding train/ and val/); omitted: a small simulated set "
                                  "is generated under $DEEPLENSE_CACHE")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow pickled object arrays (Model I sets); pickles can run code: trusted files only")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deeplense",
        description="Classify strong-lensing images by dark-matter substructure: no, sphere (CDM subhalos), "
                    "vort (axion-like vortex).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("inspect", help="validate a dataset, build its cache, print counts, shape and range",
                       description="Find the dataset under DIR, validate every file of both splits, build the "
                                   "load cache ($DEEPLENSE_CACHE), and print the resolved root, counts per split "
                                   "and class, array shape, dtype and value range.")
    p.add_argument("--data", required=True, metavar="DIR", help="dataset folder or any wrapper above it")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow pickled object arrays (Model I sets); pickles can run code: trusted files only")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("simulate", help="write a simulated dataset in the official layout (lenstronomy)",
                       description="Simulate strong-lensing images with lenstronomy and write "
                                   "OUT/{train,val}/{no,sphere,vort}/<i>.npy plus OUT/manifest.csv. Finished "
                                   "files are skipped, so an interrupted run can simply be restarted.")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--train-per-class", type=int, default=100, metavar="N", help="train images per class")
    p.add_argument("--val-per-class", type=int, default=30, metavar="M", help="val images per class")
    p.add_argument("--seed", type=int, default=0, help="master seed; same seed, same bytes (default 0)")
    p.add_argument("--workers", type=int, default=1, metavar="W", help="worker processes (default 1)")
    p.add_argument("--preset", default="common_task", help="common_task (default) or model_i")
    p.add_argument("--distance-convention", choices=["deeplense", "angular"], default=None,
                   help="Einstein radius from luminosity distances with D_ls = D_s - D_l (deeplense, the "
                        "DeepLenseSim convention, default) or from angular-diameter distances (angular)")
    p.add_argument("--figure", metavar="STEM",
                   help="also draw the first 4 val images per class to STEM.png and STEM.pdf")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="write only images whose position in (split, class, index) order is K mod N")
    p.set_defaults(func=_cmd_simulate)

    from . import cli_train  # the training-side commands live beside their engine

    cli_train.add_commands(sub, _add_common_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except DeepLenseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
