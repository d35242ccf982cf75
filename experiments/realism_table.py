"""The "How real is the simulation" table (docs/simulation.md), from the committed realism results of every preset.

Each ``experiments/results/realism/<preset>/realism.json`` is written by (``make realism REAL=DIR`` runs them all)

    python -m deeplense realism --real ../shared/realdata/sample --preset <preset> --n 100 --seed 0 \\
        --out experiments/results/realism/<preset>

This script only reads them: ``python experiments/realism_table.py`` prints the table, ``--readme`` also writes it
between the realism markers (docs/simulation.md). No real image is read or drawn here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deeplense.realism import STATISTICS
from deeplense.report import write_section
from deeplense.simulate import PRESETS
from deeplense.util import REPO

RESULTS = REPO / "experiments" / "results" / "realism"


def load(results: Path = RESULTS) -> dict[str, dict]:
    """``{preset: realism.json}`` in :data:`PRESETS` order, for the presets that have results."""
    out = {}
    for p in PRESETS:
        f = results / p / "realism.json"
        if f.exists():
            out[p] = json.loads(f.read_text())
    return out


def _g(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def table(records: dict[str, dict]) -> str:
    if not records:
        return "(no results yet: run `make realism REAL=DIR`)"
    first = next(iter(records.values()))
    presets = list(records)
    lines = [f"- Real sample: {first['real']['n']} files (`{first['real']['folder']}`).",
             f"- Each preset: {records[presets[0]]['simulated'].get('n_per_class', '?')} simulated images per class, "
             f"seed {first['seed']}.",
             "- Cells: the median over images (and the 10-90% range for the real sample).",
             "- `*` marks a simulated median outside the real 10-90% range.",
             "- KS: the two-sample Kolmogorov-Smirnov distance to the real sample (0: same distribution, 1: disjoint).",
             "",
             "| statistic | real sample | " + " | ".join(f"`{p}` (KS)" for p in presets) + " |",
             "|---|---|" + "---|" * len(presets)]
    for k in STATISTICS:
        r = first["comparison"][k]["real"]
        cells = []
        for p in presets:
            c = records[p]["comparison"][k]
            mark = "" if c["sim_median_in_real_10_90"] else " *"
            cells.append(f"{_g(c['sim']['median'])}{mark} ({c['ks']:.2f})")
        lines.append(f"| `{k}` | {_g(r['median'])} ({_g(r['p10'])}–{_g(r['p90'])}) | " + " | ".join(cells) + " |")
    lines += ["", "The classifier two-sample test: can a classifier on these statistics tell simulated from real?",
              "The cells are cross-validated AUCs (0.5: no, 1.0: always), over all classes with a 95% bootstrap "
              "interval, then per class (a real class against the same simulated class).", "",
              "| preset | logistic regression | random forest | per class, logistic / forest: no, sphere, vort | "
              "statistics outside the real 10-90% |", "|---|---|---|---|---|"]
    for p in presets:
        t, per = records[p]["two_sample"], records[p]["per_class"]

        def auc(name, t=t):
            return f"{t[name]['auc']:.2f} [{t[name]['ci95'][0]:.2f}, {t[name]['ci95'][1]:.2f}]"

        pc = ", ".join(f"{per[c]['two_sample']['logistic_regression']['auc']:.2f} / "
                       f"{per[c]['two_sample']['random_forest']['auc']:.2f}" for c in per)
        outside = sum(not c["sim_median_in_real_10_90"] for c in records[p]["comparison"].values())
        lines.append(f"| `{p}` | {auc('logistic_regression')} | {auc('random_forest')} | {pc} | {outside} of "
                     f"{len(STATISTICS)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", action="store_true",
                   help="write the table between the realism markers (docs/simulation.md)")
    args = p.parse_args(argv)
    text = table(load())
    print(text)
    if args.readme:
        print(f"updated {write_section('realism', text)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
