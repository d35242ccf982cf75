"""A controlled accuracy study on the simulated benchmark: which of our choices pay off?

Same simulated data (``common_task`` preset, fixed seed), same epoch budget, several seeds per arm; the
official protocol (train on ``train``, select on 90% of ``val``, report on the held-out 10%).

Arms (``--arms`` picks a subset):

- ``reference``: the reference recipe (SGD 1e-4, momentum 0.9, StepLR(7, 0.1), batch 256, horizontal flips,
  resize then centre-crop, best epoch by accuracy);
- ``default``: our recipe (AdamW + warm-up + cosine, D4 augmentation, best epoch by macro AUC);
- ``default_no_d4``: ``default`` without augmentation;
- ``default_tta``: ``default``'s checkpoints evaluated with 8-way D4 test-time averaging;
- ``default_150px``: ``default`` on the whole native 150 px image (no crop, no resize).

Quick scale (the default, for a 2-core CPU; about 2 hours with 2 seeds): 800 train and 1,000 val images per
class (a 300-image held-out test), 5 epochs, random initial weights (ImageNet weights are used instead when
the torch hub cache holds them), input = the central 96 px shrunk to 64 px (the reference arm: the whole image
resized to 73 px, centre 64 px, the reference's 256 -> 224 geometry scaled). ``--full``: 10,000 / 2,500 per
class at the recipes' own settings (224 px, 20 epochs), for a GPU.

Writes ``OUT/study.json``, ``OUT/study_auc.png|pdf`` (macro AUC per arm with error bars) and
``OUT/study_roc.png|pdf`` (class-wise ROC of the best arm against the reference); ``--readme`` copies the
table into README.md and the two figures into images/. Interrupted? Run the same command again: finished runs are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from deeplense.checkpoint import load_checkpoint
from deeplense.config import recipe
from deeplense.data import CLASSES
from deeplense.evaluate import evaluate
from deeplense.simulate import simulate_dataset
from deeplense.train import train
from deeplense.util import REPO, atomic_path, hardware_name, read_jsonl, replace_section, versions, write_json_atomic

ARMS = ("reference", "default", "default_no_d4", "default_tta", "default_150px")
METRIC_KEYS = ("macro_auc", "micro_auc", "accuracy")


def arm_config(arm: str, full: bool, seed: int, epochs: int | None = None):
    if full:
        base = {"seed": seed}
        cfgs = {
            "reference": recipe("reference", **base),
            "default": recipe("default", **base),
            "default_no_d4": recipe("default", augmentation="none", **base),
            "default_150px": recipe("default", image_size=150, **base),
        }
    else:
        quick = {"seed": seed, "epochs": 5}
        cfgs = {
            "reference": recipe("reference", image_size=64, resize_then_crop=73, **quick),
            "default": recipe("default", image_size=64, crop=96, batch_size=32, **quick),
            "default_no_d4": recipe("default", image_size=64, crop=96, batch_size=32, augmentation="none", **quick),
            "default_150px": recipe("default", image_size=150, batch_size=32, **quick),
        }
    cfg = cfgs["default" if arm == "default_tta" else arm]
    return cfg.replace(epochs=epochs) if epochs else cfg


def run_one(arm: str, seed: int, data: Path, out: Path, full: bool, epochs: int | None = None,
            device: str | None = None) -> dict:
    train_arm = "default" if arm == "default_tta" else arm
    run = out / "runs" / f"{train_arm}-seed{seed}"
    ev = out / "eval" / f"{arm}-seed{seed}"
    if not (ev / "metrics.json").exists():
        t0 = time.time()
        if (run / "last.pt").exists():
            ck = load_checkpoint(run / "last.pt")
            if ck["epoch"] < ck["config"]["epochs"]:  # interrupted: continue; finished (default_tta): reuse
                train(None, data, None, resume=run, device=device)
        else:
            train(arm_config(arm, full, seed, epochs), data, run, device=device)
        evaluate(run / "best.pt", data, ev, split="test", tta=arm == "default_tta", device=device)
        write_json_atomic(ev / "timing.json", {"wall_seconds_this_call": time.time() - t0})
    m = json.loads((ev / "metrics.json").read_text())
    hist = read_jsonl(run / "history.jsonl")
    m["train_seconds"] = float(sum(h["train_seconds"] for h in hist))
    m["train_images_per_s"] = float(np.mean([h["train_images_per_s"] for h in hist]))
    return m


def summarise(per_seed: list[dict]) -> dict:
    def stat(values, intervals):
        v = [x for x in values if x is not None]
        ci = [c for c in intervals if c is not None]
        return {"mean": float(np.mean(v)) if v else None, "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                "per_seed": values,
                "ci95": [float(np.mean([c[0] for c in ci])), float(np.mean([c[1] for c in ci]))] if ci else None}

    test = {
        "macro_auc": stat([m["auc"]["macro"] for m in per_seed], [m["ci"]["macro_auc"] for m in per_seed]),
        "micro_auc": stat([m["auc"]["micro"] for m in per_seed], [m["ci"]["micro_auc"] for m in per_seed]),
        "accuracy": stat([m["accuracy"] for m in per_seed], [m["ci"]["accuracy"] for m in per_seed]),
        "per_class_auc": {c: stat([m["auc"]["per_class"][c] for m in per_seed],
                                  [m["ci"]["per_class_auc"][c] for m in per_seed]) for c in CLASSES},
        "n": per_seed[0]["n"],
    }
    return {"test": test, "seeds": len(per_seed),
            "train_seconds": {"mean": float(np.mean([m["train_seconds"] for m in per_seed]))},
            "train_images_per_s": {"mean": float(np.mean([m["train_images_per_s"] for m in per_seed]))},
            "pretrained": bool(per_seed[0]["provenance"]["pretrained"]),
            "tta": bool(per_seed[0]["provenance"]["tta"]),
            "device": per_seed[0]["provenance"]["device"],
            "config": per_seed[0]["provenance"]["config"]}


def describe(arm: dict) -> str:
    """The arm's recipe in a few words: optimiser, augmentation, input geometry, TTA."""
    c = arm["config"]
    size = c["image_size"]
    if c.get("crop"):
        geometry = f"central {c['crop']} px → {size} px"
    elif c.get("resize_then_crop"):
        geometry = f"resize {c['resize_then_crop']} px, centre {size} px"
    else:
        geometry = f"whole image at {size} px"
    aug = {"d4": "D4", "hflip": "h-flips", "none": "no aug."}.get(c["augmentation"], c["augmentation"])
    opt = f"{'AdamW' if c['optimizer'] == 'adamw' else c['optimizer'].upper()} {c['lr']:g}"
    return f"{opt}, {aug}, {geometry}" + (", D4 TTA" if arm.get("tta") else "")


def table(study: dict) -> str:
    s = study["scale"]
    lines = [f"Scale: {s['description']}; hardware: {s['hardware']}; command: `{s['command']}`. "
             f"Mean ± std over {s['seeds']} seeds; [95% bootstrap interval, averaged over seeds]; held-out test "
             f"n = {s['n_test']} per seed. Initial weights: {s['weights']}.", "",
             "| arm | recipe | macro AUC | micro AUC | accuracy | AUC no | AUC sphere | AUC vort | train time | "
             "train img/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def f(d):
        return "n/a" if d["mean"] is None else (f"{d['mean']:.3f} ± {d['std']:.3f}" +
                                                (f" [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]" if d["ci95"] else ""))

    for arm, a in study["arms"].items():
        t = a["test"]
        pc = t["per_class_auc"]
        lines.append(f"| `{arm}` | {describe(a)} | {f(t['macro_auc'])} | {f(t['micro_auc'])} | {f(t['accuracy'])} | "
                     f"{pc['no']['mean']:.3f} | {pc['sphere']['mean']:.3f} | {pc['vort']['mean']:.3f} | "
                     f"{a['train_seconds']['mean'] / 60:.1f} min | {a['train_images_per_s']['mean']:.1f} |")
    return "\n".join(lines)


def figures(study: dict, out: Path) -> None:
    from deeplense import plots

    with plots.style():
        _draw_figures(study, out, plots)


def _draw_figures(study: dict, out: Path, plots) -> None:
    arms = list(study["arms"])
    means = [study["arms"][a]["test"]["macro_auc"]["mean"] for a in arms]
    stds = [study["arms"][a]["test"]["macro_auc"]["std"] for a in arms]
    fig, ax = plots.figure(figsize=(6.0, 3.6))
    ax.errorbar(range(len(arms)), means, yerr=stds, fmt="o", color="#0072B2", capsize=4)
    ax.set_xticks(range(len(arms)), arms, rotation=20)
    ax.set_ylabel("held-out macro AUC (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.set_title("Ablation on simulated data")
    plots.save_figure(fig, out / "study_auc")
    others = [a for a in arms if a != "reference"] or arms
    best = max(others, key=lambda a: study["arms"][a]["test"]["macro_auc"]["mean"])
    shown = ("reference", best) if "reference" in arms and best != "reference" else (best,)
    fig, axes = plots.figure(1, len(shown), figsize=(4.6 * len(shown), 4.6), squeeze=False)
    from deeplense.metrics import roc_curves

    for ax, arm in zip(axes[0], shown, strict=True):
        z = np.load(out / "eval" / f"{arm}-seed{study['scale']['seed_list'][0]}" / "predictions.npz")
        curves = roc_curves(z["labels"], z["probabilities"])
        for c in CLASSES:
            cc = curves["per_class"][c]
            if cc is not None:
                ax.plot(cc["fpr"], cc["tpr"], color=plots.CLASS_COLORS[c], label=f"{c}, AUC = {cc['auc']:.3f}")
        plots.square_roc_axes(ax, f"{arm} (seed {study['scale']['seed_list'][0]})")
    plots.save_figure(fig, out / "study_roc")


def write_readme(study: dict, out: Path, repo: Path) -> None:
    """Copy the table between the README's study markers and the two figures into ``repo/images``."""
    readme = repo / "README.md"
    replace_section(readme, "<!-- study:start -->", "<!-- study:end -->", table(study))
    for name in ("study_auc.png", "study_auc.pdf", "study_roc.png", "study_roc.pdf"):
        with atomic_path(repo / "images" / name) as tmp:
            shutil.copyfile(out / name, tmp)
    print(f"updated {readme} and {repo / 'images'}/study_auc.png, study_roc.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the full 30,000/7,500 set at the recipes' own settings")
    p.add_argument("--seeds", type=int, default=2, help="seeds per arm (default 2)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--out", default="benchmarks/out/study", help="output folder (default benchmarks/out/study/)")
    p.add_argument("--train-per-class", type=int, help="override the scale's simulated train images per class")
    p.add_argument("--val-per-class", type=int, help="override the scale's simulated val images per class")
    p.add_argument("--epochs", type=int, help="override the scale's epochs (all arms)")
    p.add_argument("--readme", action="store_true", help="copy the table into README.md and the figures into images/")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: pick automatically)")
    args = p.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    bad = [a for a in arms if a not in ARMS]
    if bad:
        p.error(f"unknown arm(s) {bad}; choose from {ARMS}")
    out = Path(args.out).resolve()
    ntr = args.train_per_class or (10_000 if args.full else 800)
    nva = args.val_per_class or (2_500 if args.full else 1_000)
    data = out / "data"
    simulate_dataset(data, train_per_class=ntr, val_per_class=nva, seed=1234, workers=os.cpu_count() or 1)
    seeds = list(range(args.seeds))
    results = {arm: [run_one(arm, s, data, out, args.full, args.epochs, args.device) for s in seeds] for arm in arms}
    first = next(iter(results.values()))[0]
    study = {
        "scale": {"description": (f"{'full' if args.full else 'quick'}: {ntr}/{nva} simulated train/val images per "
                                  f"class, {first['provenance']['config']['epochs']} epochs"),
                  "train_per_class": ntr, "val_per_class": nva, "n_test": first["n"], "seeds": len(seeds),
                  "seed_list": seeds, "data_seed": 1234,
                  "hardware": hardware_name(first["provenance"]["device"]),
                  "command": shlex.join(["python", "benchmarks/accuracy_study.py",
                                         *(sys.argv[1:] if argv is None else argv)]),
                  "weights": "ImageNet" if first["provenance"]["pretrained"] else "random (no ImageNet weights here)",
                  "versions": versions()},
        "arms": {arm: summarise(ms) for arm, ms in results.items()},
    }
    write_json_atomic(out / "study.json", study)
    figures(study, out)
    print(table(study))
    if args.readme:
        write_readme(study, out, REPO)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
