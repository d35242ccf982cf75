"""``python -m deeplense``: one entry point, one subcommand per job.

User mistakes (a bad file, a missing folder) end with a one-line ``error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import EVAL_SPLITS, RECIPES, cast, settings
from .simulate import DEFAULT_PRESET, DISTANCE_CONVENTIONS, PRESET_HELP, PRESETS
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
    if args.figure:
        _check_writable(Path(args.figure).parent)
    _check_writable(args.out)
    out = simulate_dataset(args.out, train_per_class=args.train_per_class, val_per_class=args.val_per_class,
                           seed=args.seed, workers=args.workers, config=cfg, shard=shard)
    print(f"wrote {out['written']} images ({out['skipped']} already present) to {args.out}; "
          f"manifest {out['manifest']}; substructure positions {out['substructure']}")
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


def _cmd_realism(args) -> int:
    from . import realism as R
    from .util import versions, write_json_atomic

    if args.list:
        for name, doc in R.describe().items():
            print(f"{name}: {doc}")
        return 0
    if not args.real:
        raise DeepLenseError("--real DIR is required (the folder of real images to compare with)")
    _check_writable(args.out)
    if args.save_targets:
        _check_writable(Path(args.save_targets).parent, args.save_targets)
    real_images, real_labels = R.read_images(args.real)
    if args.data:
        sim_images, sim_labels = R.read_images(args.data, limit_per_class=args.n)
        label, source = f"data {Path(args.data).name}", {"data": str(args.data)}
    else:
        from .simulate import SimulationConfig

        sim_images, sim_labels = R.simulate_images(args.preset, args.n, seed=args.seed)
        label = f"preset {args.preset}"
        source = {"preset": args.preset, "n_per_class": args.n, "seed": args.seed,
                  "config": SimulationConfig.from_preset(args.preset).to_dict()}
    R.check_samples((real_images, real_labels), (sim_images, sim_labels), f"--real {args.real}",
                    f"--data {args.data}" if args.data else f"--preset {args.preset}")
    if real_images.shape[1:] != sim_images.shape[1:]:
        raise DeepLenseError(f"{args.real}: images of {real_images.shape[1:]} px, the simulated ones "
                             f"{sim_images.shape[1:]}: the statistics need one size")
    result, rs, ss = R.realism(real_images, real_labels, sim_images, sim_labels, seed=args.seed,
                               n_bootstrap=args.bootstrap)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    which = f"--data {args.data}" if args.data else f"--preset {args.preset}"
    command = (f"python -m deeplense realism --real {args.real} {which} --n {args.n} --seed {args.seed} "
               f"--bootstrap {args.bootstrap} --out {args.out}")
    record = {"real": {"folder": str(args.real), "n": int(len(real_labels))}, "simulated": source, **result,
              "seed": args.seed, "versions": versions(), "command": command}
    write_json_atomic(out / "realism.json", record)
    if args.save_targets:
        write_json_atomic(args.save_targets, R.targets(rs, source=str(args.real)))
        print(f"wrote {args.save_targets} (the real sample's median and 10-90% of each statistic)")
    paths = R.figure(rs, ss, out / "realism", label=label, comparison=result["comparison"])
    print(R.format_table(result, label))
    print(f"wrote {out / 'realism.json'}, " + ", ".join(str(p) for p in paths))
    return 0


def _data_or_simulated(args) -> str:
    if args.data:
        return args.data
    from .simulate import default_simulated_dataset

    path = default_simulated_dataset(seed=args.seed or 0)
    print(f"no --data given: using the simulated set at {path}")
    return str(path)


TRAIN_OPTIONS = tuple(name for name, *_ in settings() if name != "recipe")
"""Every :class:`~deeplense.config.TrainConfig` field is a ``train`` option (``--recipe`` picks the base instead)."""
DEVICE_OPTIONS = ("precision", "eval_batch_size")
"""How to compute, not what: shared by train, evaluate and predict, and the only settings ``--resume`` may change."""


def _cmd_train(args) -> int:
    from .config import recipe
    from .train import rank_device, resume, train

    given = {k: getattr(args, k) for k in TRAIN_OPTIONS if hasattr(args, k)}  # given ones only, `none` included
    if args.resume:
        precision = given.pop("precision", None)  # how to compute may change on resume, what to compute may not
        if given or args.out or args.recipe:
            named = [f"--{k.replace('_', '-')}" for k in given] + (["--out"] if args.out else []) + (
                ["--recipe"] if args.recipe else [])
            raise DeepLenseError(f"train --resume {args.resume}: {', '.join(named)} cannot change a run; it continues "
                                 f"with the settings it started with (start a new run with --out to change them)")
        summary = resume(args.resume, args.data, device=args.device, precision=precision,
                         allow_pickle=args.allow_pickle, stop_after_epoch=args.stop_after_epoch,
                         compile_model=args.compile)
    else:
        if not args.out:
            raise DeepLenseError("train: --out RUN is required (or --resume RUN)")
        cfg = recipe(args.recipe or "default", **given)  # checked before any data is simulated or loaded
        from .device import pick_device, plan_for

        plan_for(pick_device(rank_device(args.device)), cfg.precision)  # so are the device and its precision
        _check_writable(args.out)
        summary = train(cfg, _data_or_simulated(args), args.out, device=args.device, allow_pickle=args.allow_pickle,
                        stop_after_epoch=args.stop_after_epoch, compile_model=args.compile)
    if summary.get("rank", 0) == 0:  # under torchrun: one line, not one per process
        print(f"done: {summary['run']} (best epoch {summary['best_epoch']}, "
              f"{summary['config']['select_metric']} {summary['best_metric']:.4f})")
    return 0


def _cmd_evaluate(args) -> int:
    from .evaluate import evaluate
    from .report import format_ci

    out = args.out or str(Path(args.checkpoint).parent)
    _check_writable(out)
    m = evaluate(args.checkpoint, args.data, out, split=args.split, tta=args.tta, device=args.device,
                 n_bootstrap=args.bootstrap, allow_pickle=args.allow_pickle,
                 allow_changed_data=args.allow_changed_data, precision=_given(args, "precision"),
                 eval_batch_size=_given(args, "eval_batch_size"), calibrated=args.calibrated)
    ci = m["ci"]
    print(f"{m['provenance']['split_description']}: n={m['n']}")
    if m["provenance"]["heldout_check"].startswith("NOT"):
        print(f"WARNING: {m['provenance']['heldout_check']}")
    print(f"accuracy  {format_ci(m['accuracy'], ci['accuracy'], 4)}")
    why = ci.get("auc_unavailable")
    print(f"macro AUC {format_ci(m['auc']['macro'], ci['macro_auc'], 4, why)}")
    print(f"micro AUC {format_ci(m['auc']['micro'], ci['micro_auc'], 4, why)}")
    for c, v in m["auc"]["per_class"].items():
        print(f"AUC {c:<6} {format_ci(v, ci['per_class_auc'][c], 4, why)}")
    cal = m["calibration"]
    for name in ("uncalibrated", "calibrated"):
        if cal[name]:
            t = f" (temperature {cal['temperature']:.3f})" if name == "calibrated" else ""
            print(f"ECE {name}{t} {format_ci(cal[name]['ece'], cal[name]['ece_ci'], 4)}")
    print(f"wrote {out}/metrics.json and {out}/predictions.npz")
    return 0


def _cmd_predict(args) -> int:
    from .evaluate import predict_files

    if args.output:
        _check_writable(Path(args.output).parent, args.output)

    predict_files(args.checkpoint, args.paths, args.output, tta=args.tta, device=args.device,
                  allow_pickle=args.allow_pickle, precision=_given(args, "precision"),
                  eval_batch_size=_given(args, "eval_batch_size"),
                  calibrated=args.calibrated)
    if args.output:
        print(f"wrote {args.output}")
    return 0


def _cmd_explain(args) -> int:
    from .explain import explain_evaluation, explain_files

    methods = tuple(dict.fromkeys(args.method)) if args.method else None
    _check_writable(args.out)
    if args.evaluation:
        if args.checkpoint or args.paths or args.tta:
            raise DeepLenseError("explain --evaluation DIR reads the checkpoint, the images and the TTA setting from "
                                 "the evaluation; give no --checkpoint, --tta or files with it")
        r = explain_evaluation(args.evaluation, args.out, per_class=args.per_class, device=args.device,
                               **({"methods": methods} if methods else {}))
        for cls, by_method in r["per_class"].items():
            for m, e in by_method.items():
                if isinstance(e, dict):
                    ci = f" [{e['ci'][0]:.2f}, {e['ci'][1]:.2f}]" if e["ci"] else " [interval n/a: 1 image]"
                    print(f"{cls}: {m} enrichment {e['ratio']:.2f}{ci} within {e['radius_px']:g} px "
                          f"({e['n']} images)")
        print(f"wrote {Path(args.out) / 'enrichment.json'} and {Path(args.out) / 'saliency_examples.png'}")
        return 0
    if not args.checkpoint or not args.paths:
        raise DeepLenseError("explain: give --checkpoint CKPT and FILES (or --evaluation DIR)")
    written = explain_files(args.checkpoint, args.paths, args.out, tta=args.tta, device=args.device,
                            allow_pickle=args.allow_pickle, **({"methods": methods} if methods else {}))
    print(f"wrote {len(written)} files to {args.out}")
    return 0


def _cmd_report(args) -> int:
    from .report import report

    _check_writable(args.figures or Path(args.run) / "figures")

    for p in report(args.run, args.figures):
        print(p)
    return 0


def _cmd_doctor(args) -> int:
    from .doctor import main as doctor_main

    return doctor_main(args)


def _cmd_demo(args) -> int:
    import time

    from .device import hardware_name
    from .notebook import NOTEBOOK, check_environment, check_run_folder, env_name, run_notebook
    from .report import update_readme
    from .util import REPO

    out_dir = Path(args.out or os.environ.get("DEEPLENSE_OUTPUT") or REPO / "demo_output").resolve()
    _check_writable(out_dir)  # before the run, not after it has drawn over the README's figures
    check_run_folder(out_dir)  # a training run or a user's files there are refused, never deleted
    check_environment()  # a misspelt DEEPLENSE_* variable, before the kernel starts
    t0 = time.time()
    if args.no_readme:  # leave the README, its figures and the committed notebook alone
        nb = run_notebook(output_dir=out_dir, env={env_name("FIGURES"): out_dir / "figures"},
                          save_to=out_dir / NOTEBOOK.name)
    else:
        nb = run_notebook(output_dir=out_dir)
    minutes = (time.time() - t0) / 60
    print(f"executed notebook: {nb} ({minutes:.1f} min)")
    if args.no_readme:
        return 0
    import json

    device = json.loads((out_dir / "metrics.json").read_text())["provenance"]["device"]
    extra = (f"Produced by `make demo` (`python -m deeplense demo`, {minutes:.0f} min) on {hardware_name(device)}. "
             f"The numbers are copied from `demo_output/metrics.json` by `deeplense.report.update_readme`.\n\n")
    update_readme(out_dir / "metrics.json", extra=extra)
    print(f"updated the results table in {REPO / 'README.md'}")
    return 0


OPTION_RANGES = {
    # (command, option): (valid?, what it must be); the training options' ranges are TrainConfig's own (config.py)
    ("simulate", "seed"): (lambda v: v >= 0, "0 or more"),
    ("simulate", "workers"): (lambda v: v >= 1, "at least 1"),
    ("simulate", "train_per_class"): (lambda v: v >= 1, "at least 1"),
    ("simulate", "val_per_class"): (lambda v: v >= 1, "at least 1"),
    ("train", "stop_after_epoch"): (lambda v: v >= 1, "at least 1"),
    ("evaluate", "bootstrap"): (lambda v: v >= 0, "0 (no intervals) or more"),
    ("explain", "per_class"): (lambda v: v >= 1, "at least 1"),
    ("doctor", "steps"): (lambda v: v >= 0, "0 or more"),
    ("realism", "n"): (lambda v: v >= 2, "at least 2 (simulated images per class)"),
    ("realism", "seed"): (lambda v: 0 <= v < 2**32, "0 or more and below 2**32"),
    ("realism", "bootstrap"): (lambda v: v >= 1, "at least 1 (the two-sample AUC's interval)"),
}
"""The range of every numeric option of a command that is not a training setting: checked in one place
(:func:`check_option_ranges`) before any work."""


def check_option_ranges(args) -> None:
    for (command, name), (ok, text) in OPTION_RANGES.items():
        value = getattr(args, name, None)
        if getattr(args, "command", None) == command and value is not None and not ok(value):
            raise DeepLenseError(f"--{name.replace('_', '-')} {value}: must be {text}")


def _given(args, name: str):
    """The value of a config option (:func:`_add_config_options`) if it was given, else None."""
    return getattr(args, name, None)


def _check_writable(folder, file=None) -> None:
    """Refuse, before any work, a folder that is a file, lies under a file, or cannot be written."""
    folder = Path(folder)
    for p in (folder, *folder.parents):
        if p.exists():
            if not p.is_dir():
                raise DeepLenseError(f"{p}: is a file, not a folder" + ("" if p == folder else f" (for {folder})"))
            if not os.access(p, os.W_OK | os.X_OK):
                raise DeepLenseError(f"{p}: not writable" + ("" if p == folder else f" (needed to create {folder})"))
            break
    if file is not None and Path(file).is_dir():
        raise DeepLenseError(f"{file}: is a folder, not a file")


# ----------------------------------------------------------------------------------------------- parser
_NOT_TRAINING_HELP = {
    "precision": "auto (bf16 autocast on CUDA GPUs with native bf16, fp16 on older ones, fp32 on MPS and the CPU), "
                 "fp32, bf16 or fp16 (default auto)",
    "eval_batch_size": "images per prediction batch (default: 128 on a CPU; on a GPU the largest power of 2 up to "
                       "1024 that fits, halved once on an out-of-memory error)",
    "weights": "the initial weights the runs will use, to check that they are there: auto (ImageNet if in the torch "
               "hub cache, else random initialisation), imagenet, none, or a .pth file (default auto)",
}
"""The help of the config options that evaluate, predict and doctor share with train: theirs have no recipe."""


def _add_config_options(parser: argparse.ArgumentParser, names: tuple[str, ...], training: bool = True) -> None:
    """One ``--name`` option per named :class:`~deeplense.config.TrainConfig` field, with the field's help and
    choices (:func:`deeplense.config.settings`): the command line cannot fall behind the config. Values are cast
    and checked by the config itself (its ranges too, at parse time); an option left out is not in ``args`` at all
    (``argparse.SUPPRESS``), so it keeps the recipe's (or the checkpoint's) value, while ``none`` given sets None.
    ``training``: the help of ``train`` (with the default recipe's value), else :data:`_NOT_TRAINING_HELP`."""
    for name, _, _, text, allowed in settings():
        if name not in names:
            continue
        default = getattr(RECIPES["default"], name)
        shown = f"{text} (default recipe: {default})" if training else _NOT_TRAINING_HELP[name]
        parser.add_argument(f"--{name.replace('_', '-')}", type=None if allowed else _caster(name), choices=allowed,
                            metavar=None if allowed else name.upper(), default=argparse.SUPPRESS,
                            help=shown.replace("%", "%%"))


def _caster(name: str):
    """argparse's ``type`` for field ``name``: the config's own casting (``none`` for optional fields), its error
    as argparse's one-line usage error."""

    def parse(text: str):
        try:
            return cast(name, text)
        except DeepLenseError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("training config: ")) from None

    parse.__name__ = name  # what argparse names in "invalid <type> value"
    return parse


def _preset_help() -> str:
    """The presets, one clause each, from :data:`deeplense.simulate.PRESET_HELP` (``%`` escaped for argparse)."""
    text = "; ".join(f"{name}: {what}" for name, what in PRESET_HELP.items())
    return f"{text} (default {DEFAULT_PRESET})".replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deeplense",
        description="Classify strong-lensing images by dark-matter substructure: no, sphere (CDM subhalos), "
                    "vort (axion-like vortex).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    shared = _shared_options()
    for add in (_add_inspect, _add_simulate, _add_train, _add_evaluate, _add_predict, _add_explain, _add_report,
                _add_doctor, _add_realism, _add_demo):
        add(sub, shared)
    return parser


def _shared_options() -> dict[str, argparse.ArgumentParser]:
    """The options several commands share, declared once, as argparse parents."""
    pickle = argparse.ArgumentParser(add_help=False)
    pickle.add_argument("--allow-pickle", action="store_true",
                        help="allow pickled object arrays (Model I sets); pickles can run code: trusted files only")
    data = argparse.ArgumentParser(add_help=False, parents=[pickle])
    data.add_argument("--data", metavar="DIR", help="dataset folder (holding train/ and val/) or a wrapper above "
                                                    "it; omitted: a small simulated set (with --resume: the run's own)")
    recorded_data = argparse.ArgumentParser(add_help=False, parents=[pickle])
    recorded_data.add_argument("--data", metavar="DIR", help="dataset folder (holding train/ and val/) or a wrapper "
                                                             "above it; omitted: the one the checkpoint recorded")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: CUDA, then MPS, then CPU)")
    device = argparse.ArgumentParser(add_help=False, parents=[where])
    _add_config_options(device, DEVICE_OPTIONS, training=False)
    tta = argparse.ArgumentParser(add_help=False)
    tta.add_argument("--tta", action="store_true", help="average over the symmetries the run trained with (the 8 "
                                                        "flips and quarter turns of D4; the 4 of D2 for "
                                                        "--augmentation d2); d4net's output cannot change under "
                                                        "them, so for it one pass is made, not 8")
    tta.add_argument("--calibrated", action="store_true",
                     help="scale the probabilities by the temperature fitted on the run's selection images (stored "
                          "in best.pt); the predicted class is unchanged")

    return {"pickle": pickle, "data": data, "recorded_data": recorded_data, "where": where, "device": device,
            "tta": tta}


def _add_inspect(sub, shared: dict) -> None:
    p = sub.add_parser("inspect", parents=[shared["pickle"]], help="validate a dataset, build its cache, print counts, "
                                                         "shape and range",
                       description="Find the dataset under DIR, validate every file of both splits, build the "
                                   "load cache ($DEEPLENSE_CACHE), and print the resolved root, counts per split "
                                   "and class, array shape, dtype and value range.")
    p.add_argument("--data", required=True, metavar="DIR", help="dataset folder or any wrapper above it")
    p.set_defaults(func=_cmd_inspect)


def _add_simulate(sub, shared: dict) -> None:
    p = sub.add_parser("simulate", help="write a simulated dataset in the official layout (lenstronomy)",
                       description="Simulate strong-lensing images with lenstronomy and write "
                                   "OUT/{train,val}/{no,sphere,vort}/<i>.npy plus OUT/manifest.csv. Finished "
                                   "files are skipped, so an interrupted run can simply be restarted.")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--train-per-class", type=int, default=100, metavar="N", help="train images per class")
    p.add_argument("--val-per-class", type=int, default=30, metavar="M", help="val images per class")
    p.add_argument("--seed", type=int, default=0, help="master seed; same seed, same bytes (default 0)")
    p.add_argument("--workers", type=int, default=1, metavar="W", help="worker processes (default 1)")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS), help=_preset_help())
    p.add_argument("--distance-convention", choices=DISTANCE_CONVENTIONS, default=None,
                   help="Einstein radius from luminosity distances with D_ls = D_s - D_l (deeplense, the "
                        "DeepLenseSim convention, default) or from angular-diameter distances (angular)")
    p.add_argument("--figure", metavar="STEM",
                   help="also draw the first 4 val images per class to STEM.png and STEM.pdf")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="write only images whose position in (split, class, index) order is K mod N")
    p.set_defaults(func=_cmd_simulate)


def _add_train(sub, shared: dict) -> None:
    p = sub.add_parser("train", parents=[shared["data"], shared["where"]],
                       help="train a network (ResNet34 by default; recipes: default, reference); resumable",
                       description="Train on train/, select the checkpoint on the 90% model-selection part of "
                                   "val/, never touch the held-out 10% (--protocol clean: select on 10% of train, "
                                   "never touch val). Writes RUN/config.json, history.jsonl, last.pt and best.pt. "
                                   "Runs under torchrun for several GPUs or nodes.")
    p.add_argument("--out", metavar="RUN", help="run folder to create")
    p.add_argument("--recipe", choices=list(RECIPES),
                   help="the settings to start from: default (AdamW + cosine + D4, the default) or reference (the "
                        "reference solution's SGD recipe); each option below overrides one of them")
    _add_config_options(p, TRAIN_OPTIONS)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network (for GPUs; the first steps take a while longer)")
    p.add_argument("--resume", metavar="RUN", help="continue RUN from its last.pt with the settings it started with "
                                                   "(--out, --recipe and training options are refused; --data, "
                                                   "--device and --precision may change)")
    p.add_argument("--stop-after-epoch", type=int, metavar="E",
                   help="end this job after epoch E (the schedule still spans all epochs); --resume continues")
    p.set_defaults(func=_cmd_train)


def _add_evaluate(sub, shared: dict) -> None:
    p = sub.add_parser("evaluate", parents=[shared["recorded_data"], shared["device"], shared["tta"]],
                       help="metrics.json and predictions.npz on the held-out test set",
                       description="Evaluate a checkpoint on its test images (--split test: the held-out part of "
                                   "val the checkpoint recorded, or all of val under the clean protocol) or on the "
                                   "images that chose it (--split selection).")
    p.add_argument("--checkpoint", required=True, metavar="RUN/best.pt",
                   help="the checkpoint to evaluate (a run's best.pt; it records its data, split and settings)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: the checkpoint's folder)")
    p.add_argument("--split", default="test", choices=EVAL_SPLITS,
                   help="test (default): the held-out part of val; selection (alias val): the part that chose "
                        "the checkpoint")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples for the 95%% intervals (default 1000; 0: no intervals)")
    p.add_argument("--allow-changed-data", action="store_true",
                   help="evaluate even when the data differ from training's (files added, removed, renamed or "
                        "modified, or val/ sharing files or pixels with train/); the result is then marked as NOT "
                        "a held-out test (metrics.json, tables, figure titles)")
    p.set_defaults(func=_cmd_evaluate)


def _add_predict(sub, shared: dict) -> None:
    p = sub.add_parser("predict", parents=[shared["pickle"], shared["device"], shared["tta"]],
                       help="classify .npy files; CSV path,predicted,p_no,p_sphere,p_vort",
                       description="Classify each FILE (or every .npy under each folder).")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="the checkpoint to predict with (a run's "
                                                                       "best.pt)")
    p.add_argument("paths", nargs="+", metavar="FILE_OR_DIR")
    p.add_argument("--output", metavar="preds.csv", help="write here instead of stdout")
    p.set_defaults(func=_cmd_predict)


def _add_explain(sub, shared: dict) -> None:
    from .explain import METHODS, RADIUS_PX

    p = sub.add_parser("explain", parents=[shared["pickle"]],
                       help="saliency maps (Grad-CAM, Grad-CAM++, integrated gradients) of files, or checked against "
                            "the true substructure of an evaluation's simulated images",
                       description="With --checkpoint and FILES: per image, the image, each method's map for the "
                                   "predicted class and the probabilities (OUT/<folder>_<name>.png|pdf, the maps in "
                                   "OUT/saliency.npz). With --evaluation DIR (an `evaluate` output on a simulated "
                                   "set): the enrichment of each method's saliency within "
                                   f"{RADIUS_PX:g} px of the true subhalos and vortex lines, against the same "
                                   "structures turned about the lens centre (OUT/enrichment.json), and a figure of "
                                   "examples (OUT/saliency_examples.png|pdf).")
    p.add_argument("--checkpoint", metavar="PATH", help="best.pt of a run (with FILES)")
    p.add_argument("paths", nargs="*", metavar="FILE_OR_DIR")
    p.add_argument("--evaluation", metavar="DIR", help="a folder `python -m deeplense evaluate` wrote; its "
                                                       "checkpoint, images and TTA setting are used")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the figures, saliency.npz (with "
                                                                "FILES) or enrichment.json (with --evaluation)")
    p.add_argument("--method", action="append", choices=METHODS,
                   help="repeat for several (default: all of them)")
    p.add_argument("--tta", action="store_true", help="with FILES: average the maps over the symmetries the run "
                                                      "trained with, each mapped back (not allowed with "
                                                      "--evaluation: it uses the evaluation's own setting)")
    p.add_argument("--per-class", type=int, default=50, metavar="N",
                   help="with --evaluation: images per class checked (default 50)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: CUDA, then MPS, then CPU)")
    p.set_defaults(func=_cmd_explain)


def _add_report(sub, shared: dict) -> None:
    p = sub.add_parser("report", help="redraw every figure from metrics.json, predictions.npz, history.jsonl",
                       description="Redraw the ROC (per class, macro/micro average), confusion-matrix and "
                                   "training-curve figures of RUN without the model.")
    p.add_argument("--run", required=True, metavar="RUN", help="folder with metrics.json and predictions.npz")
    p.add_argument("--figures", metavar="DIR", help="where to write PNG and PDF files (default RUN/figures)")
    p.set_defaults(func=_cmd_report)


def _add_doctor(sub, shared: dict) -> None:
    p = sub.add_parser("doctor", parents=[shared["pickle"]],
                       help="check this machine: device, precision, memory, weights, data, disk, a few real steps",
                       description="Print what the project will do on this machine: versions; the device and why; "
                                   "the precision path; free memory and the data residency and validation batch it "
                                   "implies; whether the ImageNet weights are in the torch hub cache; the dataset "
                                   "and its cache state; free disk for the cache; and the images/s of a few training "
                                   "steps of the real engine. Exit 0 when everything works, 2 with one 'problem:' "
                                   "line per problem otherwise.")
    p.add_argument("--data", metavar="DIR", help="the dataset to check (default: none; runs would simulate one)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: CUDA, then MPS, then CPU)")
    _add_config_options(p, ("precision", "weights"), training=False)  # what to check: the options train takes
    p.add_argument("--steps", type=int, default=3, metavar="N", help="timed training steps (default 3; 0: none)")
    p.set_defaults(func=_cmd_doctor)


def _add_realism(sub, shared: dict) -> None:
    p = sub.add_parser("realism", help="how close simulated images are to real ones: statistics and a two-sample test",
                       description="Compute per-image statistics (python -m deeplense realism --list says each "
                                   "one's formula) of the real images under --real and of a simulated set (--data, or "
                                   "--n images per class of --preset simulated in memory); compare their "
                                   "distributions (median, 10-90%, KS) and run a classifier two-sample test "
                                   "(logistic regression and random forest, stratified 5-fold x 5, AUC with a "
                                   "bootstrap interval, also per class). Writes OUT/realism.json and OUT/realism.png "
                                   "and .pdf (histograms of the statistics; no image is drawn).")
    p.add_argument("--real", metavar="DIR", help="folder with real {no,sphere,vort}/*.npy somewhere below it")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--data", metavar="DIR", help="a simulated (or any) folder with {no,sphere,vort}/*.npy below it")
    which.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS),
                       help="simulate this preset in memory; " + _preset_help())
    p.add_argument("--n", type=int, default=100, metavar="N",
                   help="simulated images per class (default 100); with --data, at most N per class are read")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulation and of the folds (default 0)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples of the two-sample AUC's 95%% interval (default 1000)")
    p.add_argument("--out", metavar="DIR", default="realism", help="output folder (default realism/)")
    p.add_argument("--list", action="store_true", help="print each statistic and its definition, then exit")
    p.add_argument("--save-targets", metavar="FILE", help="also write the real sample's median and 10-90%% range of "
                                                         "each statistic to FILE (the tests' realism targets)")
    p.set_defaults(func=_cmd_realism)


def _add_demo(sub, shared: dict) -> None:
    p = sub.add_parser("demo", help="execute the notebook end to end (what `make demo` runs)",
                       description="Execute Common_Task/DeepLense_Classification.ipynb top to bottom in place (with "
                                   "--no-readme: into OUT/), then copy its results table into README.md. "
                                   "Uses $DEEPLENSE_DATA (or the repository's own dataset/ folder) if present, "
                                   "else a simulated set. Any notebook parameter may be set as DEEPLENSE_<NAME> "
                                   "(DEEPLENSE_EPOCHS=3); relative folders are taken from where you run the command; "
                                   "an unknown DEEPLENSE_* name is refused.")
    p.add_argument("--out", metavar="DIR", help="output folder for the run (default demo_output/): new, empty, or a "
                                                "previous notebook run's (its run files are replaced); a `train` run "
                                                "or other files there are refused, never deleted")
    p.add_argument("--no-readme", action="store_true",
                   help="leave README.md, images/ and the committed notebook alone: the figures go to OUT/figures and "
                        "the executed notebook to OUT/")
    p.set_defaults(func=_cmd_demo)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, ``docker stop``, a queue's time limit) or SIGHUP (the terminal or SSH session
    closed), handled like Ctrl-C: every half-written file is removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame):
    raise Terminated(signum)


def _resume_hint(args) -> str:
    """How to continue after an interruption: the same command, except for a new training run."""
    if getattr(args, "command", None) == "train" and not getattr(args, "resume", None) and getattr(args, "out", None):
        return f"continue with `python -m deeplense train --resume {args.out}`"
    return "run the same command again to resume"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    import signal
    import threading

    handled = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, _on_signal) for sig in handled}
    try:
        check_option_ranges(args)
        return int(args.func(args) or 0)
    except DeepLenseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, an unwritable or missing folder, a path that is a file, ...
        where = exc.filename or exc.filename2
        reason = exc.strerror or str(exc) or type(exc).__name__
        print(f"error: {where}: {reason}" if where else f"error: {reason}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        hung_up = isinstance(exc, Terminated) and exc.signum == getattr(signal, "SIGHUP", None)
        what = "hung up" if hung_up else "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"{what}: finished work is kept; {_resume_hint(args)}", file=sys.stderr)
        return 128 + exc.signum if isinstance(exc, Terminated) else 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    raise SystemExit(main())
