"""Why does the simulated vortex not carry over to real images? The residuals a smooth lens fit leaves, real against
simulated, and a vortex line fitted to them.

    python experiments/vortex_residuals.py --real ../shared/realdata/sample --sim-per-class 6 [--readme]

For every real file (its smooth fit from the committed ``experiments/results/realism/lens_fits.json``, PSF 0.2")
and for ``--sim-per-class`` simulated images per class of the ``realistic`` preset (fitted here the same way):

- the residual of the smooth fit in units of its noise, ``z = (data - model) / sqrt(sky + model)``;
- **how strong**: the excess chi-square per pixel, ``mean(z^2) - 1``;
- **where**: the share of the excess (``z^2 - 1`` smoothed over 5x5 px, its positive part) inside the ring
  (r < 0.7 theta_E), on it (0.7-1.4 theta_E) and outside (> 1.4 theta_E), about the fitted lens centre;
- **how it lies on the ring**: the ring's excess in 16 sectors; the share of the largest sector, and of the largest
  pair of opposite sectors (a line through the centre crossing the ring bends it at two opposite places; one subhalo,
  at one).

Then, on the ``vort`` images (real and simulated), with the smooth fit kept, a **vortex line** of 20 equal point
masses (centre, angle, half-length, total Einstein radius) and, for comparison, **one point mass** (position,
Einstein radius) are fitted to the residual (SciPy's differential evolution on the chi-square). The fitted line says
how long, how heavy and where the vortex is, against the preset's draws; the chi-square each removes says whether a
line fits better than a point.

Writes ``experiments/results/realism/vortex_residuals.json`` (numbers only: no image is written or drawn);
``--readme`` puts the tables between the ``vortex`` markers (``docs/simulation.md``). Each simulated fit takes about
2 minutes of one core; the file is rewritten after each, and a rerun skips what is done.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from deeplense.data import CLASSES
from deeplense.lensfit import counts_and_sky, fit_image
from deeplense.report import write_section
from deeplense.simulate import SimulationConfig, simulate_image
from deeplense.util import REPO, DeepLenseError, versions, write_json_atomic

FITS = REPO / "experiments" / "results" / "realism" / "lens_fits.json"
OUT = FITS.with_name("vortex_residuals.json")
PSF, PIXEL, N_LINE = 0.2, 0.05, 20
SIM_SEED = 17


def _image_model(n_points: int):
    from lenstronomy.Data.imaging_data import ImageData
    from lenstronomy.Data.psf import PSF as Psf
    from lenstronomy.ImSim.image_model import ImageModel
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel

    from deeplense.lensfit import _grid

    data = ImageData(background_rms=1.0, exposure_time=1.0, image_data=np.zeros((150, 150)), **_grid(150, PIXEL))
    psf = Psf(psf_type="GAUSSIAN", fwhm=PSF, pixel_size=PIXEL, truncation=3)
    return ImageModel(data, psf, lens_model_class=LensModel(["SIE", "SHEAR"] + ["POINT_MASS"] * n_points),
                      source_model_class=LightModel(["SERSIC_ELLIPSE"]),
                      kwargs_numerics={"supersampling_factor": 1, "supersampling_convolution": False})


def _smooth(fit: dict) -> tuple[list[dict], list[dict]]:
    return ([dict(fit["lens"]), {**fit["shear"], "ra_0": 0.0, "dec_0": 0.0}],
            [{**fit["source"], "amp": 1.0}])


def model_counts(fit: dict, extra: list[dict] | None = None) -> np.ndarray:
    """The fitted model in counts above the sky: the smooth lens (plus ``extra`` point masses) with the fitted
    source amplitude."""
    lens, source = _smooth(fit)
    unit = _image_model(len(extra or [])).image(kwargs_lens=lens + (extra or []), kwargs_source=source)
    return fit["amp_counts"] * unit


def residual(x: np.ndarray, fit: dict) -> np.ndarray:
    counts, _, sky = counts_and_sky(x)
    model = model_counts(fit)
    return (counts - sky - model) / np.sqrt(sky + np.clip(model, 0, None))


def residual_stats(z: np.ndarray, fit: dict) -> dict:
    from scipy.ndimage import uniform_filter

    n = z.shape[0]
    c = (n - 1) / 2
    rows, cols = np.indices(z.shape, dtype=np.float64)
    dx = (cols - c) * PIXEL - fit["lens"]["center_x"]
    dy = (rows - c) * PIXEL - fit["lens"]["center_y"]  # lenstronomy's dec grows with the row index here
    r = np.hypot(dx, dy) / fit["lens"]["theta_E"]
    excess = np.clip(uniform_filter(z**2, 5) - 1, 0, None)
    total = float(excess.sum()) or 1.0
    ring = (r >= 0.7) & (r < 1.4)
    sector = (np.floor((np.arctan2(dy, dx) % (2 * np.pi)) / (2 * np.pi) * 16).astype(int)) % 16
    per = np.bincount(sector[ring], weights=excess[ring], minlength=16)
    ring_total = float(per.sum()) or 1.0
    pairs = per[:8] + per[8:]
    return {"chi2_excess": float((z**2).mean() - 1), "inner": float(excess[r < 0.7].sum() / total),
            "ring": float(excess[ring].sum() / total), "outer": float(excess[r >= 1.4].sum() / total),
            "top_sector": float(per.max() / ring_total), "top_opposite_pair": float(pairs.max() / ring_total)}


def _chi2(x_counts: np.ndarray, sky: float, fit: dict, extra: list[dict]) -> float:
    model = model_counts(fit, extra)
    return float(((x_counts - sky - model) ** 2 / (sky + np.clip(model, 0, None))).sum())


def line(params) -> list[dict]:
    x0, y0, angle, half, te_total = params
    s = np.linspace(-half, half, N_LINE)
    te = te_total / np.sqrt(N_LINE)  # theta_E grows as the square root of the mass
    return [{"theta_E": float(te), "center_x": float(x0 + v * np.cos(angle)), "center_y": float(y0 + v * np.sin(angle))}
            for v in s]


def fit_substructure(x: np.ndarray, fit: dict, seed: int = 0) -> dict:
    """A vortex line and a single point mass fitted to one image's residual, the smooth fit kept."""
    from scipy.optimize import differential_evolution

    data, _, sky = counts_and_sky(x)  # counts above the minimum, and the sky
    base = _chi2(data, sky, fit, [])
    vortex = differential_evolution(lambda p: _chi2(data, sky, fit, line(p)),
                                    [(-0.6, 0.6), (-0.6, 0.6), (0, np.pi), (0.05, 3.0), (0.01, 0.8)],
                                    seed=seed, maxiter=40, popsize=10, tol=1e-6, polish=False)
    point = differential_evolution(
        lambda p: _chi2(data, sky, fit, [{"theta_E": float(p[2]), "center_x": float(p[0]), "center_y": float(p[1])}]),
        [(-2.5, 2.5), (-2.5, 2.5), (0.005, 0.8)], seed=seed, maxiter=40, popsize=10, tol=1e-6, polish=False)
    x0, y0, angle, half, te = (float(v) for v in vortex.x)
    return {"chi2_smooth": base, "chi2_line": float(vortex.fun), "chi2_point": float(point.fun),
            "line": {"center_offset_arcsec": float(np.hypot(x0 - fit["lens"]["center_x"],
                                                            y0 - fit["lens"]["center_y"])),
                     "angle_deg": float(np.degrees(angle)), "half_length_arcsec": half, "theta_E_total_arcsec": te,
                     "half_length_over_theta_E": half / fit["lens"]["theta_E"]},
            "point": {"radius_over_theta_E": float(np.hypot(point.x[0] - fit["lens"]["center_x"],
                                                             point.x[1] - fit["lens"]["center_y"])
                                                    / fit["lens"]["theta_E"]), "theta_E_arcsec": float(point.x[2])}}


def _sim_task(task):
    cls, i = task
    config = SimulationConfig.from_preset("realistic")
    x = simulate_image(config, SIM_SEED, "val", cls, i, dtype=np.float64)[0][0]
    fit = fit_image(x, psf_fwhm_arcsec=PSF)
    out = {"image": f"{cls}/{i}", "class": cls, "fit": fit, "stats": residual_stats(residual(x, fit), fit)}
    if cls == "vort":
        out["substructure"] = fit_substructure(x, fit)
    return out


def _median(rows, key, sub=None):
    v = [r[key] if sub is None else r[key][sub] for r in rows]
    return float(np.median(v)) if v else float("nan")


def table(result: dict) -> str:
    lines = ["| images | n | excess chi-square per pixel | share inside / on / outside the ring | ring: largest "
             "sector / opposite pair |", "|---|---|---|---|---|"]
    for source in ("real", "simulated"):
        for cls in CLASSES:
            rows = [r for r in result[source] if r["class"] == cls]
            if not rows:
                continue
            s = [r["stats"] for r in rows]
            lines.append(f"| {source} `{cls}` | {len(rows)} | {np.median([v['chi2_excess'] for v in s]):.3f} | "
                         f"{np.median([v['inner'] for v in s]):.2f} / {np.median([v['ring'] for v in s]):.2f} / "
                         f"{np.median([v['outer'] for v in s]):.2f} | {np.median([v['top_sector'] for v in s]):.2f} / "
                         f"{np.median([v['top_opposite_pair'] for v in s]):.2f} |")
    lines += ["", "| `vort` images | n | chi-square removed: line / point (% of the smooth fit's excess) | line: "
                  "half-length / theta_E | line: total theta_E (\") | line centre off the lens (\") | point: radius / "
                  "theta_E |", "|---|---|---|---|---|---|---|"]
    for source in ("real", "simulated"):
        rows = [r["substructure"] for r in result[source] if "substructure" in r]
        if not rows:
            continue

        def removed(kind, rows=rows):
            return np.median([100 * (r["chi2_smooth"] - r[f"chi2_{kind}"]) / max(r["chi2_smooth"] - 22500, 1.0)
                              for r in rows])

        lines.append(f"| {source} | {len(rows)} | {removed('line'):.0f}% / {removed('point'):.0f}% | "
                     f"{_median([r['line'] for r in rows], 'half_length_over_theta_E'):.2f} | "
                     f"{_median([r['line'] for r in rows], 'theta_E_total_arcsec'):.3f} | "
                     f"{_median([r['line'] for r in rows], 'center_offset_arcsec'):.2f} | "
                     f"{_median([r['point'] for r in rows], 'radius_over_theta_E'):.2f} |")
    lines += ["", f"- Command: `{result['command']}`.",
              "- Medians over the images. The shares are of the smoothed positive excess of the residual's chi-square.",
              "- The chi-square removed is in per cent of the smooth fit's excess over the 22,500 pixels' expectation.",
              f"- Simulated: the `realistic` preset at this commit, seed {SIM_SEED}, fitted as the real files were."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", required=True, help="the folder with the real {no,sphere,vort}/*.npy")
    p.add_argument("--sim-per-class", type=int, default=6, help="simulated images per class (default 6)")
    p.add_argument("--classes", default=",".join(CLASSES), help="simulated classes (default all three)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--readme", action="store_true", help="write the tables between the vortex markers")
    args = p.parse_args(argv)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {"real": [], "simulated": []}
    result["command"] = shlex.join(["python", "experiments/vortex_residuals.py", *(sys.argv[1:] if argv is None
                                                                                    else argv)])
    result["versions"] = versions()
    try:
        fits = [f for f in json.loads(FITS.read_text())["fits"] if float(f["psf_fwhm"]) == PSF]
        done = {r["image"] for r in result["real"]}
        for f in fits:
            if f["image"] in done:
                continue
            path = Path(args.real) / f["image"]
            raw = path.read_bytes()
            if hashlib.sha256(raw).hexdigest() != f["sha256"]:
                raise DeepLenseError(f"{path}: not the file {FITS.name} was fitted on")
            x = np.load(path, allow_pickle=False).astype(np.float64).reshape(150, 150)
            row = {"image": f["image"], "class": f["class"], "stats": residual_stats(residual(x, f["fit"]), f["fit"])}
            if f["class"] == "vort":
                row["substructure"] = fit_substructure(x, f["fit"])
            result["real"].append(row)
            write_json_atomic(out, result)
            print(f"real {f['image']}: {row['stats']}", flush=True)
    except (OSError, DeepLenseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    done = {r["image"] for r in result["simulated"]}
    tasks = [(c, i) for c in args.classes.split(",") for i in range(1, args.sim_per_class + 1)
             if f"{c}/{i}" not in done]
    with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
        for row in pool.map(_sim_task, tasks):
            result["simulated"].append(row)
            write_json_atomic(out, result)
            print(f"simulated {row['image']}: {row['stats']}", flush=True)
    print(table(result))
    if args.readme:
        print(f"updated {write_section('vortex', table(result))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
