"""Does the network look at the substructure? Saliency enrichment per arch, on an accuracy study's runs.

For each arm given, the held-out evaluation of one training seed (``STUDY/eval/<arm>-seed<k>``, written by
``experiments/accuracy_study.py``) goes through ``python -m deeplense explain --evaluation``: Grad-CAM and
integrated gradients for the true class of up to ``--per-class`` ``sphere`` and ``vort`` test images, and the
enrichment of each map within 5 px of the true subhalos or vortex line over the same structure turned about the
lens centre (:func:`deeplense.explain.enrichment`). The study's simulated set needs its ``substructure.csv``: a set
simulated before that file existed gets it here (every image is already there, so only the parameters are drawn
again, from the same seed).

Writes ``OUT/saliency.json`` and, with ``--readme``, ``experiments/results/NAME.json``, the table between the
``NAME`` markers of a document (docs/studies.md) and the first arm's example figure as
``images/NAME_study_examples.png``.

    python experiments/saliency_study.py --study experiments/out/study_v5 --arms default,resnet34_attn_se --readme
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Common_Task"))

from deeplense.device import hardware_name  # noqa: E402
from deeplense.explain import RADIUS_PX, explain_evaluation  # noqa: E402
from deeplense.plots import METHOD_NAMES  # noqa: E402
from deeplense.report import format_ci, write_section  # noqa: E402
from deeplense.util import DeepLenseError, versions, write_json_atomic  # noqa: E402

METHODS = ("gradcam", "integrated_gradients")


def ensure_substructure(data: Path) -> None:
    """Write ``DATA/substructure.csv`` for a set simulated before it existed, from the set's own settings."""
    if (data / "substructure.csv").is_file():
        return
    from deeplense.simulate import SimulationConfig, simulate_dataset

    settings = json.loads((data / "simulation.json").read_text())
    config = SimulationConfig(**settings["config"])  # (JSON lists become the tuples they were)
    counts = {s: len(list((data / s / "no").glob("*.npy"))) for s in ("train", "val")}
    simulate_dataset(data, train_per_class=counts["train"], val_per_class=counts["val"], seed=settings["seed"],
                     config=config, progress=False)


def table(result: dict) -> str:
    lines = ["| arm | class | " + " | ".join(f"{METHOD_NAMES[m]} enrichment [95% CI]" for m in METHODS) +
             " | ideal | images |", "|---|---|" + "---|" * len(METHODS) + "---|---|"]
    for arm, r in result["arms"].items():
        for cls, by in r["per_class"].items():
            cells = [format_ci(by[m]["ratio"], by[m]["ci"], digits=2) for m in METHODS]
            lines.append(f"| `{arm}` | `{cls}` | " + " | ".join(cells) + f" | {by[METHODS[0]]['ideal_ratio']:.2f} | "
                         f"{by['n']} |")
    s = result["setup"]
    return "\n".join([f"- Command: `{s['command']}`.",
                      f"- Seed {s['seed']} of each arm; maps for the true class, "
                      f"{'TTA as evaluated' if s['tta'] else 'no TTA (as evaluated)'}; within {s['radius_px']:g} px.",
                      f"- Hardware: {s['hardware']}.", "", *lines])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, help="an accuracy study's output folder (holding data/ and eval/)")
    p.add_argument("--arms", required=True, help="comma-separated arms of that study")
    p.add_argument("--seed", type=int, default=0, help="which training seed's evaluation (default 0)")
    p.add_argument("--per-class", type=int, default=50, help="sphere and vort test images per arm (default 50)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="default STUDY/saliency")
    p.add_argument("--readme", action="store_true", help="copy the results into the repository (see above)")
    p.add_argument("--name", default="saliency", help="with --readme: results file, section and figure name")
    args = p.parse_args(argv)
    study = Path(args.study).resolve()
    out = Path(args.out).resolve() if args.out else study / "saliency"
    try:
        ensure_substructure(study / "data")
        arms = {}
        for arm in [a for a in args.arms.split(",") if a]:
            ev = study / "eval" / f"{arm}-seed{args.seed}"
            print(f"{arm}: explaining {ev}", flush=True)
            r = explain_evaluation(ev, out / arm, per_class=args.per_class, methods=METHODS, device=args.device)
            arms[arm] = {"arch": r["arch"], "tta": r["tta"], "per_class": r["per_class"]}
    except DeepLenseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    first = next(iter(arms))
    result = {"setup": {"command": shlex.join(["python", "experiments/saliency_study.py",
                                               *(sys.argv[1:] if argv is None else argv)]),
                        "seed": args.seed, "per_class": args.per_class, "radius_px": RADIUS_PX,
                        "tta": arms[first]["tta"], "hardware": hardware_name(args.device), "versions": versions()},
              "arms": arms}
    write_json_atomic(out / "saliency.json", result)
    print(table(result))
    if args.readme:
        write_json_atomic(REPO / "experiments" / "results" / f"{args.name}.json", result)
        write_section(args.name, table(result))
        for ext in ("png", "pdf"):
            shutil.copyfile(out / first / f"saliency_examples.{ext}",
                            REPO / "images" / f"{args.name}_study_examples.{ext}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
