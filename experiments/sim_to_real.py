"""Sim-to-real: networks trained only on simulated images predict real ones. The one check of what the simulation
teaches against the real data.

    python experiments/sim_to_real.py --real ../shared/realdata/sample --study experiments/out/study_realistic \\
        [--run demo=demo_output] [--readme]

Each network of the study (``STUDY/runs/<arm>-seed<s>/best.pt``, the arms and seeds its ``study.json`` lists) and
each ``--run NAME=RUN`` (a run folder's ``best.pt``) predicts every image under ``--real`` (``{no,sphere,vort}/``
below it), without test-time averaging (the study's own arms score without it). Per network: accuracy, macro AUC
and the AUC of each class with 95% bootstrap intervals over the real images, the confusion matrix and the images
right per class; per arm the mean over its seeds and the pooled accuracy. Writes
``experiments/results/sim_to_real.json``; ``--readme`` puts the table between the ``sim2real`` markers (in
``docs/simulation.md``). Only numbers: no real image is written or drawn.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from deeplense.checkpoint import config_of, load_checkpoint, model_from_checkpoint
from deeplense.data import CLASSES, read_image
from deeplense.device import hardware_name
from deeplense.engine import predict_proba
from deeplense.metrics import compute_metrics
from deeplense.realism import find_class_images
from deeplense.report import format_ci, write_section
from deeplense.transforms import native_crop
from deeplense.util import REPO, DeepLenseError, versions, write_json_atomic

OUT = REPO / "experiments" / "results" / "sim_to_real.json"


def read_real(folder) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The real images ``(N, 1, H, W)`` float32 in [0, 1] (through the loader's checks) and their labels."""
    found = find_class_images(folder)
    images = np.stack([read_image(path)[None] for path, _ in found])
    labels = np.array([CLASSES.index(c) for _, c in found])
    return images, labels, [str(Path(p).relative_to(Path(folder))) for p, _ in found]


def simulated_vortex(run: Path) -> str:
    """Which vortex the run's training set held, read off its data folder's ``simulation.json``: Model I's line
    through the lens centre (the ``realistic`` preset before issue 38) or the line near the ring (after)."""
    try:
        root = Path(json.loads((run / "config.json").read_text())["data"]["root"])
        config = json.loads((root / "simulation.json").read_text())["config"]
    except (OSError, KeyError, TypeError, ValueError):
        return "unknown"
    ring = config.get("vortex_center_radius_range_arcsec")
    return f'near the ring ({ring[0]}-{ring[1]}")' if ring else "through the lens centre"


def score(checkpoint: Path, images: np.ndarray, labels: np.ndarray, n_bootstrap: int) -> dict:
    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    config = config_of(ckpt, checkpoint)
    device = torch.device("cpu")
    model = model_from_checkpoint(ckpt, device, checkpoint)
    probs = predict_proba(model, native_crop(images, np.arange(len(images)), config.crop), config, device)
    m = compute_metrics(labels, probs, n_bootstrap=n_bootstrap, seed=0)
    right = {c: int(((probs.argmax(1) == labels) & (labels == k)).sum()) for k, c in enumerate(CLASSES)}
    return {"checkpoint": str(checkpoint), "arch": config.arch, "accuracy": m["accuracy"], "auc": m["auc"],
            "ci": m["ci"], "confusion_matrix": m["confusion_matrix"], "right_per_class": right,
            "per_class_n": {c: int((labels == k).sum()) for k, c in enumerate(CLASSES)},
            "simulated_vortex": simulated_vortex(checkpoint.parent)}


def networks(study: Path | None, runs: list[str]) -> dict[str, list[tuple[int | None, Path]]]:
    """``{arm: [(seed, best.pt), ...]}`` of the study's runs and of each ``NAME=RUN``."""
    out: dict[str, list] = {}
    if study is not None:
        s = json.loads((study / "study.json").read_text())
        trained_as = {"default_tta": "default", "default_d2_tta": "default_d2"}
        for arm in s["arms"]:
            if arm in trained_as:
                continue
            out[arm] = [(seed, study / "runs" / f"{arm}-seed{seed}" / "best.pt") for seed in s["scale"]["seed_list"]]
    for spec in runs:
        name, sep, path = spec.partition("=")
        if not sep:
            raise DeepLenseError(f"--run {spec}: expected NAME=RUN_FOLDER")
        out[name] = [(None, Path(path) / "best.pt")]
    return out


def table(result: dict) -> str:
    lines = ["| network | simulated vortex | seeds | accuracy (mean over seeds) | "
             "right: no / sphere / vort (of 10 each, per seed) | macro AUC (mean) | "
             "one seed's macro AUC [95% bootstrap interval] |", "|---|---|---|---|---|---|---|"]
    for arm, a in result["arms"].items():
        runs = a["runs"]
        right = "; ".join(" / ".join(str(r["right_per_class"][c]) for c in CLASSES) for r in runs)
        first = runs[0]
        lines.append(f"| `{arm}` | {first.get('simulated_vortex', 'unknown')} | {len(runs)} | "
                     f"{a['accuracy_mean']:.3f} ({a['right_total']}/{a['n_total']}) | "
                     f"{right} | {a['macro_auc_mean']:.3f} | "
                     f"{format_ci(first['auc']['macro'], first['ci']['macro_auc'])} |")
    lines += ["", f"Real images: {result['n_real']} ({result['real']}); networks trained only on simulated images "
                  f"({result['trained_on']}); no test-time averaging; hardware {result['hardware']}; command: "
                  f"`{result['command']}`. Chance: accuracy 0.333, macro AUC 0.5."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", required=True, help="folder with the real {no,sphere,vort}/*.npy below it")
    p.add_argument("--study", help="an accuracy study's output folder (its study.json and runs/)")
    p.add_argument("--run", action="append", default=[], metavar="NAME=RUN",
                   help="also a run folder's best.pt, reported as NAME (repeatable)")
    p.add_argument("--trained-on", default="the realistic preset",
                   help="what the networks were trained on, for the table (default 'the realistic preset')")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--out", default=str(OUT), help=f"results file (default {OUT.relative_to(REPO)})")
    p.add_argument("--readme", action="store_true", help="write the table between the sim2real markers")
    args = p.parse_args(argv)
    try:
        images, labels, files = read_real(args.real)
        nets = networks(Path(args.study) if args.study else None, args.run)
        if not nets:
            raise DeepLenseError("give --study DIR or --run NAME=RUN")
        result = {"real": str(args.real), "n_real": int(len(labels)), "trained_on": args.trained_on,
                  "hardware": hardware_name("cpu"), "versions": versions(),
                  "command": shlex.join(["python", "experiments/sim_to_real.py",
                                         *(sys.argv[1:] if argv is None else argv)]), "arms": {}}
        for arm, runs in nets.items():
            scored = []
            for seed, ckpt in runs:
                r = score(ckpt, images, labels, args.bootstrap)
                r["seed"] = seed
                scored.append(r)
                print(f"{arm} seed {seed}: accuracy {r['accuracy']:.3f}, right "
                      f"{'/'.join(str(r['right_per_class'][c]) for c in CLASSES)}, macro AUC "
                      f"{format_ci(r['auc']['macro'], r['ci']['macro_auc'])}", flush=True)
            right = sum(sum(r["right_per_class"].values()) for r in scored)
            result["arms"][arm] = {"runs": scored, "accuracy_mean": float(np.mean([r["accuracy"] for r in scored])),
                                   "macro_auc_mean": float(np.mean([r["auc"]["macro"] for r in scored])),
                                   "right_total": int(right), "n_total": int(len(labels) * len(scored))}
    except DeepLenseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_json_atomic(args.out, result)
    print(table(result))
    if args.readme:
        print(f"updated {write_section('sim2real', table(result))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
