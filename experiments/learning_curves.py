"""Learning curves: held-out macro AUC against the number of training images per class, per network.

    python experiments/learning_curves.py --sizes 100,300,1000 --seeds 2 --archs resnet34,lensnet,d4net --readme

One simulated set of the ``realistic`` preset (data seed 4321): ``max(sizes) / 0.9`` training images per class, so
that the clean protocol's held-out 10% of ``train`` chooses the checkpoint, and ``--val-per-class`` test images
per class (all of ``val``, which no run trains or selects on). For each size ``n`` each run trains on the first
``n`` images per class of the training part (``limit_per_class``, which also caps the selection part at ``n``).

Every run sees the same number of training images, ``--images`` (default 45,000: the demo's 15 epochs of 3,000), so
a small set gets many epochs and a large one few: ``epochs = ceil(images / (3 n))``. The networks at the demo
geometry, from random weights: ``resnet34`` (the ``default`` recipe, the central 96 px shrunk to 64 px),
``lensnet`` (``default`` on the central 96 native px) and ``d4net`` (the ``d4net`` recipe, the central 97 native
px). Each point: the mean over seeds of the held-out macro AUC, with the seeds' values and each run's 95% bootstrap
interval.

Writes ``OUT/curves.json`` and ``OUT/learning_curves.png|pdf``; ``--readme`` copies the JSON to
``experiments/results/learning_curves.json``, the figure to ``images/`` and the table between the ``curves``
markers (``docs/studies.md``). Interrupted? Run the same command again: finished runs are kept.
``--only-seed S`` runs one seed's share, so that two processes (one thread each) can split the work on 2 cores; the
same command without it then gathers every finished run and writes the results (with ``--gather`` it trains nothing
more: a point that no run finished shows as "not run").

Another budget on the same images: ``--data`` reuses a set an earlier call simulated (checked: this preset, this
data seed, enough training images), ``--out`` keeps the new runs apart and ``--name`` the results, e.g. the demo's
budget (45,000 images seen) at 300 images per class::

    python experiments/learning_curves.py --sizes 300 --archs d4net --images 45000 \
        --data experiments/out/curves/data --out experiments/out/curves45k --readme --name curves_demo_budget
"""

from __future__ import annotations

import argparse
import json
import math
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
from deeplense.device import hardware_name
from deeplense.evaluate import evaluate
from deeplense.report import format_ci, write_section
from deeplense.simulate import SimulationConfig, same_settings, simulate_dataset
from deeplense.train import resume, train
from deeplense.util import REPO, atomic_path, read_jsonl, versions, write_json_atomic

DATA_SEED = 4321
ARCHS = ("resnet34", "lensnet", "d4net")


def arch_config(arch: str, n: int, seed: int, images: int):
    """The run's config: the network's recipe at the quick geometry, ``n`` images per class, the epochs that make
    ``images`` training images seen."""
    epochs = max(1, math.ceil(images / (3 * n)))
    base = {"seed": seed, "protocol": "clean", "limit_per_class": n, "epochs": epochs}
    if arch == "d4net":
        return recipe("d4net", scale="quick", **base)
    return recipe("default", scale="quick", arch=arch, **base)


def run_one(arch: str, n: int, seed: int, data: Path, out: Path, images: int, device: str | None) -> dict:
    name = f"{arch}-n{n}-seed{seed}"
    run, ev = out / "runs" / name, out / "eval" / name
    if not (ev / "metrics.json").exists():
        if (run / "last.pt").exists():
            ck = load_checkpoint(run / "last.pt")
            if ck["epoch"] < ck["config"]["epochs"]:
                resume(run, data, device=device)
        else:
            train(arch_config(arch, n, seed, images), data, run, device=device)
        evaluate(run / "best.pt", data, ev, split="test", device=device)
    m = json.loads((ev / "metrics.json").read_text())
    hist = read_jsonl(run / "history.jsonl")
    return {"arch": arch, "n_per_class": n, "seed": seed, "macro_auc": m["auc"]["macro"],
            "macro_auc_ci": m["ci"]["macro_auc"], "accuracy": m["accuracy"], "per_class_auc": m["auc"]["per_class"],
            "epochs": len(hist), "best_epoch": int(load_checkpoint(run / "best.pt")["epoch"]),
            "train_seconds": float(sum(h["train_seconds"] for h in hist)), "n_test": m["n"],
            "precision": m["provenance"]["precision"]}


def reused_data_problem(data: Path, train_per_class: int, val_per_class: int) -> str | None:
    """Why ``data`` cannot serve as the curves' set (None when it can): it must be a simulated set of the
    ``realistic`` preset with :data:`DATA_SEED`, at least ``train_per_class`` training images and exactly
    ``val_per_class`` test images per class (every run tests on all of ``val``)."""
    try:
        settings = json.loads((data / "simulation.json").read_text())
    except (OSError, ValueError):
        return "no readable simulation.json: not a set this script simulated"
    if not same_settings(settings, {"seed": DATA_SEED, "config": SimulationConfig.from_preset("realistic").to_dict()}):
        return f"simulated with another seed or preset (the curves use realistic, data seed {DATA_SEED})"
    for split, need, exact in (("train", train_per_class, False), ("val", val_per_class, True)):
        for c in CLASSES:
            n = len(list((data / split / c).glob("*.npy")))
            if n < need or (exact and n != need):
                return f"{split}/{c} holds {n} images, {'exactly ' if exact else 'at least '}{need} needed"
    return None


def summarise(runs: list[dict]) -> dict:
    out: dict = {}
    for r in runs:
        out.setdefault(r["arch"], {}).setdefault(str(r["n_per_class"]), []).append(r)
    return {arch: {n: {"mean": float(np.mean([r["macro_auc"] for r in rs])),
                       "std": float(np.std([r["macro_auc"] for r in rs], ddof=1)) if len(rs) > 1 else 0.0,
                       "per_seed": [r["macro_auc"] for r in rs], "runs": rs}
                   for n, rs in by_n.items()} for arch, by_n in out.items()}


def table(result: dict) -> str:
    sizes = result["sizes"]
    lines = ["| network | " + " | ".join(f"{n} per class" for n in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for arch, by_n in result["curves"].items():
        cells = []
        for n in sizes:
            p = by_n.get(str(n))
            if p is None:
                cells.append("not run")
                continue
            first = p["runs"][0]
            spread = f" ± {p['std']:.3f}" if len(p["runs"]) > 1 else ""
            cells.append(f"{p['mean']:.3f}{spread} ({len(p['runs'])} seed(s); seed {first['seed']}: "
                         f"{format_ci(first['macro_auc'], first['macro_auc_ci'])}; {first['epochs']} epochs)")
        lines.append(f"| `{arch}` | " + " | ".join(cells) + " |")
    lines += ["", f"Held-out macro AUC (mean ± std over seeds; one run's 95% bootstrap interval) on all "
                  f"{result['n_test']} `val` images of the `realistic` preset (data seed {result['data_seed']}), "
                  f"which no run trains or selects on; each run sees {result['images']:,} training images "
                  f"(epochs = images / (3 n)), from random weights at the demo geometry; hardware "
                  f"{result['hardware']}; command: `{result['command']}`."]
    return "\n".join(lines)


def figure(result: dict, stem: Path) -> list[Path]:
    from deeplense import plots

    colours = {"resnet34": "#D55E00", "lensnet": "#0072B2", "d4net": "#009E73"}
    with plots.style():
        fig, ax = plots.figure(1, 1, figsize=(5.6, 4.2))
        for arch, by_n in result["curves"].items():
            ns = sorted(int(n) for n in by_n)
            means = [by_n[str(n)]["mean"] for n in ns]
            ax.plot(ns, means, "o-", color=colours.get(arch, "0.3"), label=arch)
            for n in ns:
                ax.plot([n] * len(by_n[str(n)]["per_seed"]), by_n[str(n)]["per_seed"], ".", color="0.5", ms=4)
        ax.axhline(0.5, color="0.6", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_xticks(result["sizes"], [f"{n:,}" for n in result["sizes"]])
        ax.minorticks_off()
        ax.set_xlabel("training images per class")
        ax.set_ylabel("held-out macro AUC (mean; seeds as dots)")
        ax.set_ylim(0.4, 1.0)
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
        ax.set_title(f"Learning curves, realistic preset ({result['images']:,} images seen per run)")
        fig.tight_layout()
        return plots.save_figure(fig, stem)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100,300,1000", help="training images per class (default 100,300,1000)")
    p.add_argument("--seeds", type=int, default=2, help="training seeds per point (default 2)")
    p.add_argument("--gather", action="store_true",
                   help="train nothing: gather the finished runs (a point no run finished shows as not run)")
    p.add_argument("--only-seed", type=int, help="run only this one of the seeds (two processes can share the work; "
                                                 "a last call without it gathers every run)")
    p.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated subset of {','.join(ARCHS)}")
    p.add_argument("--images", type=int, default=45_000, help="training images seen per run (default 45,000)")
    p.add_argument("--val-per-class", type=int, default=500, help="test images per class (default 500)")
    p.add_argument("--out", default="experiments/out/curves", help="output folder (default experiments/out/curves)")
    p.add_argument("--data", help="reuse this simulated set (an earlier call's OUT/data; default: OUT/data, simulated "
                                  "when missing)")
    p.add_argument("--name", default="curves",
                   help="with --readme: the results file experiments/results/NAME.json and the section between the "
                        "NAME markers (default curves: learning_curves.json and the figure images/learning_curves.png; "
                        "a figure only for more than one size)")
    p.add_argument("--device", help="cpu, cuda, mps (default: pick automatically)")
    p.add_argument("--readme", action="store_true", help="copy the results into experiments/results, images/ and "
                                                         "docs/studies.md (the --name markers)")
    args = p.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    archs = [a for a in args.archs.split(",") if a]
    bad = [a for a in archs if a not in ARCHS]
    if bad or not sizes or min(sizes) < 10 or args.seeds < 1 or args.only_seed not in (None, *range(args.seeds)):
        p.error(f"--archs from {','.join(ARCHS)}; --sizes of at least 10; --seeds at least 1 (got {bad or args})")
    out = Path(args.out).resolve()
    need = math.ceil(max(sizes) / 0.9)
    if args.data:
        data = Path(args.data).resolve()
        why = reused_data_problem(data, need, args.val_per_class)
        if why:
            p.error(f"--data {args.data}: {why}")
    else:
        data = out / "data"
        simulate_dataset(data, train_per_class=need, val_per_class=args.val_per_class, seed=DATA_SEED,
                         workers=os.cpu_count() or 1, config=SimulationConfig.from_preset("realistic"))
    t0 = time.time()
    runs = []
    for n in dict.fromkeys(int(s) for s in args.sizes.split(",")):  # in the order given; the table sorts them
        for arch in archs:
            for seed in range(args.seeds) if args.only_seed is None else [args.only_seed]:
                if args.gather and not (out / "eval" / f"{arch}-n{n}-seed{seed}" / "metrics.json").exists():
                    continue
                r = run_one(arch, n, seed, data, out, args.images, args.device)
                runs.append(r)
                print(f"{arch} n={n} seed {seed}: macro AUC {format_ci(r['macro_auc'], r['macro_auc_ci'])} "
                      f"({r['epochs']} epochs, best {r['best_epoch']}, {r['train_seconds'] / 60:.1f} min)", flush=True)
    if args.only_seed is not None:
        return 0  # a share of the work; the call without --only-seed writes the results
    result = {"sizes": sizes, "seeds": args.seeds, "images": args.images, "data_seed": DATA_SEED,
              "preset": "realistic", "n_test": runs[0]["n_test"], "hardware": hardware_name(args.device or "cpu"),
              "versions": versions(), "minutes_this_call": (time.time() - t0) / 60,
              "command": shlex.join(["python", "experiments/learning_curves.py",
                                     *(sys.argv[1:] if argv is None else argv)]),
              "curves": summarise(runs)}
    write_json_atomic(out / "curves.json", result)
    written = figure(result, out / "learning_curves")
    print(table(result))
    if args.readme:
        stem = "learning_curves" if args.name == "curves" else args.name
        write_json_atomic(REPO / "experiments" / "results" / f"{stem}.json", result)
        figures = ""
        if len(sizes) > 1:  # a curve; one size is a point: the table says it
            for f in written:
                with atomic_path(REPO / "images" / f"{stem}{f.suffix}") as tmp:
                    shutil.copyfile(f, tmp)
            figures = f" and images/{stem}.png|pdf"
        print(f"updated {write_section(args.name, table(result))}{figures}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
