"""``python -m deeplense``: one entry point, one subcommand per job.

User mistakes (a bad file, a missing folder) end with a one-line ``error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .util import DeepLenseError


# ----------------------------------------------------------------------------------------------- jobs
def _cmd_inspect(args) -> int:
    import numpy as np

    from .data import CLASSES, SPLITS, load_splits

    info: dict = {}
    loaded = load_splits(args.data, SPLITS, allow_pickle=args.allow_pickle, info=info)
    print(f"dataset root: {info[SPLITS[0]].root}")
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


def _data_or_simulated(args) -> str:
    if args.data:
        return args.data
    from .simulate import default_simulated_dataset

    path = default_simulated_dataset(seed=args.seed or 0)
    print(f"no --data given: using the simulated set at {path}")
    return str(path)


TRAIN_OPTIONS = ("epochs", "image_size", "crop", "batch_size", "lr", "weights", "seed", "limit_per_class")


def _cmd_train(args) -> int:
    from .config import recipe
    from .train import train

    if args.resume:
        summary = train(None, args.data, None, resume=args.resume, device=args.device,
                        allow_pickle=args.allow_pickle, stop_after_epoch=args.stop_after_epoch)
    else:
        given = {k: getattr(args, k) for k in TRAIN_OPTIONS if getattr(args, k) is not None}
        cfg = recipe(args.recipe, **given)  # checked before any data is simulated or loaded
        summary = train(cfg, _data_or_simulated(args), args.out, device=args.device, allow_pickle=args.allow_pickle,
                        stop_after_epoch=args.stop_after_epoch)
    print(f"done: {summary['run']} (best epoch {summary['best_epoch']}, "
          f"{summary['config']['select_metric']} {summary['best_metric']:.4f})")
    return 0


def _cmd_evaluate(args) -> int:
    from .evaluate import evaluate
    from .report import format_ci

    out = args.out or str(Path(args.checkpoint).parent)
    m = evaluate(args.checkpoint, args.data, out, split=args.split, tta=args.tta, device=args.device,
                 n_bootstrap=args.bootstrap, allow_pickle=args.allow_pickle)
    ci = m["ci"]
    print(f"{m['provenance']['split_description']}: n={m['n']}")
    print(f"accuracy  {format_ci(m['accuracy'], ci['accuracy'], 4)}")
    print(f"macro AUC {format_ci(m['auc']['macro'], ci['macro_auc'], 4)}")
    print(f"micro AUC {format_ci(m['auc']['micro'], ci['micro_auc'], 4)}")
    for c, v in m["auc"]["per_class"].items():
        print(f"AUC {c:<6} {format_ci(v, ci['per_class_auc'][c], 4)}")
    print(f"wrote {out}/metrics.json and {out}/predictions.npz")
    return 0


def _cmd_predict(args) -> int:
    from .evaluate import predict_files

    predict_files(args.checkpoint, args.paths, args.output, tta=args.tta, device=args.device,
                  allow_pickle=args.allow_pickle)
    if args.output:
        print(f"wrote {args.output}")
    return 0


def _cmd_report(args) -> int:
    from .report import report

    for p in report(args.run, args.figures):
        print(p)
    return 0


def _cmd_demo(args) -> int:
    import time

    from .notebook import run_notebook
    from .report import update_readme
    from .util import REPO, hardware_name

    out_dir = Path(args.out or os.environ.get("DEEPLENSE_OUTPUT") or REPO / "demo_output").resolve()
    t0 = time.time()
    nb = run_notebook(output_dir=out_dir)
    minutes = (time.time() - t0) / 60
    print(f"executed notebook: {nb} ({minutes:.1f} min)")
    if args.no_readme:
        return 0
    import json

    device = json.loads((out_dir / "metrics.json").read_text())["provenance"]["device"]
    extra = (f"Produced by `make demo` (`python -m deeplense demo`, {minutes:.0f} min) on {hardware_name(device)}; "
             f"numbers copied from `demo_output/metrics.json` by `deeplense.report.update_readme`.\n\n")
    update_readme(out_dir / "metrics.json", extra=extra)
    print(f"updated the results table in {REPO / 'README.md'}")
    return 0


# ----------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deeplense",
        description="Classify strong-lensing images by dark-matter substructure: no, sphere (CDM subhalos), "
                    "vort (axion-like vortex).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # options several jobs share, declared once
    pickle = argparse.ArgumentParser(add_help=False)
    pickle.add_argument("--allow-pickle", action="store_true",
                        help="allow pickled object arrays (Model I sets); pickles can run code: trusted files only")
    data = argparse.ArgumentParser(add_help=False, parents=[pickle])
    data.add_argument("--data", metavar="DIR", help="dataset folder (holding train/ and val/) or a wrapper above "
                                                    "it; omitted: the run's own or a small simulated set")
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: CUDA, then MPS, then CPU)")
    tta = argparse.ArgumentParser(add_help=False)
    tta.add_argument("--tta", action="store_true", help="average over the 8 D4 flips/rotations")

    p = sub.add_parser("inspect", parents=[pickle], help="validate a dataset, build its cache, print counts, "
                                                         "shape and range",
                       description="Find the dataset under DIR, validate every file of both splits, build the "
                                   "load cache ($DEEPLENSE_CACHE), and print the resolved root, counts per split "
                                   "and class, array shape, dtype and value range.")
    p.add_argument("--data", required=True, metavar="DIR", help="dataset folder or any wrapper above it")
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

    p = sub.add_parser("train", parents=[data, device],
                       help="fine-tune ResNet34 (recipes: default, reference); resumable",
                       description="Train on train/, select the checkpoint on the 90% model-selection part of "
                                   "val/, never touch the held-out 10%. Writes RUN/config.json, history.jsonl, "
                                   "last.pt and best.pt. Runs under torchrun for several GPUs or nodes.")
    p.add_argument("--out", metavar="RUN", help="run folder to create")
    p.add_argument("--recipe", default="default", choices=["default", "reference"],
                   help="default: AdamW + cosine + D4; reference: the reference solution's SGD recipe")
    p.add_argument("--epochs", type=int, help="override the recipe's epoch count")
    p.add_argument("--image-size", type=int, help="model input side in pixels (default 224)")
    p.add_argument("--crop", help="keep the central CROP native pixels first (ring region), e.g. 96; none: no crop")
    p.add_argument("--batch-size", type=int, help="override the recipe's batch size (per process)")
    p.add_argument("--lr", type=float, help="override the recipe's learning rate")
    p.add_argument("--weights", help="auto (default), imagenet, none, or a .pth state dict path")
    p.add_argument("--seed", type=int, help="seed for split, init, shuffling, augmentation (default 0)")
    p.add_argument("--limit-per-class", type=int, metavar="N", help="use at most N images per class")
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its last.pt (--out is then ignored)")
    p.add_argument("--stop-after-epoch", type=int, metavar="E",
                   help="end this job after epoch E (the schedule still spans all epochs); --resume continues")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", parents=[data, device, tta],
                       help="metrics.json and predictions.npz on the held-out test set",
                       description="Evaluate a checkpoint on the held-out 10% of val (--split test, from the "
                                   "seed stored in the checkpoint) or on the model-selection part "
                                   "(--split selection).")
    p.add_argument("--checkpoint", required=True, metavar="RUN/best.pt")
    p.add_argument("--out", metavar="DIR", help="output folder (default: the checkpoint's folder)")
    p.add_argument("--split", default="test", choices=["test", "selection", "val"],
                   help="test (default): the held-out part of val; selection (alias val): the part that chose "
                        "the checkpoint")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% intervals")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", parents=[pickle, device, tta],
                       help="classify .npy files; CSV path,predicted,p_no,p_sphere,p_vort",
                       description="Classify each FILE (or every .npy under each folder).")
    p.add_argument("--checkpoint", required=True, metavar="PATH")
    p.add_argument("paths", nargs="+", metavar="FILE_OR_DIR")
    p.add_argument("--output", metavar="preds.csv", help="write here instead of stdout")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("report", help="redraw every figure from metrics.json, predictions.npz, history.jsonl",
                       description="Redraw the ROC (per class, macro/micro average), confusion-matrix and "
                                   "training-curve figures of RUN without the model.")
    p.add_argument("--run", required=True, metavar="RUN", help="folder with metrics.json and predictions.npz")
    p.add_argument("--figures", metavar="DIR", help="where to write PNG and PDF files (default RUN/figures)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("demo", help="execute the notebook end to end (what `make demo` runs)",
                       description="Execute Common_Task/DeepLense_Classification.ipynb top to bottom in place. "
                                   "Uses $DEEPLENSE_DATA (or ./dataset) if present, else a simulated set.")
    p.add_argument("--out", metavar="DIR", help="output folder for the run (default demo_output/)")
    p.add_argument("--no-readme", action="store_true", help="do not copy the results table into README.md")
    p.set_defaults(func=_cmd_demo)
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
