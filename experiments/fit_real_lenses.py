"""Fit the simulator's smooth lens model to every real image: the lens and source parameters the real set was made
with, as far as an SIE + shear lens and a Sersic source say (``deeplense.lensfit``).

    python experiments/fit_real_lenses.py --real ../shared/realdata/sample
    python experiments/fit_real_lenses.py --real ../shared/realdata/sample --psf-fwhm 0.05 0.087 0.13 0.2 0.3 \\
        --limit-per-class 2 --out experiments/results/realism/psf_scan.json

Writes one JSON (default ``experiments/results/realism/lens_fits.json``): every image's fitted parameters, reduced
chi-square, count scale K and sky, keyed by the image's path below ``--real`` and the PSF width; a summary per
parameter (median, 10-90%, min, max; the median per class and a Kruskal-Wallis p-value for a difference between
classes); versions, settings and the command. Only numbers: no image is written or drawn. Each fit takes about 2
minutes of one core; the file is rewritten after each one, and a rerun with the same settings skips the images
already fitted (an interrupted run loses at most the fits in progress).

    python experiments/fit_real_lenses.py --readme

only reads the committed ``lens_fits.json`` and ``psf_scan.json`` and writes their tables into docs/simulation.md
(between the ``lensfits`` and ``psfscan`` markers).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from deeplense.data import CLASSES
from deeplense.lensfit import LENS_PARAMETERS, SHEAR_PARAMETERS, SOURCE_PARAMETERS, fit_image
from deeplense.realism import find_class_images, read_images
from deeplense.util import REPO, DeepLenseError, progress_bar, versions, write_json_atomic

OUT = REPO / "experiments" / "results" / "realism" / "lens_fits.json"
PSF_SCAN = OUT.with_name("psf_scan.json")
# the fitted parameters the table shows (docs/simulation.md), with the realistic preset's setting each one led to
SHOWN = {
    "lens.theta_E": "lens_mass_range_msun: theta_E 0.95-1.65\"",
    "lens.ellipticity": "lens_e1 = lens_e2 = 0 (round)",
    "shear.modulus": "shear_range: 0-0.28",
    "shear.gamma2": "shear_axis_deg: -3 (gamma2 = -0.1 gamma1)",
    "source.n_sersic": "source_n_sersic: 1.53",
    "source.R_sersic": "source_R_sersic_arcsec: 0.51",
    "amp_counts": "source_amp: 38.6 counts/s x 1000 s",
    "source.ellipticity": "source_ellipticity_range: 0-0.4",
    "source.e2": "source_axis_deg: -3",
    "source.radius": "source_radius_max_arcsec: 0.47",
    "lens.center_x": "0 (the lens at the centre)",
    "chi2_red": "",
}


def _fit(task):
    key, x, fwhm, settings = task
    return key, fwhm, fit_image(x, psf_fwhm_arcsec=fwhm, **settings)


def flat(fit: dict) -> dict[str, float]:
    """One fit's parameters as ``{"lens.theta_E": ..., "shear.gamma1": ..., "source.n_sersic": ..., "amp_counts":
    ...}``, plus the lens ellipticity and shear moduli and the source's distance from the lens axis."""
    out = {f"lens.{k}": fit["lens"][k] for k in LENS_PARAMETERS}
    out |= {f"shear.{k}": fit["shear"][k] for k in SHEAR_PARAMETERS}
    out |= {f"source.{k}": fit["source"][k] for k in SOURCE_PARAMETERS}
    out["lens.ellipticity"] = float(np.hypot(fit["lens"]["e1"], fit["lens"]["e2"]))
    out["shear.modulus"] = float(np.hypot(fit["shear"]["gamma1"], fit["shear"]["gamma2"]))
    out["source.ellipticity"] = float(np.hypot(fit["source"]["e1"], fit["source"]["e2"]))
    out["source.radius"] = float(np.hypot(fit["source"]["center_x"] - fit["lens"]["center_x"],
                                          fit["source"]["center_y"] - fit["lens"]["center_y"]))
    for k in ("amp_counts", "K", "sky", "chi2_red"):
        out[k] = fit[k]
    return out


def summary(fits: list[dict]) -> dict:
    """Per parameter: median, 10-90%, min, max over the images; median per class; Kruskal-Wallis p across classes."""
    from scipy.stats import kruskal

    rows = [flat(f["fit"]) | {"class": f["class"]} for f in fits]
    out = {}
    for k in rows[0]:
        if k == "class":
            continue
        v = np.array([r[k] for r in rows])
        groups = [v[[r["class"] == c for r in rows]] for c in CLASSES]
        groups = [g for g in groups if g.size >= 2]
        p10, med, p90 = np.percentile(v, [10, 50, 90])
        out[k] = {"median": float(med), "p10": float(p10), "p90": float(p90), "min": float(v.min()),
                  "max": float(v.max()),
                  "median_per_class": {c: float(np.median(v[[r["class"] == c for r in rows]])) for c in CLASSES
                                       if any(r["class"] == c for r in rows)},
                  "kruskal_p": float(kruskal(*groups).pvalue) if len(groups) >= 2 and np.ptp(v) > 0 else None}
    return out


def format_summary(record: dict) -> str:
    lines = []
    for fwhm, s in record["summary"].items():
        lines.append(f"PSF FWHM {fwhm}\": {s['n']} images")
        lines.append(f"  {'parameter':20s} {'median':>9s} {'10%':>9s} {'90%':>9s}   median no / sphere / vort  (KW p)")
        for k, v in s["parameters"].items():
            pc = " / ".join(f"{v['median_per_class'].get(c, float('nan')):.4g}" for c in CLASSES)
            p = "" if v["kruskal_p"] is None else f"({v['kruskal_p']:.3f})"
            lines.append(f"  {k:20s} {v['median']:9.4g} {v['p10']:9.4g} {v['p90']:9.4g}   {pc}  {p}")
    return "\n".join(lines)


def readme_tables(fits: dict, scan: dict | None) -> tuple[str, str]:
    """The two tables of docs/simulation.md: the fitted parameters (``fits``, one PSF width) and the PSF scan
    (``scan``)."""
    fwhm, s = next(iter(fits["summary"].items()))
    lines = [f"- {s['n']} real files fitted with a PSF of FWHM {fwhm}\": `{fits['command']}`.",
             "- Per parameter: the median over the files (10-90%) and the median per class.",
             "- p: the Kruskal-Wallis p-value of a difference between the classes.", "",
             "| fitted | median (10-90%) | no / sphere / vort | p | `realistic` preset |", "|---|---|---|---|---|"]
    for k, preset in SHOWN.items():
        v = s["parameters"][k]
        pc = " / ".join(f"{v['median_per_class'][c]:.3g}" for c in CLASSES if c in v["median_per_class"])
        p = "" if v["kruskal_p"] is None else f"{v['kruskal_p']:.3f}"
        lines.append(f"| `{k}` | {v['median']:.3g} ({v['p10']:.3g} to {v['p90']:.3g}) | {pc} | {p} | {preset} |")
    if scan is None:
        return "\n".join(lines), "(no PSF scan: run the command above)"
    by_width: dict[float, dict[str, dict]] = {}
    for f in scan["fits"]:
        by_width.setdefault(float(f["psf_fwhm"]), {})[f["image"]] = flat(f["fit"])
    widths = sorted(by_width)
    common = sorted(set.intersection(*(set(v) for v in by_width.values())))  # paired: files fitted at every width
    best = float(fwhm) if float(fwhm) in by_width else widths[0]
    rows = [f"- PSF scan: `{scan['command']}`.",
            f"- The same fit with each PSF width, on the {len(common)} files fitted at every width; medians over "
            f"those files.",
            f"- The ratio column: the median over them of each file's chi-square divided by its chi-square at "
            f"{best:g}\".", "",
            f"| PSF FWHM | reduced chi-square | chi-square / at {best:g}\" | Sersic n | R_sersic (arcsec) |",
            "|---|---|---|---|---|"]
    for w in widths:
        q = by_width[w]

        def med(k, q=q):
            return float(np.median([q[i][k] for i in common])) if common else float("nan")

        ratio = float(np.median([q[i]["chi2_red"] / by_width[best][i]["chi2_red"] for i in common])) \
            if common else float("nan")
        rows.append(f"| {w:g}\" | {med('chi2_red'):.3f} | {ratio:.3f} | {med('source.n_sersic'):.2f} | "
                    f"{med('source.R_sersic'):.3f} |")
    return "\n".join(lines), "\n".join(rows)


def write_readme() -> None:
    from deeplense.report import write_section

    def load(path):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            raise DeepLenseError(f"{path}: missing or unreadable; run the fit first") from None

    fits = load(OUT)
    scan = load(PSF_SCAN) if PSF_SCAN.exists() else None
    a, b = readme_tables(fits, scan)
    print(f"updated {write_section('lensfits', a)} and {write_section('psfscan', b)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", metavar="DIR", help="folder with {no,sphere,vort}/*.npy below it (required to fit)")
    p.add_argument("--readme", action="store_true", help="fit nothing: write the committed results' tables into "
                                                         "docs/simulation.md")
    p.add_argument("--out", default=str(OUT), metavar="FILE",
                   help=f"the JSON to write (default {OUT.relative_to(REPO)})")
    p.add_argument("--psf-fwhm", type=float, nargs="+", default=[0.2], metavar="ARCSEC",
                   help="Gaussian PSF width(s) to fit with, arcsec (default 0.2); several: every image at each")
    p.add_argument("--limit-per-class", type=int, metavar="N", help="only the first N images of each class")
    p.add_argument("--particles", type=int, default=80, help="swarm size (default 80)")
    p.add_argument("--iterations", type=int, default=150, help="swarm iterations of the first stage (default 150)")
    p.add_argument("--seed", type=int, default=0, help="seed of the swarm (default 0)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: every core)")
    args = p.parse_args(argv)
    try:
        if args.readme:
            write_readme()
            return 0
        if not args.real:
            raise DeepLenseError("--real DIR is required (the folder of real images to fit)")
        return run(args, argv)
    except DeepLenseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args, argv) -> int:
    if args.particles < 2 or args.iterations < 2 or args.workers < 1:
        raise DeepLenseError("--particles and --iterations must be at least 2, --workers at least 1")
    if any(not 0 < f < 2 for f in args.psf_fwhm):
        raise DeepLenseError(f"--psf-fwhm {args.psf_fwhm}: each must lie in (0, 2) arcsec")
    root = Path(args.real).expanduser()
    files = find_class_images(root)
    images, labels = read_images(root)  # every loader check, one line on a bad file
    if args.limit_per_class is not None:
        keep = np.concatenate([np.flatnonzero(labels == i)[: args.limit_per_class] for i in range(len(CLASSES))])
        keep.sort()
        files, images, labels = [files[i] for i in keep], images[keep], labels[keep]
    settings = {"particles": args.particles, "iterations": args.iterations, "seed": args.seed}
    out = Path(args.out)
    record = {"real": str(args.real), "settings": settings, "fits": []}
    if out.exists():
        try:
            old = json.loads(out.read_text())
        except (OSError, ValueError):
            raise DeepLenseError(f"{out}: unreadable; remove it or choose another --out") from None
        if old.get("settings") == settings:
            record["fits"] = old.get("fits", [])
    keys = [os.path.relpath(f, root) for f, _ in files]
    digests = [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f, _ in files]
    done = {(f["image"], f["psf_fwhm"], f["sha256"]) for f in record["fits"]}
    tasks = [(k, images[i], fw, settings) for fw in args.psf_fwhm for i, k in enumerate(keys)
             if (k, fw, digests[i]) not in done]
    command = shlex.join(["python", "experiments/fit_real_lenses.py", *(sys.argv[1:] if argv is None else argv)])

    def save():
        fits = sorted(record["fits"], key=lambda f: (f["psf_fwhm"], CLASSES.index(f["class"]), f["image"]))
        by = {}
        for f in fits:
            by.setdefault(f["psf_fwhm"], []).append(f)
        record.update(fits=fits, summary={str(fw): {"n": len(v), "parameters": summary(v)} for fw, v in by.items()},
                      versions=versions(), command=command)
        write_json_atomic(out, record)

    index = {k: i for i, k in enumerate(keys)}

    def done_one(key, fwhm, fit):
        i = index[key]
        record["fits"] = [f for f in record["fits"] if (f["image"], f["psf_fwhm"]) != (key, fwhm)]
        record["fits"].append({"image": key, "class": CLASSES[labels[i]], "sha256": digests[i], "psf_fwhm": fwhm,
                               "fit": fit})
        save()

    if args.workers == 1:
        for t in progress_bar(tasks, desc="fitting", unit="fit"):
            done_one(*_fit(t))
    else:
        with ProcessPoolExecutor(args.workers) as pool:
            futures = [pool.submit(_fit, t) for t in tasks]
            for fut in progress_bar(as_completed(futures), total=len(futures), desc="fitting", unit="fit"):
                done_one(*fut.result())
    if not tasks and record["fits"]:
        save()
    print(format_summary(record))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
