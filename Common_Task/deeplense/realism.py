"""How real is the simulation? Per-image statistics, their distributions side by side, and a classifier
two-sample test (can a simple classifier tell a simulated image from a real one?).

Every statistic is a function of one min-max normalised image ``x`` (float64 ``(H, W)`` in [0, 1]). "Bright
pixels" are those with ``x > 0.1``; their flux-weighted centroid ``(cx, cy)`` is the centre the geometric
statistics are measured from, and ``r`` is a pixel's distance from it. "Corners" are the four 10x10 corner
blocks, pooled (400 pixels). ``K`` is the number of levels, 1 / (smallest positive step between pixel
values): for integer photon counts min-max normalised, ``x = (counts - min) / (max - min)`` and ``K = max - min``.

    python -m deeplense realism --real ../shared/realdata/sample --preset common_task --n 100 --out realism/x

The real images are read only, never written or drawn: the outputs are numbers and histograms of numbers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .data import CLASSES, read_image
from .util import DeepLenseError

THRESHOLD = 0.1
CORNER = 10
SECTORS = 16


def _bright(x: np.ndarray):
    """(weights, dx, dy) of the bright pixels, relative to their flux-weighted centroid."""
    yy, xx = np.nonzero(x > THRESHOLD)
    w = x[yy, xx]
    if w.size == 0:
        return w, w, w
    cx, cy = np.average(xx, weights=w), np.average(yy, weights=w)
    return w, xx - cx, yy - cy


def _corners(x: np.ndarray) -> np.ndarray:
    c = CORNER
    return np.concatenate([x[:c, :c].ravel(), x[:c, -c:].ravel(), x[-c:, :c].ravel(), x[-c:, -c:].ravel()])


def _levels(x: np.ndarray) -> float:
    v = np.unique(x)
    steps = np.diff(v)
    steps = steps[steps > 0]
    return float(1.0 / steps.min()) if steps.size else float("inf")


def _moments(x: np.ndarray) -> tuple[float, float, float]:
    w, dx, dy = _bright(x)
    if w.size == 0:
        return 0.0, 0.0, 0.0
    return float(np.average(dx * dx, weights=w)), float(np.average(dy * dy, weights=w)), float(
        np.average(dx * dy, weights=w))


def log10_levels(x):
    """log10 K, K = 1 / (smallest positive step between distinct pixel values): ~2.9 for integer counts."""
    return float(np.log10(_levels(x)))


def frac_gt_01(x):
    """mean(x > 0.1): the fraction of bright pixels."""
    return float((x > 0.1).mean())


def frac_gt_05(x):
    """mean(x > 0.5): the fraction of pixels above half the peak."""
    return float((x > 0.5).mean())


def image_mean(x):
    """mean(x) over the whole image."""
    return float(x.mean())


def corner_mean(x):
    """mean of the 400 corner pixels: the sky level after normalisation."""
    return float(_corners(x).mean())


def corner_std(x):
    """standard deviation of the 400 corner pixels: the sky noise after normalisation."""
    return float(_corners(x).std())


def log10_sky_fano(x):
    """log10( K var(corners) / mean(corners) ): the sky's variance over mean in count units (0 for Poisson)."""
    c = _corners(x)
    m = c.mean()
    return float(np.log10(_levels(x) * c.var() / m)) if m > 0 and c.var() > 0 else float("nan")


def ellipticity(x):
    """sqrt((Qxx - Qyy)^2 + 4 Qxy^2) / (Qxx + Qyy), Q the flux-weighted second moments of the bright pixels."""
    qxx, qyy, qxy = _moments(x)
    s = qxx + qyy
    return float(np.hypot(qxx - qyy, 2 * qxy) / s) if s > 0 else 0.0


def axis_angle_deg(x):
    """|0.5 atan2(2 Qxy, Qxx - Qyy)| in degrees: the major axis's angle to x (0: along x, 90: along y)."""
    qxx, qyy, qxy = _moments(x)
    return float(abs(np.degrees(0.5 * np.arctan2(2 * qxy, qxx - qyy))))


def azimuthal_contrast(x):
    """max / mean of the bright flux in 16 equal angular sectors around the centroid (1: a uniform ring)."""
    w, dx, dy = _bright(x)
    if w.size == 0:
        return float("nan")
    k = ((np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * SECTORS).astype(int) % SECTORS
    f = np.bincount(k, weights=w, minlength=SECTORS)
    return float(f.max() / f.mean())


def ring_radius_px(x):
    """sum(w r) / sum(w) over the bright pixels, w = x, r = distance from the centroid, px."""
    w, dx, dy = _bright(x)
    return float(np.average(np.hypot(dx, dy), weights=w)) if w.size else float("nan")


def ring_width_px(x):
    """sqrt(sum(w (r - R)^2) / sum(w)) over the bright pixels, R = ring_radius_px: the ring's radial spread, px."""
    w, dx, dy = _bright(x)
    if w.size == 0:
        return float("nan")
    r = np.hypot(dx, dy)
    return float(np.sqrt(np.average((r - np.average(r, weights=w)) ** 2, weights=w)))


def _radius_map(x):
    """(distance of every pixel from the bright centroid, R = ring_radius_px), or None without bright pixels."""
    yy, xx = np.nonzero(x > THRESHOLD)
    if yy.size == 0:
        return None
    w = x[yy, xx]
    cx, cy = np.average(xx, weights=w), np.average(yy, weights=w)
    big_r = np.average(np.hypot(xx - cx, yy - cy), weights=w)
    gy, gx = np.mgrid[: x.shape[0], : x.shape[1]]
    return np.hypot(gx - cx, gy - cy), big_r


def outer_flux_fraction(x):
    """sum(x - s) over pixels with 1.4 R < r < 2.2 R, divided by sum(x - s) over all, s = corner_mean: the halo."""
    m = _radius_map(x)
    if m is None:
        return float("nan")
    r, big_r = m
    f = x - _corners(x).mean()
    return float(f[(r > 1.4 * big_r) & (r < 2.2 * big_r)].sum() / f.sum())


def center_level(x):
    """mean of x within 0.3 R of the centroid, R = ring_radius_px: light inside the ring (a central image)."""
    m = _radius_map(x)
    if m is None:
        return float("nan")
    r, big_r = m
    return float(x[r < 0.3 * big_r].mean())


def knots(x):
    """local maxima (7x7, ties merged) of x smoothed by a Gaussian of sigma 1.5 px, above half the smoothed peak."""
    from scipy import ndimage

    s = ndimage.gaussian_filter(x, 1.5)
    peaks = (s == ndimage.maximum_filter(s, size=7)) & (s > 0.5 * s.max())
    return float(ndimage.label(peaks, structure=np.ones((3, 3)))[1])


STATISTICS = {
    "log10_levels": log10_levels,
    "frac_gt_0.1": frac_gt_01,
    "frac_gt_0.5": frac_gt_05,
    "mean": image_mean,
    "corner_mean": corner_mean,
    "corner_std": corner_std,
    "log10_sky_fano": log10_sky_fano,
    "ellipticity": ellipticity,
    "axis_angle_deg": axis_angle_deg,
    "azimuthal_contrast": azimuthal_contrast,
    "ring_radius_px": ring_radius_px,
    "ring_width_px": ring_width_px,
    "outer_flux_fraction": outer_flux_fraction,
    "center_level": center_level,
    "knots": knots,
}


def describe() -> dict[str, str]:
    """Each statistic's one-line definition (its docstring)."""
    return {k: f.__doc__.strip() for k, f in STATISTICS.items()}


def statistics(images) -> dict[str, np.ndarray]:
    """Every statistic of every image: ``{name: (N,) array}``. ``images``: ``(N, H, W)`` or ``(N, 1, H, W)``."""
    x = np.asarray(images, dtype=np.float64)
    x = x.reshape(len(x), x.shape[-2], x.shape[-1])
    return {k: np.array([f(img) for img in x]) for k, f in STATISTICS.items()}


# ----------------------------------------------------------------------------------------------- reading
def find_class_images(folder: str | os.PathLike) -> list[tuple[str, str]]:
    """``(path, class)`` of every ``.npy`` in any ``no/``, ``sphere/`` or ``vort/`` folder below ``folder``
    (hidden and ``__MACOSX`` folders skipped), sorted."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DeepLenseError(f"{root}: no such folder" if not root.exists() else f"{root}: not a folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        cls = os.path.basename(dirpath)
        if cls in CLASSES:
            found += [(os.path.join(dirpath, f), cls) for f in sorted(filenames)
                      if f.endswith(".npy") and not f.startswith("._")]
    if not found:
        raise DeepLenseError(f"{root}: no .npy files in any {'/, '.join(CLASSES)}/ folder below it")
    return found


def read_images(folder, limit_per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, H, W)`` float64 and class indices of :func:`find_class_images`. The float32 copy
    :func:`deeplense.data.read_image` makes would merge the count levels, so this reads the file's own dtype."""
    files = find_class_images(folder)
    per: dict[str, int] = {}
    images, labels = [], []
    for path, cls in files:
        if limit_per_class is not None and per.get(cls, 0) >= limit_per_class:
            continue
        shape = read_image(path).shape  # every check of the loader (header, pickle, shape, range), in one line
        img = np.load(path, allow_pickle=False).astype(np.float64).reshape(shape)  # (1,H,W), (H,W,1) -> (H,W)
        if images and img.shape != images[0].shape:
            raise DeepLenseError(f"{path}: shape {img.shape}, the others {images[0].shape}")
        images.append(img)
        labels.append(CLASSES.index(cls))
        per[cls] = per.get(cls, 0) + 1
    return np.stack(images), np.array(labels)


def check_samples(real: tuple, sim: tuple, real_name: str, sim_name: str) -> None:
    """Refuse two samples (``(images, labels)`` each) the comparison cannot be read on: a class missing on one side
    (the pooled test would compare different class mixes, and the per-class lines would leave it out), or images on
    both sides (the same folder twice: each image's twin, with the other label, lands in the training folds, and
    the AUC goes to 0 instead of 0.5)."""
    import hashlib

    for name, (_, labels) in ((real_name, real), (sim_name, sim)):
        missing = [c for k, c in enumerate(CLASSES) if not np.any(np.asarray(labels) == k)]
        if missing:
            raise DeepLenseError(f"{name}: no {missing[0]}/ images below it; realism compares the same three classes "
                                 f"({', '.join(CLASSES)}) on both sides")

    def digests(images):
        return {hashlib.sha256(np.ascontiguousarray(im, dtype=np.float64).tobytes()).hexdigest() for im in images}

    shared = digests(real[0]) & digests(sim[0])
    if shared:
        raise DeepLenseError(f"{real_name} and {sim_name}: {len(shared)} identical image(s) on both sides (the same "
                             f"folder twice?); the two-sample test needs two different samples")


def simulate_images(preset: str, n_per_class: int, seed: int = 0, progress: bool = True):
    """``n_per_class`` images per class of a preset, in memory (split ``val``, indices 1..n), float64."""
    from .simulate import SimulationConfig, simulate_image
    from .util import progress_bar

    config = SimulationConfig.from_preset(preset)
    tasks = [(c, i) for c in CLASSES for i in range(1, n_per_class + 1)]
    images = [simulate_image(config, seed, "val", c, i, dtype=np.float64)[0][0]
              for c, i in progress_bar(tasks, desc=f"simulating {preset}", unit="img", disable=not progress)]
    return np.stack(images), np.array([CLASSES.index(c) for c, _ in tasks])


# ----------------------------------------------------------------------------------------------- comparison
def _summary(v: np.ndarray) -> dict:
    v = v[np.isfinite(v)]
    if not v.size:
        return {"median": None, "p10": None, "p90": None, "n": 0}
    p10, med, p90 = np.percentile(v, [10, 50, 90])
    return {"median": float(med), "p10": float(p10), "p90": float(p90), "n": int(v.size)}


def compare(real: dict, sim: dict) -> dict:
    """Per statistic: real and simulated median and 10-90% range, the KS distance and its p-value, and whether
    the simulated median lies inside the real 10-90% range."""
    from scipy.stats import ks_2samp

    out = {}
    for k in STATISTICS:
        a, b = real[k][np.isfinite(real[k])], sim[k][np.isfinite(sim[k])]
        ks = ks_2samp(a, b) if a.size and b.size else None
        r, s = _summary(a), _summary(b)
        inside = (s["median"] is not None and r["p10"] is not None and r["p10"] <= s["median"] <= r["p90"])
        out[k] = {"real": r, "sim": s, "ks": float(ks.statistic) if ks else None,
                  "ks_p": float(ks.pvalue) if ks else None, "sim_median_in_real_10_90": bool(inside)}
    return out


def _features(st: dict) -> np.ndarray:
    x = np.column_stack([st[k] for k in STATISTICS])
    return np.nan_to_num(x, nan=0.0, posinf=1e6, neginf=-1e6)


def _classifiers(seed: int):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return {
        "logistic_regression": lambda: make_pipeline(StandardScaler(), LogisticRegression(
            max_iter=2000, class_weight="balanced")),
        "random_forest": lambda: RandomForestClassifier(n_estimators=200, min_samples_leaf=2, class_weight="balanced",
                                                        random_state=seed, n_jobs=1),
    }


def two_sample_test(x_real: np.ndarray, x_sim: np.ndarray, *, folds: int = 5, repeats: int = 5,
                    n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Classifier two-sample test: cross-validated AUC of telling real (1) from simulated (0) images by their
    statistics. 0.5: indistinguishable; 1.0: always told apart.

    For each classifier, ``repeats`` stratified ``folds``-fold partitions each give every image an out-of-fold
    probability; the AUC is that of the mean over repeats, with a 95% percentile interval from ``n_bootstrap``
    resamples of the images (stratified: real and simulated resampled separately)."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    if n_bootstrap < 1:
        raise DeepLenseError(f"two-sample test: n_bootstrap {n_bootstrap}: must be at least 1 (the AUC's interval)")
    x = np.vstack([x_real, x_sim])
    y = np.r_[np.ones(len(x_real), int), np.zeros(len(x_sim), int)]
    k = min(folds, len(x_real), len(x_sim))
    if k < 2:
        raise DeepLenseError(f"two-sample test: need at least 2 real and 2 simulated images (got {len(x_real)} and "
                             f"{len(x_sim)})")
    rng = np.random.default_rng(seed)
    out = {}
    for name, make in _classifiers(seed).items():
        p = np.zeros(len(y))
        for rep in range(repeats):
            for tr, te in StratifiedKFold(k, shuffle=True, random_state=seed + rep).split(x, y):
                p[te] += make().fit(x[tr], y[tr]).predict_proba(x[te])[:, 1] / repeats
        auc = float(roc_auc_score(y, p))
        ir, isim = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
        boots = []
        for _ in range(n_bootstrap):
            i = np.r_[rng.choice(ir, ir.size), rng.choice(isim, isim.size)]
            boots.append(roc_auc_score(y[i], p[i]))
        lo, hi = np.percentile(boots, [2.5, 97.5])
        out[name] = {"auc": auc, "ci95": [float(lo), float(hi)]}
    out["folds"], out["repeats"], out["n_real"], out["n_sim"] = k, repeats, int(len(x_real)), int(len(x_sim))
    return out


def realism(real_images, real_labels, sim_images, sim_labels, *, seed: int = 0, n_bootstrap: int = 1000) -> dict:
    """Statistics compared and two-sample tests, over all images and per class."""
    rs, ss = statistics(real_images), statistics(sim_images)
    result = {"statistics": describe(), "comparison": compare(rs, ss),
              "two_sample": two_sample_test(_features(rs), _features(ss), seed=seed, n_bootstrap=n_bootstrap),
              "per_class": {}}
    for i, c in enumerate(CLASSES):
        r, s = real_labels == i, sim_labels == i
        if r.sum() >= 2 and s.sum() >= 2:
            sub_r = {k: v[r] for k, v in rs.items()}
            sub_s = {k: v[s] for k, v in ss.items()}
            result["per_class"][c] = {"two_sample": two_sample_test(_features(sub_r), _features(sub_s), seed=seed,
                                                                    n_bootstrap=n_bootstrap),
                                      "comparison": compare(sub_r, sub_s)}
    return result, rs, ss


def figure(real: dict, sim: dict, stem, *, label: str, comparison: dict):
    """Each statistic's histogram, real against simulated (numbers only: no image is drawn)."""
    from .plots import figure as new_figure
    from .plots import save_figure, style

    with style():
        names = list(STATISTICS)
        cols = 5
        rows = -(-len(names) // cols)
        fig, axes = new_figure(rows, cols, figsize=(3.0 * cols, 2.4 * rows))
        for ax, k in zip(axes.ravel(), names, strict=False):
            a, b = real[k][np.isfinite(real[k])], sim[k][np.isfinite(sim[k])]
            both = np.r_[a, b]
            lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
            bins = np.linspace(lo, hi + 1e-12 if hi == lo else hi, 25)
            ax.hist(np.clip(b, lo, hi), bins=bins, density=True, alpha=0.55, color="#D55E00", label=label)
            ax.hist(np.clip(a, lo, hi), bins=bins, density=True, histtype="step", lw=1.8, color="#0072B2",
                    label="real sample")
            ks = comparison[k]["ks"]
            ax.set_title(f"{k}" + (f"  (KS {ks:.2f})" if ks is not None else ""), fontsize=9)
            ax.set_yticks([])
        for ax in axes.ravel()[len(names):]:
            ax.axis("off")
        axes.ravel()[0].legend(fontsize=8, loc="best")
        fig.suptitle(f"Per-image statistics: real sample vs {label}")
        fig.tight_layout()
        return save_figure(fig, stem)


# ----------------------------------------------------------------------------------------------- targets
TARGETS_FILE = Path(__file__).with_name("realism_targets.json")
"""The real sample's median and 10-90% range of every statistic, committed as numbers (no image) so that tests
can hold the default preset to them without the real files."""


def targets(real: dict, source: str) -> dict:
    """``{"source": ..., "n": N, "statistics": {name: {"median", "p10", "p90"}}}`` of the real statistics."""
    return {"source": source, "n": int(len(next(iter(real.values())))), "definitions": describe(),
            "statistics": {k: {q: v[q] for q in ("median", "p10", "p90")} for k, v in
                           ((k, _summary(real[k])) for k in STATISTICS)}}


def load_targets(path: str | os.PathLike = TARGETS_FILE) -> dict:
    import json

    try:
        t = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DeepLenseError(f"{path}: unreadable targets file ({exc})") from None
    missing = [k for k in STATISTICS if k not in t.get("statistics", {})]
    if missing:
        raise DeepLenseError(f"{path}: no target for {', '.join(missing)}")
    return t


def outside_targets(sim: dict, target: dict) -> dict[str, float]:
    """The statistics whose simulated median lies outside the target's 10-90% range, with that median."""
    out = {}
    for k in STATISTICS:
        med = _summary(sim[k])["median"]
        t = target["statistics"][k]
        if med is None or not t["p10"] <= med <= t["p90"]:
            out[k] = med
    return out


def format_table(result: dict, label: str) -> str:
    """The comparison and the two-sample AUCs as Markdown."""
    lines = [f"| statistic | real sample median (10-90%) | {label} median (10-90%) | KS |", "|---|---|---|---|"]
    for k, c in result["comparison"].items():
        r, s = c["real"], c["sim"]

        def cell(d):
            return "n/a" if d["median"] is None else f"{d['median']:.4g} ({d['p10']:.4g}-{d['p90']:.4g})"

        mark = "" if c["sim_median_in_real_10_90"] else " (outside)"
        lines.append(f"| {k} | {cell(r)} | {cell(s)}{mark} | {c['ks']:.2f} |" if c["ks"] is not None else
                     f"| {k} | {cell(r)} | {cell(s)}{mark} | n/a |")
    t = result["two_sample"]
    lines.append("")
    lines.append("two-sample AUC (0.5: indistinguishable), all classes and per class:")
    for name in ("logistic_regression", "random_forest"):
        per = ", ".join(f"{c} {v['two_sample'][name]['auc']:.2f}" for c, v in result["per_class"].items())
        lines.append(f"- {name}: {t[name]['auc']:.3f} [{t[name]['ci95'][0]:.3f}, {t[name]['ci95'][1]:.3f}]; {per}")
    return "\n".join(lines)
