"""CLI subcommands around the engine: train, evaluate, predict, report, demo."""

from __future__ import annotations

from pathlib import Path


def _data_or_simulated(args) -> str:
    if args.data:
        return args.data
    from .simulate import default_simulated_dataset

    path = default_simulated_dataset(seed=getattr(args, "seed", None) or 0)
    print(f"no --data given: using the simulated set at {path}")
    return str(path)


def _cmd_train(args) -> int:
    from .train import recipe, train

    if args.resume:
        summary = train(None, args.data, None, resume=args.resume, device=args.device,
                        allow_pickle=args.allow_pickle, stop_after_epoch=args.stop_after_epoch)
    else:
        cfg = recipe(args.recipe, epochs=args.epochs, image_size=args.image_size, batch_size=args.batch_size,
                     weights=args.weights, seed=args.seed, limit_per_class=args.limit_per_class, lr=args.lr,
                     crop=args.crop)
        summary = train(cfg, _data_or_simulated(args), args.out, device=args.device, allow_pickle=args.allow_pickle,
                        stop_after_epoch=args.stop_after_epoch)
    print(f"done: {summary['run']} (best epoch {summary['best_epoch']}, "
          f"{summary['config']['select_metric']} {summary['best_metric']:.4f})")
    return 0


def _cmd_evaluate(args) -> int:
    from .evaluate import evaluate

    out = args.out or str(Path(args.checkpoint).parent)
    m = evaluate(args.checkpoint, args.data, out, split=args.split, tta=args.tta, device=args.device,
                 n_bootstrap=args.bootstrap, allow_pickle=args.allow_pickle)
    ci = m["ci"]

    def fmt(v, c):
        return "n/a" if v is None else f"{v:.4f} [{c[0]:.4f}, {c[1]:.4f}]" if c else f"{v:.4f}"

    print(f"{m['provenance']['split_description']}: n={m['n']}")
    print(f"accuracy  {fmt(m['accuracy'], ci['accuracy'])}")
    print(f"macro AUC {fmt(m['auc']['macro'], ci['macro_auc'])}")
    print(f"micro AUC {fmt(m['auc']['micro'], ci['micro_auc'])}")
    for c, v in m["auc"]["per_class"].items():
        print(f"AUC {c:<6} {fmt(v, ci['per_class_auc'][c])}")
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
    import os
    import time

    from .notebook import REPO, _cpu_name, run_notebook, update_readme

    out_dir = Path(args.out or os.environ.get("DEEPLENSE_OUTPUT") or REPO / "demo_output").resolve()
    t0 = time.time()
    nb = run_notebook(output_dir=out_dir)
    minutes = (time.time() - t0) / 60
    print(f"executed notebook: {nb} ({minutes:.1f} min)")
    if args.no_readme:
        return 0
    import torch

    hw = torch.cuda.get_device_name(0) if torch.cuda.is_available() else _cpu_name()
    extra = (f"Produced by `make demo` (`python -m deeplense demo`, {minutes:.0f} min) on {hw}; "
             f"numbers copied from `demo_output/metrics.json` by `deeplense.notebook.update_readme`.\n\n")
    update_readme(out_dir / "metrics.json", extra=extra)
    print(f"updated the results table in {REPO / 'README.md'}")
    return 0


def add_commands(sub, add_common) -> None:
    p = sub.add_parser("train", help="fine-tune ResNet34 (recipes: default, reference); resumable",
                       description="Train on train/, select the checkpoint on the 90% model-selection part of "
                                   "val/, never touch the held-out 10%. Writes RUN/config.json, history.jsonl, "
                                   "last.pt and best.pt. Runs under torchrun for several GPUs or nodes.")
    add_common(p)
    p.add_argument("--out", metavar="RUN", help="run folder to create")
    p.add_argument("--recipe", default="default", choices=["default", "reference"],
                   help="default: AdamW + cosine + D4; reference: the reference solution's SGD recipe")
    p.add_argument("--epochs", type=int, help="override the recipe's epoch count")
    p.add_argument("--image-size", type=int, help="model input side in pixels (default 224)")
    p.add_argument("--crop", type=int, help="keep the central CROP native pixels first (ring region), e.g. 96")
    p.add_argument("--batch-size", type=int, help="override the recipe's batch size (per process)")
    p.add_argument("--lr", type=float, help="override the recipe's learning rate")
    p.add_argument("--weights", help="auto (default), imagenet, none, or a .pth state dict path")
    p.add_argument("--seed", type=int, help="seed for split, init, shuffling, augmentation (default 0)")
    p.add_argument("--limit-per-class", type=int, metavar="N", help="use at most N images per class")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: pick automatically)")
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its last.pt (--out is then ignored)")
    p.add_argument("--stop-after-epoch", type=int, metavar="E",
                   help="end this job after epoch E (the schedule still spans all epochs); --resume continues")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="metrics.json and predictions.npz on the held-out test set",
                       description="Evaluate a checkpoint on the held-out 10% of val (--split test, from the "
                                   "seed stored in the checkpoint) or the 90% selection part (--split val).")
    p.add_argument("--checkpoint", required=True, metavar="RUN/best.pt")
    add_common(p)
    p.add_argument("--out", metavar="DIR", help="output folder (default: the checkpoint's folder)")
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--tta", action="store_true", help="average over the 8 D4 flips/rotations")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% intervals")
    p.add_argument("--device", help="cpu, cuda, mps (default: pick automatically)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="classify .npy files; CSV path,predicted,p_no,p_sphere,p_vort",
                       description="Classify each FILE (or every .npy under each folder).")
    p.add_argument("--checkpoint", required=True, metavar="PATH")
    p.add_argument("paths", nargs="+", metavar="FILE_OR_DIR")
    p.add_argument("--output", metavar="preds.csv", help="write here instead of stdout")
    p.add_argument("--tta", action="store_true", help="average over the 8 D4 flips/rotations")
    p.add_argument("--device", help="cpu, cuda, mps (default: pick automatically)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickled object arrays (trusted files only)")
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


__all__ = ["add_commands"]
