"""One calibration step of the ``benchmark`` simulation preset: how hard is it for the ``default`` recipe?

Simulates a set with the preset (``--preset``, default ``benchmark``; optionally with some of its settings changed
by ``--set``), checks that the images keep the common-task look (fraction of pixels > 0.1 in [0.11, 0.21], corner
standard deviation <= 0.008, ring radius 22-32 px) and lists the realism statistics whose median leaves the real
sample's 10-90% range (``deeplense/realism_targets.json``), trains the ``default`` recipe at the quick CPU scale
(central 96 px shrunk to 64 px, random initial weights) under the clean protocol, and evaluates on all of ``val``.
Appends one JSON line with the settings, the image statistics and the held-out AUCs to ``OUT/calibration.jsonl``
and prints it.

    python experiments/calibrate_benchmark.py --name step1
    python experiments/calibrate_benchmark.py --name step2 --set 'subhalo_mass_range_msun=[1e6, 3e9]'

The aim at this scale (a proxy of the full-scale target, held-out macro AUC 0.975-0.995 on a GPU): roughly
0.85-0.93, with ``no`` below 0.999 and ``sphere`` the hardest class.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from deeplense import realism as R
from deeplense.config import recipe
from deeplense.data import CLASSES, read_image
from deeplense.evaluate import evaluate
from deeplense.simulate import SimulationConfig, image_statistics, simulate_dataset
from deeplense.train import train
from deeplense.util import versions

LOOK = {"frac_gt_0.1": (0.11, 0.21), "corner_std": (0.0, 0.008), "peak_radius_px": (22, 32)}


def _fmt(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return f"{v:g}" if isinstance(v, float) else str(v)


def table(rows: list[dict]) -> str:
    """The calibration steps as a Markdown table (docs/simulation.md, "The benchmark preset")."""
    lines = ["| step | preset | settings changed from the preset's | pixels > 0.1 | corner std | ring radius | "
             "test macro AUC [95% CI] | AUC no / sphere / vort |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        changes = ", ".join(f"`{k}={_fmt(v)}`" for k, v in r.get("changes", {}).items()) or "none"
        preset = f"`{r['preset']}`" if "preset" in r else "`benchmark_v1` step 1's"  # rows from before issue 23
        if "macro_auc" not in r:
            lines.append(f"| {r['name']} | {preset} | {changes} | | | | {r.get('note', '')} | |")
            continue
        st, pc, ci = r["image_statistics"], r["per_class_auc"], r["macro_auc_ci95"]
        lines.append(f"| {r['name']} | {preset} | {changes} | {st['frac_gt_0.1']:.3f} | {st['corner_std']:.4f} | "
                     f"{st['peak_radius_px']:.1f} px | {r['macro_auc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | "
                     f"{pc['no']:.3f} / {pc['sphere']:.3f} / {pc['vort']:.3f} |")
    return "\n".join(lines)


def write_readme(out: Path) -> None:
    """Copy calibration.jsonl to experiments/results/ and its table into the document with its markers."""
    from deeplense.report import write_section
    from deeplense.util import REPO, write_text_atomic

    text = (out / "calibration.jsonl").read_text()
    write_text_atomic(REPO / "experiments" / "results" / "calibration.jsonl", text)
    rows = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    doc = write_section("calibration", table(rows))
    print(f"updated {doc} and {REPO / 'experiments' / 'results' / 'calibration.jsonl'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", action="store_true", help="only copy the steps so far into docs/simulation.md and "
                                                         "experiments/results/calibration.jsonl")
    p.add_argument("--name", help="name of this step (its folder under OUT)")
    p.add_argument("--preset", default="benchmark", help="the preset to start from (default benchmark)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="change one SimulationConfig setting of the preset, e.g. 'shear_max=0.05'")
    p.add_argument("--train-per-class", type=int, default=800)
    p.add_argument("--val-per-class", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="training seed (the data seed is 1234)")
    p.add_argument("--device", help="cpu, cuda, ... (default: pick automatically)")
    p.add_argument("--out", default="experiments/out/calibration")
    args = p.parse_args(argv)
    if args.readme:
        write_readme(Path(args.out))
        return 0
    if not args.name:
        p.error("--name is required (or --readme)")
    changes = {}
    for item in args.set:
        key, _, value = item.partition("=")
        v = json.loads(value)
        changes[key] = tuple(v) if isinstance(v, list) else v
    cfg = SimulationConfig.from_preset(args.preset).replace(**changes)
    out = Path(args.out) / args.name
    t0 = time.time()
    simulate_dataset(out / "data", train_per_class=args.train_per_class, val_per_class=args.val_per_class, seed=1234,
                     workers=os.cpu_count() or 1, config=cfg)
    sample = np.stack([read_image(out / "data" / "val" / c / f"{i}.npy")[None] for c in CLASSES for i in range(1, 9)])
    stats = image_statistics(sample)
    look_ok = all(lo <= stats[k] <= hi for k, (lo, hi) in LOOK.items())
    # and against the real sample: the statistics whose median leaves the real 10-90% range (committed targets)
    outside = R.outside_targets(R.statistics(sample), R.load_targets())
    run_cfg = recipe("default", scale="quick", epochs=args.epochs, weights="none", seed=args.seed, protocol="clean")
    run = out / "run"
    if not (run / "last.pt").exists():
        train(run_cfg, out / "data", run, device=args.device)
    m = evaluate(run / "best.pt", out / "data", out / "eval", device=args.device)
    row = {"name": args.name, "preset": args.preset,
           "changes": {k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()},
           "image_statistics": stats, "look_ok": look_ok, "realism_outside": sorted(outside), "n_test": m["n"],
           "macro_auc": m["auc"]["macro"],
           "macro_auc_ci95": m["ci"]["macro_auc"], "accuracy": m["accuracy"], "per_class_auc": m["auc"]["per_class"],
           "minutes": (time.time() - t0) / 60,
           "command": shlex.join(["python", "experiments/calibrate_benchmark.py", *(sys.argv[1:] if argv is None
                                                                                 else argv)]),
           "versions": versions()}
    with open(Path(args.out) / "calibration.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
